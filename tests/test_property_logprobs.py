"""Property-based tests: token_logprobs and linear_token_logprobs against the float64
reference (values and gradients) on the C++ path and the Triton path (interpreter), over
random shapes, strides, dtypes, options and extreme logits (+-inf, NaN, 1e30, 3e38).

The "ci" profile (tests/conftest.py) keeps this module within a fixed budget; run
`pytest tests/test_property_logprobs.py --hypothesis-profile thorough` for more examples.
"""

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rlkern  # noqa: E402
from rlkern.logprobs import linear_token_logprobs, token_logprobs  # noqa: E402
from rlkern.reference import logprobs as ref  # noqa: E402

from helpers import CPU_BACKENDS  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

INF, NAN = float("inf"), float("nan")
SPECIALS = [INF, -INF, NAN, 1e30, -1e30, 3e38, -3e38]
# Gradients are written in the logits' dtype: about one ulp of it (the Triton
# interpreter truncates bf16 where a GPU rounds).
GRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 2**-7, torch.float16: 2**-9}
# Powers of two (and 1e-30) at the small end: 1/T is then exact in float32, so the
# kernels' products overflow exactly where the reference's do.
TEMPERATURES = [1.0, 0.7, 2.5, 2.0**-126, 2.0**-60, 1e-30, 2.0**-3, 2.0**100]
MODERATE_TEMPERATURES = [1.0, 0.7, 2.5, 0.25]


def _close(actual, expected, tol, floor, name):
    """Per row (last dim): non-finite entries at the same places with the same values;
    finite ones within tol x max(max |expected| of the row, floor)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    a = actual.detach().double().reshape(-1, actual.shape[-1] if actual.dim() else 1)
    e = expected.detach().double().reshape(a.shape)
    a_bad, e_bad = ~torch.isfinite(a), ~torch.isfinite(e)
    assert torch.equal(a_bad, e_bad), f"{name}: non-finite entries differ\n{a}\n{e}"
    assert torch.equal(a[a_bad].nan_to_num(0.0, 1.0, -1.0), e[e_bad].nan_to_num(0.0, 1.0, -1.0)), \
        f"{name}: inf/nan values differ"
    fin = ~e_bad
    scale = torch.where(fin, e.abs(), 0.0).amax(-1, keepdim=True).clamp_min(floor)
    err = torch.where(fin, (a - e).abs(), 0.0)
    assert (err <= tol * scale).all(), f"{name}: max rel err {float((err / scale).max()):.3e} > {tol}\n{a}\n{e}"


def _as_output_dtype(t, dtype):
    """The reference's float64 result rounded as the kernels' output is (float32 unless
    float64): overflow past the dtype's range is then inf in both."""
    return t if dtype == torch.float64 else t.to(dtype).double()


@st.composite
def logits_cases(draw):
    V = draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    lead = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    layout = draw(st.sampled_from(["contiguous", "shifted", "transposed", "strided_vocab"]))
    if layout == "shifted" and not lead:
        layout = "contiguous"
    if layout == "transposed" and len(lead) < 2:
        layout = "contiguous"
    if layout == "contiguous":
        base_shape = lead + (V,)
    elif layout == "shifted":  # logits[..., :-1, :] (the LM shift): rows read in place
        base_shape = lead[:-1] + (lead[-1] + 1, V)
    elif layout == "transposed":
        base_shape = (lead[1], lead[0]) + lead[2:] + (V,)
    else:  # every other vocabulary entry: copied once
        base_shape = lead + (2 * V,)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.1, 3.0, 1e4, 1e30]))
    x = torch.randn(base_shape, generator=gen, dtype=torch.float64) * scale
    flat = x.view(-1)
    if flat.numel():
        for pos, value in draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIALS)), max_size=3)):
            flat[pos % flat.numel()] = value
        if draw(st.booleans()) and x.dim() > 1 and x.shape[-2] > 0:
            x.view(-1, x.shape[-1])[0] = -INF  # a row of -inf
    x = x.to(dtype)
    if layout == "shifted":
        x = x[..., :-1, :]
    elif layout == "transposed":
        x = x.transpose(0, 1)
    elif layout == "strided_vocab":
        x = x[..., ::2]
    assert x.shape == lead + (V,)

    ignore_index = draw(st.sampled_from([-100, 0, V - 1, 2**40]))
    targets = torch.randint(0, V, lead, generator=gen)
    if targets.numel():
        ignored = torch.rand(lead, generator=gen) < draw(st.sampled_from([0.0, 0.3]))
        targets = torch.where(ignored, ignore_index, targets)
    if len(lead) >= 2 and draw(st.booleans()):
        targets = targets.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous targets
    temperatures = MODERATE_TEMPERATURES if dtype == torch.float16 else TEMPERATURES
    options = dict(temperature=draw(st.sampled_from(temperatures)), ignore_index=ignore_index,
                   top_k=draw(st.one_of(st.none(), st.integers(1, V + 2))),
                   top_p=draw(st.one_of(st.none(), st.just(1.0), st.floats(0.05, 0.999))))
    return x, targets, options, draw(st.integers(0, 2**31 - 1))


def _token_run(backend, x, targets, options, seed, return_entropy, finite=None):
    """(logp, entropy, grad) under random upstream gradients; ``finite`` marks the log-probs
    that enter the loss (default: the finite ones)."""
    leaf = x.detach().clone().requires_grad_()
    gen = torch.Generator().manual_seed(seed)
    g_lp = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    with rlkern.use_backend(backend):
        out = token_logprobs(leaf, targets, return_entropy=return_entropy, **options)
    lp, ent = out if return_entropy else (out, None)
    # -inf log-probs (targets outside a top-k/top-p set) have zero gradient by definition.
    finite = torch.isfinite(lp) if finite is None else finite
    loss = torch.where(finite, lp * g_lp.to(lp.dtype), 0.0).sum()
    if ent is not None:
        loss = loss + (ent * g_ent.to(ent.dtype)).sum()
    if leaf.numel():
        loss.backward()
    return lp, ent, leaf.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(case=logits_cases(), return_entropy=st.booleans())
def test_token_logprobs_matches_reference(backend, case, return_entropy):
    x, targets, options, seed = case
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    # The loss takes the log-probs that are finite in the output dtype: a float64 -4e38 is
    # -inf in float32 (the kernels' correctly rounded answer), and must drop out of both.
    with torch.no_grad():
        finite = torch.isfinite(_as_output_dtype(ref.token_logprobs(x.double(), targets, **options), out_dtype))
    lp, ent, grad = _token_run(backend, x, targets, options, seed, return_entropy, finite)
    lp_r, ent_r, grad_r = _token_run("reference", x.double(), targets, options, seed, return_entropy, finite)
    assert lp.dtype == out_dtype and lp.shape == targets.shape
    _close(lp.reshape(-1, 1), _as_output_dtype(lp_r, out_dtype).reshape(-1, 1), 1e-5, 1.0, "logp")
    if return_entropy:
        assert ent.dtype == out_dtype and ent.shape == targets.shape
        _close(ent.reshape(-1, 1), _as_output_dtype(ent_r, out_dtype).reshape(-1, 1), 1e-5, 1.0, "entropy")
    if x.numel():
        assert grad.dtype == x.dtype and grad.shape == x.shape
        _close(grad, _as_output_dtype(grad_r, x.dtype), GRAD_TOL[x.dtype], 1e-3, "grad")


@st.composite
def linear_cases(draw):
    N = draw(st.integers(0, 12))
    H = draw(st.integers(1, 6))
    V = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # Small integers: every product and sum is exact in each dtype, in any order, so the
    # chunked products equal the reference's full product exactly.
    hidden = torch.randint(-4, 5, (N, H), generator=gen).double()
    weight = torch.randint(-4, 5, (V, H), generator=gen).double()
    bias = torch.randint(-4, 5, (V,), generator=gen).double() if draw(st.booleans()) else None
    # Non-finite inputs propagate the same in any order (NaN, +-inf, inf - inf = NaN).
    for pos, value in draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from([INF, -INF, NAN])),
                                    max_size=2)):
        target = draw(st.sampled_from(["hidden", "bias"] if bias is not None else ["hidden"]))
        t = hidden if target == "hidden" else bias
        if t.numel():
            t.view(-1)[pos % t.numel()] = value
    if draw(st.booleans()):
        hidden = hidden.reshape(N, 1, H) if N else hidden.reshape(0, 2, H)
    lead = hidden.shape[:-1]
    ignore_index = draw(st.sampled_from([-100, 0]))
    targets = torch.randint(0, V, lead, generator=gen)
    if targets.numel():
        targets = torch.where(torch.rand(lead, generator=gen) < 0.25, ignore_index, targets)
    # (Not down to 2**-126 here: gradients of order 1/T ~ 1e38 summed by the matmuls
    # overflow float32 where the float64 reference does not; test_logprobs checks values.)
    options = dict(temperature=draw(st.sampled_from([1.0, 0.6, 3.0, 2.0**-20])),
                   ignore_index=ignore_index,
                   chunk_tokens=draw(st.one_of(st.none(), st.integers(1, 8))),
                   chunk_vocab=draw(st.one_of(st.none(), st.integers(1, 16))))
    return (hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), targets, options,
            draw(st.integers(0, 2**31 - 1)))


def _linear_run(fn, hidden, weight, bias, targets, options, seed, backend=None, finite=None):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    gen = torch.Generator().manual_seed(seed)
    g_lp = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    with rlkern.use_backend(backend or "auto"):
        lp, ent = fn(leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=True, **options)
    finite = torch.isfinite(lp) if finite is None else finite
    loss = (torch.where(finite, lp * g_lp.to(lp.dtype), 0.0).sum()
            + (ent * g_ent.to(ent.dtype)).sum())
    loss.backward()
    return lp, ent, [leaf.grad if leaf is not None else None for leaf in leaves]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(case=linear_cases())
def test_linear_token_logprobs_matches_reference(backend, case):
    hidden, weight, bias, targets, options, seed = case
    ref_options = {k: v for k, v in options.items() if not k.startswith("chunk")}
    ref_args = (hidden.double(), weight.double(), None if bias is None else bias.double(), targets)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    with torch.no_grad():  # log-probs finite in the output dtype enter the loss (see the token test)
        lp_64 = ref.linear_token_logprobs(ref_args[0], ref_args[1], targets, bias=ref_args[2], **ref_options)
        finite = torch.isfinite(_as_output_dtype(lp_64, out_dtype))
    lp, ent, grads = _linear_run(linear_token_logprobs, hidden, weight, bias, targets, options, seed, backend,
                                 finite)
    lp_r, ent_r, grads_r = _linear_run(ref.linear_token_logprobs, *ref_args, ref_options, seed, finite=finite)
    assert lp.dtype == out_dtype and lp.shape == targets.shape
    _close(lp.reshape(-1, 1), _as_output_dtype(lp_r, out_dtype).reshape(-1, 1), 1e-5, 1.0, "logp")
    _close(ent.reshape(-1, 1), _as_output_dtype(ent_r, out_dtype).reshape(-1, 1), 1e-5, 1.0, "entropy")
    for name, g, g_r in zip(("hidden", "weight", "bias"), grads, grads_r):
        if g_r is None:
            continue
        assert g.dtype == hidden.dtype and g.shape == g_r.shape
        # Accumulated over rows and vocabulary chunks: compare against the whole tensor's scale.
        _close(g.reshape(1, -1), _as_output_dtype(g_r, hidden.dtype).reshape(1, -1),
               GRAD_TOL[hidden.dtype] * 10, 1e-3, f"grad {name}")


def _bits(t):
    if t is None:
        return None
    return t.detach().contiguous().view(torch.uint8)


@settings(max_examples=10)
@given(V=st.integers(100, 3000), rows=st.integers(2, 40), dtype=st.sampled_from([torch.float32, torch.bfloat16,
                                                                                 torch.float64]),
       top_k=st.one_of(st.none(), st.integers(1, 50)), softcap=st.sampled_from([None, 3.0]),
       seed=st.integers(0, 2**31 - 1))
def test_bit_identical_across_thread_counts(V, rows, dtype, top_k, softcap, seed):
    """Rows split over the thread pool (the grain is ~32768 / V rows) give the same bits."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, V, generator=gen, dtype=torch.float64) * 4).to(dtype)
    x[0, 3] = NAN
    targets = torch.randint(0, V, (rows,), generator=gen)
    targets[1] = -100
    options = dict(temperature=0.8, top_k=top_k, top_p=0.9 if top_k else None, softcap=softcap)
    results = []
    threads = rlkern.get_num_threads()
    try:
        for n in (1, 2):
            rlkern.set_num_threads(n)
            lp, ent, grad = _token_run("cpu", x, targets, options, seed, True)
            results.append([_bits(t) for t in (lp, ent, grad)])
    finally:
        rlkern.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_temperature_limit_is_the_argmax_distribution():
    """A worked property: as T -> 0 the log-prob of a row's largest logit tends to
    -log(number of ties) and the entropy to log(number of ties), on every path."""
    x = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.5, 0.25, -INF, 0.0]])
    for backend in CPU_BACKENDS + ["reference"]:
        with rlkern.use_backend(backend):
            lp, ent = token_logprobs(x, torch.tensor([1, 0]), temperature=2.0**-126, return_entropy=True)
        assert torch.allclose(lp, torch.tensor([-math.log(2), 0.0])), backend
        assert torch.allclose(ent, torch.tensor([math.log(2), 0.0])), backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=25)
@given(case=logits_cases(), softcap=st.sampled_from([0.5, 5.0, 30.0, 1e4]), return_entropy=st.booleans())
def test_softcap_and_top1_match_reference(backend, case, softcap, return_entropy):
    """Soft-capped log-probs, entropy and gradients against the float64 reference (with the
    case's top-k/top-p: the kept set of the capped logits), and is_top1 against the
    reference's argmax wherever the row's top two capped logits are apart by more than
    rounding (saturated caps tie in float32, not in float64)."""
    x, targets, options, seed = case
    # (The cap's float32 rounding, divided by a tiny temperature, is not small: moderate ones.)
    options = dict(options, softcap=softcap, temperature=min(max(options["temperature"], 0.25), 2.5))
    out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        finite = torch.isfinite(_as_output_dtype(ref.token_logprobs(x.double(), targets, **options), out_dtype))
    lp, ent, grad = _token_run(backend, x, targets, options, seed, return_entropy, finite)
    lp_r, ent_r, grad_r = _token_run("reference", x.double(), targets, options, seed, return_entropy, finite)
    _close(lp.reshape(-1, 1), _as_output_dtype(lp_r, out_dtype).reshape(-1, 1), 1e-5, 1.0, "logp")
    if return_entropy:
        _close(ent.reshape(-1, 1), _as_output_dtype(ent_r, out_dtype).reshape(-1, 1), 1e-5, 1.0, "entropy")
    if x.numel():
        _close(grad, _as_output_dtype(grad_r, x.dtype), GRAD_TOL[x.dtype], 1e-3, "grad")
    with rlkern.use_backend(backend):
        _, top1 = token_logprobs(x, targets, return_top1=True, **{k: v for k, v in options.items()
                                                                  if k != "top_k" and k != "top_p"})
    _, top1_r = ref.token_logprobs(x.double(), targets, return_top1=True, **options)
    assert top1.dtype == torch.bool and top1.shape == targets.shape
    if x.numel() and x.shape[-1] > 1:
        y = softcap * torch.tanh(x.double() / softcap)
        top2 = y.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 1e-5 * top2[..., 0].abs().clamp_min(1.0)
        clear |= torch.isnan(lp_r)  # NaN rows are False on both sides
        assert torch.equal(top1[clear], top1_r[clear])
    # ignored rows are never top-1
    assert not (top1 & (targets == options["ignore_index"])).any()
