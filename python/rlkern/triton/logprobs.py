"""Triton kernels for token log-probabilities and entropy over large vocabularies.

Forward: one program per row streams the vocabulary in blocks, keeping per-lane online
statistics (max, sum of exp, entropy term; see ``csrc/include/rlkern/logprobs.h``) that
are combined once at the end, so no block pays a cross-lane reduction. Backward: a 2-D
grid (row, vocabulary block) recomputes p = exp((x - m) / T - log s) from the logits and the
saved per-row statistics (m is the row's raw maximum: x / T itself is never formed, it may overflow) and writes the gradient in the logits' dtype.

Rows are addressed as ``(r // inner) * stride0 + (r % inner) * stride1`` with unit stride
along the vocabulary (see :func:`rlkern.logprobs._row_layout`).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .aot import AotSpec

FWD_BLOCK = 2048
FWD_WARPS = 8
BWD_BLOCK = 4096
BWD_WARPS = 8


@triton.jit
def _tanh(u):
    """tanh with Cephes' tanhf split: an odd polynomial for |u| < 0.625, (1 - e) / (1 + e)
    with e = exp(-2|u|) beyond (no cancellation there); +-inf give +-1, NaN stays NaN.
    Also returns e, for the derivative (see _tanh_deriv)."""
    a = tl.abs(u)
    z = a * a
    p = -5.70498872745e-3 * z + 2.06390887954e-2
    p = p * z - 5.37397155531e-2
    p = p * z + 1.33314422036e-1
    p = p * z - 3.33332819422e-1
    small = p * z * a + a
    e = tl.exp(-2.0 * a)
    t = tl.where(a < 0.625, small, (1.0 - e) / (1.0 + e))
    return tl.where(u < 0, -t, t), e


@triton.jit
def _tanh_deriv(u, t, e):
    """1 - tanh(u)^2: from t where it is small, as 4e / (1 + e)^2 where t is near 1 (1 - t^2
    would cancel to 0 long before the true value underflows)."""
    return tl.where(tl.abs(u) < 0.625, 1.0 - t * t, 4.0 * e / ((1.0 + e) * (1.0 + e)))


@triton.jit
def _logprobs_fwd_kernel(logits_ptr, targets_ptr, thr_ptr, logp_ptr, max_ptr, logsum_ptr, ent_ptr, top1_ptr,
                         stride0, stride1, inner, V,
                         inv_t, ignore_index, softcap, HAS_THRESHOLD: tl.constexpr, WANT_ENTROPY: tl.constexpr,
                         SOFTCAP: tl.constexpr, WANT_TOP1: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // inner) * stride0 + (row % inner) * stride1
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    if HAS_THRESHOLD:
        thr = tl.load(thr_ptr + row)
    else:
        thr = float("-inf")
    offs = tl.arange(0, BLOCK)
    m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK], tl.float32)
    a_vec = tl.zeros([BLOCK], tl.float32)
    if WANT_TOP1:
        # Per lane, the first column holding the lane's maximum (updated on a strict increase).
        first_vec = tl.zeros([BLOCK], tl.int32) + V
    # Ignored rows (padding) read nothing.
    stop = tl.where(ignored, 0, V)
    for start in range(0, stop, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        # The threshold is on the raw logits (with a cap, the smallest raw logit whose capped
        # value is kept: see rlkern.logprobs._threshold).
        if HAS_THRESHOLD:
            out = (x < thr) | (cols >= V)
        else:
            out = cols >= V
        if SOFTCAP:
            # y = softcap * tanh(x / softcap); the columns past V stay -inf (tanh would make them -softcap).
            th, _ = _tanh(x / softcap)
            x = softcap * th
        if SOFTCAP or HAS_THRESHOLD:
            x = tl.where(out, float("-inf"), x)
        if WANT_TOP1:
            first_vec = tl.where(x > m_vec, cols, first_vec)
        # The maximum stays in raw units and 1/T scales differences from it only: x / T
        # itself may overflow (tiny temperature, huge logit), (x - m) / T only towards -inf.
        m_new = tl.maximum(m_vec, x)
        # While a lane has seen only -inf, any finite reference gives exp(...) = 0.
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        shift = (m_vec - ref) * inv_t
        f = tl.exp(shift)
        if WANT_ENTROPY:
            # Mass that underflows (f = 0) takes its entropy term with it; shift * s may
            # have overflowed to -inf there, and 0 * -inf would be NaN.
            a_vec = tl.where(f > 0, f * (a_vec + shift * s_vec), 0.0)
        s_vec = s_vec * f
        d = (x - ref) * inv_t
        e = tl.exp(d)
        s_vec += e
        if WANT_ENTROPY:
            a_vec += tl.where(e > 0, e * d, 0.0)
        m_vec = m_new
    m = tl.max(m_vec, 0)
    ref = tl.where(m == float("-inf"), 0.0, m)
    shift = (m_vec - ref) * inv_t
    f = tl.exp(shift)
    s = tl.sum(s_vec * f, 0)
    log_s = tl.log(s)
    has_target = (target >= 0) & (target < V)
    x_t = tl.load(base + tl.where(has_target, target, 0)).to(tl.float32)
    kept = has_target & (~(x_t < thr))
    if SOFTCAP:
        th_t, _ = _tanh(x_t / softcap)
        x_t = softcap * th_t
    logp = tl.where(kept, (x_t - m) * inv_t - log_s, float("-inf"))
    tl.store(logp_ptr + row, tl.where(ignored, 0.0, logp))
    if WANT_TOP1:
        first = tl.min(tl.where(m_vec == m, first_vec, V), 0)
        top1 = (~ignored) & has_target & (first == target) & (logp == logp)
        tl.store(top1_ptr + row, top1.to(tl.uint8))
    tl.store(max_ptr + row, tl.where(ignored, 0.0, m))
    tl.store(logsum_ptr + row, tl.where(ignored, 0.0, log_s))
    if WANT_ENTROPY:
        a = tl.sum(tl.where(f > 0, f * (a_vec + shift * s_vec), 0.0), 0)
        tl.store(ent_ptr + row, tl.where(ignored, 0.0, log_s - a / s))


@triton.jit
def _logprobs_bwd_kernel(logits_ptr, targets_ptr, thr_ptr, max_ptr, logsum_ptr, ent_ptr, glp_ptr, gent_ptr, grad_ptr,
                         stride0, stride1, inner, V, inv_t, ignore_index, softcap, HAS_THRESHOLD: tl.constexpr,
                         HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < V
    base = logits_ptr + (row // inner) * stride0 + (row % inner) * stride1
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    # (The interpreter cannot AND a scalar bool into a block mask; broadcast it first.)
    live = in_row & ((tl.zeros([BLOCK], tl.int64) + target) != ignore_index)
    x = tl.load(base + cols, mask=live, other=float("-inf")).to(tl.float32)
    has_target = (target >= 0) & (target < V)
    if HAS_GRAD_LOGP:
        glp = tl.load(glp_ptr + row)
    else:
        glp = 0.0
    if HAS_THRESHOLD:
        # On the raw logits, before the cap (see the forward kernel).
        thr = tl.load(thr_ptr + row)
        dropped = x < thr
        x_t = tl.load(base + tl.where(has_target, target, 0)).to(tl.float32)
        # A target outside the kept set has log-prob -inf and, by definition, no gradient.
        glp = tl.where(has_target & (x_t < thr), 0.0, glp)
    if SOFTCAP:
        # dy/dx = 1 - tanh^2 multiplies the gradient of the capped logits y at the end.
        u = x / softcap
        th, e = _tanh(u)
        dy = _tanh_deriv(u, th, e)
        x = softcap * th
    if HAS_THRESHOLD:
        x = tl.where(dropped, float("-inf"), x)
    d = (x - tl.load(max_ptr + row)) * inv_t - tl.load(logsum_ptr + row)
    p = tl.exp(d)
    g = -glp * p
    if HAS_GRAD_ENTROPY:
        gent = tl.load(gent_ptr + row)
        H = tl.load(ent_ptr + row)
        g -= gent * tl.where(p > 0, p * (d + H), 0.0)
    # 1/T last: [j = t] - p_j cancels before a large 1/T multiplies it.
    g = tl.where(cols == target, g + glp, g) * inv_t
    if SOFTCAP:
        g = g * dy
    g = tl.where(ignored, 0.0, g)
    tl.store(grad_ptr + row * V + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)


def forward(layout, targets: torch.Tensor, threshold: Optional[torch.Tensor], inv_t: float, ignore_index: int,
            logp: torch.Tensor, row_max: torch.Tensor, log_sum: torch.Tensor, entropy: Optional[torch.Tensor],
            softcap: Optional[float] = None, top1: Optional[torch.Tensor] = None) -> None:
    x, stride0, stride1, inner, n_rows, V = layout
    if n_rows == 0:
        return
    _logprobs_fwd_kernel[(n_rows,)](
        x, targets, threshold if threshold is not None else logp, logp, row_max, log_sum,
        entropy if entropy is not None else logp, top1 if top1 is not None else targets,
        stride0, stride1, inner, V, inv_t, ignore_index, 1.0 if softcap is None else softcap,
        HAS_THRESHOLD=threshold is not None, WANT_ENTROPY=entropy is not None, SOFTCAP=softcap is not None,
        WANT_TOP1=top1 is not None, BLOCK=FWD_BLOCK, num_warps=FWD_WARPS)


def backward(layout, targets: torch.Tensor, threshold: Optional[torch.Tensor], inv_t: float, ignore_index: int,
             row_max: torch.Tensor, log_sum: torch.Tensor, entropy: Optional[torch.Tensor],
             grad_logp: Optional[torch.Tensor],
             grad_entropy: Optional[torch.Tensor], grad: torch.Tensor, softcap: Optional[float] = None) -> None:
    x, stride0, stride1, inner, n_rows, V = layout
    if n_rows == 0:
        return
    _logprobs_bwd_kernel[(n_rows, triton.cdiv(V, BWD_BLOCK))](
        x, targets, threshold if threshold is not None else row_max, row_max, log_sum,
        entropy if entropy is not None else row_max, grad_logp if grad_logp is not None else row_max,
        grad_entropy if grad_entropy is not None else row_max, grad,
        stride0, stride1, inner, V, inv_t, ignore_index, 1.0 if softcap is None else softcap,
        HAS_THRESHOLD=threshold is not None, HAS_GRAD_LOGP=grad_logp is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None, SOFTCAP=softcap is not None, BLOCK=BWD_BLOCK,
        num_warps=BWD_WARPS)


def _fwd_spec(dtype: str, has_threshold: bool, want_entropy: bool, softcap: bool = False,
              want_top1: bool = False) -> AotSpec:
    sig = {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "thr_ptr": "*fp32", "logp_ptr": "*fp32",
           "max_ptr": "*fp32", "logsum_ptr": "*fp32", "ent_ptr": "*fp32", "top1_ptr": "*u8", "stride0": "i64",
           "stride1": "i64", "inner": "i64", "V": "i32",
           "inv_t": "fp32", "ignore_index": "i64", "softcap": "fp32", "HAS_THRESHOLD": "constexpr",
           "WANT_ENTROPY": "constexpr", "SOFTCAP": "constexpr", "WANT_TOP1": "constexpr", "BLOCK": "constexpr"}
    return AotSpec(f"logprobs_fwd[{dtype},thr={has_threshold},ent={want_entropy},cap={softcap},top1={want_top1}]",
                   _logprobs_fwd_kernel, sig,
                   {"HAS_THRESHOLD": has_threshold, "WANT_ENTROPY": want_entropy, "SOFTCAP": softcap,
                    "WANT_TOP1": want_top1, "BLOCK": FWD_BLOCK}, num_warps=FWD_WARPS)


def _bwd_spec(dtype: str, has_threshold: bool, has_grad_entropy: bool, softcap: bool = False) -> AotSpec:
    sig = {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "thr_ptr": "*fp32", "max_ptr": "*fp32",
           "logsum_ptr": "*fp32", "ent_ptr": "*fp32", "glp_ptr": "*fp32", "gent_ptr": "*fp32", "grad_ptr": f"*{dtype}",
           "stride0": "i64",
           "stride1": "i64", "inner": "i64", "V": "i32", "inv_t": "fp32", "ignore_index": "i64", "softcap": "fp32",
           "HAS_THRESHOLD": "constexpr", "HAS_GRAD_LOGP": "constexpr", "HAS_GRAD_ENTROPY": "constexpr",
           "SOFTCAP": "constexpr", "BLOCK": "constexpr"}
    return AotSpec(f"logprobs_bwd[{dtype},thr={has_threshold},gent={has_grad_entropy},cap={softcap}]",
                   _logprobs_bwd_kernel, sig,
                   {"HAS_THRESHOLD": has_threshold, "HAS_GRAD_LOGP": True, "HAS_GRAD_ENTROPY": has_grad_entropy,
                    "SOFTCAP": softcap, "BLOCK": BWD_BLOCK}, num_warps=BWD_WARPS)


# The vocabulary size is a runtime argument and every load is masked by `cols < V`, so
# one compile serves vocabularies that are not a multiple of the block (151936, 32001).
AOT_SPECS = [
    *(_fwd_spec(dt, thr, ent) for dt in ("fp32", "bf16") for thr in (False, True) for ent in (False, True)),
    *(_fwd_spec(dt, thr, ent, cap, top1) for dt in ("fp32", "bf16") for thr in (False, True)
      for ent in (False, True) for cap, top1 in ((True, False), (False, True), (True, True))),
    *(_bwd_spec(dt, thr, gent) for dt in ("fp32", "bf16") for thr in (False, True) for gent in (False, True)),
    *(_bwd_spec(dt, thr, gent, True) for dt in ("fp32", "bf16") for thr in (False, True) for gent in (False, True)),
]
