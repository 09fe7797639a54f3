"""Passing tensors to the compiled core without linking libtorch.

A tensor crosses into C++ as its data pointer plus a dtype code; the Python side has
already checked shapes, dtypes, devices and contiguity. CUDA launches also take the
current stream as an integer.
"""

from __future__ import annotations

import math
from typing import Tuple

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


_HUGE_PAGE = 2 << 20
_HUGE_FROM = 16 << 20


def empty_rows(like: torch.Tensor, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A fresh row-major output on ``like``'s device.

    Outputs of 16 MiB and more on the CPU are fresh mappings whose first touch faults
    in every page: on 4 KiB pages that costs more than the kernels that write them. So
    they start on a 2 MiB boundary and cover whole 2 MiB pages marked for transparent
    huge pages, which the OS faults in 512 times less often (measured on a 2-core VM: a
    fresh 32 MiB output cost about 3.3 ms more than a reused one before, about 1 ms
    after). The tensor is a view into a slightly larger storage; the unused head is
    never touched, so it takes no memory."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _HUGE_FROM or like.device.type != "cpu":  # small first: the cheap test decides most calls
        return torch.empty(shape, dtype=dtype, device=like.device)
    span = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
    raw = torch.empty(span + _HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % _HUGE_PAGE
    core().advise_huge_pages(raw.data_ptr() + start, span)
    return raw[start:start + nbytes].view(dtype).view(shape)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (the arithmetic type)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def core():
    """The compiled module; raises a clear error when the package was built without it."""
    return _ext.load()
