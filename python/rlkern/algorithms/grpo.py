"""Group-relative policy optimisation and its variants: GRPO, DAPO, Dr.GRPO, GSPO, CISPO.

Each class holds a config with the defaults of the method's reference implementation and
composes :func:`rlkern.group_advantages` with :func:`rlkern.policy_loss`. They differ only in
options: the ratio level, the clip range, the objective, the aggregation and the advantage scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..losses import policy_loss
from ..returns import group_advantages
from ._common import split_groups
from .shaping import overlong_penalty


@dataclass
class GRPOConfig:
    """Defaults of TRL's ``GRPOConfig`` with ``loss_type='grpo'``: 8 completions per prompt,
    clip 0.2 on both sides, no KL (``beta=0``; DeepSeek-R1 used 0.001 with the k3 estimator),
    advantages scaled by the group std plus 1e-4, per-sequence token means averaged over sequences."""

    group_size: int = 8
    clip_low: float = 0.2
    clip_high: Optional[float] = None
    dual_clip: Optional[float] = None
    beta: float = 0.0
    kl_kind: str = "k3"
    kl_is_correction: bool = False
    estimator: str = "grpo"
    scale: str = "group"
    eps: float = 1e-4
    level: str = "token"
    objective: str = "clip"
    agg: str = "seq-mean-token-mean"
    entropy_coef: float = 0.0


class GRPO:
    """Group Relative Policy Optimisation (Shao et al., 2024).

    For G completions of a prompt with rewards R_i::

        A_i   = (R_i - mean_j R_j) / (std_j R_j + eps)                 (one value per completion)
        r_i,t = exp(logp_i,t - old_logp_i,t)
        l_i,t = -min(r A_i, clip(r, 1 - clip_low, 1 + clip_high) A_i) + beta k3(logp, ref_logp)
        L     = mean_i (sum_t m_i,t l_i,t / sum_t m_i,t)

    Rewards are ``[N]`` with N = prompts * group_size, the completions of a prompt contiguous.

    Example::

        algo = GRPO(group_size=4, beta=0.04)
        adv = algo.advantages(rewards)                     # [N]
        out = algo.loss(logp, old_logp, adv, mask, ref_logp=ref_logp)
        out.loss.backward(); out.metrics["clip_frac_high"]
    """

    config_class = GRPOConfig

    def __init__(self, config: Optional[GRPOConfig] = None, **overrides):
        if config is not None and overrides:
            raise TypeError("pass either a config or keyword overrides, not both")
        self.config = config if config is not None else self.config_class(**overrides)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Group-relative advantages ``[N]`` of scalar rewards ``[N]``."""
        c = self.config
        split_groups(rewards.shape[0], c.group_size)
        return group_advantages(rewards, c.group_size, estimator=c.estimator, scale=c.scale, eps=c.eps)

    def _normalizer(self, mask: torch.Tensor, normalizer: Optional[float]) -> Optional[float]:
        return normalizer

    def loss(self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
             ref_logp: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
             rollout_logp: Optional[torch.Tensor] = None, tis_cap: Optional[float] = None,
             normalizer: Optional[float] = None):
        """The policy loss (a :class:`rlkern.losses.LossOutput`) of one micro-batch.

        ``normalizer`` replaces the local denominator (a global token or sequence count) so that
        data-parallel ranks and gradient accumulation reproduce the loss of the whole batch.
        """
        c = self.config
        use_kl = c.beta != 0.0
        if use_kl and ref_logp is None:
            raise ValueError("ref_logp is required when beta != 0")
        return policy_loss(
            logp, old_logp, advantages.detach(), mask,
            objective=c.objective, level=c.level, clip_low=c.clip_low, clip_high=c.clip_high,
            dual_clip=c.dual_clip,
            ref_logp=ref_logp if use_kl else None, kl_coef=c.beta, kl_kind=c.kl_kind,
            kl_is_correction=c.kl_is_correction,
            rollout_logp=rollout_logp, tis_cap=tis_cap,
            entropy=entropy, entropy_coef=c.entropy_coef if entropy is not None else 0.0,
            agg=c.agg, normalizer=self._normalizer(mask, normalizer),
        )


@dataclass
class DAPOConfig(GRPOConfig):
    """Defaults of the DAPO paper (Yu et al., 2025) and verl's DAPO recipe: clip-higher
    (0.2 / 0.28), no KL, token-level aggregation, dynamic sampling, and the overlong
    penalty with L_max = 20480 and a 4096-token soft buffer."""

    clip_high: Optional[float] = 0.28
    agg: str = "token-mean"
    filter_groups: bool = True
    max_response_length: int = 20480
    overlong_buffer_len: int = 4096
    overlong_penalty_factor: float = 1.0


class DAPO(GRPO):
    """Decoupled Clip and Dynamic sAmpling Policy Optimisation (Yu et al., 2025).

    GRPO with: an asymmetric clip range [1 - 0.2, 1 + 0.28]; token-level aggregation
    L = sum_i,t m l / sum_i,t m (pass the global token count as ``normalizer`` under data
    parallelism or gradient accumulation); dynamic sampling, which drops groups whose rewards are
    all equal (their advantages are zero, so they only dilute the batch); and overlong reward
    shaping, which adds to each reward

        R_len(L) = 0                                 if L <= L_max - L_buf
                 = (L_max - L_buf - L) / L_buf * f   if L_max - L_buf < L <= L_max
                 = -f                                if L > L_max

    Example::

        algo = DAPO(group_size=8, max_response_length=1024, overlong_buffer_len=256)
        rewards = algo.shape_rewards(rewards, lengths)
        keep = algo.keep_mask(rewards)               # drop all-equal groups before the update
        adv = algo.advantages(rewards)
        out = algo.loss(logp[keep], old_logp[keep], adv[keep], mask[keep])
    """

    config_class = DAPOConfig

    def keep_mask(self, rewards: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: True for completions whose group's rewards are not all equal."""
        c = self.config
        g = split_groups(rewards.shape[0], c.group_size)
        r = rewards.reshape(g, c.group_size)
        varied = (r != r[:, :1]).any(dim=1)
        if not c.filter_groups:
            varied = torch.ones_like(varied)
        return varied.repeat_interleave(c.group_size)

    def shape_rewards(self, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Rewards plus the soft overlong penalty of each completion's length (in tokens)."""
        c = self.config
        return rewards + overlong_penalty(lengths, c.max_response_length, c.overlong_buffer_len,
                                          c.overlong_penalty_factor).to(rewards.dtype)


@dataclass
class DrGRPOConfig(GRPOConfig):
    """Dr.GRPO (Liu et al., 2025) as TRL's ``loss_type='dr_grpo'``: advantages only centred,
    token losses summed and divided by a constant, batch size times ``max_completion_length``
    (the padded length when None)."""

    scale: str = "none"
    agg: str = "token-sum"
    max_completion_length: Optional[int] = None


class DrGRPO(GRPO):
    """GRPO Done Right (Liu et al., 2025): removes the length and difficulty biases of GRPO.

        A_i = R_i - mean_j R_j
        L   = sum_i,t m_i,t l_i,t / (B * L_max)

    Example::

        algo = DrGRPO(group_size=8, max_completion_length=512)
        out = algo.loss(logp, old_logp, algo.advantages(rewards), mask)
    """

    config_class = DrGRPOConfig

    def _normalizer(self, mask: torch.Tensor, normalizer: Optional[float]) -> Optional[float]:
        if normalizer is not None:
            return normalizer
        length = self.config.max_completion_length or mask.shape[-1]
        return float(mask.shape[0] * length)


@dataclass
class GSPOConfig(GRPOConfig):
    """GSPO (Zheng et al., 2025) defaults: the sequence-level ratio with the paper's narrow clip
    range (3e-4 / 4e-4), sequence-mean aggregation."""

    clip_low: float = 3e-4
    clip_high: Optional[float] = 4e-4
    level: str = "sequence"


class GSPO(GRPO):
    """Group Sequence Policy Optimisation (Zheng et al., 2025).

        s_i = exp(sum_t m (logp - old_logp) / sum_t m)     (one ratio per sequence)
        L   = mean_i -min(s_i A_i, clip(s_i, 1 - 3e-4, 1 + 4e-4) A_i)

    The gradient reaches every token of the sequence through s_i (TRL's
    ``importance_sampling_level='sequence'``, equal to verl's ``compute_policy_loss_gspo``).

    Example::

        out = GSPO(group_size=8).loss(logp, old_logp, adv, mask)
    """

    config_class = GSPOConfig


@dataclass
class CISPOConfig(GRPOConfig):
    """CISPO (MiniMax-M1, 2025) as TRL's ``loss_type='cispo'``: the importance weight capped at
    ``1 + clip_high`` = 5 (ScaleRL's epsilon_max; no lower bound, ``clip_low=1`` makes it 0),
    token-level aggregation."""

    objective: str = "cispo"
    clip_low: float = 1.0
    clip_high: Optional[float] = 4.0
    agg: str = "token-mean"


class CISPO(GRPO):
    """Clipped IS-weight Policy Optimisation (MiniMax-M1, 2025).

        l_i,t = -sg(clip(r_i,t, 1 - clip_low, 1 + clip_high)) A_i logp_i,t
        L     = sum_i,t m l / sum_i,t m

    Every token keeps a gradient (the weight is clipped, not the objective).

    Example::

        out = CISPO(group_size=8).loss(logp, old_logp, adv, mask)
    """

    config_class = CISPOConfig
