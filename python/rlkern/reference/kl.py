"""Reference KL estimators between the current policy and a reference policy.

With log r = ref_logp - logp (the log-ratio of the reference to the current policy,
evaluated at tokens sampled from the current one):

- k1 = -log r                      (unbiased, high variance, can be negative)
- k2 = 0.5 * (log r)^2             (biased, low variance)
- k3 = exp(log r) - 1 - log r      (unbiased, low variance, never negative; verl's
  "low_var_kl", TRL's per-token KL)

``clamp`` bounds the estimate to [low, high] (a number c means [-c, c]); verl clamps k3 to
[-10, 10]. Where the clamp is active the gradient is zero (torch.clamp's convention: the
gradient passes at the bounds themselves).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

KL_KINDS = ("k1", "k2", "k3")

Clamp = Union[None, float, Tuple[Optional[float], Optional[float]]]


def clamp_bounds(name: str, clamp: Clamp) -> Tuple[Optional[float], Optional[float]]:
    """(low, high) from ``None``, a number c (meaning [-c, c]) or a pair with None for no bound."""
    if clamp is None:
        return None, None
    if isinstance(clamp, (tuple, list)):
        if len(clamp) != 2:
            raise ValueError(f"{name} must be a number or a (low, high) pair, got {clamp!r}")
        try:
            low, high = (None if c is None else float(c) for c in clamp)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number or a (low, high) pair of numbers or None, got {clamp!r}") from None
        # x != x, not math.isnan: a number may be symbolic under torch.compile(dynamic=True).
        if (low is not None and low != low) or (high is not None and high != high):
            raise ValueError(f"{name} must not contain NaN, got {clamp!r}")
    else:
        try:
            c = float(clamp)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number or a (low, high) pair, got {clamp!r}") from None
        if not c >= 0:
            raise ValueError(f"{name} must be >= 0 when given as one number, got {c}")
        low, high = -c, c
    if low is not None and high is not None and not low <= high:
        raise ValueError(f"{name} must have low <= high, got ({low}, {high})")
    return low, high


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3", clamp: Clamp = None) -> torch.Tensor:
    """Per-token KL estimate (same shape as the inputs); see the module docstring."""
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    log_r = ref_logp - logp
    if kind == "k1":
        kl = -log_r
    elif kind == "k2":
        kl = 0.5 * log_r * log_r
    else:
        kl = torch.exp(log_r) - 1 - log_r
    low, high = clamp_bounds("clamp", clamp)
    if low is not None or high is not None:
        kl = torch.clamp(kl, min=low, max=high)
    return kl
