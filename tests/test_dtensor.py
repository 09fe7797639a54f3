"""DTensor inputs on 2 gloo processes: batch-sharded (Shard(0)) and replicated losses and
scans equal the single-process result on the whole batch (values, metrics, gradients);
other placements raise ValueError naming them."""

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

WORLD = 2
AGGS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _batch(B=5, T=7):
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(B, T, generator=g, dtype=torch.float64).float() - 1
    old = logp + 0.1 * torch.randn(B, T, generator=g)
    ref = logp + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False  # an empty sequence on each rank (Shard(0) puts rows 0-2 on rank 0, 3-4 on rank 1)
    mask[4] = False
    return logp, old, ref, adv, mask


def _check_losses(mesh, placement):
    import rlkern
    from helpers import assert_close
    from torch.distributed.tensor import distribute_tensor

    logp, old, ref, adv, mask = _batch()

    def dt(x):
        return distribute_tensor(x, mesh, [placement])

    for agg in AGGS:
        for extra in ({}, {"ref_logp": ref, "kl_coef": 0.1, "level": "sequence"}, {"normalizer": 11.0}):
            full = logp.clone().requires_grad_()
            expected = rlkern.policy_loss(full, old, adv, mask, agg=agg, clip_low=0.1, **extra)
            expected.loss.backward()
            d = dt(logp.clone()).requires_grad_()
            dextra = {k: dt(v) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
            got = rlkern.policy_loss(d, dt(old), dt(adv), dt(mask), agg=agg, clip_low=0.1, **dextra)
            got.loss.backward()
            what = f"policy_loss {agg} {placement} {sorted(extra)}"
            assert_close(got.loss.to_local(), expected.loss, name=what)
            assert_close(d.grad.full_tensor(), full.grad, tol=1e-4, name=f"grad {what}")
            assert set(got.metrics) == set(expected.metrics)
            for k, v in expected.metrics.items():
                assert_close(got.metrics[k].to_local(), v, name=f"{k} {what}")

    if placement.is_shard():
        _check_no_host_read(mesh, dt, logp, old, adv, mask)

    g = torch.Generator().manual_seed(2)  # every rank builds the same global batch
    values = torch.randn(5, 7, generator=g)
    old_values = values + 0.3 * torch.randn(5, 7, generator=g)
    returns = torch.randn(5, 7, generator=g)
    for agg in AGGS:
        full = values.clone().requires_grad_()
        expected = rlkern.value_loss(full, old_values, returns, mask, clip=0.2, agg=agg)
        expected.loss.backward()
        d = dt(values.clone()).requires_grad_()
        got = rlkern.value_loss(d, dt(old_values), dt(returns), dt(mask), clip=0.2, agg=agg)
        got.loss.backward()
        assert_close(got.loss.to_local(), expected.loss, name=f"value_loss {agg}")
        assert_close(d.grad.full_tensor(), full.grad, tol=1e-4, name=f"value_loss grad {agg}")

    c, rj, rc, rr = (torch.randn(5, generator=g) for _ in range(4))
    full = c.clone().requires_grad_()
    expected = rlkern.dpo_loss(full, rj, rc, rr, beta=0.2)
    expected.loss.backward()
    d = dt(c.clone()).requires_grad_()
    got = rlkern.dpo_loss(d, dt(rj), dt(rc), dt(rr), beta=0.2)
    got.loss.backward()
    assert_close(got.loss.to_local(), expected.loss, name="dpo_loss")
    assert_close(d.grad.full_tensor(), full.grad, tol=1e-4, name="dpo_loss grad")
    for k, v in expected.metrics.items():
        m = got.metrics[k]
        assert_close(m.full_tensor() if m.dim() else m.to_local(), v, name=f"dpo {k}")

    full = c.clone().requires_grad_()
    expected = rlkern.bradley_terry_loss(full, rj, margin=0.5)
    expected.loss.backward()
    d = dt(c.clone()).requires_grad_()
    got = rlkern.bradley_terry_loss(d, dt(rj), margin=0.5)
    got.loss.backward()
    assert_close(got.loss.to_local(), expected.loss, name="bradley_terry_loss")
    assert_close(d.grad.full_tensor(), full.grad, tol=1e-4, name="bradley_terry_loss grad")


def _check_no_host_read(mesh, dt, logp, old, adv, mask):
    """The global token and sequence counts reach the losses as tensors: no value is read
    back to the host on the way (on a GPU mesh, each read would be a synchronisation)."""
    import rlkern

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor's value was read back to the host")

    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__bool__")}
    try:
        for name in saved:
            setattr(torch.Tensor, name, refuse)
        for agg in ("token-mean", "seq-mean-token-mean"):
            rlkern.policy_loss(dt(logp), dt(old), dt(adv), dt(mask), agg=agg)
            rlkern.value_loss(dt(logp), None, dt(old), dt(mask), agg=agg)
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _check_rowwise(mesh, placement):
    import rlkern
    from helpers import assert_close
    from torch.distributed.tensor import DTensor, distribute_tensor

    def dt(x):
        return distribute_tensor(x, mesh, [placement])

    g = torch.Generator().manual_seed(1)
    r, v, nv = (torch.randn(5, 9, generator=g) for _ in range(3))
    term = torch.rand(5, 9, generator=g) > 0.8
    trunc = torch.rand(5, 9, generator=g) > 0.9
    cases = [
        (rlkern.gae, (r, v, term, 0.9, 0.8), {"next_values": nv, "truncated": trunc}),
        (rlkern.discounted_returns, (r, term, 0.95), {}),
        (rlkern.lambda_returns, (r, nv, term, 0.9, 0.7), {}),
        (rlkern.masked_gae, (r, v, ~term, 1.0, 0.95), {}),
    ]
    for fn, args, kwargs in cases:
        expected = fn(*args, **kwargs)
        got = fn(*(dt(a) if isinstance(a, torch.Tensor) else a for a in args),
                 **{k: dt(a) for k, a in kwargs.items()})
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = got if isinstance(got, tuple) else (got,)
        for e, o in zip(expected, got):
            assert isinstance(o, DTensor) and tuple(o.placements) == (placement,)
            assert_close(o.full_tensor(), e, name=fn.__name__)

    scores = torch.randn(8, generator=g)
    expected = rlkern.group_advantages(scores, 4)
    got = rlkern.group_advantages(dt(scores), 4)
    assert_close(got.full_tensor(), expected, name="group_advantages")

    logp, ref = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    for p in (placement, type(placement)(1) if placement.is_shard() else placement):
        full = logp.clone().requires_grad_()
        expected = rlkern.kl_penalty(full, ref, "k3")
        expected.sum().backward()
        d = distribute_tensor(logp.clone(), mesh, [p]).requires_grad_()
        got = rlkern.kl_penalty(d, distribute_tensor(ref, mesh, [p]), "k3")
        got.sum().backward()
        assert_close(got.full_tensor(), expected, name=f"kl_penalty {p}")
        assert_close(d.grad.full_tensor(), full.grad, name=f"kl_penalty grad {p}")


def _check_errors(mesh):
    import rlkern
    from torch.distributed.tensor import Partial, Shard, distribute_tensor
    from torch.distributed.tensor import DTensor

    logp, old, _, adv, mask = _batch()
    s1 = [distribute_tensor(x, mesh, [Shard(1)]) for x in (logp, old, mask)]
    with pytest.raises(ValueError, match=r"logp has placement Shard\(dim=1\)"):
        rlkern.policy_loss(s1[0], s1[1], distribute_tensor(adv, mesh, [Shard(0)]), s1[2])
    with pytest.raises(ValueError, match=r"rewards has placement Shard\(dim=1\)"):
        rlkern.gae(s1[0], s1[1], s1[2], 0.9, 0.9)
    partial = DTensor.from_local(logp, mesh, [Partial()])
    with pytest.raises(ValueError, match="Partial"):
        rlkern.kl_penalty(partial, partial)
    d = distribute_tensor(logp, mesh, [Shard(0)])
    with pytest.raises(ValueError, match="old_logp is a plain tensor"):
        rlkern.policy_loss(d, old, distribute_tensor(adv, mesh, [Shard(0)]), distribute_tensor(mask, mesh, [Shard(0)]))
    with pytest.raises(ValueError, match="scale"):
        rlkern.group_advantages(distribute_tensor(torch.zeros(8), mesh, [Shard(0)]), 4, scale="batch")


def _check_unsupported(mesh):
    """Ops without DTensor support say so with a TypeError naming the argument."""
    import rlkern
    from torch.distributed.tensor import Shard, distribute_tensor

    with pytest.raises(TypeError, match="prior_logits.*DTensor"):
        rlkern.mcts.Forest(2, 3, 8).set_roots(distribute_tensor(torch.zeros(2, 3), mesh, [Shard(0)]),
                                              distribute_tensor(torch.zeros(2), mesh, [Shard(0)]))


def _worker(rank, init_file, results):
    sys.path.insert(0, os.path.dirname(__file__))
    import rlkern
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    rlkern.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for placement in (Shard(0), Replicate()):
            _check_rowwise(mesh, placement)
        _check_errors(mesh)
        for placement in (Shard(0), Replicate()):
            _check_losses(mesh, placement)
        _check_unsupported(mesh)
    finally:
        dist.destroy_process_group()


def test_dtensor_losses_and_scans_match_one_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), None), nprocs=WORLD, join=True)
