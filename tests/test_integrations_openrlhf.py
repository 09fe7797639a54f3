"""rlkern.integrations.openrlhf against OpenRLHF's formulas (openrlhf/models/loss.py, utils.py).

The anchors restate OpenRLHF's computations: masked_mean(x, m) = sum(x m) / sum(m) (over all
tokens, or per sequence then averaged), the PPO and GSPO ratios, dual clip as
max(min(surr1, surr2), dual_clip * A) for A < 0, the clipped value loss with the clip on
v - v_old, and Schulman's k1/k2/k3 estimators in float32.
"""

from __future__ import annotations

import pytest
import torch

from rlkern.integrations.openrlhf import PolicyLoss, ValueLoss, compute_approx_kl

from helpers import assert_close


def masked_mean(x, m, dim=None):
    if m is None:
        return x.mean(dim=dim)
    return (x * m).sum(dim=dim) / m.sum(dim=dim)


def anchor_policy(lp, old, adv, m, low, high, dual_clip, token_level, kind):
    log_ratio = lp - old
    if kind == "ppo":
        ratio = log_ratio.exp()
    else:
        ratio = ((log_ratio * m).sum(-1) / m.sum(-1)).exp().unsqueeze(-1) * m
        token_level = False
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - low, 1 + high) * adv
    if dual_clip is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        loss = -torch.where(adv < 0, torch.max(clip1, dual_clip * adv), clip1)
    loss = masked_mean(loss, m) if token_level else masked_mean(loss, m, dim=-1).mean()
    clip_ratio = masked_mean(torch.lt(surr2, surr1).to(lp.dtype), m)
    ppo_kl = masked_mean(-log_ratio.detach(), m)
    return loss, clip_ratio, ppo_kl


def anchor_value(v, old, ret, m, clip_eps, token_level):
    if clip_eps is not None:
        clipped = old + (v - old).clamp(-clip_eps, clip_eps)
        loss = torch.max((clipped - ret) ** 2, (v - ret) ** 2)
    else:
        loss = (v - ret) ** 2
    loss = masked_mean(loss, m) if token_level else masked_mean(loss, m, dim=-1).mean()
    return 0.5 * loss


def anchor_kl(lp, base, est):
    log_ratio = lp.float() - base.float()
    if est == "k2":
        return log_ratio ** 2 / 2.0
    if est == "k3":
        log_ratio = -log_ratio
        return log_ratio.exp() - 1 - log_ratio
    return log_ratio


def make_batch(dtype=torch.float64, seed=0, B=4, T=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    lp = (old + 0.4 * torch.randn(B, T, generator=g, dtype=dtype)).requires_grad_(True)
    adv = torch.randn(B, generator=g, dtype=dtype).unsqueeze(-1).expand(B, T).contiguous()
    m = (torch.arange(T)[None] < torch.tensor([T, 1, 4, 5])[:B, None]).to(dtype)
    return old, lp, adv, m


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("kind", ["ppo", "gspo"])
@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss(kind, token_level, dual_clip):
    old, lp, adv, m = make_batch()
    ours = PolicyLoss(0.2, 0.28, dual_clip=dual_clip, token_level_loss=token_level, policy_loss_type=kind)(
        lp, old, adv, action_mask=m)
    ref = anchor_policy(lp, old, adv, m, 0.2, 0.28, dual_clip, token_level, kind)
    assert len(ours) == 3
    for name, a, e in zip(("loss", "clip_ratio", "ppo_kl"), ours, ref):
        assert_close(a, e, name=name)
    assert_close(grad_of(ours[0], lp), grad_of(ref[0], lp), tol=1e-4, name="grad")


def test_policy_loss_without_mask_and_validation():
    old, lp, adv, _ = make_batch(seed=1)
    ours = PolicyLoss()(lp, old, adv)
    ref = anchor_policy(lp, old, adv, None, 0.2, 0.2, None, True, "ppo")
    assert_close(ours[0], ref[0])
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLoss(dual_clip=1.0)
    with pytest.raises(ValueError, match="policy loss type"):
        PolicyLoss(policy_loss_type="sapo")


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level", [True, False])
def test_value_loss(clip_eps, token_level):
    g = torch.Generator().manual_seed(2)
    _, _, _, m = make_batch()
    old = torch.randn(m.shape, generator=g, dtype=torch.float64)
    v = (old + 0.5 * torch.randn(m.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    ret = torch.randn(m.shape, generator=g, dtype=torch.float64)
    ours = ValueLoss(clip_eps, token_level_loss=token_level)(v, old, ret, action_mask=m)
    ref = anchor_value(v, old, ret, m, clip_eps, token_level)
    assert_close(ours, ref)
    assert_close(grad_of(ours, v), grad_of(ref, v), tol=1e-4, name="grad")


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compute_approx_kl(est, dtype):
    old, lp, _, m = make_batch(dtype=torch.float32, seed=3)
    lp = lp.detach().to(dtype).requires_grad_(True)
    base = old.to(dtype)
    ours = compute_approx_kl(lp, base, kl_estimator=est)
    ref = anchor_kl(lp, base, est)
    assert ours.dtype == torch.float32
    assert_close(ours, ref)
    assert_close(grad_of(ours.sum(), lp).float(), grad_of(ref.sum(), lp).float(), tol=1e-4, name="grad")
    masked = compute_approx_kl(lp, base, est, action_mask=m)
    assert_close(masked, ref * m)
    with pytest.raises(ValueError, match="kl_estimator"):
        compute_approx_kl(lp, base, "k4")
