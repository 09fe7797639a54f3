"""Masked whitening of advantages (or returns) over a batch, optionally over every
data-parallel process at once: two passes of float64 masked sums and one elementwise
pass, in C++ on CPU tensors and Triton on CUDA tensors."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import _backend, _validate
from ._kernel import core, dtype_code, ptr
from .reference import whiten as _ref
from .reference.whiten import EPS_MODES

__all__ = ["masked_whiten", "EPS_MODES"]


def _rstd(var, eps: float, eps_mode: str):
    if isinstance(var, torch.Tensor):
        return torch.rsqrt(var + eps) if eps_mode == "add" else torch.rsqrt(torch.clamp(var, min=eps))
    v = var + eps if eps_mode == "add" else max(var, eps)
    return 1.0 / math.sqrt(v) if v > 0 else (math.inf if v == 0 else math.nan)


def _all_reduce(pair: Tuple[float, float], group, device: torch.device) -> Tuple[float, float]:
    t = torch.tensor(pair, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, group=group)
    return float(t[0]), float(t[1])


def _check_count(count: float, unbiased: bool) -> None:
    need = 2 if unbiased else 1
    if count < need:
        raise ValueError(f"mask must select at least {need} element{'s' if need > 1 else ''} to whiten "
                         f"({'unbiased variance' if unbiased else 'a mean'}), got {int(count)}"
)


def _whiten_cpu(x, m, out, shift_mean, unbiased, eps, eps_mode, group, check):
    wh = core().whiten
    n, code = x.numel(), dtype_code(x)
    count, total = wh.masked_sums(n, code, ptr(x), ptr(m), False, 0.0)
    if group is not None:
        count, total = _all_reduce((count, total), group, x.device)
    if check:
        _check_count(count, unbiased)
    mean = total / count if count else math.nan
    _, ssd = wh.masked_sums(n, code, ptr(x), ptr(m), True, mean)
    if group is not None:
        _, ssd = _all_reduce((0.0, ssd), group, x.device)
    denom = count - 1 if unbiased else count
    var = ssd / denom if denom else math.nan
    wh.apply(n, code, ptr(x), ptr(out), mean, _rstd(var, eps, eps_mode), not shift_mean)


def _whiten_triton(x, m, out, shift_mean, unbiased, eps, eps_mode, group, check):
    from .triton import whiten as tw

    sums = tw.masked_sums(x, m)
    if group is not None:
        torch.distributed.all_reduce(sums, group=group)
    count = sums[0]
    if check:  # one host read, as the peers' own whitening does
        _check_count(float(count), unbiased)
    mean = (sums[1] / count).reshape(1)
    ssd = tw.masked_sums(x, m, center=mean)[1]
    if group is not None:
        torch.distributed.all_reduce(ssd, group=group)
    var = ssd / (count - 1 if unbiased else count)
    stats = torch.stack([mean[0], _rstd(var, eps, eps_mode)])
    tw.apply(x, out, stats, not shift_mean)


def _launch(values, mask, backend, shift_mean, unbiased, eps, eps_mode, group, check):
    x = values.detach().contiguous().reshape(-1)
    m = (mask if mask.dtype == torch.bool else mask != 0).contiguous().reshape(-1).view(torch.uint8)
    out = torch.empty_like(x)
    run = _whiten_cpu if backend == "cpu" else _whiten_triton
    run(x, m, out, shift_mean, unbiased, eps, eps_mode, group, check)
    return out.view(values.shape)


# The custom op: the way in under torch.compile/export and for FakeTensor/meta inputs
# (single process; the statistics' count check needs values, so it is eager-only).
@torch.library.custom_op("rlkern::masked_whiten", mutates_args=())
def _whiten_op(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool, unbiased: bool, eps: float,
               clamp_eps: bool) -> torch.Tensor:
    return _launch(values, mask, _backend.select(values.device), shift_mean, unbiased, eps,
                   "clamp" if clamp_eps else "add", None, False)


@_whiten_op.register_fake
def _whiten_fake(values, mask, shift_mean, unbiased, eps, clamp_eps):
    return torch.empty_like(values, memory_format=torch.contiguous_format)


def masked_whiten(values: torch.Tensor, mask: Optional[torch.Tensor] = None, *, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8, eps_mode: str = "add",
                  group: Optional["torch.distributed.ProcessGroup"] = None, all_processes: bool = False) -> torch.Tensor:
    """Whiten ``values`` with the mean and variance of its masked entries.

    With m the mask and n = sum(m) (summed over every process of ``group`` when
    ``all_processes=True``):

        mean = sum(m x) / n
        var  = sum(m (x - mean)^2) / (n - 1)     (``unbiased=True``, verl's masked_whiten)
               sum(m (x - mean)^2) / n           (``unbiased=False``, OpenRLHF)
        rstd = 1 / sqrt(var + eps)               (``eps_mode="add"``, verl)
               1 / sqrt(max(var, eps))           (``eps_mode="clamp"``, OpenRLHF)
        out  = (x - mean) * rstd                 (+ mean when ``shift_mean=False``)

    at every position, masked ones included (as verl and OpenRLHF do). The sums are
    float64 whatever the input dtype, taken in a fixed order (the same bits for any
    thread count); the output has ``values``' dtype and shape, float32 arithmetic for
    float32/bfloat16/float16 (float64 for float64).

    ``mask``: same shape as ``values`` (bool, integer or floating, nonzero = selected);
    None selects everything. ``all_processes=True`` whitens with the statistics of the
    whole data-parallel batch: the count and sums are all-reduced over ``group``
    (torch.distributed's default group when None): two all-reduces of one or two float64
    numbers, no gather of the values.

    Fewer than 2 selected entries (1 with ``unbiased=False``) raise ``ValueError``, as verl
    does (on CUDA tensors that check reads the count on the host once). NaN or inf at a
    selected position makes every output NaN; masked positions may hold anything and are
    never read into the statistics. Differentiable through the reference's torch ops when
    ``values`` requires grad (advantages usually do not); the kernels' output is a constant.
    """
    traced = torch.compiler.is_compiling() or _validate.is_fake(values)
    _validate.tensor("values", values, floating=True, allow_fake=traced)
    if values.numel() == 0:
        raise ValueError("values must not be empty")
    if mask is None:
        mask = torch.ones(values.shape, dtype=torch.bool, device=values.device)
    _validate.mask("mask", mask, values.shape, allow_fake=traced)
    _validate.same_device(values=values, mask=mask)
    eps = _validate.positive("eps", eps, allow_zero=True)
    _validate.choice("eps_mode", eps_mode, EPS_MODES)
    if all_processes:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("all_processes=True needs an initialised torch.distributed process group")
    elif group is not None:
        raise ValueError("group is given but all_processes is False: pass all_processes=True to whiten over the group")
    group_arg = (group if group is not None else torch.distributed.group.WORLD) if all_processes else None
    backend = _backend.select(values.device)
    if backend == "reference" or (torch.is_grad_enabled() and values.requires_grad):
        return _ref.masked_whiten(values, mask, shift_mean=shift_mean, unbiased=unbiased, eps=eps,
                                  eps_mode=eps_mode, group=group_arg)
    if traced:
        if group_arg is not None:
            raise ValueError("masked_whiten(all_processes=True) is eager-only: under torch.compile/export call it "
                             "outside the compiled region")
        return _whiten_op(values, mask, shift_mean, unbiased, eps, eps_mode == "clamp")
    return _launch(values, mask, backend, shift_mean, unbiased, eps, eps_mode, group_arg, True)
