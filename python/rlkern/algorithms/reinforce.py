"""REINFORCE with reward-to-go and an optional baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..losses import policy_loss
from ..returns import discounted_returns
from ._common import as_batch, ones_mask


@dataclass
class REINFORCEConfig:
    """gamma 0.99 (the control-task default); ``baseline`` is "none", "mean" (the batch mean of the
    returns at each time step, over valid steps) or "value" (a learned V(s) passed to :meth:`loss`);
    ``normalize`` divides the advantages by their std (Spinning Up's VPG does)."""

    gamma: float = 0.99
    baseline: str = "none"
    normalize: bool = False
    agg: str = "seq-mean-token-sum"
    vf_coef: float = 0.5


class REINFORCE:
    """REINFORCE (Williams, 1992) with reward-to-go.

        G_t = r_t + gamma (1 - done_t) G_{t+1}
        L   = -mean_episodes sum_t m_t (G_t - b_t) logp_t      (+ vf_coef * 0.5 mean (V - G)^2 with a value baseline)

    Example::

        algo = REINFORCE(gamma=0.99, baseline="mean")
        returns = algo.returns(rewards, dones)            # [B, T]
        out = algo.loss(logp, returns, mask)
        out.loss.backward()
    """

    def __init__(self, config: Optional[REINFORCEConfig] = None, **overrides):
        if config is not None and overrides:
            raise TypeError("pass either a config or keyword overrides, not both")
        self.config = config if config is not None else REINFORCEConfig(**overrides)
        if self.config.baseline not in ("none", "mean", "value"):
            raise ValueError(f"baseline must be 'none', 'mean' or 'value', got {self.config.baseline!r}")

    def returns(self, rewards: torch.Tensor, dones: torch.Tensor,
                bootstrap: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Reward-to-go ``[B, T]`` (see :func:`rlkern.discounted_returns`)."""
        return discounted_returns(rewards, dones, self.config.gamma, bootstrap=bootstrap)

    def loss(self, logp: torch.Tensor, returns: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
             values: Optional[torch.Tensor] = None):
        c = self.config
        logp, returns = as_batch(logp), as_batch(returns).detach()
        m = ones_mask(logp) if mask is None else as_batch(mask).bool()
        if c.baseline == "mean":
            n = m.sum(0).clamp(min=1)
            b = torch.where(m, returns, torch.zeros_like(returns)).sum(0) / n
            adv = returns - b
        elif c.baseline == "value":
            if values is None:
                raise ValueError("values is required with baseline='value'")
            adv = returns - as_batch(values).detach()
        else:
            adv = returns
        if c.normalize:
            a = adv[m]
            adv = adv / (a.std() + 1e-8) if a.numel() > 1 else adv
        out = policy_loss(logp, logp.detach(), adv, m, objective="reinforce", agg=c.agg)
        if c.baseline == "value":
            v = as_batch(values)
            sq = torch.where(m, (v - returns) ** 2, torch.zeros_like(v))
            v_loss = 0.5 * sq.sum() / m.sum().clamp(min=1)
            return type(out)(out.loss + c.vf_coef * v_loss, {**out.metrics, "value_loss": v_loss.detach()})
        return out
