"""Reference returns and advantages: explicit loops over time, the readable spec.

Shapes are batch-first ``[B, T]``; flags are bool. Arithmetic happens in the dtype of
the inputs (the tests pass float64). Flags are applied with ``torch.where`` so that a
value behind an episode boundary (NaN included) never reaches the result.

A zero coefficient on the carry (``gamma == 0`` for discounted returns, ``gamma * lam
== 0`` for the others) acts as a boundary too: the term it would multiply is absent, so
a NaN or inf in later steps is not read (rather than 0 * inf = NaN). Any nonzero
coefficient, however small, multiplies as IEEE arithmetic does: a NaN or inf carry
travels on through the whole episode.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def discounted_returns(rewards: torch.Tensor, dones: torch.Tensor, gamma: float,
                       bootstrap: Optional[torch.Tensor] = None) -> torch.Tensor:
    """G_t = r_t + gamma * (1 - done_t) * G_{t+1}; G_T = bootstrap (default 0); gamma = 0 gives G_t = r_t."""
    B, T = rewards.shape
    out = torch.empty_like(rewards)
    carry = bootstrap.to(rewards.dtype) if bootstrap is not None else rewards.new_zeros(B)
    for t in reversed(range(T)):
        cut = dones[:, t] | (gamma == 0)
        carry = torch.where(cut, rewards[:, t], rewards[:, t] + gamma * carry)
        out[:, t] = carry
    return out


def _next_values(values: torch.Tensor, next_values: Optional[torch.Tensor],
                 bootstrap_value: Optional[torch.Tensor]) -> torch.Tensor:
    if next_values is not None:
        return next_values
    last = bootstrap_value.to(values.dtype) if bootstrap_value is not None else values.new_zeros(values.shape[0])
    return torch.cat([values[:, 1:], last[:, None]], dim=1)


def gae(rewards: torch.Tensor, values: torch.Tensor, terminated: torch.Tensor, gamma: float, lam: float, *,
        next_values: Optional[torch.Tensor] = None, truncated: Optional[torch.Tensor] = None,
        bootstrap_value: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """delta_t = r_t + gamma (1 - term_t) V'_t - V_t; A_t = delta_t + gamma lam (1 - done_t) A_{t+1}."""
    B, T = rewards.shape
    nv = _next_values(values, next_values, bootstrap_value)
    done = terminated if truncated is None else terminated | truncated
    done = done | (gamma * lam == 0)
    adv = torch.empty_like(rewards)
    carry = rewards.new_zeros(B)
    for t in reversed(range(T)):
        delta = torch.where(terminated[:, t], rewards[:, t] - values[:, t],
                            rewards[:, t] + gamma * nv[:, t] - values[:, t])
        carry = torch.where(done[:, t], delta, delta + gamma * lam * carry)
        adv[:, t] = carry
    return adv, adv + values


def lambda_returns(rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor, gamma: float,
                   lam: float, *, truncated: Optional[torch.Tensor] = None) -> torch.Tensor:
    """G_t = r_t + gamma (1 - term_t) ((1 - c_t) V'_t + c_t G_{t+1}), c_t = lam unless the
    episode is truncated after t or t is the row's last step (then c_t = 0)."""
    B, T = rewards.shape
    out = torch.empty_like(rewards)
    carry = rewards.new_zeros(B)
    for t in reversed(range(T)):
        cut = torch.full_like(terminated[:, t], t == T - 1 or gamma * lam == 0)
        if truncated is not None:
            cut = cut | truncated[:, t]
        blended = torch.where(cut, next_values[:, t], (1 - lam) * next_values[:, t] + lam * carry)
        carry = torch.where(terminated[:, t], rewards[:, t], rewards[:, t] + gamma * blended)
        out[:, t] = carry
    return out


def masked_gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
               lam: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """GAE over the unmasked tokens of each row, as if the masked ones were removed;
    after the last unmasked token V' = 0. Masked positions get 0 in both outputs."""
    B, T = token_rewards.shape
    adv = torch.zeros_like(token_rewards)
    ret = torch.zeros_like(token_rewards)
    next_value = token_rewards.new_zeros(B)
    carry = token_rewards.new_zeros(B)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        new = delta if gamma * lam == 0 else delta + gamma * lam * carry
        carry = torch.where(m, new, carry)
        next_value = torch.where(m, values[:, t], next_value)
        adv[:, t] = torch.where(m, carry, torch.zeros_like(carry))
        ret[:, t] = torch.where(m, carry + values[:, t], torch.zeros_like(carry))
    return adv, ret


def group_advantages(rewards: torch.Tensor, group_size: int, *, estimator: str = "grpo",
                     scale: Optional[str] = None, eps: float = 1e-6) -> torch.Tensor:
    """grpo: (r - mean_g) / (std + eps); rloo: r - mean of the other members (= G/(G-1) (r - mean_g)),
    divided by (std + eps) when a scale is asked for. std is unbiased: the group's for
    scale="group", the whole batch's for scale="batch"; scale="none" only centres.
    A group whose rewards are all equal gets zeros; a group of one is centred on itself."""
    scale = scale if scale is not None else ("group" if estimator == "grpo" else "none")
    groups = rewards.reshape(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    centred = groups - mean
    if estimator == "rloo":
        centred = centred * (group_size / (group_size - 1))
    if scale == "group":
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.ones_like(mean)
        adv = centred / (std + eps)
    elif scale == "batch":
        adv = centred / (rewards.std() + eps)
    else:
        adv = centred
    all_equal = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    adv = torch.where(all_equal | (centred == 0), torch.zeros_like(adv), adv)
    return adv.reshape(rewards.shape)
