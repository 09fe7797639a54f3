"""rlkern.integrations.verl against verl 0.9.1's own functions (verl.trainer.ppo.core_algos).

verl is the oracle: every adapter function is run side by side with verl's function of the same
name on the same inputs (float32 and bfloat16, right-padded and holed masks, an empty row, log-ratios
of +-25) and must give the same loss, metrics and gradients. verl is installed without its heavy
dependencies (see the module skip reason); nothing of verl is stubbed. For bfloat16 inputs the
oracle is verl run on the float32 values of the same bfloat16 numbers, because the adapter
computes in float32 (verl would compute in bfloat16).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

ca = pytest.importorskip(
    "verl.trainer.ppo.core_algos",
    reason="needs verl 0.9.1: pip install --no-deps verl==0.9.1 and pip install omegaconf codetiming "
           "tensordict ray (see the README's test extra)")
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402

from rlkern.integrations import verl as V  # noqa: E402

from helpers import assert_close, run_isolated  # noqa: E402

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
LOSSES = ["vanilla", "gspo", "cispo", "gpg", "dro", "sapo", "geo_mean", "dppo_tv", "dppo_kl"]
B, T = 6, 11


def actor_config(**batch_info) -> ActorConfig:
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2,
                      clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, tau_pos=0.8, tau_neg=1.3,
                      policy_loss=PolicyLossConfig(loss_mode="vanilla", dro_beta=0.3))
    cfg.global_batch_info.update(batch_info)
    return cfg


def make_mask(kind: str) -> torch.Tensor:
    m = torch.ones(B, T, dtype=torch.bool)
    lengths = [T, 7, 3, 9, 1, 5]
    for i, n in enumerate(lengths):
        m[i, n:] = False
    if kind == "holed":
        m[0, 2:5] = False
        m[3, 1] = False
        m[5, :] = False  # an empty row
    return m


def make_inputs(kind: str, dtype=torch.float32, seed: int = 0, token_adv: bool = False):
    g = torch.Generator().manual_seed(seed)
    m = make_mask(kind)
    old = -torch.rand(B, T, generator=g) * 3 - 0.05
    lp = old + 0.3 * torch.randn(B, T, generator=g)
    lp[0, 0] = old[0, 0] + 25.0  # beyond verl's +-20 log-ratio clamp
    lp[3, 0] = old[3, 0] - 25.0
    lp[1, 6] = old[1, 6] + 0.5
    scores = torch.randn(B, generator=g)
    scores[0] = 1.0
    scores[3] = -1.0
    adv = torch.randn(B, T, generator=g) if token_adv else scores[:, None] * m
    old, lp = old.to(dtype), lp.to(dtype)
    return old, lp, adv.to(torch.float32), m


def run(fn, old, lp, adv, m, *args, **kwargs):
    lp = lp.detach().clone().requires_grad_()
    loss, metrics = fn(old, lp, adv, m, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss, metrics, grad


def assert_loss(ours: torch.Tensor, theirs: torch.Tensor, tol: float, name: str) -> None:
    """A loss is a sum of O(1) terms that may cancel: its error is relative to max(|loss|, 1)."""
    diff = abs(float(ours) - float(theirs))
    assert diff <= tol * max(abs(float(theirs)), 1.0), f"{name}: {float(ours)} vs verl {float(theirs)}"


def check_metrics(ours: dict, theirs: dict, tol: float = 1e-5) -> None:
    assert set(ours) == set(theirs), f"metric names differ: {sorted(ours)} vs {sorted(theirs)}"
    for k, v in theirs.items():
        assert isinstance(ours[k], float), f"{k}: verl returns Python floats"
        assert abs(ours[k] - v) <= tol * max(1.0, abs(v)), f"{k}: {ours[k]} vs verl {v}"


def compare_policy(name, mode, old, lp, adv, m, cfg, weights=None, grad_tol=1e-4, value_tol=1e-5):
    ours = run(V.get_policy_loss_fn(name), old, lp, adv, m, mode, cfg, weights)
    # bf16 inputs: verl on the float32 values of the same numbers (the adapter computes in float32)
    theirs = run(ca.get_policy_loss_fn(name), old.float(), lp.float(), adv, m, mode, cfg, weights)
    assert_loss(ours[0], theirs[0], value_tol, f"{name}/{mode} loss")
    check_metrics(ours[1], theirs[1])
    assert ours[2].dtype == lp.dtype
    assert_close(ours[2].float(), theirs[2].to(lp.dtype).float(), grad_tol, f"{name}/{mode} grad")


# ----------------------------------------------------------------------------- policy losses

@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", ["padded", "holed"])
def test_policy_loss_matches_verl(name, mode, kind):
    old, lp, adv, m = make_inputs(kind)
    compare_policy(name, mode, old, lp, adv, m, actor_config())


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_bf16_matches_verl_in_float32(name, mode):
    old, lp, adv, m = make_inputs("holed", torch.bfloat16)
    compare_policy(name, mode, old, lp, adv, m, actor_config(), grad_tol=1e-2)


GLOBAL_INFOS = {
    "dp2": dict(dp_size=2, batch_num_tokens=97, global_batch_size=12, loss_scale_factor=16),
    "tensors": dict(dp_size=1, batch_num_tokens=torch.tensor(97), global_batch_size=torch.tensor(12),
                    loss_scale_factor=None),
    "scale-only": dict(loss_scale_factor=16),
}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("info", list(GLOBAL_INFOS))
def test_policy_loss_global_batch_and_rollout_weights(name, mode, info):
    """config.global_batch_info (dp_size, global token/sequence counts as numbers or tensors,
    loss_scale_factor) and rollout_is_weights with zeros (IcePop / rejected tokens still count in
    verl's clip metrics)."""
    old, lp, adv, m = make_inputs("holed", seed=1)
    w = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) * 2
    w[0, :3] = 0.0
    w[3, 0] = 0.0
    cfg = actor_config(**GLOBAL_INFOS[info])
    compare_policy(name, mode, old, lp, adv, m, cfg, weights=w)
    compare_policy(name, mode, old, lp, adv, m, cfg)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "token-sum"])
def test_gspo_honours_mode_with_per_token_advantages(mode):
    """Advantages that vary within a sequence take the token-wise construction of verl's GSPO."""
    old, lp, adv, m = make_inputs("holed", token_adv=True, seed=2)
    compare_policy("gspo", mode, old, lp, adv, m, actor_config())


def test_dp_size_without_global_counts_raises():
    old, lp, adv, m = make_inputs("padded")
    for mode in ("token-mean", "seq-mean-token-mean"):
        with pytest.raises(ValueError):
            V.compute_policy_loss_vanilla(old, lp, adv, m, mode, actor_config(dp_size=2))


@pytest.mark.parametrize("loss_type", ["reinforce", "ppo_clip"])
@pytest.mark.parametrize("rollout_is,threshold,rs", [("token", 2.0, None), ("sequence", "0.5_3.0", "token_k1"),
                                                     (None, None, "seq_mean_k3")])
def test_bypass_mode_matches_verl(loss_type, rollout_is, threshold, rs):
    old, lp, adv, m = make_inputs("holed", seed=4)
    lp = old + (lp - old).clamp(-0.5, 0.5)  # off-policy but not absurdly (verl's metrics use exp)
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    rc = RolloutCorrectionConfig(loss_type=loss_type, rollout_is=rollout_is, rollout_is_threshold=threshold,
                                 rollout_rs=rs, rollout_rs_threshold="0.8_1.25" if rs == "token_k1" else 0.05)
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2,
                      policy_loss=PolicyLossConfig(loss_mode="bypass_mode", rollout_correction=rc))
    ours = run(V.compute_policy_loss_bypass_mode, old, lp, adv, m, "token-mean", cfg)
    theirs = run(ca.compute_policy_loss_bypass_mode, old, lp, adv, m, "token-mean", cfg)
    assert_close(ours[0], theirs[0], 1e-5, "loss")
    check_metrics(ours[1], theirs[1], tol=1e-4)
    assert_close(ours[2], theirs[2], 1e-4, "grad")


COV_LOSSES = ["clip_cov", "kl_cov"]


def cov_config(ratio: float, lb: float = 0.05, ub: float = 5.0, coef: float = 0.7, **batch_info) -> ActorConfig:
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2,
                      clip_ratio_low=0.2, clip_ratio_high=0.28,
                      policy_loss=PolicyLossConfig(loss_mode="clip_cov", clip_cov_ratio=ratio, clip_cov_lb=lb,
                                                   clip_cov_ub=ub, kl_cov_ratio=ratio, ppo_kl_coef=coef))
    cfg.global_batch_info.update(batch_info)
    return cfg


def compare_cov(name, mode, old, lp, adv, m, cfg, weights=None, grad_tol=1e-4, seed=0):
    """clip_cov draws its subset with torch.randperm on the default generator: both sides start
    from the same seed, so the same RNG call gives both the same permutation."""
    torch.manual_seed(seed)
    ours = run(V.get_policy_loss_fn(name), old, lp, adv, m, mode, cfg, weights)
    after = torch.randint(1 << 30, ())
    torch.manual_seed(seed)
    theirs = run(ca.get_policy_loss_fn(name), old.float(), lp.float(), adv, m, mode, cfg, weights)
    assert torch.randint(1 << 30, ()) == after, "the adapter must consume the RNG exactly as verl"
    assert_loss(ours[0], theirs[0], 1e-5, f"{name}/{mode} loss")
    check_metrics(ours[1], theirs[1])
    assert ours[2].dtype == lp.dtype
    assert_close(ours[2].float(), theirs[2].to(lp.dtype).float(), grad_tol, f"{name}/{mode} grad")
    return ours


@pytest.mark.parametrize("name", COV_LOSSES)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kind", ["padded", "holed"])
@pytest.mark.parametrize("ratio", [0.0002, 0.1, 0.9])
def test_cov_losses_match_verl(name, mode, kind, ratio):
    """Default ratio (one token), a random subset of the candidates, and (0.9) every candidate;
    log-ratios of +-25 (neither loss clamps them) give the largest covariances."""
    old, lp, adv, m = make_inputs(kind)
    for seed in (0, 1):
        compare_cov(name, mode, old, lp, adv, m, cov_config(ratio), seed=seed)
    old, lp, adv, m = make_inputs(kind, seed=5, token_adv=True)
    # without the +-25 log-ratios, whose exp(25) ratio would hide kl_cov's penalty in the tolerance
    lp = old + (lp - old).clamp(-1.0, 1.0)
    compare_cov(name, mode, old, lp, adv, m, cov_config(ratio, lb=0.01, ub=2.0), seed=2)


def test_clip_cov_cuts_the_drawn_tokens():
    """The cut subset really is a random draw among several candidates (not the first ones) and the
    metric counts it: with a ratio admitting 3 of the candidates, different seeds cut different
    tokens, each agreeing with verl."""
    old, lp, adv, m = make_inputs("holed", seed=5, token_adv=True)
    cfg = cov_config(0.06, lb=0.01, ub=2.0)
    grads = [compare_cov("clip_cov", "token-mean", old, lp, adv, m, cfg, seed=s)[2] for s in range(4)]
    assert any(not torch.equal((grads[0] == 0), (g == 0)) for g in grads[1:])


@pytest.mark.parametrize("name", COV_LOSSES)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_cov_losses_bf16_match_verl_in_float32(name, mode):
    old, lp, adv, m = make_inputs("holed", torch.bfloat16)
    compare_cov(name, mode, old, lp, adv, m, cov_config(0.1), grad_tol=1e-2)
    lp = old + (lp - old).clamp(-1.0, 1.0)
    compare_cov(name, mode, old, lp, adv, m, cov_config(0.1), grad_tol=1e-2)


@pytest.mark.parametrize("name", COV_LOSSES)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("info", list(GLOBAL_INFOS))
def test_cov_losses_global_batch_and_rollout_weights(name, mode, info):
    old, lp, adv, m = make_inputs("holed", seed=1)
    lp = old + (lp - old).clamp(-1.0, 1.0)
    w = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) * 2
    w[0, :3] = 0.0
    w[3, 0] = 0.0
    cfg = cov_config(0.1, **GLOBAL_INFOS[info])
    compare_cov(name, mode, old, lp, adv, m, cfg, weights=w)
    compare_cov(name, mode, old, lp, adv, m, cfg)


@pytest.mark.parametrize("name", COV_LOSSES)
def test_cov_losses_without_candidates_or_tokens(name):
    """No token inside clip_cov's covariance band (nothing is cut), and a batch of empty rows
    (verl divides by a zero count there: the adapter gives 0 and no NaN)."""
    old, lp, adv, m = make_inputs("padded")
    compare_cov(name, "token-mean", old, lp, adv, m, cov_config(0.1, lb=1e6, ub=2e6))
    empty = torch.zeros_like(m)
    loss, metrics, grad = run(V.get_policy_loss_fn(name), old, lp, adv, empty, "token-mean", cov_config(0.1))
    assert float(loss) == 0.0 and not grad.any()
    assert all(v == 0.0 for v in metrics.values())


def test_cov_losses_reject_bad_config():
    old, lp, adv, m = make_inputs("padded")
    for name in COV_LOSSES:
        with pytest.raises(ValueError):
            V.get_policy_loss_fn(name)(old, lp, adv, m, "token-mean", None)
    with pytest.raises(ValueError, match="clip_cov_ratio"):
        V.compute_policy_loss_clip_cov(old, lp, adv, m, "token-mean", cov_config(0.0))
    with pytest.raises(ValueError, match="kl_cov_ratio"):
        V.compute_policy_loss_kl_cov(old, lp, adv, m, "token-mean", cov_config(-1.0))


def test_deprecated_compute_policy_loss():
    old, lp, adv, m = make_inputs("holed")
    ours = V.compute_policy_loss(old, lp, adv, m, cliprange=0.2, cliprange_high=0.3, loss_agg_mode="token-mean")
    theirs = ca.compute_policy_loss(old, lp, adv, m, cliprange=0.2, cliprange_high=0.3, loss_agg_mode="token-mean")
    for a, b, what in zip(ours, theirs, ("loss", "clipfrac", "ppo_kl", "clipfrac_lower")):
        assert_close(a, b, 1e-5, what)


# ----------------------------------------------------------------------------- aggregation, KL, value loss

@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("batch", [{}, dict(dp_size=4, batch_num_tokens=200, global_batch_size=24),
                                   dict(loss_scale_factor=32)])
def test_agg_loss_matches_verl(mode, batch):
    _, lp, _, m = make_inputs("holed")
    assert_close(V.agg_loss(lp, m, mode, **batch), ca.agg_loss(lp, m, mode, **batch), 1e-6, mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("batch", [{}, dict(dp_size=4, batch_num_tokens=200, global_batch_size=24),
                                   dict(loss_scale_factor=32)])
def test_agg_loss_gradient_and_dtype_match_verl(mode, batch, dtype):
    # the one-pass CPU aggregation (and its backward) against verl's eager formula: value, result
    # dtype (verl's sequence modes promote bfloat16/float16 to float32) and gradient, over rows
    # longer than one vector block, a holed mask and an empty row
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1100, generator=g).to(dtype)
    m = torch.rand(5, 1100, generator=g) > 0.3
    m[1] = False
    m[3, 700:] = False
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    lo, lt = V.agg_loss(ours, m, mode, **batch), ca.agg_loss(theirs, m, mode, **batch)
    assert lo.dtype == lt.dtype
    (1.5 * lo).backward()
    (1.5 * lt).backward()
    tol = 1e-6 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
    assert_close(lo.double(), lt.double(), tol, mode)
    assert ours.grad.dtype == dtype
    assert_close(ours.grad.double(), theirs.grad.double(), tol, mode + " grad")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss_masked_nan_and_mask_dtypes(mode):
    # masked positions may hold NaN (rlkern's mask policy: verl's sequence modes multiply by the
    # mask and would give NaN); an int mask takes the same path as a bool one, a float mask
    # keeps verl's weighting by its values through the eager formula
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 50, generator=g)
    m = torch.rand(4, 50, generator=g) > 0.5
    clean = torch.where(m, x, torch.zeros(()))
    x[~m] = float("nan")
    want = ca.agg_loss(clean, m, mode)
    for mask in (m, m.to(torch.int64), m.to(torch.float32)):
        xs = x.clone().requires_grad_()
        got = V.agg_loss(xs, mask, mode)
        got.backward()
        assert_close(got, want, 1e-6, f"{mode} {mask.dtype}")
        assert torch.isfinite(xs.grad).all() and (xs.grad[~m] == 0).all()


def test_agg_loss_deterministic_across_threads():
    from rlkern import _kernel

    x = torch.randn(64, 3000, generator=torch.Generator().manual_seed(5))
    m = torch.rand(64, 3000, generator=torch.Generator().manual_seed(6)) > 0.2
    ctl = _kernel.core()
    before = ctl.num_threads()
    try:
        values = []
        for n in (1, 2, 3):
            ctl.set_num_threads(n)
            values.append([V.agg_loss(x, m, mode).item() for mode in AGG_MODES])
    finally:
        ctl.set_num_threads(before)
    assert values[0] == values[1] == values[2]


KL_MODES = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "kl+", "k1+", "abs+", "mse+", "k2+",
            "low_var_kl+", "k3+"]


@pytest.mark.parametrize("mode", KL_MODES)
def test_kl_penalty_matches_verl(mode):
    old, lp, _, _ = make_inputs("padded")
    ref = old
    lp = lp.detach().clone().requires_grad_()
    ours = V.kl_penalty(lp, ref, mode)
    (g_ours,) = torch.autograd.grad(ours.sum(), lp)
    theirs = ca.kl_penalty(lp, ref, mode)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), lp)
    assert_close(ours, theirs, 1e-6, "value")
    assert_close(g_ours, g_theirs, 1e-6, "grad")


@pytest.mark.parametrize("mode", ["low_var_kl", "k3+", "kl", "mse"])
def test_kl_penalty_bf16_computes_in_float32(mode):
    """verl forms ref - lp in bfloat16 (error ~1e-2 on low_var_kl); the adapter computes in float32."""
    old, lp, _, _ = make_inputs("padded", torch.bfloat16)
    ours = V.kl_penalty(lp, old, mode)
    assert ours.dtype == torch.float32
    assert_close(ours, ca.kl_penalty(lp.float(), old.float(), mode), 1e-6, "value")


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("batch", [{}, dict(dp_size=2, batch_num_tokens=80, global_batch_size=10,
                                            loss_scale_factor=20)])
def test_value_loss_matches_verl(mode, batch):
    g = torch.Generator().manual_seed(5)
    m = make_mask("holed")
    v = torch.randn(B, T, generator=g).requires_grad_()
    old_v = v.detach() + 0.3 * torch.randn(B, T, generator=g)
    ret = torch.randn(B, T, generator=g)
    ours = V.compute_value_loss(v, ret, old_v, m, 0.2, mode, **batch)
    (g_ours,) = torch.autograd.grad(ours[0], v)
    theirs = ca.compute_value_loss(v, ret, old_v, m, 0.2, mode, **batch)
    (g_theirs,) = torch.autograd.grad(theirs[0], v)
    assert_close(ours[0], theirs[0], 1e-5, "loss")
    assert_close(ours[1], theirs[1], 1e-6, "clipfrac")
    assert_close(g_ours, g_theirs, 1e-5, "grad")


# ----------------------------------------------------------------------------- advantage estimators

class AlgoConfig(dict):
    """The parts of verl's AlgoConfig the estimators read (attribute and .get access)."""

    __getattr__ = dict.get


def estimator_inputs(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = 12
    m = torch.ones(n, T, dtype=torch.bool)
    for i in range(n):
        m[i, 2 + (5 * i) % (T - 2):] = False
    if kind == "holed":
        m[1, 0] = False
        m[4, 1:3] = False
    rewards = torch.zeros(n, T)
    last = T - 1 - m.long().fliplr().argmax(1)
    rewards[torch.arange(n), last] = torch.randint(0, 3, (n,), generator=g).float()
    rewards += 0.1 * torch.randn(n, T, generator=g) * m
    uid = np.array(["a", "b", "c", "a", "b", "c", "a", "b", "c", "a", "b", "c"], dtype=object)
    perm = torch.randperm(n, generator=g).numpy()
    return rewards, m.float(), uid[perm]


ESTIMATORS = ["grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "opo", "gpg", "grpo_passk",
              "reinforce_plus_plus", "reinforce_plus_plus_baseline", "gdpo"]


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("kind", ["padded", "holed"])
@pytest.mark.parametrize("singletons", [False, True])
def test_advantage_estimators_match_verl(name, kind, singletons):
    rewards, m, uid = estimator_inputs(kind)
    if singletons:
        if name == "grpo_passk":
            pytest.skip("verl's grpo_passk rejects groups of one (tested below)")
        uid = uid.copy()
        uid[0] = "solo"
    cfg = AlgoConfig(gamma=0.9, norm_adv_by_std_in_grpo=True)
    kwargs = dict(token_level_rewards=rewards, response_mask=m, config=cfg)
    if name != "reinforce_plus_plus":
        kwargs["index"] = uid
    ours = V.get_adv_estimator_fn(name)(**{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                           for k, v in kwargs.items()})
    theirs = ca.get_adv_estimator_fn(name)(**{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                              for k, v in kwargs.items()})
    assert_close(ours[0], theirs[0], 1e-5, "advantages")
    assert_close(ours[1], theirs[1], 1e-5, "returns")


@pytest.mark.parametrize("weights", [None, [1.0, 0.25]])
def test_gdpo_with_reward_components_matches_verl(weights):
    """GDPO reads each reward component from the non-tensor batch, places it on the last
    response token, normalises it per uid group, weights, sums and whitens: against verl's own."""
    rewards, m, uid = estimator_inputs("holed")
    n, T = m.shape
    g = torch.Generator().manual_seed(3)
    prompts = torch.zeros(n, 5, dtype=torch.long)
    lengths = m.sum(-1).long().clamp(min=1)
    response = (torch.arange(T)[None, :] < lengths[:, None]).long()
    attention = torch.cat([torch.ones(n, 5, dtype=torch.long), response], dim=1)
    non_tensor = {"format": torch.randint(0, 2, (n,), generator=g).float().numpy(),
                  "accuracy": torch.randn(n, generator=g).numpy()}
    cfg = AlgoConfig(norm_adv_by_std_in_grpo=True, gdpo_reward_keys=["format", "accuracy"],
                     gdpo_reward_weights=weights)
    kwargs = dict(token_level_rewards=rewards, response_mask=m, index=uid, config=cfg, non_tensor_batch=non_tensor,
                  batch={"prompts": prompts, "attention_mask": attention})
    ours = V.get_adv_estimator_fn("gdpo")(**kwargs)
    theirs = ca.get_adv_estimator_fn("gdpo")(**kwargs)
    assert_close(ours[0], theirs[0], 1e-5, "advantages")
    assert_close(ours[1], theirs[1], 1e-5, "returns")
    with pytest.raises(ValueError, match="not in non_tensor_batch"):
        V.compute_gdpo_outcome_advantage(rewards, m, uid, config=cfg, non_tensor_batch={"format": non_tensor["format"]},
                                         batch=kwargs["batch"])


@pytest.mark.parametrize("is_weights", [False, True])
@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("kind", ["padded", "holed"])
@pytest.mark.parametrize("name", ["optimal_token_baseline", "tir_optimal_token_baseline"])
def test_optimal_token_baseline_matches_verl(name, kind, zero_tail, is_weights):
    rewards, m, uid = estimator_inputs(kind)
    uid = uid.copy()
    uid[0] = "solo"  # a group of one: no baseline
    n, T = m.shape
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(n, T, generator=g) * 3
    sum_pi_sq = torch.rand(n, T, generator=g) * 0.5
    kwargs = dict(token_level_rewards=rewards, response_mask=m, index=uid, old_log_probs=old,
                  sum_pi_squared=sum_pi_sq, handle_zero_tail=zero_tail,
                  rollout_is_weights=(torch.rand(n, T, generator=g) + 0.5) if is_weights else None)
    if name.startswith("tir"):
        m[3] = 0  # an empty row: left out of its group by the multi-turn variant
        kwargs["response_mask"] = m
    ours = V.get_adv_estimator_fn(name)(**kwargs)
    theirs = ca.get_adv_estimator_fn(name)(**kwargs)
    assert_close(ours[0], theirs[0], 1e-5, "advantages")
    assert_close(ours[1], theirs[1], 1e-5, "returns")


def test_grpo_passk_rejects_groups_of_one():
    rewards, m, uid = estimator_inputs("padded")
    uid = uid.copy()
    uid[0] = "solo"
    with pytest.raises(ValueError):
        V.compute_grpo_passk_outcome_advantage(rewards, m, uid, config=AlgoConfig())


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_outcome_advantage_dr_grpo(norm):
    rewards, m, uid = estimator_inputs("holed", seed=3)
    ours = V.compute_grpo_outcome_advantage(rewards, m, uid, norm_adv_by_std_in_grpo=norm)
    theirs = ca.compute_grpo_outcome_advantage(rewards.clone(), m, uid, norm_adv_by_std_in_grpo=norm)
    assert_close(ours[0], theirs[0], 1e-5)


def test_remax_matches_verl():
    rewards, m, _ = estimator_inputs("holed")
    baselines = torch.randn(rewards.shape[0], generator=torch.Generator().manual_seed(7))
    ours = V.compute_remax_outcome_advantage(rewards, baselines, m)
    theirs = ca.compute_remax_outcome_advantage(rewards, baselines, m)
    assert_close(ours[0], theirs[0], 1e-6)
    assert_close(ours[1], theirs[1], 1e-6)


@pytest.mark.parametrize("kind", ["padded", "holed"])
def test_gae_matches_verl(kind):
    rewards, m, _ = estimator_inputs(kind)
    values = torch.randn(rewards.shape, generator=torch.Generator().manual_seed(8))
    ours = V.compute_gae_advantage_return(rewards, values, m, 0.95, 0.9)
    theirs = ca.compute_gae_advantage_return(rewards, values, m, 0.95, 0.9)
    assert_close(ours[0], theirs[0], 1e-5, "advantages")
    assert_close(ours[1], theirs[1], 1e-5, "returns")


# ----------------------------------------------------------------------------- install into verl

def test_install_registers_rlkern_and_uninstall_restores():
    originals = {n: ca.POLICY_LOSS_REGISTRY[n] for n in V.POLICY_LOSS_REGISTRY}
    adv_originals = {n: ca.ADV_ESTIMATOR_REGISTRY[n] for n in V.ADV_ESTIMATOR_REGISTRY}
    kl_original, vl_original = ca.kl_penalty, ca.compute_value_loss
    clip_cov = ca.POLICY_LOSS_REGISTRY["clip_cov"]
    V.install()
    try:
        V.install()  # idempotent
        for name, fn in V.POLICY_LOSS_REGISTRY.items():
            assert ca.get_policy_loss_fn(name) is fn
        for name, fn in V.ADV_ESTIMATOR_REGISTRY.items():
            assert ca.get_adv_estimator_fn(name) is fn
        assert ca.kl_penalty is V.kl_penalty and ca.compute_value_loss is V.compute_value_loss
        assert ca.POLICY_LOSS_REGISTRY["clip_cov"] is V.compute_policy_loss_clip_cov is not clip_cov
        for name in ("sapo", "geo_mean", "dppo_tv", "dppo_kl", "kl_cov"):
            assert ca.get_policy_loss_fn(name) is V.POLICY_LOSS_REGISTRY[name]
        # an unchanged verl call path (registry lookup by config name) now runs rlkern and agrees with verl
        old, lp, adv, m = make_inputs("padded")
        cfg = actor_config()
        for mode in ("vanilla", "sapo", "geo_mean", "dppo_kl"):
            fn = ca.get_policy_loss_fn(mode)
            ours = run(fn, old, lp, adv, m, "token-mean", cfg)
            theirs = run(originals[mode], old, lp, adv, m, "token-mean", cfg)
            assert_close(ours[0], theirs[0], 1e-5, mode)
            check_metrics(ours[1], theirs[1])
    finally:
        V.uninstall()
    assert {n: ca.POLICY_LOSS_REGISTRY[n] for n in originals} == originals
    assert {n: ca.ADV_ESTIMATOR_REGISTRY[n] for n in adv_originals} == adv_originals
    assert ca.kl_penalty is kl_original and ca.compute_value_loss is vl_original
    assert not V.installed()


@pytest.mark.parametrize("name", LOSSES)
def test_nan_at_masked_positions_does_not_leak(name):
    """verl's masked sums ignore NaN held at masked positions; so does the adapter (loss, metrics, grad)."""
    old, lp, adv, m = make_inputs("holed", seed=6)
    dirty_old, dirty_lp = old.clone(), lp.clone()
    dirty_old[~m] = float("nan")
    dirty_lp[~m] = float("nan")
    cfg = actor_config()
    ours = run(V.get_policy_loss_fn(name), dirty_old, dirty_lp, adv, m, "token-mean", cfg)
    theirs = run(ca.get_policy_loss_fn(name), old, lp, adv, m, "token-mean", cfg)
    assert_close(ours[0], theirs[0], 1e-5, "loss")
    check_metrics(ours[1], theirs[1])
    assert_close(ours[2], theirs[2], 1e-4, "grad")


def test_bad_arguments_raise_clear_errors():
    old, lp, adv, m = make_inputs("padded")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        V.compute_policy_loss_vanilla(old, lp, adv, m, "token-median", actor_config())
    with pytest.raises(ValueError, match="config"):
        V.compute_policy_loss_gspo(old, lp, adv, m, "token-mean", None)
    for name in ("sapo", "geo_mean", "dppo_tv", "dppo_kl", "clip_cov", "kl_cov"):
        with pytest.raises(ValueError, match="config"):
            V.get_policy_loss_fn(name)(old, lp, adv, m, "token-mean", None)
        with pytest.raises(ValueError, match="loss_agg_mode"):
            V.get_policy_loss_fn(name)(old, lp, adv, m, "token-median", actor_config())
    with pytest.raises(ValueError, match="dro_beta"):
        V.compute_policy_loss_dro(old, lp, adv, m, "token-mean",
                                  ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2))
    with pytest.raises(ValueError, match="Unsupported loss mode"):
        V.get_policy_loss_fn("no_such_loss")
    with pytest.raises(ValueError, match="index"):
        V.compute_grpo_outcome_advantage(torch.zeros(4, 3), torch.ones(4, 3), np.array([0, 0, 1]))


def _graph_has(node, name: str) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        if name in type(n).__name__:
            return True
        stack.extend(f for f, _ in n.next_functions)
    return False


@pytest.mark.parametrize("use_kl_loss", [False, True])
def test_install_runs_verls_own_ppo_loss_on_rlkern(use_kl_loss):
    """verl's trainer-side ppo_loss (verl/workers/utils/losses.py), unchanged, looks the policy loss
    up by the config's loss_mode and calls kl_penalty by its imported name: after install() both are
    rlkern's, and loss and gradients agree with verl's own run."""
    wl = pytest.importorskip("verl.workers.utils.losses", reason="needs tensordict for verl's trainer losses")
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    old, lp, adv, m = make_inputs("padded")
    ref = old + 0.1
    lengths = m.sum(-1)
    P = 2  # prompt tokens; verl's model output is flat over prompt + response, shifted by one
    flat = torch.cat([torch.cat([torch.zeros(1), lp[i, :lengths[i]], torch.zeros(1)]) for i in range(B)])
    data = TensorDict({"prompts": torch.ones(B, P, dtype=torch.long), "responses": torch.ones(B, T, dtype=torch.long),
                       "attention_mask": torch.cat([torch.ones(B, P, dtype=torch.long), m.long()], 1),
                       "response_mask": m.long(), "old_log_probs": old, "advantages": adv, "ref_log_prob": ref},
                      batch_size=[B])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(m.sum()), global_batch_size=B)
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2,
                      clip_ratio_high=0.28, use_kl_loss=use_kl_loss, kl_loss_type="low_var_kl", kl_loss_coef=0.1)

    def step():
        x = flat.clone().requires_grad_()
        loss, _ = wl.ppo_loss(cfg, {"log_probs": x}, data)
        return loss, torch.autograd.grad(loss, x)[0]

    theirs = step()
    V.install()
    try:
        assert wl.kl_penalty is V.kl_penalty and wl.compute_value_loss is V.compute_value_loss
        ours = step()
        assert _graph_has(ours[0].grad_fn, "PolicyLoss")  # the fused kernel's backward node
    finally:
        V.uninstall()
    assert wl.kl_penalty is ca.kl_penalty
    assert_loss(ours[0], theirs[0], 1e-5, "loss")
    assert_close(ours[1], theirs[1], 1e-4, "grad")


# ----------------------------------------------------------------------------- rollout correction

rch = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")


def rollout_inputs(kind: str, dtype=torch.float32, seed: int = 7):
    """Training and rollout log-probs a little apart, with log-ratios of +-25 (beyond verl's +-20
    clamp) on two active tokens."""
    g = torch.Generator().manual_seed(seed)
    m = make_mask(kind)
    roll = -torch.rand(B, T, generator=g) * 3 - 0.05
    old = roll + 0.15 * torch.randn(B, T, generator=g)
    old[0, 0] = roll[0, 0] + 25.0
    old[3, 0] = roll[3, 0] - 25.0
    return old.to(dtype), roll.to(dtype), m


def check_rollout_metrics(ours: dict, theirs: dict, tol: float = 1e-5) -> None:
    assert set(ours) == set(theirs), f"metric names differ: {sorted(set(ours) ^ set(theirs))}"
    for k, v in theirs.items():
        assert isinstance(ours[k], float), f"{k}: verl returns Python floats"
        assert ours[k] == v or abs(ours[k] - v) <= tol * max(1.0, abs(v)), f"{k}: {ours[k]} vs verl {v}"


def compare_rollout(old, roll, m, **options):
    ours = V.compute_rollout_correction_and_rejection_mask(old, roll, m, **options)
    theirs = rch.compute_rollout_correction_and_rejection_mask(old.float(), roll.float(), m, **options)
    assert (ours[0] is None) == (theirs[0] is None)
    if ours[0] is not None:
        assert type(ours[0]) is type(theirs[0])
        assert_close(ours[0].batch["rollout_is_weights"], theirs[0].batch["rollout_is_weights"], 1e-6, "weights")
    assert ours[1].dtype == m.dtype and torch.equal(ours[1], theirs[1]), "rejection mask"
    check_rollout_metrics(ours[2], theirs[2])
    return ours


IS_THRESHOLDS = [2.0, "1.5", "0.5_3.0", "0.9_1.1"]
RS_CASES = [("token_k1", "0.8_1.25"), ("token_k1", 1.3), ("token_k2", 0.01), ("token_k3", 0.02),
            ("seq_sum_k1", "0.5_2.0"), ("seq_sum_k2", 0.05), ("seq_sum_k3", 0.05), ("seq_mean_k1", "0.9_1.1"),
            ("seq_mean_k2", 0.01), ("seq_mean_k3", 0.01), ("seq_max_k2", 0.05), ("seq_max_k3", 0.05),
            ("token_k1,seq_mean_k3,token_k1", "0.8_1.25,0.01"), ("token_k2, seq_max_k3", 0.03)]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("threshold", IS_THRESHOLDS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("kind", ["padded", "holed"])
def test_rollout_is_weights_match_verl(level, threshold, normalize, kind):
    """TIS and IcePop (lower_upper) weights, batch normalisation, every rollout_is_* metric."""
    old, roll, m = rollout_inputs(kind)
    compare_rollout(old, roll, m, rollout_is=level, rollout_is_threshold=threshold,
                    rollout_is_batch_normalize=normalize)


@pytest.mark.parametrize("rs,threshold", RS_CASES)
@pytest.mark.parametrize("kind", ["padded", "holed"])
def test_rollout_rejection_matches_verl(rs, threshold, kind):
    old, roll, m = rollout_inputs(kind)
    ours = compare_rollout(old, roll, m, rollout_rs=rs, rollout_rs_threshold=threshold)
    assert 0 < ours[1].sum() < m.sum() or rs.startswith("seq_sum_k1"), "the case must reject some tokens"


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollout_is_and_rejection_together(mask_dtype, dtype):
    """Both at once, masks of every dtype verl's trainer passes, and bfloat16 log-probs (the oracle
    is verl on their float32 values: the adapter computes in float32)."""
    old, roll, m = rollout_inputs("holed", dtype)
    compare_rollout(old, roll, m.to(mask_dtype), rollout_is="sequence", rollout_is_threshold="0.5_3.0",
                    rollout_is_batch_normalize=True, rollout_rs="token_k1,seq_max_k2",
                    rollout_rs_threshold="0.8_1.25,0.05")
    compare_rollout(old, roll, m.to(mask_dtype), rollout_is="token", rollout_is_threshold=2.0)


def test_rollout_single_token_and_single_row():
    """One active token (std 0) and one non-empty row (sequence std 0)."""
    old, roll, m = rollout_inputs("padded")
    one = torch.zeros_like(m)
    one[1, 2] = True
    for mask in (one, torch.zeros_like(m).index_fill_(0, torch.tensor([2]), True)):
        compare_rollout(old, roll, mask, rollout_is="token", rollout_is_threshold="0.5_3.0", rollout_rs="seq_mean_k3",
                        rollout_rs_threshold=0.01)


def test_rollout_helpers_match_verl():
    old, roll, m = rollout_inputs("holed")
    lr = old - roll
    for kw in (dict(rollout_is="token"), dict(rollout_is="sequence", rollout_is_threshold="0.5_2",
                                                  rollout_is_batch_normalize=True)):
        ours = V.compute_rollout_correction_weights(lr, m, **kw)
        theirs = rch.compute_rollout_correction_weights(lr, m, **kw)
        assert_close(ours[0], theirs[0], 1e-6, "weights")
        check_rollout_metrics(ours[1], theirs[1])
    ours = V.compute_rollout_rejection_mask(lr, m, "seq_sum_k3,token_k1", "0.05,0.7_1.4")
    theirs = rch.compute_rollout_rejection_mask(lr, m, "seq_sum_k3,token_k1", "0.05,0.7_1.4")
    assert torch.equal(ours[0], theirs[0])
    check_rollout_metrics(ours[1], theirs[1])
    check_rollout_metrics(V.compute_offpolicy_metrics(old, roll, m), rch.compute_offpolicy_metrics(old, roll, m))
    check_rollout_metrics(V.compute_offpolicy_metrics(old, None, m), rch.compute_offpolicy_metrics(old, None, m))
    check_rollout_metrics(V.compute_rollout_corr_metrics_from_logprobs(old, roll, m),
                          rch.compute_rollout_corr_metrics_from_logprobs(old, roll, m))


@pytest.mark.parametrize("options", [
    dict(rollout_is="tok"), dict(rollout_is="token", rollout_is_threshold="3_0.5"),
    dict(rollout_is="token", rollout_is_threshold=True), dict(rollout_is="token", rollout_is_threshold="x"),
    dict(rollout_is="token", rollout_is_threshold=-1.0), dict(rollout_rs="token_k4", rollout_rs_threshold=1.0),
    dict(rollout_rs="token_k1"), dict(rollout_rs="token_k2", rollout_rs_threshold="0.1_0.2"),
    dict(rollout_rs="token_k2,seq_sum_k3", rollout_rs_threshold="0.1,0.2,0.3"),
    dict(rollout_rs="token_k1", rollout_rs_threshold="2_1"), dict(rollout_rs=" , ", rollout_rs_threshold=1.0)])
def test_rollout_rejects_what_verl_rejects(options):
    old, roll, m = rollout_inputs("padded")
    with pytest.raises((ValueError, TypeError)) as theirs:
        rch.compute_rollout_correction_and_rejection_mask(old, roll, m, **options)
    with pytest.raises(theirs.type):
        V.compute_rollout_correction_and_rejection_mask(old, roll, m, **options)


def test_rollout_empty_mask_and_bad_shapes_raise():
    old, roll, m = rollout_inputs("padded")
    with pytest.raises(ValueError, match="at least one valid token"):
        V.compute_rollout_correction_and_rejection_mask(old, roll, torch.zeros_like(m), rollout_is="token")
    with pytest.raises(ValueError, match="shape"):
        V.compute_rollout_correction_and_rejection_mask(old, roll[:, :3], m)
    with pytest.raises(ValueError, match="shape"):
        V.compute_rollout_correction_and_rejection_mask(old, roll, m[:, :3])


def test_rollout_correction_reads_metrics_back_once(monkeypatch):
    """verl syncs the device for each of its ~40 metrics; the adapter reads them back with one
    tolist() and never calls item()."""
    old, roll, m = rollout_inputs("holed")
    calls = []
    real_tolist = torch.Tensor.tolist

    def no_item(self):
        raise AssertionError("item() called")

    def counted(self):
        calls.append(1)
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    V.compute_rollout_correction_and_rejection_mask(old, roll, m, rollout_is="sequence",
                                                    rollout_is_threshold="0.5_3.0", rollout_is_batch_normalize=True,
                                                    rollout_rs="token_k1,seq_max_k2,seq_mean_k3",
                                                    rollout_rs_threshold="0.8_1.25,0.05,0.01")
    assert len(calls) == 1


def test_install_swaps_rollout_correction_and_verls_trainer_step_runs_it():
    """After install() verl's own trainer step (compute_rollout_correction_and_add_to_batch, looked
    up in rollout_corr_helper at call time) runs rlkern's, with verl's DataProto and config."""
    pytest.importorskip("tensordict")
    from verl.protocol import DataProto
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    old, roll, m = rollout_inputs("holed")
    cfg = RolloutCorrectionConfig(rollout_is="token", rollout_is_threshold="0.5_3.0", rollout_rs="seq_mean_k3",
                                  rollout_rs_threshold=0.01)

    def batch():
        return DataProto.from_dict(tensors={"old_log_probs": old, "rollout_log_probs": roll,
                                            "response_mask": m.long()})

    original = rch.compute_rollout_correction_and_add_to_batch
    theirs, theirs_metrics = original(batch(), cfg)
    V.install()
    try:
        assert rch.compute_rollout_correction_and_add_to_batch is V.compute_rollout_correction_and_add_to_batch
        assert rch.compute_rollout_correction_and_rejection_mask is V.compute_rollout_correction_and_rejection_mask
        from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch as step
        ours, ours_metrics = step(batch(), cfg)
    finally:
        V.uninstall()
    assert rch.compute_rollout_correction_and_add_to_batch is original
    assert torch.equal(ours.batch["response_mask"], theirs.batch["response_mask"])
    assert_close(ours.batch["rollout_is_weights"], theirs.batch["rollout_is_weights"], 1e-6, "weights")
    check_rollout_metrics(ours_metrics, theirs_metrics)


@pytest.mark.parametrize("name", COV_LOSSES)
def test_cov_losses_ignore_nan_at_masked_positions(name):
    old, lp, adv, m = make_inputs("holed")
    lp = old + (lp - old).clamp(-1.0, 1.0)
    cfg = cov_config(0.1)
    torch.manual_seed(0)
    clean = run(V.get_policy_loss_fn(name), old, lp, adv, m, "seq-mean-token-mean", cfg)
    dirty_lp, dirty_old = lp.clone(), old.clone()
    dirty_lp[~m] = float("nan")
    dirty_old[~m] = float("nan")
    torch.manual_seed(0)
    dirty = run(V.get_policy_loss_fn(name), dirty_old, dirty_lp, adv, m, "seq-mean-token-mean", cfg)
    assert float(dirty[0]) == float(clean[0]) and dirty[1] == clean[1]
    assert torch.equal(dirty[2], clean[2])


def test_rollout_correction_ignores_nan_at_masked_positions():
    old, roll, m = rollout_inputs("holed")
    options = dict(rollout_is="sequence", rollout_is_threshold="0.5_3.0", rollout_is_batch_normalize=True,
                   rollout_rs="token_k1,seq_max_k2,seq_sum_k3", rollout_rs_threshold="0.8_1.25,0.05,0.05")
    clean = V.compute_rollout_correction_and_rejection_mask(old, roll, m, **options)
    d_old, d_roll = old.clone(), roll.clone()
    d_old[~m] = float("nan")
    d_roll[~m] = float("inf")
    dirty = V.compute_rollout_correction_and_rejection_mask(d_old, d_roll, m, **options)
    assert torch.equal(dirty[0].batch["rollout_is_weights"], clean[0].batch["rollout_is_weights"])
    assert torch.equal(dirty[1], clean[1])
    assert dirty[2] == clean[2]


def test_rollout_batch_normalize_across_ranks_matches_verl(tmp_path):
    """With torch.distributed initialised, batch normalisation divides by the mean over every
    rank's tokens (or sequences), as verl's distributed_masked_mean: two gloo ranks, each with its
    own half of the batch, against verl on the same rank."""
    proc = run_isolated(f"""
        import torch, torch.distributed as dist, torch.multiprocessing as mp
        from verl.trainer.ppo import rollout_corr_helper as rch  # imported once, before the fork
        from rlkern.integrations import verl as V

        def rank_main(rank):
            dist.init_process_group("gloo", init_method="file://{tmp_path / 'rdv'}", rank=rank, world_size=2)
            g = torch.Generator().manual_seed(rank)
            roll = -torch.rand(4, 9, generator=g) * 3
            old = roll + 0.1 * (1 + rank) * torch.randn(4, 9, generator=g)
            m = torch.rand(4, 9, generator=g) < 0.8
            m[3] = rank == 0
            for level in ("token", "sequence"):
                kw = dict(rollout_is=level, rollout_is_threshold="0.2_5.0", rollout_is_batch_normalize=True)
                ours = V.compute_rollout_correction_and_rejection_mask(old, roll, m, **kw)
                theirs = rch.compute_rollout_correction_and_rejection_mask(old, roll, m, **kw)
                w, w_ref = ours[0].batch["rollout_is_weights"], theirs[0].batch["rollout_is_weights"]
                assert torch.allclose(w, w_ref, rtol=1e-6, atol=1e-7), (level, w, w_ref)
                key = "rollout_corr/rollout_is_batch_norm_factor"
                assert abs(ours[2][key] - theirs[2][key]) < 1e-6, (ours[2][key], theirs[2][key])
                print("rank", rank, level, "MATCHED", ours[2][key], flush=True)
            dist.destroy_process_group()

        if __name__ == "__main__":
            mp.start_processes(rank_main, nprocs=2, start_method="fork")
    """, timeout=300)
    assert proc.stdout.count("MATCHED") == 4


@pytest.mark.parametrize("name", COV_LOSSES)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32, torch.float32),
                                    (torch.float32, torch.bfloat16, torch.bfloat16),
                                    (torch.float64, torch.float32, torch.float32),
                                    (torch.float32, torch.float32, torch.float64)])
def test_cov_compiled_selection_matches_torch_path_and_thread_counts(name, dtypes, monkeypatch):
    """CPU tensors take the compiled selection (csrc/cpu/cov.cpp): it draws the same RNG, cuts /
    penalises the same tokens as the torch formulation (other devices), with per-sequence or
    per-token advantages and mixed dtypes, and gives bit-identical results for 1 or 4 threads
    (rows split across threads: 40 rows of 2048 tokens)."""
    import rlkern

    adv_dtype, lp_dtype, old_dtype = dtypes
    g = torch.Generator().manual_seed(7)
    b, t = 40, 2048
    old = -torch.rand(b, t, generator=g) * 3
    lp = old + 0.3 * torch.randn(b, t, generator=g)
    m = torch.arange(t)[None, :] < torch.randint(t // 4, t + 1, (b,), generator=g)[:, None]
    cfg = cov_config(0.01, lb=0.05, ub=2.0)
    for adv in (torch.randn(b, generator=g), torch.randn(b, t, generator=g)):
        args = (old.to(old_dtype), lp.to(lp_dtype), adv.to(adv_dtype), m, "seq-mean-token-mean", cfg)
        results = []
        for threads in (1, 4):
            rlkern.set_num_threads(threads)
            try:
                torch.manual_seed(3)
                results.append(run(V.get_policy_loss_fn(name), *args))
            finally:
                rlkern.set_num_threads(0)
        assert float(results[0][0]) == float(results[1][0]) and results[0][1] == results[1][1]
        assert torch.equal(results[0][2], results[1][2])
        after = torch.randint(1 << 30, ())
        with monkeypatch.context() as mp:
            mp.setattr(V, "_cov_native", lambda *a: None)
            torch.manual_seed(3)
            slow = run(V.get_policy_loss_fn(name), *args)
            assert torch.randint(1 << 30, ()) == after
        assert_loss(results[0][0], slow[0], 1e-5, name)
        check_metrics(results[0][1], slow[1])
        tol = 1e-2 if lp_dtype == torch.bfloat16 else 1e-5
        assert_close(results[0][2].float(), slow[2].float(), tol, "grad")
        if name == "clip_cov":
            assert torch.equal(results[0][2] == 0, slow[2] == 0), "the same tokens are cut"


def test_kl_cov_penalty_gradient_survives_retain_graph():
    """The penalty's gradient is added in place into the fused kernel's gradient buffer: a
    second backward through a retained graph must give the same gradient, not add it twice."""
    old, lp, adv, m = make_inputs("holed", seed=5, token_adv=True)
    lp = (old + (lp - old).clamp(-1.0, 1.0)).requires_grad_()
    loss, _ = V.compute_policy_loss_kl_cov(old, lp, adv, m, "token-mean", cov_config(0.1))
    (first,) = torch.autograd.grad(loss, lp, retain_graph=True)
    (second,) = torch.autograd.grad(loss, lp)
    assert torch.equal(first, second)
    theirs = run(ca.compute_policy_loss_kl_cov, old, lp.detach(), adv, m, "token-mean", cov_config(0.1))
    assert_close(first, theirs[2], 1e-4, "grad")


# ----------------------------------------------------------------------------- compiled rollout correction

from rlkern.integrations import _rollout_corr as RC  # noqa: E402

NATIVE_CASES = [
    dict(rollout_is="token", rollout_is_threshold=2.0),
    dict(rollout_is="token", rollout_is_threshold="0.5_3.0", rollout_is_batch_normalize=True),
    dict(rollout_is="sequence", rollout_is_threshold=2.0, rollout_rs="token_k1", rollout_rs_threshold="0.8_1.25"),
    dict(rollout_is="sequence", rollout_is_threshold="0.5_3.0", rollout_is_batch_normalize=True,
         rollout_rs="token_k2,seq_max_k3,seq_sum_k1", rollout_rs_threshold="0.01,0.05,0.5_2.0"),
    dict(rollout_rs="seq_mean_k3", rollout_rs_threshold=0.01),
    dict(rollout_rs="token_k3,seq_mean_k1,seq_max_k2", rollout_rs_threshold="0.02,0.9_1.1,0.05"),
    dict(rollout_is="token", rollout_is_threshold="1.5", rollout_rs="seq_sum_k2,seq_sum_k3,seq_mean_k2,token_k1",
         rollout_rs_threshold="0.05,0.05,0.01,1.3"),
    dict(),
]


def native_inputs(b: int, t: int, dtype=torch.float32, seed: int = 11):
    """Rows longer than one vector step (and than the kernel's 512-token flush), holes, an empty
    row, a single-token row and log-ratios of +-25."""
    g = torch.Generator().manual_seed(seed)
    roll = -torch.rand(b, t, generator=g) * 3 - 0.05
    old = roll + 0.15 * torch.randn(b, t, generator=g)
    m = torch.arange(t)[None, :] < torch.randint(1, t + 1, (b,), generator=g)[:, None]
    m &= torch.rand(b, t, generator=g) < 0.9
    m[1] = False
    m[2] = False
    m[2, t // 2] = True
    old[0, 0] = roll[0, 0] + 25.0
    old[3, 0] = roll[3, 0] - 25.0
    m[0, 0] = m[3, 0] = True
    return old.to(dtype), roll.to(dtype), m


def torch_path(monkeypatch):
    ctx = monkeypatch.context()
    mp = ctx.__enter__()
    mp.setattr(RC, "_native_inputs", lambda *a: None)
    return ctx


@pytest.mark.parametrize("case", range(len(NATIVE_CASES)))
@pytest.mark.parametrize("shape", [(6, 11), (9, 37), (5, 1100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollout_compiled_pass_matches_torch_path_and_verl(case, shape, dtype, monkeypatch):
    """CPU float32/bfloat16 log-probs take the compiled pass (csrc/cpu/rollout_corr.cpp): the same
    weights, rejection mask and metrics as the torch formulation (other devices) and as verl
    (on the float32 values of the inputs)."""
    options = NATIVE_CASES[case]
    old, roll, m = native_inputs(*shape, dtype=dtype)
    calls = []
    real = RC._native_pass
    monkeypatch.setattr(RC, "_native_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours = compare_rollout(old, roll, m, **options)
    assert calls, "the compiled pass must run for CPU tensors"
    ctx = torch_path(monkeypatch)
    try:
        slow = V.compute_rollout_correction_and_rejection_mask(old, roll, m, **options)
    finally:
        ctx.__exit__(None, None, None)
    if ours[0] is not None:
        assert_close(ours[0].batch["rollout_is_weights"], slow[0].batch["rollout_is_weights"], 1e-6, "weights")
    assert torch.equal(ours[1], slow[1])
    check_rollout_metrics(ours[2], slow[2])


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32])
def test_rollout_compiled_pass_mixed_dtypes_and_mask_types(mask_dtype):
    """float32 and bfloat16 log-probs together (both read as float32) and non-bool masks (the
    rejection mask keeps the input's dtype)."""
    old, roll, m = native_inputs(7, 40)
    compare_rollout(old, roll.to(torch.bfloat16), m.to(mask_dtype), **NATIVE_CASES[3])
    compare_rollout(old.to(torch.bfloat16), roll, m.to(mask_dtype), **NATIVE_CASES[1])


def test_rollout_compiled_pass_is_thread_count_independent():
    import rlkern

    old, roll, m = native_inputs(40, 2048)
    results = []
    for threads in (1, 4):
        rlkern.set_num_threads(threads)
        try:
            results.append(V.compute_rollout_correction_and_rejection_mask(old, roll, m, **NATIVE_CASES[3]))
        finally:
            rlkern.set_num_threads(0)
    assert torch.equal(results[0][0].batch["rollout_is_weights"], results[1][0].batch["rollout_is_weights"])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]


@pytest.mark.parametrize("loss_type", ["reinforce", "ppo_clip"])
@pytest.mark.parametrize("case", [0, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bypass_mode_compiled_correction_matches_verl(loss_type, case, dtype):
    """bypass_mode on the compiled pass, bfloat16 included (verl on the float32 values), holed
    masks with empty rows and rejected tokens."""
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    old, roll, m = native_inputs(9, 37, seed=5)
    lp = (roll + (old - roll).clamp(-0.5, 0.5)).to(dtype)
    roll = roll.to(dtype)
    adv = torch.randn(9, generator=torch.Generator().manual_seed(2))[:, None] * m
    rc = RolloutCorrectionConfig(loss_type=loss_type, **NATIVE_CASES[case])
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2,
                      policy_loss=PolicyLossConfig(loss_mode="bypass_mode", rollout_correction=rc))
    ours = run(V.compute_policy_loss_bypass_mode, roll, lp, adv, m, "token-mean", cfg)
    theirs = run(ca.compute_policy_loss_bypass_mode, roll.float(), lp.float(), adv, m, "token-mean", cfg)
    assert_close(ours[0], theirs[0], 1e-5, "loss")
    check_metrics(ours[1], theirs[1], tol=1e-4)
    assert ours[2].dtype == dtype
    assert_close(ours[2].float(), theirs[2].to(dtype).float(), 1e-4 if dtype == torch.float32 else 1e-2, "grad")


def test_kl_cov_compiled_topk_and_tie_fallback(monkeypatch):
    """kl_cov selects its k largest covariances in the compiled pass (csrc/cpu/cov.cpp
    kl_cov_topk) when the k-th value is strictly above the (k+1)-th: verl's own torch.topk
    picks the same tokens. With a tie at that boundary it falls back to torch.topk on the
    covariance (the kl_cov_covariance pass), as the torch path does."""
    from rlkern._kernel import core

    losses = core().losses
    calls = []
    real = losses.kl_cov_covariance
    monkeypatch.setattr(losses, "kl_cov_covariance", lambda *a, **k: calls.append(1) or real(*a, **k))
    for dtype in (torch.float32, torch.bfloat16):
        old, roll, m = native_inputs(12, 300, seed=3)
        lp = (old + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))).to(dtype)
        adv = torch.randn(12, generator=torch.Generator().manual_seed(4))[:, None] * m
        for mode in ("token-mean", "seq-mean-token-mean"):
            compare_cov("kl_cov", mode, old.to(dtype), lp, adv, m, cov_config(0.01),
                        grad_tol=1e-4 if dtype == torch.float32 else 1e-2)
        assert not calls, f"distinct covariances ({dtype}): the compiled top-k decides"
    # every token of a row has the same log-prob: the boundary falls inside a row of equal covariances
    old, _, m = native_inputs(12, 300, seed=3)
    lp = old[:, :1].expand_as(old).clone() + 0.1
    adv = torch.randn(12, generator=torch.Generator().manual_seed(4))[:, None] * m
    fast = run(V.compute_policy_loss_kl_cov, old, lp, adv, m, "token-mean", cov_config(0.01))
    assert calls, "a tie at the k-th value: torch.topk decides"
    with monkeypatch.context() as mp:
        mp.setattr(V, "_cov_native", lambda *a: None)
        slow = run(V.compute_policy_loss_kl_cov, old, lp, adv, m, "token-mean", cov_config(0.01))
    assert_loss(fast[0], slow[0], 1e-6, "kl_cov loss")
    assert fast[1] == slow[1]
    assert torch.equal(fast[2], slow[2])


def test_gspo_per_sequence_test_compiled_matches_torch(monkeypatch):
    """GSPO's check that the advantages are one value per sequence runs as one compiled pass for
    CPU tensors (cov.cpp row_constant): the same answer and values as the torch formulation for
    constant rows, empty and holed rows, NaN, -0.0 next to 0.0, bfloat16 and expanded tensors."""
    m = make_mask("holed")
    base = torch.randn(B, generator=torch.Generator().manual_seed(9))
    cases = [base[:, None].expand(B, T), (base[:, None] * m).contiguous()]
    varying = cases[1].clone()
    varying[3, 4] += 1.0  # an active token off its row's value
    cases.append(varying)
    nan = cases[1].clone()
    nan[0, 0] = float("nan")
    cases.append(nan)
    masked_nan = cases[1].clone()
    masked_nan[0, 3] = float("nan")  # inactive: ignored
    cases.append(masked_nan)
    zeros = torch.zeros(B, T)
    zeros[2, 1] = -0.0
    cases.append(zeros)
    cases += [c.to(torch.bfloat16) for c in cases[:3]]
    for adv in cases:
        fast = V._per_sequence(adv, m)
        with monkeypatch.context() as mp:
            mp.setattr(V, "_row_constant_native", lambda *a: NotImplemented)
            slow = V._per_sequence(adv, m)
        assert (fast is None) == (slow is None)
        if fast is not None:
            assert fast.dtype == slow.dtype and torch.equal(fast, slow)
    assert V._per_sequence(varying, m) is None and V._per_sequence(nan, m) is None
    assert V._per_sequence(masked_nan, m) is not None
