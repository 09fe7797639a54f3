"""The log-prob ops as torch.library custom ops: opcheck, torch.compile(fullgraph=True)
without graph breaks (static and dynamic shapes), FakeTensorMode and meta tensors."""

import pytest
import torch
import torch.distributed as dist

import rlkern
from rlkern.logprobs import linear_token_logprobs, token_logprobs, vocab_parallel_token_logprobs

from helpers import CPU_BACKENDS, assert_close

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]


def _case(rows=6, V=50, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, rows // 2, V, generator=gen) * 3).to(dtype)
    t = torch.randint(0, V, (2, rows // 2), generator=gen)
    t[0, 1] = -100
    return x, t


@pytest.fixture(scope="module")
def single_rank_group(tmp_path_factory):
    """A one-process gloo group, for the vocab-parallel op (its all-reduces are then identities)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    init = tmp_path_factory.mktemp("pg") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_token_logprobs(backend):
    x, t = _case()
    x.requires_grad_()
    with rlkern.use_backend(backend):
        arg_sets = [(x, t, 0.8, True, -100, None, None), (x, t, 1.0, False, -100, 5, 0.9)]
        for args in arg_sets if backend == "cpu" else arg_sets[1:]:  # (the interpreter is slow)
            torch.library.opcheck(torch.ops.rlkern.token_logprobs.default, args)
        if backend != "cpu":
            return
        n = t.numel()
        stats = [torch.randn(n), torch.randn(n), torch.full((n,), -float("inf")), torch.rand(n)]
        torch.library.opcheck(torch.ops.rlkern.token_logprobs_backward.default,
                              (x.detach(), t, stats[2], stats[0], stats[1], stats[3], torch.randn(n),
                               torch.randn(n), 0.8, -100, 5, None))


@pytest.mark.parametrize("backend", ["cpu"])  # (its kernels are those of token_logprobs, checked on Triton above)
def test_opcheck_linear_token_logprobs(backend):
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(5, 4, generator=gen, requires_grad=True)
    w = torch.randn(30, 4, generator=gen, requires_grad=True)
    b = torch.randn(30, generator=gen, requires_grad=True)
    t = torch.randint(0, 30, (5,), generator=gen)
    with rlkern.use_backend(backend):
        torch.library.opcheck(torch.ops.rlkern.linear_token_logprobs.default, (h, w, b, t, 0.9, True, -100, 2, 8))
        torch.library.opcheck(torch.ops.rlkern.linear_token_logprobs.default,
                              (h, w, None, t, 1.0, False, -100, None, None))


def test_opcheck_vocab_parallel(single_rank_group):
    x, t = _case()
    x.requires_grad_()
    torch.library.opcheck(torch.ops.rlkern.vocab_parallel_token_logprobs.default, (x, t, 0, "", 0.7, True, -100))


# ----------------------------------------------------------------------------- torch.compile


def _token_fn(x, t):
    lp, ent = token_logprobs(x, t, temperature=0.7, return_entropy=True)
    lp_k = token_logprobs(x, t, top_k=5, top_p=0.9)
    return (lp * 2).sum() + ent.sum() + torch.where(torch.isfinite(lp_k), lp_k, 0.0).sum()


def _linear_fn(h, w, b, t):
    lp, ent = linear_token_logprobs(h, w, t, bias=b, return_entropy=True, chunk_tokens=4, chunk_vocab=16)
    return lp.sum() - 0.5 * ent.sum()


def _grads(fn, *args):
    leaves = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
    out = fn(*leaves)
    out.backward()
    return out, [leaf.grad for leaf in leaves if leaf.is_floating_point()]


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(dynamic):
    torch._dynamo.reset()
    x, t = _case()
    gen = torch.Generator().manual_seed(2)
    h, w, b = torch.randn(6, 4, generator=gen), torch.randn(40, 4, generator=gen), torch.randn(40, generator=gen)
    tl = torch.randint(0, 40, (6,), generator=gen)
    for fn, args in [(_token_fn, (x, t)), (_linear_fn, (h, w, b, tl))]:
        explanation = torch._dynamo.explain(fn)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
        out_c, grads_c = _grads(compiled, *args)
        out_e, grads_e = _grads(fn, *args)
        assert_close(out_c, out_e, 1e-6, "value")
        for gc, ge in zip(grads_c, grads_e):
            assert_close(gc, ge, 1e-6, "grad")
    if dynamic:  # another batch size reuses the dynamic graph
        x2, t2 = _case(rows=10, V=50, seed=3)
        out_c, grads_c = _grads(torch.compile(_token_fn, fullgraph=True, dynamic=True, backend="aot_eager"), x2, t2)
        out_e, grads_e = _grads(_token_fn, x2, t2)
        assert_close(out_c, out_e, 1e-6, "value")
        assert_close(grads_c[0], grads_e[0], 1e-6, "grad")


def test_compile_inductor_token_logprobs():
    """The default backend (inductor) around the custom op."""
    torch._dynamo.reset()
    x, t = _case()
    compiled = torch.compile(_token_fn, fullgraph=True)
    out_c, grads_c = _grads(compiled, x, t)
    out_e, grads_e = _grads(_token_fn, x, t)
    assert_close(out_c, out_e, 1e-5, "value")
    assert_close(grads_c[0], grads_e[0], 1e-5, "grad")


def test_traced_out_of_range_target_is_nan():
    """No host sync on the traced path: a bad target gives NaN where eager raises."""
    torch._dynamo.reset()
    x, t = _case()
    t[1, 2] = 50
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(x, t)
    lp = torch.compile(lambda a, b: token_logprobs(a, b), fullgraph=True, backend="aot_eager")(x, t)
    assert torch.isnan(lp[1, 2]) and torch.isfinite(lp[t != 50]).all()


def test_double_backward_names_the_op():
    x, t = _case()
    x.requires_grad_()
    lp = torch.ops.rlkern.token_logprobs(x, t, 1.0, False, -100, None, None)[0]
    (g,) = torch.autograd.grad(lp.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="rlkern::token_logprobs"):
        g.sum().backward()


# ----------------------------------------------------------------------------- fake and meta


def test_fake_tensor_mode_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 5, 1000, dtype=torch.bfloat16, requires_grad=True)
        t = torch.empty(3, 5, dtype=torch.int32)
        lp, ent = token_logprobs(x, t, return_entropy=True, top_k=50)
        assert lp.shape == (3, 5) and ent.shape == (3, 5) and lp.dtype == torch.float32
        (lp.sum() + ent.sum()).backward()
        assert x.grad.shape == x.shape and x.grad.dtype == torch.bfloat16
        h = torch.empty(2, 7, 16, requires_grad=True)
        w = torch.empty(1000, 16, requires_grad=True)
        lp = linear_token_logprobs(h, w, torch.empty(2, 7, dtype=torch.long))
        assert lp.shape == (2, 7) and lp.dtype == torch.float32
        lp.sum().backward()
        assert h.grad.shape == h.shape and w.grad.shape == w.shape
        lp, ent = vocab_parallel_token_logprobs(x.double(), t, 0, return_entropy=True)
        assert lp.shape == (3, 5) and lp.dtype == torch.float64


def test_meta_tensors():
    x = torch.empty(4, 3, 100, device="meta", dtype=torch.float16)
    t = torch.empty(4, 3, device="meta", dtype=torch.long)
    lp, ent = token_logprobs(x, t, return_entropy=True, temperature=0.5, top_p=0.9)
    assert lp.device.type == "meta" and lp.shape == (4, 3) and ent.dtype == torch.float32
    h = torch.empty(12, 8, device="meta", dtype=torch.float64)
    w = torch.empty(100, 8, device="meta", dtype=torch.float64)
    lp = linear_token_logprobs(h, w, torch.empty(12, device="meta", dtype=torch.long))
    assert lp.shape == (12,) and lp.dtype == torch.float64


def test_real_tensors_inside_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, t = _case()
    with FakeTensorMode(allow_non_fake_inputs=True):
        lp = token_logprobs(x, t)
    from torch._subclasses.fake_tensor import FakeTensor

    assert isinstance(lp, FakeTensor) and lp.shape == t.shape


def test_func_transforms_name_the_op_and_transform():
    x, t = _case()
    h, w = torch.randn(6, 4), torch.randn(50, 4)
    for fn, op in [(lambda a: token_logprobs(a, t).sum(), "token_logprobs"),
                   (lambda a: linear_token_logprobs(h, w, t.reshape(-1)).sum() + a.sum(), "linear_token_logprobs")]:
        with pytest.raises(RuntimeError, match=f"rlkern {op}: the torch.func transform grad"):
            torch.func.grad(fn)(x)
    with pytest.raises(RuntimeError, match="rlkern token_logprobs: the torch.func transform vmap"):
        torch.func.vmap(token_logprobs)(x, t)


def test_eager_double_backward_names_the_op():
    x, t = _case()
    x.requires_grad_()
    h, w = torch.randn(6, 4, requires_grad=True), torch.randn(50, 4, requires_grad=True)
    lp, ent = token_logprobs(x, t, return_entropy=True)
    (g,) = torch.autograd.grad(lp.sum() + ent.sum(), x, create_graph=True)
    x_ref = x.detach().clone().requires_grad_()
    lp_r, ent_r = token_logprobs(x_ref, t, return_entropy=True)
    (lp_r.sum() + ent_r.sum()).backward()
    assert torch.equal(g.detach(), x_ref.grad)  # create_graph does not change the first gradient
    with pytest.raises(RuntimeError, match="rlkern::token_logprobs: double backward"):
        g.sum().backward()
    (gh,) = torch.autograd.grad(linear_token_logprobs(h, w, t.reshape(-1)).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="rlkern::linear_token_logprobs: double backward"):
        gh.sum().backward()


# ----------------------------------------------------------------------------- soft-capping and is_top1 (issue 14)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_softcap_and_top1(backend):
    x, t = _case()
    x = (x * 5).requires_grad_()
    with rlkern.use_backend(backend):
        torch.library.opcheck(torch.ops.rlkern.token_logprobs.default, (x, t, 0.8, True, -100, None, None, 4.0, True))
        if backend != "cpu":  # (the interpreter is slow)
            return
        torch.library.opcheck(torch.ops.rlkern.token_logprobs.default,
                              (x, t, 1.0, False, -100, None, None, None, True))
        n = t.numel()
        stats = [torch.randn(n), torch.randn(n), torch.rand(n)]
        torch.library.opcheck(torch.ops.rlkern.token_logprobs_backward.default,
                              (x.detach(), t, torch.empty(0), stats[0], stats[1], stats[2], torch.randn(n),
                               torch.randn(n), 0.8, -100, None, None, 3.0))
        gen = torch.Generator().manual_seed(1)
        h = torch.randn(5, 4, generator=gen, requires_grad=True)
        w = (torch.randn(30, 4, generator=gen) * 4).requires_grad_()
        b = torch.randn(30, generator=gen, requires_grad=True)
        tl = torch.randint(0, 30, (5,), generator=gen)
        torch.library.opcheck(torch.ops.rlkern.linear_token_logprobs.default,
                              (h, w, b, tl, 0.9, True, -100, 2, 8, 2.5, True))


def _softcap_fn(x, t, h, w, b, tl):
    lp, ent, top1 = token_logprobs(x, t, temperature=0.7, return_entropy=True, return_top1=True, softcap=3.0)
    lp2, top1_l = linear_token_logprobs(h, w, tl, bias=b, return_top1=True, softcap=2.0, chunk_tokens=4,
                                        chunk_vocab=16)
    return lp.sum() + ent.sum() + lp2.sum() + top1.sum() + top1_l.sum()


def test_compile_fullgraph_softcap_and_top1():
    torch._dynamo.reset()
    x, t = _case()
    x = x * 4
    gen = torch.Generator().manual_seed(2)
    h, w, b = torch.randn(6, 4, generator=gen), torch.randn(40, 4, generator=gen) * 3, torch.randn(40, generator=gen)
    tl = torch.randint(0, 40, (6,), generator=gen)
    args = (x, t, h, w, b, tl)
    explanation = torch._dynamo.explain(_softcap_fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    out_c, grads_c = _grads(torch.compile(_softcap_fn, fullgraph=True, backend="aot_eager"), *args)
    out_e, grads_e = _grads(_softcap_fn, *args)
    assert_close(out_c, out_e, 1e-6, "value")
    for gc, ge in zip(grads_c, grads_e):
        assert_close(gc, ge, 1e-6, "grad")


def test_fake_and_meta_softcap_and_top1():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 5, 1000, dtype=torch.bfloat16, requires_grad=True)
        t = torch.empty(3, 5, dtype=torch.int32)
        lp, ent, top1 = token_logprobs(x, t, return_entropy=True, return_top1=True, softcap=30.0)
        assert lp.shape == (3, 5) and top1.shape == (3, 5) and top1.dtype == torch.bool
        (lp.sum() + ent.sum()).backward()
        assert x.grad.shape == x.shape
        h = torch.empty(2, 7, 16, requires_grad=True)
        w = torch.empty(1000, 16, requires_grad=True)
        lp, top1 = linear_token_logprobs(h, w, torch.empty(2, 7, dtype=torch.long), return_top1=True, softcap=5.0)
        assert lp.shape == (2, 7) and top1.shape == (2, 7) and top1.dtype == torch.bool
        lp.sum().backward()
        assert w.grad.shape == w.shape
    x = torch.empty(4, 3, 100, device="meta", dtype=torch.float16)
    t = torch.empty(4, 3, device="meta", dtype=torch.long)
    lp, top1 = token_logprobs(x, t, return_top1=True, softcap=2.0)
    assert lp.device.type == "meta" and top1.shape == (4, 3) and top1.dtype == torch.bool


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vocab_parallel_softcap_single_rank(single_rank_group, backend):
    """The vocab-parallel path caps each rank's slice with the same kernels: on one rank it
    equals token_logprobs with the cap (values, entropy, gradient), eager and as the op."""
    x, t = _case(V=300)
    x = x * 20
    gen = torch.Generator().manual_seed(4)
    g1, g2 = torch.randn(t.shape, generator=gen), torch.randn(t.shape, generator=gen)

    def run(fn):
        leaf = x.detach().clone().requires_grad_()
        with rlkern.use_backend(backend):
            lp, ent = fn(leaf)
        ((lp * g1).sum() + (ent * g2).sum()).backward()
        return lp, ent, leaf.grad

    expected = run(lambda a: token_logprobs(a, t, temperature=0.8, return_entropy=True, softcap=4.0))
    got = run(lambda a: vocab_parallel_token_logprobs(a, t, 0, temperature=0.8, return_entropy=True, softcap=4.0))
    plain = run(lambda a: vocab_parallel_token_logprobs(a, t, 0, temperature=0.8, return_entropy=True))
    for g, e, name in zip(got, expected, ("logp", "entropy", "grad")):
        assert_close(g, e, 1e-5, name)
    assert (plain[0] - expected[0]).abs().max() > 0.1  # the cap acts
    if backend == "cpu":
        xr = x.detach().clone().requires_grad_()
        torch.library.opcheck(torch.ops.rlkern.vocab_parallel_token_logprobs.default,
                              (xr, t, 0, "", 0.8, True, -100, 4.0))
    with pytest.raises(ValueError, match="softcap"):
        vocab_parallel_token_logprobs(x, t, 0, softcap=-1.0)


def _softcap_two_rank_worker(rank, init_file):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from rlkern.reference import logprobs as ref
    from helpers import assert_close

    rlkern.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(6, 500, generator=gen, dtype=torch.float64) * 20
        logits[0, 300:] = float("inf")  # finite once capped: the row is not NaN
        targets = torch.randint(0, 500, (6,), generator=gen)
        targets[1] = 229
        targets[2] = 230
        targets[5] = -100
        g1, g2 = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
        start, stop = [(0, 230), (230, 500)][rank]
        full = logits.clone().requires_grad_()
        lp_r, ent_r = ref.token_logprobs(full, targets, temperature=0.7, return_entropy=True, softcap=5.0)
        ((lp_r * g1.double()).sum() + (ent_r * g2.double()).sum()).backward()
        shard = logits[:, start:stop].float().requires_grad_()
        lp, ent = vocab_parallel_token_logprobs(shard, targets, start, temperature=0.7, return_entropy=True,
                                                softcap=5.0)
        ((lp * g1).sum() + (ent * g2).sum()).backward()
        assert_close(lp, lp_r, 1e-5, "logp")
        assert_close(ent, ent_r, 1e-5, "entropy")
        assert_close(shard.grad, full.grad[:, start:stop], 1e-4, "grad")
        assert torch.isfinite(lp).all()
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_softcap_two_ranks(tmp_path):
    """Two gloo processes, uneven slices, a target on each side of the boundary: the capped
    slices' statistics merge to the unsharded float64 reference."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    import torch.multiprocessing as mp

    mp.spawn(_softcap_two_rank_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True)


# ----------------------------------------------------------------------------- softcap with top-k/top-p, vocab-parallel top1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_softcap_with_top_k_top_p(backend):
    """softcap with a kept set through the custom op (it used to be a ValueError before the
    op): opcheck, and the op's outputs and gradient equal the eager call's."""
    x, t = _case()
    x = (x * 5).requires_grad_()
    with rlkern.use_backend(backend):
        torch.library.opcheck(torch.ops.rlkern.token_logprobs.default, (x, t, 0.8, True, -100, 5, 0.9, 4.0, True))
        lp, ent, _, _, thr, top1 = torch.ops.rlkern.token_logprobs(x, t, 0.8, True, -100, 5, 0.9, 4.0, True)
        lp_e, ent_e, top1_e = token_logprobs(x, t, temperature=0.8, return_entropy=True, top_k=5, top_p=0.9,
                                             softcap=4.0, return_top1=True)
    assert thr.shape == (t.numel(),)
    assert torch.equal(lp, lp_e.reshape(-1)) and torch.equal(ent, ent_e.reshape(-1))
    assert torch.equal(top1, top1_e.reshape(-1))


def _softcap_top_fn(x, t):
    lp, ent = token_logprobs(x, t, temperature=0.7, return_entropy=True, top_k=6, top_p=0.8, softcap=3.0)
    return torch.where(torch.isfinite(lp), lp, 0.0).sum() + ent.sum()


def test_compile_fullgraph_softcap_with_top_k_top_p():
    torch._dynamo.reset()
    x, t = _case()
    x = x * 4
    explanation = torch._dynamo.explain(_softcap_top_fn)(x, t)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    out_c, grads_c = _grads(torch.compile(_softcap_top_fn, fullgraph=True, backend="aot_eager"), x, t)
    out_e, grads_e = _grads(_softcap_top_fn, x, t)
    assert_close(out_c, out_e, 1e-6, "value")
    assert_close(grads_c[0], grads_e[0], 1e-6, "grad")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        xf = torch.empty(3, 5, 100, dtype=torch.bfloat16, requires_grad=True)
        tf = torch.empty(3, 5, dtype=torch.long)
        lp, ent = token_logprobs(xf, tf, return_entropy=True, top_k=4, top_p=0.5, softcap=30.0)
        (lp.sum() + ent.sum()).backward()
        assert lp.shape == (3, 5) and xf.grad.shape == xf.shape
    xm = torch.empty(4, 3, 100, device="meta")
    lp = token_logprobs(xm, torch.empty(4, 3, device="meta", dtype=torch.long), top_k=4, softcap=2.0)
    assert lp.device.type == "meta" and lp.shape == (4, 3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vocab_parallel_top1_single_rank(single_rank_group, backend):
    """return_top1 on the vocab-parallel path (it used to be refused): on one rank it equals
    token_logprobs' is_top1, eager, as the op, and under torch.compile."""
    x, t = _case(V=40)
    x = x.round()  # integer logits: ties of the maximum
    t[1, 0] = int(x[1, 0].argmax())
    t[0, 0] = int(x[0, 0].argmax())
    with rlkern.use_backend(backend):
        lp_e, top1_e = token_logprobs(x, t, return_top1=True, softcap=2.0)
        lp, top1 = vocab_parallel_token_logprobs(x, t, 0, return_top1=True, softcap=2.0)
        out = torch.ops.rlkern.vocab_parallel_token_logprobs(x, t, 0, "", 1.0, False, -100, 2.0, True)
    assert top1_e.any() and torch.equal(top1, top1_e) and torch.equal(out[5], top1_e.reshape(-1))
    assert_close(lp, lp_e, 1e-6, "logp")
    if backend == "cpu":
        xr = x.detach().clone().requires_grad_()
        torch.library.opcheck(torch.ops.rlkern.vocab_parallel_token_logprobs.default,
                              (xr, t, 0, "", 0.8, True, -100, None, True))

        def fn(a):
            lp, ent, top1 = vocab_parallel_token_logprobs(a, t, 0, return_entropy=True, return_top1=True)
            return lp.sum() + ent.sum() + top1.sum()

        torch._dynamo.reset()
        out_c, grads_c = _grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), x)
        out_e, grads_e = _grads(fn, x)
        assert_close(out_c, out_e, 1e-6, "value")
        assert_close(grads_c[0], grads_e[0], 1e-6, "grad")
