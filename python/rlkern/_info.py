from __future__ import annotations

import importlib.util
import os
import warnings
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


def set_num_threads(n: int) -> int:
    """Set the CPU kernels' thread count and start them; returns the count now in use.

    ``n <= 0`` restores the default: ``RLKERN_NUM_THREADS`` when it is a positive integer,
    else the machine's hardware threads. The count is capped at 4 per hardware thread (at
    least 8; ``rlkern._C.threads.max_threads()``): the kernels split rows over cores, so
    more threads only oversubscribe them. A larger ``n`` (or ``RLKERN_NUM_THREADS``) is
    capped with a ``RuntimeWarning``. When the system refuses to start a thread (thread
    or address-space limits), the kernels run on the threads that did start, with a
    ``RuntimeWarning``; results are bit-identical for every thread count.
    """
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    threads = _ext.load().threads
    cap = threads.max_threads()
    if n > cap:
        warnings.warn(f"set_num_threads({n}): capped at {cap} threads (4 per hardware thread, at least 8)",
                      RuntimeWarning, stacklevel=2)
    want = min(n, cap) if n > 0 else 0
    got = threads.start(want)
    if want > 0 and got < want:
        warnings.warn(f"set_num_threads({n}): only {got} of {want} threads could be started "
                      "(system thread or memory limits); the kernels run on those", RuntimeWarning, stacklevel=2)
    return got


def _check_env_threads() -> None:
    """Warns once, at import, about an RLKERN_NUM_THREADS the pool will not take as given
    (the C++ side applies the same rule: capped, or ignored for the hardware count)."""
    value = os.environ.get("RLKERN_NUM_THREADS")
    if value is None or not _ext.available():
        return
    threads = _ext.load().threads
    n = threads.env_threads(value)
    if n == 0:
        warnings.warn(f"RLKERN_NUM_THREADS={value!r} is not a positive integer: ignored, using the "
                      f"{threads.hardware_threads()} hardware threads", RuntimeWarning, stacklevel=2)
    elif int(value.strip()) > n:
        warnings.warn(f"RLKERN_NUM_THREADS={value!r}: capped at {n} threads (4 per hardware thread, at least 8)",
                      RuntimeWarning, stacklevel=2)


_check_env_threads()
