"""Passing tensors to the compiled core without linking libtorch.

A tensor crosses into C++ as its data pointer plus a dtype code; the Python side has
already checked shapes, dtypes, devices and contiguity. CUDA launches also take the
current stream as an integer.
"""

from __future__ import annotations

import torch

from . import _ext

# Codes shared with csrc/include/rlkern/dtype.h (enum class DType).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
FLOAT_DTYPES = tuple(DTYPE_CODES)


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t: torch.Tensor) -> int:
    """Data pointer of a contiguous tensor (0 for an empty one)."""
    return t.data_ptr() if t.numel() else 0


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (the arithmetic type)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def core():
    """The compiled module; raises a clear error when the package was built without it."""
    return _ext.load()
