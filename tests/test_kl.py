"""rlkern.kl.kl_penalty against the float64 reference and the estimators' definitions."""

import pytest
import torch

import rlkern
from rlkern import kl
from rlkern.reference import kl as ref

from helpers import CPU_BACKENDS, GRAD_TOL, VALUE_TOL, assert_close, bit_pattern

CLAMPS = [None, 0.05, (None, 0.1), (-0.02, None)]


def _inputs(shape=(5, 13), seed=0, dtype=torch.float64, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    refp = logp + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    return logp.to(dtype), refp.to(dtype)


def _run(backend, logp, refp, kind, clamp):
    logp = logp.clone().requires_grad_()
    with rlkern.use_backend(backend):
        out = kl.kl_penalty(logp, refp, kind, clamp)
    weights = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).reshape(out.shape)
    (g,) = torch.autograd.grad((out * weights).sum(), logp)
    return out, g


def test_definitions():
    logp, refp = _inputs()
    d = refp - logp
    assert_close(ref.kl_penalty(logp, refp, "k1"), -d, 1e-15)
    assert_close(ref.kl_penalty(logp, refp, "k2"), 0.5 * d * d, 1e-15)
    assert_close(ref.kl_penalty(logp, refp, "k3"), torch.exp(d) - 1 - d, 1e-15)
    assert (ref.kl_penalty(logp, refp, "k3") >= 0).all()
    assert ref.kl_penalty(logp, refp, "k3", 0.01).max() <= 0.01


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_match_reference(backend, kind, clamp):
    logp, refp = _inputs(dtype=torch.float32)
    out, g = _run(backend, logp, refp, kind, clamp)
    assert out.dtype == torch.float32
    expected, expected_g = _run("reference", logp.double(), refp.double(), kind, clamp)
    assert_close(out, expected, VALUE_TOL)
    assert_close(g, expected_g, GRAD_TOL)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_cpu_float64_and_gradcheck(kind):
    logp, refp = _inputs((3, 4), seed=1)
    out, g = _run("cpu", logp, refp, kind, 0.3)
    expected, expected_g = _run("reference", logp, refp, kind, 0.3)
    assert_close(out, expected, 1e-14)
    assert_close(g, expected_g, 1e-14)
    x = logp.clone().requires_grad_()
    with rlkern.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda t: kl.kl_penalty(t, refp, kind, (None, 2.0)), (x,), eps=1e-6,
                                        atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_inputs_and_extremes(backend):
    logp, refp = _inputs((4, 6), seed=2)
    refp[0] = logp[0] + 50.0
    refp[1] = logp[1] - 50.0
    lb, rb = logp.to(torch.bfloat16), refp.to(torch.bfloat16)
    out, g = _run(backend, lb, rb, "k3", None)
    expected, _ = _run("reference", lb.double(), rb.double(), "k3", None)
    assert out.dtype == torch.float32 and g.dtype == torch.bfloat16
    assert_close(out, expected, VALUE_TOL)
    clamped, _ = _run(backend, lb, rb, "k3", 10.0)
    assert clamped.max().item() == 10.0


def test_verl_low_var_kl_is_k3_clamped_at_10():
    """verl's "low_var_kl": d = clamp(ref - logp, -20, 20), exp(d) - d - 1 clamped to [-10, 10]."""
    logp, refp = _inputs((6, 40), seed=3, spread=8.0)
    logp = logp.clone().requires_grad_()
    d = torch.clamp(refp - logp, min=-20, max=20)
    verl = torch.clamp(torch.exp(d) - d - 1, min=-10, max=10)
    (verl_g,) = torch.autograd.grad(verl.sum(), logp)
    with rlkern.use_backend("cpu"):
        ours = kl.kl_penalty(logp, refp, "k3", clamp=10.0)
    (ours_g,) = torch.autograd.grad(ours.sum(), logp)
    assert_close(ours, verl, 1e-12)
    assert_close(ours_g, verl_g, 1e-12)


def test_bad_input():
    logp, refp = _inputs()
    with pytest.raises(ValueError, match="kind"):
        kl.kl_penalty(logp, refp, "k4")
    with pytest.raises(ValueError, match="ref_logp"):
        kl.kl_penalty(logp, refp[:, :3])
    with pytest.raises(TypeError, match="logp"):
        kl.kl_penalty(logp.long(), refp)
    with pytest.raises(ValueError, match="clamp"):
        kl.kl_penalty(logp, refp, clamp=-1.0)
    with pytest.raises(ValueError, match="clamp"):
        kl.kl_penalty(logp, refp, clamp=(1.0, 0.0))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.bfloat16, torch.float64),
                                    (torch.float64, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_mixed_dtypes_match_reference(backend, dtypes):
    """Every combination of input dtypes gives the reference's answer (issue #11, item 4)."""
    logp, refp = _inputs()
    logp, refp = logp.to(dtypes[0]), refp.to(dtypes[1])
    out, g = _run(backend, logp, refp, "k3", 0.5)
    expected, expected_g = _run("reference", logp.double(), refp.double(), "k3", 0.5)
    assert_close(out, expected, VALUE_TOL)
    assert g.dtype == logp.dtype
    assert_close(g, expected_g, GRAD_TOL if dtypes[0] != torch.bfloat16 else 1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clamp", CLAMPS)
def test_nan_propagates_through_the_clamp(backend, kind, clamp):
    """kl_penalty of NaN is NaN, clamped or not (Triton gave -inf; issue #11, item 5)."""
    logp, refp = _inputs((2, 5), dtype=torch.float32)
    logp[0, 1] = float("nan")
    refp[1, 3] = float("nan")
    out, g = _run(backend, logp, refp, kind, clamp)
    expected, expected_g = _run("reference", logp.double(), refp.double(), kind, clamp)
    assert torch.isnan(out[0, 1]) and torch.isnan(out[1, 3])
    assert_close(out, expected, VALUE_TOL)
    # Elsewhere the gradient is untouched (at the NaN itself it depends on how autograd
    # orders 0 * NaN, which the policy leaves open).
    fin = torch.isfinite(expected)
    assert_close(g[fin], expected_g[fin], GRAD_TOL)


@pytest.mark.parametrize("clamp", [(float("nan"), None), (None, float("nan")), (0.0, float("nan")), float("nan")])
def test_nan_clamp_bound_is_rejected(clamp):
    """A NaN inside a clamp pair is rejected as a single NaN is (issue #11, item 8)."""
    logp, refp = _inputs((2, 3))
    with pytest.raises(ValueError, match="clamp"):
        kl.kl_penalty(logp, refp, "k3", clamp)
    with pytest.raises(ValueError, match="clamp"):
        ref.kl_penalty(logp, refp, "k3", clamp)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_non_finite_values_and_gradients_match_reference(kind, dtype):
    """+-inf and NaN inputs, in the 8-lane steps and the scalar tail: the values and the
    gradients of the reference's autograd (torch.clamp passes no gradient at NaN, and an
    infinite derivative under the clamp stays NaN there: inf * 0)."""
    logp, refp = _inputs((3, 11), seed=4)
    for i in (0, 9):  # a vector lane and a tail position
        logp[0, i], logp[1, i], logp[2, i] = -float("inf"), float("inf"), float("nan")
    refp[0, 5] = -float("inf")
    refp[1, 5] = logp[1, 5] - 200.0  # exp(d) overflows in float32
    lb, rb = logp.to(dtype), refp.to(dtype)
    # the reference in the kernel's arithmetic type: exp(200) overflows in float32, not in float64
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for clamp in (None, 10.0, (None, 2.0)):
        out, g = _run("cpu", lb, rb, kind, clamp)
        expected, expected_g = _run("reference", lb.to(acc), rb.to(acc), kind, clamp)
        assert_close(out, expected, VALUE_TOL, f"value {clamp}")
        assert_close(g.to(acc), expected_g.to(dtype).to(acc), GRAD_TOL if dtype != torch.bfloat16 else 1e-2,
                     f"grad {clamp}")


def test_kl_penalty_backward_retained_scaled_once_and_baseline_isa(tmp_path):
    """The derivative buffer is handed to autograd: scaled by a weighted incoming gradient, kept
    for a retained graph, refused a second time without it; the baseline-ISA build agrees."""
    from helpers import run_with_baseline_isa

    logp, refp = _inputs((4, 37), seed=5, dtype=torch.float32)
    x = logp.clone().requires_grad_()
    out = kl.kl_penalty(x, refp, "k3", 0.3)
    w = torch.rand(out.shape, generator=torch.Generator().manual_seed(1))
    (g1,) = torch.autograd.grad((out * w).sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad(out.sum() * 2.0, x, retain_graph=True)
    (g3,) = torch.autograd.grad(out.sum(), x)
    expected, _ = _run("reference", logp.double(), refp.double(), "k3", 0.3)
    y = logp.double().requires_grad_()
    e = ref.kl_penalty(y, refp.double(), "k3", 0.3)
    (h1,) = torch.autograd.grad((e * w.double()).sum(), y)
    assert_close(g1, h1, GRAD_TOL)
    assert_close(g2, 2.0 * g3, 1e-6)
    with pytest.raises(RuntimeError, match="already run"):
        torch.autograd.grad(out.sum(), x)
    torch.save((logp, refp, out.detach(), g3), tmp_path / "kl.pt")
    run_with_baseline_isa(tmp_path, "test_kl", f"""
        logp, refp, out, g3 = torch.load({str(tmp_path / "kl.pt")!r})
        x = logp.clone().requires_grad_()
        o = t.kl.kl_penalty(x, refp, "k3", 0.3)
        (g,) = torch.autograd.grad(o.sum(), x)
        t.assert_close(o, out, 1e-6)
        t.assert_close(g, g3, 1e-6)
    """)


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx512f", "avx512vl", "avx512bw", "avx512dq"))


@pytest.mark.skipif(not _cpu_has_avx512(), reason="the AVX-512 k3 body runs only on a CPU with AVX-512 F/VL/BW/DQ")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_penalty_avx512_body_matches_avx2(tmp_path, dtype):
    """k3 takes a 16-lane AVX-512 body where the CPU has it: the same values and derivatives as
    the AVX2 body (RLKERN_DISABLE_AVX512), with the clamp, OpenRLHF's bound on the log-ratio,
    NaN/inf inputs and row lengths that leave 16-lane tails."""
    from helpers import run_isolated

    logp, refp = _inputs((7, 1003), seed=11, dtype=dtype)
    logp[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 30.0, -30.0]).to(dtype)
    refp[1, :3] = torch.tensor([float("nan"), 40.0, -40.0]).to(dtype)
    torch.save((logp, refp), tmp_path / "in.pt")
    code = f"""
        import torch, math
        from rlkern import kl
        from rlkern.integrations import openrlhf
        logp, refp = torch.load({str(tmp_path / "in.pt")!r})
        outs = []
        for f in (lambda x: kl.kl_penalty(x, refp, "k3", 10.0), lambda x: kl.kl_penalty(x, refp, "k3"),
                  lambda x: openrlhf.compute_approx_kl(x, refp, kl_estimator="k3")):
            x = logp.clone().requires_grad_()
            o = f(x)
            (g,) = torch.autograd.grad(o.sum(), x)
            outs += [o.detach(), g]
        torch.save(outs, {str(tmp_path)!r} + "/out_" + ("avx2" if "RLKERN_DISABLE_AVX512" in __import__("os").environ else "avx512") + ".pt")
        print("done")
    """
    run_isolated(code)
    run_isolated(code, env={"RLKERN_DISABLE_AVX512": "1"})
    wide, narrow = torch.load(tmp_path / "out_avx512.pt"), torch.load(tmp_path / "out_avx2.pt")
    for a, b in zip(wide, narrow):
        assert_close(a, b, 1e-6, "AVX-512 vs AVX2")


def _bits(t: torch.Tensor) -> torch.Tensor:
    # NaNs compared as NaN (their payloads are not part of the contract)
    bits = bit_pattern(t)
    return torch.where(torch.isnan(t), torch.zeros((), dtype=bits.dtype), bits)


@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float16), (torch.float64, torch.float64),
                                    (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("kind,clamp", [("k1", None), ("k2", None), ("k3", 10.0), ("k3", (None, 0.1))])
def test_per_token_incoming_gradient_scales_the_saved_derivative_bit_for_bit(kind, clamp, dtypes, retain):
    """A per-token incoming gradient (verl's agg_loss backward) scales the derivative the
    forward wrote in one compiled pass: bit for bit torch's ``d.mul_(g)`` (``(d * g)`` under
    retain_graph), the former eager formula, NaN and infinite entries included."""
    lp_dtype, ref_dtype = dtypes
    logp, refp = _inputs((7, 301), seed=3, spread=3.0)
    logp[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -60.0], dtype=torch.float64)
    logp, refp = logp.to(lp_dtype), refp.to(ref_dtype)
    storage = lp_dtype if lp_dtype == ref_dtype else torch.float32
    with rlkern.use_backend("cpu"):
        # the derivative as stored (a unit incoming gradient hands the buffer over unscaled)
        x = logp.to(storage).requires_grad_()
        (d,) = torch.autograd.grad(kl.kl_penalty(x, refp, kind, clamp).sum(), x)
        x = logp.clone().requires_grad_()
        out = kl.kl_penalty(x, refp, kind, clamp)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(out.dtype)
    g[1, :3] = torch.tensor([0.0, float("inf"), float("nan")], dtype=out.dtype)
    (got,) = torch.autograd.grad(out, x, grad_outputs=g, retain_graph=retain)
    expected = (d * g).to(lp_dtype)
    assert got.dtype == lp_dtype
    assert torch.equal(_bits(got), _bits(expected))
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    if retain:  # the buffer is kept: a second backward gives the same
        (again,) = torch.autograd.grad(out, x, grad_outputs=g)
        assert torch.equal(_bits(again), _bits(expected))


def _narrow_cases():
    """float32 derivatives that exercise every narrowing rule: random bit patterns (all
    exponents, subnormals), exact ties below the kept bits, the largest finite values that
    round to infinity, signed zeros, infinities and NaN."""
    g = torch.Generator().manual_seed(8)
    bits = torch.randint(-2**31, 2**31 - 1, (4099,), generator=g, dtype=torch.int64).to(torch.int32)
    d = bits.view(torch.float32).clone()
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x477FF000, 0x477FE000, 0x7F7FFFFF, 0x33000000, 0x00008000],
                        dtype=torch.int32).view(torch.float32)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -65520.0])
    d[:7], d[7:14] = ties, specials
    return d


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.37, -3.0, 0.0])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 4099])
def test_narrow_native_is_torch_scale_then_narrow(dtype, scale, n):
    """kl._narrow_native, the one-pass backward of a float32 gradient kept beside narrower
    inputs: bit for bit torch's ``(d * s).to(dtype)`` (s a float32 incoming gradient), NaN
    positions included, over the vector body and its scalar tail."""
    d = _narrow_cases()[:n]
    got = kl._narrow_native(d, scale, dtype)
    expected = (d * torch.tensor(scale, dtype=torch.float32)).to(dtype)
    assert got.dtype == dtype and got.shape == d.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(_bits(got)[~nan], _bits(expected)[~nan])


def test_narrow_native_declines_what_torch_must_do():
    """No compiled pass for a non-float32 source, a non-narrow target or a strided source."""
    d = torch.randn(4, 6)
    assert kl._narrow_native(d.double(), 1.0, torch.bfloat16) is None
    assert kl._narrow_native(d, 1.0, torch.float64) is None
    assert kl._narrow_native(d.t(), 1.0, torch.bfloat16) is None
    assert kl._narrow_native(d.to("meta"), 1.0, torch.bfloat16) is None


def test_narrow_native_baseline_isa(tmp_path):
    """The baseline-x86-64 build of the narrowing pass gives the AVX2 build's bits."""
    from helpers import run_with_baseline_isa

    d = _narrow_cases()
    torch.save(d, tmp_path / "narrow.pt")
    run_with_baseline_isa(tmp_path, "test_kl", f"""
        d = torch.load({str(tmp_path / "narrow.pt")!r})
        for dtype in (torch.bfloat16, torch.float16):
            got = t.kl._narrow_native(d, 0.37, dtype)
            expected = (d * torch.tensor(0.37, dtype=torch.float32)).to(dtype)
            nan = torch.isnan(expected)
            assert torch.equal(torch.isnan(got), nan)
            assert torch.equal(t._bits(got)[~nan], t._bits(expected)[~nan])
    """)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_mixed_dtype_uniform_gradient_narrowed_in_one_pass(monkeypatch, dtype, retain, kind):
    """Narrow log-probs beside float32 reference ones keep a float32 derivative; a uniform
    incoming gradient (a .sum(), scaled or not) scales and narrows it in one compiled pass,
    bit for bit torch's eager ``(d * g).to(dtype)`` (the fallback), NaN positions included."""
    logp, refp = _inputs((5, 203), seed=9, spread=3.0)
    logp[0, :3] = torch.tensor([float("nan"), float("inf"), -60.0], dtype=torch.float64)
    logp, refp = logp.to(dtype), refp.float()

    def grads():
        x = logp.clone().requires_grad_()
        with rlkern.use_backend("cpu"):
            out = kl.kl_penalty(x, refp, kind)
        first = torch.autograd.grad(out.sum() * 0.37, x, retain_graph=retain)
        return first + (torch.autograd.grad(out.sum(), x) if retain else ())

    real, taken = kl._narrow_native, []

    def spy(*args):  # records that the one-pass path ran, so that the comparison is not vacuous
        out = real(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(kl, "_narrow_native", spy)
    got = grads()
    monkeypatch.setattr(kl, "_narrow_native", lambda *args: None)
    expected = grads()
    assert taken and all(taken), "backward did not narrow in one pass"
    assert len(got) == (2 if retain else 1)
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        nan = torch.isnan(e)
        assert torch.equal(torch.isnan(g), nan)
        assert torch.equal(_bits(g)[~nan], _bits(e)[~nan])
