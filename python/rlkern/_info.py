from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import os
import warnings
from typing import Any, Dict, Optional

import torch

from . import _ext


def info() -> Dict[str, Any]:
    """What this installation holds and what can run here.

    ``compiled``: backends built into the package (``cpu`` always, ``cuda`` when nvcc
    was found at build time, ``triton`` when the triton package is importable).
    ``runnable``: the subset that can run on this machine now (``cuda`` only when the
    installed driver can start the CUDA runtime the scans were built with). ``cpu_isa``:
    the build of the vectorised CPU kernels that runs here (``avx2``, or ``baseline`` on
    CPUs without AVX2+FMA or with ``RLKERN_DISABLE_AVX2`` set). ``cuda``: see
    :func:`cuda_support`. ``scans_on_cuda``: which kernels the return scans run on CUDA
    tensors here (see :func:`scan_kernels`; decided without a GPU). ``cpu_pool``: the
    threads the CPU kernels called from this thread run on now: ``openmp (<library>)``,
    torch's OpenMP team, when torch has as many intra-op threads as ``num_threads`` (and
    ``RLKERN_POOL`` is not ``own``), else ``rlkern``, rlkern's own pool.
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
    cuda = cuda_support()
    if "cuda" in compiled and has_cuda_device and cuda["driver_ok"] is not False and core.cuda_device_count() > 0:
        runnable.append("cuda")
    if triton_importable():
        compiled.append("triton")
        if has_cuda_device:
            runnable.append("triton")
    return {
        "version": __version__,
        "compiled": compiled,
        "runnable": runnable,
        "num_threads": core.num_threads() if core is not None else None,
        "cpu_isa": core.cpu_isa() if core is not None else None,
        "cpu_pool": core.threads.backend() if core is not None else None,
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if has_cuda_device else None,
        "cuda": cuda,
        "scans_on_cuda": scan_kernels(cuda),
    }


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """Whether the triton package imports (the Triton kernels can then be compiled)."""
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or an installation that fails to import
        return False
    return True


def cuda_scans_built() -> bool:
    """Whether the compiled core holds the CUDA C++ scans (nvcc was found at build time)."""
    return _ext.available() and bool(getattr(_ext.load(), "with_cuda", False))


def scan_kernels(support: Optional[Dict[str, Any]] = None) -> str:
    """Which kernels the return scans (``gae``, ``discounted_returns``, ``lambda_returns``,
    ``masked_gae``) run by default on CUDA tensors with this build and driver:
    ``"cuda"``, the CUDA C++ kernels, when they were built in and the installed driver can
    start the CUDA runtime they link (or no driver is found to say otherwise);
    ``"triton"``, the Triton kernels, compiled for the installed driver at run time, when
    the CUDA C++ scans were not built or the driver is too old for them (R535 with a CUDA
    13 build); ``"reference"``, torch ops, when neither can run. ``RLKERN_BACKEND=triton``
    forces the Triton kernels."""
    support = cuda_support() if support is None else support
    if cuda_scans_built() and support["driver_ok"] is not False:
        return "cuda"
    return "triton" if triton_importable() else "reference"


def _cuda_driver_version() -> Optional[str]:
    """The CUDA version the installed NVIDIA driver supports ("12.2" for an R535 driver),
    read from libcuda itself so that it does not depend on how torch was built; None
    when no driver is installed."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def _build_config() -> Any:
    """The build's own record (``_build_config.py``, written by CMake); None in a checkout
    whose extension was copied in by tools/dev_build.sh."""
    try:
        return importlib.import_module("rlkern._build_config")
    except ImportError:
        return None


def cuda_support() -> Dict[str, Any]:
    """Which CUDA runtime the CUDA scans were built with and which drivers start it.

    ``runtime``: the CUDA toolkit version compiled in (None for a CPU-only build or when
    unknown). ``min_driver``: the oldest driver branch that runs it ("525" for CUDA 12.x,
    through CUDA's minor-version compatibility, since the scans carry SASS for every
    architecture they target; "580" for CUDA 13.x). ``driver``: the CUDA version of the
    installed driver, None without one. ``driver_ok``: whether that driver can start the
    runtime (None when either is unknown). The Triton kernels (losses, log-probs, and the
    scans where the CUDA C++ ones cannot start: :func:`scan_kernels`) compile for the
    installed driver at run time and are not bound by this.
    """
    cfg = _build_config()
    runtime = (getattr(cfg, "CUDA_RUNTIME", "") or None) if cfg is not None else None
    min_driver = (getattr(cfg, "CUDA_MIN_DRIVER", "") or None) if cfg is not None else None
    driver = _cuda_driver_version()
    ok: Optional[bool] = None
    if runtime is not None and driver is not None:
        # A runtime starts under any driver of its own major CUDA release or a later one.
        ok = int(driver.split(".")[0]) >= int(runtime.split(".")[0])
    return {"runtime": runtime, "min_driver": min_driver, "driver": driver, "driver_ok": ok}


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
    (the C++ side applies the same rule: capped, or ignored for the hardware count), and
    about an RLKERN_POOL other than ``own`` (the only value the C++ side reads; anything
    else leaves the choice of pool as it is)."""
    pool = os.environ.get("RLKERN_POOL")
    if pool is not None and pool != "own":
        warnings.warn(f"RLKERN_POOL={pool!r} is not 'own': ignored, the kernels use torch's OpenMP team when "
                      "its thread count is rlkern's", RuntimeWarning, stacklevel=2)
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
