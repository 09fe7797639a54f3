"""rlkern.integrations.verl against verl's formulas (verl/trainer/ppo/core_algos.py, commit 012be9d9).

The anchors below restate verl's computations as ../shared/research/llm_losses.md describes them
(masked means without clamping, the log-ratio clamp at +-20, dual clip with clip_ratio_c, GSPO's
stop-gradient sequence ratio clamped at 10, GAE carrying the running values across masked tokens,
whitening with the Bessel-corrected masked variance). Values and gradients must agree.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlkern.integrations import verl as V

from helpers import assert_close

AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# ----------------------------------------------------------------------------- verl's formulas

def masked_mean(x, m):
    return (x * m).sum() / m.sum()


def anchor_agg(l, m, mode):
    if mode == "token-mean":
        return masked_mean(l, m)
    if mode == "seq-mean-token-sum":
        return (l * m).sum(-1).mean()
    if mode == "seq-mean-token-mean":
        return ((l * m).sum(-1) / m.sum(-1)).mean()
    return (l * m).sum() / m.shape[-1]


def anchor_vanilla(old, lp, adv, m, low, high, c, mode):
    nkl = torch.clamp(lp - old, -20.0, 20.0)
    ratio = torch.exp(nkl)
    ppo_kl = masked_mean(-nkl, m)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - low, 1 + high)
    cl1 = torch.maximum(l1, l2)
    clipfrac = masked_mean(torch.gt(l2, l1).to(lp.dtype), m)
    l3 = -adv * c
    cl2 = torch.min(l3, cl1)
    clipfrac_lower = masked_mean((torch.gt(cl1, l3) & (adv < 0)).to(lp.dtype), m)
    pg = torch.where(adv < 0, cl2, cl1)
    return anchor_agg(pg, m, mode), clipfrac, ppo_kl, clipfrac_lower


def anchor_gspo(old, lp, adv, m, low, high):
    nkl = lp - old
    seq = (nkl * m).sum(-1) / m.sum(-1).clamp(min=1)
    log_s = torch.clamp(lp - lp.detach() + seq.detach().unsqueeze(-1), max=10.0)
    s = torch.exp(log_s)
    l1 = -adv * s
    l2 = -adv * torch.clamp(s, 1 - low, 1 + high)
    loss = anchor_agg(torch.maximum(l1, l2), m, "seq-mean-token-mean")
    return loss, masked_mean(torch.gt(l2, l1).to(lp.dtype), m), masked_mean(-nkl, m)


def anchor_kl(lp, ref, mode):
    if mode in ("kl", "k1"):
        return lp - ref
    if mode == "abs":
        return (lp - ref).abs()
    if mode in ("mse", "k2"):
        return 0.5 * (lp - ref).square()
    kl = torch.clamp(ref - lp, -20, 20)
    return torch.clamp(torch.exp(kl) - kl - 1, -10, 10)


def anchor_gae(r, v, m, gamma, lam):
    nextvalues, last = 0, 0
    out = []
    for t in reversed(range(r.shape[-1])):
        delta = r[:, t] + gamma * nextvalues - v[:, t]
        new = delta + gamma * lam * last
        nextvalues = v[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        last = new * m[:, t] + (1 - m[:, t]) * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    returns = adv + v
    mean = masked_mean(adv, m)
    var = masked_mean((adv - mean) ** 2, m) * (m.sum() / (m.sum() - 1))
    return (adv - mean) * torch.rsqrt(var + 1e-8), returns


def anchor_grpo(r, m, index, eps, norm):
    scores = r.sum(-1).clone()
    groups = defaultdict(list)
    for i in range(len(scores)):
        groups[index[i]].append(scores[i])
    stats = {}
    for k, vals in groups.items():
        if len(vals) == 1:
            stats[k] = (torch.tensor(0.0, dtype=r.dtype), torch.tensor(1.0, dtype=r.dtype))
        else:
            t = torch.stack(vals)
            stats[k] = (t.mean(), t.std())
    for i in range(len(scores)):
        mean, std = stats[index[i]]
        scores[i] = (scores[i] - mean) / (std + eps) if norm else scores[i] - mean
    return scores.unsqueeze(-1) * m


# ----------------------------------------------------------------------------- data

def make_batch(dtype=torch.float64, seed=0, B=5, T=9, extreme=False):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    lp = old + 0.4 * torch.randn(B, T, generator=g, dtype=dtype)
    if extreme:
        lp[0, 1] = old[0, 1] + 30.0   # beyond verl's +-20 clamp
        lp[1, 2] = old[1, 2] - 30.0
    adv = torch.randn(B, T, generator=g, dtype=dtype)
    lengths = torch.tensor([T, 1, 4, T - 2, 6])[:B]
    m = (torch.arange(T)[None] < lengths[:, None]).to(dtype)
    m[3, 2] = 0  # an interior hole (e.g. an observation token in a multi-turn response)
    return old, lp.requires_grad_(True), adv, m


def grads(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss(mode):
    _, lp, adv, m = make_batch()
    assert_close(V.agg_loss(lp * adv, m, mode), anchor_agg(lp * adv, m, mode))


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("extreme", [False, True])
def test_compute_policy_loss_vanilla(mode, extreme):
    old, lp, adv, m = make_batch(extreme=extreme)
    config = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=3.0)
    ours = V.compute_policy_loss_vanilla(old, lp, adv, m, loss_agg_mode=mode, config=config)
    ref = anchor_vanilla(old, lp, adv, m, 0.2, 0.28, 3.0, mode)
    for name, a, e in zip(("pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"), ours, ref):
        assert_close(a, e, name=name)
    assert_close(grads(ours[0], lp), grads(ref[0], lp), tol=1e-4, name="grad")


def test_compute_policy_loss_deprecated_signature_and_dict_config():
    old, lp, adv, m = make_batch(seed=3)
    ours = V.compute_policy_loss(old, lp, adv, m, cliprange=0.1, clip_ratio_c=2.5, loss_agg_mode="seq-mean-token-sum")
    ref = anchor_vanilla(old, lp, adv, m, 0.1, 0.1, 2.5, "seq-mean-token-sum")
    for a, e in zip(ours, ref):
        assert_close(a, e)
    cfg = {"clip_ratio": 0.1, "clip_ratio_low": None, "clip_ratio_high": None, "clip_ratio_c": 2.5}
    via_dict = V.get_policy_loss_fn("vanilla")(old, lp, adv, m, "seq-mean-token-sum", cfg)
    assert_close(via_dict[0], ref[0])
    with pytest.raises(ValueError, match="clip_ratio_c"):
        V.compute_policy_loss(old, lp, adv, m, cliprange=0.2, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        V.agg_loss(lp, m, "token-avg")
    with pytest.raises(ValueError, match="Unsupported loss mode"):
        V.get_policy_loss_fn("clip_cov")


@pytest.mark.parametrize("extreme", [False, True])
def test_compute_policy_loss_gspo(extreme):
    old, lp, adv, m = make_batch(seed=1)
    if extreme:
        with torch.no_grad():
            lp[2, :4] = old[2, :4] + 12.0  # sequence log-ratio above verl's clamp at 10
    config = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    loss, clipfrac, ppo_kl, lower = V.compute_policy_loss_gspo(old, lp, adv, m, config=config)
    ref_loss, ref_clipfrac, ref_kl = anchor_gspo(old, lp, adv, m, 3e-4, 4e-4)
    assert_close(loss, ref_loss)
    assert_close(clipfrac, ref_clipfrac)
    assert_close(ppo_kl, ref_kl)
    assert float(lower) == 0.0
    assert_close(grads(loss, lp), grads(ref_loss, lp), tol=1e-4, name="grad")


@pytest.mark.parametrize("mode", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"])
def test_kl_penalty(mode):
    old, lp, _, _ = make_batch(extreme=True)
    ref = old
    ours = V.kl_penalty(lp, ref, mode)
    expected = anchor_kl(lp, ref, mode)
    assert_close(ours, expected)
    assert_close(grads(ours.sum(), lp), grads(expected.sum(), lp), tol=1e-4, name="grad")
    with pytest.raises(NotImplementedError):
        V.kl_penalty(lp, ref, "full")


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
def test_compute_gae_advantage_return(gamma, lam):
    g = torch.Generator().manual_seed(2)
    _, _, _, m = make_batch()
    r = torch.randn(m.shape, generator=g, dtype=torch.float64)
    v = torch.randn(m.shape, generator=g, dtype=torch.float64)
    adv, ret = V.compute_gae_advantage_return(r, v, m, torch.tensor(gamma), torch.tensor(lam))
    ref_adv, ref_ret = anchor_gae(r, v, m, gamma, lam)
    assert_close(adv, ref_adv, name="advantages")
    assert_close(ret, ref_ret, name="returns")


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "shuffled", "uneven"])
def test_compute_grpo_outcome_advantage(norm, layout):
    g = torch.Generator().manual_seed(4)
    _, _, _, m = make_batch(B=5)
    if layout == "contiguous":
        index = np.array(["a", "a", "a", "a", "a"])
    elif layout == "shuffled":
        m = torch.cat([m, m[:1]], 0)
        index = np.array([1, 2, 1, 2, 1, 2])
    else:
        index = np.array([7, 7, 3, 9, 9])  # group 3 has a single member: mean 0, std 1
    r = torch.zeros(m.shape, dtype=torch.float64)
    r[:, 0] = torch.randint(0, 3, (m.shape[0],), generator=g).double()
    adv, ret = V.compute_grpo_outcome_advantage(r, m, index, norm_adv_by_std_in_grpo=norm)
    assert_close(adv, anchor_grpo(r, m, index, 1e-6, norm))
    assert torch.equal(adv, ret)


def test_grpo_identical_rewards_give_zero_not_nan():
    m = torch.ones(4, 3)
    r = torch.ones(4, 3)
    adv, _ = V.compute_grpo_outcome_advantage(r, m, np.array([0, 0, 0, 0]))
    assert torch.equal(adv, torch.zeros(4, 3))


def test_float32_and_nan_in_masked_positions():
    old, lp, adv, m = make_batch(dtype=torch.float32, seed=5)
    config = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0)
    ref = anchor_vanilla(old.double(), lp.detach().double(), adv.double(), m.double(), 0.2, 0.2, 3.0, "token-mean")
    poisoned = torch.where(m.bool(), lp.detach(), torch.full_like(lp, float("nan"))).requires_grad_(True)
    ours = V.compute_policy_loss_vanilla(old, poisoned, adv, m, config=config)
    for a, e in zip(ours, ref):
        assert_close(a, e)
    g = grads(ours[0], poisoned)
    assert torch.isfinite(g).all() and (g[~m.bool()] == 0).all()


def test_adaptive_kl_controller():
    ctl = V.AdaptiveKLController(init_kl_coef=0.2, target_kl=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=256)   # error clipped at +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    ctl.update(current_kl=5.0, n_steps=100)
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000) * (1 + (5 / 6 - 1) * 100 / 10000))
    fixed = V.FixedKLController(0.1)
    fixed.update(3.0, 10)
    assert fixed.value == 0.1


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_compute_value_loss(mode):
    g = torch.Generator().manual_seed(6)
    _, _, _, m = make_batch()
    old = torch.randn(m.shape, generator=g, dtype=torch.float64)
    v = (old + 0.5 * torch.randn(m.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    ret = torch.randn(m.shape, generator=g, dtype=torch.float64)
    loss, clipfrac = V.compute_value_loss(v, ret, old, m, cliprange_value=0.2, loss_agg_mode=mode)
    clipped = torch.max(torch.min(v, old + 0.2), old - 0.2)
    l1, l2 = (v - ret) ** 2, (clipped - ret) ** 2
    expected = 0.5 * anchor_agg(torch.max(l1, l2), m, mode)
    assert_close(loss, expected)
    assert_close(clipfrac, masked_mean(torch.gt(l2, l1).double(), m))
    assert_close(grads(loss, v), grads(expected, v), tol=1e-4, name="grad")
