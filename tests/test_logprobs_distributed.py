"""vocab_parallel_token_logprobs on 2 gloo processes against the unsharded float64 reference."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

WORLD = 2
# Uneven slices (the last is not a multiple of anything) on purpose.
SPLITS = {"fp32": [(0, 613), (613, 1000)], "bf16": [(0, 500), (500, 1000)]}


def _case(dtype_name):
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    logits = (torch.randn(3, 5, 1000, generator=gen, dtype=torch.float64) * 4).to(dtype)
    logits[0, 0, 650:] = float("-inf")  # a row with -inf on one rank
    logits[1, 1, 50] += 30.0  # a dominant token
    targets = torch.randint(0, 1000, (3, 5), generator=gen)
    targets[0, 1] = 612
    targets[0, 2] = 613  # both sides of the fp32 boundary
    targets[2, 4] = -100
    g_lp = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    return logits, targets, g_lp, g_ent


def _worker(rank, init_file, configs, checks=()):
    sys.path.insert(0, os.path.dirname(__file__))
    import rlkern

    rlkern.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for dtype_name, backend in configs:
            _check_rank(rank, dtype_name, backend)
        for check in checks:
            globals()[check](rank)
    finally:
        dist.destroy_process_group()


def _check_tiny_temperature(rank):
    """The slices' statistics merge relative to the global raw maximum, so 1/T near the
    float32 limit stays finite: the argmax distribution (a two-way tie in row 1)."""
    from rlkern.logprobs import vocab_parallel_token_logprobs
    from helpers import assert_close

    logits, _, _, _ = _case("fp32")
    logits = logits[0]
    logits[1, 900] = logits[1].max()
    targets = logits.argmax(-1)
    start, stop = SPLITS["fp32"][rank]
    lp, ent = vocab_parallel_token_logprobs(logits[:, start:stop], targets, start, temperature=2.0**-126,
                                            return_entropy=True)
    expected = torch.zeros(5)
    expected[1] = -torch.log(torch.tensor(2.0))
    assert_close(lp, expected, 1e-6, "logp")
    assert_close(ent, -expected, 1e-6, "entropy")


def _check_dtensor_rejected(rank):
    """A DTensor reaching a kernel used to kill both ranks (SIGSEGV on a Shard(2) logits);
    every tensor argument of an op without DTensor support is a TypeError naming it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from rlkern.logprobs import linear_token_logprobs, vocab_parallel_token_logprobs

    mesh = init_device_mesh("cpu", (WORLD,))
    logits = torch.randn(2, 3, 8)
    targets = torch.randint(0, 8, (2, 3))
    hidden, weight, bias = torch.randn(4, 5), torch.randn(8, 5), torch.randn(8)
    flat_t = torch.randint(0, 8, (4,))

    def d(t, placement=Replicate()):
        return distribute_tensor(t, mesh, [placement])

    cases = [
        ("hidden", lambda: linear_token_logprobs(d(hidden), weight, flat_t)),
        ("weight", lambda: linear_token_logprobs(hidden, d(weight, Shard(0)), flat_t)),
        ("bias", lambda: linear_token_logprobs(hidden, weight, flat_t, bias=d(bias))),
        ("targets", lambda: linear_token_logprobs(hidden, weight, d(flat_t))),
        ("logits_shard", lambda: vocab_parallel_token_logprobs(d(logits, Shard(2)), targets, 0)),
        ("targets", lambda: vocab_parallel_token_logprobs(logits, d(targets), 0)),
    ]
    for name, call in cases:
        try:
            call()
        except TypeError as e:
            assert name in str(e) and "DTensor" in str(e), str(e)
        else:
            raise AssertionError(f"a DTensor {name} must raise TypeError")


def _check_dtensor_token_logprobs(rank):
    """token_logprobs of DTensor logits: Shard(-1) (here Shard(2), which used to SIGSEGV both
    ranks) takes the vocab-parallel path and equals the unsharded result, values and
    gradients; Shard(0) computes per shard and keeps the placement; Partial is refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from rlkern.logprobs import token_logprobs
    from helpers import assert_close

    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 11, generator=gen) * 3  # 11: uneven vocabulary shards (6 + 5)
    targets = torch.randint(0, 11, (2, 3), generator=gen)
    targets[1, 0] = -100
    g_lp, g_ent = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)

    full = logits.clone().requires_grad_()
    lp_e, ent_e = token_logprobs(full, targets, temperature=0.8, return_entropy=True)
    ((lp_e * g_lp).sum() + (ent_e * g_ent).sum()).backward()

    for placement, target_kind in [(Shard(2), "plain"), (Shard(-1), "dtensor"), (Shard(0), "dtensor"),
                                   (Shard(1), "plain"), (Replicate(), "plain")]:
        dx = distribute_tensor(logits, mesh, [placement]).detach().requires_grad_()
        dt = distribute_tensor(targets, mesh, [Replicate()]) if target_kind == "dtensor" else targets
        lp, ent = token_logprobs(dx, dt, temperature=0.8, return_entropy=True)
        assert isinstance(lp, DTensor) and isinstance(ent, DTensor)
        if placement.is_shard() and placement.dim in (2, -1):
            assert lp.placements == (Replicate(),)
        else:
            assert lp.placements == (placement,)
        ((lp.full_tensor() * g_lp).sum() + (ent.full_tensor() * g_ent).sum()).backward()
        assert_close(lp.full_tensor(), lp_e, 1e-6, f"logp {placement}")
        assert_close(ent.full_tensor(), ent_e, 1e-6, f"entropy {placement}")
        assert_close(dx.grad.full_tensor(), full.grad, 1e-5, f"grad {placement}")
    partial = DTensor.from_local(logits / WORLD, mesh, [Partial()], run_check=False)
    try:
        token_logprobs(partial, targets)
    except ValueError as e:
        assert "Partial" in str(e) and "logits" in str(e), str(e)
    else:
        raise AssertionError("a Partial placement must raise ValueError")
    try:
        token_logprobs(distribute_tensor(logits, mesh, [Shard(2)]), targets, top_k=3)
    except ValueError as e:
        assert "top_k" in str(e), str(e)
    else:
        raise AssertionError("top_k with a vocabulary-sharded logits must raise ValueError")


def _check_top1(rank):
    """return_top1 on the vocab-parallel path (it used to be refused): the first argmax of
    the whole row, ties to the lowest global id across shards, as the unsharded
    token_logprobs and torch.argmax; with and without a cap, and through a DTensor."""
    import rlkern
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    from rlkern.logprobs import token_logprobs, vocab_parallel_token_logprobs
    from rlkern.reference import logprobs as ref
    from helpers import CPU_BACKENDS, assert_close

    V, split = 12, 7
    x = torch.tensor([[1., 5., 2., 0., 1., 0., 3., 5., 0., 1., 2., 0.],  # max 5 at 1 (rank 0) and 7 (rank 1)
                      [1., 5., 2., 0., 1., 0., 3., 5., 0., 1., 2., 0.],
                      [0., 1., 2., 3., 0., 1., 2., 9., 9., 0., 1., 0.],  # max tied inside rank 1
                      [0., 1., 2., 3., 0., 1., 2., 9., 9., 0., 1., 0.],
                      [4., 4., 0., 0., 0., 0., 0., 0., 0., 0., 0., 4.],  # tied inside rank 0 and across
                      [0., 0., 0., 0., 0., 0., 0., float("nan"), 0., 0., 9., 0.],  # NaN row: never top-1
                      [0., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0.],  # ignored row
                      [60., 0., 0., 0., 0., 0., 0., 80., 0., 0., 0., 0.]])  # capped: a tie only with softcap
    targets = torch.tensor([1, 7, 7, 8, 0, 10, -100, 7])
    gen = torch.Generator().manual_seed(4)
    rand = torch.randn(6, 4, V, generator=gen) * 2
    rand[0, 0] = rand[0, 0].round()  # ties of integer logits across the split
    rand_t = rand.argmax(-1)
    rand_t[::2, 1] = torch.randint(0, V, (3,), generator=gen)
    start, stop = (0, split) if rank == 0 else (split, V)
    for softcap in (None, 2.0):
        for backend in CPU_BACKENDS:
            for logits, tg in ((x, targets), (rand, rand_t)):
                with rlkern.use_backend(backend):
                    lp, ent, top1 = vocab_parallel_token_logprobs(logits[..., start:stop], tg, start, softcap=softcap,
                                                                  return_entropy=True, return_top1=True)
                    lp1, top1_only = vocab_parallel_token_logprobs(logits[..., start:stop], tg, start,
                                                                   softcap=softcap, return_top1=True)
                    lp_e, top1_e = token_logprobs(logits, tg, softcap=softcap, return_top1=True)
                _, top1_r = ref.token_logprobs(logits.double(), tg, softcap=softcap, return_top1=True)
                assert top1.dtype == torch.bool and top1.shape == tg.shape
                assert torch.equal(top1, top1_r), (rank, softcap, backend, top1, top1_r)
                assert torch.equal(top1_only, top1_r) and torch.equal(top1_e, top1_r)
                assert_close(lp, lp_e, 1e-6, "logp")
                assert_close(lp1, lp_e, 1e-6, "logp without entropy")
        expected = torch.tensor([True, False, True, False, True, False, False, softcap is None])
        _, top1_r = ref.token_logprobs(x.double(), targets, softcap=softcap, return_top1=True)
        assert torch.equal(top1_r, expected)
    # A gradient still flows through logp when top1 is asked for.
    shard = x[:5, start:stop].clone().requires_grad_()
    lp, top1 = vocab_parallel_token_logprobs(shard, targets[:5], start, return_top1=True)
    assert not top1.requires_grad
    lp.sum().backward()
    full = x[:5].double().requires_grad_()
    ref.token_logprobs(full, targets[:5]).sum().backward()
    assert_close(shard.grad, full.grad[:, start:stop], 1e-5, "grad")
    # Through a DTensor sharded over the vocabulary (this used to be a ValueError).
    mesh = init_device_mesh("cpu", (WORLD,))
    from torch.distributed.tensor import Shard

    d = distribute_tensor(rand, mesh, [Shard(-1)])
    lp, top1 = token_logprobs(d, rand_t, return_top1=True, softcap=3.0)
    assert isinstance(top1, DTensor) and top1.placements == (Replicate(),)
    _, top1_r = ref.token_logprobs(rand.double(), rand_t, return_top1=True, softcap=3.0)
    assert torch.equal(top1.full_tensor(), top1_r)


def _check_rank(rank, dtype_name, backend):
    import rlkern
    from rlkern.logprobs import vocab_parallel_token_logprobs
    from rlkern.reference import logprobs as ref
    from helpers import assert_close

    logits, targets, g_lp, g_ent = _case(dtype_name)
    start, stop = SPLITS[dtype_name][rank]
    shard = logits[..., start:stop].clone().requires_grad_()
    with rlkern.use_backend(backend):
        lp, ent = vocab_parallel_token_logprobs(shard, targets, start, None, temperature=0.9,
                                                return_entropy=True)
    ((lp * g_lp.float()).sum() + (ent * g_ent.float()).sum()).backward()

    full = logits.double().requires_grad_()
    lp_r, ent_r = ref.token_logprobs(full, targets, temperature=0.9, return_entropy=True)
    ((lp_r * g_lp).sum() + (ent_r * g_ent).sum()).backward()
    assert_close(lp, lp_r, 1e-5, "logp")
    assert_close(ent, ent_r, 1e-5, "entropy")
    tol = 1e-4 if dtype_name == "fp32" else 2**-7
    assert shard.grad.dtype == shard.dtype
    assert_close(shard.grad, full.grad[..., start:stop], tol, "grad")

    # Without entropy, and a target owned by no rank is an error on every rank.
    with rlkern.use_backend(backend):
        lp2 = vocab_parallel_token_logprobs(shard.detach(), targets, start)
    assert_close(lp2, ref.token_logprobs(logits.double(), targets), 1e-5, "logp without entropy")
    bad = targets.clone()
    bad[0, 0] = 1000
    try:
        vocab_parallel_token_logprobs(shard.detach(), bad, start)
    except ValueError as e:
        assert "targets" in str(e)
    else:
        raise AssertionError("an unowned target must raise")


def test_vocab_parallel_matches_unsharded(tmp_path):
    from helpers import CPU_BACKENDS

    # One spawn for every configuration: starting processes dominates the cost.
    configs = [("fp32", "cpu"), ("bf16", "cpu")] + ([("fp32", "triton")] if "triton" in CPU_BACKENDS else [])
    checks = ("_check_tiny_temperature", "_check_dtensor_rejected", "_check_dtensor_token_logprobs", "_check_top1")
    mp.spawn(_worker, args=(str(tmp_path / "init"), configs, checks), nprocs=WORLD, join=True)


def test_vocab_parallel_bad_inputs():
    from rlkern.logprobs import vocab_parallel_token_logprobs

    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="vocab_start"):
        vocab_parallel_token_logprobs(x, torch.tensor([0, 1]), -1)
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_token_logprobs(x, torch.tensor([0, 1, 2]), 0)
    with pytest.raises(ValueError, match="targets"):
        vocab_parallel_token_logprobs(x, torch.tensor([-3, 1]), 0)
    with pytest.raises(TypeError, match="logits_shard"):
        vocab_parallel_token_logprobs(x.long(), torch.tensor([0, 1]), 0)
    # Python ints beyond int64 used to raise a bare OverflowError.
    with pytest.raises(ValueError, match="vocab_start"):
        vocab_parallel_token_logprobs(x, torch.tensor([0, 1]), 2**70)
    with pytest.raises(ValueError, match="ignore_index"):
        vocab_parallel_token_logprobs(x, torch.tensor([0, 1]), 0, ignore_index=-2**70)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_token_logprobs(x, torch.tensor([0, 1]), 0, temperature=1e-39)
    with pytest.raises(TypeError, match="targets"):
        vocab_parallel_token_logprobs(x, torch.tensor([0, 1], dtype=torch.uint16), 0)
