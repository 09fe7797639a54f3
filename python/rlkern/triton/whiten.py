"""Triton kernels of ``rlkern.masked_whiten``: masked partial sums per block (float64),
and the elementwise (x - mean) * rstd with the statistics read from device memory, so
that a CUDA call never waits on the host between its passes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import AotSpec

_BLOCK = 4096


@triton.jit
def _sums_kernel(X, M, PART, CENTER, N, CENTERED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = (offs < N) & (tl.load(M + offs, mask=offs < N, other=0) != 0)
    # Masked positions are not loaded, so NaN there never reaches a sum.
    x = tl.load(X + offs, mask=keep, other=0.0).to(tl.float64)
    if CENTERED:
        d = x - tl.load(CENTER)
        x = tl.where(keep, d * d, 0.0)
    tl.store(PART + 2 * pid, tl.sum(keep.to(tl.float64), axis=0))
    tl.store(PART + 2 * pid + 1, tl.sum(x, axis=0))


@triton.jit
def _apply_kernel(X, OUT, STATS, N, ADD_BACK: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    mean = tl.load(STATS).to(COMPUTE)
    rstd = tl.load(STATS + 1).to(COMPUTE)
    x = tl.load(X + offs, mask=inside, other=0.0).to(COMPUTE)
    y = (x - mean) * rstd
    if ADD_BACK:
        y = y + mean
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=inside)


def masked_sums(x: torch.Tensor, mask_bytes: torch.Tensor, center: torch.Tensor = None) -> torch.Tensor:
    """[count, sum] (or [count, sum of squared deviations from ``center``]) as a float64
    device tensor; the block partials are added by torch in a fixed order."""
    n = x.numel()
    blocks = triton.cdiv(n, _BLOCK)
    part = torch.empty(2 * blocks, dtype=torch.float64, device=x.device)
    centered = center is not None
    _sums_kernel[(blocks,)](x, mask_bytes, part, center if centered else part, n, CENTERED=centered, BLOCK=_BLOCK)
    return part.view(blocks, 2).sum(0)


def apply(x: torch.Tensor, out: torch.Tensor, stats: torch.Tensor, add_back: bool) -> None:
    """out = (x - stats[0]) * stats[1] (+ stats[0]) in float32 (float64 for float64 x)."""
    n = x.numel()
    compute = tl.float64 if x.dtype == torch.float64 else tl.float32
    _apply_kernel[(triton.cdiv(n, _BLOCK),)](x, out, stats, n, ADD_BACK=add_back, COMPUTE=compute, BLOCK=_BLOCK)


def _specs():
    specs = []
    for dt in ("fp32", "bf16"):
        specs += [
            AotSpec(f"whiten_sums_{dt}", _sums_kernel,
                    {"X": f"*{dt}", "M": "*u8", "PART": "*fp64", "CENTER": "*fp64", "N": "i64",
                     "CENTERED": "constexpr", "BLOCK": "constexpr"},
                    dict(CENTERED=True, BLOCK=_BLOCK)),
            AotSpec(f"whiten_apply_{dt}", _apply_kernel,
                    {"X": f"*{dt}", "OUT": f"*{dt}", "STATS": "*fp64", "N": "i64", "ADD_BACK": "constexpr",
                     "COMPUTE": "constexpr", "BLOCK": "constexpr"},
                    dict(ADD_BACK=False, COMPUTE=tl.float32, BLOCK=_BLOCK)),
        ]
    return specs


AOT_SPECS = _specs()
