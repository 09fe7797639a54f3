from __future__ import annotations

import importlib.util
from typing import Any, Dict

import torch

from . import _ext


def info() -> Dict[str, Any]:
    """What this installation holds and what can run here.

    ``compiled``: backends built into the package (``cpu`` always, ``cuda`` when nvcc
    was found at build time, ``triton`` when the triton package is importable).
    ``runnable``: the subset that can run on this machine now. ``cpu_isa``: the build
    of the vectorised CPU kernels that runs here (``avx2``, or ``baseline`` on CPUs
    without AVX2+FMA or with ``RLKERN_DISABLE_AVX2`` set).
    """
    from . import __version__

    compiled = []
    runnable = []
    core = None
    if _ext.available():
        core = _ext.load()
        compiled.append("cpu")
        runnable.append("cpu")
        if core.with_cuda:
            compiled.append("cuda")
    has_cuda_device = torch.cuda.is_available()
    if "cuda" in compiled and has_cuda_device and core.cuda_device_count() > 0:
        runnable.append("cuda")
    if importlib.util.find_spec("triton") is not None:
        compiled.append("triton")
        if has_cuda_device:
            runnable.append("triton")
    return {
        "version": __version__,
        "compiled": compiled,
        "runnable": runnable,
        "num_threads": core.num_threads() if core is not None else None,
        "cpu_isa": core.cpu_isa() if core is not None else None,
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if has_cuda_device else None,
    }


def get_num_threads() -> int:
    """Threads the CPU kernels spread rows over (the calling thread included)."""
    return _ext.load().num_threads()


def set_num_threads(n: int) -> None:
    """Set the CPU kernels' thread count; ``n <= 0`` restores the default
    (``RLKERN_NUM_THREADS`` when set, else the machine's cores)."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    _ext.load().set_num_threads(n)
