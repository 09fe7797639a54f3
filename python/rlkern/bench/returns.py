"""Return scans against the per-step loop of CleanRL / Stable-Baselines3, torchrl's
GAE functions (when torchrl is installed) and the memory floor (a copy of as many bytes
as the kernel must read and write, into a buffer that already exists).

``rlkern`` allocates its outputs on every call, as the default API does; ``rlkern
(out=)`` writes into buffers reused across calls, the way a training loop that keeps
its rollout storage calls it, and the like-for-like comparison with the floor. At
4096 x 2048 the gap between the two is the kernel's page faults on 64 MB of fresh
memory."""

from __future__ import annotations

import importlib.util
from typing import Dict, List

import torch

import rlkern

from .core import Case, Impl


def _inputs(B: int, T: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(B, T, generator=g).to(device)
    v = torch.randn(B, T, generator=g).to(device)
    term = (torch.rand(B, T, generator=g) < 0.01).to(device)
    mask = (torch.rand(B, T, generator=g) < 0.9).to(device)
    return r, v, term, mask


def _floor(bytes_in: int, bytes_out: int, device: torch.device) -> Impl:
    # A copy of n bytes reads n and writes n: half the traffic each way.
    n = (bytes_in + bytes_out) // 2
    src = torch.ones(n // 4, dtype=torch.float32, device=device)  # float32: torch copies uint8 slowly
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _loop_gae(r, v, term, gamma, lam):
    """CleanRL's ppo.py: a Python loop over time (dones mark the end after step t)."""
    B, T = r.shape
    adv = torch.zeros_like(r)
    last = torch.zeros(B, dtype=r.dtype, device=r.device)
    not_done = 1.0 - term.to(r.dtype)
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v * not_done[:, t] - v[:, t]
        last = delta + gamma * lam * not_done[:, t] * last
        adv[:, t] = last
    return adv, adv + v


def _loop_discounted(r, term, gamma):
    B, T = r.shape
    out = torch.empty_like(r)
    carry = torch.zeros(B, dtype=r.dtype, device=r.device)
    not_done = 1.0 - term.to(r.dtype)
    for t in reversed(range(T)):
        carry = r[:, t] + gamma * not_done[:, t] * carry
        out[:, t] = carry
    return out


def _loop_masked_gae(r, v, mask, gamma, lam):
    """verl's compute_gae_advantage_return loop (before whitening)."""
    B, T = r.shape
    m = mask.to(r.dtype)
    next_v = torch.zeros(B, dtype=r.dtype, device=r.device)
    last = torch.zeros_like(next_v)
    out = []
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_v - v[:, t]
        new = delta + gamma * lam * last
        next_v = v[:, t] * m[:, t] + (1 - m[:, t]) * next_v
        last = new * m[:, t] + (1 - m[:, t]) * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + v


def _torchrl_impls(r, v, term, gamma, lam) -> Dict[str, Impl]:
    if importlib.util.find_spec("torchrl") is None:
        return {}
    from torchrl.objectives.value.functional import generalized_advantage_estimate, vec_generalized_advantage_estimate

    B, T = r.shape
    # torchrl wants a trailing feature dim, time at dim -2, and the next-state values.
    r3, v3 = r.unsqueeze(-1), v.unsqueeze(-1)
    nv3 = torch.cat([v[:, 1:], torch.zeros(B, 1, device=r.device)], 1).unsqueeze(-1)
    d3 = term.unsqueeze(-1)
    return {
        "torchrl generalized_advantage_estimate":
            lambda: generalized_advantage_estimate(gamma, lam, v3, nv3, r3, d3, d3, time_dim=-2),
        "torchrl vec_generalized_advantage_estimate":
            lambda: vec_generalized_advantage_estimate(gamma, lam, v3, nv3, r3, d3, d3, time_dim=-2),
    }


def cases(device: torch.device, quick: bool) -> List[Case]:
    shapes = [(64, 128)] if quick else [(1024, 1024), (4096, 2048)]
    gamma, lam = 0.99, 0.95
    out: List[Case] = []
    for B, T in shapes:
        n = B * T
        shape = f"{B}x{T} f32"

        def make_gae(device, B=B, T=T, n=n):
            r, v, term, _ = _inputs(B, T, device)
            bufs = (torch.empty_like(r), torch.empty_like(r))
            impls = {"rlkern": lambda: rlkern.gae(r, v, term, gamma, lam),
                     "rlkern (out=)": lambda: rlkern.gae(r, v, term, gamma, lam, out=bufs),
                     "per-step loop (CleanRL/SB3)": lambda: _loop_gae(r, v, term, gamma, lam)}
            impls.update(_torchrl_impls(r, v, term, gamma, lam))
            impls["memory floor (copy)"] = _floor(n * 9, n * 8, device)
            return impls

        def make_discounted(device, B=B, T=T, n=n):
            r, _, term, _ = _inputs(B, T, device)
            buf = torch.empty_like(r)
            return {"rlkern": lambda: rlkern.discounted_returns(r, term, gamma),
                    "rlkern (out=)": lambda: rlkern.discounted_returns(r, term, gamma, out=buf),
                    "per-step loop": lambda: _loop_discounted(r, term, gamma),
                    "memory floor (copy)": _floor(n * 5, n * 4, device)}

        def make_lambda(device, B=B, T=T, n=n):
            r, v, term, _ = _inputs(B, T, device)
            buf = torch.empty_like(r)
            return {"rlkern": lambda: rlkern.lambda_returns(r, v, term, gamma, lam),
                    "rlkern (out=)": lambda: rlkern.lambda_returns(r, v, term, gamma, lam, out=buf),
                    "per-step loop (via GAE)": lambda: _loop_gae(r, v, term, gamma, lam)[1],
                    "memory floor (copy)": _floor(n * 9, n * 4, device)}

        def make_masked(device, B=B, T=T, n=n):
            r, v, _, mask = _inputs(B, T, device)
            bufs = (torch.empty_like(r), torch.empty_like(r))
            return {"rlkern": lambda: rlkern.masked_gae(r, v, mask, 1.0, lam),
                    "rlkern (out=)": lambda: rlkern.masked_gae(r, v, mask, 1.0, lam, out=bufs),
                    "per-step loop (verl)": lambda: _loop_masked_gae(r, v, mask, 1.0, lam),
                    "memory floor (copy)": _floor(n * 9, n * 8, device)}

        out += [Case("returns", "gae", shape, make_gae), Case("returns", "discounted_returns", shape, make_discounted),
                Case("returns", "lambda_returns", shape, make_lambda), Case("returns", "masked_gae", shape, make_masked)]
    return out
