"""The nastiest inputs of the loss ops, each batch in a fresh interpreter (issue #11).

Every case must end in the documented way: a result, or a ValueError/TypeError naming
the argument; never a signal, an abort or a hang. ``run_isolated`` turns a segfault into
one failed test instead of a dead test run.
"""

from __future__ import annotations

import pytest
import torch

import rlkern
from rlkern import kl, losses

from helpers import run_isolated

# Shared by every subprocess: `expect(exc, word, fn)` runs fn and checks that it raised exc
# (None: no exception) with `word` in the message; `ok(tag)` prints a line per case.
PRELUDE = r"""
import math, torch, rlkern
from rlkern import losses, kl
from torch._subclasses.fake_tensor import FakeTensorMode

CASES = 0
def expect(exc, word, fn):
    global CASES
    CASES += 1
    try:
        out = fn()
    except Exception as e:
        assert exc is not None and isinstance(e, exc), f"case {CASES}: unexpected {type(e).__name__}: {e}"
        assert word in str(e), f"case {CASES}: {word!r} not in {e}"
        return None
    # A tuple means "this error or a result": ops that have a fake implementation return
    # shapes under FakeTensorMode, the others refuse the subclass with a TypeError.
    assert exc is None or isinstance(exc, tuple), f"case {CASES}: expected {exc.__name__}, got a result"
    return out

class Sub(torch.Tensor):
    pass

def batch(B=3, T=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(B, T, generator=g).to(dtype)
    return lp, lp + 0.1, torch.randn(B, generator=g).to(dtype), torch.rand(B, T, generator=g) > 0.3
"""


def _run(body: str, backend: str = "cpu") -> None:
    env = {"RLKERN_BACKEND": backend}
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    proc = run_isolated(PRELUDE + body + "\nprint('cases', CASES)\n", timeout=240, env=env)
    assert "cases" in proc.stdout


BACKENDS = ["cpu", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_nasty_inputs(backend):
    _run(r"""
lp, old, adv, m = batch()
# tensor subclasses and fake tensors never reach a data pointer
expect(TypeError, "logp", lambda: losses.policy_loss(lp.as_subclass(Sub), old, adv, m))
expect(TypeError, "entropy", lambda: losses.policy_loss(lp, old, adv, m, entropy=lp.as_subclass(Sub)))
expect(TypeError, "mask", lambda: losses.policy_loss(lp, old, adv, m.to_sparse()))
with FakeTensorMode() as mode:
    f = [mode.from_tensor(t) for t in (lp, old, adv, m)]
    out = expect((TypeError,), "", lambda: losses.policy_loss(*f))
    if out is not None:
        assert out.loss.shape == ()
# zero-size dims, wrong shapes, dtypes and devices
expect(ValueError, "logp", lambda: losses.policy_loss(lp[:0], old[:0], adv[:0], m[:0]))
expect(ValueError, "logp", lambda: losses.policy_loss(lp[:, :0], old[:, :0], adv, m[:, :0]))
expect(ValueError, "advantages", lambda: losses.policy_loss(lp, old, adv[:2], m))
expect(TypeError, "advantages", lambda: losses.policy_loss(lp, old, adv.long(), m))
expect(TypeError, "mask", lambda: losses.policy_loss(lp, old, adv, m.to(torch.complex64)))
expect(TypeError, "old_logp", lambda: losses.policy_loss(lp, old.to(torch.int32), adv, m))
expect(ValueError, "meta", lambda: losses.policy_loss(lp, old.to("meta"), adv, m))
expect(ValueError, "normalizer", lambda: losses.policy_loss(lp, old, adv, m, normalizer=float("nan")))
expect(ValueError, "log_ratio_clamp", lambda: losses.policy_loss(lp, old, adv, m, log_ratio_clamp=(float("nan"), 1.0)))
# non-contiguous, broadcast (stride 0) and overlapping views compute like contiguous copies
base = losses.policy_loss(lp, old, adv, m, ref_logp=old, kl_coef=0.1).loss
wide = torch.zeros(3, 10)
wide[:, ::2] = lp
out = expect(None, "", lambda: losses.policy_loss(wide[:, ::2], old.t().contiguous().t(), adv, m,
                                                  ref_logp=old, kl_coef=0.1)).loss
assert out.item() == base.item()
expect(None, "", lambda: losses.policy_loss(lp[:1].expand(3, 5), old[:1].expand(3, 5), adv[:1].expand(3), m))
# huge, NaN and infinite values at active positions: NaN policy, no crash
for v in (float("nan"), float("inf"), -float("inf"), 3e38, -3e38):
    x = lp.clone(); x[0, 0] = v
    a = adv.clone(); a[1] = v
    for agg in ("token-mean", "seq-mean-token-sum-norm"):
        r = expect(None, "", lambda: losses.policy_loss(x, old, a, m | torch.eye(3, 5, dtype=torch.bool), agg=agg,
                   level="sequence", ref_logp=old, kl_coef=0.1, entropy=x.abs(), entropy_coef=0.1,
                   entropy_top_fraction=0.5, rollout_logp=old, tis_cap=2.0))
        r.loss.item()
# every row empty, one long row, tiny normalizer
assert losses.policy_loss(lp, old, adv, torch.zeros_like(m)).loss.item() == 0.0
import os
long = -torch.rand(1, 70000 if os.environ["RLKERN_BACKEND"] == "cpu" else 3000)  # the interpreter is slow
expect(None, "", lambda: losses.policy_loss(long, long, torch.ones(1), torch.ones_like(long, dtype=torch.bool),
                                            level="sequence"))
expect(None, "", lambda: losses.policy_loss(lp, old, adv, m, normalizer=1e-300))
""", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_and_pair_losses_nasty_inputs(backend):
    _run(r"""
v, vo, _, m = batch()
R = v + 1
expect(TypeError, "values", lambda: losses.value_loss(v.as_subclass(Sub), vo, R, m))
expect(TypeError, "old_values", lambda: losses.value_loss(v, vo.as_subclass(Sub), R, m, clip=0.2))
expect(ValueError, "values", lambda: losses.value_loss(v[:0], vo[:0], R[:0], m[:0]))
expect(ValueError, "returns", lambda: losses.value_loss(v, vo, R[:, :2], m))
expect(ValueError, "old_values", lambda: losses.value_loss(v, None, R, m, clip=0.2))
expect(ValueError, "meta", lambda: losses.value_loss(v, vo, R.to("meta"), m))
for bad in (float("nan"), float("inf"), -float("inf"), 3e38):
    x = vo.clone(); x[0, :] = bad
    losses.value_loss(v, x, R, m | torch.eye(3, 5, dtype=torch.bool), clip=0.2).loss.item()
    losses.value_loss(v.t().contiguous().t(), x, R[:1].expand(3, 5), None, clip=0.0,
                      agg="seq-mean-token-mean").loss.item()
c = -torch.rand(4)
expect(TypeError, "chosen_logp", lambda: losses.dpo_loss(c.as_subclass(Sub), c, c, c))
expect(TypeError, "ref_rejected_logp", lambda: losses.dpo_loss(c, c, c, c.as_subclass(Sub)))
expect(ValueError, "chosen_logp", lambda: losses.dpo_loss(c[:0], c[:0], c[:0], c[:0]))
expect(ValueError, "rejected_logp", lambda: losses.dpo_loss(c, c[:2], c, c))
expect(ValueError, "beta", lambda: losses.dpo_loss(c, c, c, c, beta=float("nan")))
expect(TypeError, "margin", lambda: losses.bradley_terry_loss(c, c, c.as_subclass(Sub)))
expect(ValueError, "chosen_reward", lambda: losses.bradley_terry_loss(c[:0], c[:0]))
expect(ValueError, "margin", lambda: losses.bradley_terry_loss(c, c, torch.zeros(2)))
for bad in (float("nan"), float("inf"), -float("inf"), 3e38):
    x = c.clone(); x[0] = bad
    for t in ("sigmoid", "ipo", "hinge"):
        losses.dpo_loss(x, c, c[:1].expand(4), c.flip(0), loss_type=t).loss.item()
    losses.bradley_terry_loss(x, c, bad).loss.item()
with FakeTensorMode() as mode:
    f = mode.from_tensor(c)
    for fn in (lambda: losses.dpo_loss(f, f, f, f), lambda: losses.bradley_terry_loss(f, f),
               lambda: losses.value_loss(mode.from_tensor(v), None, mode.from_tensor(R))):
        out = expect((TypeError,), "", fn)
        if out is not None:
            assert out.loss.shape == ()
""", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_penalty_nasty_inputs(backend):
    _run(r"""
a = -torch.rand(3, 4)
expect(TypeError, "logp", lambda: kl.kl_penalty(a.as_subclass(Sub), a))
expect(TypeError, "ref_logp", lambda: kl.kl_penalty(a, a.as_subclass(Sub)))
expect(ValueError, "clamp", lambda: kl.kl_penalty(a, a, clamp=(None, float("nan"))))
expect(ValueError, "ref_logp", lambda: kl.kl_penalty(a, a[:2]))
assert kl.kl_penalty(a[:0], a[:0]).shape == (0, 4)
assert kl.kl_penalty(torch.zeros(()), torch.zeros(())).shape == ()
for bad in (float("nan"), float("inf"), -float("inf"), 3e38):
    x = a.clone(); x[0, 0] = bad
    for kind in ("k1", "k2", "k3"):
        out = kl.kl_penalty(x.t(), a[:1].expand(3, 4).t(), kind, clamp=10.0)
        if bad != bad:
            assert math.isnan(out[0, 0].item())
with FakeTensorMode() as mode:
    f = mode.from_tensor(a)
    out = expect((TypeError,), "", lambda: kl.kl_penalty(f, f))
    if out is not None:
        assert out.shape == (3, 4)
""", backend)


def test_results_are_bit_identical_across_thread_counts():
    """Every op and aggregation gives the same bits with 1 and 2 threads (rows large enough
    that the pool splits them)."""
    g = torch.Generator().manual_seed(3)
    B, T = 64, 700
    logp = -torch.rand(B, T, generator=g)
    old = logp + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[5] = False

    def everything():
        outs = []
        for agg in ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            for level in ("token", "sequence"):
                x = logp.clone().requires_grad_()
                out = losses.policy_loss(x, old, adv, mask, agg=agg, level=level, ref_logp=old, kl_coef=0.1,
                                         entropy=-logp, entropy_coef=0.01, rollout_logp=old, tis_cap=2.0)
                (gr,) = torch.autograd.grad(out.loss, x)
                outs += [out.loss, gr, *out.metrics.values()]
            v = logp.clone().requires_grad_()
            vl = losses.value_loss(v, old, adv[:, None].expand(B, T), mask, clip=0.1, agg=agg)
            outs += [vl.loss, torch.autograd.grad(vl.loss, v)[0]]
        outs.append(kl.kl_penalty(logp, old, "k3", 10.0))
        pairs = logp.reshape(-1)[:4096]
        outs.append(losses.dpo_loss(pairs, pairs.flip(0), pairs * 0.5, pairs.roll(1)).loss)
        outs.append(losses.bradley_terry_loss(pairs, pairs.flip(0), 0.1).loss)
        return outs

    before = rlkern.get_num_threads()
    try:
        with rlkern.use_backend("cpu"):
            rlkern.set_num_threads(1)
            one = everything()
            rlkern.set_num_threads(2)
            two = everything()
    finally:
        rlkern.set_num_threads(before)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"output {i} differs between 1 and 2 threads"
