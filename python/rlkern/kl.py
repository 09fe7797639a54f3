"""KL estimators between the current policy and a reference policy, per token.

Used as a penalty in the reward (``kl_penalty`` on its own) or as a loss term
(``rlkern.losses.policy_loss(..., ref_logp=..., kl_coef=...)``).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from . import _backend, _dtensor, _validate
from ._kernel import compute_dtype, core, dtype_code, ptr
from .reference import kl as _ref
from .reference.kl import KL_KINDS, clamp_bounds

__all__ = ["kl_penalty", "KL_KINDS"]

_KIND_CODES = {"k1": 0, "k2": 1, "k3": 2}


class _KlPenaltyFunction(torch.autograd.Function):
    """Forward computes the estimate and d kl / d logp in one pass and saves only that
    derivative; backward scales it by the incoming gradient."""

    @staticmethod
    def forward(ctx, logp, ref_logp, kind, low, high, backend):
        storage = logp.dtype if logp.dtype == ref_logp.dtype else compute_dtype(logp, ref_logp)
        lp = logp.to(storage).contiguous()
        ref = ref_logp.to(storage).contiguous()
        want_grad = ctx.needs_input_grad[0]
        out = torch.empty(lp.shape, dtype=compute_dtype(lp), device=lp.device)
        grad = torch.empty_like(out) if want_grad else None
        if backend == "cpu":
            core().losses.kl_penalty(out.numel(), dtype_code(lp), ptr(lp), ptr(ref), _KIND_CODES[kind],
                                     low is not None, 0.0 if low is None else low, high is not None,
                                     0.0 if high is None else high, ptr(out), ptr(grad) if want_grad else 0)
        else:
            from .triton import losses as triton_losses

            triton_losses.kl_penalty(lp, ref, _KIND_CODES[kind], low, high, out, grad)
        ctx.save_for_backward(grad)
        ctx.logp_dtype = logp.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        g = None if grad is None else (grad_out * grad).to(ctx.logp_dtype)
        return g, None, None, None, None, None


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
    _validate.tensor("logp", logp, floating=True)
    _validate.tensor("ref_logp", ref_logp, floating=True)
    _validate.same_shape("ref_logp", ref_logp, logp.shape, "logp")
    _validate.same_device(logp=logp, ref_logp=ref_logp)
    _validate.choice("kind", kind, KL_KINDS)
    low, high = clamp_bounds("clamp", clamp)
    backend = _backend.select(logp.device)
    if backend == "reference":
        return _ref.kl_penalty(logp, ref_logp.detach(), kind, clamp)
    return _KlPenaltyFunction.apply(logp, ref_logp.detach(), kind, low, high, backend)
