"""DQN targets: n-step returns, double DQN, Huber or squared TD loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..returns import discounted_returns


class TDLoss(NamedTuple):
    loss: torch.Tensor
    td_error: torch.Tensor  # detached, [B]: new priorities for prioritized replay


@dataclass
class DQNConfig:
    """Defaults of Stable-Baselines3's DQN: gamma 0.99, 1-step targets, the max over the target
    network, the Huber loss (``smooth_l1`` with delta 1). ``double=True`` selects the next action
    with the online network instead (van Hasselt et al., 2016); ``n_step=3`` is Rainbow's."""

    gamma: float = 0.99
    n_step: int = 1
    double: bool = False
    loss: str = "huber"
    huber_delta: float = 1.0


class DQN:
    """Targets and TD loss of Deep Q-Networks (Mnih et al., 2015). No networks or replay here:
    target-network (and online) Q-values of the states after n steps are inputs.

        y = sum_{k<n} gamma^k r_k  +  gamma^n (1 - done) Q_target(s_n, a*)
        a* = argmax_a Q_online(s_n, a)   (double)   or   argmax_a Q_target(s_n, a)
        L  = mean_b w_b huber(Q(s, a) - y)     (or 0.5 (Q - y)^2 with loss="mse")

    The n-step sum stops at the first ``done`` and then bootstraps nothing.

    Example::

        dqn = DQN(gamma=0.99, n_step=3, double=True)
        y = dqn.targets(rewards, dones, q_target(next_obs), q_online(next_obs))   # rewards, dones [B, 3]
        out = dqn.loss(q_online(obs), actions, y)
    """

    def __init__(self, config: Optional[DQNConfig] = None, **overrides):
        if config is not None and overrides:
            raise TypeError("pass either a config or keyword overrides, not both")
        self.config = config if config is not None else DQNConfig(**overrides)
        if self.config.loss not in ("huber", "mse"):
            raise ValueError(f"loss must be 'huber' or 'mse', got {self.config.loss!r}")
        if self.config.n_step < 1:
            raise ValueError(f"n_step must be >= 1, got {self.config.n_step}")

    @torch.no_grad()
    def targets(self, rewards: torch.Tensor, dones: torch.Tensor, next_q_target: torch.Tensor,
                next_q_online: Optional[torch.Tensor] = None) -> torch.Tensor:
        """TD targets ``[B]``. ``rewards``/``dones`` are ``[B]`` (1-step) or ``[B, n]`` (n-step),
        ``next_q_*`` are ``[B, A]`` at the state reached after the n steps."""
        c = self.config
        r = rewards.unsqueeze(1) if rewards.dim() == 1 else rewards
        d = dones.unsqueeze(1) if dones.dim() == 1 else dones
        if r.shape != d.shape:
            raise ValueError(f"dones must have shape {tuple(r.shape)}, got {tuple(d.shape)}")
        if r.shape[1] != c.n_step:
            raise ValueError(f"rewards has {r.shape[1]} steps per row but n_step={c.n_step}")
        if next_q_target.dim() != 2 or next_q_target.shape[0] != r.shape[0]:
            raise ValueError(f"next_q_target must be [B={r.shape[0]}, A], got {tuple(next_q_target.shape)}")
        if c.double:
            if next_q_online is None:
                raise ValueError("next_q_online is required with double=True")
            if next_q_online.shape != next_q_target.shape:
                raise ValueError(f"next_q_online must have shape {tuple(next_q_target.shape)}")
            a_star = next_q_online.argmax(-1, keepdim=True)
        else:
            a_star = next_q_target.argmax(-1, keepdim=True)
        bootstrap = next_q_target.gather(-1, a_star).squeeze(-1).to(r.dtype)
        return discounted_returns(r, d, c.gamma, bootstrap=bootstrap)[:, 0]

    def loss(self, q_values: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor,
             weights: Optional[torch.Tensor] = None) -> TDLoss:
        """TD loss of Q(s, a) (``q_values [B, A]``, ``actions [B]``) against ``targets [B]``;
        ``weights`` are prioritized-replay importance weights."""
        q = q_values.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        y = targets.detach().to(q.dtype)
        if self.config.loss == "huber":
            per = F.huber_loss(q, y, reduction="none", delta=self.config.huber_delta)
        else:
            per = 0.5 * (q - y) ** 2
        if weights is not None:
            per = per * weights.to(per.dtype)
        return TDLoss(per.mean(), (q - y).detach())
