"""PPO for control tasks and PPO for RLHF, composed from rlkern's GAE, policy and value losses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from ..kl import kl_penalty
from ..losses import policy_loss, value_loss
from ..returns import gae, masked_gae
from ._common import as_batch, last_token_index, masked_whiten, ones_mask


class FixedKLController:
    """A constant KL coefficient (the interface of :class:`AdaptiveKLController`)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), as TRL and verl implement it.

    After each batch: ``value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``,
    so the coefficient grows while the measured KL is above ``target`` and shrinks below it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def _kl_controller(kl_coef: float, target_kl: Optional[float], horizon: float):
    if target_kl is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, horizon)


class _KLCoefficient:
    """The KL coefficient of a config (``kl_coef``, ``target_kl``, ``kl_horizon``): fixed,
    or adapted toward ``target_kl`` by :class:`AdaptiveKLController`."""

    def _init_config(self, config, config_type, overrides):
        if config is not None and overrides:
            raise TypeError("pass either a config or keyword overrides, not both")
        self.config = config if config is not None else config_type(**overrides)
        c = self.config
        self.kl_controller = _kl_controller(c.kl_coef, c.target_kl, c.kl_horizon)

    @property
    def kl_coef(self) -> float:
        return self.kl_controller.value

    def update_kl(self, current_kl: float, n_steps: int) -> float:
        """Adapt the KL coefficient after a batch of ``n_steps`` samples whose measured KL was ``current_kl``."""
        return self.kl_controller.update(current_kl, n_steps)


@dataclass
class PPOLoss:
    """The terms of a PPO loss. ``loss`` is what to backpropagate; the rest are detached diagnostics."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PPOConfig:
    """Defaults follow CleanRL's and Stable-Baselines3's PPO (gamma 0.99, lambda 0.95, clip 0.2,
    value coefficient 0.5, advantages normalised per minibatch). ``entropy_coef`` is CleanRL's 0.01.

    ``value_clip`` clips the value prediction to within ``value_clip`` of the old value (CleanRL's
    ``clip_vloss`` with the policy clip). With ``target_kl`` set, a KL penalty to the old policy is
    added with a coefficient starting at ``kl_coef`` and adapted toward ``target_kl``
    (:class:`AdaptiveKLController`, horizon ``kl_horizon``), the adaptive-KL variant of PPO.
    """

    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    clip_high: Optional[float] = None
    dual_clip: Optional[float] = None
    value_clip: Optional[float] = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.01
    normalize_advantages: bool = True
    kl_coef: float = 0.0
    target_kl: Optional[float] = None
    kl_horizon: float = 10000.0
    kl_kind: str = "k3"


class PPO(_KLCoefficient):
    """Proximal Policy Optimisation (Schulman et al., 2017) with GAE.

    Objective (minimised), over the valid steps of a minibatch::

        r_t   = exp(logp_t - old_logp_t)
        L_pi  = -mean_t min(r_t A_t, clip(r_t, 1 - clip, 1 + clip_high) A_t)
        L_V   = 0.5 mean_t max((V_t - R_t)^2, (clip(V_t, V_old - value_clip, V_old + value_clip) - R_t)^2)
        L     = L_pi + vf_coef L_V - entropy_coef mean_t H_t + beta KL(pi || pi_old)

    with A, R from :func:`rlkern.gae` and beta fixed at ``kl_coef`` or adapted toward
    ``target_kl`` by :meth:`update_kl` (the adaptive-KL variant; KL estimated by ``kl_kind``
    with the importance correction, which is unbiased under samples of the old policy).

    Example::

        ppo = PPO(PPOConfig(gamma=0.99))
        adv, ret = ppo.advantages(rewards, values, terminated, truncated=truncated, next_values=next_values)
        out = ppo.loss(logp, old_logp, adv, ret, new_values, old_values, entropy=entropy)
        out.loss.backward()

    Inputs are ``[B, T]`` rollouts or flat ``[N]`` minibatches of transitions.
    """

    def __init__(self, config: Optional[PPOConfig] = None, **overrides):
        self._init_config(config, PPOConfig, overrides)

    def advantages(self, rewards: torch.Tensor, values: torch.Tensor, terminated: torch.Tensor, *,
                   truncated: Optional[torch.Tensor] = None, next_values: Optional[torch.Tensor] = None,
                   bootstrap_value: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """GAE advantages and returns of ``[B, T]`` rollouts (see :func:`rlkern.gae`)."""
        c = self.config
        return gae(rewards, values, terminated, c.gamma, c.lam, next_values=next_values, truncated=truncated,
                   bootstrap_value=bootstrap_value)

    def normalize(self, advantages: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(A - mean) / (std + 1e-8) over the valid entries (unbiased std, as CleanRL and SB3)."""
        m = ones_mask(advantages) if mask is None else mask.bool()
        a = torch.where(m, advantages, torch.zeros_like(advantages))
        n = m.sum().clamp(min=1)
        mean = a.sum() / n
        centred = torch.where(m, advantages - mean, torch.zeros_like(advantages))
        std = ((centred ** 2).sum() / (n - 1).clamp(min=1)).sqrt()
        return centred / (std + 1e-8)

    def loss(self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
             returns: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None,
             old_values: Optional[torch.Tensor] = None, *, mask: Optional[torch.Tensor] = None,
             entropy: Optional[torch.Tensor] = None, normalizer: Optional[float] = None) -> PPOLoss:
        """The PPO loss of one minibatch. Without ``values`` the value term is 0 (a separate critic)."""
        c = self.config
        logp, old_logp, advantages = as_batch(logp), as_batch(old_logp), as_batch(advantages)
        m = ones_mask(logp) if mask is None else as_batch(mask)
        adv = advantages.detach()
        if c.normalize_advantages:
            adv = self.normalize(adv, m)
        kl_on = c.target_kl is not None or c.kl_coef != 0.0
        out = policy_loss(
            logp, old_logp, adv, m,
            clip_low=c.clip, clip_high=c.clip_high, dual_clip=c.dual_clip,
            ref_logp=old_logp if kl_on else None, kl_coef=self.kl_coef if kl_on else 0.0,
            kl_kind=c.kl_kind, kl_is_correction=kl_on,
            entropy=as_batch(entropy), entropy_coef=c.entropy_coef if entropy is not None else 0.0,
            agg="token-mean", normalizer=normalizer,
        )
        metrics = dict(out.metrics)
        if values is None:
            v_loss = torch.zeros((), dtype=out.loss.dtype, device=out.loss.device)
            total = out.loss
        else:
            if returns is None:
                raise ValueError("returns is required when values is given")
            values = as_batch(values)
            old = as_batch(old_values) if old_values is not None else values.detach()
            v_loss = value_loss(values, old, as_batch(returns).detach(), m,
                                clip=c.value_clip if old_values is not None else None).loss
            total = out.loss + c.vf_coef * v_loss
        metrics["kl_coef"] = torch.tensor(self.kl_coef)
        return PPOLoss(total, out.loss.detach(), v_loss.detach(), metrics)


@dataclass
class RLHFPPOConfig:
    """Defaults of TRL's ``PPOConfig``: k1 KL coefficient 0.05 in the reward, gamma 1, lambda 0.95,
    clip 0.2, value clip 0.2, value coefficient 0.1, advantages whitened over the response.
    With ``target_kl`` set the KL coefficient is adapted (verl's ``kl_ctrl.type='adaptive'``)."""

    kl_coef: float = 0.05
    kl_kind: str = "k1"
    target_kl: Optional[float] = None
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    clip_high: Optional[float] = None
    value_clip: Optional[float] = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    entropy_coef: float = 0.0


class RLHFPPO(_KLCoefficient):
    """PPO for language models with a scalar reward model and a KL penalty in the reward.

    Per-token reward over the response mask m (the k1 penalty, as TRL, verl and OpenRLHF)::

        r_t = -beta (logp_t - ref_logp_t) + [t = last response token] * score

    then token-level GAE over the mask (:func:`rlkern.masked_gae`, masked tokens skipped),
    advantages whitened over the mask, and the clipped policy and value losses with
    token-mean aggregation::

        L = L_clip(logp, old_logp, A) + vf_coef * 0.5 max((V - R)^2, (clip(V) - R)^2)

    Example::

        algo = RLHFPPO(RLHFPPOConfig(kl_coef=0.05))
        rewards = algo.token_rewards(scores, old_logp, ref_logp, mask)
        adv, ret = algo.advantages(rewards, old_values, mask)
        out = algo.loss(logp, old_logp, adv, ret, values, old_values, mask)
    """

    def __init__(self, config: Optional[RLHFPPOConfig] = None, **overrides):
        self._init_config(config, RLHFPPOConfig, overrides)

    def token_rewards(self, scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` rewards: the KL penalty on every response token, the score added on the last one."""
        if scores.dim() != 1 or scores.shape[0] != logp.shape[0]:
            raise ValueError(f"scores must have shape ({logp.shape[0]},), got {tuple(scores.shape)}")
        m = mask.bool()
        kl = kl_penalty(logp.detach(), ref_logp.detach(), kind=self.config.kl_kind)
        rewards = torch.where(m, -self.kl_coef * kl, torch.zeros_like(kl))
        last = last_token_index(m)
        has_token = m.any(-1)
        bonus = torch.where(has_token, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
        return rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))

    def advantages(self, token_rewards: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token-level GAE over the response mask; returns before whitening, advantages whitened."""
        c = self.config
        adv, ret = masked_gae(token_rewards, values.detach(), mask, gamma=c.gamma, lam=c.lam)
        if c.whiten_advantages:
            adv = masked_whiten(adv, mask)
        return adv, ret

    def loss(self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
             values: torch.Tensor, old_values: torch.Tensor, mask: torch.Tensor, *,
             entropy: Optional[torch.Tensor] = None, normalizer: Optional[float] = None) -> PPOLoss:
        c = self.config
        out = policy_loss(logp, old_logp, advantages.detach(), mask, clip_low=c.clip, clip_high=c.clip_high,
                          entropy=entropy, entropy_coef=c.entropy_coef if entropy is not None else 0.0,
                          agg="token-mean", normalizer=normalizer)
        v_loss = value_loss(values, old_values.detach(), returns.detach(), mask, clip=c.value_clip).loss
        metrics = dict(out.metrics)
        metrics["kl_coef"] = torch.tensor(self.kl_coef)
        return PPOLoss(out.loss + c.vf_coef * v_loss, out.loss.detach(), v_loss.detach(), metrics)
