"""KL estimators between the current policy and a reference policy, per token.

Used as a penalty in the reward (``kl_penalty`` on its own) or as a loss term
(``rlkern.losses.policy_loss(..., ref_logp=..., kl_coef=...)``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from . import _backend, _dtensor, _validate
from ._kernel import compute_dtype, core, dtype_code, ptr
from .reference import kl as _ref
from .reference.kl import KL_KINDS, clamp_bounds

__all__ = ["kl_penalty", "KL_KINDS"]

_KIND_CODES = {"k1": 0, "k2": 1, "k3": 2}


class _NoDoubleBackward(torch.autograd.Function):
    """Passes a first-order gradient through, attached to the op's input, so that
    differentiating it again (create_graph=True) raises an error naming the op instead of
    silently returning zero or a generic message."""

    @staticmethod
    def forward(grad, anchor, op):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[2]

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(f"{ctx.op} does not support double backward (create_graph=True): its backward scales "
                           "the derivative the forward pass wrote, which is not differentiable")


def _first_order(g: torch.Tensor, anchor: torch.Tensor, op: str) -> torch.Tensor:
    if torch.is_grad_enabled() and anchor.requires_grad:
        return _NoDoubleBackward.apply(g, anchor, op)
    return g


def _keep_graph() -> bool:
    """Whether the running backward retains the graph (retain_graph=True)."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True  # unknown: keep the buffer, as retaining would need


def _uniform_value(t: torch.Tensor) -> Optional[float]:
    """The one value of a CPU tensor broadcast from a scalar (every stride 0, as the gradient
    of a ``.sum()``), read without a pass over it; None for any other tensor."""
    if t.device.type != "cpu" or t.numel() == 0 or any(st != 0 for st in t.stride()):
        return None
    return t[(0,) * t.dim()].item()


def _scale_native(grad: torch.Tensor, grad_out: torch.Tensor, fresh: bool) -> Optional[torch.Tensor]:
    """grad * grad_out in grad's dtype, in one compiled pass (csrc/cpu/grad_scale.cpp), into a
    new buffer when ``fresh`` (retain_graph keeps ``grad``) and in place otherwise; None where
    the caller must use torch ops: both must be plain contiguous CPU tensors of one shape and
    grad_out in grad's arithmetic dtype (the estimate's dtype). The result is torch's
    ``grad.mul_(grad_out)`` (and ``(grad * grad_out).to(grad.dtype)``) to the bit: the product
    rounded once in the arithmetic dtype, then narrowed to nearest even."""
    if not (_validate.cpu_data(grad) and _validate.cpu_data(grad_out) and grad.is_contiguous()
            and grad_out.is_contiguous() and grad_out.shape == grad.shape
            and grad_out.dtype == compute_dtype(grad)):
        return None
    out = torch.empty_like(grad) if fresh else grad
    core().grad.scale(grad.numel(), dtype_code(grad), ptr(grad), ptr(grad_out), ptr(out))
    return out


def _narrow_native(grad: torch.Tensor, scale: float, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``(grad * scale).to(dtype)`` for a float32 derivative kept beside narrower inputs
    (``scale`` a float32 incoming gradient, ``dtype`` bfloat16 or float16), in one compiled
    pass over the threads (csrc/cpu/grad_scale.cpp) into a new tensor; None where the caller
    must use torch ops. Bit for bit torch's ``grad.mul_(scale).to(dtype)``: one float32
    rounding, then one round to nearest even (a NaN stays a NaN; its payload may differ)."""
    if not (grad.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16) and _validate.cpu_data(grad)
            and grad.is_contiguous()):
        return None
    out = torch.empty(grad.shape, dtype=dtype)
    core().grad.narrow(grad.numel(), ptr(grad), scale, dtype_code(out), ptr(out))
    return out


class _KlPenaltyFunction(torch.autograd.Function):
    """Forward computes the estimate and d kl / d logp (in logp's storage dtype on CPU) in one
    pass and keeps only that derivative; backward scales it by the incoming gradient, in place
    unless the graph is retained, and not at all when that gradient is a broadcast 1 (a
    ``.sum()``), so backward allocates no second buffer. ``d_max`` bounds ref - logp before the
    estimate (zero gradient where it binds; CPU only)."""

    @staticmethod
    def forward(ctx, logp, ref_logp, kind, low, high, backend, d_max=None):
        storage = logp.dtype if logp.dtype == ref_logp.dtype else compute_dtype(logp, ref_logp)
        lp = logp.to(storage).contiguous()
        ref = ref_logp.to(storage).contiguous()
        want_grad = ctx.needs_input_grad[0]
        out = torch.empty(lp.shape, dtype=compute_dtype(lp), device=lp.device)
        # the CPU kernel writes the derivative in the storage dtype (Triton's in the arithmetic one)
        grad = torch.empty(lp.shape, dtype=storage if backend == "cpu" else out.dtype, device=lp.device) \
            if want_grad else None
        if backend == "cpu":
            core().losses.kl_penalty(out.numel(), dtype_code(lp), ptr(lp), ptr(ref), _KIND_CODES[kind],
                                     low is not None, 0.0 if low is None else low, high is not None,
                                     0.0 if high is None else high, ptr(out), ptr(grad) if want_grad else 0,
                                     math.inf if d_max is None else float(d_max))
        else:
            if d_max is not None:
                raise ValueError("d_max is implemented by the CPU kernel only")
            from .triton import losses as triton_losses

            triton_losses.kl_penalty(lp, ref, _KIND_CODES[kind], low, high, out, grad)
        # Plain references, not save_for_backward: the buffer is handed to autograd in
        # backward, and logp only anchors the double-backward error (an in-place update of
        # logp after this call must not fail a version check).
        ctx.grad = grad
        ctx.anchor = logp
        ctx.logp_dtype = logp.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad = ctx.grad
        if grad is None:
            if not ctx.needs_input_grad[0]:
                return None, None, None, None, None, None, None
            raise RuntimeError("kl_penalty: backward through this graph has already run; "
                               "pass retain_graph=True to the first backward to run it again")
        keep = _keep_graph()
        scale = _uniform_value(grad_out)
        # a per-token incoming gradient (an aggregation's backward, as verl's agg_loss) is
        # applied by one compiled pass where it can be, a uniform one by torch's scalar multiply
        # (or, for a float32 derivative of narrower log-probs, with the narrowing in one pass)
        if scale is None:
            g = _scale_native(grad, grad_out, fresh=keep)
        elif grad.dtype != ctx.logp_dtype and grad_out.dtype == torch.float32:
            g = _narrow_native(grad, scale, ctx.logp_dtype)
        else:
            g = None
        if g is None:
            if keep:
                g = grad.clone() if scale == 1.0 else grad * grad_out
            else:
                g = grad if scale == 1.0 else (grad.mul_(scale) if scale is not None else grad.mul_(grad_out))
        if not keep:
            ctx.grad = None
        g = _first_order(g.to(ctx.logp_dtype), ctx.anchor, "rlkern::kl_penalty")
        return g, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------
# The custom op: the way in for torch.compile, torch.export, FakeTensor/meta inputs and the
# torch.func transforms. Plain eager calls keep the autograd.Function above (custom-op
# dispatch costs microseconds on a small input).


def _kl_launch(logp: torch.Tensor, ref_logp: torch.Tensor, kind: int, has_lo: bool, lo: float, has_hi: bool,
               hi: float, want_grad: bool):
    storage = logp.dtype if logp.dtype == ref_logp.dtype else compute_dtype(logp, ref_logp)
    lp = logp.to(storage).contiguous()
    ref = ref_logp.to(storage).contiguous()
    out = torch.empty(lp.shape, dtype=compute_dtype(lp), device=lp.device)
    grad = torch.empty_like(out) if want_grad else out.new_empty((0,))
    if _backend.select(lp.device) == "cpu":
        # the kernel's derivative is in the storage dtype; this op's is in the arithmetic one
        g = grad if storage == out.dtype or not want_grad else torch.empty(lp.shape, dtype=storage)
        core().losses.kl_penalty(out.numel(), dtype_code(lp), ptr(lp), ptr(ref), kind, has_lo, lo, has_hi, hi,
                                 ptr(out), ptr(g) if want_grad else 0)
        if g is not grad:
            grad.copy_(g)
    else:
        from .triton import losses as triton_losses

        triton_losses.kl_penalty(lp, ref, kind, lo if has_lo else None, hi if has_hi else None, out,
                                 grad if want_grad else None)
    return out, grad


@torch.library.custom_op("rlkern::kl_penalty", mutates_args=())
def _kl_op(logp: torch.Tensor, ref_logp: torch.Tensor, kind: int, has_lo: bool, lo: float, has_hi: bool,
           hi: float, want_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(estimate, d estimate / d logp) in the arithmetic dtype; the second is empty when
    ``want_grad`` is False."""
    return _kl_launch(logp, ref_logp, kind, has_lo, lo, has_hi, hi, want_grad)


@_kl_op.register_fake
def _kl_fake(logp, ref_logp, kind, has_lo, lo, has_hi, hi, want_grad):
    dtype = compute_dtype(logp, ref_logp)
    out = logp.new_empty(logp.shape, dtype=dtype)
    return out, (logp.new_empty(logp.shape, dtype=dtype) if want_grad else logp.new_empty((0,), dtype=dtype))


def _kl_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[0])
    ctx.logp_dtype = inputs[0].dtype


def _kl_backward(ctx, grad_out, _grad_of_grad):
    grad, logp = ctx.saved_tensors
    g = None if grad.numel() == 0 and grad_out.numel() != 0 else \
        _first_order((grad_out * grad).to(ctx.logp_dtype), logp, "rlkern::kl_penalty")
    return g, None, None, None, None, None, None, None


torch.library.register_autograd("rlkern::kl_penalty", _kl_backward, setup_context=_kl_setup_context)


@_kl_op.register_vmap
def _kl_vmap(info, in_dims, logp, ref_logp, kind, has_lo, lo, has_hi, hi, want_grad):
    # Elementwise: the batch dimension is one more dimension of the same problem.
    size = info.batch_size
    lp = logp.movedim(in_dims[0], 0) if in_dims[0] is not None else logp.expand(size, *logp.shape)
    ref = ref_logp.movedim(in_dims[1], 0) if in_dims[1] is not None else ref_logp.expand(size, *ref_logp.shape)
    out, grad = _kl_op(lp, ref, kind, has_lo, lo, has_hi, hi, want_grad)
    return (out, grad), (0, 0 if want_grad else None)


def _traced(*tensors: torch.Tensor) -> bool:
    """Whether this call must go through the custom op: under torch.compile/export, with
    FakeTensor or meta inputs, or inside a torch.func transform (functorch wrappers)."""
    if torch.compiler.is_compiling():
        return True
    return any(_validate.is_fake(t) or torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


@_dtensor.rowwise(any_shard=True)
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3",
               clamp: Union[None, float, Tuple[Optional[float], Optional[float]]] = None) -> torch.Tensor:
    """Per-token KL estimate of the current policy to a reference policy.

    With log r = ref_logp - logp:

    - ``k1`` = -log r (verl's "kl"),
    - ``k2`` = 0.5 (log r)^2 (verl's "mse"),
    - ``k3`` = exp(log r) - 1 - log r (TRL's per-token KL; verl's "low_var_kl" is k3 with
      ``clamp=10``).

    ``clamp``: a number c bounds the result to [-c, c]; a pair (low, high) gives the bounds
    (None for none). The gradient is zero where the clamp is active.

    ``logp`` and ``ref_logp``: same shape, float32/bfloat16/float16/float64. The result is
    float32 (float64 for float64 inputs) and differentiable in ``logp`` only (``ref_logp`` is
    a constant). NaN or inf inputs give NaN or inf at the same positions (no masking here).
    """
    traced = _traced(logp, ref_logp)
    _validate.tensor("logp", logp, floating=True, allow_fake=traced)
    _validate.tensor("ref_logp", ref_logp, floating=True, allow_fake=traced)
    _validate.same_shape("ref_logp", ref_logp, logp.shape, "logp")
    _validate.same_device(logp=logp, ref_logp=ref_logp)
    _validate.choice("kind", kind, KL_KINDS)
    low, high = clamp_bounds("clamp", clamp)
    if traced and _backend.requested_backend() != "reference":
        try:
            out, _ = _kl_op(logp, ref_logp.detach(), _KIND_CODES[kind], low is not None,
                            0.0 if low is None else low, high is not None, 0.0 if high is None else high,
                            logp.requires_grad)
        except RuntimeError as e:
            if "functorch" not in str(e):
                raise
            raise RuntimeError("rlkern::kl_penalty cannot be differentiated by torch.func.grad/vjp/jacrev (a "
                               "functorch transform); torch.func.vmap works, and so does torch.autograd") from e
        return out
    backend = _backend.select(logp.device)
    if backend == "reference":
        return _ref.kl_penalty(logp, ref_logp.detach(), kind, clamp)
    return _KlPenaltyFunction.apply(logp, ref_logp.detach(), kind, low, high, backend)


def _kl_penalty_capped(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str, clamp, d_max: float) -> torch.Tensor:
    """:func:`kl_penalty` of d = min(ref_logp - logp, d_max): the estimate at the bound and a
    zero gradient where it binds (torch.clamp's convention: it passes at the bound itself).
    OpenRLHF bounds its k3 log-ratio this way (lp - ref >= -10) so that exp cannot overflow:
    d = +inf gives the clamped estimate, not inf - inf. Fused into the CPU kernel (k3 only);
    torch ops elsewhere."""
    traced = _traced(logp, ref_logp)
    plain = type(logp) is torch.Tensor and type(ref_logp) is torch.Tensor  # not a DTensor or another subclass
    if plain and not traced and logp.device.type == "cpu" and _backend.select(logp.device) == "cpu":
        _validate.tensor("logp", logp, floating=True)
        _validate.tensor("ref_logp", ref_logp, floating=True)
        _validate.same_shape("ref_logp", ref_logp, logp.shape, "logp")
        _validate.same_device(logp=logp, ref_logp=ref_logp)
        _validate.choice("kind", kind, KL_KINDS)
        low, high = clamp_bounds("clamp", clamp)
        d_max = None if d_max == math.inf else float(d_max)
        return _KlPenaltyFunction.apply(logp, ref_logp.detach(), kind, low, high, "cpu", d_max)
    # torch ops elsewhere (device tensors, the reference backend, tracing), in float32 at least,
    # as OpenRLHF writes it: torch.clamp keeps NaN and passes no gradient where it binds
    _validate.choice("kind", kind, KL_KINDS)
    low, high = clamp_bounds("clamp", clamp)
    dtype = compute_dtype(logp, ref_logp)
    d = ref_logp.detach().to(dtype) - logp.to(dtype)
    d = d if d_max == math.inf else d.clamp(max=d_max)
    kl = -d if kind == "k1" else (0.5 * d * d if kind == "k2" else torch.exp(d) - 1 - d)
    return kl if low is None and high is None else kl.clamp(min=low, max=high)
