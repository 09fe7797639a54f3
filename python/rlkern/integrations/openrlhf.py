"""OpenRLHF's PPO losses on rlkern kernels: swap an import, keep your trainer.

    # from openrlhf.models.loss import PolicyLoss, ValueLoss
    # from openrlhf.models.utils import compute_approx_kl
    from rlkern.integrations.openrlhf import PolicyLoss, ValueLoss, compute_approx_kl

Constructors, ``forward`` signatures and return values follow ``openrlhf/models/loss.py`` and
``openrlhf/models/utils.py`` (OpenRLHF 0.8: ``PolicyLoss`` with ``dual_clip`` and
``policy_loss_type`` "ppo"/"gspo", returning ``(loss, clip_ratio, ppo_kl)``). OpenRLHF itself is
not needed. Deliberate difference: where OpenRLHF divides by a zero token count (an all-masked
sequence or batch) the result here is 0 instead of NaN.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..kl import kl_penalty
from ..losses import policy_loss, value_loss

__all__ = ["PolicyLoss", "ValueLoss", "compute_approx_kl"]


def _mask_or_ones(action_mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if action_mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return action_mask.bool()


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1)


class PolicyLoss(nn.Module):
    """PPO clipped policy loss (OpenRLHF's ``PolicyLoss``).

    ratio r = exp(lp - old) per token ("ppo") or exp(sum m (lp - old) / sum m) per sequence ("gspo");
    loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), for A < 0 bounded by -dual_clip A when
    ``dual_clip`` is set; the masked mean over all tokens (``token_level_loss``) or the mean over
    sequences of each sequence's masked mean (always for "gspo").
    ``forward`` returns ``(loss, clip_ratio, ppo_kl)``.
    """

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo") -> None:
        super().__init__()
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"Invalid policy loss type: {policy_loss_type}")
        if dual_clip is not None and dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = False if policy_loss_type == "gspo" else token_level_loss

    def forward(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: Optional[torch.Tensor] = None):
        m = _mask_or_ones(action_mask, log_probs)
        level = "sequence" if self.policy_loss_type == "gspo" else "token"
        out = policy_loss(log_probs, old_log_probs, advantages, m, objective="clip", level=level,
                          clip_low=self.clip_eps_low, clip_high=self.clip_eps_high, dual_clip=self.dual_clip,
                          agg="token-mean" if self.token_level_loss else "seq-mean-token-mean")
        with torch.no_grad():
            log_ratio = torch.where(m, log_probs - old_log_probs, torch.zeros_like(log_probs))
            if level == "sequence":
                ratio = (log_ratio.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).exp()
                # OpenRLHF multiplies the sequence ratio by the mask, so masked tokens count as ratio 0
                ratio = ratio * m
            else:
                ratio = log_ratio.exp()
            surr1 = ratio * advantages
            surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
            clip_ratio = _masked_mean((surr2 < surr1).float(), m)
            ppo_kl = _masked_mean(-log_ratio, m)
        return out.loss, clip_ratio, ppo_kl


class ValueLoss(nn.Module):
    """PPO value loss (OpenRLHF's ``ValueLoss``): 0.5 * mean max((v_clip - R)^2, (v - R)^2) with
    v_clip = old + clamp(v - old, -clip_eps, clip_eps); without ``clip_eps``, 0.5 mean (v - R)^2."""

    def __init__(self, clip_eps: float = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(self, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                action_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = _mask_or_ones(action_mask, values)
        return value_loss(values, old_values, returns, m, clip=self.clip_eps,
                          agg="token-mean" if self.token_level_loss else "seq-mean-token-mean").loss


def compute_approx_kl(log_probs: torch.Tensor, log_probs_base: torch.Tensor, kl_estimator: str = "k1", *,
                      action_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """OpenRLHF's ``compute_approx_kl`` in float32 (Schulman's estimators, log r = base - lp):
    k1 = lp - base; k2 = (lp - base)^2 / 2; k3 = exp(base - lp) - 1 - (base - lp).
    ``action_mask`` (older OpenRLHF releases) zeroes masked positions."""
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {kl_estimator!r}")
    kl = kl_penalty(log_probs.float(), log_probs_base.float(), kind=kl_estimator)
    if action_mask is not None:
        kl = torch.where(action_mask.bool(), kl, torch.zeros_like(kl))
    return kl
