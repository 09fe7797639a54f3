"""Comparison helpers shared by the test modules (docs/DESIGN.md section 4)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

VALUE_TOL = 1e-5
GRAD_TOL = 1e-4

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Backends that can run on CPU tensors here: the C++ core always, Triton when the
# interpreter is on. Tests parametrise over these and compare against the reference.
CPU_BACKENDS = ["cpu"] + (["triton"] if HAS_TRITON and TRITON_INTERPRET else [])

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = VALUE_TOL, name: str = "value") -> None:
    """Max-norm relative error: max|a - e| <= tol * max(max|e|, tiny).

    NaN and infinite entries must sit at the same positions with the same values.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    a_bad, e_bad = ~torch.isfinite(a), ~torch.isfinite(e)
    assert torch.equal(a_bad, e_bad), f"{name}: non-finite entries differ ({int(a_bad.sum())} vs {int(e_bad.sum())})"
    if a_bad.any():
        assert torch.equal(a[a_bad].nan_to_num(posinf=1.0, neginf=-1.0, nan=0.0),
                           e[e_bad].nan_to_num(posinf=1.0, neginf=-1.0, nan=0.0)), f"{name}: inf/nan values differ"
    fin = ~e_bad
    if not fin.any():
        return
    diff = (a[fin] - e[fin]).abs().max().item()
    scale = max(e[fin].abs().max().item(), 1e-30)
    assert diff <= tol * scale, f"{name}: max abs diff {diff:.3e} exceeds {tol:.0e} x reference max {scale:.3e}"


def bit_pattern(t: torch.Tensor) -> torch.Tensor:
    """The bits of a floating tensor as integers of its width, for bit-for-bit comparisons
    (NaN, -0 and every rounding compare exactly)."""
    ints = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}[t.dtype]
    return t.contiguous().view(ints)


def run_with_baseline_isa(tmp_path, module: str, body: str) -> None:
    """Runs ``body`` (with the test module imported as ``t``) in a fresh interpreter with
    RLKERN_DISABLE_AVX2 set, so the kernels compiled for baseline x86-64 run; fails
    unless that build ran and ``body`` passed."""
    script = tmp_path / "baseline.py"
    script.write_text(
        "import sys, torch, rlkern\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        f"import {module} as t\n"
        "assert rlkern.info()['cpu_isa'] == 'baseline'\n"
        + textwrap.dedent(body) + "print('ok')\n")
    env = dict(os.environ, RLKERN_DISABLE_AVX2="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def run_isolated(code: str, *, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter and asserts that it ended cleanly: exit status 0
    (no signal, no abort, no hang past ``timeout``). Crash-safety tests put the nastiest
    inputs of an op here, so a segfault fails one test instead of killing the run.

    ``code`` should print what it checked; the finished process is returned for further
    assertions on its output."""
    full_env = dict(os.environ, **(env or {}))
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              env=full_env, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: no exit within {timeout} s")
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    assert proc.returncode == 0, f"{how}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    return proc
