"""Reward shaping: dense rewards from process (per-step) scores, length penalties of DAPO and Kimi k1.5."""

from __future__ import annotations

from typing import Optional

import torch

from ._common import last_token_index, split_groups


def process_rewards(step_scores: torch.Tensor, outcome: Optional[torch.Tensor] = None,
                    step_mask: Optional[torch.Tensor] = None, *, initial_score: float = 0.0) -> torch.Tensor:
    """Dense per-step rewards from a process verifier's scores of each prefix.

    With s_k the verifier's score after step k (``step_scores [B, S]``) and s_{-1} = ``initial_score``::

        r_k = s_k - s_{k-1}           (+ outcome on the last valid step)

    so the rewards of a trajectory telescope to s_last - s_{-1} (+ outcome): shaping by the
    potential s leaves the optimal policy unchanged (Ng et al., 1999) while crediting each step
    with its own improvement. Masked steps (``step_mask`` 0) get reward 0 and are skipped: the
    difference is taken to the previous valid step. A row with no valid step gets all zeros.

    Example::

        r = process_rewards(torch.tensor([[0.2, 0.5, 0.4]]), outcome=torch.tensor([1.0]))
        # [[0.2, 0.3, -0.1 + 1.0]]
    """
    if step_scores.dim() != 2:
        raise ValueError(f"step_scores must be 2-D [B, S], got shape {tuple(step_scores.shape)}")
    B, S = step_scores.shape
    m = torch.ones_like(step_scores, dtype=torch.bool) if step_mask is None else step_mask.bool()
    if m.shape != step_scores.shape:
        raise ValueError(f"step_mask must have shape {tuple(step_scores.shape)}, got {tuple(m.shape)}")
    scores = torch.where(m, step_scores, torch.zeros_like(step_scores))
    # previous valid score: carry forward the last valid score (a cummax over valid positions' indices)
    idx = torch.arange(S, device=scores.device).expand(B, S)
    last_valid = torch.where(m, idx, torch.full_like(idx, -1)).cummax(dim=1).values
    prev_idx = torch.cat([torch.full((B, 1), -1, device=scores.device, dtype=idx.dtype), last_valid[:, :-1]], 1)
    prev = torch.where(prev_idx >= 0, scores.gather(1, prev_idx.clamp(min=0)),
                       torch.full_like(scores, float(initial_score)))
    rewards = torch.where(m, scores - prev, torch.zeros_like(scores))
    if outcome is not None:
        if outcome.shape != (B,):
            raise ValueError(f"outcome must have shape ({B},), got {tuple(outcome.shape)}")
        last = last_token_index(m)
        bonus = torch.where(m.any(-1), outcome.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
        rewards = rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))
    return rewards


def steps_to_tokens(step_rewards: torch.Tensor, step_end: torch.Tensor, num_tokens: int,
                    step_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Place per-step rewards ``[B, S]`` on the token that ends each step (``step_end [B, S]``,
    token indices), giving token rewards ``[B, num_tokens]`` for :func:`rlkern.masked_gae`."""
    if step_end.shape != step_rewards.shape:
        raise ValueError(f"step_end must have shape {tuple(step_rewards.shape)}, got {tuple(step_end.shape)}")
    m = torch.ones_like(step_rewards, dtype=torch.bool) if step_mask is None else step_mask.bool()
    pos = step_end.long()
    if bool(((pos < 0) | (pos >= num_tokens))[m].any()):
        raise ValueError(f"step_end must lie in [0, {num_tokens}) at valid steps")
    out = torch.zeros(step_rewards.shape[0], num_tokens, dtype=step_rewards.dtype, device=step_rewards.device)
    vals = torch.where(m, step_rewards, torch.zeros_like(step_rewards))
    return out.scatter_add(1, torch.where(m, pos, torch.zeros_like(pos)), vals)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer_length: int,
                     factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment of a response of ``lengths`` tokens::

        0                                          if L <= max_length - buffer_length
        (max_length - buffer_length - L) / buffer_length * factor   up to max_length
        -factor                                    beyond max_length
    """
    if buffer_length <= 0 or buffer_length > max_length:
        raise ValueError(f"buffer_length must be in (0, max_length={max_length}], got {buffer_length}")
    expected = max_length - buffer_length
    excess = lengths.to(torch.float32) - expected
    return (-excess / buffer_length * factor).clamp(min=-factor, max=0.0)


def kimi_length_penalty(lengths: torch.Tensor, correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """Kimi k1.5's length reward (Kimi Team, 2025) within each group of responses to one problem.

    With len_min, len_max the shortest and longest responses of the group::

        lambda_i = 0.5 - (len_i - len_min) / (len_max - len_min)
        reward_i = lambda_i            if response i is correct
                 = min(0, lambda_i)    otherwise

    Short correct answers are rewarded, long ones penalised, and wrong answers never gain from
    being short. A group whose responses all have the same length gets 0. Add the result
    (optionally weighted) to the correctness reward.
    """
    if lengths.shape != correct.shape or lengths.dim() != 1:
        raise ValueError(f"lengths and correct must be 1-D of the same shape, got {tuple(lengths.shape)} "
                         f"and {tuple(correct.shape)}")
    g = split_groups(lengths.shape[0], group_size, "lengths")
    L = lengths.to(torch.float32).reshape(g, group_size)
    lo, hi = L.min(1, keepdim=True).values, L.max(1, keepdim=True).values
    span = hi - lo
    lam = torch.where(span > 0, 0.5 - (L - lo) / span.clamp(min=1e-12), torch.zeros_like(L))
    ok = correct.bool().reshape(g, group_size)
    return torch.where(ok, lam, lam.clamp(max=0.0)).reshape(-1)
