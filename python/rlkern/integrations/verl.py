"""verl's ``core_algos`` functions on rlkern kernels: swap an import, or install them into verl.

    # either import the functions:
    from rlkern.integrations.verl import compute_policy_loss_vanilla, agg_loss, kl_penalty, ...
    # or make an unchanged verl config run on rlkern (policy losses, advantage estimators, KL, value loss):
    import rlkern.integrations.verl as rv; rv.install()      # rv.uninstall() restores verl's

Names, signatures and return values follow ``verl/trainer/ppo/core_algos.py`` of verl 0.9.1: the
registered policy losses take ``(old_log_prob, log_prob, advantages, response_mask,
loss_agg_mode, config, rollout_is_weights)`` and return ``(loss, metrics)`` with verl's metric
names and Python-float values; ``config.global_batch_info`` (dp_size, batch_num_tokens,
global_batch_size, loss_scale_factor) sets the global normaliser as in verl's ``agg_loss``.
Losses and metrics agree with verl to float32 rounding (the tests run verl's own functions).
verl itself is needed only for :func:`install` (and to wrap rollout weights in its DataProto).

Policy losses provided: every one of verl's registry: vanilla, gspo, cispo, gpg, dro, bypass_mode,
sapo, geo_mean, dppo_tv, dppo_kl, clip_cov, kl_cov.

Rollout correction (``verl/trainer/ppo/rollout_corr_helper.py``: IS weights with TIS/IcePop
bounds, batch normalisation, rejection sampling, off-policy metrics):
:func:`compute_rollout_correction_and_rejection_mask` and its helpers, with verl's names and
results and one device sync per call. verl has no registry for it; :func:`install` replaces
the helper module's functions (verl's trainers look ``compute_rollout_correction_and_add_to_batch``
up there at call time) and the references loaded verl modules imported by name, so an
``algorithm.rollout_correction`` config runs on rlkern unchanged.

Deliberate differences, all at degenerate inputs: where verl divides by a zero token count
the result here is 0 instead of NaN, NaN held at masked positions does not leak into the
result, and KL estimates of bfloat16/float16 log-probs are computed (and returned) in float32
(verl forms the difference in the input precision); so are clip_cov's and kl_cov's covariance
terms and the rollout-correction weights (a bfloat16 token selection can differ from verl's
at near-ties, and kl_cov's top-k runs on the device, where tied covariances may be ordered
differently than verl's CPU top-k).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import math

import numpy as np
import torch

from ..kl import _traced
from ..kl import kl_penalty as _kl_penalty
from ..losses import _mask_bytes
from ..losses import _policy_loss_reading as _reading
from ..losses import value_loss as _value_loss
from ..returns import discounted_returns, group_advantages, masked_gae
from .. import _validate
from .._kernel import core, dtype_code, ptr
from . import _peers
from . import _rollout_corr as _rc
from ._peers import cfg as _cfg
from ._peers import masked_mean as _masked_mean

__all__ = [
    "agg_loss", "compute_policy_loss", "compute_policy_loss_vanilla", "compute_policy_loss_gspo",
    "compute_policy_loss_cispo", "compute_policy_loss_gpg", "compute_policy_loss_dro",
    "compute_policy_loss_reinforce", "compute_policy_loss_bypass_mode", "compute_policy_loss_sapo",
    "compute_policy_loss_geo_mean", "compute_policy_loss_dppo_tv", "compute_policy_loss_dppo_kl",
    "compute_policy_loss_clip_cov", "compute_policy_loss_kl_cov", "get_policy_loss_fn",
    "POLICY_LOSS_REGISTRY", "ADV_ESTIMATOR_REGISTRY", "get_adv_estimator_fn", "kl_penalty", "kl_penalty_forward",
    "compute_value_loss", "compute_gae_advantage_return", "compute_grpo_outcome_advantage",
    "compute_grpo_vectorized_outcome_advantage", "compute_reinforce_plus_plus_outcome_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage", "compute_remax_outcome_advantage",
    "compute_rloo_outcome_advantage", "compute_rloo_vectorized_outcome_advantage", "compute_opo_outcome_advantage",
    "compute_gpg_outcome_advantage", "compute_grpo_passk_outcome_advantage", "compute_gdpo_outcome_advantage",
    "compute_optimal_token_baseline_advantage", "compute_multi_turn_optimal_token_baseline_advantage",
    "compute_rewards", "masked_whiten",
    "AdaptiveKLController", "FixedKLController", "install", "uninstall",
    "compute_rollout_correction_and_rejection_mask", "compute_rollout_correction_weights",
    "compute_rollout_rejection_mask", "compute_offpolicy_metrics", "compute_rollout_correction_and_add_to_batch",
    "compute_rollout_corr_metrics_from_logprobs",
]

_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_SAFETY = 20.0  # verl clamps policy log-ratios to [-20, 20] before exp
_PG_METRICS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")


def _check_mode(loss_agg_mode: str) -> str:
    if loss_agg_mode not in _AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {_AGG_MODES}, got {loss_agg_mode!r}")
    return loss_agg_mode


def _batch_info(config: Any) -> Dict[str, Any]:
    info = _cfg(config, "global_batch_info", None)
    return dict(info) if info else {}


def _agg(loss_agg_mode: str, mask: torch.Tensor, info: Dict[str, Any]):
    return _peers.global_agg(_check_mode(loss_agg_mode), mask, info.get("dp_size", 1) or 1,
                             info.get("batch_num_tokens"), info.get("global_batch_size"),
                             info.get("loss_scale_factor"))


def _row_counts(m: torch.Tensor) -> torch.Tensor:
    """Active tokens per row of a bool mask (int32): its bytes summed in int32, several times
    faster than a bool sum or count_nonzero over a dim (both convert the mask first)."""
    return m.view(torch.uint8).sum(-1, dtype=torch.int32)


_AGG_CODES = {"token-mean": 0, "token-sum": 1, "seq-mean-token-mean": 2, "seq-mean-token-sum": 3,
              "seq-mean-token-sum-norm": 4}


def _fused_agg_ok(loss_mat: torch.Tensor, loss_mask: torch.Tensor, norm) -> bool:
    """Whether agg_loss may take the one-pass CPU kernel: plain CPU [B, T] floating tensors
    outside torch.compile and torch.func (those keep the eager formula, which they trace)."""
    return (loss_mat.dim() == 2 and loss_mat.numel() > 0 and loss_mask.shape == loss_mat.shape
            and loss_mat.dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16)
            and not loss_mask.dtype.is_floating_point  # verl weights the tokens by a float mask's values
            and _validate.cpu_data(loss_mat) and _validate.cpu_data(loss_mask)
            and (norm is None or isinstance(norm, (int, float)))
            and not _traced(loss_mat, loss_mask))


class _MaskedAgg(torch.autograd.Function):
    """agg_loss in one pass over the tokens (csrc/cpu/masked_agg.cpp): row sums in float lanes
    flushed to double, added in row order. Backward writes mask * g / denominator (and / the
    row's token count for seq-mean-token-mean) in the loss's dtype, without a where/sum chain."""

    @staticmethod
    def forward(ctx, loss_mat, m, code, norm):
        x = loss_mat.contiguous()
        B, T = x.shape
        counts = torch.empty(B, dtype=torch.float64) if code == _AGG_CODES["seq-mean-token-mean"] else None
        value, denom = core().agg.forward(B, T, dtype_code(x), ptr(x), ptr(m), code, norm,
                                          0 if counts is None else ptr(counts))
        ctx.m, ctx.counts, ctx.code, ctx.denom, ctx.dtype = m, counts, code, denom, x.dtype
        # verl's dtypes: the token modes keep the loss's; the sequence modes' final masked sum
        # against a float32 sequence mask promotes bfloat16/float16 to float32
        out = x.dtype if code < 2 else torch.promote_types(x.dtype, torch.float32)
        return torch.tensor(value, dtype=out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        B, T = ctx.m.shape
        out = torch.empty((B, T), dtype=ctx.dtype)
        core().agg.backward(B, T, dtype_code(out), ptr(ctx.m), ctx.code, ctx.denom,
                            0 if ctx.counts is None else ptr(ctx.counts), float(g.item()), ptr(out))
        return out, None, None, None


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens: Optional[int] = None, global_batch_size: Optional[int] = None,
             loss_scale_factor: Optional[int] = None) -> torch.Tensor:
    """verl's ``agg_loss``: aggregate a per-token loss ``[B, T]`` into a scalar over the global batch.

    token-mean: sum(l m) / batch_num_tokens * dp_size (local token count by default);
    token-sum: sum(l m) * dp_size; seq-mean-token-sum: sum over non-empty sequences of their
    token sums / global_batch_size * dp_size (local non-empty count by default);
    seq-mean-token-sum-norm: that divided by loss_scale_factor (default T);
    seq-mean-token-mean: the same mean of each sequence's token mean. Sequences without an
    active token are left out of every sequence count, as verl does.
    """
    agg, norm = _peers.global_agg(_check_mode(loss_agg_mode), loss_mask, dp_size, batch_num_tokens,
                                  global_batch_size, loss_scale_factor)
    if _fused_agg_ok(loss_mat, loss_mask, norm):
        return _MaskedAgg.apply(loss_mat, _mask_bytes(loss_mask), _AGG_CODES[agg],
                                math.nan if norm is None else float(norm))
    m = loss_mask.bool()
    lm = torch.where(m, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    # count_nonzero: a bool sum would first copy the mask to int64
    if agg in ("token-mean", "token-sum"):
        total = lm.sum()
        if norm is not None:
            return total / norm
        return total / torch.count_nonzero(m).clamp(min=1) if agg == "token-mean" else total
    seq = lm.sum(-1)
    count = _row_counts(m)
    if agg == "seq-mean-token-mean":
        seq = seq / count.clamp(min=1)
    if norm is None:
        norm = (count > 0).sum().clamp(min=1)
        if agg == "seq-mean-token-sum-norm":
            norm = norm * loss_mat.shape[-1]
    return seq.sum() / norm


# ------------------------------------------------------------------------------------------
# policy losses


def _clip_range(config: Any) -> Tuple[float, float]:
    if config is None:
        raise ValueError("config is required (the actor config: clip_ratio, clip_ratio_low, clip_ratio_high)")
    clip_ratio = _cfg(config, "clip_ratio")
    low = _cfg(config, "clip_ratio_low", clip_ratio)
    high = _cfg(config, "clip_ratio_high", clip_ratio)
    if low is None or high is None:
        raise ValueError("config must set clip_ratio (or clip_ratio_low and clip_ratio_high)")
    return float(low), float(high)


def _detached(weights: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """verl's rollout_is_weights as the kernel's per-token ``weights`` (a constant, like verl's
    ``pg_losses * rollout_is_weights``); the clip metrics stay those of the unweighted tokens."""
    return None if weights is None else weights.detach()


_VANILLA_METRICS = ("clip_frac_low", "clip_frac_high", "approx_kl_clamped", "dual_clip_frac")


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                                config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``"vanilla"`` policy loss: dual-clip PPO with the log-ratio clamped to [-20, 20].

    l = max(-A r, -A clip(r, 1 - low, 1 + high)), for A < 0 min(l, -A clip_ratio_c), times the
    detached ``rollout_is_weights`` when given, aggregated by ``loss_agg_mode`` with
    ``config.global_batch_info``. Returns ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl",
    "actor/pg_clipfrac_lower"})``; clip fractions come from the fused kernel's pass.
    """
    low, high = _clip_range(config)
    c = float(_cfg(config, "clip_ratio_c", 3.0))
    if not c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 (dual-clip PPO), got {c}")
    agg, norm = _agg(loss_agg_mode, response_mask, _batch_info(config))
    # the kernel computes only the totals of the metrics returned
    out = _reading(_VANILLA_METRICS, log_prob, old_log_prob, advantages, response_mask, objective="clip",
                   clip_low=low, clip_high=high, dual_clip=c, log_ratio_clamp=_SAFETY,
                   weights=_detached(rollout_is_weights), agg=agg, normalizer=norm)
    clipfrac = out.metrics["clip_frac_low"] + out.metrics["clip_frac_high"]
    lower = out.metrics["dual_clip_frac"]
    # verl's ppo_kl is measured after its +-20 clamp: the kernel's approx_kl_clamped
    values = _peers.scalars([clipfrac, out.metrics["approx_kl_clamped"], lower])
    return _peers.owned(out.loss), dict(zip(_PG_METRICS, values))


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                        cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode: str = "token-mean"):
    """verl's deprecated ``compute_policy_loss``: the vanilla loss with explicit clip ranges and the
    local aggregation. Returns ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)`` (tensors)."""
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    if low is None or high is None:
        raise ValueError("cliprange (or both cliprange_low and cliprange_high) must be given")
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 (dual-clip PPO), got {clip_ratio_c}")
    agg, norm = _agg(loss_agg_mode, response_mask, {})
    out = _reading(_VANILLA_METRICS, log_prob, old_log_prob, advantages, response_mask, objective="clip",
                   clip_low=float(low), clip_high=float(high), dual_clip=float(clip_ratio_c), log_ratio_clamp=_SAFETY,
                   agg=agg, normalizer=norm)
    clipfrac = out.metrics["clip_frac_low"] + out.metrics["clip_frac_high"]
    return _peers.owned(out.loss), clipfrac, out.metrics["approx_kl_clamped"], out.metrics["dual_clip_frac"]


@torch.no_grad()
def _per_sequence(advantages: torch.Tensor, mask: torch.Tensor) -> Optional[torch.Tensor]:
    """advantages [B] when they are constant over each sequence's active tokens, else None."""
    if advantages.dim() == 1:
        return advantages
    native = _row_constant_native(advantages, mask)
    if native is not NotImplemented:
        return native
    m = mask.bool()
    inf = torch.tensor(float("inf"), dtype=advantages.dtype, device=advantages.device)
    hi = torch.where(m, advantages, -inf).amax(-1)
    lo = torch.where(m, advantages, inf).amin(-1)
    empty = ~m.any(-1)
    if not bool(((hi == lo) | empty).all()):
        return None
    return torch.where(empty, torch.zeros_like(hi), hi)


def _row_constant_native(advantages: torch.Tensor, mask: torch.Tensor):
    """:func:`_per_sequence` in one compiled pass that stops at a row's first differing token
    (cov.cpp row_constant), for CPU tensors; NotImplemented where the torch formulation runs."""
    for t in (advantages, mask):
        if not _validate.cpu_data(t):
            return NotImplemented
    if advantages.dim() != 2 or advantages.shape != mask.shape or advantages.dtype not in _COV_DTYPES \
            or advantages.numel() == 0 or not hasattr(core().losses, "row_constant"):
        return NotImplemented
    m = (mask if mask.dtype == torch.bool else mask != 0).contiguous().view(torch.uint8)
    a = advantages.detach()
    B, T = a.shape
    values = torch.empty(B, dtype=torch.float64)
    if not core().losses.row_constant(B, T, dtype_code(a), ptr(a), a.stride(0), a.stride(1), ptr(m), ptr(values)):
        return None
    return values.to(advantages.dtype)


def compute_policy_loss_gspo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, loss_agg_mode: str = "seq-mean-token-mean",
                             config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``"gspo"`` policy loss: the sequence-level ratio s = exp(min(masked mean of lp - old, 10)).

    Each token's loss is max(-A s, -A clip(s)) (times ``rollout_is_weights``), aggregated by
    ``loss_agg_mode`` (verl 0.9.1 honours it; its trainer passes token-mean by default). In
    verl's stop-gradient construction token t's gradient flows through lp_t alone; with the
    advantage constant over a sequence's tokens (GRPO) that equals the sequence-level ratio's
    gradient, which the fused kernel computes (``level="sequence"``); otherwise the
    construction is fed to the kernel token by token. Returns ``(pg_loss, metrics)`` with
    ``actor/pg_clipfrac_lower`` 0, as verl.
    """
    low, high = _clip_range(config)
    agg, norm = _agg(loss_agg_mode, response_mask, _batch_info(config))
    seq_adv = _per_sequence(advantages, response_mask) if rollout_is_weights is None else None
    if seq_adv is not None:
        out = _reading(("clip_frac_low", "clip_frac_high", "approx_kl"), log_prob, old_log_prob, seq_adv,
                       response_mask, objective="clip", level="sequence", clip_low=low, clip_high=high,
                       log_ratio_clamp=(None, 10.0), agg=agg, normalizer=norm)
        clipfrac = out.metrics["clip_frac_low"] + out.metrics["clip_frac_high"]
        ppo_kl = out.metrics["approx_kl"]
    else:
        m = response_mask.bool()
        lr = torch.where(m, log_prob.detach() - old_log_prob.detach(), torch.zeros((), dtype=log_prob.dtype,
                                                                                   device=log_prob.device))
        seq_lr = lr.float().sum(-1) / m.sum(-1).clamp(min=1)
        log_s = log_prob - log_prob.detach() + seq_lr.unsqueeze(-1)
        adv = advantages if rollout_is_weights is None else _peers.weighted_advantages(advantages, rollout_is_weights)
        out = _reading((), old_log_prob.detach().float() + log_s.float(), old_log_prob.float(), adv, response_mask,
                       objective="clip", clip_low=low, clip_high=high, log_ratio_clamp=(None, 10.0), agg=agg,
                       normalizer=norm)
        with torch.no_grad():
            s = seq_lr.clamp(max=10.0).exp().unsqueeze(-1)
            a = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).float()
            clipfrac = _masked_mean((-a * s.clamp(1 - low, 1 + high) > -a * s).float(), response_mask)
            ppo_kl = _masked_mean(-lr.float(), response_mask)
    values = _peers.scalars([clipfrac, ppo_kl, 0.0])
    return _peers.owned(out.loss), dict(zip(_PG_METRICS, values))


def compute_policy_loss_cispo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                              response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                              config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``"cispo"`` policy loss: -sg(clip(r, 1 - low, 1 + high)) A lp, r = exp(clamp(lp - old, +-20)).

    ``actor/pg_clipfrac`` is verl's fraction of active tokens with r outside the clip range
    whatever the sign of A: the kernel's cispo ``clip_frac``.
    """
    low, high = _clip_range(config)
    agg, norm = _agg(loss_agg_mode, response_mask, _batch_info(config))
    out = _reading(("clip_frac", "approx_kl_clamped"), log_prob, old_log_prob, advantages, response_mask,
                   objective="cispo", clip_low=low, clip_high=high, log_ratio_clamp=_SAFETY,
                   weights=_detached(rollout_is_weights), agg=agg, normalizer=norm)
    values = _peers.scalars([out.metrics["clip_frac"], out.metrics["approx_kl_clamped"], 0.0])
    return _peers.owned(out.loss), dict(zip(_PG_METRICS, values))


def compute_policy_loss_gpg(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                            response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                            config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``"gpg"`` policy loss: -lp A (times ``rollout_is_weights``); no metrics."""
    if config is None:
        raise ValueError("config is required (the actor config)")
    agg, norm = _agg(loss_agg_mode, response_mask, _batch_info(config))
    # no metric: the kernel skips every total, and the ratio
    out = _reading((), log_prob, old_log_prob, advantages, response_mask, objective="reinforce",
                   weights=_detached(rollout_is_weights), agg=agg, normalizer=norm)
    return _peers.owned(out.loss), {}


def compute_policy_loss_dro(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                            response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                            config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``"dro"`` policy loss: -(lp A - beta/2 (lp - old)^2) with beta = ``config.policy_loss.dro_beta``.

    The quadratic penalty is the kernel's k2 KL term against ``old_log_prob`` with coefficient
    beta. With ``rollout_is_weights`` (which weight the penalty too) it is computed in torch.
    """
    if config is None:
        raise ValueError("config is required (the actor config with policy_loss.dro_beta)")
    beta = _cfg(_cfg(config, "policy_loss"), "dro_beta")
    if beta is None or beta <= 0:
        raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
    info = _batch_info(config)
    if rollout_is_weights is None:
        agg, norm = _agg(loss_agg_mode, response_mask, info)
        out = _reading(("approx_kl",), log_prob, old_log_prob, advantages, response_mask, objective="reinforce",
                       ref_logp=old_log_prob, kl_coef=float(beta), kl_kind="k2", agg=agg, normalizer=norm)
        loss, ppo_kl = _peers.owned(out.loss), out.metrics["approx_kl"]
    else:
        adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        log_ratio = log_prob - old_log_prob.detach()
        per_token = -(log_prob * adv - 0.5 * beta * log_ratio.square()) * rollout_is_weights.detach()
        loss = agg_loss(per_token, response_mask, loss_agg_mode, **info)
        ppo_kl = _masked_mean(-log_ratio.detach(), response_mask)
    return loss, {"actor/ppo_kl": _peers.scalars([ppo_kl])[0]}


def compute_policy_loss_reinforce(rollout_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                  response_mask: torch.Tensor, loss_agg_mode: str = "seq-mean-token-sum",
                                  config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``compute_policy_loss_reinforce``: -w A lp (w the detached IS weights, 1 without),
    with ``actor/ppo_kl`` the masked mean of rollout - lp."""
    if config is None:
        raise ValueError("ActorConfig must be provided for REINFORCE loss")
    agg, norm = _agg(loss_agg_mode, response_mask, _batch_info(config))
    out = _reading(("approx_kl",), log_prob, rollout_log_prob, advantages, response_mask, objective="reinforce",
                   weights=_detached(rollout_is_weights), agg=agg, normalizer=norm)
    return _peers.owned(out.loss), {"actor/ppo_kl": _peers.scalars([out.metrics["approx_kl"]])[0]}


def compute_policy_loss_bypass_mode(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                    response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                                    config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``"bypass_mode"`` loss (old_log_prob is the rollout's): IS weights, rejection mask and
    their metrics from :func:`compute_rollout_correction_and_rejection_mask`, then the REINFORCE or
    the vanilla PPO loss on rlkern's kernel, as ``config.policy_loss.rollout_correction.loss_type`` says."""
    if config is None:
        raise ValueError("config is required for bypass_mode loss")
    policy_cfg = _cfg(config, "policy_loss")
    rc = policy_cfg.get("rollout_correction", None) if policy_cfg is not None and hasattr(policy_cfg, "get") else None
    if rc is None:
        raise ValueError("rollout_correction config not found in policy_loss. "
                         "When using loss_mode='bypass_mode', ensure rollout_correction config is passed.")
    loss_type = rc.get("loss_type", "ppo_clip")
    if loss_type not in ("reinforce", "ppo_clip"):
        raise ValueError(f"Invalid loss_type: {loss_type}. Must be 'reinforce' or 'ppo_clip'.")
    with torch.no_grad():
        # ppo_clip reports the IS metrics but applies no weights: they are not formed
        weights, mask, metrics = _rc.correction_and_rejection(
            log_prob, old_log_prob, response_mask, rollout_is=rc.get("rollout_is", None),
            rollout_is_threshold=rc.get("rollout_is_threshold", 2.0),
            rollout_is_batch_normalize=rc.get("rollout_is_batch_normalize", False),
            rollout_rs=rc.get("rollout_rs", None), rollout_rs_threshold=rc.get("rollout_rs_threshold", None),
            want_weights=loss_type == "reinforce", copy_mask=False)
    if loss_type == "reinforce":
        loss, pg_metrics = compute_policy_loss_reinforce(old_log_prob, log_prob, advantages, mask, loss_agg_mode,
                                                         config, weights)
    else:
        loss, pg_metrics = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, mask, loss_agg_mode,
                                                       config, None)
    pg_metrics.update(metrics)
    return loss, pg_metrics


def compute_policy_loss_sapo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, loss_agg_mode: str = "seq-mean-token-mean",
                             config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``"sapo"`` policy loss: -sigmoid(tau (r - 1)) 4 / tau A, tau = config.tau_pos where
    A > 0 else config.tau_neg, r = exp(clamp(lp - old, +-20)) (times ``rollout_is_weights``).

    As verl, the loss is always aggregated seq-mean-token-mean (``loss_agg_mode`` is checked and
    otherwise ignored) and both clip fractions are 0.
    """
    if config is None:
        raise ValueError("config is required (the actor config: tau_pos, tau_neg)")
    _check_mode(loss_agg_mode)
    agg, norm = _agg("seq-mean-token-mean", response_mask, _batch_info(config))
    out = _reading(("approx_kl_clamped",), log_prob, old_log_prob, advantages, response_mask, objective="sapo",
                   weights=_detached(rollout_is_weights),
                   sapo_temperature_pos=float(_cfg(config, "tau_pos", 1.0)),
                   sapo_temperature_neg=float(_cfg(config, "tau_neg", 1.05)), log_ratio_clamp=_SAFETY,
                   agg=agg, normalizer=norm)
    values = _peers.scalars([0.0, out.metrics["approx_kl_clamped"], 0.0])
    return _peers.owned(out.loss), dict(zip(_PG_METRICS, values))


def compute_policy_loss_geo_mean(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                 response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                                 config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``"geo_mean"`` policy loss (GMPO): the batch mean over sequences of
    -mean(A) exp(mean_t y_t), y_t the token log-ratio clipped to [-low, high] on the side its
    advantage's sign would grow. ``loss_agg_mode`` and the global batch info are ignored, as in
    verl (it divides by the local batch size). ``rollout_is_weights`` enter as verl's per-sequence
    geometric mean exp(mean_t log(w_t + 1e-10)), a positive factor folded into the advantages.
    """
    low, high = _clip_range(config)
    _check_mode(loss_agg_mode)
    adv = advantages
    if rollout_is_weights is not None:
        m = response_mask.to(torch.float32)
        log_w = torch.log(rollout_is_weights.detach().float() + 1e-10)
        seq_w = torch.exp((log_w * m).sum(-1) / (m.sum(-1) + 1e-8))
        a = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
        adv = a.float() * seq_w.unsqueeze(-1)
    out = _reading(("clip_frac_high", "approx_kl", "clip_frac_low"), log_prob, old_log_prob, adv, response_mask,
                   objective="geo_mean", clip_low=low, clip_high=high, agg="seq-mean-token-mean",
                   normalizer=float(log_prob.shape[0]))
    values = _peers.scalars([out.metrics["clip_frac_high"], out.metrics["approx_kl"], out.metrics["clip_frac_low"]])
    return _peers.owned(out.loss), dict(zip(_PG_METRICS, values))


def _dppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights, objective):
    low, high = _clip_range(config)
    cap = float(_cfg(config, "clip_ratio_c", 20.0))
    agg, norm = _agg(loss_agg_mode, response_mask, _batch_info(config))
    out = _reading(("clip_frac_low", "clip_frac_high", "trunc_frac", "approx_kl_clamped"), log_prob, old_log_prob,
                   advantages, response_mask, objective=objective, clip_low=low, clip_high=high, ratio_cap=cap,
                   log_ratio_clamp=_SAFETY, weights=_detached(rollout_is_weights), agg=agg, normalizer=norm)
    clipfrac = out.metrics["clip_frac_low"] + out.metrics["clip_frac_high"]
    lower = out.metrics["trunc_frac"]
    values = _peers.scalars([clipfrac, out.metrics["approx_kl_clamped"], lower])
    return _peers.owned(out.loss), dict(zip(_PG_METRICS, values))


def compute_policy_loss_dppo_tv(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                                config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``"dppo_tv"`` policy loss (DPPO-Binary-TV): -A sg(min(r, clip_ratio_c)) lp on the
    tokens with p - p_old <= clip_ratio_high (A > 0) or >= -clip_ratio_low (A <= 0);
    ``actor/pg_clipfrac`` is the fraction outside, ``actor/pg_clipfrac_lower`` the fraction
    inside with r > clip_ratio_c."""
    return _dppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                 "dppo_tv")


def compute_policy_loss_dppo_kl(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                                config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``"dppo_kl"`` policy loss (DPPO-Binary-KL): as ``dppo_tv`` with the binary KL of
    (p_old, p) bounded on the side the advantage pushes."""
    return _dppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
                 "dppo_kl")


def _row_scale(agg: str, norm, mask: torch.Tensor, dtype: torch.dtype, rows: torch.Tensor,
               n_active: int) -> torch.Tensor:
    """The per-row factor s_b with agg(l) = sum_{b,t} m_bt l_bt s_b for the (agg, normalizer)
    pair of :func:`_agg` (the fused kernel's denominators), at the given ``rows``, so that a
    term on a few gathered tokens can be added to the kernel's loss without a [B, T] pass.
    ``n_active``: the mask's active token count, which the caller has on the host already;
    only the sequence modes read the mask (its non-empty rows, and the counts of ``rows``)."""
    ones = torch.ones(rows.shape, dtype=dtype, device=rows.device)
    if agg == "token-mean":
        return ones / (max(n_active, 1) if norm is None else norm)
    if agg == "token-sum":
        return ones / (1.0 if norm is None else norm)
    u = mask.bool().view(torch.uint8)
    if norm is None or agg == "seq-mean-token-sum-norm":  # (the -norm mode comes without a normalizer)
        nonempty = u.amax(-1).sum(dtype=torch.int64).to(dtype).clamp(min=1)
        denom = nonempty * mask.shape[-1] if agg == "seq-mean-token-sum-norm" else nonempty
    else:
        denom = norm
    if agg == "seq-mean-token-mean":
        # the token counts of the rows hit only (at most every row once)
        hit, where = torch.unique(rows, return_inverse=True)
        ones = 1.0 / _row_counts(u[hit].view(torch.bool)).to(dtype).clamp(min=1)[where]
    return ones / denom


@torch.no_grad()
def _centred_product(advantages: torch.Tensor, log_prob: torch.Tensor, valid: torch.Tensor,
                     n: torch.Tensor) -> torch.Tensor:
    """(A - mean A) (lp - mean lp) per token, the means over the active tokens, in at least
    float32 (verl forms it in the input precision: bfloat16 rankings may differ at near-ties)."""
    dtype = torch.promote_types(torch.promote_types(advantages.dtype, log_prob.dtype), torch.float32)
    a = advantages.to(dtype).expand(valid.shape)
    lp = log_prob.detach().to(dtype)
    zero = torch.zeros((), dtype=dtype, device=a.device)
    n = n.to(dtype).clamp(min=1)
    mean_a = torch.where(valid, a, zero).sum() / n
    mean_lp = torch.where(valid, lp, zero).sum() / n
    return (a - mean_a) * (lp - mean_lp)


_COV_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _cov_native(adv: torch.Tensor, log_prob: torch.Tensor, old_log_prob: torch.Tensor, valid: torch.Tensor):
    """Arguments of the compiled covariance selection (csrc/cpu/cov.cpp) for CPU tensors, or
    None where the torch formulation runs (other devices, shapes the kernel does not take,
    meta/fake tensors). Log-probs of two dtypes are cast to the float32-or-wider type the
    torch path forms the covariance in, so both read the same values."""
    for name, t in (("advantages", adv), ("log_prob", log_prob), ("old_log_prob", old_log_prob),
                    ("response_mask", valid)):
        _validate.plain(name, t, allow_fake=True)
        if t.device.type != "cpu" or _validate.is_fake(t):
            return None
    if log_prob.dim() != 2 or valid.shape != log_prob.shape or old_log_prob.shape != log_prob.shape:
        return None
    if adv.dim() != 2 or any(s not in (1, d) for s, d in zip(adv.shape, log_prob.shape)):
        return None
    if not {adv.dtype, log_prob.dtype, old_log_prob.dtype} <= set(_COV_DTYPES):
        return None
    lp, old = log_prob.detach(), old_log_prob.detach()
    a = adv.detach()
    if lp.dtype != old.dtype:  # the kernel reads both log-probs as one type
        dtype = torch.promote_types(torch.promote_types(a.dtype, lp.dtype), torch.float32)
        lp, old = lp.to(dtype), old.to(dtype)
    a = a.expand(valid.shape)
    lp, old, mask = lp.contiguous(), old.contiguous(), valid.contiguous()
    B, T = lp.shape
    return B, T, a, lp, old, mask


def _cov_config(config: Any, name: str, default: float) -> float:
    if config is None or _cfg(config, "policy_loss") is None:
        raise ValueError("config (the actor config with policy_loss) is required")
    return float(_cfg(_cfg(config, "policy_loss"), name, default))


def compute_policy_loss_clip_cov(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                 response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                                 config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``"clip_cov"`` policy loss (Clip-Cov): PPO's max(-A r, -A clip(r, 1 - low, 1 + high))
    (no log-ratio clamp, no dual clip) with the gradient cut on a random subset of tokens.

    Candidates are the active, PPO-unclipped tokens whose covariance term
    (A - mean A)(lp - mean lp) (means over the active tokens) lies strictly inside
    (``policy_loss.clip_cov_lb``, ``clip_cov_ub``) (defaults 1, 5); max(1, int(clip_cov_ratio N))
    of them (N the active token count, ratio default 2e-4) are drawn by ``torch.randperm`` on the
    default CPU generator over the candidates in row-major order, exactly verl's draw (same seed,
    same tokens), and their loss is multiplied by 0. Times ``rollout_is_weights``, aggregated by
    ``loss_agg_mode`` on the fused kernel (the 0/1 factor times the rollout weights is its
    per-token ``weights``). Metrics: ``actor/pg_clipfrac`` the fraction of active
    tokens cut, ``actor/ppo_kl`` the mean of old - lp. Two host syncs (the two counts), as verl.
    """
    low, high = _clip_range(config)
    ratio = _cov_config(config, "clip_cov_ratio", 0.0002)
    ub = _cov_config(config, "clip_cov_ub", 5.0)
    lb = _cov_config(config, "clip_cov_lb", 1.0)
    if not ratio > 0:
        raise ValueError(f"policy_loss.clip_cov_ratio must be > 0, got {ratio}")
    agg, norm = _agg(loss_agg_mode, response_mask, _batch_info(config))
    valid = response_mask.bool()
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    native = _cov_native(adv, log_prob, old_log_prob, valid)
    with torch.no_grad():
        if native is not None:
            B, T, a, lp, old, mask = native
            cdtype = torch.promote_types(torch.promote_types(a.dtype, lp.dtype), torch.float32)
            out = torch.empty(B * T, dtype=torch.int64)
            n_host, n_cand, _ = core().losses.clip_cov_candidates(
                B, T, dtype_code(lp), dtype_code(a), ptr(a), a.stride(0), a.stride(1), ptr(lp), ptr(old),
                ptr(mask), lb, ub, low, high, ptr(out))
            candidate_index = out[:n_cand]
        else:
            n = valid.sum()
            cov = _centred_product(adv, log_prob, valid, n)
            cdtype = cov.dtype
            lr = log_prob.detach().to(cov.dtype) - old_log_prob.detach().to(cov.dtype)
            r = lr.exp()
            a = adv.to(cov.dtype)
            clipped = -a * r.clamp(1 - low, 1 + high) > -a * r
            candidate = (cov < ub) & (cov > lb) & valid & ~clipped
            n_host, n_cand = (int(x) for x in torch.stack([n, candidate.sum()]).tolist())
        # 0/1 are exact in every float type: without rollout weights the factor is stored like the
        # log-probs, so the kernel reads bfloat16 inputs as they are (no float32 copies of both)
        same = log_prob.dtype == old_log_prob.dtype and log_prob.dtype in _COV_DTYPES
        kdtype = log_prob.dtype if rollout_is_weights is None and same else cdtype
        keep = torch.ones(valid.shape, dtype=kdtype, device=valid.device)
        n_cut = 0
        if n_cand > 0:
            if native is not None:
                where = candidate_index
            else:
                where = torch.nonzero_static(candidate.reshape(-1), size=n_cand).reshape(-1)
            perm = torch.randperm(n_cand)  # verl's draw: default CPU generator
            n_cut = min(max(int(ratio * n_host), 1), n_cand)
            keep.view(-1)[where[perm[:n_cut].to(where.device)]] = 0.0
        factor = keep if rollout_is_weights is None else keep * rollout_is_weights.detach().to(cdtype)
    out = _reading(("approx_kl",), log_prob, old_log_prob, advantages, response_mask, objective="clip",
                   clip_low=low, clip_high=high, weights=factor, agg=agg, normalizer=norm)
    clipfrac = n_cut / n_host if n_host > 0 else 0.0
    values = _peers.scalars([clipfrac, out.metrics["approx_kl"]])
    return _peers.owned(out.loss), {"actor/pg_clipfrac": values[0], "actor/ppo_kl": values[1]}


class _GatheredAbsPenalty(torch.autograd.Function):
    """(log_prob, sum_i scale_i |log_prob[idx_i] - old_i|): log_prob passes through unchanged
    to the fused kernel, and the backward adds the penalty's gradient into the kernel's
    gradient at the k gathered tokens. A plain gather would make autograd build a dense zero
    gradient and add it to the kernel's: two [B, T] passes for k (~2e-4 N) tokens."""

    @staticmethod
    def forward(ctx, log_prob, idx, scale, old_k):
        diff = log_prob.detach().reshape(-1)[idx].to(scale.dtype) - old_k
        ctx.save_for_backward(idx, scale * torch.sign(diff))
        ctx.like = (log_prob.shape, log_prob.dtype, log_prob.device)
        return log_prob.view_as(log_prob), (diff.abs() * scale).sum()

    @staticmethod
    def backward(ctx, grad_lp, grad_penalty):
        idx, slope = ctx.saved_tensors
        if grad_lp is None:
            shape, dtype, device = ctx.like
            grad_lp = torch.zeros(shape, dtype=dtype, device=device)
        # The alias's only consumer is the fused kernel, whose backward hands over a buffer of
        # its own (a fresh copy under retain_graph): adding in place touches nothing shared.
        grad = grad_lp if grad_lp.is_contiguous() else grad_lp.contiguous()
        add = slope * grad_penalty.to(slope.dtype)
        grad.view(-1).index_add_(0, idx, add.to(grad.dtype))
        return grad, None, None, None


def compute_policy_loss_kl_cov(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                               response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                               config: Optional[Any] = None, rollout_is_weights: Optional[torch.Tensor] = None):
    """verl's ``"kl_cov"`` policy loss (KL-Cov): -A r on every token (no clip, no log-ratio
    clamp), plus ``policy_loss.ppo_kl_coef`` (default 1) |lp - old| on the
    max(1, int(kl_cov_ratio N)) active tokens (ratio default 2e-4, N active tokens) with the
    largest covariance term (A - mean A)(lp - mean lp), means over the active tokens; times
    ``rollout_is_weights``, aggregated by ``loss_agg_mode``.

    The -A r part runs on the fused kernel (PPO's objective with the clip range [0, inf), which
    never binds); the penalty is gathered on the k selected tokens only and scaled by each
    row's aggregation factor. ``actor/ppo_kl`` is verl's mean of |lp - old| over the active
    tokens. One host sync (the token count, for k), as verl; the top-k runs on the device
    (verl copies the batch to the CPU for it). For CPU tensors one compiled pass selects the
    k tokens without forming the [B, T] covariance wherever the k-th largest covariance is
    strictly above the (k+1)-th (the set is then verl's whatever its top-k algorithm); a tie
    there falls back to torch.topk on the covariance.
    """
    ratio = _cov_config(config, "kl_cov_ratio", 0.0002)
    coef = _cov_config(config, "ppo_kl_coef", 1.0)
    if not ratio > 0:
        raise ValueError(f"policy_loss.kl_cov_ratio must be > 0, got {ratio}")
    agg, norm = _agg(loss_agg_mode, response_mask, _batch_info(config))
    valid = response_mask.bool()
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    weights = None if rollout_is_weights is None else rollout_is_weights.detach()
    native = _cov_native(adv, log_prob, old_log_prob, valid)
    idx = None
    with torch.no_grad():
        if native is not None:
            B, T, a, lp, old, mask = native
            cdtype = torch.promote_types(torch.promote_types(a.dtype, lp.dtype), torch.float32)
            args = (B, T, dtype_code(lp), dtype_code(a), ptr(a), a.stride(0), a.stride(1), ptr(lp), ptr(old),
                    ptr(mask))
            # the k largest covariances without a [B, T] array, where they are unambiguous
            found = torch.empty(max(1, int(B * T * ratio) + 1), dtype=torch.int64)
            n_host, n_found, ppo_kl = core().losses.kl_cov_topk(*args, ratio, ptr(found))
            if n_found > 0:
                idx = found[:n_found]
                cov = None
            else:  # a tie at the k-th value (or NaN): torch.topk on the covariance decides
                cov = torch.empty((B, T), dtype=cdtype)
                n_host, _, ppo_kl = core().losses.kl_cov_covariance(*args, ptr(cov))
        else:
            n = valid.sum()
            cov = _centred_product(adv, log_prob, valid, n)
            d = (log_prob.detach().to(cov.dtype) - old_log_prob.detach().to(cov.dtype)).abs()
            ppo_kl = torch.where(valid, d, torch.zeros((), dtype=d.dtype, device=d.device)).sum() / n.clamp(min=1)
            n_host = int(n)
    penalty = None
    if n_host > 0:
        k = max(1, int(n_host * ratio))
        with torch.no_grad():
            if native is None:
                cov = torch.where(valid, cov, torch.full((), float("-inf"), dtype=cov.dtype, device=cov.device))
            if idx is None:
                idx = torch.topk(cov.reshape(-1), k, largest=True).indices
            cdtype = cov.dtype if cov is not None else cdtype
            T = valid.shape[-1]
            scale = _row_scale(agg, norm, response_mask, cdtype, idx // T, n_host) * coef
            if rollout_is_weights is not None:
                scale = scale * rollout_is_weights.detach().to(cdtype).reshape(-1)[idx]
            old_k = old_log_prob.detach().reshape(-1)[idx].to(cdtype)
        log_prob, penalty = _GatheredAbsPenalty.apply(log_prob, idx, scale, old_k)
    out = _reading((), log_prob, old_log_prob, advantages, response_mask, objective="clip", clip_low=1.0,
                   clip_high=float("inf"), weights=weights, agg=agg, normalizer=norm)
    loss = _peers.owned(out.loss)
    if penalty is not None:
        loss = loss + penalty.to(loss.dtype)
    return loss, {"actor/ppo_kl": _peers.scalars([ppo_kl])[0]}


POLICY_LOSS_REGISTRY: Dict[str, Callable] = {
    "vanilla": compute_policy_loss_vanilla, "gspo": compute_policy_loss_gspo, "cispo": compute_policy_loss_cispo,
    "gpg": compute_policy_loss_gpg, "dro": compute_policy_loss_dro, "bypass_mode": compute_policy_loss_bypass_mode,
    "sapo": compute_policy_loss_sapo, "geo_mean": compute_policy_loss_geo_mean,
    "dppo_tv": compute_policy_loss_dppo_tv, "dppo_kl": compute_policy_loss_dppo_kl,
    "clip_cov": compute_policy_loss_clip_cov, "kl_cov": compute_policy_loss_kl_cov,
}


def get_policy_loss_fn(name: str) -> Callable:
    """verl's registry lookup, for the losses rlkern provides."""
    if name not in POLICY_LOSS_REGISTRY:
        raise ValueError(f"Unsupported loss mode: {name}. Supported modes are: {list(POLICY_LOSS_REGISTRY)}")
    return POLICY_LOSS_REGISTRY[name]


# ------------------------------------------------------------------------------------------
# KL and value loss


class _StraightThrough(torch.autograd.Function):
    """Value of a KL estimate with the gradient of k2 = 0.5 (lp - ref)^2, i.e. lp - ref (verl's "+" modes)."""

    @staticmethod
    def forward(ctx, logprob, ref_logprob, value):
        ctx.save_for_backward(logprob, ref_logprob)
        return value

    @staticmethod
    def backward(ctx, grad):
        logprob, ref_logprob = ctx.saved_tensors
        g = grad * (logprob.to(grad.dtype) - ref_logprob.to(grad.dtype))
        return g.to(logprob.dtype), None, None


def kl_penalty_forward(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's ``kl_penalty_forward``: "kl"/"k1": lp - ref; "abs": |lp - ref|; "mse"/"k2": 0.5 (lp - ref)^2;
    "low_var_kl"/"k3": with d = ref - lp, clamp(exp(d) - d - 1, -10, 10) (verl also clamps d to
    [-20, 20] first, which never changes the result: |d| > 20 already gives more than 10)."""
    if kl_penalty in ("kl", "k1"):
        return _kl_penalty(logprob, ref_logprob, kind="k1")
    if kl_penalty == "abs":
        return (logprob.float() - ref_logprob.float()).abs() if logprob.dtype != torch.float64 \
            else (logprob - ref_logprob).abs()
    if kl_penalty in ("mse", "k2"):
        return _kl_penalty(logprob, ref_logprob, kind="k2")
    if kl_penalty in ("low_var_kl", "k3"):
        return _kl_penalty(logprob, ref_logprob, kind="k3", clamp=10.0)
    if kl_penalty == "full":
        raise NotImplementedError("kl_penalty='full' needs the full distributions")
    raise NotImplementedError(f"unknown kl_penalty {kl_penalty!r}")


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's ``kl_penalty``: per-token KL estimate of the policy from the reference, in float32
    (float64 for float64 inputs).

    Modes as :func:`kl_penalty_forward`; a trailing "+" (``"k3+"``, ``"low_var_kl+"``, ``"kl+"``,
    ``"k1+"``, ``"abs+"``, ``"mse+"``, ``"k2+"``) keeps the value and takes the gradient of k2,
    lp - ref (verl's straight-through estimator of the KL gradient).
    """
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    if not kl_penalty.endswith("+") or base in ("mse", "k2"):
        return kl_penalty_forward(logprob, ref_logprob, base)
    with torch.no_grad():
        value = kl_penalty_forward(logprob.detach(), ref_logprob.detach(), base)
    if not logprob.requires_grad:
        return value
    return _StraightThrough.apply(logprob, ref_logprob.detach(), value)


def compute_value_loss(vpreds: torch.Tensor, returns: torch.Tensor, values: torch.Tensor,
                       response_mask: torch.Tensor, cliprange_value: float, loss_agg_mode: str = "token-mean",
                       dp_size: int = 1, batch_num_tokens: Optional[int] = None,
                       global_batch_size: Optional[int] = None,
                       loss_scale_factor: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_value_loss``: 0.5 agg(max((v - R)^2, (clip(v, v_old +- c) - R)^2)) over the
    global batch, and the clip fraction (from the kernel's pass)."""
    agg, norm = _peers.global_agg(_check_mode(loss_agg_mode), response_mask, dp_size, batch_num_tokens,
                                  global_batch_size, loss_scale_factor)
    out = _value_loss(vpreds, values, returns, response_mask, clip=cliprange_value, agg=agg, normalizer=norm)
    return _peers.owned(out.loss), out.metrics["clip_frac"]


def compute_rewards(token_level_scores, old_log_prob, ref_log_prob, kl_ratio):
    """verl's ``compute_rewards``: scores - kl_ratio (old - ref)."""
    return token_level_scores - (old_log_prob - ref_log_prob) * kl_ratio


# ------------------------------------------------------------------------------------------
# advantage estimators


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """verl's ``masked_whiten``: (x - mean) / sqrt(var + 1e-8) over the mask, unbiased variance
    (:func:`rlkern.masked_whiten`'s defaults); at least two active positions are needed
    (ValueError otherwise, as verl)."""
    from ..whiten import masked_whiten as _whiten

    return _whiten(values, mask, shift_mean=shift_mean)


def _next_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """For each position, the index of the first valid position at or after it (T when none)."""
    T = mask.shape[-1]
    idx = torch.arange(T, device=mask.device).expand_as(mask)
    cand = torch.where(mask, idx, torch.full_like(idx, T))
    return cand.flip(-1).cummin(-1).values.flip(-1)


@torch.no_grad()
def compute_gae_advantage_return(token_level_rewards: torch.Tensor, values: torch.Tensor,
                                 response_mask: torch.Tensor, gamma, lam) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_gae_advantage_return``: token-level GAE skipping masked positions
    (``rlkern.masked_gae``), then advantages whitened over the mask. Returns ``(advantages, returns)``.

    At a masked position verl carries the running GAE over unchanged, so its advantage is the one
    of the next valid token (0 after the last) and returns = advantages + values; both are
    reproduced, and whitening is applied to every position as verl does.
    """
    m = response_mask.bool()
    adv, _ = masked_gae(token_level_rewards, values, m, gamma=float(gamma), lam=float(lam))
    nxt = _next_valid_index(m)
    adv = torch.cat([adv, torch.zeros_like(adv[..., :1])], -1).gather(-1, nxt)
    returns = adv + values
    return masked_whiten(adv, m), returns


def _scores(token_level_rewards: torch.Tensor) -> torch.Tensor:
    return token_level_rewards.sum(-1)


@torch.no_grad()
def compute_grpo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                   index: np.ndarray, epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                   config: Optional[Any] = None, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's ``compute_grpo_outcome_advantage``: per uid group (``index``, any order),
    (score - mean) / (std + epsilon) with the unbiased std, or only centred without
    ``norm_adv_by_std_in_grpo`` (Dr.GRPO); a group of one has mean 0 and std 1 (its raw
    score passes through). Equal groups of two or more run on ``rlkern.group_advantages``.
    """
    scores = _scores(token_level_rewards)
    gid, counts = _peers.group_ids(index, scores.shape[0], scores.device)
    scale = "group" if norm_adv_by_std_in_grpo else "none"
    cmin, cmax = int(counts.min()), int(counts.max())
    if cmin >= 2 and cmin == cmax:
        order = torch.argsort(gid, stable=True)
        adv = torch.empty_like(scores)
        adv[order] = group_advantages(scores[order], cmin, estimator="grpo", scale=scale, eps=epsilon).to(scores.dtype)
    else:
        G = int(counts.shape[0])
        cnt = counts.to(scores.dtype)
        mean = _peers.group_sum(scores, gid, G) / cnt
        var = _peers.group_sum((scores - mean[gid]) ** 2, gid, G) / (cnt - 1).clamp(min=1)
        single = counts == 1
        mean = torch.where(single, torch.zeros_like(mean), mean)
        std = torch.where(single, torch.ones_like(var), var.sqrt())
        adv = scores - mean[gid]
        if norm_adv_by_std_in_grpo:
            adv = adv / (std[gid] + epsilon)
    adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def compute_grpo_vectorized_outcome_advantage(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                                              norm_adv_by_std_in_grpo: bool = True, config=None, **kwargs):
    """verl's ``grpo_vectorized``: the same advantages as :func:`compute_grpo_outcome_advantage`
    (verl's vectorised version also gives a group of one mean 0 and std 1)."""
    return compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon,
                                          norm_adv_by_std_in_grpo)


def _group_mean(scores: torch.Tensor, index) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean of each row's group (0 for a group of one), the group ids and the group sizes per row."""
    gid, counts = _peers.group_ids(index, scores.shape[0], scores.device)
    mean = _peers.group_sum(scores, gid, int(counts.shape[0])) / counts.to(scores.dtype)
    mean = torch.where(counts == 1, torch.zeros_like(mean), mean)
    return mean[gid], gid, counts[gid]


@torch.no_grad()
def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                                  config: Optional[Any] = None, **kwargs):
    """verl's ``reinforce_plus_plus``: discounted returns over the active tokens (masked spans are
    skipped, ``rlkern.masked_gae`` with zero values and lambda 1), whitened over the mask.
    ``config.gamma`` is the discount. Returns ``(advantages, returns)``."""
    if config is None:
        raise ValueError("config is required (config.gamma)")
    gamma = float(_cfg(config, "gamma"))
    m = response_mask.bool()
    returns, _ = masked_gae(token_level_rewards, torch.zeros_like(token_level_rewards), m, gamma=gamma, lam=1.0)
    returns = returns.to(token_level_rewards.dtype)
    return masked_whiten(returns, m) * response_mask, returns


@torch.no_grad()
def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards: torch.Tensor,
                                                           response_mask: torch.Tensor, index,
                                                           epsilon: float = 1e-6, config=None, **kwargs):
    """verl's ``reinforce_plus_plus_baseline``: score minus its uid group's mean (0 for a group of
    one), broadcast over the mask, whitened over the mask."""
    scores = _scores(token_level_rewards)
    mean, _, _ = _group_mean(scores, index)
    adv = (scores - mean).unsqueeze(-1) * response_mask
    adv = masked_whiten(adv, response_mask.bool()) * response_mask
    return adv, adv


@torch.no_grad()
def compute_remax_outcome_advantage(token_level_rewards: torch.Tensor, reward_baselines: torch.Tensor,
                                    response_mask: torch.Tensor, config=None, **kwargs):
    """verl's ``remax``: returns = reverse cumulative sum of the masked rewards; advantages =
    returns - baseline on the active tokens."""
    returns = (token_level_rewards * response_mask).flip(-1).cumsum(-1).flip(-1)
    return returns - reward_baselines.unsqueeze(-1) * response_mask, returns


@torch.no_grad()
def compute_rloo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
                                   epsilon: float = 1e-6, config=None, **kwargs):
    """verl's ``rloo``: n / (n - 1) (score - group mean) = score - mean of the others; a group of
    one keeps its raw score. Equal groups of two or more run on ``rlkern.group_advantages``."""
    scores = _scores(token_level_rewards)
    gid, counts = _peers.group_ids(index, scores.shape[0], scores.device)
    cmin, cmax = int(counts.min()), int(counts.max())
    if cmin >= 2 and cmin == cmax:
        order = torch.argsort(gid, stable=True)
        adv = torch.empty_like(scores)
        adv[order] = group_advantages(scores[order], cmin, estimator="rloo").to(scores.dtype)
    else:
        n = counts[gid].to(scores.dtype)
        total = _peers.group_sum(scores, gid, int(counts.shape[0]))[gid]
        adv = torch.where(n > 1, (n * scores - total) / (n - 1).clamp(min=1), scores)
    adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


@torch.no_grad()
def compute_rloo_vectorized_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                              index, epsilon: float = 1e-6, config=None, **kwargs):
    """verl's ``rloo_vectorized``: as ``rloo`` except that a group of one gets 0."""
    scores = _scores(token_level_rewards)
    gid, counts = _peers.group_ids(index, scores.shape[0], scores.device)
    n = counts[gid].to(scores.dtype)
    total = _peers.group_sum(scores, gid, int(counts.shape[0]))[gid]
    adv = ((n * scores - total) / (n - 1).clamp(min=1)) * (n > 1)
    adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


@torch.no_grad()
def compute_opo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
                                  epsilon: float = 1e-6, config=None, **kwargs):
    """verl's ``opo``: score minus the length-weighted group mean sum(len s) / sum(len) (0 for a
    group of one), len the number of active tokens."""
    scores = _scores(token_level_rewards)
    lengths = response_mask.sum(-1).to(scores.dtype)
    gid, counts = _peers.group_ids(index, scores.shape[0], scores.device)
    G = int(counts.shape[0])
    bsl = _peers.group_sum(lengths * scores, gid, G) / _peers.group_sum(lengths, gid, G)
    bsl = torch.where(counts == 1, torch.zeros_like(bsl), bsl)
    adv = (scores - bsl[gid]).unsqueeze(-1) * response_mask
    return adv, adv


@torch.no_grad()
def compute_gpg_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
                                  epsilon: float = 1e-6, f_norm: float = 1.0, alpha: float = 1.0, config=None,
                                  **kwargs):
    """verl's ``gpg``: alpha (score - group mean) / f_norm with alpha = B / (number of non-zero
    scores) (verl overrides the ``alpha`` argument so), group of one centred on 0."""
    scores = _scores(token_level_rewards)
    alpha = scores.shape[0] / torch.count_nonzero(scores).clamp(min=1)
    mean, _, _ = _group_mean(scores, index)
    adv = (alpha * (scores - mean) / f_norm).to(scores.dtype).unsqueeze(-1) * response_mask
    return adv, adv


@torch.no_grad()
def compute_grpo_passk_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index,
                                         epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                         config=None, **kwargs):
    """verl's ``grpo_passk``: only the best response of each group gets r_max - r_second, divided by
    (group std + epsilon) when ``config.norm_adv_by_std_in_grpo`` (default True). Groups need two
    responses or more (ValueError otherwise, as verl). With tied maxima the advantage is 0, so
    which of them holds it does not matter."""
    if config is None:
        raise ValueError("config is required (norm_adv_by_std_in_grpo)")
    norm = config.get("norm_adv_by_std_in_grpo", True) if hasattr(config, "get") else \
        _cfg(config, "norm_adv_by_std_in_grpo", True)
    scores = _scores(token_level_rewards)
    gid, counts = _peers.group_ids(index, scores.shape[0], scores.device)
    if int(counts.min()) < 2:
        raise ValueError("Pass@k requires at least 2 samples per group.")
    G = int(counts.shape[0])
    # sort by (group, score descending): the first row of each group is its best
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(gid[order], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    best, second = order[starts], order[starts + 1]
    gap = scores[best] - scores[second]
    if norm:
        cnt = counts.to(scores.dtype)
        mean = _peers.group_sum(scores, gid, G) / cnt
        std = (_peers.group_sum((scores - mean[gid]) ** 2, gid, G) / (cnt - 1)).sqrt()
        gap = gap / (std + epsilon)
    adv = torch.zeros_like(scores)
    adv[best] = gap.to(scores.dtype)
    adv = adv.unsqueeze(-1) * response_mask
    return adv, adv


def compute_gdpo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                   index: np.ndarray, epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                   config: Optional[Any] = None, non_tensor_batch: Optional[dict] = None,
                                   batch: Optional[dict] = None, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's GDPO: each reward component k normalised within its uid group as GRPO does,
    A = whiten(sum_k w_k A_k) over the response mask (``rlkern.masked_whiten``), times the mask.

    The components are ``config.gdpo_reward_keys`` read from ``non_tensor_batch`` (one score
    per sample, placed on the last response token as verl places it), weighted by
    ``config.gdpo_reward_weights`` (1 each by default); without a config and both batches,
    the single component is ``token_level_rewards``."""
    from ..whiten import masked_whiten

    scores, weights = [token_level_rewards], None
    if config is not None and non_tensor_batch is not None and batch is not None:
        keys = config.get("gdpo_reward_keys", None)
        if not keys:
            raise ValueError("GDPO needs algorithm.gdpo_reward_keys: the reward components compute_score returns")
        missing = [k for k in keys if k not in non_tensor_batch]
        if missing:
            raise ValueError(f"GDPO reward keys {missing} are not in non_tensor_batch "
                             f"(it has {sorted(non_tensor_batch)})")
        prompt_length = batch["prompts"].size(1)
        last = batch["attention_mask"][:, prompt_length:].sum(dim=1) - 1
        rows = torch.arange(response_mask.shape[0], device=response_mask.device)
        scores = []
        for key in keys:
            placed = torch.zeros(response_mask.shape, dtype=torch.float32, device=response_mask.device)
            placed[rows, last] = torch.as_tensor(np.asarray(non_tensor_batch[key], dtype=np.float32),
                                                 device=response_mask.device)
            scores.append(placed)
        weights = config.get("gdpo_reward_weights", None)
    total = None
    for k, component in enumerate(scores):
        adv, _ = compute_grpo_outcome_advantage(component, response_mask, index, epsilon, norm_adv_by_std_in_grpo,
                                                config)
        term = adv * (1.0 if weights is None else float(weights[k]))
        total = term if total is None else total + term
    advantages = masked_whiten(total, response_mask) * response_mask
    return advantages, advantages


def _otb_parts(token_level_rewards, m, old_log_probs, sum_pi_squared, rollout_is_weights):
    """(reward-to-go G, cumulative path-variance proxy W) of the optimal token baseline."""
    B, T = m.shape
    no_done = torch.zeros((B, T), dtype=torch.bool, device=m.device)
    returns = discounted_returns(token_level_rewards * m, no_done, 1.0).to(token_level_rewards.dtype)
    w = 1 - 2 * torch.exp(old_log_probs) + sum_pi_squared
    if rollout_is_weights is not None:
        w = w * rollout_is_weights ** 2
    return returns, torch.cumsum(w * m, dim=-1)


def _otb_baseline(returns, W, m, index, handle_zero_tail: bool, epsilon: float) -> torch.Tensor:
    """B_t = sum over the uid group of m G_t W_t / (sum of m W_t + epsilon), per row; 0 for a
    group of one, and (``handle_zero_tail``) 0 beyond the second-longest length on a group's
    unique longest row."""
    B, T = m.shape
    gid, counts = _peers.group_ids(index, B, m.device)
    G = int(counts.shape[0])
    numerator = _peers.group_sum(returns * W * m, gid, G)
    denominator = _peers.group_sum(W * m, gid, G) + epsilon
    baseline = (numerator / denominator)[gid]
    baseline = torch.where((counts[gid] > 1)[:, None], baseline, torch.zeros_like(baseline))
    if handle_zero_tail:
        length = m.sum(-1)
        none = torch.full((G,), -1.0, dtype=length.dtype, device=m.device)
        longest = none.scatter_reduce(0, gid, length, "amax")
        at_max = length == longest[gid]
        n_at_max = _peers.group_sum(at_max.long(), gid, G)
        second = none.scatter_reduce(0, gid, torch.where(at_max, torch.full_like(length, -1.0), length), "amax")
        alone = at_max & (n_at_max[gid] == 1) & (counts[gid] > 1)
        tail = torch.arange(T, device=m.device)[None, :] >= second[gid][:, None]
        baseline = torch.where(alone[:, None] & tail, torch.zeros_like(baseline), baseline)
    return baseline


def compute_optimal_token_baseline_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                             index: np.ndarray, old_log_probs: torch.Tensor,
                                             sum_pi_squared: torch.Tensor,
                                             rollout_is_weights: Optional[torch.Tensor] = None,
                                             handle_zero_tail: bool = True, epsilon: float = 1e-8,
                                             **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's optimal token baseline (OTB): with G_t the reward-to-go (``rlkern.discounted_returns``
    at gamma 1) and W_t = sum_{j<=t} m_j w_j, w_j = (1 - 2 pi_j + sum pi^2) [* rho_j^2 with
    ``rollout_is_weights``], the baseline of step t in a uid group is
    B_t = sum_i m G_t W_t / (sum_i m W_t + epsilon) and A_t = (G_t - B_t) m; a group of one
    has no baseline. ``handle_zero_tail``: where one trajectory is the group's longest, its
    baseline is 0 beyond the second-longest one's length. Returns (A, G). All groups at once
    (verl loops over them in Python)."""
    with torch.no_grad():
        m = response_mask.to(token_level_rewards.dtype)
        returns, W = _otb_parts(token_level_rewards, m, old_log_probs, sum_pi_squared, rollout_is_weights)
        baseline = _otb_baseline(returns, W, m, index, handle_zero_tail, epsilon)
        return (returns - baseline) * m, returns


def compute_multi_turn_optimal_token_baseline_advantage(token_level_rewards: torch.Tensor,
                                                        response_mask: torch.Tensor, index: np.ndarray,
                                                        old_log_probs: torch.Tensor, sum_pi_squared: torch.Tensor,
                                                        rollout_is_weights: Optional[torch.Tensor] = None,
                                                        handle_zero_tail: bool = True, epsilon: float = 1e-8,
                                                        **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """verl's multi-turn OTB (``tir_optimal_token_baseline``): the optimal token baseline with
    steps counted over each row's ACTIVE tokens only (tool-output holes in the mask are
    skipped, so the k-th generated token of every trajectory shares a baseline), and rows
    without an active token left out of their group. Returns (A, G)."""
    with torch.no_grad():
        m = response_mask.to(token_level_rewards.dtype)
        returns, W = _otb_parts(token_level_rewards, m, old_log_probs, sum_pi_squared, rollout_is_weights)
        active = response_mask.bool()
        length = active.sum(-1)
        L = int(length.max()) if length.numel() else 0
        rows = torch.nonzero(length > 0).flatten()
        advantages = torch.zeros_like(returns)
        if L == 0 or rows.numel() == 0:
            return advantages, returns
        # Compact each row's active tokens to the left: position k is its k-th active token.
        rank = torch.cumsum(active.long(), dim=-1) - 1
        slot = torch.where(active, rank, torch.full_like(rank, L))  # inactive tokens go to a spare column

        def compact(x):
            return torch.zeros((x.shape[0], L + 1), dtype=x.dtype, device=x.device).scatter_(1, slot, x)[:, :L]

        cm = (torch.arange(L, device=m.device)[None, :] < length[:, None]).to(m.dtype)
        keep = rows.cpu().numpy()
        sub_index = np.asarray(index)[keep] if not isinstance(index, torch.Tensor) else index[rows]
        cR, cW, cm = compact(returns)[rows], compact(W)[rows], cm[rows]
        baseline = _otb_baseline(cR, cW, cm, sub_index, handle_zero_tail, epsilon)
        compact_adv = torch.zeros((returns.shape[0], L), dtype=returns.dtype, device=m.device)
        compact_adv[rows] = cR - baseline
        advantages = compact_adv.gather(1, slot.clamp(max=L - 1)) * m
        return advantages, returns


ADV_ESTIMATOR_REGISTRY: Dict[str, Callable] = {
    "gae": compute_gae_advantage_return, "grpo": compute_grpo_outcome_advantage,
    "grpo_vectorized": compute_grpo_vectorized_outcome_advantage,
    "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "remax": compute_remax_outcome_advantage, "rloo": compute_rloo_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage, "opo": compute_opo_outcome_advantage,
    "gpg": compute_gpg_outcome_advantage, "grpo_passk": compute_grpo_passk_outcome_advantage,
    "gdpo": compute_gdpo_outcome_advantage, "optimal_token_baseline": compute_optimal_token_baseline_advantage,
    "tir_optimal_token_baseline": compute_multi_turn_optimal_token_baseline_advantage,
}


def get_adv_estimator_fn(name_or_enum) -> Callable:
    """verl's estimator lookup, for the estimators rlkern provides."""
    name = getattr(name_or_enum, "value", name_or_enum)
    if name not in ADV_ESTIMATOR_REGISTRY:
        raise ValueError(f"Unknown advantage estimator simply: {name}")
    return ADV_ESTIMATOR_REGISTRY[name]


# ------------------------------------------------------------------------------------------
# KL controllers


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


# ------------------------------------------------------------------------------------------
# rollout correction (verl/trainer/ppo/rollout_corr_helper.py)


def compute_rollout_correction_and_rejection_mask(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor,
                                                  response_mask: torch.Tensor, rollout_is: Optional[str] = None,
                                                  rollout_is_threshold: Any = 2.0,
                                                  rollout_is_batch_normalize: bool = False,
                                                  rollout_rs: Optional[str] = None, rollout_rs_threshold: Any = None):
    """verl's rollout correction: IS weights, rejection mask and metrics, with log rho =
    old_log_prob - rollout_log_prob (training over rollout policy).

    IS weights (``rollout_is`` "token": rho_t; "sequence": exp(sum_t log rho_t) on every token;
    log-ratios clamped to +-20, 0 at masked tokens): a number or "u" as ``rollout_is_threshold``
    truncates them at u (TIS); "l_u" zeroes those outside [l, u] (IcePop).
    ``rollout_is_batch_normalize`` divides them by their mean over the active tokens ("token") or
    the non-empty sequences ("sequence"), over all ranks when torch.distributed is initialised,
    unless that mean is <= 1e-8. Rejection sampling (``rollout_rs``, comma-separated options
    that must all pass): token_k1/k2/k3 per token, seq_sum_*/seq_mean_*/seq_max_* per sequence,
    with k1 = -log rho inside [log l, log u] ("l_u" or "u" meaning [1/u, u]), k2 = (log rho)^2 / 2
    and k3 = rho - 1 - log rho at most their threshold; a rejected token (or every token of a
    rejected sequence) leaves the response mask.

    Returns ``(weights, modified_response_mask, metrics)`` as verl: the weights wrapped in verl's
    ``DataProto`` under "rollout_is_weights" (None without ``rollout_is``), the mask in the input's
    dtype and verl's metrics (``rollout_corr/rollout_is_*``, ``rollout_corr/rollout_rs_*``, the
    off-policy diagnostics) as Python floats, all read back with one device sync (verl syncs for
    each). A mask without an active token raises ValueError, as verl.
    """
    weights, mask, metrics = _rc.correction_and_rejection(
        old_log_prob, rollout_log_prob, response_mask, rollout_is, rollout_is_threshold, rollout_is_batch_normalize,
        rollout_rs, rollout_rs_threshold)
    return _rc.wrap_weights(weights), mask, metrics


def compute_rollout_correction_weights(log_ratio: torch.Tensor, response_mask: torch.Tensor, rollout_is: str = "token",
                                       rollout_is_threshold: Any = 2.0, rollout_is_batch_normalize: bool = False):
    """verl's IS weights alone (see :func:`compute_rollout_correction_and_rejection_mask`):
    ``(weights [B, T], metrics)`` with the ``rollout_is_*`` metric names (no prefix)."""
    return _rc.correction_weights(log_ratio, response_mask, rollout_is, rollout_is_threshold,
                                  rollout_is_batch_normalize)


def compute_rollout_rejection_mask(log_ratio: torch.Tensor, response_mask: torch.Tensor,
                                   rollout_rs: str = "token_k1", rollout_rs_threshold: Any = None):
    """verl's rejection sampling alone (see :func:`compute_rollout_correction_and_rejection_mask`):
    ``(modified_response_mask, metrics)`` with the ``rollout_rs_*`` metric names (no prefix)."""
    return _rc.rejection(log_ratio, response_mask, rollout_rs, rollout_rs_threshold)


def compute_offpolicy_metrics(old_log_prob: torch.Tensor, rollout_log_prob: Optional[torch.Tensor],
                              response_mask: torch.Tensor) -> Dict[str, float]:
    """verl's off-policy diagnostics (no prefix): training_ppl, training_log_ppl and, with
    ``rollout_log_prob``, kl, k3_kl, rollout_ppl, rollout_log_ppl, log_ppl_diff (mean, abs,
    max, min), ppl_ratio, chi2_token, chi2_seq."""
    return _rc.offpolicy(old_log_prob, rollout_log_prob, response_mask)


def compute_rollout_corr_metrics_from_logprobs(log_prob: torch.Tensor, rollout_log_prob: torch.Tensor,
                                               response_mask: torch.Tensor) -> Dict[str, float]:
    """verl's actor-side diagnostics: :func:`compute_offpolicy_metrics` with "rollout_corr/"."""
    return {f"rollout_corr/{k}": v for k, v in compute_offpolicy_metrics(log_prob, rollout_log_prob,
                                                                         response_mask).items()}


def compute_rollout_correction_and_add_to_batch(batch: Any, rollout_corr_config: Any):
    """verl's trainer step: reads ``old_log_probs``, ``rollout_log_probs`` and ``response_mask``
    from the ``DataProto`` batch and the options from ``rollout_corr_config`` (verl's
    ``RolloutCorrectionConfig``), replaces ``response_mask`` by the rejection-masked one and adds
    ``rollout_is_weights`` when IS is on. Returns ``(batch, metrics)``."""
    get = rollout_corr_config.get
    weights, mask, metrics = compute_rollout_correction_and_rejection_mask(
        old_log_prob=batch.batch["old_log_probs"], rollout_log_prob=batch.batch["rollout_log_probs"],
        response_mask=batch.batch["response_mask"], rollout_is=get("rollout_is", None),
        rollout_is_threshold=get("rollout_is_threshold", 2.0),
        rollout_is_batch_normalize=get("rollout_is_batch_normalize", False), rollout_rs=get("rollout_rs", None),
        rollout_rs_threshold=get("rollout_rs_threshold", None))
    batch.batch["response_mask"] = mask
    if weights is not None:
        batch = batch.union(weights)
    return batch, metrics


_ROLLOUT_FUNCTIONS = {
    "compute_rollout_correction_and_rejection_mask": compute_rollout_correction_and_rejection_mask,
    "compute_rollout_correction_weights": compute_rollout_correction_weights,
    "compute_rollout_rejection_mask": compute_rollout_rejection_mask,
    "compute_offpolicy_metrics": compute_offpolicy_metrics,
    "compute_rollout_corr_metrics_from_logprobs": compute_rollout_corr_metrics_from_logprobs,
    "compute_rollout_correction_and_add_to_batch": compute_rollout_correction_and_add_to_batch,
}


# ------------------------------------------------------------------------------------------
# install into verl

# module attributes verl's trainers call directly (by module attribute or imported name)
_FUNCTIONS = {"kl_penalty": kl_penalty, "compute_value_loss": compute_value_loss,
              "compute_gae_advantage_return": compute_gae_advantage_return,
              "compute_grpo_outcome_advantage": compute_grpo_outcome_advantage}
_IMPORTERS = ("verl.workers.utils.losses", "verl.trainer.distillation.losses", "verl.trainer.ppo.ray_trainer")
_saved: Optional[Dict[str, Any]] = None


def install() -> None:
    """Run verl on rlkern: registers rlkern's policy losses under verl's names in
    ``POLICY_LOSS_REGISTRY`` (vanilla, gspo, cispo, gpg, dro, bypass_mode, sapo, geo_mean, dppo_tv,
    dppo_kl, clip_cov, kl_cov) and its advantage
    estimators in ``ADV_ESTIMATOR_REGISTRY`` (gae, grpo, grpo_vectorized, reinforce_plus_plus,
    reinforce_plus_plus_baseline, remax, rloo, rloo_vectorized, opo, gpg, grpo_passk, gdpo, optimal_token_baseline,
    tir_optimal_token_baseline), and
    replaces ``core_algos.kl_penalty``, ``compute_value_loss``, ``compute_gae_advantage_return``
    and ``compute_grpo_outcome_advantage`` (also where verl's loss modules imported them by name)
    and the rollout-correction functions of ``rollout_corr_helper`` (wherever a loaded verl module
    holds them: the trainers' ``compute_rollout_correction_and_add_to_batch`` then runs rlkern's).
    An unchanged verl config then runs on rlkern. Idempotent; :func:`uninstall` restores verl's.
    """
    global _saved
    import sys

    from verl.trainer.ppo import core_algos as ca
    from verl.trainer.ppo import rollout_corr_helper as rch

    if _saved is not None:
        return
    saved: Dict[str, Any] = {"policy": {}, "adv": {}, "attrs": []}
    for name, fn in POLICY_LOSS_REGISTRY.items():
        saved["policy"][name] = ca.POLICY_LOSS_REGISTRY.get(name)
        ca.POLICY_LOSS_REGISTRY[name] = fn
    for name, fn in ADV_ESTIMATOR_REGISTRY.items():
        saved["adv"][name] = ca.ADV_ESTIMATOR_REGISTRY.get(name)
        ca.ADV_ESTIMATOR_REGISTRY[name] = fn
    modules = [ca] + [sys.modules[n] for n in _IMPORTERS if n in sys.modules]
    for mod in modules:
        for name, fn in _FUNCTIONS.items():
            if hasattr(mod, name):
                saved["attrs"].append((mod, name, getattr(mod, name)))
                setattr(mod, name, fn)
    # verl's trainers import the rollout-correction helpers at call time from their module, or by
    # name at import (v1/trainer_base.py): swap the module's and every loaded holder's reference
    originals = {name: getattr(rch, name) for name in _ROLLOUT_FUNCTIONS}
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "verl" or mod_name.startswith("verl.")):
            continue
        for name, fn in _ROLLOUT_FUNCTIONS.items():
            if getattr(mod, name, None) is originals[name]:
                saved["attrs"].append((mod, name, originals[name]))
                setattr(mod, name, fn)
    _saved = saved


def uninstall() -> None:
    """Undo :func:`install`: verl's own registry entries and functions are back."""
    global _saved
    from verl.trainer.ppo import core_algos as ca

    if _saved is None:
        return
    for registry, key in ((ca.POLICY_LOSS_REGISTRY, "policy"), (ca.ADV_ESTIMATOR_REGISTRY, "adv")):
        for name, fn in _saved[key].items():
            if fn is None:
                registry.pop(name, None)
            else:
                registry[name] = fn
    for mod, name, fn in reversed(_saved["attrs"]):
        setattr(mod, name, fn)
    _saved = None


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return _saved is not None
