"""masked_whiten: every backend against the float64 reference, against verl's own
masked_whiten, across thread counts, over two data-parallel processes, and its errors."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rlkern
from helpers import CPU_BACKENDS, assert_close
from rlkern.reference import whiten as ref

TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float64: 1e-12}
OPTIONS = [{}, {"unbiased": False, "eps_mode": "clamp"}, {"shift_mean": False}, {"eps": 0.5}]


def _batch(shape=(24, 700), dtype=torch.float32, seed=0, p=0.7):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1.5).to(dtype)
    m = torch.rand(shape, generator=g) < p
    return x, m


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_matches_reference(backend, dtype, options):
    x, m = _batch(dtype=dtype)
    x = x.masked_fill(~m, float("nan"))  # masked positions are never read into the statistics
    with rlkern.use_backend(backend):
        out = rlkern.masked_whiten(x, m, **options)
    expected = ref.masked_whiten(x.double(), m, **options)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out[m], expected[m].to(dtype), TOL[dtype])
    assert torch.isnan(out[~m]).all()


def test_float_mask_and_no_mask():
    x, m = _batch(shape=(3, 50))
    assert torch.equal(rlkern.masked_whiten(x, m.float()), rlkern.masked_whiten(x, m))
    assert_close(rlkern.masked_whiten(x), ref.masked_whiten(x.double()).float(), TOL[torch.float32])


def test_same_bits_for_any_thread_count():
    x, m = _batch(shape=(64, 4096), seed=3)
    before = rlkern.get_num_threads()
    try:
        rlkern.set_num_threads(1)
        one = rlkern.masked_whiten(x, m)
        rlkern.set_num_threads(4)
        four = rlkern.masked_whiten(x, m)
    finally:
        rlkern.set_num_threads(before)
    assert torch.equal(one, four)


def _sums(x, m, center=None):
    from rlkern._kernel import core, dtype_code, ptr
    x, m = x.contiguous().reshape(-1), m.contiguous().reshape(-1).view(torch.uint8)
    return core().whiten.masked_sums(x.numel(), dtype_code(x), ptr(x), ptr(m), center is not None,
                                     0.0 if center is None else center)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16383, 16384, 16391, 3 * 16384 + 13])
def test_vector_and_scalar_bodies_add_in_one_order(n):
    """float32 and bfloat16 take the 8-lane vector body, float16 and float64 the scalar one:
    on values all four hold exactly, the float64 sums agree to the bit (one association),
    and with NaN at masked positions."""
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-128, 128, (n,), generator=g).double() / 4  # exact in every dtype
    m = torch.rand(n, generator=g) < 0.6
    x = x.masked_fill(~m, float("nan"))
    for center in (None, 0.3):
        got = {dt: _sums(x.to(dt), m, center) for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
        assert len(set(got.values())) == 1, got
        assert got[torch.float64][0] == m.sum().item()


def test_baseline_build_gives_the_same_bits(tmp_path):
    x, m = _batch(shape=(37, 1001), seed=5)
    torch.save({"x": x, "m": m, "f32": rlkern.masked_whiten(x, m), "bf16": rlkern.masked_whiten(x.bfloat16(), m),
                "sums": _sums(x, m, 0.25)}, tmp_path / "avx2.pt")
    from helpers import run_with_baseline_isa
    run_with_baseline_isa(tmp_path, "test_whiten", f"""
        d = torch.load({str(tmp_path / "avx2.pt")!r})
        assert torch.equal(rlkern.masked_whiten(d["x"], d["m"]), d["f32"])
        assert torch.equal(rlkern.masked_whiten(d["x"].bfloat16(), d["m"]), d["bf16"])
        assert t._sums(d["x"], d["m"], 0.25) == d["sums"]
    """)


def test_against_verl_masked_whiten():
    tf = pytest.importorskip("verl.utils.torch_functional", reason="verl not installed (tools/install_peers.sh)")
    x, m = _batch(shape=(16, 300), seed=5)
    for shift_mean in (True, False):
        theirs = tf.masked_whiten(x, m.float(), shift_mean=shift_mean)
        ours = rlkern.masked_whiten(x, m, shift_mean=shift_mean)
        assert_close(ours, theirs, 5e-6)


def test_differentiable_through_the_reference():
    x, m = _batch(shape=(4, 30), dtype=torch.float64)
    x.requires_grad_()
    out = rlkern.masked_whiten(x, m)
    (out * torch.linspace(0, 1, 30)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_nan_at_a_selected_position_propagates():
    x, m = _batch(shape=(4, 30))
    m[0, 0] = True
    x[0, 0] = float("nan")
    assert torch.isnan(rlkern.masked_whiten(x, m)).all()


def test_bad_inputs_name_the_argument():
    x, m = _batch(shape=(4, 30))
    with pytest.raises(ValueError, match="mask must select at least 2"):
        rlkern.masked_whiten(x, torch.zeros_like(m))
    one = torch.zeros_like(m)
    one[1, 2] = True
    with pytest.raises(ValueError, match="mask must select at least 2"):
        rlkern.masked_whiten(x, one)
    assert torch.isfinite(rlkern.masked_whiten(x, one, unbiased=False, eps_mode="clamp")).all()
    with pytest.raises(ValueError, match="mask"):
        rlkern.masked_whiten(x, m[:, :5])
    with pytest.raises(TypeError, match="values"):
        rlkern.masked_whiten(x.long(), m)
    with pytest.raises(ValueError, match="eps_mode"):
        rlkern.masked_whiten(x, m, eps_mode="sqrt")
    with pytest.raises(ValueError, match="eps"):
        rlkern.masked_whiten(x, m, eps=-1.0)
    with pytest.raises(ValueError, match="all_processes"):
        rlkern.masked_whiten(x, m, all_processes=True)  # no process group here
    with pytest.raises(ValueError, match="values must not be empty"):
        rlkern.masked_whiten(x[:0], m[:0])


def test_compiles_whole_and_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, m = _batch(shape=(8, 40))

    def step(x, m):
        return rlkern.masked_whiten(x, m) * 2

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(x, m)
    assert explained.graph_break_count == 0
    assert_close(torch.compile(step, fullgraph=True)(x, m), step(x, m), TOL[torch.float32])
    xb = x.bfloat16()
    with FakeTensorMode() as mode:
        fx, fm = mode.from_tensor(xb), mode.from_tensor(m)
        out = rlkern.masked_whiten(fx, fm)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    torch.library.opcheck(torch.ops.rlkern.masked_whiten, (x, m, True, True, 1e-8, False))


# --- two data-parallel processes: each whitens its half with the statistics of the whole ---

def _worker(rank, init_file, world):
    sys.path.insert(0, os.path.dirname(__file__))
    rlkern.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, m = _batch(shape=(8, 90), seed=11)
        m[4:, 60:] = False  # the processes hold different token counts
        rows = slice(rank * 4, rank * 4 + 4)
        for backend in CPU_BACKENDS:
            for options in OPTIONS[:2]:
                with rlkern.use_backend(backend):
                    part = rlkern.masked_whiten(x[rows], m[rows], all_processes=True, **options)
                whole = ref.masked_whiten(x.double(), m, **options)[rows]
                assert_close(part, whole.float(), TOL[torch.float32], name=f"{backend} {options}")
    finally:
        dist.destroy_process_group()


def test_all_processes_equals_one_big_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), 2), nprocs=2, join=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 3), (256, 4096), (3, 100003)])
def test_cuda_tensors_match_reference(shape, dtype):
    x, m = _batch(shape=shape, dtype=dtype, seed=7)
    x, m = x.cuda(), m.cuda()
    for options in OPTIONS:
        out = rlkern.masked_whiten(x, m, **options)
        assert out.device.type == "cuda" and out.dtype == dtype
        assert_close(out, ref.masked_whiten(x.double(), m, **options).to(dtype), TOL[dtype])
