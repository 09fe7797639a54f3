"""Fused policy, value and preference losses.

Every loss here makes one pass over its inputs that yields the loss and the gradient with
respect to the current-policy inputs at once (C++ on CPU tensors, Triton on CUDA tensors);
the autograd Function keeps only those gradient buffers and scales them by the incoming
gradient in backward. ``rlkern.reference.losses`` holds the plain-PyTorch specification.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch
from torch.autograd.function import once_differentiable

from . import _backend, _dtensor, _validate
from ._kernel import compute_dtype, core, dtype_code, ptr
from .reference import losses as _ref
from .reference.kl import clamp_bounds
from .reference.losses import (AGG_MODES, DPO_LOSS_TYPES, OBJECTIVES, POLICY_OPTIONS, LossOutput,
                               PolicyLossConfig, entropy_threshold, parse_policy_options)

__all__ = ["policy_loss", "value_loss", "dpo_loss", "bradley_terry_loss", "LossOutput", "PolicyLossConfig",
           "POLICY_OPTIONS", "AGG_MODES"]

_AGG_CODES = {name: i for i, name in enumerate(AGG_MODES)}
_OBJECTIVE_CODES = {name: i for i, name in enumerate(OBJECTIVES)}
_KL_CODES = {"k1": 0, "k2": 1, "k3": 2}
_DPO_CODES = {name: i for i, name in enumerate(DPO_LOSS_TYPES)}

# Order of the totals the kernels return (csrc/cpu/losses.cpp, enum Stat).
_STATS = ("active", "loss_sum", "clip_low", "clip_high", "ratio_sum", "approx_kl_sum", "kl_sum", "entropy_sum",
          "dual_clip", "objective_sum", "objective_row_sum")


# ---------------------------------------------------------------------------------------
# helpers


def _storage(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """One storage dtype for the kernel: the common dtype when all agree, else the arithmetic one."""
    present = [t for t in tensors if t is not None]
    first = present[0].dtype
    if all(t.dtype == first for t in present):
        return first
    return compute_dtype(*present)


def _policy_dtypes(logp, old_logp, advantages, tensors) -> "tuple[torch.dtype, torch.dtype]":
    """(storage dtype of the [B, T] inputs, arithmetic dtype). The kernels read advantages in
    the arithmetic type of the storage type, so a float64 input anywhere (advantages
    included) makes the storage float64 too."""
    acc = compute_dtype(logp, old_logp, advantages, *tensors.values())
    if acc == torch.float64:
        return torch.float64, acc
    return _storage(logp, old_logp, *tensors.values()), acc


def _as(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if t.dtype == dtype and t.is_contiguous():
        return t  # only its data pointer is passed on; no detach or cast needed
    return t.detach().to(dtype).contiguous()


def _mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    """The mask as contiguous uint8 (a view when it already is bool)."""
    m = mask if mask.dtype == torch.bool else mask != 0
    return m.contiguous().view(torch.uint8)


def _agg_denominator(agg: str, normalizer: Optional[float], active, nonempty):
    """The final denominator of the aggregation (see ``reference.losses.aggregate``): the
    kernels already weight each row (1 / n_i for seq-mean-token-mean, 1 / T for
    seq-mean-token-sum-norm); ``active`` is the active token count and ``nonempty`` the
    number of sequences with an active token (numbers or device tensors)."""
    if normalizer is not None:
        return float(normalizer)
    if agg == "token-sum":
        return 1.0
    count = active if agg == "token-mean" else nonempty
    return count.clamp(min=1) if isinstance(count, torch.Tensor) else float(max(count, 1))


def _row_scale(agg: str, T: int) -> float:
    """The fixed per-row weight of the kernels (seq-mean-token-mean's 1 / n_i is counted there)."""
    return 1.0 / T if agg == "seq-mean-token-sum-norm" else 1.0


def _check_normalizer(normalizer) -> Optional[float]:
    if normalizer is None:
        return None
    return _validate.positive("normalizer", normalizer)


# ---------------------------------------------------------------------------------------
# policy_loss


def _keep_graph() -> bool:
    """Whether the running backward retains the graph (retain_graph=True)."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True  # unknown: keep the buffers, as retaining would need


class _PolicyLossFunction(torch.autograd.Function):
    """Forward runs the fused kernel (``run``), which writes the finished gradients in the
    inputs' storage dtype; they are the only state kept for backward. Backward hands them
    to autograd scaled by the incoming gradient, in place unless the graph is retained, so
    no second gradient-sized buffer is allocated."""

    @staticmethod
    def forward(ctx, logp, entropy, run, metrics_out):
        loss, metrics, grad_logp, grad_entropy = run()
        metrics_out.update(metrics)
        ctx.buffers = [grad_logp, grad_entropy]
        ctx.dtypes = (logp.dtype, None if entropy is None else entropy.dtype)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.buffers is None:
            raise RuntimeError("policy_loss: backward through this graph has already run; "
                               "pass retain_graph=True to the first backward to run it again")
        keep = _keep_graph()
        unit = grad_out.device.type == "cpu" and grad_out.item() == 1.0
        grads = []
        for i, buf in enumerate(ctx.buffers):
            if buf is None or not ctx.needs_input_grad[i]:
                grads.append(None)
                continue
            if keep:
                g = buf.clone() if unit else buf * grad_out
            else:
                g = buf if unit else buf.mul_(grad_out)
            grads.append(g.to(ctx.dtypes[i]))
        if not keep:
            ctx.buffers = None
        return grads[0], grads[1], None, None


def _check_policy_inputs(logp, old_logp, advantages, mask, cfg: PolicyLossConfig, tensors) -> None:
    _validate.tensor("logp", logp, ndim=2, floating=True)
    B, T = logp.shape
    if B == 0 or T == 0:
        raise ValueError(f"logp must have at least one sequence and one token, got shape {tuple(logp.shape)}")
    _validate.tensor("old_logp", old_logp, floating=True)
    _validate.same_shape("old_logp", old_logp, logp.shape, "logp")
    _validate.tensor("advantages", advantages, ndim=(1, 2), floating=True)
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}) to match logp, "
                         f"got {tuple(advantages.shape)}")
    _validate.mask("mask", mask, logp.shape)
    for name in ("ref_logp", "rollout_logp", "entropy"):
        t = tensors[name]
        if t is not None:
            _validate.tensor(name, t, floating=True)
            _validate.same_shape(name, t, logp.shape, "logp")
    _validate.same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, **tensors)
    if cfg.tis_cap is not None and tensors["rollout_logp"] is None:
        raise ValueError("tis_cap needs rollout_logp (the rollout engine's log-probs)")
    if cfg.entropy_top_fraction is not None and tensors["entropy"] is None:
        raise ValueError("entropy_top_fraction needs entropy (per-token entropies)")
    if cfg.entropy_coef != 0 and tensors["entropy"] is None:
        raise ValueError("entropy_coef needs entropy (per-token entropies)")
    if cfg.kl_coef != 0 and tensors["ref_logp"] is None:
        raise ValueError("kl_coef needs ref_logp (the reference policy's log-probs)")


def _policy_params(cfg: PolicyLossConfig, B: int, T: int):
    p = core().losses.PolicyParams()
    p.B, p.T = B, T
    p.objective = _OBJECTIVE_CODES[cfg.objective]
    p.seq_level = cfg.level == "sequence"
    p.clip_lo, p.clip_hi = cfg.clip_range
    p.has_dual = cfg.dual_clip is not None
    p.dual_clip = float(cfg.dual_clip or 0.0)
    p.has_ratio_cap = cfg.ratio_cap is not None
    p.ratio_cap = float(cfg.ratio_cap or 0.0)
    lo, hi = clamp_bounds("log_ratio_clamp", cfg.log_ratio_clamp)
    p.has_lr_lo, p.lr_lo = lo is not None, float(lo or 0.0)
    p.has_lr_hi, p.lr_hi = hi is not None, float(hi or 0.0)
    p.kl_coef = float(cfg.kl_coef)
    p.kl_kind = _KL_CODES[cfg.kl_kind]
    lo, hi = clamp_bounds("kl_clamp", cfg.kl_clamp)
    p.has_kl_lo, p.kl_lo = lo is not None, float(lo or 0.0)
    p.has_kl_hi, p.kl_hi = hi is not None, float(hi or 0.0)
    p.kl_correction = bool(cfg.kl_is_correction)
    p.has_tis = cfg.tis_cap is not None
    p.tis_cap = float(cfg.tis_cap or 0.0)
    p.tis_seq = cfg.tis_level == "sequence"
    p.tis_mask_mode = cfg.tis_mode == "mask"
    p.has_off = cfg.off_policy_threshold is not None
    p.off_threshold = float(cfg.off_policy_threshold or 0.0)
    p.entropy_coef = float(cfg.entropy_coef)
    p.agg = _AGG_CODES[cfg.agg]
    p.clip_low = float(cfg.clip_low)
    p.clip_high = float(cfg.clip_low if cfg.clip_high is None else cfg.clip_high)
    p.sapo_tau_pos = float(cfg.sapo_temperature_pos)
    p.sapo_tau_neg = float(cfg.sapo_temperature_neg)
    p.vespo_k_pos, p.vespo_lambda_pos = float(cfg.vespo_k_pos), float(cfg.vespo_lambda_pos)
    p.vespo_k_neg, p.vespo_lambda_neg = float(cfg.vespo_k_neg), float(cfg.vespo_lambda_neg)
    return p


def _metrics_from_totals(totals, cfg: PolicyLossConfig, has_ref: bool, has_entropy: bool,
                         nonempty=1.0) -> Dict[str, torch.Tensor]:
    """Metric tensors from the kernel's totals (a 1-D tensor, or a list of floats);
    ``nonempty`` is the number of sequences with an active token."""
    t = dict(zip(_STATS, totals))
    denom = t["active"].clamp(min=1) if isinstance(t["active"], torch.Tensor) else max(t["active"], 1.0)
    nonempty = nonempty.clamp(min=1) if isinstance(nonempty, torch.Tensor) else max(nonempty, 1.0)
    metrics = {
        "clip_frac_low": t["clip_low"] / denom,
        "clip_frac_high": t["clip_high"] / denom,
        "ratio_mean": t["ratio_sum"] / denom,
        "approx_kl": t["approx_kl_sum"] / denom,
    }
    if has_ref:
        metrics["kl"] = t["kl_sum"] / denom
    if has_entropy:
        metrics["entropy"] = t["entropy_sum"] / denom
    if cfg.objective == "clip" and cfg.dual_clip is not None:
        metrics["dual_clip_frac"] = t["dual_clip"] / denom
    if cfg.objective == "vespo":
        metrics["phi_mean"] = t["objective_sum"] / denom
        metrics["phi_seq_mean"] = t["objective_row_sum"] / nonempty
    elif cfg.objective in ("dppo_tv", "dppo_kl"):
        metrics["trunc_frac"] = t["objective_sum"] / denom
    return metrics


def _policy_cpu(logp, old_logp, advantages, mask, cfg: PolicyLossConfig, tensors):
    B, T = logp.shape
    ref_logp, rollout_logp, entropy = tensors["ref_logp"], tensors["rollout_logp"], tensors["entropy"]
    storage, acc = _policy_dtypes(logp, old_logp, advantages, tensors)
    device = logp.device
    want_entropy_grad = entropy is not None and entropy.requires_grad and cfg.entropy_coef != 0

    def run():
        lp = _as(logp, storage)
        old = _as(old_logp, storage)
        ref = _as(ref_logp, storage)
        roll = _as(rollout_logp, storage)
        ent = _as(entropy, storage)
        adv = _as(advantages, acc)
        m = _mask_bytes(mask)
        p = _policy_params(cfg, B, T)
        p.dtype = dtype_code(lp)
        p.logp, p.old_logp, p.advantages, p.mask = ptr(lp), ptr(old), ptr(adv), ptr(m)
        p.ref_logp = ptr(ref) if ref is not None else 0
        p.rollout_logp = ptr(roll) if roll is not None else 0
        p.entropy = ptr(ent) if ent is not None else 0
        p.adv_per_token = adv.dim() == 2
        if cfg.entropy_top_fraction is not None:
            p.has_entropy_select = True
            p.entropy_threshold = float(entropy_threshold(ent, mask != 0, cfg.entropy_top_fraction))
        # The final denominator is known before the pass, except token-mean's token count
        # and the seq-* modes' count of non-empty sequences, which the kernel counts first.
        p.scale_by_active = cfg.agg == "token-mean" and cfg.normalizer is None
        p.scale_by_rows = cfg.agg.startswith("seq-") and cfg.normalizer is None
        if not (p.scale_by_active or p.scale_by_rows):
            p.grad_scale = 1.0 / _agg_denominator(cfg.agg, cfg.normalizer, 0, 0)
        grad_logp = torch.empty((B, T), dtype=storage, device=device)
        grad_entropy = torch.empty((B, T), dtype=storage, device=device) if want_entropy_grad else None
        p.grad_logp = ptr(grad_logp)
        p.grad_entropy = ptr(grad_entropy) if grad_entropy is not None else 0
        totals = core().losses.policy_loss(p)
        denom = _agg_denominator(cfg.agg, cfg.normalizer, totals[0], totals[len(_STATS)])
        named = _metrics_from_totals(totals, cfg, ref is not None, ent is not None, totals[len(_STATS)])
        # The metrics are views of one small tensor (one allocation, not six); the loss is a
        # tensor of its own, since trainers update it in place (verl: policy_loss += kl_loss * coef)
        # and autograd refuses in-place updates of a view made inside a Function.
        loss = torch.tensor(totals[1] / denom, dtype=acc, device=device)
        metrics = torch.tensor(list(named.values()), dtype=acc, device=device).unbind()
        return loss, dict(zip(named, metrics)), grad_logp, grad_entropy

    return run


def _policy_triton(logp, old_logp, advantages, mask, cfg: PolicyLossConfig, tensors):
    from .triton import losses as triton_losses

    def run():
        return triton_losses.policy_loss(logp.detach(), old_logp.detach(), advantages.detach(), mask, cfg,
                                         {k: (None if v is None else v.detach()) for k, v in tensors.items()},
                                         want_entropy_grad=tensors["entropy"] is not None
                                         and tensors["entropy"].requires_grad and cfg.entropy_coef != 0)

    return run


@_dtensor.token_loss(mask_arg=3)
def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                **options) -> LossOutput:
    """The PPO family of policy-gradient losses in one fused pass.

    With r the importance ratio exp(logp - old_logp) per token (``level="token"``) or
    exp(masked mean over the sequence of logp - old_logp) shared by its tokens
    (``level="sequence"``, GSPO), A the advantage and m the mask, the per-token loss is

        l_t = w_t * pg_t + kl_coef * kl_t [* r_t] - entropy_coef * H_t

    where pg_t is, by ``objective``:

    - ``"clip"``: max(-A r', -A clip(r, 1 - clip_low, 1 + clip_high)), r' = min(r, ratio_cap);
      with ``dual_clip`` c and A < 0, min(that, -A c);
    - ``"cispo"``: -sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * logp (sg = detached);
    - ``"reinforce"``: -A * logp;
    - ``"sapo"``: -f(r) A with the soft gate f(r) = sigmoid(tau (r - 1)) 4 / tau, tau =
      ``sapo_temperature_pos`` where A > 0 else ``sapo_temperature_neg`` (TRL 1.16 and verl
      0.9.1 define it identically; verl also clamps the log-ratio to 20 and forces
      seq-mean-token-mean: pass ``log_ratio_clamp=20.0, agg="seq-mean-token-mean"``);
    - ``"geo_mean"`` (GMPO, verl): one term per sequence, -mean(A) exp(mean_t y_t) with
      y_t = sgn(A_t) min(sgn(A_t) x_t, sgn(A_t) clamp(x_t, -clip_low, clip_high)), x_t the
      token log-ratio: clip_low/clip_high bound the LOG-ratio here. Every active token carries
      the sequence's term, so ``agg="seq-mean-token-mean"`` gives the mean over sequences
      (verl divides by the batch size: add ``normalizer=B``). Takes level="token" and only
      per-sequence weights (``tis_level="sequence"``);
    - ``"vespo"`` (TRL): -sg(phi) A logp, phi = exp(lambda + k log w - lambda w) of the
      sequence weight log w = clamp(sum_t clamp(x_t, +-20), log 1e-8, 20), (k, lambda) =
      (``vespo_k_pos``, ``vespo_lambda_pos``) where A >= 0 else the ``_neg`` pair. With
      ``tis_cap`` the truncated (or masked) importance weights against ``rollout_logp`` enter
      log w (each log clamped to [log 1e-8, 20]) instead of multiplying the loss, as TRL does;
    - ``"dppo_tv"``, ``"dppo_kl"`` (verl): -A sg(min(r, ratio_cap)) logp on the tokens inside
      the trust region: for A > 0, p - p_old <= clip_high (TV) or binary KL <= clip_high or
      p <= p_old (KL); for A <= 0, p - p_old >= -clip_low or binary KL <= clip_low or
      p >= p_old; p = exp(logp). verl passes its clip_ratio as the bounds and clip_ratio_c as
      ``ratio_cap``.

    LUSPO (TRL 1.16 ``loss_type="luspo"``) is the ``"clip"`` objective with its own
    aggregation: ``level="sequence", agg="seq-mean-token-sum", normalizer=B``.

    w_t (detached, default 1) is the product of the truncated importance weight against
    ``rollout_logp`` (``tis_cap``), the off-policy sequence mask (``off_policy_threshold``)
    and the high-entropy token selection (``entropy_top_fraction``); kl_t is
    ``rlkern.kl.kl_penalty(logp, ref_logp, kl_kind, kl_clamp)``, multiplied by r when
    ``kl_is_correction``. The loss is ``agg`` over the active tokens, as verl 0.9.1's
    ``agg_loss``: "token-mean" sum(l m) / sum(m); "token-sum" sum(l m);
    "seq-mean-token-mean" the mean over sequences of each one's token mean;
    "seq-mean-token-sum" the mean over sequences of each one's token sum;
    "seq-mean-token-sum-norm" the mean over sequences of (token sum / T), T the padded
    length (Dr.GRPO). The sequence means run over the NON-EMPTY sequences only: a sequence
    without an active token is left out of the count; a batch without any active token gives
    0. ``normalizer`` replaces the final denominator (the token count, 1, or the number of
    non-empty sequences): a global token or sequence count for data-parallel ranks and
    gradient accumulation, or Dr.GRPO's constant.

    Options (defaults): objective="clip", level="token", clip_low=0.2, clip_high=clip_low,
    dual_clip=None, ratio_cap=None (TRL's ``delta``), log_ratio_clamp=None (verl clamps the
    log-ratio to 20, its GSPO to (None, 10)), ref_logp=None, kl_coef=0.0, kl_kind="k3",
    kl_clamp=None, kl_is_correction=False, rollout_logp=None, tis_cap=None, tis_level="token",
    tis_mode="truncate" (or "mask": weights above the cap become 0), off_policy_threshold=None,
    entropy=None, entropy_coef=0.0, entropy_top_fraction=None, agg="token-mean",
    normalizer=None. Each is documented on :class:`PolicyLossConfig`. An unknown option name
    raises TypeError naming it.

    Shapes: ``logp``, ``old_logp``, ``mask`` and the optional per-token tensors are [B, T];
    ``advantages`` is [B] (one per sequence) or [B, T]. float32/bfloat16/float16 inputs
    compute in float32, float64 in float64; the loss and metrics are float32 (float64).

    Gradients flow to ``logp`` and ``entropy`` only; old, reference and rollout log-probs
    and advantages are constants. The sequence-level ratio's gradient reaches every active
    token of the sequence (d r / d logp_t = r / n).

    NaN/inf policy: masked positions are never read into the result (they may hold NaN)
    and get zero gradient. Sequences without active tokens contribute nothing and are not
    counted by the seq-* modes. Non-finite values at active positions propagate into the
    loss (NaN stays NaN through every clamp); a term whose coefficient is 0 (kl_coef,
    entropy_coef) is left out, not multiplied by 0, so an infinite KL or entropy that only
    feeds a metric leaves the loss finite.

    Memory: the forward pass writes the finished gradient (in the inputs' dtype) and keeps
    nothing else; backward hands that buffer to autograd (scaled in place by the incoming
    gradient) unless ``retain_graph=True``, in which case it returns a scaled copy.

    Returns ``LossOutput(loss, metrics)``; ``metrics`` (detached, masked means over the
    active tokens, computed in the same pass): ``clip_frac_low`` (A < 0 and r < 1 -
    clip_low), ``clip_frac_high`` (A > 0 and r > 1 + clip_high), ``ratio_mean``,
    ``approx_kl`` (mean of old_logp - logp), ``kl`` (when ``ref_logp`` is given),
    ``entropy`` (when ``entropy`` is given) and ``dual_clip_frac`` (with ``dual_clip``).
    For "geo_mean" ``clip_frac_low``/``clip_frac_high`` count the tokens whose log-ratio lies
    outside [-clip_low, clip_high] with A < 0 / A > 0 and ``ratio_mean`` is the mean of the
    sequence ratios over the tokens; for the DPPO objectives they count the tokens outside
    the trust region with A <= 0 / A > 0 (their sum is verl's pg_clipfrac), and
    ``trunc_frac`` the tokens inside it whose ratio exceeds ``ratio_cap``; "vespo" adds
    ``phi_mean`` (token mean of phi) and ``phi_seq_mean`` (mean over the non-empty sequences
    of each one's token mean of phi: TRL's vespo/phi_seq_mean with one advantage per
    sequence).

    Objective options (defaults): sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
    vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0.
    """
    cfg, tensors = parse_policy_options(options)
    _check_policy_inputs(logp, old_logp, advantages, mask, cfg, tensors)
    backend = _backend.select(logp.device)
    if backend == "reference":
        return _ref.policy_loss(logp, old_logp, advantages, mask, **options)
    if backend == "cpu":
        run = _policy_cpu(logp, old_logp, advantages, mask, cfg, tensors)
    else:
        run = _policy_triton(logp, old_logp, advantages, mask, cfg, tensors)
    metrics: Dict[str, torch.Tensor] = {}
    entropy = tensors["entropy"]
    loss = _PolicyLossFunction.apply(logp, entropy, run, metrics)
    return LossOutput(loss, metrics)


# ---------------------------------------------------------------------------------------
# value_loss


class _SavedGradFunction(torch.autograd.Function):
    """Generic wrapper: ``run()`` returns (loss, grads...); grads are saved, scaled in backward.

    ``inputs`` are the differentiable tensors in the order of the grads; ``run`` may also
    fill ``extra`` with detached outputs (metrics).
    """

    @staticmethod
    def forward(ctx, run, extra, *inputs):
        loss, grads = run()
        ctx.save_for_backward(*grads)
        ctx.dtypes = [t.dtype for t in inputs]
        ctx.extra = extra
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grads = ctx.saved_tensors
        out = [None, None]
        for i, (g, dt) in enumerate(zip(grads, ctx.dtypes)):
            out.append((g * grad_out).to(dt) if ctx.needs_input_grad[i + 2] else None)
        return tuple(out)


@_dtensor.token_loss(mask_arg=3)
def value_loss(values: torch.Tensor, old_values: Optional[torch.Tensor], returns: torch.Tensor,
               mask: Optional[torch.Tensor] = None, clip: Optional[float] = None, agg: str = "token-mean",
               normalizer: Optional[float] = None) -> LossOutput:
    """Clipped value loss of PPO (verl's and TRL's formulation).

        loss = 0.5 * agg(max((v - R)^2, (clip(v, v_old - clip, v_old + clip) - R)^2))

    and without ``clip`` 0.5 * agg((v - R)^2). ``values``, ``old_values``, ``returns`` and
    ``mask`` are [B, T] (or [N], treated as one sequence); ``mask=None`` means every
    position is active. ``agg``/``normalizer`` as in :func:`policy_loss` (verl 0.9.1's
    aggregation: the seq-* modes average over the non-empty sequences). Differentiable in
    ``values`` only. Masked positions may hold NaN and get zero gradient; NaN at an active
    position (old values included, with ``clip``) makes the loss NaN.

    metrics: ``clip_frac`` (active tokens where the clipped error is the larger; 0 without
    clip), ``value_mean``.
    """
    _validate.tensor("values", values, ndim=(1, 2), floating=True)
    shape = values.shape
    if values.numel() == 0:
        raise ValueError("values must not be empty")
    _validate.tensor("returns", returns, floating=True)
    _validate.same_shape("returns", returns, shape, "values")
    if clip is not None:
        clip = _validate.positive("clip", clip, allow_zero=True)
        if old_values is None:
            raise ValueError("old_values is needed when clip is given")
    if old_values is not None:
        _validate.tensor("old_values", old_values, floating=True)
        _validate.same_shape("old_values", old_values, shape, "values")
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool, device=values.device)
    _validate.mask("mask", mask, shape)
    _validate.choice("agg", agg, AGG_MODES)
    normalizer = _check_normalizer(normalizer)
    _validate.same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    if values.dim() == 1:
        values, returns, mask = values.unsqueeze(0), returns.unsqueeze(0), mask.unsqueeze(0)
        old_values = None if old_values is None else old_values.unsqueeze(0)
    backend = _backend.select(values.device)
    if backend == "reference":
        return _ref.value_loss(values, old_values, returns, mask, clip, agg, normalizer)
    B, T = values.shape
    acc = compute_dtype(values, old_values, returns)
    storage = _storage(values, old_values, returns)
    metrics: Dict[str, torch.Tensor] = {}

    def run():
        v = _as(values, storage)
        R = _as(returns, storage)
        vo = _as(old_values, storage) if old_values is not None else v
        m = _mask_bytes(mask)
        grad = torch.empty((B, T), dtype=acc, device=v.device)
        if backend == "cpu":
            totals = core().losses.value_loss(B, T, dtype_code(v), ptr(v), ptr(vo), ptr(R), ptr(m), clip is not None,
                                              float(clip or 0.0), _AGG_CODES[agg], ptr(grad))
            totals = torch.tensor(totals, dtype=acc, device=v.device)
        else:
            from .triton import losses as triton_losses

            totals = triton_losses.value_loss(v, vo, R, m, clip, _AGG_CODES[agg], _row_scale(agg, T), grad)
        active = totals[0].clamp(min=1)
        denom = _agg_denominator(agg, normalizer, totals[0], totals[4])
        metrics["clip_frac"] = totals[2] / active
        metrics["value_mean"] = totals[3] / active
        grad.mul_(1.0 / denom)
        return totals[1] / denom, (grad,)

    loss = _SavedGradFunction.apply(run, None, values)
    return LossOutput(loss, metrics)


# ---------------------------------------------------------------------------------------
# dpo_loss and bradley_terry_loss


def _check_pairs(**tensors) -> int:
    B = None
    first = None
    for name, t in tensors.items():
        _validate.tensor(name, t, ndim=1, floating=True)
        if B is None:
            B, first = t.shape[0], name
        else:
            _validate.same_shape(name, t, (B,), first)
    if B == 0:
        raise ValueError(f"{first} must not be empty")
    _validate.same_device(**tensors)
    return B


@_dtensor.pair_loss
def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> LossOutput:
    """Direct preference optimisation over sequence log-probs [B] (TRL's DPOTrainer).

    With z = (chosen - ref_chosen) - (rejected - ref_rejected), the per-pair loss is

    - ``"sigmoid"``: -(1 - ls) log sigmoid(beta z) - ls log sigmoid(-beta z) (ls = label_smoothing, cDPO);
    - ``"ipo"``: (z - 1 / (2 beta))^2;
    - ``"hinge"``: relu(1 - beta z) (SLiC);

    and the loss is its batch mean. Differentiable in ``chosen_logp`` and ``rejected_logp``;
    the reference log-probs are constants.

    metrics: ``chosen_rewards`` = beta (chosen - ref_chosen) and ``rejected_rewards`` (the
    implicit rewards, [B], detached), ``reward_margin`` (mean of their difference),
    ``reward_accuracy`` (fraction with chosen reward > rejected reward).
    """
    B = _check_pairs(chosen_logp=chosen_logp, rejected_logp=rejected_logp, ref_chosen_logp=ref_chosen_logp,
                     ref_rejected_logp=ref_rejected_logp)
    beta = _validate.positive("beta", beta)
    _validate.choice("loss_type", loss_type, DPO_LOSS_TYPES)
    label_smoothing = _validate.unit_interval("label_smoothing", label_smoothing)
    backend = _backend.select(chosen_logp.device)
    if backend == "reference":
        return _ref.dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, loss_type,
                             label_smoothing)
    inputs = (chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    acc = compute_dtype(*inputs)
    storage = _storage(*inputs)
    metrics: Dict[str, torch.Tensor] = {}

    def run():
        c, r, rc, rr = (_as(t, storage) for t in inputs)
        grad_z = torch.empty(B, dtype=acc, device=c.device)
        chosen_rewards = torch.empty(B, dtype=acc, device=c.device)
        rejected_rewards = torch.empty(B, dtype=acc, device=c.device)
        if backend == "cpu":
            totals = core().losses.dpo_loss(B, dtype_code(c), ptr(c), ptr(r), ptr(rc), ptr(rr), beta,
                                            _DPO_CODES[loss_type], label_smoothing, ptr(grad_z),
                                            ptr(chosen_rewards), ptr(rejected_rewards))
            totals = torch.tensor(totals, dtype=acc, device=c.device)
        else:
            from .triton import losses as triton_losses

            totals = triton_losses.dpo_loss(c, r, rc, rr, beta, _DPO_CODES[loss_type], label_smoothing, grad_z,
                                            chosen_rewards, rejected_rewards)
        metrics.update(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                       reward_margin=totals[1] / B, reward_accuracy=totals[2] / B)
        grad_z.mul_(1.0 / B)
        return totals[0] / B, (grad_z, -grad_z)

    loss = _SavedGradFunction.apply(run, None, chosen_logp, rejected_logp)
    return LossOutput(loss, metrics)


@_dtensor.pair_loss
def bradley_terry_loss(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor,
                       margin: Union[None, float, torch.Tensor] = None) -> LossOutput:
    """Bradley-Terry reward-model loss: mean over pairs of -log sigmoid(chosen - rejected - margin).

    ``chosen_reward`` and ``rejected_reward`` are [B]; ``margin`` is None, a number or a [B]
    tensor (TRL's RewardTrainer margin column). Differentiable in both rewards.

    metrics: ``accuracy`` (fraction with chosen > rejected), ``reward_margin`` (mean of
    chosen - rejected).
    """
    B = _check_pairs(chosen_reward=chosen_reward, rejected_reward=rejected_reward)
    margin_tensor = None
    margin_scalar = 0.0
    if isinstance(margin, torch.Tensor):
        _validate.tensor("margin", margin, floating=True)
        if margin.dim() == 0:
            margin = margin.expand(B)
        _validate.same_shape("margin", margin, (B,), "chosen_reward")
        _validate.same_device(chosen_reward=chosen_reward, margin=margin)
        margin_tensor = margin
    elif margin is not None:
        try:
            margin_scalar = float(margin)
        except (TypeError, ValueError):
            raise TypeError(f"margin must be None, a number or a tensor, got {margin!r}") from None
    backend = _backend.select(chosen_reward.device)
    if backend == "reference":
        return _ref.bradley_terry_loss(chosen_reward, rejected_reward,
                                       margin_tensor if margin_tensor is not None else (margin_scalar if margin is not None else None))
    inputs = (chosen_reward, rejected_reward, margin_tensor)
    acc = compute_dtype(*[t for t in inputs if t is not None])
    storage = _storage(*inputs)
    metrics: Dict[str, torch.Tensor] = {}

    def run():
        c, r = _as(chosen_reward, storage), _as(rejected_reward, storage)
        mg = _as(margin_tensor, storage)
        grad = torch.empty(B, dtype=acc, device=c.device)
        if backend == "cpu":
            totals = core().losses.bradley_terry_loss(B, dtype_code(c), ptr(c), ptr(r), ptr(mg) if mg is not None else 0,
                                                      margin_scalar, ptr(grad))
            totals = torch.tensor(totals, dtype=acc, device=c.device)
        else:
            from .triton import losses as triton_losses

            totals = triton_losses.bradley_terry_loss(c, r, mg, margin_scalar, grad)
        metrics.update(accuracy=totals[2] / B, reward_margin=totals[1] / B)
        grad.mul_(1.0 / B)
        return totals[0] / B, (grad, -grad)

    loss = _SavedGradFunction.apply(run, None, chosen_reward, rejected_reward)
    return LossOutput(loss, metrics)
