"""rlkern.algorithms: each class against its objective written out in plain PyTorch (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rlkern.algorithms as A

from helpers import assert_close

D = torch.float64


def rnd(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D) * scale


def prefix_mask(lengths, T):
    return torch.arange(T)[None] < torch.tensor(lengths)[:, None]


def grad(loss, x):
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    return g


def masked_mean(x, m):
    m = m.to(x.dtype)
    return (x * m).sum() / m.sum()


# ----------------------------------------------------------------------------- PPO

def gae_loop(r, v, term, trunc, next_v, gamma, lam):
    B, T = r.shape
    adv = torch.zeros_like(r)
    a = torch.zeros(B, dtype=r.dtype)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * (1 - term[:, t]) * next_v[:, t] - v[:, t]
        done = torch.maximum(term[:, t], trunc[:, t])
        a = delta + gamma * lam * (1 - done) * a
        adv[:, t] = a
    return adv, adv + v


def test_ppo_advantages_match_gae_loop():
    B, T = 3, 8
    r, v, nv = rnd(B, T, seed=1), rnd(B, T, seed=2), rnd(B, T, seed=3)
    term = torch.zeros(B, T, dtype=D)
    trunc = torch.zeros(B, T, dtype=D)
    term[0, 3] = 1
    trunc[1, 5] = 1
    ppo = A.PPO(gamma=0.9, lam=0.8)
    adv, ret = ppo.advantages(r, v, term.bool(), truncated=trunc.bool(), next_values=nv)
    ref_adv, ref_ret = gae_loop(r, v, term, trunc, nv, 0.9, 0.8)
    assert_close(adv, ref_adv)
    assert_close(ret, ref_ret)


@pytest.mark.parametrize("flat", [True, False])
def test_ppo_loss_matches_objective(flat):
    N = 24
    old = rnd(N, seed=4) - 1
    logp = (old + 0.3 * rnd(N, seed=5)).requires_grad_(True)
    adv = rnd(N, seed=6)
    old_v, ret = rnd(N, seed=7), rnd(N, seed=8)
    v = (old_v + 0.5 * rnd(N, seed=9)).requires_grad_(True)
    ent = (rnd(N, seed=10).abs() + 0.5).requires_grad_(True)
    cfg = A.PPOConfig(clip=0.2, value_clip=0.2, vf_coef=0.5, entropy_coef=0.01)
    ppo = A.PPO(cfg)
    shape = (N,) if flat else (4, 6)
    out = ppo.loss(logp.view(shape), old.view(shape), adv.view(shape), ret.view(shape), v.view(shape),
                   old_v.view(shape), entropy=ent.view(shape))
    a = (adv - adv.mean()) / (adv.std() + 1e-8)
    r = torch.exp(logp - old)
    pl = -torch.min(r * a, r.clamp(0.8, 1.2) * a).mean()
    vc = old_v + (v - old_v).clamp(-0.2, 0.2)
    vl = 0.5 * torch.max((v - ret) ** 2, (vc - ret) ** 2).mean()
    expected = pl - 0.01 * ent.mean() + 0.5 * vl
    assert_close(out.loss, expected)
    assert_close(out.value_loss, vl)
    for x in (logp, v, ent):
        assert_close(grad(out.loss, x), grad(expected, x), tol=1e-4)


def test_ppo_adaptive_kl():
    ppo = A.PPO(kl_coef=0.2, target_kl=0.01, kl_horizon=1000)
    assert isinstance(ppo.kl_controller, A.AdaptiveKLController)
    ppo.update_kl(0.05, n_steps=100)   # error 4 clipped to 0.2
    assert ppo.kl_coef == pytest.approx(0.2 * (1 + 0.2 * 0.1))
    ppo.update_kl(0.009, n_steps=100)
    assert ppo.kl_coef == pytest.approx(0.2 * 1.02 * (1 - 0.1 * 0.1))
    # the penalty enters the loss: KL(pi || pi_old) by k3 with the importance correction
    N = 10
    old = rnd(N, seed=1) - 1
    logp = (old + 0.2 * rnd(N, seed=2)).requires_grad_(True)
    adv = rnd(N, seed=3)
    base = A.PPO(kl_coef=0.0, normalize_advantages=False, entropy_coef=0.0)
    with_kl = A.PPO(kl_coef=0.5, target_kl=0.01, normalize_advantages=False, entropy_coef=0.0)
    r = torch.exp(logp - old)
    k3 = torch.exp(old - logp) - 1 - (old - logp)
    diff = with_kl.loss(logp, old, adv).loss - base.loss(logp, old, adv).loss
    assert_close(diff, 0.5 * (r * k3).mean())
    assert not isinstance(A.PPO().kl_controller, A.AdaptiveKLController)


def test_ppo_config_and_overrides_are_exclusive():
    with pytest.raises(TypeError):
        A.PPO(A.PPOConfig(), gamma=0.5)


# ----------------------------------------------------------------------------- RLHF PPO

def test_rlhf_ppo_rewards_advantages_and_loss():
    B, T = 3, 6
    m = prefix_mask([6, 3, 1], T)
    ref = rnd(B, T, seed=1) - 2
    old = ref + 0.1 * rnd(B, T, seed=2)
    scores = rnd(B, seed=3)
    algo = A.RLHFPPO(kl_coef=0.1, gamma=1.0, lam=0.95)
    rewards = algo.token_rewards(scores, old, ref, m)
    expected = torch.where(m, -0.1 * (old - ref), torch.zeros_like(old))
    for b, last in enumerate([5, 2, 0]):
        expected[b, last] += scores[b]
    assert_close(rewards, expected)

    values = rnd(B, T, seed=4)
    adv, ret = algo.advantages(rewards, values, m)
    # GAE over the valid prefix of each row, then whitened over the mask (unbiased variance)
    ref_adv = torch.zeros(B, T, dtype=D)
    for b in range(B):
        a = 0.0
        for t in reversed(range(int(m[b].sum()))):
            nv = values[b, t + 1] if t + 1 < int(m[b].sum()) else 0.0
            a = rewards[b, t] + nv - values[b, t] + 0.95 * a
            ref_adv[b, t] = a
    assert_close(torch.where(m, ret, torch.zeros_like(ret)), torch.where(m, ref_adv + values, torch.zeros_like(ret)))
    mu = ref_adv[m].mean()
    var = ref_adv[m].var()
    assert_close(torch.where(m, adv, torch.zeros_like(adv)),
                 torch.where(m, (ref_adv - mu) / torch.sqrt(var + 1e-8), torch.zeros_like(adv)))

    logp = (old + 0.1 * rnd(B, T, seed=5)).requires_grad_(True)
    v = (values + 0.3 * rnd(B, T, seed=6)).requires_grad_(True)
    out = algo.loss(logp, old, adv, ret, v, values, m)
    r = torch.exp(logp - old)
    pl = masked_mean(-torch.min(r * adv, r.clamp(0.8, 1.2) * adv), m)
    vc = values + (v - values).clamp(-0.2, 0.2)
    vl = 0.5 * masked_mean(torch.max((v - ret) ** 2, (vc - ret) ** 2), m)
    assert_close(out.loss, pl + 0.1 * vl)
    assert_close(grad(out.loss, logp), grad(pl + 0.1 * vl, logp), tol=1e-4)


# ----------------------------------------------------------------------------- GRPO family

def grpo_batch(G=4, groups=2, T=5, seed=0):
    N = G * groups
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 2.0, 0.0][:N], dtype=D)
    old = rnd(N, T, seed=seed) - 1
    logp = (old + 0.2 * rnd(N, T, seed=seed + 1)).requires_grad_(True)
    m = prefix_mask([5, 3, 1, 4, 5, 2, 5, 5][:N], T)
    return rewards, old, logp, m


def test_grpo_advantages_and_loss():
    rewards, old, logp, m = grpo_batch()
    algo = A.GRPO(group_size=4, beta=0.04)
    adv = algo.advantages(rewards)
    r = rewards.view(2, 4)
    expected_adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)
    assert_close(adv, expected_adv)
    ref = old - 0.05
    out = algo.loss(logp, old, adv, m, ref_logp=ref)
    w = torch.exp(logp - old)
    a = adv[:, None]
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    per = -torch.min(w * a, w.clamp(0.8, 1.2) * a) + 0.04 * k3
    mf = m.to(D)
    expected = ((per * mf).sum(-1) / mf.sum(-1)).mean()
    assert_close(out.loss, expected)
    assert_close(grad(out.loss, logp), grad(expected, logp), tol=1e-4)
    with pytest.raises(ValueError, match="ref_logp"):
        algo.loss(logp, old, adv, m)
    with pytest.raises(ValueError, match="group_size"):
        algo.advantages(rewards[:7])


def test_dapo_dynamic_sampling_overlong_and_token_mean():
    algo = A.DAPO(group_size=4, max_response_length=100, overlong_buffer_len=20)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=D)
    assert algo.keep_mask(rewards).tolist() == [True] * 4 + [False] * 4
    lengths = torch.tensor([50, 80, 90, 100, 130, 10, 81, 99])
    shaped = algo.shape_rewards(torch.zeros(8, dtype=D), lengths)
    assert_close(shaped, torch.tensor([0, 0, -0.5, -1.0, -1.0, 0, -0.05, -0.95], dtype=D))
    assert algo.config.clip_high == 0.28 and algo.config.clip_low == 0.2

    r, old, logp, m = grpo_batch()
    adv = A.DAPO(group_size=4).advantages(r)
    out = A.DAPO(group_size=4).loss(logp, old, adv, m)
    w = torch.exp(logp - old)
    per = -torch.min(w * adv[:, None], w.clamp(0.8, 1.28) * adv[:, None])
    expected = masked_mean(per, m)
    assert_close(out.loss, expected)
    # a global token count as the normaliser (data parallelism / accumulation)
    assert_close(A.DAPO(group_size=4).loss(logp, old, adv, m, normalizer=100.0).loss,
                 (per * m).sum() / 100.0)


def test_dr_grpo_constant_normaliser_and_centred_advantages():
    r, old, logp, m = grpo_batch()
    algo = A.DrGRPO(group_size=4, max_completion_length=16)
    adv = algo.advantages(r)
    assert_close(adv, (r.view(2, 4) - r.view(2, 4).mean(1, keepdim=True)).view(-1))
    out = algo.loss(logp, old, adv, m)
    w = torch.exp(logp - old)
    per = -torch.min(w * adv[:, None], w.clamp(0.8, 1.2) * adv[:, None])
    assert_close(out.loss, (per * m).sum() / (8 * 16))


def test_gspo_sequence_ratio():
    r, old, logp, m = grpo_batch()
    algo = A.GSPO(group_size=4)
    adv = algo.advantages(r)
    out = algo.loss(logp, old, adv, m)
    mf = m.to(D)
    s = torch.exp(((logp - old) * mf).sum(-1) / mf.sum(-1))
    per_seq = -torch.min(s * adv, s.clamp(1 - 3e-4, 1 + 4e-4) * adv)
    expected = per_seq.mean()
    assert_close(out.loss, expected)
    assert_close(grad(out.loss, logp), grad(expected, logp), tol=1e-4)


def test_cispo_clipped_weight_keeps_every_gradient():
    r, old, logp, m = grpo_batch()
    algo = A.CISPO(group_size=4)
    adv = algo.advantages(r)
    out = algo.loss(logp, old, adv, m)
    w = torch.exp(logp - old).clamp(max=5.0).detach()
    expected = masked_mean(-w * adv[:, None] * logp, m)
    assert_close(out.loss, expected)
    assert_close(grad(out.loss, logp), grad(expected, logp), tol=1e-4)


# ----------------------------------------------------------------------------- preferences

@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo(loss_type):
    pc, pr = rnd(6, seed=1).requires_grad_(True), rnd(6, seed=2).requires_grad_(True)
    rc, rr = rnd(6, seed=3), rnd(6, seed=4)
    dpo = A.DPO(beta=0.2, loss_type=loss_type, label_smoothing=0.1 if loss_type == "sigmoid" else 0.0)
    out = dpo.loss(pc, pr, rc, rr)
    z = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        expected = (-F.logsigmoid(0.2 * z) * 0.9 - F.logsigmoid(-0.2 * z) * 0.1).mean()
    elif loss_type == "ipo":
        expected = ((z - 1 / 0.4) ** 2).mean()
    else:
        expected = torch.relu(1 - 0.2 * z).mean()
    assert_close(out.loss, expected)
    assert_close(grad(out.loss, pc), grad(expected, pc), tol=1e-4)
    assert_close(out.metrics["rewards/margins"], (0.2 * z).mean().detach())


def test_sequence_logprobs_and_reward_model():
    lp = rnd(3, 4)
    m = prefix_mask([4, 2, 0], 4)
    assert_close(A.sequence_logprobs(lp, m), torch.stack([lp[0].sum(), lp[1, :2].sum(), torch.zeros((), dtype=D)]))
    c, r = rnd(5, seed=1).requires_grad_(True), rnd(5, seed=2)
    margin = rnd(5, seed=3).abs()
    rm = A.RewardModel(center_rewards_coefficient=0.01)
    out = rm.loss(c, r, margin)
    expected = -F.logsigmoid(c - r - margin).mean() + 0.01 * ((c + r) ** 2).mean()
    assert_close(out.loss, expected)
    assert_close(grad(out.loss, c), grad(expected, c), tol=1e-4)
    assert out.metrics["accuracy"].item() == pytest.approx(0.8)


# ----------------------------------------------------------------------------- REINFORCE, DQN

@pytest.mark.parametrize("baseline", ["none", "mean", "value"])
def test_reinforce(baseline):
    B, T = 3, 5
    rewards = rnd(B, T, seed=1)
    dones = torch.zeros(B, T, dtype=torch.bool)
    dones[1, 2] = True
    algo = A.REINFORCE(gamma=0.9, baseline=baseline)
    G = algo.returns(rewards, dones)
    ref = torch.zeros(B, T, dtype=D)
    nxt = torch.zeros(B, dtype=D)
    for t in reversed(range(T)):
        nxt = rewards[:, t] + 0.9 * (~dones[:, t]).to(D) * nxt
        ref[:, t] = nxt
    assert_close(G, ref)
    logp = (rnd(B, T, seed=2) - 1).requires_grad_(True)
    values = rnd(B, T, seed=3).requires_grad_(True)
    out = algo.loss(logp, G, values=values)
    b = {"none": 0.0, "mean": G.mean(0, keepdim=True), "value": values.detach()}[baseline]
    expected = (-(G - b) * logp).sum(-1).mean()
    if baseline == "value":
        expected = expected + 0.5 * 0.5 * ((values - G) ** 2).mean()
    assert_close(out.loss, expected)
    assert_close(grad(out.loss, logp), grad(expected, logp), tol=1e-4)


@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("loss", ["huber", "mse"])
def test_dqn_n_step_targets_and_loss(double, loss):
    B, n, Aa = 4, 3, 5
    rewards = rnd(B, n, seed=1)
    dones = torch.zeros(B, n, dtype=torch.bool)
    dones[1, 0] = True
    dones[2, 2] = True
    q_t, q_o = rnd(B, Aa, seed=2), rnd(B, Aa, seed=3)
    dqn = A.DQN(gamma=0.9, n_step=n, double=double, loss=loss)
    y = dqn.targets(rewards, dones, q_t, q_o)
    a_star = (q_o if double else q_t).argmax(-1)
    boot = q_t.gather(-1, a_star[:, None]).squeeze(-1)
    expected = torch.zeros(B, dtype=D)
    for b in range(B):
        acc, disc = 0.0, 1.0
        alive = True
        for k in range(n):
            acc += disc * rewards[b, k]
            disc *= 0.9
            if dones[b, k]:
                alive = False
                break
        expected[b] = acc + (disc * boot[b] if alive else 0.0)
    assert_close(y, expected)
    q = rnd(B, Aa, seed=4).requires_grad_(True)
    actions = torch.tensor([0, 3, 1, 4])
    out = dqn.loss(q, actions, y)
    qa = q.gather(-1, actions[:, None]).squeeze(-1)
    ref = F.smooth_l1_loss(qa, y) if loss == "huber" else (0.5 * (qa - y) ** 2).mean()
    assert_close(out.loss, ref)
    assert_close(out.td_error, (qa - y).detach())
    assert_close(grad(out.loss, q), grad(ref, q), tol=1e-4)
    with pytest.raises(ValueError, match="n_step"):
        dqn.targets(rewards[:, :2], dones[:, :2], q_t, q_o)


# ----------------------------------------------------------------------------- shaping

def test_process_rewards_telescope_and_skip_masked_steps():
    s = torch.tensor([[0.2, 0.5, 0.4, 0.9], [0.3, 0.0, 0.7, 0.0]], dtype=D)
    m = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    out = A.process_rewards(s, outcome=torch.tensor([1.0, -1.0], dtype=D), step_mask=m)
    assert_close(out, torch.tensor([[0.2, 0.3, -0.1, 0.5 + 1.0], [0.3, 0.0, 0.4 - 1.0, 0.0]], dtype=D))
    # telescoping: the sum of the dense rewards is the last score plus the outcome
    assert_close(out.sum(-1), torch.tensor([0.9 + 1.0, 0.7 - 1.0], dtype=D))
    tok = A.steps_to_tokens(out, torch.tensor([[1, 3, 4, 7], [2, 0, 5, 0]]), 8, step_mask=m)
    assert tok.shape == (2, 8) and tok[0, 7] == out[0, 3] and tok[1, 5] == out[1, 2] and tok[1, 0] == 0


def test_kimi_length_penalty():
    lengths = torch.tensor([10, 20, 30, 30, 5, 5, 5, 5])
    correct = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    out = A.kimi_length_penalty(lengths, correct, group_size=4)
    lam = torch.tensor([0.5, 0.0, -0.5, -0.5])
    expected = torch.cat([torch.where(correct[:4], lam, lam.clamp(max=0)), torch.zeros(4)])
    assert_close(out, expected)
