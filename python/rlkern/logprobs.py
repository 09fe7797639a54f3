"""Log-probabilities and entropy of target tokens over large vocabularies.

Trainers turn logits ``[..., V]`` into one log-prob per token with
``log_softmax(logits.float()).gather(...)``, which writes (and keeps for backward) a
float32 copy of the logits, and another for the entropy. Here each row is streamed once
with an online logsumexp; backward recomputes the softmax per row from the logits and
a few saved numbers per row (the logsumexp as max + log-sum, the entropy) and writes the
gradient of the logits directly. Extra memory is O(rows), not O(rows x V).

Kernels: C++ on CPU (threaded over rows, GIL released), Triton on CUDA (float64 logits
on CUDA take the PyTorch reference path: the Triton kernels accumulate in float32).

Each op is also a torch.library custom op (``torch.ops.rlkern.token_logprobs``,
``linear_token_logprobs``, ``vocab_parallel_token_logprobs``, with fake implementations
and autograd): torch.compile(fullgraph=True), torch.export, FakeTensorMode and meta
tensors go through them; eager calls on plain tensors take the autograd.Functions
directly (a few microseconds less per call).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple, Union

import torch

from . import _backend, _validate
from ._kernel import core, dtype_code, empty_rows, ptr
from .reference import logprobs as _ref

__all__ = ["token_logprobs", "linear_token_logprobs", "vocab_parallel_token_logprobs"]

# Internal target code for "ignored row" when targets are rewritten into a vocabulary
# chunk or shard (where -1 means "the target lives elsewhere").
_IGNORED = -(2**63)


class _Layout(NamedTuple):
    """Rows of the logits as (tensor, stride0, stride1, inner, n_rows, V): row r starts at
    (r // inner) * stride0 + (r % inner) * stride1 and is contiguous."""

    tensor: torch.Tensor
    stride0: int
    stride1: int
    inner: int
    n_rows: int
    V: int


def _row_layout(logits: torch.Tensor) -> _Layout:
    """Address rows without copying when the last dim is contiguous and the leading dims
    collapse into at most two strides (``logits[:, :-1]`` of a ``[B, T, V]`` tensor does)."""
    V = logits.shape[-1]
    n_rows = logits.numel() // V if V else 0
    x = logits if (logits.stride(-1) == 1 or V == 1) else logits.contiguous()
    lead = x.shape[:-1]
    try:
        flat = x.view(-1, V)
        return _Layout(x, 0, flat.stride(0), max(n_rows, 1), n_rows, V)
    except RuntimeError:
        pass
    try:
        three = x.view(-1, lead[-1], V)
        return _Layout(x, three.stride(0), three.stride(1), lead[-1], n_rows, V)
    except RuntimeError:
        x = x.contiguous()
        return _Layout(x, 0, V, max(n_rows, 1), n_rows, V)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _kernel_backend(device: torch.device, logits: torch.Tensor) -> str:
    backend = _backend.select(device, gpu="triton")
    if backend == "cuda":  # log-probs have Triton kernels only
        backend = "triton"
    if backend == "triton" and logits.dtype == torch.float64:
        backend = "reference"  # the Triton kernels accumulate in float32
    return backend


# ----------------------------------------------------------------------------- kernels


def _threshold(backend: str, layout: _Layout, temperature: float, top_k: Optional[int],
               top_p: Optional[float], softcap: Optional[float] = None) -> torch.Tensor:
    """Per-row threshold on the raw logits: the kernels keep ``~(logits < threshold)``.

    With ``softcap`` the kept set is that of the capped logits y (the reference's), given
    back as the smallest raw logit whose y is kept: the cap is monotone, so comparing raw
    logits with it selects exactly that set, and the kernels' own float32 tanh (which may
    round y differently from the one used here) cannot move a token across the boundary."""
    x = layout.tensor
    out = torch.empty(layout.n_rows, dtype=_compute_dtype(x), device=x.device)
    if backend == "cpu":
        top_k = 0 if top_k is None or top_k >= layout.V else top_k
        core().logprobs.threshold(ptr(x), dtype_code(x), layout.stride0, layout.stride1, layout.inner, layout.n_rows,
                                  layout.V, 1.0 / temperature, top_k, 1.0 if top_p is None else top_p,
                                  0.0 if softcap is None else softcap, ptr(out))
        return out
    # GPU: torch's sort per row, over blocks of about 2^24 logits (2^23 in float64 with a
    # cap) so the sort's buffers stay a few hundred MB.
    if softcap is None:
        for start, rows in _row_blocks(layout, max(1, (1 << 24) // layout.V)):
            out[start:start + rows.shape[0]] = _ref.truncation_threshold(rows.to(out.dtype), temperature, top_k,
                                                                         top_p)
        return out
    for start, rows in _row_blocks(layout, max(1, (1 << 23) // layout.V)):
        raw = rows.double()
        y = softcap * torch.tanh(raw / softcap)
        thr_y = _ref.truncation_threshold(y, temperature, top_k, top_p)
        thr = torch.where(y >= thr_y[:, None], raw, float("inf")).amin(-1)
        out[start:start + rows.shape[0]] = torch.where(thr_y == float("-inf"), float("-inf"), thr)
    return out


def _row_blocks(layout: _Layout, max_rows: int):
    """(first row, [rows, V] view) over the rows of ``layout`` without copying them all."""
    if layout.n_rows == 0:
        return
    outer = layout.n_rows // layout.inner
    rows3 = torch.as_strided(layout.tensor, (outer, layout.inner, layout.V), (layout.stride0, layout.stride1, 1))
    for a in range(outer):
        for b in range(0, layout.inner, max_rows):
            yield a * layout.inner + b, rows3[a, b:b + max_rows]


def _stats_forward(backend: str, layout: _Layout, targets: torch.Tensor, threshold: Optional[torch.Tensor],
                   inv_t: float, ignore_index: int, want_entropy: bool, softcap: Optional[float] = None,
                   want_top1: bool = False):
    """Per row: logp, m = max x (raw logits, soft-capped when ``softcap``), log s = log sum
    exp((x - m) * inv_t) (logsumexp of z = x * inv_t is m * inv_t + log s, kept in two terms
    for accuracy far from 0 and so that z itself never has to exist), the entropy (or None)
    and whether the target is the row's first argmax (bool, or None)."""
    x = layout.tensor
    dt = _compute_dtype(x)
    logp = torch.empty(layout.n_rows, dtype=dt, device=x.device)
    row_max = torch.empty_like(logp)
    log_sum = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if want_entropy else None
    top1 = torch.empty(layout.n_rows, dtype=torch.uint8, device=x.device) if want_top1 else None
    if backend == "cpu":
        core().logprobs.forward(ptr(x), dtype_code(x), layout.stride0, layout.stride1, layout.inner, layout.n_rows,
                                layout.V, ptr(targets), ptr(threshold) if threshold is not None else 0, inv_t,
                                ignore_index, 0.0 if softcap is None else softcap, ptr(logp), ptr(row_max),
                                ptr(log_sum), ptr(entropy) if entropy is not None else 0,
                                ptr(top1) if top1 is not None else 0)
    else:
        from .triton import logprobs as tk

        tk.forward(tuple(layout), targets, threshold, inv_t, ignore_index, logp, row_max, log_sum, entropy,
                   softcap=softcap, top1=top1)
    return logp, row_max, log_sum, entropy, None if top1 is None else top1.view(torch.bool)


def _grad_logits(backend: str, layout: _Layout, targets: torch.Tensor, threshold: Optional[torch.Tensor],
                 inv_t: float, ignore_index: int, row_max: torch.Tensor, log_sum: torch.Tensor,
                 entropy: Optional[torch.Tensor],
                 grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                 softcap: Optional[float] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient of the logits, contiguous ``[n_rows, V]`` in the logits' dtype; into ``out``
    when given, which may be the logits themselves when they are contiguous and there is
    no threshold (both kernels read a row's block before writing the same block, and only
    a threshold makes them read the target's logit from elsewhere in the row)."""
    x = layout.tensor
    grad = empty_rows(x, (layout.n_rows, layout.V), x.dtype) if out is None else out
    if backend == "cpu":
        core().logprobs.backward(ptr(x), dtype_code(x), layout.stride0, layout.stride1, layout.inner, layout.n_rows,
                                 layout.V, ptr(targets), ptr(threshold) if threshold is not None else 0, inv_t,
                                 ignore_index, 0.0 if softcap is None else softcap, ptr(row_max), ptr(log_sum),
                                 ptr(entropy) if entropy is not None else 0,
                                 ptr(grad_logp) if grad_logp is not None else 0,
                                 ptr(grad_entropy) if grad_entropy is not None else 0, ptr(grad))
    else:
        from .triton import logprobs as tk

        tk.backward(tuple(layout), targets, threshold, inv_t, ignore_index, row_max, log_sum, entropy, grad_logp,
                    grad_entropy, grad, softcap=softcap)
    return grad


def _first_order_only(op: str):
    """Like torch's once_differentiable, with an error that names the op: the backward runs
    without graph, and when a second differentiation was asked for (create_graph=True),
    its gradients carry a node that raises only if they are differentiated."""
    message = f"rlkern::{op}: double backward (differentiating its gradient again) is not supported".encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            # Grad mode during backward means create_graph=True: the gradient depends on the
            # saved inputs even when the incoming gradients are constants.
            if not torch.is_grad_enabled():
                return outputs
            error = torch._C._functions.DelayedError(message, len(outputs))
            return error(*[None if o is None else o.detach().requires_grad_() for o in outputs])
        return wrapper
    return decorate


def _grad_arg(g: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if g is None else g.reshape(-1).to(dtype).contiguous()


def _token_forward(logits, targets, temperature, want_entropy, ignore_index, top_k, top_p, backend, softcap=None,
                   want_top1=False):
    """(layout, int64 targets, threshold or None, logp, row max, log-sum, entropy or None,
    top1 or None), flat."""
    layout = _row_layout(logits)
    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    truncating = (top_k is not None and top_k < layout.V) or (top_p is not None and top_p < 1.0)
    threshold = _threshold(backend, layout, temperature, top_k, top_p, softcap) if truncating else None
    logp, row_max, log_sum, entropy, top1 = _stats_forward(backend, layout, flat_targets, threshold,
                                                           1.0 / temperature, ignore_index, want_entropy, softcap,
                                                           want_top1)
    return layout, flat_targets, threshold, logp, row_max, log_sum, entropy, top1


def _outputs(logp, entropy, top1):
    """``logp``, or the tuple of the outputs asked for (entropy and top1 are None when not)."""
    if entropy is None and top1 is None:
        return logp
    return tuple(o for o in (logp, entropy, top1) if o is not None)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, want_entropy, ignore_index, top_k, top_p, backend, softcap,
                want_top1):
        layout, flat_targets, threshold, logp, row_max, log_sum, entropy, top1 = _token_forward(
            logits, targets, temperature, want_entropy, ignore_index, top_k, top_p, backend, softcap, want_top1)
        ctx.save_for_backward(layout.tensor, flat_targets, threshold, row_max, log_sum, entropy)
        ctx.layout = layout._replace(tensor=None)
        ctx.meta = (temperature, ignore_index, backend, tuple(logits.shape), softcap)
        shape = targets.shape
        if top1 is not None:
            top1 = top1.view(shape)
            ctx.mark_non_differentiable(top1)
        return _outputs(logp.view(shape), entropy.view(shape) if want_entropy else None, top1)

    @staticmethod
    @_first_order_only("token_logprobs")
    def backward(ctx, grad_logp, *grads):
        if not ctx.needs_input_grad[0]:
            return (None,) * 10
        x, targets, threshold, row_max, log_sum, entropy = ctx.saved_tensors
        temperature, ignore_index, backend, shape, softcap = ctx.meta
        grad_entropy = grads[0] if entropy is not None else None
        layout = ctx.layout._replace(tensor=x)
        dt = row_max.dtype
        grad = _grad_logits(backend, layout, targets, threshold, 1.0 / temperature, ignore_index, row_max, log_sum,
                            entropy, _grad_arg(grad_logp, dt), _grad_arg(grad_entropy, dt), softcap)
        return (grad.view(shape),) + (None,) * 9


# ----------------------------------------------------------------------------- validation


_check_temperature = _ref.check_temperature
_check_softcap = _ref.check_softcap

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_int(name: str, value, *, low: int = _INT64_MIN) -> int:
    """A Python int that fits the kernels' int64, or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not (low <= value <= _INT64_MAX):
        raise ValueError(f"{name} must be in [{'-2**63' if low == _INT64_MIN else low}, 2**63 - 1] (an int64), "
                         f"got {value}")
    return value


def _check_top(top_k, top_p) -> Tuple[Optional[int], Optional[float]]:
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None to disable), got {top_k}")
    if top_p is not None:
        p = _ref.as_float("top_p", top_p, "a number in (0, 1] or None")
        if not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        top_p = p
    return top_k, top_p


def _check_target_dtype(name: str, targets) -> None:
    _validate.tensor(name, targets, allow_fake=True)
    if targets.dtype not in _ref.TARGET_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (uint8, int8, int16, int32 or int64), got {targets.dtype}")


def _check_targets(targets, lead_shape, V: int, ignore_index: int, *, low: int = 0, name: str = "targets") -> None:
    _check_target_dtype(name, targets)
    _validate.same_shape(name, targets, lead_shape, "logits without its last dim")
    if targets.numel():
        t = targets.to(torch.int64)
        bad = ((t < low) | (t >= low + V)) & (t != ignore_index)
        if bool(bad.any()):
            first = t[bad].reshape(-1)[0].item()
            raise ValueError(f"{name} must be in [{low}, {low + V}) or equal ignore_index ({ignore_index}); "
                             f"got {first}")


def _check_logits(name: str, logits) -> None:
    _validate.tensor(name, logits, floating=True, allow_fake=True)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")


# ----------------------------------------------------------------------------- public API


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, ignore_index: int = -100, top_k: Optional[int] = None,
                   top_p: Optional[float] = None, softcap: Optional[float] = None, return_top1: bool = False
                   ) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    r"""Log-probability of each target token, and optionally the entropy, in one pass.

    With z = logits / temperature over the last dimension (size V):

        logp[i]    = z[i, targets[i]] - logsumexp_j z[i, j]
        entropy[i] = -sum_j p[i, j] log p[i, j],   p = softmax(z)

    Args:
        logits: ``[..., V]``, float32, bfloat16, float16 or float64; any strides (rows
            are read in place when the vocabulary dim is contiguous and the leading dims
            collapse into two strides, e.g. ``logits[:, :-1]``; otherwise copied once).
        targets: ``[...]`` (the leading shape of ``logits``), uint8, int8, int16, int32 or
            int64, values in [0, V) or ``ignore_index``.
        temperature: in [2**-126, 2**126] (about [1.2e-38, 8.5e37]; outside, a
            ValueError); the distribution is softmax(logits / temperature), computed as
            softmax((logits - row max) / temperature), so neither a tiny temperature nor
            a huge logit overflows: as the temperature goes to 0 the distribution tends
            to uniform over the row's largest logits (other targets' log-probs to -inf).
        return_entropy: also return the entropy of the same (tempered, truncated)
            distribution.
        ignore_index: an int64; targets equal to it give logp = 0 and entropy = 0, and no
            gradient.
        top_k: keep the tokens whose logit is >= the k-th largest of the row (all tokens
            tied with the k-th are kept, as HF's ``TopKLogitsWarper`` and vLLM's
            threshold-based top-k do).
        top_p: in (0, 1]; after top-k, keep a token when the probability mass (under
            softmax(z) renormalised over the top-k set) of the tokens with a strictly
            larger logit is < top_p. This is the sampler's nucleus rule (HF
            ``TopPLogitsWarper``, vLLM ``apply_top_k_top_p``: drop the tail whose
            ascending cumulative mass is <= 1 - top_p, always keeping the top token)
            with ties at the boundary resolved by keeping the whole tie group, where a
            sort-based sampler would cut inside it in an arbitrary order. top_p = 1
            keeps everything.
        softcap: soft-cap the logits first, y = softcap * tanh(logits / softcap), as
            Gemma-2's ``final_logit_softcapping`` (transformers caps the logits, TRL then
            divides them by the temperature: z = y / temperature). A finite number > 0,
            or None. With top_k/top_p the kept set is that of the capped logits y (top-p's
            mass under softmax(y / temperature)), as a sampler (vLLM: temperature, then
            top-k/top-p) sees the model's capped output; logits that saturate to the same
            y are tied there. Forward and backward (dy/dx = 1 - tanh^2, entropy
            included); +-inf logits become +-softcap, as ``torch.tanh`` makes them.
        return_top1: also return ``is_top1`` (bool, no gradient): whether the target is
            the first index of the row's largest (capped) logit, as ``torch.argmax``
            picks it; computed in the same pass. False for ignored rows and wherever
            logp is NaN.

    With top-k/top-p, logp and entropy are those of the renormalised distribution over
    the kept set; the kept set is a constant for differentiation (it is piecewise
    constant in the logits). A target outside the kept set gets logp = -inf and zero
    gradient from its log-prob (the entropy's gradient is unaffected).

    Returns:
        ``logp`` of shape ``targets.shape``, or the tuple ``(logp, entropy, is_top1)`` of
        those asked for (``(logp, entropy)``, ``(logp, is_top1)``); float32 (float64 for
        float64 logits), ``is_top1`` bool.

    Under torch.compile / torch.export, and for FakeTensor or meta inputs, the call goes
    through the custom op ``torch.ops.rlkern.token_logprobs``; the target range check
    then cannot read values, and a target outside [0, V) gives a NaN log-prob instead of a
    ValueError. ``logits`` may be a DTensor: sharded over the vocabulary (``Shard(-1)``) it
    takes :func:`vocab_parallel_token_logprobs` over that mesh dimension's process group
    (no top-k/top-p there); sharded over a leading dim or replicated, each rank computes
    its local shard. ``targets`` is then a DTensor or the full plain tensor, and the
    outputs are DTensors (replicated over the vocabulary mesh dimension).

    Gradient: d logp / d z_j = [j = target] - p_j and d entropy / d z_j = -p_j (log p_j
    + entropy), divided by the temperature; written directly in the logits' dtype.
    Arithmetic is float32 for float32/bf16/fp16 logits; no ``[..., V]`` float32 buffer is
    created (the kernels keep two float32 numbers per row for backward, plus a
    threshold with top-k/top-p).

    NaN/inf: -inf logits are tokens of probability 0 (fine, also in gradients); a row
    that is entirely -inf, or holds +inf or NaN, gives NaN logp and NaN entropy (and NaN
    gradients), as ``log_softmax`` does (with top-k/top-p such a row keeps every token,
    so the NaN is never cut away). Ignored rows are never read. The specification is
    :mod:`rlkern.reference.logprobs`.
    """
    _reject_func_transforms("token_logprobs")
    softcap = _check_softcap(softcap)
    if _is_dtensor(logits) or _is_dtensor(targets):
        return _dtensor_token_logprobs(logits, targets, temperature=temperature, return_entropy=return_entropy,
                                       ignore_index=ignore_index, top_k=top_k, top_p=top_p, softcap=softcap,
                                       return_top1=return_top1)
    _check_logits("logits", logits)
    _check_target_dtype("targets", targets)
    _validate.same_device(logits=logits, targets=targets)
    ignore_index = _check_int("ignore_index", ignore_index)
    temperature = _check_temperature(temperature)
    top_k, top_p = _check_top(top_k, top_p)
    want_entropy, want_top1 = bool(return_entropy), bool(return_top1)
    if _traced(logits, targets):
        _validate.same_shape("targets", targets, logits.shape[:-1], "logits without its last dim")
        if _kernel_backend(logits.device, logits) == "reference":  # plain torch ops (meta tensors too)
            return _ref.token_logprobs(logits, targets, temperature=temperature, return_entropy=want_entropy,
                                       ignore_index=ignore_index, top_k=top_k, top_p=top_p, softcap=softcap,
                                       return_top1=want_top1)
        logp, entropy, _, _, _, top1 = torch.ops.rlkern.token_logprobs(logits, targets, temperature, want_entropy,
                                                                       ignore_index, top_k, top_p, softcap,
                                                                       want_top1)
        shape = targets.shape
        return _outputs(logp.view(shape), entropy.view(shape) if want_entropy else None,
                        top1.view(shape) if want_top1 else None)
    _check_targets(targets, logits.shape[:-1], logits.shape[-1], ignore_index)
    backend = _kernel_backend(logits.device, logits)
    if backend == "reference":
        return _ref.token_logprobs(logits, targets, temperature=temperature, return_entropy=want_entropy,
                                   ignore_index=ignore_index, top_k=top_k, top_p=top_p, softcap=softcap,
                                   return_top1=want_top1)
    return _TokenLogprobs.apply(logits, targets, temperature, want_entropy, ignore_index, top_k, top_p,
                                backend, softcap, want_top1)


# ----------------------------------------------------------------------------- linear head

# Elements of one [tokens, vocabulary] chunk of logits (16 MB in float32).
_CHUNK_ELEMENTS = 1 << 22

# Bytes of chunk logits that linear_token_logprobs' forward keeps for its backward on the
# CPU (the backward then skips those chunks' recomputing GEMM). The recompute is the one
# GEMM eager torch does not do (four against three, and the GEMMs are nearly all of the
# time on a CPU); with this much kept, logits of up to 512 MiB (e.g. 4096 tokens x 32000
# in float32) cost three GEMMs like eager, which holds about three such copies at its
# peak, and larger ones keep this fixed amount, never N x V. 0 disables.
LINEAR_SAVED_LOGITS_BYTES = 512 << 20


def _local_targets(targets: torch.Tensor, ignore_index: int, start: int, size: int) -> torch.Tensor:
    """Targets relative to a vocabulary slice [start, start + size): -1 when the target
    lies outside it, _IGNORED for ignored rows."""
    local = targets - start
    owned = (local >= 0) & (local < size)
    return torch.where(targets == ignore_index, _IGNORED, torch.where(owned, local, -1)).contiguous()


class _ChunkProducts:
    """The chunk products ``hidden[n0:n1] @ weight[v0:v1].T + bias[v0:v1]`` into two
    buffers reused by every chunk (no allocation, no page faults per chunk).

    bf16/fp16 on the CPU multiply in float32 (torch's half-precision GEMMs there run a few
    times slower than its float32 one where the CPU has no bf16 instructions) and round
    the product to the inputs' dtype once, as ``hidden @ weight.T + bias`` rounds its
    float32 accumulation; ``hidden`` is converted once, each weight chunk once per pass.
    The backward's products with the logits' gradient (``compute`` dtype) also run in
    float32 then."""

    def __init__(self, hidden, weight, bias, chunk_tokens, chunk_vocab):
        self.dtype = hidden.dtype
        self.upcast = hidden.device.type == "cpu" and hidden.dtype in (torch.bfloat16, torch.float16)
        self.compute = torch.float32 if self.upcast else hidden.dtype
        self.hidden = hidden.to(self.compute)
        self.weight, self.bias = weight, bias
        n = min(chunk_tokens, hidden.shape[0]) * min(chunk_vocab, weight.shape[0])
        # Plain allocations, not empty_rows' huge pages: these buffers are faulted in once
        # per call and then reused, and on a busy machine a huge-page fault can wait on
        # memory compaction (measured: the chunk GEMMs writing into a fresh huge-page
        # store ran 4x slower than into plain pages).
        self.buf = torch.empty((n,), dtype=self.compute, device=hidden.device)
        self.low = torch.empty((n,), dtype=self.dtype, device=hidden.device) if self.upcast else None

    def weight_chunk(self, v0, v1):
        """(weight rows, bias) of a vocabulary chunk in the compute dtype."""
        b = None if self.bias is None else self.bias[v0:v1].to(self.compute)
        return self.weight[v0:v1].to(self.compute), b

    def logits(self, n0, n1, w_c, b_c, keep=None):
        """The chunk's logits in the inputs' dtype: a contiguous view of the buffers, valid
        until the next call, or ``keep`` (a contiguous tensor of the chunk's shape and the
        inputs' dtype) when given."""
        shape = (n1 - n0, w_c.shape[0])
        out = self.buf[:shape[0] * shape[1]].view(shape) if (keep is None or self.upcast) else keep
        if b_c is None:
            torch.mm(self.hidden[n0:n1], w_c.t(), out=out)
        else:
            torch.addmm(b_c, self.hidden[n0:n1], w_c.t(), out=out)
        if not self.upcast:
            return out
        low = self.low[:out.numel()].view(shape) if keep is None else keep
        low.copy_(out)
        return low

    def grad_buffer(self, shape):
        """A buffer for the gradient of a kept chunk's logits (the inputs' dtype)."""
        flat = self.low if self.upcast else self.buf
        return flat[:shape[0] * shape[1]].view(shape)

    def compute_view(self, grad):
        """The gradient of a chunk's logits (a view of ``low``) in the compute dtype."""
        if not self.upcast:
            return grad
        out = self.buf[:grad.numel()].view(grad.shape)
        out.copy_(grad)
        return out


def _linear_forward(hidden, weight, bias, targets, temperature, want_entropy, ignore_index, chunk_tokens,
                    chunk_vocab, softcap=None, want_top1=False, keep_bytes=0, kept=None):
    """(logp, row max, log-sum, entropy or None, top1 or None) of [N] rows; see
    linear_token_logprobs. With ``kept`` (a dict), the logits of the first chunks, up to
    ``keep_bytes`` in all, are computed into one storage and left in it under
    ``(v0, n0)`` for the backward."""
    N, V = hidden.shape[0], weight.shape[0]
    inv_t = 1.0 / temperature
    dt = _compute_dtype(hidden)
    need_entropy = want_entropy  # backward uses the entropy only for its own gradient
    n_vchunks = -(-V // chunk_vocab)
    max_chunks = torch.empty((n_vchunks, N), dtype=dt, device=hidden.device)
    logsum_chunks = torch.empty_like(max_chunks)
    ent_chunks = torch.empty_like(max_chunks) if need_entropy else None
    # (Target logit minus its chunk's max) * inv_t, and that max (combined after the loop).
    target_rel = torch.zeros(N, dtype=dt, device=hidden.device)
    target_max = torch.zeros(N, dtype=dt, device=hidden.device)
    # Whether the target is the first argmax of its own chunk (then of the row when no earlier
    # chunk reaches the row's maximum, see below).
    target_top1 = torch.zeros(N, dtype=torch.bool, device=hidden.device) if want_top1 else None
    store, stored = None, 0
    if N:
        products = _ChunkProducts(hidden, weight, bias, chunk_tokens, chunk_vocab)
        backend = _op_backend(hidden)
        if kept is not None:
            store_elements = min(keep_bytes // hidden.element_size(), N * V)
            if store_elements >= min(N, chunk_tokens) * min(V, chunk_vocab):
                # (Plain pages, as the chunk buffers.)
                store = torch.empty((store_elements,), dtype=hidden.dtype, device=hidden.device)
    for c, v0 in enumerate(range(0, V, chunk_vocab)):
        if not N:
            break
        v1 = min(V, v0 + chunk_vocab)
        local_all = _local_targets(targets, ignore_index, v0, v1 - v0)
        w_c, b_c = products.weight_chunk(v0, v1)
        for n0 in range(0, N, chunk_tokens):
            n1 = min(N, n0 + chunk_tokens)
            size = (n1 - n0) * (v1 - v0)
            keep = None
            if store is not None and stored + size <= store.numel():
                keep = store[stored:stored + size].view(n1 - n0, v1 - v0)
                kept[(v0, n0)] = keep
                stored += size
            logits = products.logits(n0, n1, w_c, b_c, keep)
            local = local_all[n0:n1]
            logp, m, log_s, ent, top1 = _stats_forward(backend, _row_layout(logits), local, None, inv_t, _IGNORED,
                                                       need_entropy, softcap, want_top1)
            max_chunks[c, n0:n1] = m
            logsum_chunks[c, n0:n1] = log_s
            if need_entropy:
                ent_chunks[c, n0:n1] = ent
            owned = local >= 0
            target_rel[n0:n1] = torch.where(owned, logp + log_s, target_rel[n0:n1])
            target_max[n0:n1] = torch.where(owned, m, target_max[n0:n1])
            if want_top1:
                target_top1[n0:n1] = torch.where(owned, top1, target_top1[n0:n1])
    if want_top1 and N:
        # The row's first argmax lies in the first chunk whose maximum is the row's.
        first_chunk = (max_chunks == max_chunks.max(0).values).to(torch.uint8).argmax(0)
        target_top1 &= first_chunk == torch.div(targets, chunk_vocab, rounding_mode="floor")
    row_max, log_sum, entropy = _combine_chunks(max_chunks, logsum_chunks, ent_chunks, inv_t)
    ignored = targets == ignore_index
    logp = torch.where(ignored, torch.zeros_like(log_sum),
                       (target_rel + (target_max - row_max) * inv_t) - log_sum)
    if want_top1:
        target_top1 &= ~torch.isnan(logp)
    return logp, row_max, log_sum, entropy, target_top1


def _combine_chunks(max_chunks: torch.Tensor, logsum_chunks: torch.Tensor, ent_chunks: Optional[torch.Tensor],
                    inv_t: float):
    """Max, log-sum and entropy of whole rows from those of their vocabulary chunks
    (``[chunks, rows]`` each); see :func:`_chunk_weights`."""
    M = max_chunks.max(0).values
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    w, rel = _chunk_weights(max_chunks, logsum_chunks, ent_chunks, M, inv_t)
    S = w.sum(0)
    log_s = torch.log(S)
    entropy = None if rel is None else log_s - rel.sum(0) / S
    return M, log_s, entropy


def _chunk_weights(m_c, logsum_c, ent_c, M, inv_t: float):
    """For a slice c of a row with raw max m_c, log s_c and entropy H_c, and a common raw
    reference M (all in z = x * inv_t after scaling): w_c = exp(lse_c - M inv_t) and
    w_c (mean_c(z) - M inv_t), where lse_c - M inv_t = (m_c - M) inv_t + log s_c and
    mean_c(z) = lse_c - H_c is z averaged under the slice's softmax. Summed over slices:
    S = sum w_c gives lse = M inv_t + log S, and H = log S - sum_c w_c (mean_c(z) - M inv_t) / S.
    All terms stay relative to M, so none overflows however small the temperature."""
    lse_rel = (m_c - M) * inv_t + logsum_c
    w = torch.exp(lse_rel)
    if ent_c is None:
        return w, None
    return w, torch.where(w > 0, w * (lse_rel - ent_c), torch.zeros_like(w))


def _linear_backward(hidden, weight, bias, targets, row_max, log_sum, entropy, grad_logp, grad_entropy,
                     temperature, ignore_index, chunk_tokens, chunk_vocab, want_h, want_w, want_b, softcap=None,
                     kept=None):
    """Gradients of hidden, weight and bias (None where not wanted). ``kept``: chunk logits
    the forward left (see _linear_forward), read instead of recomputed and not modified
    (a second backward through a retained graph reads them again)."""
    N, H = hidden.shape
    V = weight.shape[0]
    inv_t = 1.0 / temperature
    g_lp = _grad_arg(grad_logp, log_sum.dtype)
    g_ent = _grad_arg(grad_entropy, log_sum.dtype)
    acc = _compute_dtype(hidden)
    grad_hidden = torch.zeros((N, H), dtype=acc, device=hidden.device) if want_h else None
    # (Written chunk by chunk from the token loop, which an empty batch never enters.)
    grad_weight = (torch.zeros_like(weight) if N == 0 else torch.empty_like(weight)) if want_w else None
    grad_bias = torch.empty_like(bias) if (want_b and bias is not None) else None
    if N == 0:
        if grad_bias is not None:
            grad_bias.zero_()
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype)), grad_weight, grad_bias
    products = _ChunkProducts(hidden, weight, bias, chunk_tokens, chunk_vocab)
    backend = _op_backend(hidden)
    # grad_hidden accumulates in place when the products' dtype is its own (float32 and
    # float64 inputs, and half precision on the CPU, which multiplies in float32).
    fused_h = products.compute == acc
    single_token_chunk = N <= chunk_tokens
    direct_w = single_token_chunk and products.compute == weight.dtype
    for v0 in range(0, V, chunk_vocab):
        v1 = min(V, v0 + chunk_vocab)
        local_all = _local_targets(targets, ignore_index, v0, v1 - v0)
        w_c, b_c = products.weight_chunk(v0, v1)
        gw = None if (direct_w or not want_w) else torch.zeros((v1 - v0, H), dtype=acc, device=weight.device)
        gb = None if grad_bias is None else torch.zeros(v1 - v0, dtype=acc, device=weight.device)
        for n0 in range(0, N, chunk_tokens):
            n1 = min(N, n0 + chunk_tokens)
            logits = None if kept is None else kept.get((v0, n0))
            if logits is None:
                # Recomputed into the buffer, which the gradient then overwrites.
                logits = products.logits(n0, n1, w_c, b_c)
                out = logits
            else:
                out = products.grad_buffer(logits.shape)
            grad = _grad_logits(backend, _row_layout(logits), local_all[n0:n1], None, inv_t, _IGNORED,
                                row_max[n0:n1], log_sum[n0:n1], entropy[n0:n1] if entropy is not None else None,
                                None if g_lp is None else g_lp[n0:n1], None if g_ent is None else g_ent[n0:n1],
                                softcap, out=out)
            g = products.compute_view(grad)
            h_c = products.hidden[n0:n1]
            if want_h:
                if fused_h:
                    grad_hidden[n0:n1].addmm_(g, w_c)
                else:
                    grad_hidden[n0:n1] += g @ w_c
            if want_w:
                if gw is None:
                    torch.mm(g.t(), h_c, out=grad_weight[v0:v1])
                elif g.dtype == acc:
                    gw.addmm_(g.t(), h_c)
                else:
                    gw += g.t() @ h_c
            if gb is not None:
                gb += g.sum(0, dtype=acc)
        if gw is not None:
            grad_weight[v0:v1] = gw
        if gb is not None:
            grad_bias[v0:v1] = gb
    if grad_hidden is not None:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, want_entropy, ignore_index, chunk_tokens,
                chunk_vocab, softcap, want_top1):
        # Chunk logits kept for backward: on the CPU only (device memory is scarcer there and
        # the recompute cheaper), and only when a gradient is wanted.
        kept = {} if hidden.device.type == "cpu" and any(ctx.needs_input_grad[:3]) else None
        logp, row_max, log_sum, entropy, top1 = _linear_forward(hidden, weight, bias, targets, temperature,
                                                                want_entropy, ignore_index, chunk_tokens,
                                                                chunk_vocab, softcap, want_top1,
                                                                LINEAR_SAVED_LOGITS_BYTES, kept)
        ctx.save_for_backward(hidden, weight, bias, targets, row_max, log_sum, entropy)
        # (Not saved tensors: they are intermediates no one else sees, never modified.)
        ctx.kept = kept
        ctx.meta = (temperature, ignore_index, chunk_tokens, chunk_vocab, softcap)
        if top1 is not None:
            ctx.mark_non_differentiable(top1)
        if want_entropy:
            entropy = torch.where(targets == ignore_index, torch.zeros_like(entropy), entropy)
        return _outputs(logp, entropy, top1)

    @staticmethod
    @_first_order_only("linear_token_logprobs")
    def backward(ctx, grad_logp, *grads):
        hidden, weight, bias, targets, row_max, log_sum, entropy = ctx.saved_tensors
        temperature, ignore_index, chunk_tokens, chunk_vocab, softcap = ctx.meta
        grad_entropy = grads[0] if entropy is not None else None
        grads = _linear_backward(hidden, weight, bias, targets, row_max, log_sum, entropy, grad_logp, grad_entropy,
                                 temperature, ignore_index, chunk_tokens, chunk_vocab, *ctx.needs_input_grad[:3],
                                 softcap=softcap, kept=ctx.kept)
        return grads + (None,) * 8


def _default_chunks(N: int, V: int) -> Tuple[int, int]:
    chunk_tokens = max(1, min(N, 2048))
    chunk_vocab = max(256, (_CHUNK_ELEMENTS // chunk_tokens) // 128 * 128)
    return chunk_tokens, min(chunk_vocab, V)


def _resolve_chunks(N: int, V: int, chunk_tokens: Optional[int], chunk_vocab: Optional[int]) -> Tuple[int, int]:
    default_t, default_v = _default_chunks(N, V)
    chunk_tokens = default_t if chunk_tokens is None else max(1, min(chunk_tokens, N))
    chunk_vocab = default_v if chunk_vocab is None else min(chunk_vocab, V)
    return chunk_tokens, chunk_vocab


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                          return_entropy: bool = False, ignore_index: int = -100,
                          chunk_tokens: Optional[int] = None, chunk_vocab: Optional[int] = None,
                          softcap: Optional[float] = None, return_top1: bool = False
                          ) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    r""":func:`token_logprobs` of ``logits = hidden @ weight.T + bias`` without the logits.

    logp[i] = z[i, targets[i]] - logsumexp_j z[i, j] and entropy[i] = -sum_j p log p
    with z = (hidden @ weight.T + bias) / temperature, computed over chunks of
    ``chunk_tokens`` tokens by ``chunk_vocab`` vocabulary entries: torch does each
    chunk's matrix product, the log-prob kernels reduce it to per-row statistics that
    are merged across chunks (logsumexp and entropy merge exactly). Backward recomputes
    each chunk's logits, turns them into their gradient in place of a saved softmax, and
    accumulates ``grad_hidden`` (float32) and ``grad_weight``/``grad_bias`` per
    vocabulary chunk. Peak extra memory is a few chunks plus ``[N, H]`` float32, never
    ``N x V``; the cost is one extra chunk matmul (the recomputation). On the CPU the
    forward keeps the first chunks' logits for the backward, up to
    ``rlkern.logprobs.LINEAR_SAVED_LOGITS_BYTES`` (512 MiB, 0 disables), which then
    recomputes only the others: logits within that budget cost three GEMMs, as eager
    does; bf16/fp16 there multiply in float32 (torch's half-precision CPU GEMM is several
    times slower without bf16 instructions) and round each product to the inputs' dtype.

    Args:
        hidden: ``[..., H]`` float32/bf16/fp16/float64.
        weight: the LM head ``[V, H]``, same dtype as ``hidden``.
        targets: integer ``hidden.shape[:-1]``, values in [0, V) or ``ignore_index``.
        bias: optional ``[V]``, same dtype.
        temperature, return_entropy, ignore_index: as in :func:`token_logprobs`.
        chunk_tokens, chunk_vocab: chunk sizes (default: up to 2048 tokens by
            ~2^22 / tokens vocabulary entries).
        softcap: soft-cap the logits after the bias and before the temperature,
            z = softcap * tanh((hidden @ weight.T + bias) / softcap) / temperature, as
            Gemma-2 with TRL (see :func:`token_logprobs`); the gradients of hidden,
            weight and bias include dy/dx = 1 - tanh^2.
        return_top1: also return ``is_top1`` (bool, no gradient): the target is the
            first argmax of the row's (capped) logits, ties to the lowest index as
            ``torch.argmax``; from the same pass (each chunk's first argmax and maximum).

    Returns ``logp``, or the tuple ``(logp, entropy, is_top1)`` of those asked for,
    float32 (float64 for float64 inputs). The
    chunk products round to the inputs' dtype as ``hidden @ weight.T`` does. No top-k /
    top-p here (a sampler's kept set needs the whole row). NaN/inf follow
    :func:`token_logprobs`: a row whose logits hold NaN or +inf gives NaN.
    """
    _reject_func_transforms("linear_token_logprobs")
    _validate.tensor("hidden", hidden, floating=True, allow_fake=True)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must be [..., H], got shape {tuple(hidden.shape)}")
    _validate.tensor("weight", weight, ndim=2, floating=True, allow_fake=True)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"weight must be [V, {H}] (H from hidden), got shape {tuple(weight.shape)}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight must have at least one row (vocabulary entry)")
    if bias is not None:
        _validate.tensor("bias", bias, floating=True, allow_fake=True)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
        _validate.same_shape("bias", bias, (V,), "weight's first dim")
    _check_target_dtype("targets", targets)
    _validate.same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)
    ignore_index = _check_int("ignore_index", ignore_index)
    temperature = _check_temperature(temperature)
    softcap = _check_softcap(softcap)
    for name, value in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if value is not None and _check_int(name, value) < 1:
            raise ValueError(f"{name} must be >= 1 (or None for the default), got {value}")
    want_entropy, want_top1 = bool(return_entropy), bool(return_top1)
    if _traced(hidden, weight, bias, targets):
        _validate.same_shape("targets", targets, hidden.shape[:-1], "hidden without its last dim")
        if _kernel_backend(hidden.device, hidden) == "reference":  # plain torch ops (meta tensors too)
            return _ref.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                              return_entropy=want_entropy, ignore_index=ignore_index,
                                              softcap=softcap, return_top1=want_top1)
        logp, entropy, _, _, top1 = torch.ops.rlkern.linear_token_logprobs(
            hidden.reshape(-1, H), weight, bias, targets.reshape(-1).to(torch.int64), temperature,
            want_entropy, ignore_index, chunk_tokens, chunk_vocab, softcap, want_top1)
        shape = targets.shape
        return _outputs(logp.view(shape), entropy.view(shape) if want_entropy else None,
                        top1.view(shape) if want_top1 else None)
    _check_targets(targets, hidden.shape[:-1], V, ignore_index)
    if _kernel_backend(hidden.device, hidden) == "reference":
        return _ref.linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                          return_entropy=want_entropy, ignore_index=ignore_index, softcap=softcap,
                                          return_top1=want_top1)
    lead = targets.shape
    h2 = hidden.reshape(-1, H)
    t2 = targets.reshape(-1).to(torch.int64)
    chunk_tokens, chunk_vocab = _resolve_chunks(h2.shape[0], V, chunk_tokens, chunk_vocab)
    out = _LinearTokenLogprobs.apply(h2, weight, bias, t2, temperature, want_entropy, ignore_index,
                                     chunk_tokens, chunk_vocab, softcap, want_top1)
    if isinstance(out, tuple):
        return tuple(o.view(lead) for o in out)
    return out.view(lead)


# ----------------------------------------------------------------------------- vocab parallel


def _vocab_parallel_forward(shard, targets, vocab_start, group, temperature, want_entropy, ignore_index, backend,
                            strict, softcap=None, want_top1=False):
    """(layout, local targets, logp, global max, global log-sum, entropy or None, is_top1 or
    None), flat. A target owned by no rank (or by several) is a ValueError when ``strict``
    (eager: it costs a host sync), else NaN log-prob (and is_top1 False)."""
    import torch.distributed as dist

    layout = _row_layout(shard)
    flat = targets.reshape(-1).to(torch.int64)
    local = _local_targets(flat, ignore_index, vocab_start, layout.V)
    need_entropy = want_entropy
    logp_l, m_l, logsum_l, ent_l, top1_l = _stats_forward(backend, layout, local, None, 1.0 / temperature, _IGNORED,
                                                          need_entropy, softcap, want_top1)
    ignored = flat == ignore_index
    owned = local >= 0
    # Megatron's scheme: all-reduce MAX of the local maxima, then one SUM of
    # [sum exp, entropy term, target logit, owner count] relative to that maximum.
    M_all = m_l.clone()
    dist.all_reduce(M_all, op=dist.ReduceOp.MAX, group=group)
    M = torch.where(torch.isfinite(M_all), M_all, torch.zeros_like(M_all))
    inv_t = 1.0 / temperature
    w, rel = _chunk_weights(m_l, logsum_l, ent_l if need_entropy else None, M, inv_t)
    zero = torch.zeros_like(w)
    rel = zero if rel is None else rel
    target_rel = torch.where(owned, logp_l + ((m_l - M) * inv_t + logsum_l), zero)
    rows = [w, rel, target_rel, owned.to(w.dtype)]
    if want_top1:
        # The row's first argmax (ties to the lowest global index, as torch.argmax on the
        # whole row) lies on the rank of lowest vocab_start among those holding the global
        # maximum: one all-reduce MIN of vocab_start where m_l reaches it. The target is
        # that argmax when its owner is that rank and it is the owner's local first argmax.
        # (The shards are disjoint slices, so the lower start holds the lower ids.)
        first_rank = torch.where(m_l == M_all, vocab_start, _INT64_MAX)
        dist.all_reduce(first_rank, op=dist.ReduceOp.MIN, group=group)
        rows.append((owned & top1_l & (first_rank == vocab_start)).to(w.dtype))
    sums = torch.stack(rows)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    S, rel_sum, target_sum, owners = sums[:4]
    bad = (~ignored) & (owners != 1)
    if strict and bool(bad.any()):
        raise ValueError("targets: every non-ignored target must lie in exactly one rank's vocabulary slice "
                         f"[vocab_start, vocab_start + shard size); row {int(bad.nonzero()[0, 0])} has "
                         f"{int(owners[bad][0].item())} owners")
    log_s = torch.log(S)
    logp = torch.where(ignored, zero, torch.where(bad, float("nan"), target_sum - log_s))
    entropy = (log_s - rel_sum / S) if need_entropy else None
    top1 = None
    if want_top1:
        top1 = (sums[4] > 0) & ~ignored & ~bad & ~torch.isnan(logp)
    return layout, local, logp, M, log_s, entropy, top1


class _VocabParallelTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, targets, vocab_start, group, temperature, want_entropy, ignore_index, backend, softcap,
                want_top1):
        layout, local, logp, M, log_s, entropy, top1 = _vocab_parallel_forward(
            shard, targets, vocab_start, group, temperature, want_entropy, ignore_index, backend, True, softcap,
            want_top1)
        ignored = local == _IGNORED
        zero = torch.zeros_like(logp)
        ctx.save_for_backward(layout.tensor, local, M, log_s, entropy)
        ctx.layout = layout._replace(tensor=None)
        ctx.meta = (temperature, backend, tuple(shard.shape), softcap)
        shape = targets.shape
        if top1 is not None:
            top1 = top1.view(shape)
            ctx.mark_non_differentiable(top1)
        return _outputs(logp.view(shape), torch.where(ignored, zero, entropy).view(shape) if want_entropy else None,
                        top1)

    @staticmethod
    @_first_order_only("vocab_parallel_token_logprobs")
    def backward(ctx, grad_logp, *grads):
        x, local, row_max, log_sum, entropy = ctx.saved_tensors
        temperature, backend, shape, softcap = ctx.meta
        grad_entropy = grads[0] if entropy is not None else None
        dt = log_sum.dtype
        grad = _grad_logits(backend, ctx.layout._replace(tensor=x), local, None, 1.0 / temperature, _IGNORED,
                            row_max, log_sum, entropy, _grad_arg(grad_logp, dt), _grad_arg(grad_entropy, dt), softcap)
        return (grad.view(shape),) + (None,) * 9


def vocab_parallel_token_logprobs(logits_shard: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                                  group=None, *, temperature: float = 1.0, return_entropy: bool = False,
                                  ignore_index: int = -100, softcap: Optional[float] = None,
                                  return_top1: bool = False
                                  ) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    r""":func:`token_logprobs` with the vocabulary split over a torch.distributed group.

    Each rank holds ``logits_shard = logits[..., vocab_start : vocab_start + V_r]`` and
    the same full ``targets``. Each computes its slice's logsumexp and entropy with the
    streaming kernels; one all-reduce MAX of the local logsumexps and one all-reduce
    SUM of (sum of exp, entropy term, target logit, owner count) relative to that
    maximum give, on every rank,

        logp = z[target] - logsumexp over the whole vocabulary,
        entropy = -sum p log p over the whole vocabulary,

    where only the rank owning the target contributes its logit. Backward is local (no
    communication): d/dz_j on this rank's slice = ([j = target] - p_j) g_logp
    - p_j (log p_j + H) g_entropy, over the temperature, with the global logsumexp and
    entropy. Every rank must compute the same downstream loss from the (replicated)
    outputs, as with Megatron's vocab-parallel cross-entropy.

    Args:
        logits_shard: ``[..., V_r]`` floating; the slice sizes may differ across ranks.
        targets: integer ``logits_shard.shape[:-1]``, global vocabulary ids or
            ``ignore_index``; each non-ignored target must be owned by exactly one rank
            (checked, ValueError on every rank otherwise).
        vocab_start: global id of this shard's first column.
        group: the process group (None: the default group).
        temperature, return_entropy, ignore_index: as in :func:`token_logprobs`
            (-inf logits are fine, NaN or +inf anywhere in a row make it NaN).
        softcap: as in :func:`token_logprobs`: each rank caps its slice (the cap is
            elementwise), the statistics merge as without it.
        return_top1: also return ``is_top1`` (bool, the same on every rank, no
            gradient): whether the target is the first argmax of the whole (capped) row,
            ties to the lowest global vocabulary id as ``torch.argmax`` of the unsharded
            row; one more all-reduce (MIN of an int64 per row).

    Returns ``logp``, or the tuple ``(logp, entropy, is_top1)`` of those asked for. No
    top-k/top-p here (the kept set needs the whole row).
    """
    _reject_func_transforms("vocab_parallel_token_logprobs")
    _check_logits("logits_shard", logits_shard)
    _check_target_dtype("targets", targets)
    _validate.same_device(logits_shard=logits_shard, targets=targets)
    vocab_start = _check_int("vocab_start", vocab_start, low=0)
    ignore_index = _check_int("ignore_index", ignore_index)
    _validate.same_shape("targets", targets, logits_shard.shape[:-1], "logits_shard without its last dim")
    temperature = _check_temperature(temperature)
    softcap = _check_softcap(softcap)
    want_entropy, want_top1 = bool(return_entropy), bool(return_top1)
    if _traced(logits_shard, targets):
        logp, entropy, _, _, _, top1 = torch.ops.rlkern.vocab_parallel_token_logprobs(
            logits_shard, targets, vocab_start, "" if group is None else group.group_name, temperature,
            want_entropy, ignore_index, softcap, want_top1)
        shape = targets.shape
        return _outputs(logp.view(shape), entropy.view(shape) if want_entropy else None,
                        top1.view(shape) if want_top1 else None)
    if targets.numel():
        t = targets.to(torch.int64)
        if bool(((t < 0) & (t != ignore_index)).any()):
            raise ValueError(f"targets must be >= 0 or equal ignore_index ({ignore_index})")
    backend = _kernel_backend(logits_shard.device, logits_shard)
    if backend == "reference":
        backend = "cpu" if logits_shard.device.type == "cpu" else "triton"
    return _VocabParallelTokenLogprobs.apply(logits_shard, targets, vocab_start, group, temperature,
                                             want_entropy, ignore_index, backend, softcap, want_top1)


# ----------------------------------------------------------------------------- custom ops
#
# Under torch.compile / torch.export tracing, and for FakeTensor or meta inputs, the public
# functions call these torch.library custom ops: opaque to the tracer, with fake
# implementations that give exact output shapes and dtypes, and autograd through
# register_autograd (backward is another custom op). Eager calls on plain tensors keep the
# autograd.Functions above, whose dispatch costs a few microseconds less. On this path no
# input check reads values (that would be a host sync): a target outside [0, V) gives a
# NaN log-prob instead of a ValueError, and its row gets no log-prob gradient.

Tensor = torch.Tensor


def _traced(*tensors) -> bool:
    """Whether a call must take the custom-op path: tracing, a FakeTensor/meta input, or an
    active FakeTensorMode (whose buffers a kernel could not write)."""
    if torch.compiler.is_compiling():
        return True
    for t in tensors:
        if t is not None and (t.is_meta or type(t) not in _validate.PLAIN_TYPES):
            return True
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def _reject_func_transforms(op: str) -> None:
    """torch.func.grad / vmap / jvp are not supported (the kernels read raw memory, and
    neither the autograd.Functions nor the custom ops carry functorch rules): a clear error
    naming the op and the transform, instead of functorch's generic one."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return
    from torch._C._functorch import TransformType, peek_interpreter_stack

    interpreter = peek_interpreter_stack()
    kind = interpreter.key() if interpreter is not None else None
    if kind == TransformType.Functionalize:
        return
    names = {TransformType.Grad: "grad (torch.func.grad / vjp / jacrev)", TransformType.Vmap: "vmap",
             TransformType.Jvp: "jvp (forward-mode AD)"}
    raise RuntimeError(f"rlkern {op}: the torch.func transform {names.get(kind, str(kind))} is not supported; "
                       "use loss.backward() / torch.autograd.grad (also under torch.compile), and a batch "
                       "dimension instead of vmap")


def _empty(like: Tensor, n, dtype: torch.dtype) -> Tensor:
    return like.new_empty((n,), dtype=dtype)


def _out_of_range(flat_targets: Tensor, V: int, ignore_index: int) -> Tensor:
    return ((flat_targets < 0) | (flat_targets >= V)) & (flat_targets != ignore_index)


def _truncating(top_k: Optional[int], top_p: Optional[float]) -> bool:
    return top_k is not None or (top_p is not None and top_p < 1.0)


def _no_double_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"rlkern::{op}: double backward (differentiating its gradient again) is not supported")
    return backward


def _op_backend(t: Tensor) -> str:
    """The kernel an op runs. The reference cannot run inside a custom op (its autograd is
    not recorded there): the public functions call it directly instead, so here it only
    arises for a direct torch.ops call, which gets the kernels of the device."""
    backend = _kernel_backend(t.device, t)
    if backend == "reference":
        backend = "cpu" if t.device.type == "cpu" else "triton"
    return backend


# --- token_logprobs


@torch.library.custom_op("rlkern::token_logprobs", mutates_args=())
def _token_logprobs_op(logits: Tensor, targets: Tensor, temperature: float, want_entropy: bool, ignore_index: int,
                       top_k: Optional[int], top_p: Optional[float], softcap: Optional[float] = None,
                       want_top1: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flat ``[N]`` logp, entropy (``[0]`` unless wanted), row max, log-sum, the top-k/top-p
    threshold (``[0]`` without them) and is_top1 (bool, ``[0]`` unless wanted)."""
    V = logits.shape[-1]
    flat = targets.reshape(-1).to(torch.int64)
    bad = _out_of_range(flat, V, ignore_index)
    n = flat.numel()
    dt = _compute_dtype(logits)
    layout, flat, threshold, logp, row_max, log_sum, entropy, top1 = _token_forward(
        logits, flat, temperature, want_entropy, ignore_index, top_k, top_p, _op_backend(logits), softcap, want_top1)
    if threshold is None:
        threshold = torch.full((n if _truncating(top_k, top_p) else 0,), float("-inf"), dtype=dt,
                               device=logits.device)
    logp = torch.where(bad, float("nan"), logp)
    if not want_entropy:
        entropy = _empty(logits, 0, dt)
    top1 = top1 & ~bad if want_top1 else _empty(logits, 0, torch.bool)
    return logp, entropy, row_max, log_sum, threshold, top1


@_token_logprobs_op.register_fake
def _(logits, targets, temperature, want_entropy, ignore_index, top_k, top_p, softcap=None, want_top1=False):
    n = targets.numel()
    dt = _compute_dtype(logits)
    return (_empty(logits, n, dt), _empty(logits, n if want_entropy else 0, dt), _empty(logits, n, dt),
            _empty(logits, n, dt), _empty(logits, n if _truncating(top_k, top_p) else 0, dt),
            _empty(logits, n if want_top1 else 0, torch.bool))


@torch.library.custom_op("rlkern::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(logits: Tensor, targets: Tensor, threshold: Tensor, row_max: Tensor,
                                log_sum: Tensor, entropy: Tensor, grad_logp: Optional[Tensor],
                                grad_entropy: Optional[Tensor], temperature: float, ignore_index: int,
                                top_k: Optional[int], top_p: Optional[float], softcap: Optional[float] = None
                                ) -> Tensor:
    V = logits.shape[-1]
    flat = targets.reshape(-1).to(torch.int64).contiguous()
    bad = _out_of_range(flat, V, ignore_index)
    dt = _compute_dtype(logits)
    g_lp = None if grad_logp is None else torch.where(bad, 0.0, grad_logp.reshape(-1).to(dt)).contiguous()
    g_ent = None if grad_entropy is None or entropy.numel() != flat.numel() else grad_entropy
    layout = _row_layout(logits)
    grad = _grad_logits(_op_backend(logits), layout, flat, threshold if threshold.numel() else None, 1.0 / temperature,
                        ignore_index, row_max, log_sum, entropy if g_ent is not None else None, g_lp,
                        _grad_arg(g_ent, dt), softcap)
    return grad.view(logits.shape)


@_token_logprobs_backward_op.register_fake
def _(logits, targets, threshold, row_max, log_sum, entropy, grad_logp, grad_entropy, temperature, ignore_index,
      top_k, top_p, softcap=None):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _token_setup_context(ctx, inputs, output):
    logits, targets, temperature, want_entropy, ignore_index, top_k, top_p, softcap, want_top1 = inputs
    logp, entropy, row_max, log_sum, threshold, top1 = output
    ctx.save_for_backward(logits, targets, threshold, row_max, log_sum, entropy)
    ctx.options = (temperature, ignore_index, top_k, top_p, want_entropy, softcap)
    ctx.mark_non_differentiable(row_max, log_sum, threshold, top1)


def _token_backward(ctx, grad_logp, grad_entropy, *_):
    logits, targets, threshold, row_max, log_sum, entropy = ctx.saved_tensors
    temperature, ignore_index, top_k, top_p, want_entropy, softcap = ctx.options
    if not ctx.needs_input_grad[0]:
        return (None,) * 9
    grad = torch.ops.rlkern.token_logprobs_backward(logits, targets, threshold, row_max, log_sum, entropy, grad_logp,
                                                    grad_entropy if want_entropy else None, temperature,
                                                    ignore_index, top_k, top_p, softcap)
    return (grad,) + (None,) * 8


torch.library.register_autograd("rlkern::token_logprobs", _token_backward, setup_context=_token_setup_context)
torch.library.register_autograd("rlkern::token_logprobs_backward", _no_double_backward("token_logprobs"))


# --- linear_token_logprobs


@torch.library.custom_op("rlkern::linear_token_logprobs", mutates_args=())
def _linear_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
               want_entropy: bool, ignore_index: int, chunk_tokens: Optional[int],
               chunk_vocab: Optional[int], softcap: Optional[float] = None,
               want_top1: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``hidden [N, H]``, int64 ``targets [N]``: logp, entropy (``[0]`` unless wanted), row max,
    log-sum and is_top1 (bool, ``[0]`` unless wanted)."""
    N, V = hidden.shape[0], weight.shape[0]
    bad = _out_of_range(targets, V, ignore_index)
    safe = torch.where(bad, ignore_index, targets)
    dt = _compute_dtype(hidden)
    chunk_tokens, chunk_vocab = _resolve_chunks(N, V, chunk_tokens, chunk_vocab)
    logp, row_max, log_sum, entropy, top1 = _linear_forward(hidden, weight, bias, safe, temperature, want_entropy,
                                                            ignore_index, chunk_tokens, chunk_vocab, softcap,
                                                            want_top1)
    logp = torch.where(bad, float("nan"), logp)
    entropy = torch.where(safe == ignore_index, 0.0, entropy) if want_entropy else _empty(hidden, 0, dt)
    top1 = top1 & ~bad if want_top1 else _empty(hidden, 0, torch.bool)
    return logp, entropy, row_max, log_sum, top1


@_linear_op.register_fake
def _(hidden, weight, bias, targets, temperature, want_entropy, ignore_index, chunk_tokens, chunk_vocab,
      softcap=None, want_top1=False):
    n = hidden.shape[0]
    dt = _compute_dtype(hidden)
    return (_empty(hidden, n, dt), _empty(hidden, n if want_entropy else 0, dt), _empty(hidden, n, dt),
            _empty(hidden, n, dt), _empty(hidden, n if want_top1 else 0, torch.bool))


@torch.library.custom_op("rlkern::linear_token_logprobs_backward", mutates_args=())
def _linear_backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, row_max: Tensor,
                        log_sum: Tensor, entropy: Tensor, grad_logp: Optional[Tensor],
                        grad_entropy: Optional[Tensor], temperature: float, ignore_index: int,
                        chunk_tokens: Optional[int], chunk_vocab: Optional[int], want_hidden: bool,
                        want_weight: bool, want_bias: bool, softcap: Optional[float] = None
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of hidden, weight and bias (``[0]`` where not wanted)."""
    N, V = hidden.shape[0], weight.shape[0]
    bad = _out_of_range(targets, V, ignore_index)
    safe = torch.where(bad, ignore_index, targets)
    dt = _compute_dtype(hidden)
    g_lp = None if grad_logp is None else torch.where(bad, 0.0, grad_logp.to(dt))
    g_ent = None if grad_entropy is None or entropy.numel() != N else grad_entropy
    want_bias = want_bias and bias is not None
    chunk_tokens, chunk_vocab = _resolve_chunks(N, V, chunk_tokens, chunk_vocab)
    grads = _linear_backward(hidden, weight, bias, safe, row_max, log_sum, entropy if g_ent is not None else None,
                             g_lp, g_ent, temperature, ignore_index, chunk_tokens, chunk_vocab, want_hidden,
                             want_weight, want_bias, softcap)
    return tuple(g if g is not None else hidden.new_empty((0,)) for g in grads)


@_linear_backward_op.register_fake
def _(hidden, weight, bias, targets, row_max, log_sum, entropy, grad_logp, grad_entropy, temperature, ignore_index,
      chunk_tokens, chunk_vocab, want_hidden, want_weight, want_bias, softcap=None):
    def like(t, wanted):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device) if wanted and t is not None \
            else hidden.new_empty((0,))
    return like(hidden, want_hidden), like(weight, want_weight), like(bias, want_bias)


def _linear_setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, temperature, want_entropy, ignore_index, chunk_tokens, chunk_vocab, softcap,
     want_top1) = inputs
    logp, entropy, row_max, log_sum, top1 = output
    ctx.save_for_backward(hidden, weight, bias, targets, row_max, log_sum, entropy)
    ctx.options = (temperature, ignore_index, chunk_tokens, chunk_vocab, want_entropy, softcap)
    ctx.mark_non_differentiable(row_max, log_sum, top1)


def _linear_backward_autograd(ctx, grad_logp, grad_entropy, *_):
    hidden, weight, bias, targets, row_max, log_sum, entropy = ctx.saved_tensors
    temperature, ignore_index, chunk_tokens, chunk_vocab, want_entropy, softcap = ctx.options
    want_h, want_w, want_b = ctx.needs_input_grad[:3]
    if not (want_h or want_w or want_b):
        return (None,) * 11
    gh, gw, gb = torch.ops.rlkern.linear_token_logprobs_backward(
        hidden, weight, bias, targets, row_max, log_sum, entropy, grad_logp, grad_entropy if want_entropy else None,
        temperature, ignore_index, chunk_tokens, chunk_vocab, want_h, want_w, want_b and bias is not None, softcap)
    return (gh if want_h else None, gw if want_w else None, gb if (want_b and bias is not None) else None) \
        + (None,) * 8


torch.library.register_autograd("rlkern::linear_token_logprobs", _linear_backward_autograd,
                                setup_context=_linear_setup_context)
torch.library.register_autograd("rlkern::linear_token_logprobs_backward",
                                _no_double_backward("linear_token_logprobs"))


# --- vocab_parallel_token_logprobs


def _group_by_name(name: str):
    import torch.distributed as dist

    if not name:
        return dist.group.WORLD
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


@torch.library.custom_op("rlkern::vocab_parallel_token_logprobs", mutates_args=())
def _vocab_parallel_op(logits_shard: Tensor, targets: Tensor, vocab_start: int, group_name: str, temperature: float,
                       want_entropy: bool, ignore_index: int, softcap: Optional[float] = None,
                       want_top1: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flat logp, entropy (``[0]`` unless wanted), local targets, global max, log-sum and
    is_top1 (bool, ``[0]`` unless wanted). ``group_name`` "" is the default group."""
    layout, local, logp, M, log_s, entropy, top1 = _vocab_parallel_forward(
        logits_shard, targets, vocab_start, _group_by_name(group_name), temperature, want_entropy, ignore_index,
        _op_backend(logits_shard), False, softcap, want_top1)
    dt = _compute_dtype(logits_shard)
    entropy = torch.where(local == _IGNORED, 0.0, entropy) if want_entropy else _empty(logits_shard, 0, dt)
    if not want_top1:
        top1 = _empty(logits_shard, 0, torch.bool)
    return logp, entropy, local, M, log_s, top1


@_vocab_parallel_op.register_fake
def _(logits_shard, targets, vocab_start, group_name, temperature, want_entropy, ignore_index, softcap=None,
      want_top1=False):
    n = targets.numel()
    dt = _compute_dtype(logits_shard)
    return (_empty(logits_shard, n, dt), _empty(logits_shard, n if want_entropy else 0, dt),
            _empty(logits_shard, n, torch.int64), _empty(logits_shard, n, dt), _empty(logits_shard, n, dt),
            _empty(logits_shard, n if want_top1 else 0, torch.bool))


@torch.library.custom_op("rlkern::vocab_parallel_token_logprobs_backward", mutates_args=())
def _vocab_parallel_backward_op(logits_shard: Tensor, local: Tensor, row_max: Tensor, log_sum: Tensor,
                                entropy: Tensor, grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                                temperature: float, softcap: Optional[float] = None) -> Tensor:
    backend = _op_backend(logits_shard)
    dt = log_sum.dtype
    g_ent = grad_entropy if grad_entropy is not None and entropy.numel() == local.numel() else None
    grad = _grad_logits(backend, _row_layout(logits_shard), local, None, 1.0 / temperature, _IGNORED, row_max,
                        log_sum, entropy if g_ent is not None else None, _grad_arg(grad_logp, dt),
                        _grad_arg(g_ent, dt), softcap)
    return grad.view(logits_shard.shape)


@_vocab_parallel_backward_op.register_fake
def _(logits_shard, local, row_max, log_sum, entropy, grad_logp, grad_entropy, temperature, softcap=None):
    return torch.empty(logits_shard.shape, dtype=logits_shard.dtype, device=logits_shard.device)


def _vocab_parallel_setup_context(ctx, inputs, output):
    (logits_shard, targets, vocab_start, group_name, temperature, want_entropy, ignore_index, softcap,
     want_top1) = inputs
    logp, entropy, local, row_max, log_sum, top1 = output
    ctx.save_for_backward(logits_shard, local, row_max, log_sum, entropy)
    ctx.options = (temperature, want_entropy, softcap)
    ctx.mark_non_differentiable(local, row_max, log_sum, top1)


def _vocab_parallel_backward(ctx, grad_logp, grad_entropy, *_):
    logits_shard, local, row_max, log_sum, entropy = ctx.saved_tensors
    temperature, want_entropy, softcap = ctx.options
    if not ctx.needs_input_grad[0]:
        return (None,) * 9
    grad = torch.ops.rlkern.vocab_parallel_token_logprobs_backward(
        logits_shard, local, row_max, log_sum, entropy, grad_logp, grad_entropy if want_entropy else None,
        temperature, softcap)
    return (grad,) + (None,) * 8


torch.library.register_autograd("rlkern::vocab_parallel_token_logprobs", _vocab_parallel_backward,
                                setup_context=_vocab_parallel_setup_context)
torch.library.register_autograd("rlkern::vocab_parallel_token_logprobs_backward",
                                _no_double_backward("vocab_parallel_token_logprobs"))


# ----------------------------------------------------------------------------- DTensor


def _is_dtensor(t) -> bool:
    if type(t) in _validate.PLAIN_TYPES or not isinstance(t, torch.Tensor):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(t, DTensor)


def _dtensor_token_logprobs(logits, targets, *, temperature, return_entropy, ignore_index, top_k, top_p,
                            softcap=None, return_top1=False):
    """token_logprobs of a DTensor ``logits`` (see its docstring): local computation per
    shard, or the vocab-parallel path for a vocabulary-sharded mesh dimension."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(logits, DTensor):
        raise TypeError("targets is a DTensor but logits is not: pass logits as a DTensor too (or both plain)")
    _check_logits("logits", logits.to_local())
    mesh, placements, nd = logits.device_mesh, tuple(logits.placements), logits.dim()
    vocab_dims = []
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, Shard) and p.dim % nd == nd - 1:
            vocab_dims.append(mesh_dim)
        elif not (isinstance(p, Replicate) or isinstance(p, Shard)):
            raise ValueError(f"logits: placement {type(p).__name__} ({p}, mesh dim {mesh_dim}) is not supported by "
                             "token_logprobs; "
                             "use Shard(-1) over the vocabulary, Shard(d) over a leading dim, or Replicate()")
    if len(vocab_dims) > 1:
        raise ValueError(f"logits: the vocabulary is sharded over mesh dims {vocab_dims}; at most one is supported")
    out_placements = tuple(Replicate() if i in vocab_dims else p for i, p in enumerate(placements))
    lead_shape = tuple(logits.shape[:-1])
    if isinstance(targets, DTensor):
        if targets.device_mesh != mesh:
            raise ValueError("targets must be a DTensor on the mesh of logits")
        _validate.same_shape("targets", targets, lead_shape, "logits without its last dim")
        local_targets = targets.redistribute(mesh, out_placements).to_local()
    else:
        _check_target_dtype("targets", targets)
        _validate.same_shape("targets", targets, lead_shape, "logits without its last dim (the full targets)")
        local_shape, offset = compute_local_shape_and_global_offset(lead_shape, mesh, out_placements)
        local_targets = targets[tuple(slice(o, o + n) for o, n in zip(offset, local_shape))]
    local_logits = logits.to_local()
    if vocab_dims:
        if top_k is not None or (top_p is not None and top_p < 1.0):
            raise ValueError("top_k/top_p need whole vocabulary rows: not supported with logits sharded over the "
                             "vocabulary (Shard(-1))")
        _, offset = compute_local_shape_and_global_offset(tuple(logits.shape), mesh, placements)
        out = vocab_parallel_token_logprobs(local_logits, local_targets, int(offset[-1]),
                                            mesh.get_group(vocab_dims[0]), temperature=temperature,
                                            return_entropy=return_entropy, ignore_index=ignore_index,
                                            softcap=softcap, return_top1=return_top1)
    else:
        out = token_logprobs(local_logits, local_targets, temperature=temperature, return_entropy=return_entropy,
                             ignore_index=ignore_index, top_k=top_k, top_p=top_p, softcap=softcap,
                             return_top1=return_top1)
    stride = torch.empty(lead_shape, device="meta").stride()

    def wrap(t):
        return DTensor.from_local(t, mesh, out_placements, run_check=False, shape=torch.Size(lead_shape),
                                  stride=stride)

    return tuple(wrap(o) for o in out) if isinstance(out, tuple) else wrap(out)
