"""Reference log-probabilities and entropy: ``log_softmax`` and ``gather``.

This is the specification the kernels are tested against (in float64). It builds the
full ``[..., V]`` log-softmax, which the kernels never do.

Conventions shared with :mod:`rlkern.logprobs`:

- Soft-capping (``softcap`` c, optional, as Gemma-2's ``final_logit_softcapping``): the
  logits become y = c * tanh(logits / c) first (after the bias, before the temperature:
  transformers caps in the model's forward and TRL divides the capped logits by the
  temperature); everything below applies to y. tanh maps +-inf to +-c, so with a cap an
  infinite logit is just the largest (or smallest) finite one. ``softcap`` is a finite
  number > 0 (ValueError naming it otherwise). With top-k/top-p the kept set is taken on
  y (and top-p's mass on softmax(y / temperature)), as a sampler sees the model's capped
  logits: saturated logits that cap to the same y are tied there.
- ``is_top1`` (``return_top1``): whether the target is the first index of the row's
  largest (capped) logit, as ``torch.argmax`` picks it (the temperature does not move the
  argmax); False for ignored rows and wherever logp is NaN. No gradient.
- z = logits / temperature; logp = z[target] - logsumexp(z); entropy = -sum p log p.
  The row's largest logit is subtracted before dividing by the temperature (softmax does
  not change under a shift), so z never overflows to +inf: large logits and tiny
  temperatures give the exact answer (with T -> 0 the distribution tends to uniform over
  the row's largest logits, and other targets' log-probs to -inf).
- ``temperature`` lies in [``MIN_TEMPERATURE``, ``MAX_TEMPERATURE``] = [2**-126, 2**126]
  (1/temperature is then a normal float32, as the float32 kernels need); outside it is a
  ValueError naming ``temperature``.
- ``targets`` is an integer tensor of dtype ``TARGET_DTYPES`` (uint8, int8, int16,
  int32, int64), compared with ``ignore_index`` by value.
- ``ignore_index`` positions give logp = 0 and entropy = 0, with no gradient, whatever
  their logits hold.
- NaN/inf: -inf logits are tokens of probability 0. A row that is entirely -inf, or holds
  +inf or NaN anywhere, gives NaN logp and NaN entropy (and NaN gradients), as
  ``log_softmax`` of such a row does.
- Top-k / top-p decide a kept set per row; the distribution is renormalised over it.
  Top-k keeps every token whose logit is >= the k-th largest (ties at the boundary all
  kept); top-p, applied after top-k, keeps a token when the probability mass of the
  tokens with a strictly larger logit is < top_p (so tied tokens are kept or dropped
  together, and the largest logit is always kept). A row holding NaN or +inf keeps
  every token (so it is NaN as above, whatever its target); with a cap, +inf is the
  finite y = c and only NaN does. The kept set is a constant for differentiation. A target
  outside the kept set gets logp = -inf and no gradient from its log-prob.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

MIN_TEMPERATURE = 2.0**-126
MAX_TEMPERATURE = 2.0**126
TARGET_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def as_float(name: str, value, what: str = "a number") -> float:
    """``value`` as a float (an int beyond the float range is inf), or a TypeError naming
    ``name`` for a bool or a non-number."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        return math.inf
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {what}, got {value!r}") from None


def check_temperature(temperature) -> float:
    """``temperature`` as a float, or a ValueError/TypeError naming it."""
    t = as_float("temperature", temperature)
    if not (MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
        raise ValueError(f"temperature must be in [2**-126, 2**126] (about [1.2e-38, 8.5e37]: 1/temperature must be "
                         f"a normal float32), got {temperature!r}")
    return t


def check_softcap(softcap) -> Optional[float]:
    """``softcap`` as a float (None stays None), or a ValueError/TypeError naming it."""
    if softcap is None:
        return None
    c = as_float("softcap", softcap, "a positive number or None")
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"softcap must be a finite number > 0 (or None to disable), got {softcap!r}")
    return c


def _shifted(x: torch.Tensor) -> torch.Tensor:
    """x minus its row's largest value (a constant for differentiation): at most 0, so
    dividing by a tiny temperature cannot overflow to +inf. A row whose largest value is
    +inf, -inf or NaN comes out NaN everywhere, as its log-softmax is."""
    return x - x.detach().amax(dim=-1, keepdim=True)


def truncation_threshold(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                         top_p: Optional[float] = None) -> torch.Tensor:
    """Per-row threshold on the raw logits: the kept set is ``~(logits < threshold)``.

    ``logits`` is ``[N, V]``; returns ``[N]`` (-inf where nothing is cut, and for rows
    holding NaN or +inf, which are NaN whatever the kept set). Computed in ``logits.dtype``; temperature matters only for top-p's
    probability mass.
    """
    n, v = logits.shape
    threshold = torch.full((n,), float("-inf"), dtype=logits.dtype, device=logits.device)
    if top_k is not None and top_k < v:
        threshold = torch.topk(logits, top_k, dim=-1).values[:, -1]
    if top_p is not None and top_p < 1.0:
        z = torch.where(logits >= threshold[:, None], _shifted(logits) / temperature, float("-inf"))
        values, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(values, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # Mass strictly above a value: the mass before the first member of its tie group.
        group_start = torch.ones_like(values, dtype=torch.bool)
        group_start[:, 1:] = values[:, 1:] != values[:, :-1]
        mass_above = torch.cummax(torch.where(group_start, mass_before, float("-inf")), dim=-1).values
        kept = mass_above < top_p
        kept[:, 0] = True
        last_kept = kept.sum(dim=-1) - 1
        sorted_logits = torch.gather(logits, 1, order)
        threshold = torch.maximum(threshold, sorted_logits.gather(1, last_kept[:, None])[:, 0])
    undefined = (torch.isnan(logits) | (logits == float("inf"))).any(dim=-1)
    return torch.where(undefined, float("-inf"), threshold)


def _check_targets(targets: torch.Tensor) -> None:
    if targets.dtype not in TARGET_DTYPES:
        raise TypeError(f"targets must be an integer tensor (uint8, int8, int16, int32 or int64), "
                        f"got {targets.dtype}")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, ignore_index: int = -100, top_k: Optional[int] = None,
                   top_p: Optional[float] = None, softcap: Optional[float] = None, return_top1: bool = False):
    """log_softmax(y / temperature) gathered at ``targets``, y = the (soft-capped) logits;
    then the entropy and ``is_top1`` as asked: ``logp``, ``(logp, entropy)``,
    ``(logp, is_top1)`` or ``(logp, entropy, is_top1)``."""
    temperature = check_temperature(temperature)
    softcap = check_softcap(softcap)
    _check_targets(targets)
    v = logits.shape[-1]
    x = logits.reshape(-1, v)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    t = targets.reshape(-1).to(torch.int64)
    ignored = t == ignore_index
    safe_t = torch.where(ignored, 0, t)
    # Ignored rows may hold anything (NaN included); they must not reach the outputs or gradients.
    x = torch.where(ignored[:, None], 0.0, x)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    threshold = truncation_threshold(x.detach(), temperature, top_k, top_p)
    kept = ~(x < threshold[:, None])  # NaN is kept: it must reach the outputs
    z = torch.where(kept, _shifted(x) / temperature, float("-inf"))
    logp_all = torch.log_softmax(z, dim=-1)
    target_kept = kept.gather(1, safe_t[:, None])[:, 0]
    logp = logp_all.gather(1, safe_t[:, None])[:, 0]
    logp = torch.where(target_kept, logp, float("-inf"))
    logp = torch.where(ignored, 0.0, logp)
    out = [logp.reshape(targets.shape)]
    if return_entropy:
        # p log p is 0 where p is 0 (a token outside the kept set, of logit -inf, or whose
        # probability underflows to 0); masking before the product keeps the gradient finite
        # (log p may be near -3e38 in float32, where d(p log p)/d log p = p (1 + log p) would
        # overflow to 0 * inf). NaN (a row of -inf, +inf or NaN) stays NaN.
        safe_logp_all = torch.where(logp_all.detach().exp() == 0, 0.0, logp_all)
        entropy = -(safe_logp_all.exp() * safe_logp_all).sum(-1)
        out.append(torch.where(ignored, 0.0, entropy).reshape(targets.shape))
    if return_top1:
        top1 = (x.detach().argmax(-1) == safe_t) & ~ignored & ~torch.isnan(logp.detach())
        out.append(top1.reshape(targets.shape))
    return out[0] if len(out) == 1 else tuple(out)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                          return_entropy: bool = False, ignore_index: int = -100, softcap: Optional[float] = None,
                          return_top1: bool = False):
    """The same from hidden states ``[N, H]`` and an LM head ``[V, H]``: the full logits
    ``hidden @ weight.T + bias``, soft-capped after the bias."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return token_logprobs(logits, targets, temperature=temperature, return_entropy=return_entropy,
                          ignore_index=ignore_index, softcap=softcap, return_top1=return_top1)
