"""Reference masked whitening (advantage normalisation), the readable spec of
``rlkern.masked_whiten``.

With m the mask and n = sum(m):

    mean = sum(m x) / n
    var  = sum(m (x - mean)^2) / (n - 1)        (unbiased=True, verl's masked_whiten)
         = sum(m (x - mean)^2) / n              (unbiased=False, OpenRLHF's normalisation)
    rstd = 1 / sqrt(var + eps)                  (eps_mode="add", verl)
         = 1 / sqrt(max(var, eps))              (eps_mode="clamp", OpenRLHF)
    out  = (x - mean) * rstd  [+ mean when shift_mean=False]

at every position, masked ones included (as both peers do). Over several data-parallel
processes, n, the sum and the squared deviations are summed over all of them first, so
every process whitens with the statistics of the whole batch.
"""

from __future__ import annotations

from typing import Optional

import torch

EPS_MODES = ("add", "clamp")


def masked_whiten(values: torch.Tensor, mask: Optional[torch.Tensor] = None, *, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8, eps_mode: str = "add", group=None) -> torch.Tensor:
    x = values.double()
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask != 0
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    stats = torch.stack([m.sum().double(), torch.where(m, x, zero).sum()])
    if group is not None:
        torch.distributed.all_reduce(stats, group=group)
    n, total = stats[0], stats[1]
    mean = total / n
    ssd = torch.where(m, (x - mean) ** 2, zero).sum()
    if group is not None:
        torch.distributed.all_reduce(ssd, group=group)
    var = ssd / (n - 1 if unbiased else n)
    rstd = torch.rsqrt(var + eps) if eps_mode == "add" else torch.rsqrt(torch.clamp(var, min=eps))
    out = (x - mean) * rstd
    if not shift_mean:
        out = out + mean
    return out.to(values.dtype)
