"""Reference log-probabilities and entropy: ``log_softmax`` and ``gather``.

This is the specification the kernels are tested against (in float64). It builds the
full ``[..., V]`` log-softmax, which the kernels never do.

Conventions shared with :mod:`rlkern.logprobs`:

- z = logits / temperature; logp = z[target] - logsumexp(z); entropy = -sum p log p.
- ``ignore_index`` positions give logp = 0 and entropy = 0, with no gradient.
- Top-k / top-p decide a kept set per row; the distribution is renormalised over it.
  Top-k keeps every token whose logit is >= the k-th largest (ties at the boundary all
  kept); top-p, applied after top-k, keeps a token when the probability mass of the
  tokens with a strictly larger logit is < top_p (so tied tokens are kept or dropped
  together, and the largest logit is always kept). The kept set is a constant for
  differentiation. A target outside the kept set gets logp = -inf and no gradient from
  its log-prob.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch


def truncation_threshold(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                         top_p: Optional[float] = None) -> torch.Tensor:
    """Per-row threshold on the raw logits: the kept set is ``logits >= threshold``.

    ``logits`` is ``[N, V]``; returns ``[N]`` (-inf where nothing is cut). Computed in
    ``logits.dtype``; temperature matters only for top-p's probability mass.
    """
    n, v = logits.shape
    threshold = torch.full((n,), float("-inf"), dtype=logits.dtype, device=logits.device)
    if top_k is not None and top_k < v:
        threshold = torch.topk(logits, top_k, dim=-1).values[:, -1]
    if top_p is not None and top_p < 1.0:
        z = torch.where(logits >= threshold[:, None], logits / temperature, float("-inf"))
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
    return threshold


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, ignore_index: int = -100, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """log_softmax(logits / temperature) gathered at ``targets`` (and the entropy)."""
    v = logits.shape[-1]
    x = logits.reshape(-1, v)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    t = targets.reshape(-1)
    ignored = t == ignore_index
    safe_t = torch.where(ignored, 0, t)
    # Ignored rows may hold anything (NaN included); they must not reach the outputs or gradients.
    x = torch.where(ignored[:, None], 0.0, x)
    threshold = truncation_threshold(x.detach(), temperature, top_k, top_p)
    kept = x >= threshold[:, None]
    z = torch.where(kept, x / temperature, float("-inf"))
    logp_all = torch.log_softmax(z, dim=-1)
    target_kept = kept.gather(1, safe_t[:, None])[:, 0]
    logp = logp_all.gather(1, safe_t[:, None])[:, 0]
    logp = torch.where(target_kept, logp, float("-inf"))
    logp = torch.where(ignored, 0.0, logp).reshape(targets.shape)
    if not return_entropy:
        return logp
    # p log p is 0 where p is 0; masking before the product keeps the gradient finite.
    safe_logp_all = torch.where(z == float("-inf"), 0.0, logp_all)
    entropy = -(safe_logp_all.exp() * safe_logp_all).sum(-1)
    entropy = torch.where(ignored, 0.0, entropy).reshape(targets.shape)
    return logp, entropy


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                          return_entropy: bool = False, ignore_index: int = -100):
    """The same from hidden states ``[N, H]`` and an LM head ``[V, H]``: the full logits."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return token_logprobs(logits, targets, temperature=temperature, return_entropy=return_entropy,
                          ignore_index=ignore_index)
