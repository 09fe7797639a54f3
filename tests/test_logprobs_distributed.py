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


def _worker(rank, init_file, configs):
    sys.path.insert(0, os.path.dirname(__file__))
    import rlkern

    rlkern.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for dtype_name, backend in configs:
            _check_rank(rank, dtype_name, backend)
    finally:
        dist.destroy_process_group()


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
    mp.spawn(_worker, args=(str(tmp_path / "init"), configs), nprocs=WORLD, join=True)


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
