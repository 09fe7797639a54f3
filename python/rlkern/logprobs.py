"""Log-probabilities and entropy of target tokens over large vocabularies.

Trainers turn logits ``[..., V]`` into one log-prob per token with
``log_softmax(logits.float()).gather(...)``, which writes (and keeps for backward) a
float32 copy of the logits, and another for the entropy. Here each row is streamed once
with an online logsumexp; backward recomputes the softmax per row from the logits and
two saved numbers per row (logsumexp, entropy) and writes the gradient of the logits
directly. Extra memory is O(rows), not O(rows x V).

Kernels: C++ on CPU (threaded over rows, GIL released), Triton on CUDA.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch

from . import _backend, _validate
from ._kernel import core, dtype_code, ptr
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
               top_p: Optional[float]) -> torch.Tensor:
    x = layout.tensor
    out = torch.empty(layout.n_rows, dtype=_compute_dtype(x), device=x.device)
    if backend == "cpu":
        core().logprobs.threshold(ptr(x), dtype_code(x), layout.stride0, layout.stride1, layout.inner, layout.n_rows,
                                  layout.V, 1.0 / temperature, top_k or 0, 1.0 if top_p is None else top_p, ptr(out))
        return out
    # GPU: a sort per row, in row chunks so the sort buffers stay near 256 MB.
    rows = x.reshape(-1, layout.V)
    chunk = max(1, (1 << 26) // max(layout.V, 1))
    for i in range(0, layout.n_rows, chunk):
        out[i:i + chunk] = _ref.truncation_threshold(rows[i:i + chunk].to(out.dtype), temperature, top_k, top_p)
    return out


def _stats_forward(backend: str, layout: _Layout, targets: torch.Tensor, threshold: Optional[torch.Tensor],
                   inv_t: float, ignore_index: int, want_entropy: bool):
    x = layout.tensor
    dt = _compute_dtype(x)
    logp = torch.empty(layout.n_rows, dtype=dt, device=x.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if want_entropy else None
    if backend == "cpu":
        core().logprobs.forward(ptr(x), dtype_code(x), layout.stride0, layout.stride1, layout.inner, layout.n_rows,
                                layout.V, ptr(targets), ptr(threshold) if threshold is not None else 0, inv_t,
                                ignore_index, ptr(logp), ptr(lse), ptr(entropy) if entropy is not None else 0)
    else:
        from .triton import logprobs as tk

        tk.forward(tuple(layout), targets, threshold, inv_t, ignore_index, logp, lse, entropy)
    return logp, lse, entropy


def _grad_logits(backend: str, layout: _Layout, targets: torch.Tensor, threshold: Optional[torch.Tensor],
                 inv_t: float, ignore_index: int, lse: torch.Tensor, entropy: Optional[torch.Tensor],
                 grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor]) -> torch.Tensor:
    """Gradient of the logits, contiguous ``[n_rows, V]`` in the logits' dtype."""
    x = layout.tensor
    grad = torch.empty((layout.n_rows, layout.V), dtype=x.dtype, device=x.device)
    if backend == "cpu":
        core().logprobs.backward(ptr(x), dtype_code(x), layout.stride0, layout.stride1, layout.inner, layout.n_rows,
                                 layout.V, ptr(targets), ptr(threshold) if threshold is not None else 0, inv_t,
                                 ignore_index, ptr(lse), ptr(entropy) if entropy is not None else 0,
                                 ptr(grad_logp) if grad_logp is not None else 0,
                                 ptr(grad_entropy) if grad_entropy is not None else 0, ptr(grad))
    else:
        from .triton import logprobs as tk

        tk.backward(tuple(layout), targets, threshold, inv_t, ignore_index, lse, entropy, grad_logp, grad_entropy,
                    grad)
    return grad


def _grad_arg(g: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if g is None else g.reshape(-1).to(dtype).contiguous()


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, want_entropy, ignore_index, top_k, top_p, backend):
        layout = _row_layout(logits)
        flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
        truncating = (top_k is not None and top_k < layout.V) or (top_p is not None and top_p < 1.0)
        threshold = _threshold(backend, layout, temperature, top_k, top_p) if truncating else None
        logp, lse, entropy = _stats_forward(backend, layout, flat_targets, threshold, 1.0 / temperature,
                                            ignore_index, want_entropy)
        ctx.save_for_backward(layout.tensor, flat_targets, threshold, lse, entropy)
        ctx.layout = layout._replace(tensor=None)
        ctx.meta = (temperature, ignore_index, backend, tuple(logits.shape))
        shape = targets.shape
        if want_entropy:
            return logp.view(shape), entropy.view(shape)
        return logp.view(shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        x, targets, threshold, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, backend, shape = ctx.meta
        layout = ctx.layout._replace(tensor=x)
        grad = _grad_logits(backend, layout, targets, threshold, 1.0 / temperature, ignore_index, lse, entropy,
                            _grad_arg(grad_logp, lse.dtype), _grad_arg(grad_entropy, lse.dtype))
        return (grad.view(shape),) + (None,) * 7


# ----------------------------------------------------------------------------- validation


def _check_temperature(temperature) -> float:
    t = _validate.positive("temperature", temperature)
    if not math.isfinite(t):
        raise ValueError(f"temperature must be finite, got {t}")
    return t


def _check_top(top_k, top_p) -> Tuple[Optional[int], Optional[float]]:
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None to disable), got {top_k}")
    if top_p is not None:
        try:
            p = float(top_p)
        except (TypeError, ValueError):
            raise TypeError(f"top_p must be a number in (0, 1] or None, got {top_p!r}") from None
        if not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {p}")
        top_p = p
    return top_k, top_p


def _check_targets(targets, lead_shape, V: int, ignore_index: int, *, low: int = 0, name: str = "targets") -> None:
    _validate.tensor(name, targets)
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {targets.dtype}")
    _validate.same_shape(name, targets, lead_shape, "logits without its last dim")
    if targets.numel():
        bad = ((targets < low) | (targets >= low + V)) & (targets != ignore_index)
        if bool(bad.any()):
            first = targets[bad].reshape(-1)[0].item()
            raise ValueError(f"{name} must be in [{low}, {low + V}) or equal ignore_index ({ignore_index}); "
                             f"got {first}")


def _check_logits(name: str, logits) -> None:
    _validate.tensor(name, logits, floating=True)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")


# ----------------------------------------------------------------------------- public API


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, ignore_index: int = -100, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    r"""Log-probability of each target token, and optionally the entropy, in one pass.

    With z = logits / temperature over the last dimension (size V):

        logp[i]    = z[i, targets[i]] - logsumexp_j z[i, j]
        entropy[i] = -sum_j p[i, j] log p[i, j],   p = softmax(z)

    Args:
        logits: ``[..., V]``, float32, bfloat16, float16 or float64; any strides (rows
            are read in place when the vocabulary dim is contiguous and the leading dims
            collapse into two strides, e.g. ``logits[:, :-1]``; otherwise copied once).
        targets: integer ``[...]`` (the leading shape of ``logits``), values in [0, V) or
            ``ignore_index``.
        temperature: > 0; the distribution is softmax(logits / temperature).
        return_entropy: also return the entropy of the same (tempered, truncated)
            distribution.
        ignore_index: targets equal to it give logp = 0 and entropy = 0, and no gradient.
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

    With top-k/top-p, logp and entropy are those of the renormalised distribution over
    the kept set; the kept set is a constant for differentiation (it is piecewise
    constant in the logits). A target outside the kept set gets logp = -inf and zero
    gradient from its log-prob (the entropy's gradient is unaffected).

    Returns:
        ``logp`` of shape ``targets.shape``, or ``(logp, entropy)`` with
        ``return_entropy=True``; float32 (float64 for float64 logits).

    Gradient: d logp / d z_j = [j = target] - p_j and d entropy / d z_j = -p_j (log p_j
    + entropy), divided by the temperature; written directly in the logits' dtype.
    Arithmetic is float32 for float32/bf16/fp16 logits; no ``[..., V]`` float32 buffer is
    created (the kernels keep two float32 numbers per row for backward, plus a
    threshold with top-k/top-p).

    NaN/inf: -inf logits are tokens of probability 0 (fine, also in gradients); a row
    that is entirely -inf, or holds +inf or NaN, gives NaN outputs, as ``log_softmax``
    does. Ignored rows are never read.
    """
    _check_logits("logits", logits)
    _validate.same_device(logits=logits, targets=targets)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    V = logits.shape[-1]
    _check_targets(targets, logits.shape[:-1], V, ignore_index)
    temperature = _check_temperature(temperature)
    top_k, top_p = _check_top(top_k, top_p)
    backend = _kernel_backend(logits.device, logits)
    if backend == "reference":
        return _ref.token_logprobs(logits, targets, temperature=temperature, return_entropy=return_entropy,
                                   ignore_index=ignore_index, top_k=top_k, top_p=top_p)
    return _TokenLogprobs.apply(logits, targets, temperature, bool(return_entropy), ignore_index, top_k, top_p,
                                backend)
