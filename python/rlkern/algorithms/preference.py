"""Preference learning: DPO and Bradley-Terry reward models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from ..losses import bradley_terry_loss, dpo_loss


def sequence_logprobs(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of the unmasked tokens of each sequence: ``[B, T] -> [B]``."""
    if token_logp.shape != mask.shape:
        raise ValueError(f"mask must have shape {tuple(token_logp.shape)}, got {tuple(mask.shape)}")
    return torch.where(mask.bool(), token_logp, torch.zeros_like(token_logp)).sum(-1)


@dataclass
class PreferenceOutput:
    """``loss`` to backpropagate and detached diagnostics (the names TRL logs)."""

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class DPOConfig:
    """Defaults of TRL's ``DPOConfig``: beta 0.1, the sigmoid loss, no label smoothing."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0


class DPO:
    """Direct Preference Optimisation (Rafailov et al., 2023).

    With sequence log-probabilities of the chosen (c) and rejected (r) responses under the policy
    (pi) and the frozen reference (ref)::

        z = beta ((pi_c - ref_c) - (pi_r - ref_r))
        sigmoid: -log sigmoid(z) (1 - ls) - log sigmoid(-z) ls;  ipo: (z / beta - 1 / (2 beta))^2;  hinge: relu(1 - z)

    The implicit rewards beta (pi - ref) of both responses are reported in ``metrics``.

    Example::

        dpo = DPO(beta=0.1)
        out = dpo.loss(pi_c, pi_r, ref_c, ref_r)     # each [B], e.g. sequence_logprobs(token_logp, mask)
        out.loss.backward(); out.metrics["rewards/accuracies"]
    """

    def __init__(self, config: Optional[DPOConfig] = None, **overrides):
        if config is not None and overrides:
            raise TypeError("pass either a config or keyword overrides, not both")
        self.config = config if config is not None else DPOConfig(**overrides)

    def loss(self, chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor) -> PreferenceOutput:
        c = self.config
        loss = dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta=c.beta,
                        loss_type=c.loss_type, label_smoothing=c.label_smoothing).loss
        with torch.no_grad():
            chosen = c.beta * (chosen_logp.float() - ref_chosen_logp.float())
            rejected = c.beta * (rejected_logp.float() - ref_rejected_logp.float())
            metrics = {
                "rewards/chosen": chosen.mean(),
                "rewards/rejected": rejected.mean(),
                "rewards/accuracies": (chosen > rejected).float().mean(),
                "rewards/margins": (chosen - rejected).mean(),
            }
        return PreferenceOutput(loss, metrics)


@dataclass
class RewardModelConfig:
    """Defaults of TRL's ``RewardConfig``: no margin, no centring term."""

    center_rewards_coefficient: Optional[float] = None


class RewardModel:
    """Bradley-Terry reward-model training (Ouyang et al., 2022).

        L = mean -log sigmoid(r_c - r_r - margin)  [+ coef * mean((r_c + r_r)^2)]

    The optional centring term (Eisenstein et al., 2023; TRL's ``center_rewards_coefficient``)
    keeps rewards near zero, since the Bradley-Terry loss only sees differences.

    Example::

        rm = RewardModel()
        out = rm.loss(model(chosen_ids), model(rejected_ids))   # scalar rewards [B]
        out.loss.backward(); out.metrics["accuracy"]
    """

    def __init__(self, config: Optional[RewardModelConfig] = None, **overrides):
        if config is not None and overrides:
            raise TypeError("pass either a config or keyword overrides, not both")
        self.config = config if config is not None else RewardModelConfig(**overrides)

    def loss(self, chosen_reward: torch.Tensor, rejected_reward: torch.Tensor,
             margin: Optional[torch.Tensor] = None) -> PreferenceOutput:
        loss = bradley_terry_loss(chosen_reward, rejected_reward, margin=margin).loss
        coef = self.config.center_rewards_coefficient
        if coef:
            loss = loss + coef * ((chosen_reward.float() + rejected_reward.float()) ** 2).mean()
        with torch.no_grad():
            metrics = {
                "accuracy": (chosen_reward > rejected_reward).float().mean(),
                "margin": (chosen_reward.float() - rejected_reward.float()).mean(),
            }
        return PreferenceOutput(loss, metrics)
