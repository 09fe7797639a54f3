"""The Triton return scans (rlkern.triton.returns) against the float64 reference, and the
dispatch that gives them CUDA tensors where the CUDA C++ scans cannot run.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py),
which scans one element at a time in Python: shapes stay small, and `small_tiles` shrinks
the tile to 32 steps so that rows of a few dozen steps already cross several tiles.
"""

import warnings

import pytest
import torch

import rlkern
import rlkern._info
from rlkern import returns
from rlkern.reference import returns as ref
from helpers import HAS_TRITON, TRITON_INTERPRET, assert_close, needs_cuda

import test_returns as base  # noqa: E402  (its helpers and cases, rerun on the Triton scans)

pytestmark = [pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
              # numpy's complaints about inf * 0 in the interpreter's discarded lanes
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

interpreted = pytest.mark.skipif(not TRITON_INTERPRET, reason="the interpreter runs the kernels on CPU tensors")


@pytest.fixture
def triton_scans():
    with rlkern.use_backend("triton"):
        yield "triton"


@pytest.fixture
def small_tiles(monkeypatch):
    from rlkern.triton import returns as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK", 32)


def _inputs(B, T, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r, v, nv = (torch.randn(B, T, generator=g).to(dtype) for _ in range(3))
    term = torch.rand(B, T, generator=g) < 0.06
    trunc = (torch.rand(B, T, generator=g) < 0.06) & ~term
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[:, :3] = False  # a masked prefix, holes, and (row 0) a long masked tail
    mask[0, T // 2:] = False
    boot = torch.randn(B, generator=g).to(dtype)
    return r, v, nv, term, trunc, mask, boot


def _check_every_scan(B, T, dtype, seed, gamma=0.99, lam=0.95):
    """Each scan (and each way of calling GAE) against the reference run in float64 on
    the same (rounded) inputs."""
    r, v, nv, term, trunc, mask, boot = _inputs(B, T, dtype, seed)
    f = lambda x: x.double()  # noqa: E731
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    got = rlkern.discounted_returns(r, term, gamma, bootstrap=boot)
    assert got.dtype == want_dtype
    assert_close(got, ref.discounted_returns(f(r), term, gamma, f(boot)), tol)
    # GAE bootstrapping from the next step's value (and bootstrap_value after the last).
    adv, ret = rlkern.gae(r, v, term, gamma, lam, bootstrap_value=boot)
    eadv, eret = ref.gae(f(r), f(v), term, gamma, lam, bootstrap_value=f(boot))
    assert_close(adv, eadv, tol)
    assert_close(ret, eret, tol)
    # ... and from next_values, telling termination from truncation.
    adv, ret = rlkern.gae(r, v, term, gamma, lam, next_values=nv, truncated=trunc)
    eadv, eret = ref.gae(f(r), f(v), term, gamma, lam, next_values=f(nv), truncated=trunc)
    assert_close(adv, eadv, tol)
    assert_close(ret, eret, tol)
    got = rlkern.lambda_returns(r, nv, term, gamma, lam, truncated=trunc)
    assert_close(got, ref.lambda_returns(f(r), f(nv), term, gamma, lam, truncated=trunc), tol)
    adv, ret = rlkern.masked_gae(r.masked_fill(~mask, float("nan")), v.masked_fill(~mask, float("inf")), mask,
                                 gamma, lam)
    eadv, eret = ref.masked_gae(f(r), f(v), mask, gamma, lam)
    assert_close(adv, eadv, tol)
    assert_close(ret, eret, tol)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scans_over_several_tiles_match_the_reference(triton_scans, small_tiles, dtype):
    """T = 77 with 32-step tiles: two whole tiles and a partial first one."""
    _check_every_scan(2, 77, dtype, seed=1)


@interpreted
def test_scans_of_one_step_rows(triton_scans):
    _check_every_scan(2, 1, torch.float32, seed=2)
    _check_every_scan(1, 1, torch.float16, seed=3, gamma=0.5, lam=0.5)
    _check_every_scan(1, 1, torch.float64, seed=3, gamma=1.0, lam=1.0)


@interpreted
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty_batches_launch_nothing(triton_scans, shape):
    r = torch.randn(shape)
    term = torch.zeros(shape, dtype=torch.bool)
    adv, ret = rlkern.gae(r, r, term, 0.9, 0.9)
    assert adv.shape == shape and ret.shape == shape
    assert rlkern.discounted_returns(r, term, 0.9, bootstrap=torch.zeros(shape[0])).shape == shape
    assert rlkern.lambda_returns(r, r, term, 0.9, 0.9).shape == shape
    assert rlkern.masked_gae(r, r, term)[0].shape == shape


@interpreted
def test_scans_with_the_full_tile(triton_scans):
    """The tile the GPU runs (256 steps): a row of 300 steps takes a whole tile and a
    partial one."""
    from rlkern.triton import returns as kernels

    assert kernels.block_for(300) == 256 and kernels.block_for(1) == 32 and kernels.block_for(45) == 64
    _check_every_scan(1, 300, torch.float32, seed=4, gamma=1.0, lam=0.9)


@interpreted
@pytest.mark.parametrize("T,k", [(64, 21), (61, 8)])
@pytest.mark.parametrize("cut", ["terminated", "truncated"])
def test_nan_after_an_episode_end_stays_there(triton_scans, small_tiles, T, k, cut):
    base.test_nan_after_an_episode_end_stays_there(triton_scans, T, k, cut)


@interpreted
@pytest.mark.parametrize("gamma,lam", [(0.0, 0.9), (0.9, 0.0)])
def test_a_zero_discount_reads_nothing_behind_it(triton_scans, small_tiles, gamma, lam):
    r, v, nv, term, trunc, mask = base._poisoned_inputs(2, 40, 3, float("inf"))
    for got, want in base._all_scans(r, v, nv, term, trunc, mask, gamma, lam):
        assert_close(got, want)


@interpreted
@pytest.mark.parametrize("gamma,lam", [(1e-5, 1e-5), (1e-30, 1.0), (1e-45, 1e-45)])
def test_tiny_discounts_keep_infinities_infinite(triton_scans, small_tiles, gamma, lam):
    """A product of nonzero discounts over a tile underflows; held at the smallest normal
    number it stays nonzero, so an infinite carry stays infinite (not 0 * inf = NaN)."""
    r, v, nv, term, trunc, mask = base._poisoned_inputs(2, 50, 11, float("inf"))
    for got, want in base._all_scans(r, v, nv, term, trunc, mask, gamma, lam):
        assert_close(got, want)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_values_cross_tiles_of_long_rows(triton_scans, dtype):
    """(gamma * lam)^256 underflows in a full tile: NaN and inf must still travel on
    through the following tiles to the start of the episode, as in the reference."""
    T = 520
    r, v, nv, _, trunc, mask = (x.to(dtype) if x.is_floating_point() else x
                                for x in base._poisoned_inputs(1, T, 7, float("inf")))
    r[0, T - 5] = float("nan")
    term = torch.zeros(1, T, dtype=torch.bool)
    gamma, lam = (0.9, 0.5) if dtype == torch.float32 else (0.99, 1e-3)
    adv, _ = rlkern.gae(r, v, term, gamma, lam)
    eadv, _ = ref.gae(r.double(), v.double(), term, gamma, lam)
    assert int(eadv.isnan().sum()) > T - 10  # the NaN reaches back to the row's start
    assert_close(adv, eadv)
    if dtype == torch.float32:
        got = rlkern.discounted_returns(r, term, gamma * lam)
        assert_close(got, ref.discounted_returns(r.double(), term, gamma * lam))
        got = rlkern.lambda_returns(r, nv, term, gamma, lam, truncated=trunc)
        assert_close(got, ref.lambda_returns(r.double(), nv.double(), term, gamma, lam, truncated=trunc))


@interpreted
def test_non_contiguous_and_numeric_flags(triton_scans):
    base.test_non_contiguous_and_numeric_flags(triton_scans)


@interpreted
def test_out_buffers_and_one_dimensional_rows(triton_scans):
    r, v, nv, term, trunc, mask, _ = _inputs(2, 20, torch.float32, seed=5)
    a, b = torch.full_like(r, 7.0), torch.full_like(r, 7.0)
    got = rlkern.gae(r, v, term, 0.99, 0.95, next_values=nv, truncated=trunc, out=(a, b))
    assert got[0] is a and got[1] is b
    eadv, eret = ref.gae(r.double(), v.double(), term, 0.99, 0.95, next_values=nv.double(), truncated=trunc)
    assert_close(a, eadv)
    assert_close(b, eret)
    assert rlkern.discounted_returns(r, term, 0.9, out=a) is a
    assert_close(a, ref.discounted_returns(r.double(), term, 0.9))
    row = rlkern.lambda_returns(r[1], nv[1], term[1], 0.9, 0.7)
    assert row.shape == (20,)
    assert_close(row, ref.lambda_returns(r[1:].double(), nv[1:].double(), term[1:], 0.9, 0.7)[0])


def _spy_on_kernels(monkeypatch):
    """Records which Triton launchers ran."""
    from rlkern.triton import returns as kernels

    calls = []
    for name in ("discounted_returns", "gae", "lambda_returns", "masked_gae"):
        def spy(*args, _name=name, _fn=getattr(kernels, name)):
            calls.append(_name)
            return _fn(*args)

        monkeypatch.setattr(kernels, name, spy)
    return calls


@interpreted
def test_forced_triton_runs_the_triton_scans_in_eager_calls_and_custom_ops(triton_scans, monkeypatch):
    """RLKERN_BACKEND=triton sends eager calls and the rlkern:: custom ops (the way in
    under torch.compile) to the Triton kernels, not to the native ones."""
    calls = _spy_on_kernels(monkeypatch)
    r, v, nv, term, trunc, mask, boot = _inputs(2, 9, torch.float32, seed=6)
    rlkern.discounted_returns(r, term, 0.9)
    rlkern.gae(r, v, term, 0.9, 0.9)
    rlkern.lambda_returns(r, nv, term, 0.9, 0.9)
    rlkern.masked_gae(r, v, mask)
    assert calls == ["discounted_returns", "gae", "lambda_returns", "masked_gae"]
    calls.clear()
    out = torch.ops.rlkern.discounted_returns(r, term, 0.9, boot)
    assert_close(out, ref.discounted_returns(r.double(), term, 0.9, boot.double()))
    adv, _ = torch.ops.rlkern.gae(r, v, term, 0.9, 0.8, nv, trunc, None)
    assert_close(adv, ref.gae(r.double(), v.double(), term, 0.9, 0.8, next_values=nv.double(), truncated=trunc)[0])
    torch.ops.rlkern.lambda_returns(r, nv, term, 0.9, 0.8, None)
    adv, _ = torch.ops.rlkern.masked_gae(r, v, mask, 1.0, 0.9)
    assert_close(adv, ref.masked_gae(r.double(), v.double(), mask, 1.0, 0.9)[0])
    assert calls == ["discounted_returns", "gae", "lambda_returns", "masked_gae"]


def test_custom_ops_on_the_reference_backend_run_the_reference(monkeypatch):
    """The custom ops take the backend the eager calls take: with the reference forced
    (or chosen on CUDA tensors when neither CUDA C++ nor Triton scans can run), they run
    the reference's torch ops instead of handing device pointers to a native kernel."""
    seen = []
    real = ref.gae
    monkeypatch.setattr(ref, "gae", lambda *a, **k: seen.append(1) or real(*a, **k))
    r, v, _, term, _, _, _ = _inputs(2, 9, torch.float32, seed=7)
    with rlkern.use_backend("reference"):
        adv, ret = torch.ops.rlkern.gae(r, v, term, 0.9, 0.8, None, None, None)
    assert seen and adv.dtype == torch.float32
    assert_close(adv, real(r.double(), v.double(), term, 0.9, 0.8)[0])


# --- which scans CUDA tensors get (decided without a GPU) ---------------------------------

_OLD_DRIVER = {"runtime": "13.0", "min_driver": "580", "driver": "12.4", "driver_ok": False}
_NEW_DRIVER = {"runtime": "13.0", "min_driver": "580", "driver": "13.0", "driver_ok": True}


@pytest.fixture
def fresh_decision():
    returns._cuda_scans_start.cache_clear()
    yield
    returns._cuda_scans_start.cache_clear()


def _machine(monkeypatch, support, built=True, triton=True):
    monkeypatch.setattr(rlkern._info, "cuda_support", lambda: support)
    monkeypatch.setattr(rlkern._info, "cuda_scans_built", lambda: built)
    monkeypatch.setattr(rlkern._info, "triton_importable", lambda: triton)
    returns._cuda_scans_start.cache_clear()


def test_a_too_old_driver_gives_cuda_tensors_the_triton_scans_with_one_warning(monkeypatch, fresh_decision):
    """A CUDA 13 build under an R535 driver cannot start its CUDA C++ scans: CUDA tensors
    take the Triton scans, said once with a warning; rlkern info says the same."""
    _machine(monkeypatch, _OLD_DRIVER)
    with pytest.warns(RuntimeWarning, match=r"R580.*CUDA 12\.4.*Triton kernels"):
        assert returns._scan_backend(torch.device("cuda")) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert returns._scan_backend(torch.device("cuda")) == "triton"  # once
    assert rlkern._info.scan_kernels(_OLD_DRIVER) == "triton"
    assert returns._scan_backend(torch.device("cpu")) == "cpu"
    with rlkern.use_backend("cuda"):  # asked for by name: the CUDA C++ scans, whatever the driver
        assert returns._scan_backend(torch.device("cuda")) == "cuda"


def test_a_new_enough_driver_keeps_the_cuda_scans(monkeypatch, fresh_decision):
    _machine(monkeypatch, _NEW_DRIVER)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert returns._scan_backend(torch.device("cuda")) == "cuda"
    assert rlkern._info.scan_kernels(_NEW_DRIVER) == "cuda"
    with rlkern.use_backend("triton"):
        assert returns._scan_backend(torch.device("cuda")) == "triton"


def test_a_build_without_cuda_scans_takes_the_triton_scans_silently(monkeypatch, fresh_decision):
    _machine(monkeypatch, {"runtime": None, "min_driver": None, "driver": "12.2", "driver_ok": None}, built=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert returns._scan_backend(torch.device("cuda")) == "triton"
    assert rlkern._info.scan_kernels() == "triton"
    assert rlkern.info()["scans_on_cuda"] == "triton"


@pytest.mark.parametrize("built, support", [(True, _OLD_DRIVER), (False, _NEW_DRIVER)])
def test_without_triton_the_scans_fall_back_to_torch_ops_with_a_warning(monkeypatch, fresh_decision, built, support):
    _machine(monkeypatch, support, built=built, triton=False)
    with pytest.warns(RuntimeWarning, match=r"torch ops \(the reference"):
        assert returns._scan_backend(torch.device("cuda")) == "reference"
    assert rlkern._info.scan_kernels(support) == "reference"


# --- on a GPU: the Triton scans against the reference and the CUDA C++ scans ---------------

@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (1000, 3), (512, 1031)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_triton_scans_on_cuda_tensors(shape, dtype):
    r, v, nv, term, trunc, mask, boot = _inputs(*shape, dtype, seed=shape[0] + shape[1])
    c = [x.cuda() for x in (r, v, nv, term, trunc, mask, boot)]
    f = lambda x: x.double()  # noqa: E731
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    results = {}
    for backend in ["triton"] + (["cuda"] if rlkern._info.cuda_scans_built() else []):
        with rlkern.use_backend(backend):
            results[backend] = [
                rlkern.discounted_returns(c[0], c[3], 0.99, bootstrap=c[6]),
                *rlkern.gae(c[0], c[1], c[3], 0.99, 0.95, bootstrap_value=c[6]),
                *rlkern.gae(c[0], c[1], c[3], 0.99, 0.95, next_values=c[2], truncated=c[4]),
                rlkern.lambda_returns(c[0], c[2], c[3], 0.99, 0.9, truncated=c[4]),
                *rlkern.masked_gae(c[0], c[1], c[5], 1.0, 0.95),
            ]
    want = [ref.discounted_returns(f(r), term, 0.99, f(boot)),
            *ref.gae(f(r), f(v), term, 0.99, 0.95, bootstrap_value=f(boot)),
            *ref.gae(f(r), f(v), term, 0.99, 0.95, next_values=f(nv), truncated=trunc),
            ref.lambda_returns(f(r), f(nv), term, 0.99, 0.9, truncated=trunc),
            *ref.masked_gae(f(r), f(v), mask, 1.0, 0.95)]
    for got in results.values():
        for g, w in zip(got, want):
            assert_close(g, w, tol)
