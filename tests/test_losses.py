"""rlkern.losses: every backend against the float64 reference, values and gradients.

The reference (rlkern.reference.losses) runs on the same inputs upcast to float64; the C++
path also runs in float64 (exact to rounding) and float32, Triton (under the interpreter
on CPU) in float32 on small shapes.
"""

import pytest
import torch

import rlkern
from rlkern import losses
from rlkern.reference import losses as ref

from helpers import CPU_BACKENDS, GRAD_TOL, VALUE_TOL, assert_close, bit_pattern, run_with_baseline_isa

# ---------------------------------------------------------------------------------------
# inputs


def make_batch(B=4, T=9, *, seed=0, dtype=torch.float64, spread=0.3, adv_per_token=False, nan_masked=True):
    """Random log-probs with a mask that has an all-masked row (when B >= 3), a length-1
    row, right padding and interior holes; masked positions hold NaN."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.1
    old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    refp = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout = old + 0.5 * spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    adv = torch.randn((B, T) if adv_per_token else (B,), generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask &= torch.rand(B, T, generator=g) > 0.15
    if B >= 3:
        mask[1] = False
        mask[2] = False
        mask[2, 0] = True
    # Per-token policy weights in [0, 2) with exact zeros (verl's 0/1 clip_cov selection, its
    # rollout IS weights); drawn last so that the other tensors keep their values.
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    weights[torch.rand(B, T, generator=g) < 0.2] = 0.0
    # Behaviour log-probs for the off-policy mask apart from the rollout's (off_policy_logp).
    behaviour = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    if nan_masked:
        for t in (logp, old, refp, rollout, entropy, weights, behaviour):
            t[~mask] = float("nan")
        if adv_per_token:
            adv[~mask] = float("nan")
    return dict(logp=logp.to(dtype), old=old.to(dtype), ref=refp.to(dtype), rollout=rollout.to(dtype),
                entropy=entropy.to(dtype), adv=adv.to(dtype), mask=mask, weights=weights.to(dtype),
                behaviour=behaviour.to(dtype))


# Option sets: each names the tensors it needs ("ref", "rollout", "entropy") and the options.
OPTION_CASES = {
    "default": ((), {}),
    "clip_higher": ((), dict(clip_low=0.2, clip_high=0.28)),
    "dual_clip": ((), dict(dual_clip=3.0)),
    "ratio_cap": ((), dict(clip_low=0.1, ratio_cap=1.2)),
    "log_ratio_clamp": ((), dict(log_ratio_clamp=0.25)),
    "log_ratio_clamp_high": ((), dict(log_ratio_clamp=(None, 0.1))),
    "cispo": ((), dict(objective="cispo", clip_low=1.0, clip_high=0.3)),
    # A band without 0: a masked token's zero log-ratio would clamp to a bound (approx_kl_clamped).
    "log_ratio_clamp_excludes_zero": ((), dict(log_ratio_clamp=(0.02, 0.3))),
    "cispo_capped": ((), dict(objective="cispo", clip_low=0.1, clip_high=0.05, log_ratio_clamp=(None, -0.05))),
    "reinforce": ((), dict(objective="reinforce")),
    "sequence": ((), dict(level="sequence", clip_low=0.05, clip_high=0.1)),
    "sequence_clamp": ((), dict(level="sequence", log_ratio_clamp=(None, 0.05))),
    "sequence_cispo": ((), dict(level="sequence", objective="cispo", clip_low=0.05)),
    "kl_k1": (("ref",), dict(kl_coef=0.1, kl_kind="k1")),
    "kl_k2": (("ref",), dict(kl_coef=0.1, kl_kind="k2")),
    "kl_k3": (("ref",), dict(kl_coef=0.1, kl_kind="k3")),
    "kl_k3_clamp": (("ref",), dict(kl_coef=0.1, kl_kind="k3", kl_clamp=0.02)),
    "kl_k1_clamp_pair": (("ref",), dict(kl_coef=0.1, kl_kind="k1", kl_clamp=(-0.1, 0.2))),
    "kl_correction": (("ref",), dict(kl_coef=0.2, kl_is_correction=True)),
    "kl_metric_only": (("ref",), dict()),
    "sequence_kl_correction": (("ref",), dict(level="sequence", kl_coef=0.2, kl_is_correction=True)),
    "tis_token": (("rollout",), dict(tis_cap=1.1)),
    "tis_sequence": (("rollout",), dict(tis_cap=1.5, tis_level="sequence")),
    "tis_mask": (("rollout",), dict(tis_cap=1.1, tis_mode="mask")),
    "tis_min_truncate": (("rollout",), dict(tis_cap=1.1, tis_min=0.95)),
    "tis_min_mask": (("rollout", "weights"), dict(tis_cap=1.1, tis_min=0.95, tis_mode="mask")),
    "tis_min_sequence_mask": (("rollout",), dict(tis_cap=1.5, tis_min=0.8, tis_level="sequence", tis_mode="mask",
                                                 agg="seq-mean-token-mean")),
    "tis_min_sequence_truncate": (("rollout",), dict(tis_cap=1.5, tis_min=0.8, tis_level="sequence")),
    "tis_min_unbounded_above": (("rollout",), dict(tis_cap=float("inf"), tis_min=0.95, tis_mode="mask")),
    "off_policy_old": ((), dict(off_policy_threshold=0.0)),
    "off_policy_rollout": (("rollout",), dict(off_policy_threshold=0.02)),
    "off_policy_logp": (("behaviour",), dict(off_policy_threshold=0.01)),
    "off_policy_logp_tis": (("rollout", "behaviour"), dict(tis_cap=1.2, off_policy_threshold=0.01,
                                                          agg="seq-mean-token-mean")),
    "off_policy_logp_sequence": (("behaviour", "weights"), dict(level="sequence", off_policy_threshold=0.0)),
    "entropy_bonus": (("entropy",), dict(entropy_coef=0.01)),
    "entropy_top": (("entropy",), dict(entropy_top_fraction=0.3)),
    "entropy_metric_only": (("entropy",), dict()),
    "token_sum": ((), dict(agg="token-sum")),
    "seq_mean_token_mean": ((), dict(agg="seq-mean-token-mean")),
    "seq_mean_token_sum": ((), dict(agg="seq-mean-token-sum")),
    "seq_mean_token_sum_norm": ((), dict(agg="seq-mean-token-sum-norm")),
    "normalizer_token": ((), dict(normalizer=17.0)),
    "normalizer_seq": ((), dict(agg="seq-mean-token-mean", normalizer=3.0)),
    "weights": (("weights",), dict()),
    "weights_tis_mask": (("rollout", "weights"), dict(tis_cap=1.1, tis_mode="mask", agg="seq-mean-token-sum")),
    "weights_sequence": (("weights",), dict(level="sequence", clip_low=0.05, agg="seq-mean-token-mean")),
    "weights_cispo_kl": (("ref", "weights"), dict(objective="cispo", kl_coef=0.1, kl_is_correction=True)),
    "everything_token": (("ref", "rollout", "entropy", "weights"),
                         dict(clip_high=0.28, dual_clip=2.5, ratio_cap=3.0, log_ratio_clamp=5.0, kl_coef=0.05,
                              kl_kind="k3", kl_clamp=10.0, kl_is_correction=True, tis_cap=1.3, tis_min=0.9,
                              off_policy_threshold=0.01, entropy_coef=0.02, entropy_top_fraction=0.6,
                              agg="seq-mean-token-mean")),
    "everything_sequence": (("ref", "rollout", "entropy", "weights", "behaviour"),
                            dict(level="sequence", clip_low=0.1, clip_high=0.15, dual_clip=3.0, kl_coef=0.05,
                                 kl_kind="k2", tis_cap=2.0, tis_level="sequence", off_policy_threshold=0.01,
                                 entropy_coef=0.02, agg="seq-mean-token-sum-norm", normalizer=5.0)),
}


def build(batch, needs, options, dtype=None, grad=True):
    """(positional inputs, options) with tensors converted to dtype and logp/entropy leaves."""
    conv = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t.clone())
    logp = conv(batch["logp"]).requires_grad_(grad)
    opts = dict(options)
    if "ref" in needs:
        opts["ref_logp"] = conv(batch["ref"])
    if "rollout" in needs:
        opts["rollout_logp"] = conv(batch["rollout"])
    if "entropy" in needs:
        opts["entropy"] = conv(batch["entropy"]).requires_grad_(grad)
    if "weights" in needs:
        opts["weights"] = conv(batch["weights"])
    if "behaviour" in needs:
        opts["off_policy_logp"] = conv(batch["behaviour"])
    return (logp, conv(batch["old"]), conv(batch["adv"]), batch["mask"]), opts


def run(backend, args, opts):
    with rlkern.use_backend(backend):
        out = losses.policy_loss(*args, **opts)
    leaves = [args[0]] + ([opts["entropy"]] if "entropy" in opts else [])
    grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
    return out, [torch.zeros_like(l) if g is None else g for l, g in zip(leaves, grads)]


def reference_of(args, opts):
    """The float64 reference on the same (possibly rounded) values."""
    up = lambda t: t.detach().to(torch.float64).requires_grad_(t.requires_grad)  # noqa: E731
    args64 = (up(args[0]), args[1].double(), args[2].double(), args[3])
    opts64 = {k: (up(v) if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    return run("reference", args64, opts64)


def check_against_reference(out, grads, expected, expected_grads, value_tol=VALUE_TOL, grad_tol=GRAD_TOL):
    assert_close(out.loss, expected.loss, value_tol, "loss")
    assert set(out.metrics) == set(expected.metrics), (sorted(out.metrics), sorted(expected.metrics))
    for k in expected.metrics:
        assert_close(out.metrics[k], expected.metrics[k], value_tol, f"metric {k}")
        assert not out.metrics[k].requires_grad
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert torch.isfinite(g).all(), f"non-finite gradient {i}"
        assert_close(g, e, grad_tol, f"grad {i}")


# ---------------------------------------------------------------------------------------
# every option against the reference


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_cpu_float64_matches_reference(name):
    needs, options = OPTION_CASES[name]
    for adv_per_token in (False, True):
        batch = make_batch(6, 11, seed=1, adv_per_token=adv_per_token)
        args, opts = build(batch, needs, options)
        out, grads = run("cpu", args, opts)
        expected, expected_grads = reference_of(args, opts)
        check_against_reference(out, grads, expected, expected_grads, 1e-10, 1e-10)


@pytest.mark.parametrize("name", list(OPTION_CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_backends_match_reference(backend, name):
    needs, options = OPTION_CASES[name]
    batch = make_batch(5, 13, seed=2, adv_per_token=name.startswith("everything"))
    args, opts = build(batch, needs, options, dtype=torch.float32)
    out, grads = run(backend, args, opts)
    assert out.loss.dtype == torch.float32
    expected, expected_grads = reference_of(args, opts)
    check_against_reference(out, grads, expected, expected_grads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["everything_token", "everything_sequence", "sequence"])
def test_long_rows_cross_several_blocks(backend, name):
    """Rows longer than the kernels' internal blocks (C++ 256-token flushes and 8-wide
    vectors with a tail; Triton's 1024-token blocks)."""
    batch = make_batch(3, 1100 if backend == "triton" else 701, seed=3)
    needs, options = OPTION_CASES[name]
    args, opts = build(batch, needs, options, dtype=torch.float32)
    out, grads = run(backend, args, opts)
    check_against_reference(out, grads, *reference_of(args, opts))


# ---------------------------------------------------------------------------------------
# gradcheck


@pytest.mark.parametrize("name", ["default", "dual_clip", "sequence", "kl_correction", "reinforce",
                                  "everything_token", "everything_sequence"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck(backend, name):
    # CISPO is left out: its clipped weight is detached by definition, so finite differences
    # of the loss value do not give its gradient.
    needs, options = OPTION_CASES[name]
    batch = make_batch(4, 6, seed=4, spread=0.1)
    args, opts = build(batch, needs, options)
    ent = opts.pop("entropy", None)

    def f(lp, *maybe_ent):
        extra = {"entropy": maybe_ent[0]} if maybe_ent else {}
        with rlkern.use_backend(backend):
            return losses.policy_loss(lp, *args[1:], **opts, **extra).loss

    inputs = (args[0],) + ((ent,) if ent is not None else ())
    # gradcheck perturbs every entry; masked NaNs must stay out of the way of finite differences.
    clean = tuple(torch.where(args[3], x.detach(), torch.zeros_like(x)).requires_grad_() for x in inputs)
    assert torch.autograd.gradcheck(f, clean, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_masked_and_length_one_rows(backend):
    batch = make_batch(3, 5, seed=5)
    assert not batch["mask"][1].any() and batch["mask"][2].sum() == 1
    for agg in ref.AGG_MODES:
        args, opts = build(batch, ("ref",), dict(kl_coef=0.1, agg=agg, level="sequence"), dtype=torch.float32)
        out, grads = run(backend, args, opts)
        assert torch.isfinite(out.loss)
        assert (grads[0][1] == 0).all()
        check_against_reference(out, grads, *reference_of(args, opts))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_everything_masked(backend):
    batch = make_batch(2, 4, seed=6)
    batch["mask"][:] = False
    args, opts = build(batch, ("ref", "entropy"), dict(kl_coef=0.1, entropy_coef=0.1), dtype=torch.float32)
    out, grads = run(backend, args, opts)
    assert out.loss.item() == 0.0
    assert all((g == 0).all() for g in grads)
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_advantages_give_zero_policy_term(backend):
    batch = make_batch(4, 6, seed=7)
    batch["adv"].zero_()
    for level in ("token", "sequence"):
        args, opts = build(batch, (), dict(level=level), dtype=torch.float32)
        out, grads = run(backend, args, opts)
        assert out.loss.item() == 0.0
        assert (grads[0] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_log_ratios(backend, sign):
    batch = make_batch(3, 6, seed=8)
    batch["old"] = batch["logp"] - sign * 50.0
    batch["ref"] = batch["logp"] + sign * 50.0
    for options in (dict(kl_coef=0.01, kl_is_correction=False), dict(dual_clip=3.0, kl_coef=0.01, kl_clamp=10.0),
                    dict(level="sequence", kl_coef=0.01), dict(log_ratio_clamp=20.0, kl_coef=0.01)):
        args, opts = build(batch, ("ref",), options, dtype=torch.float32)
        out, grads = run(backend, args, opts)
        assert torch.isfinite(out.loss) and torch.isfinite(grads[0]).all()
        check_against_reference(out, grads, *reference_of(args, opts))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_in_masked_positions_is_ignored(backend):
    batch = make_batch(4, 7, seed=9, adv_per_token=True)
    clean = {k: (torch.where(batch["mask"], v, torch.zeros_like(v)) if k != "mask" else v) for k, v in batch.items()}
    needs, options = OPTION_CASES["everything_token"]
    results = []
    for b in (batch, clean):
        args, opts = build(b, needs, options, dtype=torch.float32)
        results.append(run(backend, args, opts))
    (o1, g1), (o2, g2) = results
    assert torch.isfinite(o1.loss)
    assert o1.loss.item() == o2.loss.item()
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["everything_token", "everything_sequence", "sequence", "kl_k3"])
def test_half_inputs(backend, dtype, name):
    batch = make_batch(4, 21, seed=10, nan_masked=False)
    needs, options = OPTION_CASES[name]
    args, opts = build(batch, needs, options, dtype=dtype)
    out, grads = run(backend, args, opts)
    assert out.loss.dtype == torch.float32
    assert grads[0].dtype == dtype
    expected, expected_grads = reference_of(args, opts)
    assert_close(out.loss, expected.loss, VALUE_TOL, "loss")
    for k in expected.metrics:
        assert_close(out.metrics[k], expected.metrics[k], VALUE_TOL, k)
    # The gradient of a half-precision leaf is rounded to that precision.
    assert_close(grads[0], expected_grads[0], 1e-2, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["sequence", "sequence_cispo", "default"])
def test_half_long_rows_with_masked_nan(backend, name):
    """bfloat16 rows long enough for the 16-token vector loops (prepass and gradient
    fill), with NaN behind the mask and a ragged tail."""
    batch = make_batch(4, 533, seed=13)
    needs, options = OPTION_CASES[name]
    args, opts = build(batch, needs, options, dtype=torch.bfloat16)
    out, grads = run(backend, args, opts)
    expected, expected_grads = reference_of(args, opts)
    assert_close(out.loss, expected.loss, VALUE_TOL, "loss")
    assert torch.isfinite(grads[0]).all()
    assert_close(grads[0], expected_grads[0], 1e-2, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_of_one(backend):
    batch = make_batch(1, 8, seed=11)
    batch["mask"][0, :3] = True
    for name in ("default", "sequence", "everything_token"):
        needs, options = OPTION_CASES[name]
        args, opts = build(batch, needs, options, dtype=torch.float32)
        check_against_reference(*run(backend, args, opts), *reference_of(args, opts))


def test_mixed_dtypes_and_non_contiguous_inputs():
    batch = make_batch(5, 8, seed=12)
    logp = batch["logp"].float().t().contiguous().t().requires_grad_()  # column-major storage
    old = batch["old"].t().contiguous().t()  # float64, non-contiguous
    ref_logp = batch["ref"].to(torch.bfloat16)
    mask = batch["mask"].to(torch.int64)
    args, opts = (logp, old, batch["adv"].float(), mask), dict(ref_logp=ref_logp, kl_coef=0.1)
    out, grads = run("cpu", args, opts)
    expected, expected_grads = reference_of(args, opts)
    assert_close(out.loss, expected.loss)
    assert_close(grads[0], expected_grads[0], GRAD_TOL)


def test_gradients_reach_only_the_current_policy():
    batch = make_batch(3, 5, seed=13)
    old = batch["old"].clone().requires_grad_()
    refp = batch["ref"].clone().requires_grad_()
    adv = batch["adv"].clone().requires_grad_()
    logp = batch["logp"].clone().requires_grad_()
    with rlkern.use_backend("cpu"):
        out = losses.policy_loss(logp, old, adv, batch["mask"], ref_logp=refp, kl_coef=0.1)
    out.loss.backward()
    assert logp.grad is not None
    assert old.grad is None and refp.grad is None and adv.grad is None


def test_normalizer_reproduces_one_big_batch():
    """Two data-parallel shards with the global token count sum to the full-batch loss and gradient."""
    batch = make_batch(6, 9, seed=14)
    full_args, opts = build(batch, ("ref",), dict(kl_coef=0.1))
    full, full_grads = run("cpu", full_args, opts)
    total_tokens = float(batch["mask"].sum())
    parts, part_grads = [], []
    for rows in (slice(0, 3), slice(3, 6)):
        shard = {k: v[rows] for k, v in batch.items()}
        args, o = build(shard, ("ref",), dict(kl_coef=0.1, normalizer=total_tokens))
        out, grads = run("cpu", args, o)
        parts.append(out.loss)
        part_grads.append(grads[0])
    assert_close(parts[0] + parts[1], full.loss, 1e-12)
    assert_close(torch.cat(part_grads), full_grads[0], 1e-12)


@pytest.mark.parametrize("name", ["everything_sequence", "everything_token", "cispo_capped"])
def test_thread_count_does_not_change_results(name):
    batch = make_batch(37, 300, seed=15)
    needs, options = OPTION_CASES[name]
    args, opts = build(batch, needs, options, dtype=torch.float32)
    before = rlkern.get_num_threads()
    try:
        rlkern.set_num_threads(1)
        o1, g1 = run("cpu", args, opts)
        rlkern.set_num_threads(2)
        o2, g2 = run("cpu", args, opts)
    finally:
        rlkern.set_num_threads(before)
    assert o1.loss.item() == o2.loss.item()
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert all(torch.equal(o1.metrics[k], o2.metrics[k]) for k in o1.metrics)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["mask", "truncate"])
@pytest.mark.parametrize("objective", ["clip", "sapo"])
def test_tis_clip_frac_and_rollout_kl_are_openrlhfs_metrics(backend, mode, objective):
    """tis_clip_frac is OpenRLHF's token-level is_filter_ratio: mask mode counts the tokens whose
    weight exp(old - rollout) is not inside [low, high] (a NaN weight too), clip mode those below
    or above it; rollout_kl is its vllm_kl, the mean of rollout - old. Rows long enough for the
    vector body and its tail."""
    batch = make_batch(4, 45, seed=22, nan_masked=False)
    m = batch["mask"]
    old, roll = batch["old"].float(), batch["rollout"].float().clone()
    roll[0, :6] = old[0, :6] + 2.0  # weights far below the band
    roll[3, 1:4] = old[3, 1:4] - 2.0  # far above
    roll[0, 7] = float("nan")  # a NaN weight at an active token
    assert m[0, 7]
    with rlkern.use_backend(backend):
        out = losses.policy_loss(batch["logp"].float(), old, batch["adv"].float(), m, objective=objective,
                                 rollout_logp=roll, tis_cap=1.05, tis_min=0.95, tis_mode=mode)
    w = torch.exp(old.double() - roll.double())
    filtered = ~((w >= 0.95) & (w <= 1.05)) if mode == "mask" else (w < 0.95) | (w > 1.05)
    n = m.sum()
    assert_close(out.metrics["tis_clip_frac"], ((filtered & m).sum() / n).double(), VALUE_TOL, "tis_clip_frac")
    assert out.metrics["rollout_kl"].isnan()  # the NaN rollout log-prob is active
    roll[0, 7] = old[0, 7]
    with rlkern.use_backend(backend):
        out = losses.policy_loss(batch["logp"].float(), old, batch["adv"].float(), m, objective=objective,
                                 rollout_logp=roll)
    diff = torch.where(m, roll.double() - old.double(), torch.zeros((), dtype=torch.float64))
    assert_close(out.metrics["rollout_kl"], diff.sum() / n, VALUE_TOL, "rollout_kl")
    assert "tis_clip_frac" not in out.metrics


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("objective", ["clip", "cispo", "sapo", "dppo_kl"])
def test_clamped_approx_kl_and_cispo_clip_frac_are_verls_metrics(backend, dtype, objective):
    """approx_kl_clamped is verl's ppo_kl, masked_mean(-clamp(lp - old, -20, 20)), beside the
    unclamped approx_kl (OpenRLHF's); cispo's clip_frac is verl's sign-blind
    masked_mean(r != clip(r)). Log-ratios beyond the clamp on both sides, rows long enough for
    the vector body and its tail, NaN at masked positions."""
    batch = make_batch(4, 45, seed=21)
    m = batch["mask"]
    old, lp = batch["old"].clone(), batch["logp"].clone()
    lp[0, :5] = old[0, :5] + 30.0
    lp[3, :7] = old[3, :7] - 45.0
    lp = torch.where(m, lp, torch.full_like(lp, float("nan")))
    adv = batch["adv"]
    with rlkern.use_backend(backend):
        out = losses.policy_loss(lp.to(dtype), old.to(dtype), adv, m, objective=objective, clip_low=0.2,
                                 clip_high=0.28, log_ratio_clamp=20.0, ratio_cap=3.0 if objective == "dppo_kl" else None)
    lp_r, old_r = lp.to(dtype).double(), old.to(dtype).double()
    x = torch.where(m, lp_r - old_r, torch.zeros_like(lp_r))
    n = m.sum()
    ppo_kl = (-x.clamp(-20.0, 20.0) * m).sum() / n
    assert_close(out.metrics["approx_kl_clamped"], ppo_kl, VALUE_TOL, "approx_kl_clamped")
    assert_close(out.metrics["approx_kl"], (-x * m).sum() / n, VALUE_TOL, "approx_kl")
    assert abs(float(out.metrics["approx_kl"]) - float(ppo_kl)) > 1.0  # the clamp matters here
    if objective == "cispo":
        r = x.clamp(-20.0, 20.0).exp()
        assert_close(out.metrics["clip_frac"], (((r != r.clamp(0.8, 1.28)) & m).sum() / n).double(), VALUE_TOL,
                     "clip_frac")
    else:
        assert "clip_frac" not in out.metrics
    with rlkern.use_backend(backend):
        seq = losses.policy_loss(lp.to(dtype), old.to(dtype), adv, m, level="sequence", log_ratio_clamp=20.0)
        plain = losses.policy_loss(lp.to(dtype), old.to(dtype), adv, m, objective=objective)
    assert "approx_kl_clamped" not in seq.metrics and "approx_kl_clamped" not in plain.metrics


def test_backward_twice_with_retained_graph_and_grad_output_scaling():
    batch = make_batch(3, 6, seed=16)
    args, opts = build(batch, ("ref",), dict(kl_coef=0.1))
    with rlkern.use_backend("cpu"):
        out = losses.policy_loss(*args, **opts)
    (g1,) = torch.autograd.grad(out.loss, args[0], retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * out.loss, args[0])
    assert_close(g3, 3.0 * g1, 1e-12)


# ---------------------------------------------------------------------------------------
# bad input


def _good():
    b = make_batch(3, 4, seed=17, dtype=torch.float32)
    return b["logp"], b["old"], b["adv"], b["mask"]


@pytest.mark.parametrize("options,exc,word", [
    (dict(clip_lo=0.2), TypeError, "clip_lo"),
    (dict(clip_low=-0.1), ValueError, "clip_low"),
    (dict(clip_high=-1.0), ValueError, "clip_high"),
    (dict(dual_clip=1.0), ValueError, "dual_clip"),
    (dict(objective="ppo"), ValueError, "objective"),
    (dict(level="seq"), ValueError, "level"),
    (dict(agg="mean"), ValueError, "agg"),
    (dict(kl_kind="k4"), ValueError, "kl_kind"),
    (dict(kl_coef=0.1), ValueError, "ref_logp"),
    (dict(tis_cap=2.0), ValueError, "rollout_logp"),
    (dict(off_policy_logp=torch.zeros(3, 4)), ValueError, "off_policy_logp"),
    (dict(off_policy_logp=torch.zeros(3, 5), off_policy_threshold=0.1), ValueError, "off_policy_logp"),
    (dict(off_policy_logp=torch.zeros(3, 4, dtype=torch.int32), off_policy_threshold=0.1), TypeError,
     "off_policy_logp"),
    (dict(tis_min=0.5), ValueError, "tis_min"),
    (dict(tis_min=0.0, tis_cap=2.0), ValueError, "tis_min"),
    (dict(tis_min=-1.0, tis_cap=2.0), ValueError, "tis_min"),
    (dict(tis_min=3.0, tis_cap=2.0), ValueError, "tis_min"),
    (dict(tis_min=float("nan"), tis_cap=2.0), ValueError, "tis_min"),
    (dict(tis_min="0.5", tis_cap=2.0), TypeError, "tis_min"),
    (dict(entropy_top_fraction=0.5), ValueError, "entropy"),
    (dict(normalizer=0.0), ValueError, "normalizer"),
    (dict(log_ratio_clamp=(1.0, -1.0)), ValueError, "log_ratio_clamp"),
    (dict(kl_clamp="big"), TypeError, "kl_clamp"),
    (dict(ref_logp=torch.zeros(3, 5)), ValueError, "ref_logp"),
])
def test_bad_options_raise_naming_the_argument(options, exc, word):
    with pytest.raises(exc, match=word):
        losses.policy_loss(*_good(), **options)


def test_options_are_validated_on_every_call_despite_the_cache():
    """Parsed options are cached per call signature; an equal-comparing value of another
    type (True == 1) or an unhashable one is still checked, and errors are not cached."""
    args = _good()
    losses.policy_loss(*args, clip_low=1, dual_clip=3)
    with pytest.raises(TypeError, match="clip_low"):
        losses.policy_loss(*args, clip_low=True, dual_clip=3)
    for _ in range(2):
        with pytest.raises(ValueError, match="clip_low"):
            losses.policy_loss(*args, clip_low=-1.0)
    with pytest.raises(ValueError, match="log_ratio_clamp"):
        losses.policy_loss(*args, log_ratio_clamp=[1.0, -1.0])
    logp, old, adv, mask = args
    far = (logp, logp.detach() - 0.5, adv.abs() + 0.1, mask)  # ratio e^0.5, positive advantages: clipped
    a = losses.policy_loss(*far, clip_low=0.1).loss
    b = losses.policy_loss(*far, clip_low=0.3).loss
    assert a.item() != b.item()


def test_bad_tensors_raise_naming_the_argument():
    logp, old, adv, mask = _good()
    with pytest.raises(ValueError, match="advantages"):
        losses.policy_loss(logp, old, torch.zeros(4), mask)
    with pytest.raises(ValueError, match="old_logp"):
        losses.policy_loss(logp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="mask"):
        losses.policy_loss(logp, old, adv, mask[:2])
    with pytest.raises(TypeError, match="logp"):
        losses.policy_loss(logp.long(), old, adv, mask)
    with pytest.raises(ValueError, match="logp"):
        losses.policy_loss(logp[0], old[0], adv[:1], mask[0])
    with pytest.raises(TypeError, match="advantages"):
        losses.policy_loss(logp, old, [1.0, 2.0, 3.0], mask)


# ---------------------------------------------------------------------------------------
# per-token weights


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_one_weights_equal_dropping_the_tokens_from_the_policy_term(backend, dtype):
    """A 0/1 weight (verl's clip_cov selection) keeps or drops a token's policy term and its
    gradient; the KL and entropy terms stay on every active token."""
    batch = make_batch(5, 19, seed=50, dtype=dtype)
    mask = batch["mask"]
    keep = (batch["weights"] != 0) & mask
    w01 = keep.to(dtype)
    common = dict(ref_logp=batch["ref"], kl_coef=0.1, agg="token-sum")
    logp = batch["logp"].clone().requires_grad_()
    with rlkern.use_backend(backend):
        weighted = losses.policy_loss(logp, batch["old"], batch["adv"], mask, weights=w01, **common)
        (g_weighted,) = torch.autograd.grad(weighted.loss, logp)
        lp2 = batch["logp"].clone().requires_grad_()
        plain = losses.policy_loss(lp2, batch["old"], batch["adv"], keep, agg="token-sum")
        # the KL term alone on every active token: REINFORCE with zero advantages
        kl = losses.policy_loss(lp2, batch["old"], torch.zeros_like(batch["adv"]), mask, objective="reinforce",
                                **common)
        (g_split,) = torch.autograd.grad(plain.loss + kl.loss, lp2)
    tol = 1e-10 if dtype == torch.float64 else VALUE_TOL
    assert_close(weighted.loss, plain.loss + kl.loss, tol, "loss")
    assert_close(g_weighted, g_split, tol, "grad")
    assert torch.count_nonzero(g_weighted[~mask]) == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["default", "sequence", "everything_token"])
def test_unit_weights_change_nothing(backend, name):
    needs, options = OPTION_CASES[name]
    needs = tuple(n for n in needs if n != "weights")
    batch = make_batch(4, 21, seed=51, dtype=torch.float32)
    args, opts = build(batch, needs, options)
    base, g_base = run(backend, args, opts)
    args, opts = build(batch, needs, options)
    out, g = run(backend, args, {**opts, "weights": torch.ones_like(args[0]).detach()})
    # (with weights the C++ kernel takes its general row path: equal up to summation order)
    assert_close(out.loss, base.loss, 1e-6)
    for a, b in zip(g, g_base):
        assert_close(a, b, 1e-6)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_zero_weight_times_an_infinite_term_is_nan_as_documented(backend):
    """Weights multiply, as the TIS mask does: 0 * inf is NaN (IEEE), not a dropped token."""
    batch = make_batch(3, 5, seed=52, dtype=torch.float32, nan_masked=False)
    mask = torch.ones(3, 5, dtype=torch.bool)
    adv = -torch.ones(3)
    logp = batch["logp"].clone()
    logp[0, 1] = batch["old"][0, 1] + 100.0  # ratio exp(100) = inf in float32: the clip term is +inf
    w = torch.ones(3, 5)
    w[0, 1] = 0.0
    for kw in (dict(weights=w), dict(rollout_logp=logp.detach() + 100.0, tis_cap=2.0, tis_mode="mask")):
        with rlkern.use_backend(backend):
            out = losses.policy_loss(logp, batch["old"], adv, mask, **kw)
        assert torch.isnan(out.loss), kw
    # a finite term with weight 0 is dropped exactly
    logp[0, 1] = batch["old"][0, 1] + 1.0
    with rlkern.use_backend(backend):
        a = losses.policy_loss(logp, batch["old"], adv, mask, weights=w, agg="token-sum").loss
        keep = mask.clone()
        keep[0, 1] = False
        b = losses.policy_loss(logp, batch["old"], adv, keep, agg="token-sum").loss
    assert_close(a, b, 1e-6)


def test_weights_get_no_gradient_and_masked_nan_weights_do_not_leak():
    batch = make_batch(4, 9, seed=53, dtype=torch.float32)
    w = batch["weights"].clone().requires_grad_()
    logp = batch["logp"].clone().requires_grad_()
    for backend in ["reference"] + CPU_BACKENDS:
        with rlkern.use_backend(backend):
            out = losses.policy_loss(logp, batch["old"], batch["adv"], batch["mask"], weights=w)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert w.grad is None
        assert torch.isfinite(logp.grad).all()
        logp.grad = None


def test_bad_weights_raise_naming_the_argument():
    logp, old, adv, mask = _good()
    with pytest.raises(ValueError, match="weights"):
        losses.policy_loss(logp, old, adv, mask, weights=torch.ones(3, 5))
    with pytest.raises(ValueError, match="weights"):
        losses.policy_loss(logp, old, adv, mask, weights=torch.ones(3))
    with pytest.raises(TypeError, match="weights"):
        losses.policy_loss(logp, old, adv, mask, weights=torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="weights"):
        losses.policy_loss(logp, old, adv, mask, weights=[[1.0] * 4] * 3)
    for backend in ["reference", "cpu"]:
        with rlkern.use_backend(backend), pytest.raises(ValueError, match="weights"):
            losses.policy_loss(logp, old, adv, mask, objective="geo_mean", weights=torch.ones(3, 4))


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_off_policy_logp_reproduces_trls_mask_beside_its_importance_weight(backend):
    """TRL 1.16 reads its sampling log-probs for the vLLM importance weight and for the
    off-policy sequence mask, but a token the engine could not score (NaN) counts as no
    correction in the first (the old log-prob) and as no drift in the second (the current
    one): rollout_logp and off_policy_logp take the two versions. The mask is TRL's own
    (GRPOTrainer.get_off_policy_mask), applied here as weights."""
    trl = pytest.importorskip("trl", reason="needs trl 1.16")
    batch = make_batch(6, 11, seed=54, dtype=torch.float32, nan_masked=False)
    mask = torch.arange(11)[None, :] < torch.tensor([11, 9, 5, 11, 7, 3])[:, None]
    lp, old, adv = batch["logp"], batch["old"], batch["adv"]
    sampling = batch["behaviour"].clone()
    sampling[0, 0] = sampling[3, 2] = float("nan")  # tokens the engine could not score
    assert mask[0, 0] and mask[3, 2]
    threshold = 0.01
    keep = trl.GRPOTrainer.get_off_policy_mask(adv[:, None], lp, sampling, mask.float(), threshold)
    assert 0 < int(keep.sum()) < keep.numel()
    is_logp = torch.where(torch.isnan(sampling), old, sampling)
    results = []
    for opts in (dict(weights=keep.expand_as(lp)),
                 dict(off_policy_logp=torch.where(torch.isnan(sampling), lp, sampling), off_policy_threshold=threshold)):
        x = lp.clone().requires_grad_()
        with rlkern.use_backend(backend):
            out = losses.policy_loss(x, old, adv, mask, rollout_logp=is_logp, tis_cap=1.2, **opts)
        results.append((out.loss, torch.autograd.grad(out.loss, x)[0]))
    assert_close(results[1][0], results[0][0], 1e-6, "loss")
    assert_close(results[1][1], results[0][1], 1e-6, "grad")
    # one rollout tensor for both (the NaN read as the old log-prob) drops another set of sequences
    with rlkern.use_backend(backend):
        one = losses.policy_loss(lp, old, adv, mask, rollout_logp=is_logp, tis_cap=1.2, off_policy_threshold=threshold)
    assert not torch.allclose(one.loss, results[0][0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_off_policy_logp_equal_to_rollout_changes_nothing(backend):
    batch = make_batch(5, 13, seed=55, dtype=torch.float32)
    args, opts = build(batch, ("rollout",), dict(tis_cap=1.2, off_policy_threshold=0.01))
    base, g_base = run(backend, args, opts)
    args, opts = build(batch, ("rollout",), dict(tis_cap=1.2, off_policy_threshold=0.01))
    out, g = run(backend, args, {**opts, "off_policy_logp": opts["rollout_logp"]})
    assert_close(out.loss, base.loss, 1e-6)
    assert_close(g[0], g_base[0], 1e-6)


# ---------------------------------------------------------------------------------------
# value loss


def _values(B=4, T=7, seed=20, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    vo = v + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    R = v + torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = False
    for t in (v, vo, R):
        t[~mask] = float("nan")
    return v.to(dtype), vo.to(dtype), R.to(dtype), mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("agg", ref.AGG_MODES)
def test_value_loss_matches_reference(backend, clip, agg):
    v, vo, R, mask = _values(dtype=torch.float32)
    v.requires_grad_()
    with rlkern.use_backend(backend):
        out = losses.value_loss(v, vo, R, mask, clip=clip, agg=agg)
    (g,) = torch.autograd.grad(out.loss, v)
    v64 = v.detach().double().requires_grad_()
    expected = ref.value_loss(v64, vo.double(), R.double(), mask, clip, agg)
    (ge,) = torch.autograd.grad(expected.loss, v64)
    assert_close(out.loss, expected.loss)
    assert_close(g, ge, GRAD_TOL)
    for k in expected.metrics:
        assert_close(out.metrics[k], expected.metrics[k], VALUE_TOL, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("normalizer", [None, 9.0, "tensor"])
def test_value_loss_vector_rows_match_reference(dtype, clip, agg, normalizer):
    """Rows of 37 tokens (the CPU kernel's 8-lane steps and a scalar tail), NaN at masked
    positions, an empty row: the reference on the same rounded inputs in float64; the gradient
    comes back in the values' dtype, finished by the kernel."""
    v, vo, R, mask = _values(B=5, T=37, seed=23)
    mask[2, :] = True
    norm = torch.tensor(9.0) if normalizer == "tensor" else normalizer
    x = v.to(dtype).requires_grad_()
    with rlkern.use_backend("cpu"):
        out = losses.value_loss(x, vo.to(dtype), R.to(dtype), mask, clip=clip, agg=agg, normalizer=norm)
    (g,) = torch.autograd.grad(out.loss, x)
    assert g.dtype == dtype
    v64 = x.detach().double().requires_grad_()
    expected = ref.value_loss(v64, vo.to(dtype).double(), R.to(dtype).double(), mask, clip, agg,
                              None if norm is None else float(norm))
    (ge,) = torch.autograd.grad(expected.loss, v64)
    assert_close(out.loss, expected.loss)
    assert_close(g.double(), ge.to(dtype).double() if dtype != torch.float32 else ge,
                 GRAD_TOL if dtype == torch.float32 else 1e-2)
    for k in expected.metrics:
        assert_close(out.metrics[k], expected.metrics[k], VALUE_TOL, k)


def test_value_loss_backward_retained_scaled_and_once(tmp_path):
    """The finished gradient is handed to autograd: a retained graph gives it twice, an outer
    factor scales it, a second backward without retain_graph is refused; the baseline-ISA
    build (no AVX2) gives the same gradient."""
    v, vo, R, mask = _values(B=3, T=29, seed=24, dtype=torch.float32)
    x = v.clone().requires_grad_()
    out = losses.value_loss(x, vo, R, mask, clip=0.2)
    (g1,) = torch.autograd.grad(out.loss, x, retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * out.loss, x)
    assert_close(g3, 3.0 * g1, 1e-6)
    with pytest.raises(RuntimeError, match="already run"):
        torch.autograd.grad(out.loss, x)
    torch.save((x.detach(), vo, R, mask, g1), tmp_path / "value.pt")
    run_with_baseline_isa(tmp_path, "test_losses", f"""
        x, vo, R, mask, g1 = torch.load({str(tmp_path / "value.pt")!r})
        x.requires_grad_()
        out = t.losses.value_loss(x, vo, R, mask, clip=0.2)
        (g,) = torch.autograd.grad(out.loss, x)
        t.assert_close(g, g1, 1e-6)
    """)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_value_loss_gradcheck(backend):
    v, vo, R, mask = _values()
    clean = lambda t: torch.where(mask, t, torch.zeros_like(t))  # noqa: E731
    v, vo, R = clean(v).requires_grad_(), clean(vo), clean(R)
    with rlkern.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x: losses.value_loss(x, vo, R, mask, clip=0.2, normalizer=7.0).loss,
                                        (v,), eps=1e-6, atol=1e-7)


def test_value_loss_one_dimensional_and_defaults():
    v, vo, R, _ = _values(1, 12, seed=21)
    v = v[0].clone().requires_grad_()
    out = losses.value_loss(v, None, R[0], None)
    expected = 0.5 * ((v.detach() - R[0]) ** 2).mean()
    assert_close(out.loss, expected, 1e-12)
    out.loss.backward()
    assert_close(v.grad, (v.detach() - R[0]) / 12, 1e-12)


def test_value_loss_bad_input():
    v, vo, R, mask = _values()
    with pytest.raises(ValueError, match="old_values"):
        losses.value_loss(v, None, R, mask, clip=0.2)
    with pytest.raises(ValueError, match="clip"):
        losses.value_loss(v, vo, R, mask, clip=-0.2)
    with pytest.raises(ValueError, match="returns"):
        losses.value_loss(v, vo, R[:, :3], mask)
    with pytest.raises(ValueError, match="agg"):
        losses.value_loss(v, vo, R, mask, agg="sum")


# ---------------------------------------------------------------------------------------
# DPO and Bradley-Terry


def _pairs(B=7, seed=30, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = [-(torch.rand(B, generator=g, dtype=torch.float64) * 20 + 1) for _ in range(4)]
    return [t.to(dtype) for t in x]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0),
                                                       ("hinge", 0.0)])
def test_dpo_matches_reference(backend, loss_type, label_smoothing):
    c, r, rc, rr = _pairs(dtype=torch.float32)
    c.requires_grad_()
    r.requires_grad_()
    with rlkern.use_backend(backend):
        out = losses.dpo_loss(c, r, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=label_smoothing)
    grads = torch.autograd.grad(out.loss, [c, r])
    c64, r64 = c.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    expected = ref.dpo_loss(c64, r64, rc.double(), rr.double(), 0.3, loss_type, label_smoothing)
    expected_grads = torch.autograd.grad(expected.loss, [c64, r64])
    assert_close(out.loss, expected.loss)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, GRAD_TOL)
    for k in expected.metrics:
        assert_close(out.metrics[k], expected.metrics[k], VALUE_TOL, k)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_gradcheck(loss_type):
    c, r, rc, rr = _pairs()
    c.requires_grad_()
    r.requires_grad_()
    with rlkern.use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda a, b: losses.dpo_loss(a, b, rc, rr, beta=0.2, loss_type=loss_type, label_smoothing=0.05).loss,
            (c, r), eps=1e-6, atol=1e-7)


def test_dpo_bad_input():
    c, r, rc, rr = _pairs()
    with pytest.raises(ValueError, match="beta"):
        losses.dpo_loss(c, r, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="loss_type"):
        losses.dpo_loss(c, r, rc, rr, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(c, r, rc, rr, label_smoothing=1.5)
    with pytest.raises(ValueError, match="rejected_logp"):
        losses.dpo_loss(c, r[:3], rc, rr)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("margin_kind", ["none", "scalar", "tensor"])
def test_bradley_terry_matches_reference(backend, margin_kind):
    c, r, m, _ = _pairs(9, seed=31, dtype=torch.float32)
    c, r = (c / 5).requires_grad_(), (r / 5).requires_grad_()
    margin = {"none": None, "scalar": 0.3, "tensor": m.abs() / 20}[margin_kind]
    with rlkern.use_backend(backend):
        out = losses.bradley_terry_loss(c, r, margin)
    grads = torch.autograd.grad(out.loss, [c, r])
    c64, r64 = c.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    m64 = margin.double() if isinstance(margin, torch.Tensor) else margin
    expected = ref.bradley_terry_loss(c64, r64, m64)
    expected_grads = torch.autograd.grad(expected.loss, [c64, r64])
    assert_close(out.loss, expected.loss)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, GRAD_TOL)
    for k in expected.metrics:
        assert_close(out.metrics[k], expected.metrics[k], VALUE_TOL, k)


def test_bradley_terry_gradcheck_and_bad_input():
    c, r, m, _ = _pairs(5, seed=32)
    c, r = (c / 5).requires_grad_(), (r / 5).requires_grad_()
    with rlkern.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b: losses.bradley_terry_loss(a, b, m.abs() / 10).loss, (c, r),
                                        eps=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="margin"):
        losses.bradley_terry_loss(c, r, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="margin"):
        losses.bradley_terry_loss(c, r, "wide")


def test_bench_suite_quick_cases_run():
    from rlkern.bench import losses as bench

    compared = 0
    for case in bench.cases(torch.device("cpu"), quick=True):
        impls = case.make(torch.device("cpu"))
        # a loss case answers a scalar, masked_whiten a tensor: compare every element
        values = {name: fn().detach().double() for name, fn in impls.items() if "compile" not in name}
        base = values["rlkern"]
        compared += len(values) > 1  # a case whose only competitor is a peer that is not installed has none
        for name, v in values.items():
            assert v.shape == base.shape, (case.op, name)
            torch.testing.assert_close(v, base, rtol=1e-4, atol=1e-5, msg=lambda m: f"{case.op} {name}: {m}")
    assert compared >= 2  # grpo/gspo against the reference and masked_whiten against the eager formula


def test_baseline_x86_build_matches(tmp_path):
    """The policy-loss kernels without AVX2 (the same source compiled for baseline x86-64,
    forced by RLKERN_DISABLE_AVX2) agree with the reference too."""
    run_with_baseline_isa(tmp_path, "test_losses", """
for name in t.OPTION_CASES:
    t.test_float32_backends_match_reference('cpu', name)
for name in ['everything_token', 'everything_sequence', 'sequence']:
    t.test_long_rows_cross_several_blocks('cpu', name)
for name in ['sequence', 'default']:
    t.test_half_long_rows_with_masked_nan('cpu', name)
""")


# ---------------------------------------------------------------------------------------
# audit regressions (issue #11)


MIXED_DTYPES = [
    # (logp, old_logp, advantages, per-token optional tensors, mask)
    (torch.float32, torch.float32, torch.float64, torch.float32, torch.bool),
    (torch.bfloat16, torch.bfloat16, torch.float64, torch.bfloat16, torch.uint8),
    (torch.float32, torch.float64, torch.float32, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float32, torch.float16, torch.float64, torch.int64),
    (torch.float16, torch.bfloat16, torch.float32, torch.float32, torch.float64),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtypes", MIXED_DTYPES, ids=lambda d: "-".join(str(x)[6:] for x in d))
@pytest.mark.parametrize("name", ["default", "everything_token", "everything_sequence", "kl_k3"])
def test_policy_loss_mixed_dtypes_match_reference(backend, dtypes, name):
    """float64 advantages beside float32/bf16 log-probs were read as float (issue #11, item 4)."""
    lp_dt, old_dt, adv_dt, opt_dt, mask_dt = dtypes
    batch = make_batch(4, 11, seed=40, adv_per_token=name == "everything_token")
    needs, options = OPTION_CASES[name]
    logp = batch["logp"].to(lp_dt).requires_grad_()
    opts = dict(options)
    for key, arg in (("ref", "ref_logp"), ("rollout", "rollout_logp"), ("entropy", "entropy"),
                     ("weights", "weights"), ("behaviour", "off_policy_logp")):
        if key in needs:
            opts[arg] = batch[key].to(opt_dt)
    if "entropy" in opts:
        opts["entropy"].requires_grad_()
    args = (logp, batch["old"].to(old_dt), batch["adv"].to(adv_dt), batch["mask"].to(mask_dt))
    out, grads = run(backend, args, opts)
    expected, expected_grads = reference_of(args, opts)
    assert_close(out.loss, expected.loss, VALUE_TOL, "loss")
    for k in expected.metrics:
        assert_close(out.metrics[k], expected.metrics[k], VALUE_TOL, k)
    for g, leaf, e in zip(grads, [logp, opts.get("entropy")], expected_grads):
        assert g.dtype == leaf.dtype
        tol = GRAD_TOL if leaf.dtype in (torch.float32, torch.float64) else 1e-2
        assert_close(g, e, tol, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_mixed_dtypes_match_reference(backend, clip):
    v, vo, R, mask = _values(dtype=torch.float64)
    for v_dt, vo_dt, R_dt, m_dt in [(torch.float32, torch.float64, torch.float32, torch.bool),
                                    (torch.bfloat16, torch.float32, torch.float64, torch.float32),
                                    (torch.float64, torch.bfloat16, torch.float16, torch.uint8)]:
        vv = v.to(v_dt).requires_grad_()
        with rlkern.use_backend(backend):
            out = losses.value_loss(vv, vo.to(vo_dt), R.to(R_dt), mask.to(m_dt), clip=clip)
        (g,) = torch.autograd.grad(out.loss, vv)
        v64 = vv.detach().double().requires_grad_()
        expected = ref.value_loss(v64, vo.to(vo_dt).double(), R.to(R_dt).double(), mask, clip)
        (ge,) = torch.autograd.grad(expected.loss, v64)
        assert_close(out.loss, expected.loss)
        assert g.dtype == v_dt
        assert_close(g, ge, GRAD_TOL if v_dt != torch.bfloat16 else 1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pair_losses_mixed_dtypes_match_reference(backend):
    c, r, rc, rr = _pairs(dtype=torch.float64)
    for dts in [(torch.float32, torch.float32, torch.float64, torch.float64),
                (torch.bfloat16, torch.float64, torch.float32, torch.bfloat16),
                (torch.float64, torch.float16, torch.float32, torch.float32)]:
        x = [t.to(dt) for t, dt in zip((c, r, rc, rr), dts)]
        x[0].requires_grad_()
        x[1].requires_grad_()
        y = [(t.detach() / 5).requires_grad_(t.requires_grad) for t in x[:2]] + [x[2].detach().abs() / 20]
        up = [t.detach().double().requires_grad_(t.requires_grad) for t in x]
        upy = [t.detach().double().requires_grad_(t.requires_grad) for t in y]
        with rlkern.use_backend(backend):
            out = losses.dpo_loss(*x, beta=0.3)
            bt = losses.bradley_terry_loss(*y)
        expected = ref.dpo_loss(*up, 0.3)
        expected_bt = ref.bradley_terry_loss(*upy)
        assert_close(out.loss, expected.loss)
        assert_close(bt.loss, expected_bt.loss)
        for got, want, inputs, inputs64 in ((out, expected, x, up), (bt, expected_bt, y, upy)):
            grads = torch.autograd.grad(got.loss, inputs[:2])
            wants = torch.autograd.grad(want.loss, inputs64[:2])
            for g, w, leaf in zip(grads, wants, inputs):
                assert g.dtype == leaf.dtype
                assert_close(g, w, GRAD_TOL if leaf.dtype in (torch.float32, torch.float64) else 1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["default", "log_ratio_clamp", "sequence_clamp", "kl_k3_clamp", "tis_token",
                                  "tis_sequence", "everything_token", "everything_sequence"])
@pytest.mark.parametrize("where", ["logp", "old", "ref", "rollout"])
def test_nan_at_an_active_token_gives_nan(backend, name, where):
    """Clamps must not drop NaN (Triton's tl.minimum/tl.maximum did; issue #11, item 5)."""
    needs, options = OPTION_CASES[name]
    if where in ("ref", "rollout") and where not in needs:
        pytest.skip("option set without that input")
    batch = make_batch(3, 6, seed=41)
    batch["mask"][0, :3] = True
    batch[where][0, 1] = float("nan")
    args, opts = build(batch, needs, options, dtype=torch.float32)
    out, grads = run(backend, args, opts)
    expected, _ = reference_of(args, opts)
    assert torch.isnan(out.loss) == torch.isnan(expected.loss)
    if where != "ref" or options.get("kl_coef"):
        assert torch.isnan(out.loss)
    if where == "logp":
        assert torch.isnan(grads[0]).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_nan_input_gives_nan(backend, loss_type):
    """relu(NaN) is NaN as in the reference (the hinge loss dropped it; issue #11, item 5)."""
    c, r, rc, rr = _pairs(dtype=torch.float32)
    c[2] = float("nan")
    with rlkern.use_backend(backend):
        out = losses.dpo_loss(c, r, rc, rr, beta=0.3, loss_type=loss_type)
    assert torch.isnan(out.loss)
    assert torch.isnan(ref.dpo_loss(c.double(), r.double(), rc.double(), rr.double(), 0.3, loss_type).loss)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_infinite_entropy_without_entropy_coef_stays_finite(backend, level):
    """entropy_coef=0 must not add 0 * entropy (inf entropy gave a NaN loss; issue #11, item 6)."""
    batch = make_batch(3, 8, seed=42)
    batch["entropy"][batch["mask"]] = float("inf")
    for options in (dict(level=level), dict(level=level, entropy_top_fraction=0.5)):
        args, opts = build(batch, ("entropy", "rollout"), dict(options, tis_cap=2.0), dtype=torch.float32)
        out, grads = run(backend, args, opts)
        expected, expected_grads = reference_of(args, opts)
        assert torch.isfinite(expected.loss)
        assert_close(out.loss, expected.loss)
        assert_close(grads[0], expected_grads[0], GRAD_TOL)
        assert (grads[1] == 0).all()
        assert out.metrics["entropy"].item() == float("inf")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_value_loss_clip_propagates_non_finite_old_values(backend, bad):
    """A NaN old value at an active token makes the clipped loss NaN, as the reference
    (it was ignored; issue #11, item 7); infinite ones follow the reference too."""
    v, vo, R, mask = _values(dtype=torch.float32)
    mask[1, 2] = True
    v[1, 2], R[1, 2] = 0.5, 0.1
    vo[1, 2] = bad
    v.requires_grad_()
    with rlkern.use_backend(backend):
        out = losses.value_loss(v, vo, R, mask, clip=0.2)
    (g,) = torch.autograd.grad(out.loss, v)
    v64 = v.detach().double().requires_grad_()
    expected = ref.value_loss(v64, vo.double(), R.double(), mask, 0.2)
    (ge,) = torch.autograd.grad(expected.loss, v64)
    if bad != bad:
        assert torch.isnan(expected.loss) and torch.isnan(out.loss)
        assert torch.isnan(g[1, 2])
    else:
        assert_close(out.loss, expected.loss)
        assert_close(g, ge, GRAD_TOL)
    assert_close(out.metrics["clip_frac"], expected.metrics["clip_frac"])


@pytest.mark.parametrize("option", ["log_ratio_clamp", "kl_clamp"])
@pytest.mark.parametrize("value", [(float("nan"), None), (None, float("nan")), (-1.0, float("nan")),
                                   [float("nan"), 1.0], float("nan")])
def test_nan_in_a_clamp_pair_is_rejected(option, value):
    """A NaN bound inside a pair was ignored by the kernels (issue #11, item 8)."""
    b = make_batch(3, 4, seed=17, dtype=torch.float32)
    with pytest.raises(ValueError, match=option):
        losses.policy_loss(b["logp"], b["old"], b["adv"], b["mask"], ref_logp=b["ref"], **{option: value})
    with pytest.raises(ValueError, match=option):
        ref.policy_loss(b["logp"], b["old"], b["adv"], b["mask"], ref_logp=b["ref"], **{option: value})


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tiny_normalizer_and_float64_grad_scale(backend):
    """normalizer=1e-300 behaves as on the C++ path, and float64 gradients carry no float32
    rounding of 1 / normalizer (Triton stored grad_scale as float32; issue #11, item 20)."""
    batch = make_batch(3, 7, seed=43)
    args, opts = build(batch, (), dict(normalizer=1e-300), dtype=torch.float32)
    out, grads = run(backend, args, opts)
    cpu_out, cpu_grads = run("cpu", args, opts)
    assert torch.equal(torch.isfinite(out.loss), torch.isfinite(cpu_out.loss))
    assert torch.equal(torch.isinf(grads[0]), torch.isinf(cpu_grads[0]))
    for normalizer in (3.0, 1e-300):
        args, opts = build(batch, (), dict(normalizer=normalizer))
        out, grads = run(backend, args, opts)
        expected, expected_grads = reference_of(args, opts)
        assert_close(out.loss, expected.loss, 1e-13)
        assert_close(grads[0], expected_grads[0], 1e-13)


def _design_agg(per_token, mask, agg):
    """DESIGN.md's aggregation written out (verl 0.9.1): sequence modes average over the
    sequences that have an active token; a batch with none gives 0."""
    m = mask.double()
    seq = (per_token * m).sum(-1)
    n = m.sum(-1)
    keep = n > 0
    if agg == "token-mean":
        return seq.sum() / max(n.sum().item(), 1.0)
    if agg == "token-sum":
        return seq.sum()
    if agg == "seq-mean-token-mean":
        seq = seq / n.clamp(min=1)
    if agg == "seq-mean-token-sum-norm":
        seq = seq / per_token.shape[-1]
    return seq[keep].sum() / max(int(keep.sum()), 1)


def _verl_agg_loss():
    try:
        from verl.trainer.ppo.core_algos import agg_loss
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        pytest.skip(f"verl 0.9.1 is not importable here: {type(e).__name__}: {e}")
    return agg_loss


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("rows", ["some_empty", "all_empty", "none_empty"])
def test_aggregation_follows_verl_0_9_1(backend, agg, rows):
    """seq-* modes: sum (/ T) per sequence, then the mean over NON-EMPTY sequences; an
    empty sequence is left out of the count (issue #13). REINFORCE makes the per-token loss
    -A logp, so the aggregation can be checked against the formula directly."""
    batch = make_batch(5, 8, seed=44, nan_masked=False)
    if rows == "all_empty":
        batch["mask"][:] = False
    elif rows == "none_empty":
        batch["mask"][:, 0] = True
    args, opts = build(batch, (), dict(objective="reinforce", agg=agg))
    out, grads = run(backend, args, opts)
    per_token = -batch["adv"][:, None] * batch["logp"]
    want = _design_agg(per_token, batch["mask"], agg)
    assert_close(out.loss, want, 1e-12)
    if rows == "all_empty":
        assert out.loss.item() == 0.0
    with rlkern.use_backend(backend):
        v = batch["logp"].clone().requires_grad_()
        vl = losses.value_loss(v, None, batch["old"], batch["mask"], agg=agg)
    assert_close(vl.loss, 0.5 * _design_agg((batch["logp"] - batch["old"]) ** 2, batch["mask"], agg), 1e-12)


@pytest.mark.parametrize("agg", ref.AGG_MODES)
def test_aggregation_equals_verl_agg_loss(agg):
    """Against verl 0.9.1's own agg_loss (installed with --no-deps as the test extra does)."""
    agg_loss = _verl_agg_loss()
    batch = make_batch(6, 9, seed=45, nan_masked=False)
    batch["mask"][4] = False
    per_token = -batch["adv"][:, None] * batch["logp"]
    want = agg_loss(per_token, batch["mask"].double(), agg)
    args, opts = build(batch, (), dict(objective="reinforce", agg=agg))
    for backend in CPU_BACKENDS + ["reference"]:
        out, _ = run(backend, args, opts)
        # verl divides seq-mean-token-mean by n_i + 1e-8: a relative 1e-8 at most.
        assert_close(out.loss, want, 1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["nan_logp_dual_clip", "zero_adv_infinite_ratio"])
def test_ppo_max_and_dual_clip_keep_nan(backend, case):
    """Found by tests/test_property_losses.py: the dual-clip min took the bound for a NaN
    surrogate, and the PPO max dropped -A r = NaN when A = 0 and r = inf; torch keeps NaN."""
    batch = make_batch(2, 4, seed=46, nan_masked=False)
    batch["mask"][:] = True
    if case == "nan_logp_dual_clip":
        batch["adv"][:] = -0.6
        batch["logp"][0, 1] = float("nan")
        options = dict(clip_low=0.0, dual_clip=1.5)
    else:
        batch["adv"][0] = 0.0
        batch["old"][0, 1] = batch["logp"][0, 1] - 1000.0  # r = inf in float64 too
        options = dict()
    args, opts = build(batch, (), options, dtype=torch.float32)
    out, _ = run(backend, args, opts)
    expected, _ = reference_of(args, opts)
    assert torch.isnan(expected.loss) and torch.isnan(out.loss)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("objective", ["reinforce", "cispo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ratio_free_objectives_ignore_a_nan_ratio_in_the_gradient(backend, objective, level):
    """Found by the property tests: REINFORCE never evaluates r = exp(logp - old) into its
    loss, so a NaN old log-prob must not make its gradient NaN (0 * NaN)."""
    batch = make_batch(2, 5, seed=47, nan_masked=False)
    batch["mask"][:] = True
    batch["old"][0, 1] = float("nan")
    args, opts = build(batch, (), dict(objective=objective, level=level), dtype=torch.float32)
    out, grads = run(backend, args, opts)
    expected, expected_grads = reference_of(args, opts)
    assert torch.isnan(out.loss) == torch.isnan(expected.loss)
    if objective == "reinforce":
        assert torch.isfinite(out.loss)
        assert_close(grads[0], expected_grads[0], GRAD_TOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_policy_loss_can_be_updated_in_place(backend):
    """verl's trainer adds the KL loss in place (policy_loss += kl_loss * coef): the loss
    must not be a view of a tensor made inside the autograd Function."""
    logp = torch.randn(2, 5, requires_grad=True)
    with rlkern.use_backend(backend):
        out = rlkern.policy_loss(logp, logp.detach() + 0.1, torch.randn(2), torch.ones(2, 5, dtype=torch.bool))
    loss = out.loss
    before = float(loss)
    loss += 1.0
    loss.backward()
    assert float(loss) == pytest.approx(before + 1.0)
    assert logp.grad is not None and torch.isfinite(logp.grad).all()


# ---------------------------------------------------------------------------------------
# callers that read a few metrics (losses._policy_loss_reading, the adapters' way in)

READING_CASES = {
    # name: (tensors needed, options, metrics read)
    "reinforce_none": ((), dict(objective="reinforce"), ()),
    "reinforce_approx_kl": ((), dict(objective="reinforce"), ("approx_kl",)),
    "reinforce_ratio": ((), dict(objective="reinforce"), ("ratio_mean", "clip_frac_low")),
    "dual_clip": ((), dict(dual_clip=3.0, log_ratio_clamp=20.0),
                  ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "approx_kl_clamped")),
    "cispo": ((), dict(objective="cispo", clip_low=1.0, clip_high=0.3, log_ratio_clamp=20.0),
              ("clip_frac", "approx_kl_clamped")),
    "dro_k2": (("ref",), dict(objective="reinforce", kl_coef=0.1, kl_kind="k2"), ("approx_kl",)),
    "tis_mask": (("rollout",), dict(tis_cap=1.1, tis_mode="mask", log_ratio_clamp=20.0),
                 ("clip_frac_low", "clip_frac_high", "approx_kl", "rollout_kl", "tis_clip_frac")),
    "weights_entropy": (("weights", "entropy"), dict(objective="reinforce"), ("approx_kl",)),
    # the lean vector profile (REINFORCE/CISPO, the caller's weights, few totals), every agg
    "reinforce_weights": (("weights",), dict(objective="reinforce"), ("approx_kl",)),
    "dro_k1_weights": (("ref", "weights"), dict(objective="reinforce", kl_coef=0.1, kl_kind="k1"), ("approx_kl", "kl")),
    "reinforce_weights_seq": (("weights",), dict(objective="reinforce", agg="seq-mean-token-mean"), ()),
    "cispo_weights": (("weights",), dict(objective="cispo", clip_low=1.0, clip_high=0.3, log_ratio_clamp=20.0,
                                         agg="seq-mean-token-sum"), ("clip_frac", "approx_kl_clamped")),
    "sequence": ((), dict(level="sequence", clip_low=0.05), ("clip_frac_low", "clip_frac_high", "approx_kl")),
    "sapo": ((), dict(objective="sapo", log_ratio_clamp=20.0, agg="seq-mean-token-mean"), ("approx_kl_clamped",)),
    "dppo_tv": ((), dict(objective="dppo_tv", ratio_cap=1.1, log_ratio_clamp=20.0),
                ("clip_frac_low", "clip_frac_high", "trunc_frac", "approx_kl_clamped")),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(READING_CASES))
def test_reading_some_metrics_matches_the_full_call(name, dtype):
    """A caller that reads a few metrics gets, bit for bit, the full call's loss, gradients and
    those metrics (the kernel skips only the other totals' work), and only those metrics."""
    needs, options, reading = READING_CASES[name]
    # rows over several 8-token steps, with tails, padding and an all-masked row
    batch = make_batch(5, 203, seed=12)
    args, opts = build(batch, needs, options, dtype)
    full, full_grads = run("cpu", args, opts)
    args, opts = build(batch, needs, options, dtype)
    with rlkern.use_backend("cpu"):
        part = losses._policy_loss_reading(reading, *args, **opts)
    leaves = [args[0]] + ([opts["entropy"]] if "entropy" in opts else [])
    grads = torch.autograd.grad(part.loss, leaves, allow_unused=True)
    assert set(part.metrics) == set(reading)
    assert torch.equal(part.loss, full.loss), (part.loss, full.loss)
    for k in reading:
        assert torch.equal(part.metrics[k], full.metrics[k]), (k, part.metrics[k], full.metrics[k])
    for g, e in zip(grads, full_grads):
        assert torch.equal(torch.zeros_like(e) if g is None else g, e)


# ---------------------------------------------------------------------------------------
# float32 weights beside bfloat16/float16 log-probs (verl's rollout IS weights)

MIXED_WEIGHT_CASES = {
    # name: (tensors needed, options, metrics read: None for all)
    "weights": (("weights",), dict(), None),
    "weights_tis_mask": OPTION_CASES["weights_tis_mask"] + (None,),
    "weights_sequence": OPTION_CASES["weights_sequence"] + (None,),
    "weights_cispo_kl": OPTION_CASES["weights_cispo_kl"] + (None,),
    "everything_token": OPTION_CASES["everything_token"] + (None,),
    "everything_sequence": OPTION_CASES["everything_sequence"] + (None,),
    "sapo": (("weights",), dict(objective="sapo", log_ratio_clamp=20.0, agg="seq-mean-token-mean"), None),
    "dppo_kl": (("weights",), dict(objective="dppo_kl", ratio_cap=1.1, log_ratio_clamp=20.0), None),
    # the lean vector profile of a reading caller (verl's REINFORCE and gpg with IS weights)
    "reinforce_lean": READING_CASES["reinforce_weights"],
    "dro_k1_lean": READING_CASES["dro_k1_weights"],
    "cispo_lean": READING_CASES["cispo_weights"],
}


def _same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (what, actual.dtype, expected.dtype)
    assert torch.equal(bit_pattern(actual), bit_pattern(expected)), what


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("retain", [False, True])
def test_mixed_dtype_gradient_narrowed_in_one_pass(monkeypatch, dtype, retain):
    """Narrow log-probs beside float32 ones keep a float32 gradient; backward scales and
    narrows it in one compiled pass, bit for bit torch's ``buf.mul_(g).to(dtype)`` (the
    eager fallback), under a unit and a scaled incoming gradient and a retained graph."""
    batch = make_batch(6, 75, seed=13, nan_masked=False)
    entropy = batch["entropy"].to(dtype)

    def grads():
        logp = batch["logp"].to(dtype).requires_grad_()
        ent = entropy.clone().requires_grad_()
        out = losses.policy_loss(logp, batch["old"].float(), batch["adv"].float(), batch["mask"],
                                 entropy=ent, entropy_coef=0.01)
        first = torch.autograd.grad(out.loss * 0.37, (logp, ent), retain_graph=retain)
        if not retain:
            return first
        return first + torch.autograd.grad(out.loss, (logp, ent))

    real, taken = losses._narrow_native, []

    def spy(*args):  # records that the one-pass path ran, so that the comparison is not vacuous
        out = real(*args)
        taken.append(out is not None)
        return out

    with rlkern.use_backend("cpu"):
        monkeypatch.setattr(losses, "_narrow_native", spy)
        got = grads()
        monkeypatch.setattr(losses, "_narrow_native", lambda *args: None)
        expected = grads()
    assert taken and all(taken), "backward did not narrow in one pass"
    assert len(got) == (4 if retain else 2)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == dtype
        _same_bits(g, e, f"grad {i}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("name", list(MIXED_WEIGHT_CASES))
def test_float32_weights_beside_half_inputs_give_the_float32_result(backend, dtype, scale, name):
    """float32 weights with bfloat16/float16 log-probs: the kernels read each input in its own
    type instead of copying the log-probs to float32, and give, bit for bit, the loss, metrics
    and gradients of the same call on float32 copies of the narrow inputs (what such a call
    computed before), under a unit and a scaled incoming gradient."""
    needs, options, reading = MIXED_WEIGHT_CASES[name]
    # rows over several 8-token steps and blocks, with tails, padding and an all-masked row
    batch = make_batch(5, 300, seed=21)

    def call(narrow):
        args, opts = build(batch, needs, options, narrow)
        wide = {k: v for k, v in opts.items() if isinstance(v, torch.Tensor)}
        opts["weights"] = batch["weights"].to(torch.float32)
        if narrow == torch.float32:  # the former path: every narrow input copied to float32
            args = tuple(a.to(dtype).float().requires_grad_(a.requires_grad) if a.is_floating_point() else a
                         for a in args)
            for k, v in wide.items():
                opts[k] = v.to(dtype).float().requires_grad_(v.requires_grad)
            opts["weights"] = batch["weights"].to(torch.float32)
        with rlkern.use_backend(backend):
            if reading is None:
                out = losses.policy_loss(*args, **opts)
            else:
                out = losses._policy_loss_reading(reading, *args, **opts)
        leaves = [args[0]] + ([opts["entropy"]] if "entropy" in opts else [])
        grads = torch.autograd.grad(out.loss * scale if scale != 1.0 else out.loss, leaves)
        return out, [g.to(dtype) for g in grads]

    out, grads = call(dtype)
    expected, expected_grads = call(torch.float32)
    _same_bits(out.loss, expected.loss, "loss")
    assert set(out.metrics) == set(expected.metrics)
    for k in expected.metrics:
        _same_bits(out.metrics[k], expected.metrics[k], f"metric {k}")
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        _same_bits(g, e, f"grad {i}")


def test_kernel_options_come_from_a_per_config_template_copied_per_call():
    """The CPU path copies a cached PolicyParams per configuration: a copy's edits never
    reach the next call, and configurations the cache cannot hold (a list clamp, a tensor
    normalizer) give the same results as their hashable spellings."""
    cfg = ref.PolicyLossConfig(objective="cispo", clip_low=0.3, log_ratio_clamp=(None, 10.0))
    first = losses._policy_params(cfg, 2, 3)
    first.B, first.clip_low, first.has_lr_hi = 99, 7.0, False
    second = losses._policy_params(cfg, 4, 5)
    assert (second.B, second.T, second.clip_low, second.has_lr_hi, second.lr_hi) == (4, 5, 0.3, True, 10.0)
    assert second.objective == losses._OBJECTIVE_CODES["cispo"]

    g = torch.Generator().manual_seed(0)
    logp, old = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    adv, mask = torch.randn(4, generator=g), torch.rand(4, 9, generator=g) < 0.8
    base = rlkern.policy_loss(logp, old, adv, mask, log_ratio_clamp=(None, 0.5), agg="token-sum", normalizer=7.0)
    listed = rlkern.policy_loss(logp, old, adv, mask, log_ratio_clamp=[None, 0.5], agg="token-sum", normalizer=7.0)
    assert torch.equal(listed.loss, base.loss)
    # a tensor normalizer divides the float32 loss on its device, not the float64 sum
    tensor_norm = rlkern.policy_loss(logp, old, adv, mask, log_ratio_clamp=(None, 0.5), agg="token-sum",
                                     normalizer=torch.tensor(7.0))
    torch.testing.assert_close(tensor_norm.loss, base.loss, rtol=1e-6, atol=0)
    clamped_away = rlkern.policy_loss(logp, old, adv, mask, agg="token-sum", normalizer=7.0)
    assert not torch.equal(clamped_away.loss, base.loss)  # the clamp took effect above
