"""Fused policy, value and preference losses.

Every loss here makes one pass over its inputs that yields the loss and the gradient with
respect to the current-policy inputs at once (C++ on CPU tensors, Triton on CUDA tensors);
the autograd Function keeps only those gradient buffers and scales them by the incoming
gradient in backward. ``rlkern.reference.losses`` holds the plain-PyTorch specification.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import operator
from typing import Dict, List, Optional, Tuple, Union

import torch

from . import _backend, _dtensor, _validate
from ._kernel import compute_dtype, core, dtype_code, ptr
from .kl import _first_order, _narrow_native
from .reference import losses as _ref
from .reference.kl import Clamp, clamp_bounds
from .reference.losses import (AGG_MODES, DPO_LOSS_TYPES, OBJECTIVES, POLICY_OPTIONS, LossOutput,
                               PolicyLossConfig, entropy_threshold, parse_policy_options)

Tensor = torch.Tensor

__all__ = ["policy_loss", "value_loss", "dpo_loss", "bradley_terry_loss", "LossOutput", "PolicyLossConfig",
           "POLICY_OPTIONS", "AGG_MODES"]

_AGG_CODES = {name: i for i, name in enumerate(AGG_MODES)}
_OBJECTIVE_CODES = {name: i for i, name in enumerate(OBJECTIVES)}
_KL_CODES = {"k1": 0, "k2": 1, "k3": 2}
_DPO_CODES = {name: i for i, name in enumerate(DPO_LOSS_TYPES)}

# Order of the totals the kernels return (csrc/cpu/losses.cpp, enum Stat).
_STATS = ("active", "loss_sum", "clip_low", "clip_high", "ratio_sum", "approx_kl_sum", "kl_sum", "entropy_sum",
          "dual_clip", "objective_sum", "objective_row_sum", "approx_kl_clamped_sum", "tis_outside", "rollout_kl_sum")
# The totals each metric of _metrics_from_totals is made from (the active-token count and the
# loss sum are always computed).
_METRIC_TOTALS = {
    "clip_frac_low": ("clip_low",), "clip_frac_high": ("clip_high",), "ratio_mean": ("ratio_sum",),
    "approx_kl": ("approx_kl_sum",), "approx_kl_clamped": ("approx_kl_clamped_sum",), "kl": ("kl_sum",),
    "rollout_kl": ("rollout_kl_sum",), "entropy": ("entropy_sum",), "dual_clip_frac": ("dual_clip",),
    "phi_mean": ("objective_sum",), "phi_seq_mean": ("objective_row_sum",), "trunc_frac": ("objective_sum",),
    "clip_frac": ("objective_sum",), "tis_clip_frac": ("tis_outside",),
}


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


def _input_storage(storage: torch.dtype, acc: torch.dtype, logp, old_logp, tensors,
                   narrow=(torch.bfloat16,)) -> "tuple[torch.dtype, bool]":
    """(storage dtype the kernels read the [B, T] inputs in, whether the weights stay
    float32 beside them). float32 weights next to narrower log-probs make the common storage
    float32 (``_policy_dtypes``), which would copy every log-prob to float32: the kernels
    instead read those inputs as they are and the weights as float32. The gradients keep
    ``storage`` (float32 there), so the result is the same bit for bit. ``narrow``: the
    storage types this holds for; the C++ kernel's is bfloat16 alone (float16 rows take its
    scalar body, whose sums run in another order than float32's vector body)."""
    weights = tensors["weights"]
    if weights is None or weights.dtype != torch.float32 or storage != torch.float32 or acc != torch.float32:
        return storage, False
    rest = _storage(logp, old_logp, *(t for k, t in tensors.items() if k != "weights"))
    if rest in narrow:
        return rest, True
    return storage, False


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


def _agg_denominator(agg: str, normalizer, active, nonempty):
    """The final denominator of the aggregation (see ``reference.losses.aggregate``): the
    kernels already weight each row (1 / n_i for seq-mean-token-mean, 1 / T for
    seq-mean-token-sum-norm); ``active`` is the active token count and ``nonempty`` the
    number of sequences with an active token (numbers or device tensors). A tensor
    ``normalizer`` is returned as it is: it stays on its device."""
    if normalizer is not None:
        return normalizer if isinstance(normalizer, torch.Tensor) else float(normalizer)
    if agg == "token-sum":
        return 1.0
    count = active if agg == "token-mean" else nonempty
    return count.clamp(min=1) if isinstance(count, torch.Tensor) else float(max(count, 1))


def _row_scale(agg: str, T: int) -> float:
    """The fixed per-row weight of the kernels (seq-mean-token-mean's 1 / n_i is counted there)."""
    return 1.0 / T if agg == "seq-mean-token-sum-norm" else 1.0


def _check_normalizer(normalizer, like: Tensor, traced: bool = False):
    """A positive number, or a 0-d real tensor on ``like``'s device (or the CPU). A tensor's
    value is never read (that would be a host synchronisation on a GPU): a non-positive or
    NaN tensor normalizer gives an inf, NaN or negated loss instead of an error."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        _validate.tensor("normalizer", normalizer, allow_fake=traced)
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"normalizer must be a real number, got dtype {normalizer.dtype}")
        if normalizer.device != like.device and normalizer.device.type != "cpu":
            raise ValueError(f"normalizer is on {normalizer.device} but the inputs are on {like.device}")
        return normalizer
    return _validate.positive("normalizer", normalizer)


def _traced(*tensors: Optional[Tensor]) -> bool:
    """Whether a call must go through its custom op: under torch.compile/export, inside a
    torch.func transform, with a FakeTensor or meta input or an active FakeTensorMode, none
    of which the eager autograd.Functions can serve. (Anything else that is not a plain
    tensor also says True: the op's checks then reject it with the right error.)"""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return True
    for t in tensors:
        if t is not None and (type(t) not in _validate.PLAIN_TYPES or t.is_meta):
            return True
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def _op_backend(device: torch.device) -> str:
    """The kernel a custom op runs. The reference never runs inside an op (its autograd
    would not be recorded): the public functions call it directly when it is asked for, so
    here it only arises for a direct torch.ops call, which gets the kernels of the device."""
    backend = _backend.select(device)
    if backend == "reference":
        backend = "cpu" if device.type == "cpu" else "triton"
    return backend


def _func_transform_error(op: str, e: RuntimeError) -> RuntimeError:
    return RuntimeError(f"rlkern::{op} cannot be differentiated by torch.func.grad/vjp/jacrev (a functorch "
                        "transform): its backward scales the gradient its forward wrote; torch.func.vmap "
                        f"works, and so do loss.backward() and torch.autograd.grad ({e})")


def _call_op(op: str, fn, *args):
    try:
        return fn(*args)
    except RuntimeError as e:
        if "functorch" not in str(e) or not torch._C._are_functorch_transforms_active():
            raise
        raise _func_transform_error(op, e) from e


# ---------------------------------------------------------------------------------------
# policy_loss


# The metrics the running policy_loss call's caller reads (None: all), set by
# _policy_loss_reading around the call.
_READING: contextvars.ContextVar[Optional[frozenset]] = contextvars.ContextVar("rlkern_policy_reading", default=None)


def _policy_loss_reading(metrics: Tuple[str, ...], *args, **kwargs) -> LossOutput:
    """``policy_loss(*args, **kwargs)`` for a caller that reads only the metrics named in
    ``metrics`` (the drop-in adapters, which return a fixed few): the CPU kernel then skips
    the per-token work of every other total (for REINFORCE without ratio metrics, the
    ratio's exp too) and ``LossOutput.metrics`` holds only those it computed. Other
    backends and traced calls compute, and return, all of them."""
    token = _READING.set(frozenset(metrics))
    try:
        return policy_loss(*args, **kwargs)
    finally:
        _READING.reset(token)


@functools.lru_cache(maxsize=64)
def _want_bits(metrics: Optional[frozenset]) -> int:
    """PolicyParams.want for the metrics read (None: every total)."""
    if metrics is None:
        return (1 << len(_STATS)) - 1
    bits = 0b11  # the active-token count and the loss sum
    for name in metrics:
        for total in _METRIC_TOTALS[name]:
            bits |= 1 << _STATS.index(total)
    return bits


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
    no second gradient-sized buffer is allocated. A float32 gradient of narrower inputs
    (mixed dtypes) is scaled and narrowed in one compiled pass instead."""

    @staticmethod
    def forward(ctx, logp, entropy, run, metrics_out):
        loss, metrics, grad_logp, grad_entropy = run()
        metrics_out.update(metrics)
        ctx.buffers = [grad_logp, grad_entropy]
        # A plain reference, not save_for_backward: it only anchors the double-backward error
        # and must not make an in-place update of logp fail the version check.
        ctx.anchor = logp
        ctx.dtypes = (logp.dtype, None if entropy is None else entropy.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.buffers is None:
            raise RuntimeError("policy_loss: backward through this graph has already run; "
                               "pass retain_graph=True to the first backward to run it again")
        keep = _keep_graph()
        value = grad_out.item() if grad_out.device.type == "cpu" else None
        unit = value == 1.0
        # A float32 gradient kept beside narrower inputs (mixed dtypes) is scaled by a float32
        # incoming gradient and narrowed in one compiled pass.
        narrow_by = value if grad_out.dtype == torch.float32 else None
        grads = []
        for i, buf in enumerate(ctx.buffers):
            if buf is None or not ctx.needs_input_grad[i]:
                grads.append(None)
                continue
            g = None if narrow_by is None or buf.dtype == ctx.dtypes[i] else \
                _narrow_native(buf, narrow_by, ctx.dtypes[i])
            if g is not None:
                grads.append(_first_order(g, ctx.anchor, "rlkern::policy_loss"))
                continue
            if keep:
                g = buf.clone() if unit else buf * grad_out
            else:
                g = buf if unit else buf.mul_(grad_out)
            grads.append(_first_order(g.to(ctx.dtypes[i]), ctx.anchor, "rlkern::policy_loss"))
        if not keep:
            ctx.buffers = None
        return grads[0], grads[1], None, None


def _check_policy_inputs(logp, old_logp, advantages, mask, cfg: PolicyLossConfig, tensors, traced: bool) -> None:
    _validate.tensor("logp", logp, ndim=2, floating=True, allow_fake=traced)
    B, T = logp.shape
    if B == 0 or T == 0:
        raise ValueError(f"logp must have at least one sequence and one token, got shape {tuple(logp.shape)}")
    _validate.tensor("old_logp", old_logp, floating=True, allow_fake=traced)
    _validate.same_shape("old_logp", old_logp, logp.shape, "logp")
    _validate.tensor("advantages", advantages, ndim=(1, 2), floating=True, allow_fake=traced)
    if advantages.shape not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}) to match logp, "
                         f"got {tuple(advantages.shape)}")
    _validate.mask("mask", mask, logp.shape, allow_fake=traced)
    for name in _ref.TENSOR_OPTIONS:
        t = tensors[name]
        if t is not None:
            _validate.tensor(name, t, floating=True, allow_fake=traced)
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
    _ref.check_tensor_options(cfg, tensors)


def _policy_params(cfg: PolicyLossConfig, B: int, T: int):
    """A fresh PolicyParams with ``cfg``'s options and the shape filled in: a copy of a
    template cached per configuration (a tensor normalizer or an unhashable option is
    filled each time instead, so the cache holds no tensor)."""
    p = None
    if not isinstance(cfg.normalizer, torch.Tensor):
        try:
            p = _policy_template(cfg).copy()
        except TypeError:  # e.g. a clamp given as a list
            pass
    if p is None:
        p = _new_policy_params(cfg)
    p.B, p.T = B, T
    return p


def _new_policy_params(cfg: PolicyLossConfig):
    p = core().losses.PolicyParams()
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
    p.tis_min = float(cfg.tis_min or 0.0)  # 0 bounds nothing: the weights are >= 0
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


_policy_template = functools.lru_cache(maxsize=128)(_new_policy_params)


def _bounded(clamp: Clamp) -> bool:
    """Whether a validated clamp option bounds anything (a (None, None) pair does not); no
    float conversion, so a symbolic bound under torch.compile stays symbolic."""
    if clamp is None:
        return False
    return not isinstance(clamp, (tuple, list)) or any(c is not None for c in clamp)


def _metrics_from_totals(totals, cfg: PolicyLossConfig, has_ref: bool, has_entropy: bool,
                         nonempty=1.0, has_rollout: bool = False) -> Dict[str, torch.Tensor]:
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
    if cfg.level == "token" and _bounded(cfg.log_ratio_clamp):
        metrics["approx_kl_clamped"] = t["approx_kl_clamped_sum"] / denom
    if has_ref:
        metrics["kl"] = t["kl_sum"] / denom
    if has_rollout:
        metrics["rollout_kl"] = t["rollout_kl_sum"] / denom
    if has_entropy:
        metrics["entropy"] = t["entropy_sum"] / denom
    if cfg.objective == "clip" and cfg.dual_clip is not None:
        metrics["dual_clip_frac"] = t["dual_clip"] / denom
    if cfg.objective == "vespo":
        metrics["phi_mean"] = t["objective_sum"] / denom
        metrics["phi_seq_mean"] = t["objective_row_sum"] / nonempty
    elif cfg.objective in ("dppo_tv", "dppo_kl"):
        metrics["trunc_frac"] = t["objective_sum"] / denom
    elif cfg.objective == "cispo":
        metrics["clip_frac"] = t["objective_sum"] / denom
    if cfg.tis_cap is not None and cfg.tis_level == "token" and cfg.objective != "vespo":
        metrics["tis_clip_frac"] = t["tis_outside"] / denom
    return metrics


def _policy_cpu(logp, old_logp, advantages, mask, cfg: PolicyLossConfig, tensors, want_entropy_grad: bool,
                norm: Optional[Tensor] = None, reading: Optional[frozenset] = None):
    """``run()`` for the C++ kernel. ``norm``: a tensor normalizer (in the arithmetic
    dtype), applied after the pass by torch ops so that its value is never read.
    ``reading``: the metric names the caller reads (None: all), see _policy_loss_reading."""
    B, T = logp.shape
    ref_logp, rollout_logp, entropy = tensors["ref_logp"], tensors["rollout_logp"], tensors["entropy"]
    storage, acc = _policy_dtypes(logp, old_logp, advantages, tensors)
    inputs, weights_f32 = _input_storage(storage, acc, logp, old_logp, tensors)
    device = logp.device

    def run():
        lp = _as(logp, inputs)
        old = _as(old_logp, inputs)
        ref = _as(ref_logp, inputs)
        roll = _as(rollout_logp, inputs)
        ent = _as(entropy, inputs)
        wts = _as(tensors["weights"], torch.float32 if weights_f32 else inputs)
        behaviour = _as(tensors["off_policy_logp"], inputs)
        adv = _as(advantages, acc)
        m = _mask_bytes(mask)
        p = _policy_params(cfg, B, T)
        p.dtype = dtype_code(lp)
        # the gradients in `storage` (float32) while the inputs are read narrower
        p.weights_f32 = p.grad_f32 = weights_f32
        p.logp, p.old_logp, p.advantages, p.mask = ptr(lp), ptr(old), ptr(adv), ptr(m)
        p.ref_logp = ptr(ref) if ref is not None else 0
        p.rollout_logp = ptr(roll) if roll is not None else 0
        p.entropy = ptr(ent) if ent is not None else 0
        p.weights = ptr(wts) if wts is not None else 0
        p.off_policy_logp = ptr(behaviour) if behaviour is not None else 0
        p.adv_per_token = adv.dim() == 2
        p.want = _want_bits(reading)
        if cfg.entropy_top_fraction is not None:
            p.has_entropy_select = True
            p.entropy_threshold = float(entropy_threshold(ent, mask != 0, cfg.entropy_top_fraction))
        # The final denominator is known before the pass, except token-mean's token count
        # and the seq-* modes' count of non-empty sequences, which the kernel counts first.
        given = cfg.normalizer is not None or norm is not None
        p.scale_by_active = cfg.agg == "token-mean" and not given
        p.scale_by_rows = cfg.agg.startswith("seq-") and not given
        if not (p.scale_by_active or p.scale_by_rows):
            p.grad_scale = 1.0 if norm is not None else 1.0 / _agg_denominator(cfg.agg, cfg.normalizer, 0, 0)
        grad_logp = torch.empty((B, T), dtype=storage, device=device)
        grad_entropy = torch.empty((B, T), dtype=storage, device=device) if want_entropy_grad else None
        p.grad_logp = ptr(grad_logp)
        p.grad_entropy = ptr(grad_entropy) if grad_entropy is not None else 0
        totals = core().losses.policy_loss(p)
        named = _metrics_from_totals(totals, cfg, ref is not None, ent is not None, totals[len(_STATS)],
                                     roll is not None)
        if reading is not None:
            named = {k: v for k, v in named.items() if k in reading}
        # The metrics are views of one small tensor (one allocation, not six); the loss is a
        # tensor of its own, since trainers update it in place (verl: policy_loss += kl_loss * coef)
        # and autograd refuses in-place updates of a view made inside a Function.
        if norm is None:
            loss = torch.tensor(totals[1] / _agg_denominator(cfg.agg, cfg.normalizer, totals[0], totals[len(_STATS)]),
                                dtype=acc, device=device)
        else:
            loss = torch.tensor(totals[1], dtype=acc, device=device) / norm
            grad_logp.div_(norm)
            if grad_entropy is not None:
                grad_entropy.div_(norm)
        metrics = torch.tensor(list(named.values()), dtype=acc, device=device).unbind()
        return loss, dict(zip(named, metrics)), grad_logp, grad_entropy

    return run


def _policy_triton(logp, old_logp, advantages, mask, cfg: PolicyLossConfig, tensors, want_entropy_grad: bool,
                   norm: Optional[Tensor] = None):
    from .triton import losses as triton_losses

    if norm is not None:
        # The launcher divides by a tensor denominator on the device (no host read).
        cfg = dataclasses.replace(cfg, normalizer=norm)

    def run():
        return triton_losses.policy_loss(logp.detach(), old_logp.detach(), advantages.detach(), mask, cfg,
                                         {k: (None if v is None else v.detach()) for k, v in tensors.items()},
                                         want_entropy_grad=want_entropy_grad)

    return run


# --- the custom op: the way in for torch.compile, torch.export, FakeTensor/meta inputs and
# torch.func. Its scalar options travel as ``spec`` (a text naming each option and its kind,
# with strings, bools and None spelt out) and ``values`` (the numbers, in order), read from
# PolicyLossConfig's fields, so an option added to the config needs no change here.


def _encode_options(scalars: Dict[str, object]) -> Tuple[str, List[float]]:
    """(spec, values) of validated scalar options; plain Python on constants, so dynamo
    folds it away (numbers may be symbolic under dynamic=True: they travel as values)."""
    parts = []
    values: List[float] = []
    for name, v in scalars.items():
        if v is None:
            code = "n"
        elif isinstance(v, str):
            code = "s" + v
        elif isinstance(v, bool):
            code = "b1" if v else "b0"
        elif isinstance(v, (tuple, list)):
            code = "t"
            for x in v:
                if x is None:
                    code = code + "n"
                else:
                    code = code + "f"
                    values.append(x)
        else:
            code = "f"
            values.append(v)
        parts.append(name + "=" + code)
    return ";".join(parts), values


def _scalar_options(options: Dict[str, object]) -> Dict[str, object]:
    # Not a comprehension inside policy_loss: one there would make its locals closure cells,
    # which dynamo cannot read through locals().
    return {k: v for k, v in options.items() if k not in _ref.TENSOR_OPTIONS and not isinstance(v, torch.Tensor)}


def _decode_options(spec: str, values) -> PolicyLossConfig:
    """PolicyLossConfig from ``_encode_options``' output, not validated."""
    fields: Dict[str, object] = {}
    numbers = iter(values)
    for part in spec.split(";") if spec else ():
        name, code = part.split("=", 1)
        kind = code[0]
        if kind == "n":
            fields[name] = None
        elif kind == "s":
            fields[name] = code[1:]
        elif kind == "b":
            fields[name] = code[1] == "1"
        elif kind == "t":
            fields[name] = tuple(None if c == "n" else next(numbers) for c in code[1:])
        else:
            fields[name] = next(numbers)
    return PolicyLossConfig(**fields)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=256)
def _op_config(spec: str, values: Tuple[float, ...]) -> PolicyLossConfig:
    # A direct torch.ops call skips the public function's checks: validate here (once).
    return _decode_options(spec, values).validate()


def _metric_names(cfg: PolicyLossConfig, has_ref: bool, has_entropy: bool, has_rollout: bool) -> Tuple[str, ...]:
    """The metrics the kernels report for ``cfg``, in the order of the op's metrics output
    (asked of ``_metrics_from_totals`` itself, so the two cannot disagree)."""
    return tuple(_metrics_from_totals([0.0] * (len(_STATS) + 1), cfg, has_ref, has_entropy, 1.0, has_rollout))


@torch.library.custom_op("rlkern::policy_loss", mutates_args=())
def _policy_op(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, ref_logp: Optional[Tensor],
               rollout_logp: Optional[Tensor], entropy: Optional[Tensor], weights: Optional[Tensor],
               off_policy_logp: Optional[Tensor], normalizer: Optional[Tensor], spec: str, values: List[float],
               want_entropy_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, metrics [M] in ``_metric_names`` order, d loss / d logp, d loss / d entropy
    ([0] unless ``want_entropy_grad``)); the gradients in the inputs' storage dtype."""
    cfg = _op_config(spec, tuple(values))
    tensors = {"ref_logp": ref_logp, "rollout_logp": rollout_logp, "entropy": entropy, "weights": weights,
               "off_policy_logp": off_policy_logp}
    _, acc = _policy_dtypes(logp, old_logp, advantages, tensors)
    want = want_entropy_grad and entropy is not None
    norm = None if normalizer is None else normalizer.to(acc)
    launch = _policy_cpu if _op_backend(logp.device) == "cpu" else _policy_triton
    loss, metrics, grad_logp, grad_entropy = launch(logp, old_logp, advantages, mask, cfg, tensors, want, norm)()
    vec = torch.stack(list(metrics.values())).to(acc)
    return loss, vec, grad_logp, (grad_entropy if want else grad_logp.new_empty((0,)))


@_policy_op.register_fake
def _policy_fake(logp, old_logp, advantages, mask, ref_logp, rollout_logp, entropy, weights, off_policy_logp,
                 normalizer, spec, values, want_entropy_grad):
    tensors = {"ref_logp": ref_logp, "rollout_logp": rollout_logp, "entropy": entropy, "weights": weights,
               "off_policy_logp": off_policy_logp}
    storage, acc = _policy_dtypes(logp, old_logp, advantages, tensors)
    names = _metric_names(_decode_options(spec, values), ref_logp is not None, entropy is not None,
                          rollout_logp is not None)
    grad_entropy_shape = logp.shape if want_entropy_grad and entropy is not None else (0,)
    return (logp.new_empty((), dtype=acc), logp.new_empty((len(names),), dtype=acc),
            logp.new_empty(logp.shape, dtype=storage), logp.new_empty(grad_entropy_shape, dtype=storage))


def _policy_setup_context(ctx, inputs, output):
    logp, entropy = inputs[0], inputs[6]
    _, metrics, grad_logp, grad_entropy = output
    ctx.save_for_backward(grad_logp, grad_entropy, logp)
    ctx.dtypes = (logp.dtype, None if entropy is None else entropy.dtype)
    ctx.mark_non_differentiable(metrics, grad_logp, grad_entropy)


def _policy_backward(ctx, grad_loss, *_):
    grad_logp, grad_entropy, logp = ctx.saved_tensors
    g_logp = g_entropy = None
    if ctx.needs_input_grad[0]:
        g_logp = _first_order((grad_logp * grad_loss).to(ctx.dtypes[0]), logp, "rlkern::policy_loss")
    if ctx.needs_input_grad[6] and grad_entropy.numel() == grad_logp.numel():
        g_entropy = _first_order((grad_entropy * grad_loss).to(ctx.dtypes[1]), logp, "rlkern::policy_loss")
    return (g_logp, None, None, None, None, None, g_entropy) + (None,) * 6


torch.library.register_autograd("rlkern::policy_loss", _policy_backward, setup_context=_policy_setup_context)


def _slice(t: Optional[Tensor], dim: Optional[int], i: int) -> Optional[Tensor]:
    return t if t is None or dim is None else t.select(dim, i)


def _stack_problems(info, in_dims, call, tensors):
    """vmap over independent problems: one call per problem, results stacked on dim 0."""
    outs = [call(*(_slice(t, d, i) for t, d in zip(tensors, in_dims))) for i in range(info.batch_size)]
    return tuple(torch.stack(parts) for parts in zip(*outs))


@_policy_op.register_vmap
def _policy_vmap(info, in_dims, logp, old_logp, advantages, mask, ref_logp, rollout_logp, entropy, weights,
                 off_policy_logp, normalizer, spec, values, want_entropy_grad):
    def call(*t):
        return _policy_op(*t, spec, values, want_entropy_grad)

    out = _stack_problems(info, in_dims[:10], call, (logp, old_logp, advantages, mask, ref_logp, rollout_logp, entropy,
                                                     weights, off_policy_logp, normalizer))
    return out, (0, 0, 0, 0)


# --- the public function

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(PolicyLossConfig))
_config_values = operator.itemgetter(*_CONFIG_FIELDS)


def _eager_config(options: Dict[str, object]) -> PolicyLossConfig:
    """``parse_policy_options(options)[0]`` for the complete options of policy_loss's
    signature, with a cache key a trainer's small calls can afford: the values in field
    order plus their types (1, 1.0 and True compare equal but validate differently)."""
    values = _config_values(options)
    try:
        return _config_from_values(values + tuple(map(type, values)))
    except TypeError as e:
        if "unhashable" not in str(e):
            raise
        return parse_policy_options(options)[0]  # e.g. a list for a clamp


@functools.lru_cache(maxsize=256)
def _config_from_values(key: Tuple[object, ...]) -> PolicyLossConfig:
    # Errors are not cached (lru_cache stores only results).
    return PolicyLossConfig(**dict(zip(_CONFIG_FIELDS, key[:len(_CONFIG_FIELDS)]))).validate()  # type: ignore[arg-type]


# The defaults of every option, written once (on PolicyLossConfig); the signature below
# reads them from here, and tests/test_custom_ops_losses.py checks the two agree.
_D = PolicyLossConfig()


@_dtensor.token_loss(mask_arg=3)
def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                # One line per option: its name, type and default (from PolicyLossConfig).
                objective: str = _D.objective,
                level: str = _D.level,
                clip_low: float = _D.clip_low,
                clip_high: Optional[float] = _D.clip_high,
                dual_clip: Optional[float] = _D.dual_clip,
                ratio_cap: Optional[float] = _D.ratio_cap,
                log_ratio_clamp: Clamp = _D.log_ratio_clamp,
                ref_logp: Optional[Tensor] = None,
                kl_coef: float = _D.kl_coef,
                kl_kind: str = _D.kl_kind,
                kl_clamp: Clamp = _D.kl_clamp,
                kl_is_correction: bool = _D.kl_is_correction,
                rollout_logp: Optional[Tensor] = None,
                tis_cap: Optional[float] = _D.tis_cap,
                tis_min: Optional[float] = _D.tis_min,
                tis_level: str = _D.tis_level,
                tis_mode: str = _D.tis_mode,
                off_policy_threshold: Optional[float] = _D.off_policy_threshold,
                off_policy_logp: Optional[Tensor] = None,
                entropy: Optional[Tensor] = None,
                entropy_coef: float = _D.entropy_coef,
                entropy_top_fraction: Optional[float] = _D.entropy_top_fraction,
                weights: Optional[Tensor] = None,
                agg: str = _D.agg,
                normalizer: Union[None, float, Tensor] = _D.normalizer,
                sapo_temperature_pos: float = _D.sapo_temperature_pos,
                sapo_temperature_neg: float = _D.sapo_temperature_neg,
                vespo_k_pos: float = _D.vespo_k_pos,
                vespo_lambda_pos: float = _D.vespo_lambda_pos,
                vespo_k_neg: float = _D.vespo_k_neg,
                vespo_lambda_neg: float = _D.vespo_lambda_neg,
                ) -> LossOutput:
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
    ``rollout_logp`` (``tis_cap``, with ``tis_min`` a lower bound), the off-policy sequence
    mask (``off_policy_threshold``, measured against ``off_policy_logp`` when given, else
    ``rollout_logp``, else ``old_logp``),
    the high-entropy token selection (``entropy_top_fraction``) and the caller's per-token
    ``weights`` ([B, T], a constant like the advantages: verl's ``rollout_is_weights``, or
    the 0/1 token selection of its clip_cov/kl_cov losses). ``weights`` multiplies the policy
    term only (not the KL or entropy terms) and is refused by "geo_mean", whose loss is one
    term per sequence (scale its advantages instead); kl_t is
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
    gradient accumulation, or Dr.GRPO's constant. It may be a 0-d tensor on the inputs'
    device (TRL's ``num_items_in_batch``), which is never read back to the host (so it is
    not checked: a non-positive or NaN tensor gives an inf, NaN or negated loss).

    The options are keyword-only; each is documented on :class:`PolicyLossConfig`, which
    also holds their defaults. An unknown option name raises TypeError naming it.

    Shapes: ``logp``, ``old_logp``, ``mask`` and the optional per-token tensors are [B, T];
    ``advantages`` is [B] (one per sequence) or [B, T]. float32/bfloat16/float16 inputs
    compute in float32, float64 in float64; the loss and metrics are float32 (float64).

    Gradients flow to ``logp`` and ``entropy`` only; old, reference and rollout log-probs
    and advantages are constants. The sequence-level ratio's gradient reaches every active
    token of the sequence (d r / d logp_t = r / n).

    NaN/inf policy: masked positions are never read into the result (they may hold NaN)
    and get zero gradient. Sequences without active tokens contribute nothing and are not
    counted by the seq-* modes. Non-finite values at active positions propagate into the
    loss (NaN stays NaN through every clamp). The factors of w_t multiply the policy term
    (IEEE: a weight of 0, from ``weights``, the TIS mask or the off-policy mask, zeroes a
    finite term and its gradient, but 0 times an infinite term is NaN, as in verl's and
    TRL's ``pg_losses * weights``); a NaN weight at an active position gives NaN. A term whose
    coefficient is 0 (kl_coef, entropy_coef) is left out, not multiplied by 0, so an infinite KL or entropy that only
    feeds a metric leaves the loss finite.

    Memory: the forward pass writes the finished gradient (in the inputs' dtype) and keeps
    nothing else; backward hands that buffer to autograd (scaled in place by the incoming
    gradient) unless ``retain_graph=True``, in which case it returns a scaled copy.

    Tracing: under torch.compile/torch.export, on FakeTensor or meta inputs and inside
    torch.func transforms the call goes through the custom op ``rlkern::policy_loss``,
    whose outputs include the metrics (so a compiled step can log them). torch.func.vmap
    runs one problem per batch entry; torch.func.grad and double backward raise an error
    naming the op.

    Returns ``LossOutput(loss, metrics)``; ``metrics`` (detached, masked means over the
    active tokens, computed in the same pass): ``clip_frac_low`` (A < 0 and r < 1 -
    clip_low), ``clip_frac_high`` (A > 0 and r > 1 + clip_high), ``ratio_mean``,
    ``approx_kl`` (mean of old_logp - logp), ``approx_kl_clamped`` (with
    ``log_ratio_clamp`` at level "token": the mean of -(the clamped log-ratio), verl's
    ppo_kl), ``kl`` (when ``ref_logp`` is given), ``entropy`` (when ``entropy`` is given)
    and ``dual_clip_frac`` (with ``dual_clip``). "cispo" adds ``clip_frac``: the tokens whose
    ratio lies outside [1 - clip_low, 1 + clip_high] whatever the advantage's sign (a NaN
    ratio counts; verl's cispo pg_clipfrac). With ``rollout_logp``: ``rollout_kl`` (mean of
    rollout_logp - old_logp, OpenRLHF's vllm_kl); with token-level ``tis_cap`` (not "vespo"):
    ``tis_clip_frac``, the tokens whose importance weight the band changes (mode "mask":
    those not inside [tis_min, tis_cap], a NaN weight included; "truncate": those below or
    above it; OpenRLHF's is_filter_ratio).
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
    # Every option by name, from the signature itself: adding an option is one line above.
    # (No closure or comprehension in this function may capture a local: see _scalar_options.)
    options = locals()
    del options["logp"], options["old_logp"], options["advantages"], options["mask"]
    traced = _traced(logp, old_logp, advantages, mask, ref_logp, rollout_logp, entropy, weights, off_policy_logp)
    norm = normalizer
    if isinstance(norm, torch.Tensor):
        _check_normalizer(norm, logp, traced)
    # A tensor normalizer stays out of the (cached, validated) config; it travels on its own.
    scalar_options = options if norm is None or not isinstance(norm, torch.Tensor) else {**options, "normalizer": None}
    if traced:
        cfg, _ = parse_policy_options(scalar_options)
    else:
        cfg = _eager_config(scalar_options)
    tensors = {"ref_logp": ref_logp, "rollout_logp": rollout_logp, "entropy": entropy, "weights": weights,
               "off_policy_logp": off_policy_logp}
    _check_policy_inputs(logp, old_logp, advantages, mask, cfg, tensors, traced)
    backend = _backend.select(logp.device) if logp.device.type != "meta" else "meta"
    if backend == "reference":
        return _ref.policy_loss(logp, old_logp, advantages, mask, **options)
    want_entropy_grad = entropy is not None and entropy.requires_grad and cfg.entropy_coef != 0
    if traced:
        spec, values = _encode_options(_scalar_options(options))
        norm_t = norm if isinstance(norm, torch.Tensor) else None
        loss, vec, _, _ = _call_op("policy_loss", _policy_op, logp, old_logp.detach(), advantages.detach(), mask,
                                   None if ref_logp is None else ref_logp.detach(),
                                   None if rollout_logp is None else rollout_logp.detach(), entropy,
                                   None if weights is None else weights.detach(),
                                   None if off_policy_logp is None else off_policy_logp.detach(), norm_t, spec,
                                   values, want_entropy_grad)
        names = _metric_names(cfg, ref_logp is not None, entropy is not None, rollout_logp is not None)
        return LossOutput(loss, dict(zip(names, vec.unbind())))
    norm_t = None
    if isinstance(norm, torch.Tensor):
        norm_t = norm.to(_policy_dtypes(logp, old_logp, advantages, tensors)[1])
    if backend == "cpu":
        run = _policy_cpu(logp, old_logp, advantages, mask, cfg, tensors, want_entropy_grad, norm_t, _READING.get())
    else:
        run = _policy_triton(logp, old_logp, advantages, mask, cfg, tensors, want_entropy_grad, norm_t)
    metrics: Dict[str, torch.Tensor] = {}
    loss = _PolicyLossFunction.apply(logp, entropy, run, metrics)
    return LossOutput(loss, metrics)


# ---------------------------------------------------------------------------------------
# value_loss


class _SavedGradFunction(torch.autograd.Function):
    """Generic wrapper: ``run()`` returns (loss, grads...); grads are saved, scaled in backward.

    ``inputs`` are the differentiable tensors in the order of the grads (``run`` fills the
    caller's metrics dict itself); ``op`` names the op in the double-backward error.
    """

    @staticmethod
    def forward(ctx, run, op, *inputs):
        loss, grads = run()
        ctx.save_for_backward(*grads)
        ctx.dtypes = [t.dtype for t in inputs]
        ctx.op = op
        ctx.anchor = inputs[0]  # anchors the double-backward error (see _PolicyLossFunction)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grads = ctx.saved_tensors
        out = [None, None]
        for i, (g, dt) in enumerate(zip(grads, ctx.dtypes)):
            out.append(_no_double(ctx.op, g, grad_out, dt, ctx.anchor) if ctx.needs_input_grad[i + 2] else None)
        return tuple(out)


def _no_double(op: str, grad: Tensor, grad_out: Tensor, dtype: torch.dtype, anchor: Tensor) -> Tensor:
    return _first_order((grad * grad_out).to(dtype), anchor, f"rlkern::{op}")


def _value_launch(backend: str, values, old_values, returns, mask, clip: Optional[float], agg: str, normalizer):
    """(loss, clip_frac, value_mean, grad) from the kernel on [B, T] inputs; ``normalizer``
    is None, a number or a tensor in the arithmetic dtype (applied on its device). The CPU
    kernel writes ``grad`` finished, in the storage dtype; Triton's is in the arithmetic dtype."""
    B, T = values.shape
    acc = compute_dtype(values, old_values, returns)
    storage = _storage(values, old_values, returns)
    v = _as(values, storage)
    R = _as(returns, storage)
    vo = _as(old_values, storage) if old_values is not None else v
    m = _mask_bytes(mask)
    if backend == "cpu":
        grad = torch.empty((B, T), dtype=storage, device=v.device)
        tensor_norm = isinstance(normalizer, torch.Tensor)
        # the final scale is known up front except the kernel's own counts (scale 0: counted there)
        scale = 1.0 if tensor_norm else (0.0 if normalizer is None else 1.0 / float(normalizer))
        totals = core().losses.value_loss_scaled(B, T, dtype_code(v), ptr(v), ptr(vo), ptr(R), ptr(m),
                                                 clip is not None, float(clip or 0.0), _AGG_CODES[agg], ptr(grad),
                                                 scale)
        active = max(totals[0], 1.0)
        denom = _agg_denominator(agg, normalizer, totals[0], totals[4])
        if tensor_norm:
            grad.div_(denom.to(storage) if storage != acc else denom)
            loss = torch.tensor(totals[1], dtype=acc, device=v.device) / denom
        else:
            loss = torch.tensor(totals[1] / denom, dtype=acc, device=v.device)
        stats = torch.tensor([totals[2] / active, totals[3] / active], dtype=acc, device=v.device)
        return loss, stats[0], stats[1], grad
    grad = torch.empty((B, T), dtype=acc, device=v.device)
    from .triton import losses as triton_losses

    totals = triton_losses.value_loss(v, vo, R, m, clip, _AGG_CODES[agg], _row_scale(agg, T), grad)
    active = totals[0].clamp(min=1)
    denom = _agg_denominator(agg, normalizer, totals[0], totals[4])
    if isinstance(denom, torch.Tensor):
        grad.div_(denom)
    else:
        grad.mul_(1.0 / denom)
    return totals[1] / denom, totals[2] / active, totals[3] / active, grad


class _ValueLossFunction(torch.autograd.Function):
    """``run()`` returns (loss, finished d loss / d values); backward hands that buffer to
    autograd scaled by the incoming gradient, in place unless the graph is retained (as
    _PolicyLossFunction), so no second gradient-sized buffer is allocated."""

    @staticmethod
    def forward(ctx, values, run):
        loss, grad = run()
        ctx.grad = grad
        ctx.anchor = values  # a plain reference: anchors the double-backward error only
        ctx.dtype = values.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grad is None:
            raise RuntimeError("value_loss: backward through this graph has already run; "
                               "pass retain_graph=True to the first backward to run it again")
        if not ctx.needs_input_grad[0]:
            return None, None
        unit = grad_out.device.type == "cpu" and grad_out.item() == 1.0
        if _keep_graph():
            g = ctx.grad.clone() if unit else ctx.grad * grad_out
        else:
            g = ctx.grad if unit else ctx.grad.mul_(grad_out)
            ctx.grad = None
        return _first_order(g.to(ctx.dtype), ctx.anchor, "rlkern::value_loss"), None


@torch.library.custom_op("rlkern::value_loss", mutates_args=())
def _value_op(values: Tensor, old_values: Optional[Tensor], returns: Tensor, mask: Tensor, normalizer: Optional[Tensor],
              clip: Optional[float], agg: str, normalizer_value: Optional[float]) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, metrics [clip_frac, value_mean], d loss / d values) on [B, T] inputs, in the
    arithmetic dtype."""
    acc = compute_dtype(values, old_values, returns)
    norm = normalizer.to(acc) if normalizer is not None else normalizer_value
    loss, clip_frac, value_mean, grad = _value_launch(_op_backend(values.device), values, old_values, returns, mask,
                                                      clip, agg, norm)
    return loss.to(acc), torch.stack([clip_frac, value_mean]), grad.to(acc)


@_value_op.register_fake
def _value_fake(values, old_values, returns, mask, normalizer, clip, agg, normalizer_value):
    acc = compute_dtype(values, old_values, returns)
    return values.new_empty((), dtype=acc), values.new_empty((2,), dtype=acc), values.new_empty(values.shape, dtype=acc)


def _value_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2], inputs[0])
    ctx.mark_non_differentiable(output[1], output[2])


def _value_backward(ctx, grad_loss, *_):
    grad, values = ctx.saved_tensors
    g = _no_double("value_loss", grad, grad_loss, values.dtype, values) if ctx.needs_input_grad[0] else None
    return (g,) + (None,) * 7


torch.library.register_autograd("rlkern::value_loss", _value_backward, setup_context=_value_setup_context)


@_value_op.register_vmap
def _value_vmap(info, in_dims, values, old_values, returns, mask, normalizer, clip, agg, normalizer_value):
    def call(*t):
        return _value_op(*t, clip, agg, normalizer_value)

    return _stack_problems(info, in_dims[:5], call, (values, old_values, returns, mask, normalizer)), (0, 0, 0)


@_dtensor.token_loss(mask_arg=3)
def value_loss(values: Tensor, old_values: Optional[Tensor], returns: Tensor, mask: Optional[Tensor] = None,
               clip: Optional[float] = None, agg: str = "token-mean",
               normalizer: Union[None, float, Tensor] = None) -> LossOutput:
    """Clipped value loss of PPO (verl's and TRL's formulation).

        loss = 0.5 * agg(max((v - R)^2, (clip(v, v_old - clip, v_old + clip) - R)^2))

    and without ``clip`` 0.5 * agg((v - R)^2). ``values``, ``old_values``, ``returns`` and
    ``mask`` are [B, T] (or [N], treated as one sequence); ``mask=None`` means every
    position is active. ``agg``/``normalizer`` as in :func:`policy_loss` (verl 0.9.1's
    aggregation: the seq-* modes average over the non-empty sequences; ``normalizer`` may be
    a 0-d tensor on the inputs' device, never read back to the host). Differentiable in
    ``values`` only. Masked positions may hold NaN and get zero gradient; NaN at an active
    position (old values included, with ``clip``) makes the loss NaN. Under tracing, on
    FakeTensor/meta inputs and in torch.func transforms the call goes through the custom op
    ``rlkern::value_loss``.

    metrics: ``clip_frac`` (active tokens where the clipped error is the larger; 0 without
    clip), ``value_mean``.
    """
    traced = _traced(values, old_values, returns, mask)
    _validate.tensor("values", values, ndim=(1, 2), floating=True, allow_fake=traced)
    shape = values.shape
    if values.numel() == 0:
        raise ValueError("values must not be empty")
    _validate.tensor("returns", returns, floating=True, allow_fake=traced)
    _validate.same_shape("returns", returns, shape, "values")
    if clip is not None:
        clip = _validate.positive("clip", clip, allow_zero=True)
        if old_values is None:
            raise ValueError("old_values is needed when clip is given")
    if old_values is not None:
        _validate.tensor("old_values", old_values, floating=True, allow_fake=traced)
        _validate.same_shape("old_values", old_values, shape, "values")
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool, device=values.device)
    _validate.mask("mask", mask, shape, allow_fake=traced)
    _validate.choice("agg", agg, AGG_MODES)
    normalizer = _check_normalizer(normalizer, values, traced)
    _validate.same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    if values.dim() == 1:
        values, returns, mask = values.unsqueeze(0), returns.unsqueeze(0), mask.unsqueeze(0)
        old_values = None if old_values is None else old_values.unsqueeze(0)
    backend = _backend.select(values.device) if values.device.type != "meta" else "meta"
    if backend == "reference":
        return _ref.value_loss(values, old_values, returns, mask, clip, agg, normalizer)
    if traced:
        tensor_norm = isinstance(normalizer, torch.Tensor)
        loss, vec, _ = _call_op("value_loss", _value_op, values,
                                None if old_values is None else old_values.detach(), returns.detach(), mask,
                                normalizer if tensor_norm else None, clip, agg, None if tensor_norm else normalizer)
        clip_frac, value_mean = vec.unbind()
        return LossOutput(loss, {"clip_frac": clip_frac, "value_mean": value_mean})
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(compute_dtype(values, old_values, returns))
    metrics: Dict[str, torch.Tensor] = {}

    def run():
        loss, metrics["clip_frac"], metrics["value_mean"], grad = _value_launch(
            backend, values.detach(), old_values, returns, mask, clip, agg, normalizer)
        return loss, grad

    loss = _ValueLossFunction.apply(values, run)
    return LossOutput(loss, metrics)


# ---------------------------------------------------------------------------------------
# dpo_loss and bradley_terry_loss


def _check_pairs(traced: bool = False, **tensors) -> int:
    B = None
    first = None
    for name, t in tensors.items():
        _validate.tensor(name, t, ndim=1, floating=True, allow_fake=traced)
        if B is None:
            B, first = t.shape[0], name
        else:
            _validate.same_shape(name, t, (B,), first)
    if B == 0:
        raise ValueError(f"{first} must not be empty")
    _validate.same_device(**tensors)
    return B


def _dpo_launch(backend: str, c, r, rc, rr, beta: float, loss_type: str, label_smoothing: float):
    """(loss, chosen_rewards, rejected_rewards, reward_margin, reward_accuracy, d loss / d z)."""
    B = c.shape[0]
    acc = compute_dtype(c, r, rc, rr)
    storage = _storage(c, r, rc, rr)
    c, r, rc, rr = (_as(t, storage) for t in (c, r, rc, rr))
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
    grad_z.mul_(1.0 / B)
    return totals[0] / B, chosen_rewards, rejected_rewards, totals[1] / B, totals[2] / B, grad_z


@torch.library.custom_op("rlkern::dpo_loss", mutates_args=())
def _dpo_op(chosen_logp: Tensor, rejected_logp: Tensor, ref_chosen_logp: Tensor, ref_rejected_logp: Tensor,
            beta: float, loss_type: str, label_smoothing: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, chosen_rewards [B], rejected_rewards [B], [reward_margin, reward_accuracy],
    d loss / d z [B]), in the arithmetic dtype."""
    loss, cr, rr, margin, accuracy, grad_z = _dpo_launch(_op_backend(chosen_logp.device), chosen_logp, rejected_logp,
                                                         ref_chosen_logp, ref_rejected_logp, beta, loss_type,
                                                         label_smoothing)
    return loss, cr, rr, torch.stack([margin, accuracy]), grad_z


@_dpo_op.register_fake
def _dpo_fake(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, loss_type, label_smoothing):
    acc = compute_dtype(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    B = chosen_logp.shape[0]
    new = chosen_logp.new_empty
    return new((), dtype=acc), new((B,), dtype=acc), new((B,), dtype=acc), new((2,), dtype=acc), new((B,), dtype=acc)


def _dpo_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[4], inputs[0])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.mark_non_differentiable(*output[1:])


def _dpo_backward(ctx, grad_loss, *_):
    grad_z, anchor = ctx.saved_tensors
    gc = _no_double("dpo_loss", grad_z, grad_loss, ctx.dtypes[0], anchor) if ctx.needs_input_grad[0] else None
    gr = _no_double("dpo_loss", -grad_z, grad_loss, ctx.dtypes[1], anchor) if ctx.needs_input_grad[1] else None
    return (gc, gr) + (None,) * 5


torch.library.register_autograd("rlkern::dpo_loss", _dpo_backward, setup_context=_dpo_setup_context)


@_dpo_op.register_vmap
def _dpo_vmap(info, in_dims, c, r, rc, rr, beta, loss_type, label_smoothing):
    def call(*t):
        return _dpo_op(*t, beta, loss_type, label_smoothing)

    return _stack_problems(info, in_dims[:4], call, (c, r, rc, rr)), (0,) * 5


@_dtensor.pair_loss
def dpo_loss(chosen_logp: Tensor, rejected_logp: Tensor, ref_chosen_logp: Tensor, ref_rejected_logp: Tensor,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> LossOutput:
    """Direct preference optimisation over sequence log-probs [B] (TRL's DPOTrainer).

    With z = (chosen - ref_chosen) - (rejected - ref_rejected), the per-pair loss is

    - ``"sigmoid"``: -(1 - ls) log sigmoid(beta z) - ls log sigmoid(-beta z) (ls = label_smoothing, cDPO);
    - ``"ipo"``: (z - 1 / (2 beta))^2;
    - ``"hinge"``: relu(1 - beta z) (SLiC);

    and the loss is its batch mean. Differentiable in ``chosen_logp`` and ``rejected_logp``;
    the reference log-probs are constants. Under tracing, on FakeTensor/meta inputs and in
    torch.func transforms the call goes through the custom op ``rlkern::dpo_loss``.

    metrics: ``chosen_rewards`` = beta (chosen - ref_chosen) and ``rejected_rewards`` (the
    implicit rewards, [B], detached), ``reward_margin`` (mean of their difference),
    ``reward_accuracy`` (fraction with chosen reward > rejected reward).
    """
    traced = _traced(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    _check_pairs(traced, chosen_logp=chosen_logp, rejected_logp=rejected_logp, ref_chosen_logp=ref_chosen_logp,
                 ref_rejected_logp=ref_rejected_logp)
    beta = _validate.positive("beta", beta)
    _validate.choice("loss_type", loss_type, DPO_LOSS_TYPES)
    label_smoothing = _validate.unit_interval("label_smoothing", label_smoothing)
    backend = _backend.select(chosen_logp.device) if chosen_logp.device.type != "meta" else "meta"
    if backend == "reference":
        return _ref.dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta, loss_type,
                             label_smoothing)
    if traced:
        loss, cr, rr, vec, _ = _call_op("dpo_loss", _dpo_op, chosen_logp, rejected_logp, ref_chosen_logp.detach(),
                                        ref_rejected_logp.detach(), beta, loss_type, label_smoothing)
        margin, accuracy = vec.unbind()
        return LossOutput(loss, {"chosen_rewards": cr, "rejected_rewards": rr, "reward_margin": margin,
                                 "reward_accuracy": accuracy})
    inputs = (chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    metrics: Dict[str, torch.Tensor] = {}

    def run():
        loss, cr, rr, margin, accuracy, grad_z = _dpo_launch(backend, *(t.detach() for t in inputs), beta,
                                                             loss_type, label_smoothing)
        metrics.update(chosen_rewards=cr, rejected_rewards=rr, reward_margin=margin, reward_accuracy=accuracy)
        return loss, (grad_z, -grad_z)

    loss = _SavedGradFunction.apply(run, "dpo_loss", chosen_logp, rejected_logp)
    return LossOutput(loss, metrics)


def _bt_launch(backend: str, c, r, margin: Optional[Tensor], margin_scalar: float):
    """(loss, accuracy, reward_margin, d loss / d chosen)."""
    B = c.shape[0]
    acc = compute_dtype(*[t for t in (c, r, margin) if t is not None])
    storage = _storage(c, r, margin)
    c, r = _as(c, storage), _as(r, storage)
    mg = _as(margin, storage)
    grad = torch.empty(B, dtype=acc, device=c.device)
    if backend == "cpu":
        totals = core().losses.bradley_terry_loss(B, dtype_code(c), ptr(c), ptr(r), ptr(mg) if mg is not None else 0,
                                                  margin_scalar, ptr(grad))
        totals = torch.tensor(totals, dtype=acc, device=c.device)
    else:
        from .triton import losses as triton_losses

        totals = triton_losses.bradley_terry_loss(c, r, mg, margin_scalar, grad)
    grad.mul_(1.0 / B)
    return totals[0] / B, totals[2] / B, totals[1] / B, grad


@torch.library.custom_op("rlkern::bradley_terry_loss", mutates_args=())
def _bt_op(chosen_reward: Tensor, rejected_reward: Tensor, margin: Optional[Tensor],
           margin_scalar: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, [accuracy, reward_margin], d loss / d chosen_reward [B]), in the arithmetic dtype."""
    loss, accuracy, reward_margin, grad = _bt_launch(_op_backend(chosen_reward.device), chosen_reward,
                                                     rejected_reward, margin, margin_scalar)
    return loss, torch.stack([accuracy, reward_margin]), grad


@_bt_op.register_fake
def _bt_fake(chosen_reward, rejected_reward, margin, margin_scalar):
    acc = compute_dtype(*[t for t in (chosen_reward, rejected_reward, margin) if t is not None])
    new = chosen_reward.new_empty
    return new((), dtype=acc), new((2,), dtype=acc), new(chosen_reward.shape, dtype=acc)


def _bt_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2], inputs[0])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.mark_non_differentiable(output[1], output[2])


def _bt_backward(ctx, grad_loss, *_):
    grad, anchor = ctx.saved_tensors
    gc = _no_double("bradley_terry_loss", grad, grad_loss, ctx.dtypes[0], anchor) if ctx.needs_input_grad[0] else None
    gr = _no_double("bradley_terry_loss", -grad, grad_loss, ctx.dtypes[1], anchor) if ctx.needs_input_grad[1] else None
    return gc, gr, None, None


torch.library.register_autograd("rlkern::bradley_terry_loss", _bt_backward, setup_context=_bt_setup_context)


@_bt_op.register_vmap
def _bt_vmap(info, in_dims, chosen_reward, rejected_reward, margin, margin_scalar):
    def call(*t):
        return _bt_op(*t, margin_scalar)

    return _stack_problems(info, in_dims[:3], call, (chosen_reward, rejected_reward, margin)), (0, 0, 0)


@_dtensor.pair_loss
def bradley_terry_loss(chosen_reward: Tensor, rejected_reward: Tensor,
                       margin: Union[None, float, Tensor] = None) -> LossOutput:
    """Bradley-Terry reward-model loss: mean over pairs of -log sigmoid(chosen - rejected - margin).

    ``chosen_reward`` and ``rejected_reward`` are [B]; ``margin`` is None, a number or a [B]
    tensor (TRL's RewardTrainer margin column). Differentiable in both rewards. Under
    tracing, on FakeTensor/meta inputs and in torch.func transforms the call goes through the
    custom op ``rlkern::bradley_terry_loss``.

    metrics: ``accuracy`` (fraction with chosen > rejected), ``reward_margin`` (mean of
    chosen - rejected).
    """
    traced = _traced(chosen_reward, rejected_reward, margin)
    B = _check_pairs(traced, chosen_reward=chosen_reward, rejected_reward=rejected_reward)
    margin_tensor = None
    margin_scalar = 0.0
    if isinstance(margin, torch.Tensor):
        _validate.tensor("margin", margin, floating=True, allow_fake=traced)
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
    backend = _backend.select(chosen_reward.device) if chosen_reward.device.type != "meta" else "meta"
    if backend == "reference":
        return _ref.bradley_terry_loss(chosen_reward, rejected_reward,
                                       margin_tensor if margin_tensor is not None else (margin_scalar if margin is not None else None))
    if traced:
        loss, vec, _ = _call_op("bradley_terry_loss", _bt_op, chosen_reward, rejected_reward,
                                None if margin_tensor is None else margin_tensor.detach(), margin_scalar)
        accuracy, reward_margin = vec.unbind()
        return LossOutput(loss, {"accuracy": accuracy, "reward_margin": reward_margin})
    metrics: Dict[str, torch.Tensor] = {}

    def run():
        loss, metrics["accuracy"], metrics["reward_margin"], grad = _bt_launch(
            backend, chosen_reward.detach(), rejected_reward.detach(), margin_tensor, margin_scalar)
        return loss, (grad, -grad)

    loss = _SavedGradFunction.apply(run, "bradley_terry_loss", chosen_reward, rejected_reward)
    return LossOutput(loss, metrics)
