"""token_logprobs and linear_token_logprobs against the float64 log_softmax + gather reference."""

import math

import pytest
import torch

import rlkern
from rlkern.logprobs import linear_token_logprobs, token_logprobs
from rlkern.reference import logprobs as ref

from helpers import CPU_BACKENDS, GRAD_TOL, VALUE_TOL, assert_close, needs_cuda, run_with_baseline_isa

# The Triton interpreter evaluates masked-out lanes too (numpy warns about their -inf/NaN).
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

BACKENDS = ["reference"] + CPU_BACKENDS
# The gradient of bf16/fp16 logits is written in that dtype: one ulp of it (the Triton
# interpreter truncates where a GPU rounds to nearest).
GRAD_TOL_BY_DTYPE = {torch.float32: GRAD_TOL, torch.float64: GRAD_TOL, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _run(backend, logits, targets, seed=0, **kw):
    """(logp, entropy, grad of the logits) under random upstream gradients."""
    x = logits.detach().clone().requires_grad_()
    gen = torch.Generator().manual_seed(seed)
    g_lp = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    with rlkern.use_backend(backend):
        lp, ent = token_logprobs(x, targets, return_entropy=True, **kw)
    # -inf log-probs (targets outside a top-k/top-p set) have zero gradient by definition.
    g_lp, g_ent = g_lp.to(lp.device, lp.dtype), g_ent.to(ent.device, ent.dtype)
    loss = torch.where(torch.isfinite(lp), lp * g_lp, 0.0).sum() + (ent * g_ent).sum()
    loss.backward()
    return lp, ent, x.grad


def _check(backend, logits, targets, **kw):
    lp, ent, grad = _run(backend, logits, targets, **kw)
    lp_r, ent_r, grad_r = _run("reference", logits.detach().double(), targets, **kw)
    expected_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert lp.dtype == expected_dtype and ent.dtype == expected_dtype
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert_close(lp, lp_r, VALUE_TOL, "logp")
    assert_close(ent, ent_r, VALUE_TOL, "entropy")
    _assert_grad_close(grad, grad_r, GRAD_TOL_BY_DTYPE[logits.dtype])
    return lp, ent, grad


def _assert_grad_close(grad, grad_r, tol):
    # Upstream gradients are O(1), so gradient entries are O(1) unless they cancel
    # exactly (a uniform distribution's entropy gradient is 0): the relative scale has a
    # floor of 1e-3 so that such cases compare float32 noise against something sensible.
    assert grad.shape == grad_r.shape
    if grad_r.numel() == 0:
        return
    if grad_r.abs().max() < 1e-3:
        assert (grad.double() - grad_r).abs().max() <= tol * 1e-3, "grad"
    else:
        assert_close(grad, grad_r, tol, "grad")


def _logits(shape, dtype=torch.float32, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _targets(shape, V, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, shape, generator=gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 7, 1000, 32000])
def test_values_and_grads(backend, dtype, V):
    rows = 3 if V >= 32000 else 6
    _check(backend, _logits((rows, V), dtype), _targets((rows,), V), temperature=0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_vocabulary_cpu(dtype):
    V = 151936
    logits = _logits((2, V), dtype, scale=4.0)
    _check("cpu", logits, torch.tensor([5, V - 1]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float16_and_float64(backend):
    _check(backend, _logits((4, 300), torch.float16), _targets((4,), 300))
    lp, _, grad = _check(backend, _logits((4, 300), torch.float64), _targets((4,), 300), temperature=1.3)
    lp_r = torch.log_softmax(_logits((4, 300), torch.float64) / 1.3, -1).gather(1, _targets((4,), 300)[:, None])[:, 0]
    assert_close(lp, lp_r, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature(backend, temperature):
    _check(backend, _logits((5, 777)), _targets((5,), 777), temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    V = 3000
    x = _logits((6, V), scale=1.0)
    x[0] *= 1e4  # huge spread: a near one-hot distribution
    x[1] += 1e4  # huge offset
    x[2, ::3] = float("-inf")  # -inf entries
    x[3] = 0.25  # all equal: uniform
    x[4, 1:] = float("-inf")  # a single finite entry
    x[5, :V // 2] = -1e30
    targets = torch.tensor([int(x[0].argmax()), 17, 1, 123, 0, V - 1])
    lp, ent, grad = _check(backend, x, targets)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    assert_close(lp[3], torch.tensor(-math.log(V)), 1e-6)
    assert_close(ent[3], torch.tensor(math.log(V)), 1e-6)
    assert lp[4] == 0 and ent[4] == 0
    assert (grad[2, ::3] == 0).all() and (grad[4] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nonfinite_rows_give_nan(backend):
    x = _logits((3, 50))
    x[0] = float("-inf")
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    with rlkern.use_backend(backend):
        lp, ent = token_logprobs(x, torch.tensor([1, 2, 3]), return_entropy=True)
    assert torch.isnan(lp).all() and torch.isnan(ent).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ignore_index(backend, dtype):
    x = _logits((2, 4, 500), dtype)
    targets = _targets((2, 4), 500)
    targets[0, 1] = -100
    targets[1, 3] = -100
    x[0, 1] = float("nan")  # ignored rows may hold anything
    lp, ent, grad = _check(backend, x, targets)
    assert lp[0, 1] == 0 and lp[1, 3] == 0 and ent[0, 1] == 0 and ent[1, 3] == 0
    assert (grad[0, 1] == 0).all() and (grad[1, 3] == 0).all()
    _check(backend, x, torch.where(targets == -100, 499, targets), ignore_index=499)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shapes(backend):
    V = 97
    _check(backend, _logits((V,)), torch.tensor(3))  # 1-D logits, 0-D target
    _check(backend, _logits((2, 3, V)), _targets((2, 3), V))
    _check(backend, _logits((2, 2, 2, V)), _targets((2, 2, 2), V))
    _check(backend, _logits((0, V)), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous(backend, dtype):
    V = 300
    base = _logits((3, 6, V), dtype)
    _check(backend, base[:, :-1], _targets((3, 5), V))  # the LM shift: rows read in place
    _check(backend, base[:, ::2], _targets((3, 3), V))
    _check(backend, base[::2, 1:4], _targets((2, 3), V))
    _check(backend, base.transpose(0, 1), _targets((6, 3), V))
    wide = _logits((4, 2 * V), dtype)
    _check(backend, wide[:, ::2], _targets((4,), V))  # strided vocabulary: copied once
    _check(backend, _logits((V, 4), dtype).t(), _targets((4,), V))
    _check(backend, base[:, :-1], _targets((3, 5), V).t().contiguous().t())
    _check(backend, base[:, :-1], _targets((3, 5), V), top_k=20, top_p=0.9)  # the kept set row by row


def _hf_kept(z, top_k=None, top_p=None):
    """The kept set of HF's TopK/TopPLogitsWarper (and vLLM's apply_top_k_top_p), written
    out here as the sampler does it: ascending sort, drop cumulative mass <= 1 - p."""
    z = z.double()
    kept = torch.ones_like(z, dtype=torch.bool)
    if top_k is not None:
        kept &= z >= torch.topk(z, min(top_k, z.shape[-1]), dim=-1).values[..., -1:]
    if top_p is not None:
        masked = torch.where(kept, z, float("-inf"))
        values, order = torch.sort(masked, dim=-1)
        cum = torch.softmax(values, -1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[..., -1] = False
        kept &= ~remove.scatter(-1, order, remove)
    return kept


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k,top_p", [(1, None), (5, None), (40, 0.8), (None, 0.3), (None, 0.95), (10_000, 1.0)])
def test_top_k_top_p(backend, dtype, top_k, top_p):
    V, rows, temperature = 200, 8, 0.8
    # Distinct logits, exact in bf16 (k / 16 for integers k < 256): without ties the
    # sampler's kept set is unambiguous and must be ours exactly.
    gen = torch.Generator().manual_seed(2)
    x = torch.stack([torch.randperm(V, generator=gen) for _ in range(rows)]).double().div(16).sub(6).to(dtype)
    z = x.double() / temperature
    kept = _hf_kept(z, top_k, top_p)
    # Half the targets inside the kept set, half outside (where one exists).
    gen = torch.Generator().manual_seed(3)
    targets = torch.empty(rows, dtype=torch.long)
    for i in range(rows):
        pool = kept[i] if i % 2 == 0 or kept[i].all() else ~kept[i]
        idx = pool.nonzero()[:, 0]
        targets[i] = idx[torch.randint(len(idx), (1,), generator=gen)]
    lp, ent, grad = _check(backend, x, targets, temperature=temperature, top_k=top_k, top_p=top_p)
    inside = kept.gather(1, targets[:, None])[:, 0]
    assert torch.isfinite(lp[inside]).all() and (lp[~inside] == float("-inf")).all()
    # The renormalised distribution over the sampler's set, written directly.
    lp_direct = torch.log_softmax(torch.where(kept, z, float("-inf")), -1).gather(1, targets[:, None])[:, 0]
    assert_close(torch.where(inside, lp.double(), 0.0), torch.where(inside, lp_direct, 0.0), VALUE_TOL)
    assert (grad.double()[~kept] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_top_p_ties_at_the_boundary(backend):
    # Row 0: k = 2 cuts inside the tie group {3, 3, 3}: all three are kept.
    # Row 1: probabilities of the group {2, 2} are 0.35 each; top_p = 0.2 ends inside it,
    # where a sort-based sampler would keep one of the two arbitrarily: both are kept.
    # Row 2: top_p = 0.8 needs the second group {1, 1}: both kept, the rest dropped.
    x = torch.tensor([[3.0, 1.0, 3.0, 0.0, 3.0, -1.0],
                      [2.0, 1.0, 1.0, 2.0, 0.0, -5.0],
                      [2.0, 1.0, 1.0, 2.0, 0.0, -5.0]])
    cases = [(0, dict(top_k=2), [0, 2, 4]), (1, dict(top_p=0.2), [0, 3]), (2, dict(top_p=0.8), [0, 1, 2, 3])]
    for row, kw, kept in cases:
        for t in range(6):
            lp, ent, grad = _check(backend, x[row:row + 1], torch.tensor([t]), **kw)
            zk = x[row, kept].double()
            if t in kept:
                assert_close(lp[0], (x[row, t] - torch.logsumexp(zk, 0)).float(), 1e-6)
            else:
                assert lp[0] == float("-inf")
            p = torch.softmax(zk, 0)
            assert_close(ent[0], -(p * p.log()).sum().float(), 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_top_k_larger_than_finite_entries(backend):
    x = _logits((2, 20))
    x[:, 5:] = float("-inf")
    _check(backend, x, torch.tensor([1, 2]), top_k=10)
    _check(backend, x, torch.tensor([1, 2]), top_p=0.999)


def test_returns_only_logp_without_entropy():
    x = _logits((3, 40)).requires_grad_()
    lp = token_logprobs(x, _targets((3,), 40))
    assert isinstance(lp, torch.Tensor) and lp.shape == (3,)
    lp.sum().backward()
    expected = torch.log_softmax(x.detach().double(), -1)
    onehot = torch.nn.functional.one_hot(_targets((3,), 40), 40).double()
    assert_close(x.grad, onehot - expected.exp(), GRAD_TOL)


def test_entropy_only_gradient():
    x = _logits((3, 40)).requires_grad_()
    _, ent = token_logprobs(x, _targets((3,), 40), return_entropy=True)
    ent.sum().backward()
    x64 = x.detach().double().requires_grad_()
    p = torch.softmax(x64, -1)
    (-(p * p.log()).sum()).backward()
    assert_close(x.grad, x64.grad, GRAD_TOL)


def test_bad_inputs():
    x = _logits((2, 5))
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(x, torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(x, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="logits"):
        token_logprobs(torch.ones(2, 5, dtype=torch.long), t)
    with pytest.raises(TypeError, match="targets"):
        token_logprobs(x, t.float())
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(x, t[:, None])
    for p in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="top_p"):
            token_logprobs(x, t, top_p=p)
    with pytest.raises(ValueError, match="top_k"):
        token_logprobs(x, t, top_k=0)
    with pytest.raises(TypeError, match="top_k"):
        token_logprobs(x, t, top_k=2.5)
    for temp in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(x, t, temperature=temp)
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(torch.zeros(2, 0), t)
    with pytest.raises(TypeError, match="logits"):
        token_logprobs([[1.0, 2.0]], t)


def test_no_full_size_float32_buffer():
    """The C++ path allocates nothing of the logits' size but the gradient."""
    from torch.profiler import ProfilerActivity, profile

    N, V = 64, 4096
    x = _logits((N, V), torch.bfloat16).requires_grad_()
    t = _targets((N,), V)
    with rlkern.use_backend("cpu"), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        lp, ent = token_logprobs(x, t, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    grad_bytes = N * V * 2
    assert max(sizes) <= grad_bytes
    assert sum(s for s in sizes if s != grad_bytes) < 0.05 * grad_bytes


# ----------------------------------------------------------------------------- linear


def _linear_case(N, H, V, dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=gen, dtype=torch.float64)).to(dtype)
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) / math.sqrt(H) * 3).to(dtype)
    b = (torch.randn(V, generator=gen, dtype=torch.float64)).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[1] = -100
    return hidden, weight, b, targets


def _linear_grads(fn, hidden, weight, bias, targets, **kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    gen = torch.Generator().manual_seed(7)
    lp, ent = fn(leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=True, **kw)
    g1 = torch.randn(lp.shape, generator=gen, dtype=torch.float64).to(lp.dtype)
    g2 = torch.randn(lp.shape, generator=gen, dtype=torch.float64).to(lp.dtype)
    ((lp * g1).sum() + (ent * g2).sum()).backward()
    return lp, ent, [leaf.grad if leaf is not None else None for leaf in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_token_logprobs(backend, bias):
    hidden, weight, b, targets = _linear_case(37, 16, 1000, torch.float32, bias)
    with rlkern.use_backend(backend):
        lp, ent, grads = _linear_grads(linear_token_logprobs, hidden, weight, b, targets, temperature=0.9,
                                       chunk_tokens=16, chunk_vocab=300)
    lp_r, ent_r, grads_r = _linear_grads(ref.linear_token_logprobs, hidden.double(), weight.double(),
                                         b.double() if b is not None else None, targets, temperature=0.9)
    assert_close(lp, lp_r, VALUE_TOL, "logp")
    assert_close(ent, ent_r, VALUE_TOL, "entropy")
    for name, g, gr in zip(("hidden", "weight", "bias"), grads, grads_r):
        if gr is not None:
            assert g.dtype == torch.float32
            assert_close(g, gr, GRAD_TOL, name)
    assert lp[1] == 0 and ent[1] == 0 and (grads[0][1] == 0).all()


def test_linear_token_logprobs_bf16_and_default_chunks():
    hidden, weight, b, targets = _linear_case(20, 32, 3000, torch.bfloat16, True)
    lp, ent, grads = _linear_grads(linear_token_logprobs, hidden, weight, b, targets)
    lp_r, ent_r, grads_r = _linear_grads(ref.linear_token_logprobs, hidden.double(), weight.double(), b.double(),
                                         targets)
    # bf16 matmul products round to bf16 in torch before the float32 log-softmax.
    assert_close(lp, lp_r, 2e-2, "logp")
    assert_close(ent, ent_r, 2e-2, "entropy")
    for name, g, gr in zip(("hidden", "weight", "bias"), grads, grads_r):
        assert g.dtype == torch.bfloat16
        assert_close(g, gr, 2e-2, name)


def test_linear_bad_inputs():
    hidden, weight, b, targets = _linear_case(4, 8, 50, torch.float32, True)
    with pytest.raises(ValueError, match="weight"):
        linear_token_logprobs(hidden, weight[:, :7], targets)
    with pytest.raises(ValueError, match="bias"):
        linear_token_logprobs(hidden, weight, targets, bias=b[:10])
    with pytest.raises(ValueError, match="targets"):
        linear_token_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="targets"):
        linear_token_logprobs(hidden, weight, torch.full((4,), 50))
    with pytest.raises(TypeError, match="weight"):
        linear_token_logprobs(hidden, weight.double(), targets)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda(dtype):
    V = 151936  # not a multiple of either block size
    logits = _logits((4, 3, V), dtype, scale=4.0)
    targets = _targets((4, 3), V)
    targets[1, 2] = -100
    x = logits.cuda()[:, :2]  # non-contiguous rows, read in place
    t = targets[:, :2].cuda()
    lp, ent, grad = _run("auto", x, t, temperature=0.9)
    lp_r, ent_r, grad_r = _run("reference", logits[:, :2].double(), targets[:, :2], temperature=0.9)
    assert_close(lp, lp_r, VALUE_TOL, "logp")
    assert_close(ent, ent_r, VALUE_TOL, "entropy")
    _assert_grad_close(grad.cpu(), grad_r, GRAD_TOL_BY_DTYPE[dtype])
    lp_k, _, _ = _run("auto", x, t, top_k=50, top_p=0.9)
    lp_kr, _, _ = _run("reference", logits[:, :2].double(), targets[:, :2], top_k=50, top_p=0.9)
    assert_close(lp_k, lp_kr, VALUE_TOL, "logp top-k/top-p")


def test_baseline_x86_build_matches(tmp_path):
    """The kernels without AVX2 (the same source compiled for baseline x86-64) agree too."""
    run_with_baseline_isa(tmp_path, "test_logprobs", """
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    t._check('cpu', t._logits((5, 3001), dtype), t._targets((5,), 3001), temperature=0.8)
    t._check('cpu', t._logits((5, 300), dtype), t._targets((5,), 300), top_k=7, top_p=0.9)
""")


# ----------------------------------------------------------------------------- audit regressions (issue 11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_temperature(backend):
    """1/T near the float32 limit (it used to overflow to inf: all NaN) and logits whose
    quotient by T overflows float32 (it used to give NaN): the distribution is that of
    (x - max) / T, here all mass on the row's largest logits."""
    V = 40
    x = _logits((4, V))
    x[1, 7] = x[1].max()  # a two-way tie at the maximum
    x[2] = x[2] * 1e37  # x / T overflows at any T <= 1
    x[3, :V // 2] = float("-inf")
    targets = x.argmax(-1)
    for temperature in (2.0**-126, 3e-38, 1e-30, 1e-6):
        lp, ent, grad = _check(backend, x, targets, temperature=temperature)
        expected = torch.tensor([0.0, -math.log(2), 0.0, 0.0])
        assert_close(lp, expected, 1e-6, "logp")
        assert_close(ent, -expected, 1e-6, "entropy")
        assert torch.isfinite(grad).all() and (grad[[0, 2, 3]] == 0).all()
    # Other targets: a huge negative log-prob, -inf where it overflows float32.
    others = (targets + 1) % V
    with rlkern.use_backend(backend):
        lp = token_logprobs(x, others, temperature=2.0**-126)
    lp_r = ref.token_logprobs(x.double(), others, temperature=2.0**-126)
    assert_close(lp, lp_r.float(), 1e-6, "logp")
    assert (lp < -1e30).all()


def test_temperature_out_of_range():
    x, t = _logits((2, 5)), torch.tensor([1, 2])
    hidden, weight, _, targets = _linear_case(4, 8, 50, torch.float32, False)
    for temp in (1e-39, 2.0**-127, 5e-324, 2.0**127, 1e300, 10**400):
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(x, t, temperature=temp)
        with pytest.raises(ValueError, match="temperature"):
            linear_token_logprobs(hidden, weight, targets, temperature=temp)
        with pytest.raises(ValueError, match="temperature"):
            ref.token_logprobs(x, t, temperature=temp)
    with pytest.raises(TypeError, match="temperature"):
        token_logprobs(x, t, temperature="hot")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_tiny_temperature(backend):
    # Small integers: every chunk product is exact, so the argmax is unambiguous.
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randint(-3, 4, (6, 8), generator=gen).float()
    weight = torch.randint(-3, 4, (300, 8), generator=gen).float()
    logits = hidden.double() @ weight.double().t()
    targets = logits.argmax(-1)
    ties = (logits == logits.max(-1, keepdim=True).values).sum(-1).double()
    with rlkern.use_backend(backend):
        lp, ent = linear_token_logprobs(hidden, weight, targets, temperature=2.0**-126, return_entropy=True,
                                        chunk_tokens=4, chunk_vocab=128)
    assert_close(lp, -ties.log(), 1e-6, "logp")
    assert_close(ent, ties.log(), 1e-6, "entropy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top", [{}, {"top_k": 3}, {"top_p": 0.5}, {"top_k": 3, "top_p": 0.5}])
def test_nonfinite_rows_follow_the_reference_docstring(backend, top):
    """A row with NaN, +inf or only -inf gives NaN logp and NaN entropy on every path,
    the reference included (it used to treat NaN as -inf and give entropy -0.0 for a row
    of -inf); -inf entries elsewhere are tokens of probability 0."""
    x = _logits((5, 50))
    x[0] = float("-inf")
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    x[3, 40] = float("nan")  # NaN away from the target, beyond any top-k set
    x[4, ::2] = float("-inf")  # a normal row
    targets = torch.tensor([1, 2, 3, 4, int(x[4].argmax())])
    with rlkern.use_backend(backend):
        lp, ent = token_logprobs(x, targets, return_entropy=True, **top)
    assert torch.isnan(lp[:4]).all() and torch.isnan(ent[:4]).all()
    assert torch.isfinite(lp[4]) and torch.isfinite(ent[4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_row_gradients_are_nan(backend):
    x = _logits((3, 20))
    x[0, 3] = float("nan")
    x[1] = float("-inf")
    lp, ent, grad = _run(backend, x, torch.tensor([1, 2, 3]))
    assert torch.isnan(grad[:2]).all() and torch.isfinite(grad[2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_dtypes(backend):
    x = _logits((3, 100))
    t = torch.tensor([5, 99, 200])
    expected = ref.token_logprobs(x.double(), torch.tensor([5, 99, -100]), ignore_index=-100)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        ti = t.to(dtype) if dtype != torch.int8 else torch.tensor([5, 99, -100], dtype=dtype)
        ignore = -100 if dtype == torch.int8 else 200
        with rlkern.use_backend(backend):
            lp = token_logprobs(x, ti, ignore_index=ignore)
        assert_close(lp, expected, VALUE_TOL, str(dtype))
    for dtype in (torch.uint16, torch.uint32, torch.uint64, torch.bool, torch.float32):
        with pytest.raises(TypeError, match="targets"):
            with rlkern.use_backend(backend):
                token_logprobs(x, t.to(dtype))
        with pytest.raises(TypeError, match="targets"):
            ref.token_logprobs(x, t.to(dtype))


def test_linear_target_dtypes():
    hidden, weight, b, targets = _linear_case(4, 8, 50, torch.float32, True)
    targets[1] = 3
    lp = linear_token_logprobs(hidden, weight, targets, bias=b)
    lp8 = linear_token_logprobs(hidden, weight, targets.to(torch.uint8), bias=b)
    assert torch.equal(lp, lp8)
    with pytest.raises(TypeError, match="targets"):
        linear_token_logprobs(hidden, weight, targets.to(torch.uint16), bias=b)


def test_huge_int_arguments_are_named():
    """Python ints beyond int64 used to raise a bare OverflowError."""
    x, t = _logits((2, 5)), torch.tensor([1, 2])
    hidden, weight, _, targets = _linear_case(4, 8, 50, torch.float32, False)
    for big in (2**70, -2**70, 2**63):
        with pytest.raises(ValueError, match="ignore_index"):
            token_logprobs(x, t, ignore_index=big)
        with pytest.raises(ValueError, match="ignore_index"):
            linear_token_logprobs(hidden, weight, targets, ignore_index=big)
        with pytest.raises(ValueError, match="chunk_tokens"):
            linear_token_logprobs(hidden, weight, targets, chunk_tokens=-big if big > 0 else big)
    with pytest.raises(TypeError, match="ignore_index"):
        token_logprobs(x, t, ignore_index=1.5)
    with pytest.raises(TypeError, match="chunk_vocab"):
        linear_token_logprobs(hidden, weight, targets, chunk_vocab=2.5)
    with pytest.raises(ValueError, match="top_p"):
        token_logprobs(x, t, top_p=10**400)
    # A top_k beyond any vocabulary keeps everything, with top-p too.
    for backend in CPU_BACKENDS:
        with rlkern.use_backend(backend):
            assert_close(token_logprobs(x, t, top_k=2**70, top_p=0.5), token_logprobs(x, t, top_p=0.5), 0.0)
            assert_close(token_logprobs(x, t, top_k=2**70), token_logprobs(x, t), 0.0)
    # Chunks larger than the problem are one chunk; beyond int64 they are named.
    assert_close(linear_token_logprobs(hidden, weight, targets, chunk_tokens=2**40, chunk_vocab=2**62),
                 linear_token_logprobs(hidden, weight, targets), 1e-6)
    with pytest.raises(ValueError, match="chunk_vocab"):
        linear_token_logprobs(hidden, weight, targets, chunk_vocab=2**70)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_linear_empty_batch_gradients_are_zero(backend):
    """No tokens: the weight gradient is zero (it used to be an uninitialised buffer)."""
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    with rlkern.use_backend(backend):
        lp, ent = linear_token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), bias=bias,
                                        return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert lp.shape == (0,) and (weight.grad == 0).all() and (bias.grad == 0).all()


# ----------------------------------------------------------------------------- soft-capping and is_top1 (issue 14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_softcap_values_and_grads(backend, dtype, temperature):
    """Logits of scale 40 against a cap of 10: many sit deep in tanh's saturation."""
    V = 3001  # two C++ blocks, not a multiple of the vector width
    logits = _logits((5, V), dtype, scale=40.0)
    lp, ent, grad = _check(backend, logits, _targets((5,), V), temperature=temperature, softcap=10.0)
    # the cap changes the answer (the test would pass without it otherwise)
    lp_plain = _run("reference", logits.double(), _targets((5,), V), temperature=temperature)[0]
    assert (lp.double() - lp_plain).abs().max() > 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_large_and_infinite_logits(backend):
    """tanh saturates: +-inf and +-1e30 logits become +-cap (finite, as torch.tanh makes
    them), their gradient through the cap is 0, and the rows are not NaN."""
    V = 40
    logits = _logits((4, V), scale=3.0)
    logits[0, 3] = float("inf")
    logits[1, :] = float("-inf")
    logits[1, 7] = 0.0
    logits[2, 5] = 1e30
    logits[2, 6] = -1e30
    logits[3, ::2] = 1e4
    targets = torch.tensor([3, 8, 5, 2])
    lp, ent, grad = _check(backend, logits, targets, softcap=2.5)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    assert grad[0, 3] == 0 and grad[2, 5] == 0 and grad[2, 6] == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softcap_small_logits_are_accurate(backend):
    """Near 0 tanh(u) ~ u: the polynomial branch keeps the relative accuracy of tiny logits
    (a formula through exp would lose it to 1 - e^-2u cancelling)."""
    logits = _logits((3, 500), scale=1e-3)
    _check(backend, logits, _targets((3,), 500), softcap=0.7, temperature=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_ignore_index_and_shapes(backend):
    logits = _logits((2, 3, 100), scale=20.0)
    targets = _targets((2, 3), 100)
    targets[0, 1] = -100
    logits[0, 1] = float("nan")  # an ignored row is never read
    lp, ent, grad = _check(backend, logits, targets, softcap=5.0)
    assert lp[0, 1] == 0 and ent[0, 1] == 0 and (grad[0, 1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_softcap(backend, bias, dtype):
    hidden, weight, b, targets = _linear_case(37, 16, 1000, dtype, bias)
    weight = weight * 4  # logits of scale ~12 against a cap of 3: saturated
    kw = dict(temperature=0.9, softcap=3.0)
    with rlkern.use_backend(backend):
        lp, ent, grads = _linear_grads(linear_token_logprobs, hidden, weight, b, targets, chunk_tokens=16,
                                       chunk_vocab=300, **kw)
    lp_r, ent_r, grads_r = _linear_grads(ref.linear_token_logprobs, hidden.double(), weight.double(),
                                         b.double() if b is not None else None, targets, **kw)
    # bf16: the chunk products round to bf16 before the cap, as hidden @ weight.T does.
    tol, gtol = (VALUE_TOL, GRAD_TOL) if dtype == torch.float32 else (2e-2, 2e-2)
    assert_close(lp, lp_r, tol, "logp")
    assert_close(ent, ent_r, tol, "entropy")
    for name, g, gr in zip(("hidden", "weight", "bias"), grads, grads_r):
        if gr is not None:
            assert g.dtype == dtype
            assert_close(g, gr, gtol, name)
    assert lp[1] == 0 and ent[1] == 0 and (grads[0][1] == 0).all()


def test_softcap_validation():
    logits, targets = _logits((2, 10)), _targets((2,), 10)
    hidden, weight, _, t = _linear_case(4, 8, 50, torch.float32, False)
    for bad in (0.0, -1.0, float("nan"), float("inf"), 10**400):
        with pytest.raises(ValueError, match="softcap"):
            token_logprobs(logits, targets, softcap=bad)
        with pytest.raises(ValueError, match="softcap"):
            linear_token_logprobs(hidden, weight, t, softcap=bad)
        with pytest.raises(ValueError, match="softcap"):
            ref.token_logprobs(logits, targets, softcap=bad)
    for bad in (True, [3.0], None.__class__):
        with pytest.raises(TypeError, match="softcap"):
            token_logprobs(logits, targets, softcap=bad)
    # an int is a number
    token_logprobs(logits, targets, softcap=3, top_p=1.0)


def _capped_direct(x, targets, cap, temperature, top_k, top_p):
    """Plain torch: cap in float64, the sampler's kept set of y / T (_hf_kept), log_softmax."""
    z = cap * torch.tanh(x.double() / cap) / temperature
    kept = _hf_kept(z, top_k, top_p)
    lp = torch.log_softmax(torch.where(kept, z, float("-inf")), -1).gather(1, targets[:, None])[:, 0]
    return kept, lp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k,top_p", [(1, None), (5, None), (40, 0.8), (None, 0.3), (None, 0.95)])
def test_softcap_with_top_k_top_p(backend, dtype, top_k, top_p):
    """softcap with a kept set (it used to be a ValueError): the set is that of the capped
    logits, top-p's mass under softmax(y / T), as vLLM's sampler sees Gemma-2's output."""
    V, rows, temperature, cap = 200, 8, 0.8, 4.0
    gen = torch.Generator().manual_seed(2)
    # Distinct logits in [-6, 6.5) (exact in bf16), well inside tanh's range for a cap of 4.
    x = torch.stack([torch.randperm(V, generator=gen) for _ in range(rows)]).double().div(16).sub(6).to(dtype)
    kept, lp_direct = _capped_direct(x, torch.zeros(rows, dtype=torch.long), cap, temperature, top_k, top_p)
    # the cap changes the kept set for top-p (so the test depends on taking it after the cap)
    if top_p is not None:
        assert not torch.equal(kept, _hf_kept(x.double() / temperature, top_k, top_p))
    gen = torch.Generator().manual_seed(3)
    targets = torch.empty(rows, dtype=torch.long)
    for i in range(rows):
        pool = kept[i] if i % 2 == 0 or kept[i].all() else ~kept[i]
        idx = pool.nonzero()[:, 0]
        targets[i] = idx[torch.randint(len(idx), (1,), generator=gen)]
    lp, ent, grad = _check(backend, x, targets, temperature=temperature, top_k=top_k, top_p=top_p, softcap=cap)
    _, lp_direct = _capped_direct(x, targets, cap, temperature, top_k, top_p)
    inside = kept.gather(1, targets[:, None])[:, 0]
    assert torch.isfinite(lp[inside]).all() and (lp[~inside] == float("-inf")).all()
    assert_close(torch.where(inside, lp.double(), 0.0), torch.where(inside, lp_direct, 0.0), VALUE_TOL)
    assert (grad.double()[~kept] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_top_k_saturated_ties(backend):
    """Logits that saturate to the same capped value are tied in the kept set: top_k=1
    keeps all of them (the raw logits would keep one), and +inf caps to the finite cap."""
    x = torch.tensor([[100.0, 200.0, 300.0, 0.0, 1.0, -50.0],
                      [float("inf"), 60.0, 1.0, 0.5, float("-inf"), 0.0],
                      [3.0, 2.0, 1.0, 0.0, -1.0, -2.0]])
    cap = 2.0
    for row, kw, kept in [(0, dict(top_k=1), [0, 1, 2]), (1, dict(top_k=2), [0, 1]),
                          (2, dict(top_k=2, top_p=0.5), [0]), (0, dict(top_p=0.7), [0, 1, 2])]:
        for t in range(6):
            lp, ent, grad = _check(backend, x[row:row + 1], torch.tensor([t]), softcap=cap, **kw)
            y = cap * torch.tanh(x[row].double() / cap)
            if t in kept:
                assert_close(lp[0], (y[t] - torch.logsumexp(y[kept], 0)).float(), 1e-6)
            else:
                assert lp[0] == float("-inf")
                assert grad[0, t] == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softcap_top_k_top_p_random_rows(backend):
    """Random logits (scale 8 against a cap of 5, the largest near saturation), against the
    reference and the plain torch formulation; a NaN row keeps everything."""
    V, rows, cap, temperature = 300, 6, 5.0, 0.7
    x = _logits((rows, V), scale=8.0, seed=5)
    x[3, 7] = float("inf")
    x[4, 11] = float("nan")
    targets = _targets((rows,), V, seed=6)
    for top in ({"top_k": 20}, {"top_p": 0.6}, {"top_k": 50, "top_p": 0.9}):
        lp, ent, grad = _check(backend, x, targets, temperature=temperature, softcap=cap, **top)
        kept, lp_direct = _capped_direct(x[[0, 1, 2, 3, 5]], targets[[0, 1, 2, 3, 5]], cap, temperature,
                                         top.get("top_k"), top.get("top_p"))
        finite = torch.isfinite(lp_direct)
        assert torch.equal(torch.isfinite(lp[[0, 1, 2, 3, 5]]), finite)
        assert_close(lp[[0, 1, 2, 3, 5]][finite], lp_direct[finite].float(), VALUE_TOL)
        assert torch.isnan(lp[4]) and torch.isnan(ent[4])


def _top1_case():
    """Rows with exact ties of the maximum (integer logits): the first index wins."""
    logits = torch.tensor([[1., 5., 2., 5., 0.],
                           [1., 5., 2., 5., 0.],
                           [1., 5., 2., 5., 0.],
                           [7., 7., 7., 7., 7.],
                           [7., 7., 7., 7., 7.],
                           [-3., -1., float("-inf"), -2., -1.],
                           [0., float("nan"), 9., 1., 0.],
                           [float("-inf")] * 5,
                           [2., 2., 3., 0., 0.]])
    targets = torch.tensor([1, 3, 2, 0, 4, 1, 2, 0, -100])
    expected = torch.tensor([True, False, False, True, False, True, False, False, False])
    return logits, targets, expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_top1_ties_first_index(backend, dtype):
    logits, targets, expected = _top1_case()
    with rlkern.use_backend(backend):
        lp, top1 = token_logprobs(logits.to(dtype), targets, return_top1=True)
        lp2, ent, top1_b = token_logprobs(logits.to(dtype), targets, return_entropy=True, return_top1=True)
    assert top1.dtype == torch.bool and top1.shape == targets.shape and not top1.requires_grad
    assert torch.equal(top1, expected) and torch.equal(top1_b, expected)
    assert torch.equal(lp, lp2) or torch.allclose(lp, lp2, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_matches_argmax_long_rows(backend):
    """Across blocks (V = 5000 > 2048): the maximum repeated in a later block, a target on
    either copy, random rows; against torch.argmax of the (capped) logits."""
    V = 5000
    logits = _logits((8, V), scale=3.0)
    targets = _targets((8,), V)
    logits[0, [100, 4000]] = 50.0
    targets[0] = 100
    logits[1, [100, 4000]] = 50.0
    targets[1] = 4000
    targets[2] = logits[2].argmax()
    logits[3, 2047:2049] = 60.0  # a tie across the block boundary
    targets[3] = 2048
    for softcap in (None, 4.0):
        capped = logits if softcap is None else softcap * torch.tanh(logits / softcap)
        expected = capped.argmax(-1) == targets
        assert expected[0] and not expected[1] and expected[2] and not expected[3]
        with rlkern.use_backend(backend):
            lp, top1 = token_logprobs(logits, targets, return_top1=True, softcap=softcap, temperature=0.5)
        assert torch.equal(top1, expected), softcap


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_top1_saturated_cap_ties(backend):
    """Distinct logits deep in the cap's saturation round to the same float32 cap: a tie,
    so the first of them is the argmax (as torch.argmax of the float32 capped logits)."""
    logits = torch.zeros(2, 300)
    logits[:, 10] = 400.0
    logits[:, 200] = 900.0
    targets = torch.tensor([10, 200])
    with rlkern.use_backend(backend):
        _, top1 = token_logprobs(logits, targets, return_top1=True, softcap=30.0)
        _, top1_plain = token_logprobs(logits, targets, return_top1=True)
    assert top1.tolist() == [True, False] and top1_plain.tolist() == [False, True]
    assert torch.equal(ref.token_logprobs(logits, targets, softcap=30.0, return_top1=True)[1], top1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_linear_top1_across_chunks(backend, softcap):
    """Integer hidden states and weights (exact products): the row maximum tied between
    vocabulary chunks and within one; ignored rows False."""
    gen = torch.Generator().manual_seed(3)
    N, H, V = 12, 8, 900
    hidden = torch.randint(-2, 3, (N, H), generator=gen).float()
    weight = torch.randint(-2, 3, (V, H), generator=gen).float()
    hidden[0] = torch.tensor([1., 2., 0., 0., 0., 0., 0., 0.])
    hidden[1] = torch.tensor([0., 0., 2., 1., 0., 0., 0., 0.])
    weight[[50, 640, 660]] = hidden[0] * 10  # the max of row 0 (50 against at most 6), in chunks 0, 2, 2
    weight[[301, 302]] = hidden[1] * 10  # the max of row 1, twice in chunk 1
    logits = hidden @ weight.t()
    capped = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[:6] = torch.tensor([50, 302, 0, 640, -100, 0])
    targets[2] = capped[2].argmax()
    expected = (capped.argmax(-1) == targets) & (targets != -100)
    assert expected[0] and not expected[1] and expected[2]
    with rlkern.use_backend(backend):
        lp, ent, top1 = linear_token_logprobs(hidden, weight, targets, return_entropy=True, return_top1=True,
                                              softcap=softcap, chunk_tokens=5, chunk_vocab=300)
        lp_only, top1_only = linear_token_logprobs(hidden, weight, targets, return_top1=True, softcap=softcap)
    assert torch.equal(top1, expected) and torch.equal(top1_only, expected)
    assert top1.dtype == torch.bool and not top1.requires_grad
    lp_r, ent_r = ref.linear_token_logprobs(hidden.double(), weight.double(), targets, return_entropy=True,
                                            softcap=softcap)
    assert_close(lp, lp_r, VALUE_TOL, "logp")
    assert_close(lp_only, lp_r, VALUE_TOL, "logp")


def test_top1_does_not_change_logp_or_grads():
    hidden, weight, b, targets = _linear_case(10, 8, 500, torch.float32, True)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    lp, top1 = linear_token_logprobs(leaves[0], leaves[1], targets, bias=b, return_top1=True, chunk_vocab=128)
    lp.sum().backward()
    leaves2 = [t.clone().requires_grad_() for t in (hidden, weight)]
    lp2 = linear_token_logprobs(leaves2[0], leaves2[1], targets, bias=b, chunk_vocab=128)
    lp2.sum().backward()
    assert torch.equal(lp, lp2)
    assert torch.equal(leaves[0].grad, leaves2[0].grad) and torch.equal(leaves[1].grad, leaves2[1].grad)


def test_softcap_baseline_x86_build_matches(tmp_path):
    """The soft cap's vector tanh and the top-1 tracking in the baseline x86-64 build too."""
    run_with_baseline_isa(tmp_path, "test_logprobs", """
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    t._check('cpu', t._logits((5, 3001), dtype, scale=40.0), t._targets((5,), 3001), temperature=0.8, softcap=10.0)
t.test_top1_ties_first_index('cpu', torch.float32)
t.test_top1_matches_argmax_long_rows('cpu')
t.test_softcap_large_and_infinite_logits('cpu')
""")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_and_top1_triton_on_cuda(dtype):
    V = 151936
    logits = _logits((3, 2, V), dtype, scale=40.0)
    targets = _targets((3, 2), V)
    targets[0] = logits[0].float().argmax(-1)
    targets[1, 1] = -100
    lp, ent, grad = _run("auto", logits.cuda(), targets.cuda(), temperature=0.9, softcap=30.0)
    lp_r, ent_r, grad_r = _run("reference", logits.double(), targets, temperature=0.9, softcap=30.0)
    assert_close(lp, lp_r, VALUE_TOL, "logp")
    assert_close(ent, ent_r, VALUE_TOL, "entropy")
    _assert_grad_close(grad.cpu(), grad_r, GRAD_TOL_BY_DTYPE[dtype])
    _, top1 = token_logprobs(logits.cuda(), targets.cuda(), return_top1=True, softcap=30.0)
    _, top1_r = ref.token_logprobs(logits.float(), targets, return_top1=True, softcap=30.0)
    assert torch.equal(top1.cpu(), top1_r) and top1[0].all()


# ----------------------------------------------------------------------------- linear head on the CPU: kept chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_kept_chunks_match_recompute(monkeypatch, dtype, bias):
    """The forward keeps chunk logits for the backward up to LINEAR_SAVED_LOGITS_BYTES;
    all kept, some kept (the budget ends inside the chunk loop) and none give the same
    bits, softcap and entropy included, and match the reference."""
    import rlkern.logprobs as lp_mod

    hidden, weight, b, targets = _linear_case(37, 16, 1000, dtype, bias)
    kw = dict(temperature=0.9, softcap=3.0, chunk_tokens=16, chunk_vocab=300)
    chunk_bytes = 16 * 300 * hidden.element_size()
    results = []
    for budget in (1 << 30, 5 * chunk_bytes + 7, 0):
        monkeypatch.setattr(lp_mod, "LINEAR_SAVED_LOGITS_BYTES", budget)
        results.append(_linear_grads(linear_token_logprobs, hidden, weight, b, targets, **kw))
    for lp, ent, grads in results[1:]:
        assert torch.equal(lp, results[0][0]) and torch.equal(ent, results[0][1])
        for g, g0 in zip(grads, results[0][2]):
            assert (g is None and g0 is None) or torch.equal(g, g0)
    lp_r, ent_r, grads_r = _linear_grads(ref.linear_token_logprobs, hidden.double(), weight.double(),
                                         b.double() if b is not None else None, targets, temperature=0.9,
                                         softcap=3.0)
    tol, gtol = (VALUE_TOL, GRAD_TOL) if dtype != torch.bfloat16 else (2e-2, 2e-2)
    assert_close(results[0][0], lp_r, tol, "logp")
    for g, gr in zip(results[0][2], grads_r):
        if gr is not None:
            assert_close(g, gr, gtol, "grad")


def test_linear_kept_chunks_survive_a_second_backward():
    """With retain_graph the kept chunks are read again, not overwritten by the first
    backward: the second backward's gradients equal the first's."""
    hidden, weight, b, targets = _linear_case(20, 8, 500, torch.float32, True)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    lp, ent = linear_token_logprobs(h, w, targets, bias=b, return_entropy=True, chunk_tokens=8, chunk_vocab=128)
    loss = lp.sum() + 0.5 * ent.sum()
    g1 = torch.autograd.grad(loss, (h, w), retain_graph=True)
    g2 = torch.autograd.grad(loss, (h, w))
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])


def test_linear_bf16_products_round_like_the_matmul():
    """bf16 on the CPU multiplies in float32 and rounds each product once: the log-probs
    equal token_logprobs of the logits computed in float32 and rounded to bf16."""
    hidden, weight, b, targets = _linear_case(33, 64, 700, torch.bfloat16, True)
    logits = torch.addmm(b.float(), hidden.float(), weight.float().t()).bfloat16()
    lp_direct = token_logprobs(logits, targets, temperature=0.8)
    lp = linear_token_logprobs(hidden, weight, targets, bias=b, temperature=0.8, chunk_tokens=10, chunk_vocab=256)
    assert_close(lp, lp_direct, 1e-6, "logp")
