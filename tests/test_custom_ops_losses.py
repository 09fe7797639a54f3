"""torch.library custom ops of the loss family (issue #12): opcheck, torch.compile with
fullgraph and zero graph breaks, FakeTensor/meta shapes, torch.func and double backward.

Done so far: kl_penalty (rlkern::kl_penalty). policy_loss, value_loss, dpo_loss and
bradley_terry_loss are not registered yet (see the report of the losses branch).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import rlkern
from rlkern import kl

from helpers import assert_close


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 5, generator=g, dtype=torch.float64)
    return logp.to(dtype), (logp + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kl_penalty_opcheck(dtype):
    logp, refp = _inputs(dtype)
    for want_grad in (True, False):
        torch.library.opcheck(torch.ops.rlkern.kl_penalty.default,
                              (logp.requires_grad_(want_grad), refp, 2, True, -10.0, False, 0.0, want_grad))


@pytest.mark.parametrize("dynamic", [False, True])
def test_kl_penalty_compiles_whole_and_matches_eager(dynamic):
    torch._dynamo.reset()
    logp, refp = _inputs()

    def f(x, r):
        return (kl.kl_penalty(x, r, "k3", 10.0) * torch.arange(5.0)).sum() + kl.kl_penalty(x, r, "k1").mean()

    x = logp.clone().requires_grad_()
    eager = f(x, refp)
    (ge,) = torch.autograd.grad(eager, x)
    assert torch._dynamo.explain(f)(x, refp).graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic)(x, refp)
    (gc,) = torch.autograd.grad(compiled, x)
    assert_close(compiled, eager, 1e-6)
    assert_close(gc, ge, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kl_penalty_fake_and_meta_shapes(dtype):
    logp, refp = _inputs(dtype)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    with FakeTensorMode() as mode:
        out = kl.kl_penalty(mode.from_tensor(logp), mode.from_tensor(refp), "k2")
        assert out.shape == (3, 5) and out.dtype == want
    out = kl.kl_penalty(logp.to("meta").requires_grad_(), refp.to("meta"), "k3", (None, 1.0))
    assert out.device.type == "meta" and out.shape == (3, 5) and out.dtype == want


def test_kl_penalty_torch_func():
    logp, refp = _inputs()
    batched = torch.func.vmap(lambda a, b: kl.kl_penalty(a, b, "k3"))(logp, refp)
    assert_close(batched, kl.kl_penalty(logp, refp, "k3"), 1e-7)
    with pytest.raises(RuntimeError, match="rlkern::kl_penalty.*torch.func.grad"):
        torch.func.grad(lambda a: kl.kl_penalty(a, refp).sum())(logp)


def test_kl_penalty_double_backward_names_the_op():
    logp, refp = _inputs()
    x = logp.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="rlkern::kl_penalty.*double backward"):
        (g,) = torch.autograd.grad(kl.kl_penalty(x, refp).sum(), x, create_graph=True)
        g.sum().backward()
