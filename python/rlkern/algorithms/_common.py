"""Small helpers shared by the algorithm classes (masked statistics, shape handling)."""

from __future__ import annotations

from typing import Optional

import torch


def as_batch(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """View a flat ``[N]`` minibatch of transitions as one row ``[1, N]``; leave ``[B, T]`` alone."""
    if x is None:
        return None
    return x.unsqueeze(0) if x.dim() == 1 else x


def ones_mask(like: torch.Tensor) -> torch.Tensor:
    return torch.ones(like.shape, dtype=torch.bool, device=like.device)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True, eps: float = 1e-8,
                  shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the unmasked entries; masked entries become 0.

    The variance is Bessel-corrected when ``unbiased`` (verl's and TRL's ``masked_whiten``);
    with fewer than two unmasked entries the uncorrected variance is used instead of dividing by zero.
    """
    m = mask.bool()
    xf = torch.where(m, x, torch.zeros_like(x))
    n = m.sum().to(x.dtype).clamp(min=1)
    mean = xf.sum() / n
    centred = torch.where(m, x - mean, torch.zeros_like(x))
    var = (centred ** 2).sum() / n
    if unbiased and n > 1:
        var = var * n / (n - 1)
    out = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last unmasked position of each row of ``mask [B, T]`` (0 for an all-masked row)."""
    m = mask.bool().long()
    T = m.shape[-1]
    return (T - 1 - m.flip(-1).argmax(-1)).clamp(min=0) * m.any(-1).long()


def split_groups(n: int, group_size: int, name: str = "rewards") -> int:
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"{name} has {n} entries, not a whole number of groups of group_size={group_size}")
    return n // group_size

