"""rlkern.returns against the float64 reference (every backend that runs here)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlkern
from rlkern.reference import returns as ref
from helpers import VALUE_TOL, assert_close, run_with_baseline_isa

SHAPES = [(1, 1), (1, 7), (5, 1), (3, 64), (17, 129), (64, 1000), (2, 3000), (3000, 2)]
LOW_PRECISION = [torch.bfloat16, torch.float16]


def _flags(shape, p, gen, first=False, last=False):
    f = torch.rand(shape, generator=gen) < p
    if first:
        f[:, 0] = True
    if last:
        f[:, -1] = True
    return f


def _f64(*ts):
    return [t.double() if t is not None and t.is_floating_point() else t for t in ts]


@pytest.fixture(params=["cpu", "reference"])
def backend(request):
    with rlkern.use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
def test_discounted_returns(backend, shape, gamma):
    g = torch.Generator().manual_seed(hash((shape, gamma)) % 2**31)
    r = torch.randn(shape, generator=g)
    d = _flags(shape, 0.1, g, first=True, last=shape[1] > 3)
    boot = torch.randn(shape[0], generator=g)
    out = rlkern.discounted_returns(r, d, gamma, bootstrap=boot)
    assert out.dtype == torch.float32
    assert_close(out, ref.discounted_returns(r.double(), d, gamma, boot.double()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.0, 0.5), (1.0, 0.0)])
def test_gae_bootstrapping_from_values(backend, shape, gamma, lam):
    g = torch.Generator().manual_seed(hash((shape, gamma, lam)) % 2**31)
    r, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    term = _flags(shape, 0.05, g, first=True, last=shape[1] > 2)
    boot = torch.randn(shape[0], generator=g)
    adv, ret = rlkern.gae(r, v, term, gamma, lam, bootstrap_value=boot)
    eadv, eret = ref.gae(*_f64(r, v), term, gamma, lam, bootstrap_value=boot.double())
    assert_close(adv, eadv)
    assert_close(ret, eret)


@pytest.mark.parametrize("shape", SHAPES)
def test_gae_truncation_with_next_values(backend, shape):
    g = torch.Generator().manual_seed(shape[0] * 7919 + shape[1])
    r, v, nv = (torch.randn(shape, generator=g) for _ in range(3))
    term = _flags(shape, 0.05, g)
    trunc = _flags(shape, 0.05, g, last=True) & ~term
    adv, ret = rlkern.gae(r, v, term, 0.99, 0.95, next_values=nv, truncated=trunc)
    eadv, eret = ref.gae(*_f64(r, v), term, 0.99, 0.95, next_values=nv.double(), truncated=trunc)
    assert_close(adv, eadv)
    assert_close(ret, eret)


def test_gae_termination_and_truncation_differ():
    r = torch.tensor([[1.0, 1.0]])
    v = torch.tensor([[0.5, 0.5]])
    nv = torch.tensor([[0.5, 10.0]])
    end = torch.tensor([[False, True]])
    term_adv, _ = rlkern.gae(r, v, end, 1.0, 1.0, next_values=nv)
    trunc_adv, _ = rlkern.gae(r, v, torch.zeros_like(end), 1.0, 1.0, next_values=nv, truncated=end)
    assert term_adv[0, 1].item() == pytest.approx(0.5)  # 1 - 0.5, no bootstrap
    assert trunc_adv[0, 1].item() == pytest.approx(10.5)  # 1 + 10 - 0.5
    assert trunc_adv[0, 0].item() == pytest.approx(1 + 0.5 - 0.5 + 10.5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lam", [0.0, 0.8, 1.0])
def test_lambda_returns(backend, shape, lam):
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[1] + int(lam * 10))
    r, nv = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    term = _flags(shape, 0.05, g, first=True)
    trunc = _flags(shape, 0.05, g) & ~term
    out = rlkern.lambda_returns(r, nv, term, 0.97, lam, truncated=trunc)
    assert_close(out, ref.lambda_returns(*_f64(r, nv), term, 0.97, lam, truncated=trunc))


def _check_masked_gae(r, v, mask, gamma, lam):
    """Against the float64 reference; masked inputs hold NaN or inf and must not leak."""
    adv, ret = rlkern.masked_gae(r, v, mask, gamma, lam)
    eadv, eret = ref.masked_gae(*_f64(r, v), mask, gamma, lam)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert_close(adv, eadv)
    assert_close(ret, eret)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (1.0, 0.0)])
def test_masked_gae(backend, shape, gamma, lam):
    g = torch.Generator().manual_seed(shape[0] * 131 + shape[1])
    r, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mask = torch.rand(shape, generator=g) < 0.7
    r = r.masked_fill(~mask, float("nan"))  # masked inputs never reach the result
    v = v.masked_fill(~mask, float("inf"))
    _check_masked_gae(r, v, mask, gamma, lam)


def test_masked_gae_rows_do_not_depend_on_their_neighbours(backend):
    """Rows with scattered holes, right padding, no holes and long masked spans, mixed
    in one batch: each row matches the reference, and matches exactly the same row
    computed alone (the CPU kernel picks its tile path from the masks it has seen)."""
    g = torch.Generator().manual_seed(5)
    B, T = 48, 517
    styles = []
    for b in range(B):
        kind = b % 4 if b < 24 else (b // 6) % 4  # alternating, then in runs
        if kind == 0:
            row = torch.rand(T, generator=g) < 0.85
        elif kind == 1:
            row = torch.arange(T) < int(torch.randint(1, T, (1,), generator=g))
        elif kind == 2:
            row = torch.ones(T, dtype=torch.bool)
        else:
            row = (torch.arange(T) // 40) % 3 != 1
        styles.append(row)
    mask = torch.stack(styles)
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    r = r.masked_fill(~mask, float("nan"))
    _check_masked_gae(r, v, mask, 0.99, 0.95)
    adv, ret = rlkern.masked_gae(r, v, mask, 0.99, 0.95)
    for b in range(B):
        one_adv, one_ret = rlkern.masked_gae(r[b:b + 1], v[b:b + 1], mask[b:b + 1], 0.99, 0.95)
        assert torch.equal(one_adv[0], adv[b]) and torch.equal(one_ret[0], ret[b])


@pytest.mark.parametrize("T,k", [(64, 21), (61, 8), (200, 127), (17, 0)])
@pytest.mark.parametrize("cut", ["terminated", "truncated"])
def test_nan_after_an_episode_end_stays_there(backend, T, k, cut):
    """Steps after an episode boundary at k hold NaN; the earlier episode is untouched
    (every scan reads nothing across a cut: 8-step vector tiles included)."""
    g = torch.Generator().manual_seed(T * 7 + k)
    r, v, nv = (torch.randn(3, T, generator=g) for _ in range(3))
    flags = torch.zeros(3, T, dtype=torch.bool)
    flags[:, k] = True
    term = flags if cut == "terminated" else torch.zeros_like(flags)
    trunc = flags if cut == "truncated" else None
    dirty = [x.clone() for x in (r, v, nv)]
    for x in dirty:
        x[:, k + 1:] = float("nan")
    head = slice(0, k + 1)
    clean = [x[:, head].contiguous() for x in (r, v, nv)]
    last = torch.zeros(3, k + 1, dtype=torch.bool)
    last[:, k] = True
    if cut == "terminated":
        ret = rlkern.discounted_returns(dirty[0], term, 0.9)[:, head]
        assert_close(ret, ref.discounted_returns(clean[0].double(), last, 0.9))
    adv, _ = rlkern.gae(dirty[0], dirty[1], term, 0.99, 0.95, next_values=dirty[2], truncated=trunc)
    head_term = last if cut == "terminated" else torch.zeros_like(last)
    head_trunc = None if cut == "terminated" else last
    eadv, _ = ref.gae(clean[0].double(), clean[1].double(), head_term, 0.99, 0.95, next_values=clean[2].double(),
                      truncated=head_trunc)
    assert torch.isfinite(adv[:, head]).all()
    assert_close(adv[:, head], eadv)
    lam_ret = rlkern.lambda_returns(dirty[0], dirty[2], term, 0.97, 0.8, truncated=trunc)[:, head]
    assert torch.isfinite(lam_ret).all()
    assert_close(lam_ret, ref.lambda_returns(clean[0].double(), clean[2].double(), head_term, 0.97, 0.8,
                                             truncated=head_trunc))


def test_masked_gae_equals_gae_on_the_compressed_row():
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    r, v = torch.randn(1, 8, generator=g, dtype=torch.float64), torch.randn(1, 8, generator=g, dtype=torch.float64)
    adv, ret = rlkern.masked_gae(r, v, mask, 0.9, 0.8)
    sub_adv, sub_ret = ref.gae(r[mask][None], v[mask][None], torch.zeros(1, 4, dtype=torch.bool), 0.9, 0.8)
    assert_close(adv[mask], sub_adv[0], 1e-12)
    assert_close(ret[mask], sub_ret[0], 1e-12)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_inputs_compute_in_float32(backend, dtype):
    g = torch.Generator().manual_seed(11)
    shape = (9, 300)
    r, v = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    term = _flags(shape, 0.02, g)
    adv, ret = rlkern.gae(r, v, term, 0.99, 0.95)
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    eadv, eret = ref.gae(*_f64(r, v), term, 0.99, 0.95)
    assert_close(adv, eadv)
    assert_close(ret, eret)
    out = rlkern.discounted_returns(r, term, 0.99)
    assert_close(out, ref.discounted_returns(r.double(), term, 0.99))
    madv, _ = rlkern.masked_gae(r, v, ~term)
    assert_close(madv, ref.masked_gae(*_f64(r, v), ~term, 1.0, 1.0)[0])


def test_float64_computes_in_float64():
    g = torch.Generator().manual_seed(5)
    r = torch.randn(4, 200, generator=g, dtype=torch.float64)
    v = torch.randn(4, 200, generator=g, dtype=torch.float64)
    term = torch.zeros(4, 200, dtype=torch.bool)
    adv, _ = rlkern.gae(r, v, term, 0.999, 0.99)
    assert adv.dtype == torch.float64
    assert_close(adv, ref.gae(r, v, term, 0.999, 0.99)[0], 1e-13)


def test_non_contiguous_and_numeric_flags(backend):
    g = torch.Generator().manual_seed(8)
    big_r, big_v = torch.randn(40, 30, generator=g), torch.randn(40, 30, generator=g)
    r, v = big_r.t()[:, ::2], big_v.t()[:, ::2]  # [30, 20], strided both ways
    assert not r.is_contiguous()
    term = (torch.rand(30, 20, generator=g) < 0.1).float()
    adv, ret = rlkern.gae(r, v, term, 0.95, 0.9)
    eadv, eret = ref.gae(*_f64(r, v), term.bool(), 0.95, 0.9)
    assert_close(adv, eadv)
    assert_close(ret, eret)


def test_one_dimensional_inputs_are_one_row():
    r = torch.tensor([1.0, 2.0, 3.0])
    d = torch.tensor([False, True, False])
    assert torch.allclose(rlkern.discounted_returns(r, d, 0.5), torch.tensor([2.0, 2.0, 3.0]))
    adv, ret = rlkern.gae(r, torch.zeros(3), d, 1.0, 1.0)
    assert adv.shape == (3,) and torch.allclose(ret, torch.tensor([3.0, 2.0, 3.0]))


def test_result_is_independent_of_thread_count():
    g = torch.Generator().manual_seed(9)
    r, v = torch.randn(257, 100, generator=g), torch.randn(257, 100, generator=g)
    term = torch.rand(257, 100, generator=g) < 0.03
    before = rlkern.get_num_threads()
    try:
        rlkern.set_num_threads(1)
        one = rlkern.gae(r, v, term, 0.99, 0.95)
        rlkern.set_num_threads(4)
        four = rlkern.gae(r, v, term, 0.99, 0.95)
    finally:
        rlkern.set_num_threads(before)
    assert torch.equal(one[0], four[0]) and torch.equal(one[1], four[1])


def test_grad_requiring_inputs_get_correct_gradients():
    g = torch.Generator().manual_seed(4)
    r = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    term = torch.rand(3, 6, generator=g) < 0.2
    assert torch.autograd.gradcheck(lambda a, b: rlkern.gae(a, b, term, 0.9, 0.8), (r, v))


# --- hypothesis: the recurrences' defining properties --------------------------------

@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), gamma=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_no_dones_and_gamma_one_is_reverse_cumsum(T, gamma, seed):
    r = torch.randn(2, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = rlkern.discounted_returns(r, torch.zeros(2, T, dtype=torch.bool), 1.0)
    assert_close(out, r.flip(1).cumsum(1).flip(1), 1e-12)
    # and, for any gamma, G_t - gamma G_{t+1} recovers the rewards
    out = rlkern.discounted_returns(r, torch.zeros(2, T, dtype=torch.bool), gamma)
    shifted = torch.cat([out[:, 1:], torch.zeros(2, 1, dtype=torch.float64)], 1)
    assert_close(out - gamma * shifted, r, 1e-10)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 30), gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0), p=st.floats(0.0, 0.5),
       seed=st.integers(0, 2**16))
def test_gae_returns_equal_lambda_returns(T, gamma, lam, p, seed):
    g = torch.Generator().manual_seed(seed)
    r, v = torch.randn(3, T, generator=g, dtype=torch.float64), torch.randn(3, T, generator=g, dtype=torch.float64)
    boot = torch.randn(3, generator=g, dtype=torch.float64)
    term = torch.rand(3, T, generator=g) < p
    _, ret = rlkern.gae(r, v, term, gamma, lam, bootstrap_value=boot)
    nv = torch.cat([v[:, 1:], boot[:, None]], 1)
    assert_close(rlkern.lambda_returns(r, nv, term, gamma, lam), ret, 1e-10)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 30), gamma=st.floats(0.0, 1.0), p=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
def test_gae_with_lambda_one_is_monte_carlo_minus_value(T, gamma, p, seed):
    g = torch.Generator().manual_seed(seed)
    r, v = torch.randn(2, T, generator=g, dtype=torch.float64), torch.randn(2, T, generator=g, dtype=torch.float64)
    term = torch.rand(2, T, generator=g) < p
    adv, _ = rlkern.gae(r, v, term, gamma, 1.0)
    assert_close(adv, rlkern.discounted_returns(r, term, gamma) - v, 1e-10)


# --- group advantages ----------------------------------------------------------------

@pytest.mark.parametrize("estimator,scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                             ("rloo", "none"), ("rloo", "group")])
@pytest.mark.parametrize("group_size", [1, 2, 8, 64])
def test_group_advantages(backend, estimator, scale, group_size):
    if estimator == "rloo" and group_size == 1:
        pytest.skip("rloo needs two members")
    g = torch.Generator().manual_seed(group_size)
    r = torch.randn(32 * group_size, generator=g)
    r[:group_size] = 0.5  # a group of equal rewards
    out = rlkern.group_advantages(r, group_size, estimator=estimator, scale=scale)
    expected = ref.group_advantages(r.double(), group_size, estimator=estimator, scale=scale)
    assert out.dtype == torch.float32
    assert_close(out, expected)
    assert (out[:group_size] == 0).all()


def test_group_advantages_formulas():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    grpo = rlkern.group_advantages(r, 3, eps=0.0)
    assert_close(grpo[:3], (r[:3] - 3.0) / r[:3].std(), 1e-12)
    rloo = rlkern.group_advantages(r, 3, estimator="rloo")
    assert_close(rloo[:3], torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5], dtype=torch.float64), 1e-12)
    assert (rlkern.group_advantages(r, 3, eps=0.0)[3:] == 0).all()  # equal rewards, no NaN even with eps = 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator,scale", [("grpo", "group"), ("grpo", "batch"), ("rloo", "none"),
                                             ("rloo", "group")])
def test_group_advantages_of_huge_rewards_match_float64(backend, dtype, estimator, scale):
    """Rewards near 1e38 overflowed the float32 group sums (NaN advantages) where float64
    gives finite ones (issue 11, item 12): every path now sums in float64."""
    g = torch.Generator().manual_seed(12)
    r = (torch.rand(8 * 4, generator=g, dtype=torch.float64) * 6e38 - 3e38).to(dtype)
    r[:4] = torch.tensor([3e38, 3e38, -1e38, 2e38])
    r[4:8] = torch.tensor([3e38, 3e38, 3e38, -3e38])
    out = rlkern.group_advantages(r, 4, estimator=estimator, scale=scale)
    expected = ref.group_advantages(r.double(), 4, estimator=estimator, scale=scale)
    assert torch.isfinite(expected).all()
    assert out.dtype == torch.float32
    # unscaled RLOO advantages can lie beyond float32's range: those round to inf
    assert_close(out, expected.float())


# --- bad input -----------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    r, v = torch.randn(2, 5), torch.randn(2, 5)
    d = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="values must have shape"):
        rlkern.gae(r, torch.randn(2, 4), d, 0.9, 0.9)
    with pytest.raises(TypeError, match="rewards must be float"):
        rlkern.gae(torch.ones(2, 5, dtype=torch.int64), v, d, 0.9, 0.9)
    with pytest.raises(TypeError, match="rewards must be float"):
        rlkern.discounted_returns(torch.ones(2, 5, dtype=torch.bool), d, 0.9)
    with pytest.raises(ValueError, match="gamma must be in"):
        rlkern.gae(r, v, d, 1.5, 0.9)
    with pytest.raises(ValueError, match="lam must be in"):
        rlkern.gae(r, v, d, 0.9, -0.1)
    with pytest.raises(ValueError, match="truncated needs next_values"):
        rlkern.gae(r, v, d, 0.9, 0.9, truncated=d)
    with pytest.raises(ValueError, match="terminated must have shape"):
        rlkern.gae(r, v, torch.zeros(2, 6, dtype=torch.bool), 0.9, 0.9)
    with pytest.raises(ValueError, match="bootstrap_value must have shape"):
        rlkern.gae(r, v, d, 0.9, 0.9, bootstrap_value=torch.zeros(3))
    with pytest.raises(ValueError, match="rewards must be 1-D or 2-D"):
        rlkern.discounted_returns(torch.zeros(2, 2, 2), d, 0.9)
    with pytest.raises(ValueError, match="does not divide"):
        rlkern.group_advantages(torch.zeros(10), 3)
    with pytest.raises(ValueError, match="estimator must be one of"):
        rlkern.group_advantages(torch.zeros(10), 5, estimator="ppo")
    with pytest.raises(ValueError, match="at least 2"):
        rlkern.group_advantages(torch.zeros(10), 1, estimator="rloo")
    with pytest.raises(ValueError, match="same device|share a device|is on"):
        rlkern.gae(r, v.to("meta"), d, 0.9, 0.9)
    with pytest.raises(TypeError, match="values must be a torch.Tensor"):
        rlkern.gae(r, [1.0] * 10, d, 0.9, 0.9)


@pytest.mark.parametrize("B,T", [(1, 40000), (3, 17000)])
def test_few_long_rows_use_the_chunked_scan(B, T):
    """Few long rows are cut into chunks composed as affine maps (the CUDA kernels use the
    same composition); results match the reference and do not depend on the thread count."""
    g = torch.Generator().manual_seed(T)
    r, v, nv = (torch.randn(B, T, generator=g) for _ in range(3))
    term = torch.rand(B, T, generator=g) < 0.001
    trunc = (torch.rand(B, T, generator=g) < 0.001) & ~term
    boot = torch.randn(B, generator=g)
    before = rlkern.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            rlkern.set_num_threads(threads)
            runs.append((rlkern.gae(r, v, term, 0.999, 0.97, bootstrap_value=boot),
                         rlkern.gae(r, v, term, 0.99, 0.95, next_values=nv, truncated=trunc),
                         rlkern.discounted_returns(r, term, 0.999, bootstrap=boot),
                         rlkern.lambda_returns(r, nv, term, 0.99, 0.9, truncated=trunc)))
    finally:
        rlkern.set_num_threads(before)
    flat = [[t for item in run for t in (item if isinstance(item, tuple) else (item,))] for run in runs]
    assert all(torch.equal(x, y) for x, y in zip(*flat))
    (adv, ret), (adv2, _), disc, lam = runs[1]
    eadv, eret = ref.gae(r.double(), v.double(), term, 0.999, 0.97, bootstrap_value=boot.double())
    assert_close(adv, eadv)
    assert_close(ret, eret)
    assert_close(adv2, ref.gae(r.double(), v.double(), term, 0.99, 0.95, next_values=nv.double(), truncated=trunc)[0])
    assert_close(disc, ref.discounted_returns(r.double(), term, 0.999, boot.double()))
    assert_close(lam, ref.lambda_returns(r.double(), nv.double(), term, 0.99, 0.9, truncated=trunc))


def test_out_buffers_receive_the_results(backend):
    g = torch.Generator().manual_seed(21)
    r, v, nv = (torch.randn(5, 67, generator=g) for _ in range(3))
    term = torch.rand(5, 67, generator=g) < 0.05
    trunc = (torch.rand(5, 67, generator=g) < 0.05) & ~term
    mask = torch.rand(5, 67, generator=g) < 0.8
    a, b = torch.full_like(r, 7.0), torch.full_like(r, 7.0)
    got = rlkern.gae(r, v, term, 0.99, 0.95, next_values=nv, truncated=trunc, out=(a, b))
    assert got[0] is a and got[1] is b
    want = rlkern.gae(r, v, term, 0.99, 0.95, next_values=nv, truncated=trunc)
    assert torch.equal(a, want[0]) and torch.equal(b, want[1])
    got = rlkern.masked_gae(r, v, mask, 1.0, 0.9, out=(a, b))
    want = rlkern.masked_gae(r, v, mask, 1.0, 0.9)
    assert got[0] is a and torch.equal(a, want[0]) and torch.equal(b, want[1])
    assert rlkern.discounted_returns(r, term, 0.9, out=a) is a
    assert torch.equal(a, rlkern.discounted_returns(r, term, 0.9))
    assert rlkern.lambda_returns(r, nv, term, 0.9, 0.7, out=b) is b
    assert torch.equal(b, rlkern.lambda_returns(r, nv, term, 0.9, 0.7))
    row = torch.empty(67)
    assert torch.equal(rlkern.discounted_returns(r[0], term[0], 0.9, out=row), rlkern.discounted_returns(r[0], term[0], 0.9))
    f64 = torch.empty(5, 67, dtype=torch.float64)
    rlkern.discounted_returns(r.double(), term, 0.9, out=f64)
    assert_close(f64, ref.discounted_returns(r.double(), term, 0.9))


def test_out_buffers_may_share_a_storage_with_the_inputs_without_overlap(backend):
    storage = torch.randn(4, 3, 50)  # a rollout buffer: rewards, values, then advantages
    r, v, term = storage[0], storage[1], torch.zeros(3, 50, dtype=torch.bool)
    term[:, 17] = True
    adv, ret = storage[2], storage[3]
    want = rlkern.gae(r.clone(), v.clone(), term, 0.99, 0.95)
    rlkern.gae(r, v, term, 0.99, 0.95, out=(adv, ret))
    assert torch.equal(adv, want[0]) and torch.equal(ret, want[1])
    with pytest.raises(ValueError, match="share memory"):
        rlkern.gae(r, v, term, 0.99, 0.95, out=(storage[1], ret))


def test_out_buffers_on_the_differentiable_path():
    r = torch.randn(3, 20, requires_grad=True)
    term = torch.zeros(3, 20, dtype=torch.bool)
    buf = torch.empty(3, 20)
    assert rlkern.discounted_returns(r, term, 0.9, out=buf) is buf
    assert_close(buf, ref.discounted_returns(r.detach().double(), term, 0.9))


def test_bad_out_buffers_raise_clear_errors():
    r, v = torch.randn(4, 9), torch.randn(4, 9)
    term = torch.zeros(4, 9, dtype=torch.bool)
    good = torch.empty(4, 9)
    with pytest.raises(ValueError, match=r"out must have shape \(4, 9\)"):
        rlkern.discounted_returns(r, term, 0.9, out=torch.empty(4, 8))
    with pytest.raises(TypeError, match="out must have dtype torch.float32"):
        rlkern.discounted_returns(r, term, 0.9, out=torch.empty(4, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be contiguous"):
        rlkern.discounted_returns(r, term, 0.9, out=torch.empty(9, 4).t())
    with pytest.raises(ValueError, match="share memory"):
        rlkern.discounted_returns(r, term, 0.9, out=r)
    with pytest.raises(ValueError, match="share memory"):
        rlkern.gae(r, v, term, 0.9, 0.9, out=(good, good))
    with pytest.raises(TypeError, match="tuple of two tensors"):
        rlkern.gae(r, v, term, 0.9, 0.9, out=good)
    with pytest.raises(ValueError, match=r"out\[1\] must have shape"):
        rlkern.masked_gae(r, v, term, out=(good, torch.empty(3)))
    with pytest.raises(ValueError, match="must not require grad"):
        rlkern.lambda_returns(r, v, term, 0.9, 0.9, out=torch.empty(4, 9, requires_grad=True))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.0)])
def test_masked_gae_on_padded_responses(backend, gamma, lam):
    """Right-padded responses (long runs of kept and of padded tokens, as LLM batches
    have) with NaN in the padding."""
    g = torch.Generator().manual_seed(5)
    B, T = 6, 203
    lengths = torch.tensor([203, 1, 8, 64, 100, 177])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[4, 30:41] = False  # a tool-output span inside a response
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    r = r.masked_fill(~mask, float("nan"))
    v = v.masked_fill(~mask, float("nan"))
    _check_masked_gae(r, v, mask, gamma, lam)


def test_large_fresh_outputs_start_on_huge_pages():
    """Outputs of 16 MiB and more are views that start on a 2 MiB boundary (so the OS
    can back them with huge pages); they behave as ordinary row-major tensors."""
    g = torch.Generator().manual_seed(8)
    B, T = 1031, 4099  # 16.9 MB per float32 output, not a whole number of 2 MiB pages
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    term = _flags((B, T), 0.01, g)
    adv, ret = rlkern.gae(r, v, term, 0.99, 0.95)
    for t in (adv, ret):
        assert t.is_contiguous() and t.shape == (B, T) and t.dtype == torch.float32
        assert t.data_ptr() % (2 << 20) == 0
    assert adv.untyped_storage().data_ptr() != ret.untyped_storage().data_ptr()
    rows = slice(0, 40)  # the float64 reference loop is slow at full size
    eadv, eret = ref.gae(*_f64(r[rows], v[rows]), term[rows], 0.99, 0.95)
    assert_close(adv[rows], eadv)
    assert_close(ret[rows], eret)
    assert_close(adv[-3:], ref.gae(*_f64(r[-3:], v[-3:]), term[-3:], 0.99, 0.95)[0])
    small, _ = rlkern.gae(r[:4], v[:4], term[:4], 0.99, 0.95)
    assert small.untyped_storage().nbytes() == small.numel() * 4  # small outputs: plain allocations


def test_baseline_x86_build_matches(tmp_path):
    """The scans without AVX2 (the same source compiled for baseline x86-64, forced by
    RLKERN_DISABLE_AVX2) agree with the reference too."""
    run_with_baseline_isa(tmp_path, "test_returns", """
for shape in [(3, 64), (17, 129), (64, 1000)]:
    t.test_discounted_returns('cpu', shape, 0.9)
    t.test_gae_bootstrapping_from_values('cpu', shape, 0.99, 0.95)
    t.test_gae_truncation_with_next_values('cpu', shape)
    t.test_lambda_returns('cpu', shape, 0.8)
    for gamma, lam in [(0.99, 0.95), (1.0, 0.0)]:
        t.test_masked_gae('cpu', shape, gamma, lam)
t.test_masked_gae_rows_do_not_depend_on_their_neighbours('cpu')
t.test_nan_after_an_episode_end_stays_there('cpu', 200, 127, 'truncated')
""")


def _isa_outputs():
    """Every float scan on inputs that reach each path of the 8-step row kernels: scalar
    tails and tiles, uniform and cut tiles, padded and holed masks, discounts whose powers
    underflow, and NaN/inf; float32, bfloat16 and float16 inputs."""
    g = torch.Generator().manual_seed(3)
    outs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for B, T in [(5, 203), (32, 64)]:
            r, v, nv = (torch.randn(B, T, generator=g).to(dtype) for _ in range(3))
            r[0, T // 3], v[1, T // 2], nv[2, T - 9] = float("inf"), float("nan"), -float("inf")
            term, trunc = _flags((B, T), 0.03, g), _flags((B, T), 0.03, g)
            padded = torch.arange(T).expand(B, T) < torch.randint(1, T, (B, 1), generator=g)
            holed = torch.rand(B, T, generator=g) < 0.7
            for gamma, lam in [(0.99, 0.95), (1.0, 1.0), (1e-6, 1e-6), (0.9, 0.0)]:
                outs += [rlkern.discounted_returns(r, term, gamma * lam),
                         *rlkern.gae(r, v, term, gamma, lam),
                         *rlkern.gae(r, v, term, gamma, lam, next_values=nv, truncated=trunc),
                         rlkern.lambda_returns(r, nv, term, gamma, lam, truncated=trunc),
                         *rlkern.masked_gae(r, v, padded, gamma, lam), *rlkern.masked_gae(r, v, holed, gamma, lam)]
    return outs


def test_avx2_and_baseline_builds_give_the_same_bits(tmp_path):
    """The scans' AVX2 build runs the same IEEE operations as the baseline one (no FMA
    contraction), so a result never depends on the CPU it was computed on."""
    if rlkern._ext.load().returns.isa() != "avx2":
        pytest.skip("the AVX2 build of the scans does not run here (CPU without AVX2 and FMA)")
    saved = tmp_path / "baseline.pt"
    run_with_baseline_isa(tmp_path, "test_returns", f"""
assert rlkern._ext.load().returns.isa() == 'baseline'
torch.save(t._isa_outputs(), {str(saved)!r})
""")
    baseline = torch.load(saved)
    for i, (a, b) in enumerate(zip(_isa_outputs(), baseline)):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"output {i} differs"


def test_scans_run_the_avx2_build_wherever_the_other_kernels_do():
    """Every compiler (GCC for the source build, clang for the manylinux wheel) builds the
    scans' AVX2 variant, and it is taken where the CPU has AVX2 and FMA."""
    core = rlkern._ext.load()
    assert core.returns.isa() == core.cpu_isa()


# --- non-finite values and tiny discounts (issue 11, items 9 and 10) ----------------------

def _all_scans(r, v, nv, term, trunc, mask, gamma, lam):
    """Every scan on the same inputs, kernel and float64 reference side by side."""
    f = lambda x: x.double()  # noqa: E731
    return [
        (rlkern.discounted_returns(r, term, gamma * lam), ref.discounted_returns(f(r), term, gamma * lam)),
        (rlkern.gae(r, v, term, gamma, lam)[0], ref.gae(f(r), f(v), term, gamma, lam)[0]),
        (rlkern.gae(r, v, term, gamma, lam, next_values=nv, truncated=trunc)[1],
         ref.gae(f(r), f(v), term, gamma, lam, next_values=f(nv), truncated=trunc)[1]),
        (rlkern.lambda_returns(r, nv, term, gamma, lam, truncated=trunc),
         ref.lambda_returns(f(r), f(nv), term, gamma, lam, truncated=trunc)),
        (rlkern.masked_gae(r, v, mask, gamma, lam)[0], ref.masked_gae(f(r), f(v), mask, gamma, lam)[0]),
    ]


def _poisoned_inputs(B, T, seed, bad):
    g = torch.Generator().manual_seed(seed)
    r, v, nv = (torch.randn(B, T, generator=g) for _ in range(3))
    for x in (r, v, nv):
        idx = torch.randint(0, B * T, (3,), generator=g)
        x.view(-1)[idx[0]] = bad
        x.view(-1)[idx[1]] = -bad
        x.view(-1)[idx[2]] = float("nan")
    term = torch.rand(B, T, generator=g) < 2 / T
    trunc = (torch.rand(B, T, generator=g) < 2 / T) & ~term
    mask = torch.rand(B, T, generator=g) < 0.9
    return r, v, nv, term, trunc, mask


def _long_row_scans(r, v, nv, term, trunc, gamma, lam):
    return [rlkern.discounted_returns(r, term, gamma * lam), *rlkern.gae(r, v, term, gamma, lam),
            rlkern.gae(r, v, term, gamma, lam, next_values=nv, truncated=trunc)[0],
            rlkern.lambda_returns(r, nv, term, gamma, lam, truncated=trunc)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_values_cross_chunks_of_long_rows(dtype):
    """Few long rows take the chunked scan; a chunk's composed coefficient (gamma*lam)^4096
    underflows, and used to be taken for an episode boundary, so a NaN or inf stopped
    after one chunk (issue 11, item 9). Positions of NaN/inf must match the reference:
    checked directly for gae, and for every scan against the same rows scanned in a batch
    of 16 (the row kernels, checked against the reference on shorter rows above)."""
    B, T = 2, 16384 + 77
    r, v, nv, _, trunc, _ = (x.to(dtype) if x.is_floating_point() else x
                             for x in _poisoned_inputs(B, T, 7, float("inf")))
    term = torch.zeros(B, T, dtype=torch.bool)
    term[0, T // 3] = True  # one episode boundary: row 0's NaN/inf stop there, row 1's never
    gamma, lam = (0.9, 0.5) if dtype == torch.float32 else (0.99, 1e-3)
    adv, _ = rlkern.gae(r, v, term, gamma, lam)
    eadv, _ = ref.gae(r.double(), v.double(), term, gamma, lam)
    assert int(eadv.isnan().sum()) > T // 2  # the NaN reaches back to the start of row 1
    assert_close(adv, eadv)
    pad = lambda x: torch.cat([x, x[:1].expand(14, T)])  # noqa: E731
    chunked = _long_row_scans(r, v, nv, term, trunc, gamma, lam)
    rows = _long_row_scans(*(pad(x) for x in (r, v, nv, term, trunc)), gamma, lam)
    for got, want in zip(chunked, rows):
        assert_close(got, want[:B])


@pytest.mark.parametrize("gamma,lam", [(1e-3, 1e-3), (1e-5, 1e-5), (1e-20, 1e-20), (1e-30, 1.0), (1e-45, 1e-45)])
@pytest.mark.parametrize("shape", [(3, 64), (2, 203), (17, 40)])
def test_tiny_discounts_keep_infinities_infinite(gamma, lam, shape):
    """With gamma*lam near 1e-6 (or below float32's range), the powers of the coefficient
    in an 8-step tile underflowed to 0, and 0 * inf gave NaN where the reference keeps inf
    (issue 11, item 10). A nonzero coefficient now never rounds to 0."""
    r, v, nv, term, trunc, mask = _poisoned_inputs(*shape, 11, float("inf"))
    for got, want in _all_scans(r, v, nv, term, trunc, mask, gamma, lam):
        assert_close(got, want)


@pytest.mark.parametrize("gamma,lam", [(0.0, 0.9), (0.9, 0.0), (0.0, 0.0)])
def test_a_zero_discount_reads_nothing_behind_it(backend, gamma, lam):
    """A zero coefficient on the carry is a cut, as an episode boundary is: the NaN and
    inf of later steps are not read (the reference documents the same)."""
    r, v, nv, term, trunc, mask = _poisoned_inputs(4, 100, 3, float("inf"))
    for got, want in _all_scans(r, v, nv, term, trunc, mask, gamma, lam):
        assert_close(got, want)
    clean = torch.randn(1, 9)
    poisoned = clean.clone()
    poisoned[0, 5] = float("nan")
    no_dones = torch.zeros(1, 9, dtype=torch.bool)
    out = rlkern.discounted_returns(poisoned, no_dones, 0.0)
    assert torch.equal(out[0, :5], clean[0, :5])
    adv, _ = rlkern.gae(poisoned, torch.zeros(1, 9), no_dones, 0.9, 0.0)
    assert torch.isfinite(adv[0, :5]).all() and adv[0, 5].isnan()


# --- tensor subclasses (issue 11, item 3) ------------------------------------------------

class _Sub(torch.Tensor):
    """A tensor subclass standing in for any wrapper whose data pointer is not its data."""


def _op_calls():
    """(op name, argument name, call(make)) where make(name, tensor) may swap the tensor
    named `name` for another object: every tensor argument of every op, out= included."""
    B, T = 3, 20
    base = dict(rewards=torch.randn(B, T), values=torch.randn(B, T), next_values=torch.randn(B, T),
                terminated=torch.zeros(B, T, dtype=torch.bool), truncated=torch.zeros(B, T, dtype=torch.bool),
                bootstrap=torch.randn(B), out=torch.empty(B, T), out2=torch.empty(B, T),
                flat=torch.randn(12))
    return [
        ("discounted_returns", ["rewards", "terminated", "bootstrap", "out"],
         lambda m: rlkern.discounted_returns(m("rewards"), m("terminated"), 0.9, bootstrap=m("bootstrap"),
                                             out=m("out"))),
        ("gae", ["rewards", "values", "terminated", "bootstrap", "out", "out2"],
         lambda m: rlkern.gae(m("rewards"), m("values"), m("terminated"), 0.9, 0.9, bootstrap_value=m("bootstrap"),
                              out=(m("out"), m("out2")))),
        ("gae", ["next_values", "truncated"],
         lambda m: rlkern.gae(m("rewards"), m("values"), m("terminated"), 0.9, 0.9, next_values=m("next_values"),
                              truncated=m("truncated"))),
        ("lambda_returns", ["rewards", "next_values", "terminated", "truncated", "out"],
         lambda m: rlkern.lambda_returns(m("rewards"), m("next_values"), m("terminated"), 0.9, 0.9,
                                         truncated=m("truncated"), out=m("out"))),
        ("masked_gae", ["rewards", "values", "terminated", "out", "out2"],
         lambda m: rlkern.masked_gae(m("rewards"), m("values"), m("terminated"), 0.9, 0.9, out=(m("out"), m("out2")))),
        ("group_advantages", ["flat"], lambda m: rlkern.group_advantages(m("flat"), 4)),
    ], base


_ARG_NAMES = {"terminated": ("terminated", "dones", "mask"), "rewards": ("rewards", "token_rewards"),
              "bootstrap": ("bootstrap", "bootstrap_value"), "out": ("out", r"out\[0\]"), "out2": (r"out\[1\]",),
              "flat": ("rewards",)}


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_tensor_subclasses_get_a_type_error_naming_the_argument(backend_name):
    calls, base = _op_calls()
    with rlkern.use_backend(backend_name):
        for op, names, call in calls:
            call(lambda n: base[n])  # the plain call works
            for name in names:
                swapped = lambda n: base[n].as_subclass(_Sub) if n == name else base[n]  # noqa: E731
                pattern = "|".join(_ARG_NAMES.get(name, (name,)))
                with pytest.raises(TypeError, match=rf"^({pattern}) is a .*_Sub, a tensor subclass"):
                    call(swapped)


def test_a_dtensor_among_plain_tensors_is_a_value_error_naming_them():
    """DTensor calls run on the local shards (tests/test_dtensor.py); one DTensor mixed with
    plain tensors is ambiguous (which rows are this rank's?) and is refused by name."""
    from helpers import run_isolated

    proc = run_isolated("""
import os, sys, re
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 2000), RANK="0", WORLD_SIZE="1")
import torch, torch.distributed as dist
from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor
sys.path.insert(0, TESTS_DIR)
import test_returns as t
dist.init_process_group("gloo")
mesh = DeviceMesh("cpu", [0])
calls, base = t._op_calls()
checked = 0
for op, names, call in calls:
    for name in names:
        placement = Shard(0) if base[name].dim() else Replicate()
        dt = distribute_tensor(base[name], mesh, [placement])
        try:
            call(lambda n: dt if n == name else base[n])
        except ValueError as e:
            assert re.search(r"is a plain tensor of shape .* while other arguments are DTensors", str(e)), str(e)
            checked += 1
        else:
            if len(names) > 1:  # a lone DTensor argument is a supported DTensor call
                raise AssertionError(f"{op}: a DTensor {name} mixed with plain tensors was accepted")
dist.destroy_process_group()
print("ok", checked)
""".replace("TESTS_DIR", repr(__import__("os").path.dirname(__file__))), timeout=120)
    assert "ok" in proc.stdout
