"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 with no spills.

The compile runs in a subprocess without TRITON_INTERPRET (which the rest of the suite
sets on machines without a GPU), needs no GPU, and fails on a compile error, on local
memory in use (a register spill) or on a stack frame.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from rlkern.triton import KERNEL_MODULES

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _present(name: str) -> bool:
    return importlib.util.find_spec(f"rlkern.triton.{name}") is not None


@pytest.mark.parametrize("module", [m for m in KERNEL_MODULES if _present(m)])
def test_kernels_compile_for_sm80_and_sm90_without_spills(module):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "rlkern.triton.aot", module], capture_output=True, text=True,
                          env=env, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no kernels compiled for {module}: {proc.stderr[-2000:]}"
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    assert {r["sm"] for r in rows} == {80, 90}
    spilled = [r for r in rows if r["local"] != 0 or r["stack"] != 0]
    assert not spilled, f"kernels spill registers: {spilled}"
    assert proc.returncode == 0, proc.stderr[-2000:]
