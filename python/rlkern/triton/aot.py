"""Ahead-of-time compilation of the Triton kernels for given GPU architectures.

Runs without a GPU: ``triton.compile`` lowers to PTX and cubin for a ``GPUTarget`` and
``cuobjdump --dump-resource-usage`` (shipped with triton) reads the registers, stack and
local memory of the result. Local memory or stack in use means the kernel spilled.

``python -m rlkern.triton.aot MODULE [MODULE ...]`` prints one JSON line per compiled
(spec, architecture). It must run without ``TRITON_INTERPRET``, which replaces
``triton.jit`` functions by interpreted ones.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List


@dataclass(frozen=True)
class AotSpec:
    """One compile of a ``@triton.jit`` function: its argument types and constants.

    ``signature`` maps every argument name to a Triton type ("*fp32", "*bf16", "i32",
    "fp32", ...) or "constexpr"; ``constexprs`` gives the constexpr values.
    """

    name: str
    kernel: Any
    signature: Dict[str, str]
    constexprs: Dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def compile_spec(spec: AotSpec, capability: int) -> Dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout

    def field_of(key: str) -> int:
        m = re.search(rf"\b{key}:(\d+)", usage)
        return int(m.group(1)) if m else -1

    return {"name": spec.name, "sm": capability, "registers": field_of("REG"), "stack": field_of("STACK"),
            "local": field_of("LOCAL"), "shared": field_of("SHARED")}


def specs_of(module_name: str) -> List[AotSpec]:
    module = importlib.import_module(f"rlkern.triton.{module_name}")
    return list(module.AOT_SPECS)


def main(argv: List[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("rlkern.triton.aot must run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    status = 0
    for module_name in argv:
        for spec in specs_of(module_name):
            for cc in (80, 90):
                try:
                    row = compile_spec(spec, cc)
                except Exception as e:  # report every failure, not only the first
                    row = {"name": spec.name, "sm": cc, "error": f"{type(e).__name__}: {e}"}
                    status = 1
                print(json.dumps(row), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
