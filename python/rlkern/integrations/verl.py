"""verl's ``core_algos`` functions on rlkern kernels: swap an import, keep your trainer.

    # from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, agg_loss, kl_penalty, ...
    from rlkern.integrations.verl import compute_policy_loss_vanilla, agg_loss, kl_penalty, ...

Names, signatures and return values follow ``verl/trainer/ppo/core_algos.py`` at commit 012be9d9
(the functions return the same tuples; losses and metrics agree to float32 rounding). verl itself
is not needed. Deliberate differences, all at degenerate inputs where verl divides by zero:
a sequence or batch with no valid token contributes 0 instead of NaN, and NaN held at masked
positions does not leak into the result.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from ..kl import kl_penalty as _kl_penalty
from ..losses import policy_loss as _policy_loss
from ..returns import group_advantages, masked_gae

__all__ = [
    "agg_loss", "compute_policy_loss", "compute_policy_loss_vanilla", "compute_policy_loss_gspo",
    "get_policy_loss_fn", "kl_penalty", "compute_gae_advantage_return", "compute_grpo_outcome_advantage",
    "compute_value_loss", "AdaptiveKLController", "FixedKLController",
]

# verl's loss_agg_mode names map one to one onto rlkern's `agg` option.
_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _check_mode(loss_agg_mode: str) -> str:
    if loss_agg_mode not in _AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {_AGG_MODES}, got {loss_agg_mode!r}")
    return loss_agg_mode


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.bool()
    return torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1)


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    """Read a field from a DictConfig, a dataclass config or a plain dict."""
    if config is None:
        return default
    if isinstance(config, dict):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """Aggregate a per-token loss matrix ``[B, T]`` into a scalar (verl's ``agg_loss``).

    token-mean: sum(l m) / sum(m); seq-mean-token-sum: mean_b sum_t l m;
    seq-mean-token-mean: mean_b (sum_t l m / sum_t m); seq-mean-token-sum-norm: sum(l m) / T.
    """
    _check_mode(loss_agg_mode)
    m = loss_mask.bool()
    lm = torch.where(m, loss_mat, torch.zeros_like(loss_mat))
    if loss_agg_mode == "token-mean":
        return lm.sum() / m.sum().clamp(min=1)
    seq = lm.sum(-1)
    if loss_agg_mode == "seq-mean-token-sum":
        return seq.mean()
    if loss_agg_mode == "seq-mean-token-mean":
        return (seq / m.sum(-1).clamp(min=1)).mean()
    return seq.sum() / loss_mask.shape[-1]


def _vanilla(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c, loss_agg_mode):
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 (dual-clip PPO), got {clip_ratio_c}")
    _check_mode(loss_agg_mode)
    # verl clamps the log-ratio to [-20, 20] before exp; feeding the clamped log-prob reproduces
    # both the value and the zero gradient outside the range.
    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    logp = old_log_prob.detach() + log_ratio
    # This adapter still documents the pre-0.9.1 seq-mean-token-sum-norm, sum(l m) / T; core
    # rlkern now averages over the non-empty sequences, so a normalizer of 1 keeps the old
    # value until the adapter moves to verl 0.9.1 (issue #13).
    normalizer = 1.0 if loss_agg_mode == "seq-mean-token-sum-norm" else None
    out = _policy_loss(logp, old_log_prob, advantages, response_mask, objective="clip", level="token",
                       clip_low=clip_low, clip_high=clip_high, dual_clip=clip_ratio_c, agg=loss_agg_mode,
                       normalizer=normalizer)
    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        adv = advantages
        loss1 = -adv * ratio
        loss2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
        clipped1 = torch.maximum(loss1, loss2)
        pg_clipfrac = _masked_mean((loss2 > loss1).float(), response_mask)
        pg_clipfrac_lower = _masked_mean(((clipped1 > -adv * clip_ratio_c) & (adv < 0)).float(), response_mask)
        ppo_kl = _masked_mean(-log_ratio, response_mask)
    return out.loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                        cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode: str = "token-mean"):
    """verl's (deprecated) ``compute_policy_loss``: dual-clip PPO.

    r = exp(clamp(lp - old, -20, 20)); l = max(-A r, -A clip(r, 1 - cl, 1 + ch)), and for A < 0
    min(l, -A c). Returns ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``.
    """
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    if low is None or high is None:
        raise ValueError("cliprange (or both cliprange_low and cliprange_high) must be given")
    return _vanilla(old_log_prob, log_prob, advantages, response_mask, float(low), float(high),
                    float(clip_ratio_c), loss_agg_mode)


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                                config: Optional[Any] = None):
    """verl's ``compute_policy_loss_vanilla`` (the ``"vanilla"`` policy loss).

    ``config`` supplies ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high`` (default to
    ``clip_ratio``) and ``clip_ratio_c`` (default 3.0), as verl's actor config does.
    Returns ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``.
    """
    if config is None:
        raise ValueError("config is required (clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c)")
    clip_ratio = _cfg(config, "clip_ratio")
    low = _cfg(config, "clip_ratio_low", clip_ratio)
    high = _cfg(config, "clip_ratio_high", clip_ratio)
    if low is None or high is None:
        raise ValueError("config must set clip_ratio (or clip_ratio_low and clip_ratio_high)")
    return _vanilla(old_log_prob, log_prob, advantages, response_mask, float(low), float(high),
                    float(_cfg(config, "clip_ratio_c", 3.0)), loss_agg_mode)


def compute_policy_loss_gspo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, loss_agg_mode: str = "seq-mean-token-mean",
                             config: Optional[Any] = None):
    """verl's ``compute_policy_loss_gspo``: the sequence-level ratio of GSPO.

    s_i = exp(min(sum_t m (lp - old) / sum_t m, 10)), each token's loss max(-A s, -A clip(s)) with
    the gradient of token t flowing through lp_t alone (verl's stop-gradient construction),
    aggregated as seq-mean-token-mean whatever ``loss_agg_mode`` says (as verl does).
    Returns ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)`` with ``pg_clipfrac_lower`` 0.
    """
    if config is None:
        raise ValueError("config is required (clip_ratio, clip_ratio_low, clip_ratio_high)")
    clip_ratio = _cfg(config, "clip_ratio")
    low = float(_cfg(config, "clip_ratio_low", clip_ratio))
    high = float(_cfg(config, "clip_ratio_high", clip_ratio))
    m = response_mask.bool()
    log_ratio = log_prob - old_log_prob
    n = m.sum(-1).clamp(min=1)
    seq_log_ratio = torch.where(m, log_ratio, torch.zeros_like(log_ratio)).sum(-1) / n
    # verl's per-token ratio s_t = exp(lp_t - sg(lp_t) + sg(seq_log_ratio)), clamped at 10 in log space:
    # the sequence's value, but each token's gradient flows through its own log-prob only. Fed as a
    # token-level log-prob, rlkern's fused clip op reproduces it exactly, whatever the advantages
    # (with one advantage per sequence this equals the sequence-level ratio of TRL and rlkern).
    log_s = torch.clamp(log_prob - log_prob.detach() + seq_log_ratio.detach().unsqueeze(-1), max=10.0)
    logp = old_log_prob.detach() + log_s
    out = _policy_loss(logp, old_log_prob, advantages, response_mask, objective="clip", level="token",
                       clip_low=low, clip_high=high, agg="seq-mean-token-mean")
    with torch.no_grad():
        s = torch.exp(torch.clamp(seq_log_ratio, max=10.0)).unsqueeze(-1)
        loss1 = -advantages * s
        loss2 = -advantages * torch.clamp(s, 1 - low, 1 + high)
        pg_clipfrac = _masked_mean((loss2 > loss1).float(), response_mask)
        ppo_kl = _masked_mean(-log_ratio, response_mask)
    return out.loss, pg_clipfrac, ppo_kl, torch.tensor(0.0, device=out.loss.device)


_POLICY_LOSSES: Dict[str, Callable] = {"vanilla": compute_policy_loss_vanilla, "gspo": compute_policy_loss_gspo}


def get_policy_loss_fn(name: str) -> Callable:
    """verl's registry lookup, for the losses rlkern provides (``vanilla``, ``gspo``)."""
    if name not in _POLICY_LOSSES:
        raise ValueError(f"Unsupported loss mode: {name}. Supported modes are: {list(_POLICY_LOSSES)}")
    return _POLICY_LOSSES[name]


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's ``kl_penalty``: per-token KL estimate of the policy from the reference.

    "kl"/"k1": lp - ref; "abs": |lp - ref|; "mse"/"k2": 0.5 (lp - ref)^2;
    "low_var_kl"/"k3": with d = clamp(ref - lp, -20, 20), clamp(exp(d) - d - 1, -10, 10).
    """
    mode = kl_penalty
    if mode in ("kl", "k1"):
        return _kl_penalty(logprob, ref_logprob, kind="k1")
    if mode == "abs":
        return (logprob - ref_logprob).abs()
    if mode in ("mse", "k2"):
        return _kl_penalty(logprob, ref_logprob, kind="k2")
    if mode in ("low_var_kl", "k3"):
        d = torch.clamp(ref_logprob - logprob, min=-20.0, max=20.0)
        return _kl_penalty(ref_logprob.detach() - d, ref_logprob, kind="k3", clamp=10.0)
    if mode == "full":
        raise NotImplementedError("kl_penalty='full' needs the full distributions")
    raise NotImplementedError(f"unknown kl_penalty {mode!r}")


def compute_value_loss(vpreds: torch.Tensor, returns: torch.Tensor, values: torch.Tensor,
                       response_mask: torch.Tensor, cliprange_value: float,
                       loss_agg_mode: str = "token-mean") -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_value_loss``: 0.5 agg(max((v - R)^2, (clip(v, v_old +- c) - R)^2)) and the clip fraction."""
    from ..losses import value_loss

    loss = value_loss(vpreds, values, returns, response_mask, clip=cliprange_value,
                      agg=_check_mode(loss_agg_mode)).loss
    with torch.no_grad():
        clipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
        vf_clipfrac = _masked_mean(((clipped - returns) ** 2 > (vpreds - returns) ** 2).float(), response_mask)
    return loss, vf_clipfrac


def _next_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """For each position, the index of the first valid position at or after it (T when none)."""
    T = mask.shape[-1]
    idx = torch.arange(T, device=mask.device).expand_as(mask)
    cand = torch.where(mask, idx, torch.full_like(idx, T))
    return cand.flip(-1).cummin(-1).values.flip(-1)


@torch.no_grad()
def compute_gae_advantage_return(token_level_rewards: torch.Tensor, values: torch.Tensor,
                                 response_mask: torch.Tensor, gamma, lam) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_gae_advantage_return``: token-level GAE over the response mask, then the
    advantages whitened over the mask (unbiased variance, eps 1e-8). Returns ``(advantages, returns)``.

    At a masked position verl carries the running GAE over unchanged, so its advantage is the one
    of the next valid token (0 after the last), and returns = advantages + values; both are
    reproduced here, and whitening is applied to every position as verl does.
    """
    gamma = float(gamma)
    lam = float(lam)
    m = response_mask.bool()
    adv, _ = masked_gae(token_level_rewards, values, m, gamma=gamma, lam=lam)
    nxt = _next_valid_index(m)
    padded = torch.cat([adv, torch.zeros_like(adv[..., :1])], -1)
    adv = padded.gather(-1, nxt)
    returns = adv + values
    n = m.sum()
    if n < 2:
        raise ValueError("response_mask must have at least two valid tokens to whiten the advantages")
    mean = torch.where(m, adv, torch.zeros_like(adv)).sum() / n
    var = torch.where(m, (adv - mean) ** 2, torch.zeros_like(adv)).sum() / n * (n / (n - 1))
    return (adv - mean) * torch.rsqrt(var + 1e-8), returns


@torch.no_grad()
def compute_grpo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                   index: np.ndarray, epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                   config: Optional[Any] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_grpo_outcome_advantage``: per prompt group (``index``, any order),
    (score - mean) / (std + epsilon) with score the sum of the token rewards and an unbiased std,
    or only centred without ``norm_adv_by_std_in_grpo`` (Dr.GRPO); a group of one gets mean 0 and
    std 1. Broadcast over the response mask; returns ``(advantages, advantages)``.
    """
    scores = token_level_rewards.sum(-1)
    keys = np.asarray(index)
    if keys.shape[0] != scores.shape[0]:
        raise ValueError(f"index must have {scores.shape[0]} entries, got {keys.shape[0]}")
    _, group_id, counts = np.unique(keys, return_inverse=True, return_counts=True)
    group_id = group_id.reshape(-1)
    scale = "group" if norm_adv_by_std_in_grpo else "none"
    if counts.min() >= 2 and counts.max() == counts.min():
        # equal groups: gather each group contiguously for the fused kernel, then scatter back
        order = torch.as_tensor(np.argsort(group_id, kind="stable"), device=scores.device)
        adv_sorted = group_advantages(scores[order], int(counts[0]), estimator="grpo", scale=scale, eps=epsilon)
        adv = torch.empty_like(scores)
        adv[order] = adv_sorted.to(scores.dtype)
    else:
        gid = torch.as_tensor(group_id, device=scores.device)
        G = int(counts.shape[0])
        cnt = torch.as_tensor(counts, device=scores.device, dtype=scores.dtype)
        mean = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, gid, scores) / cnt
        dev = (scores - mean[gid]) ** 2
        var = torch.zeros(G, dtype=scores.dtype, device=scores.device).index_add_(0, gid, dev) / (cnt - 1).clamp(min=1)
        single = cnt == 1
        mean = torch.where(single, torch.zeros_like(mean), mean)
        std = torch.where(single, torch.ones_like(var), var.sqrt())
        adv = scores - mean[gid]
        if norm_adv_by_std_in_grpo:
            adv = adv / (std[gid] + epsilon)
    adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


class AdaptiveKLController:
    """verl's ``AdaptiveKLController``: value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, init_kl_coef, target_kl, horizon):
        from ..algorithms.ppo import AdaptiveKLController as _Impl

        self._impl = _Impl(init_kl_coef, target_kl, horizon)
        self.target, self.horizon = self._impl.target, self._impl.horizon

    @property
    def value(self) -> float:
        return self._impl.value

    @value.setter
    def value(self, v: float) -> None:
        self._impl.value = float(v)

    def update(self, current_kl, n_steps) -> None:
        self._impl.update(current_kl, n_steps)


class FixedKLController:
    """verl's ``FixedKLController``: a constant coefficient."""

    def __init__(self, kl_coef):
        self.value = kl_coef

    def update(self, current_kl, n_steps) -> None:
        pass
