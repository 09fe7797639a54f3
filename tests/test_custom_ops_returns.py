"""The returns ops as torch.library custom ops (issue 12): opcheck, torch.compile with
fullgraph (default and dynamic shapes) and zero graph breaks, torch.export, FakeTensor
and meta inputs. Eager calls on plain tensors keep launching the kernels directly."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import rlkern
from rlkern.reference import returns as ref
from helpers import assert_close

B, T = 3, 11


def _inputs(dtype=torch.float32, seed=0, B=B, T=T):
    g = torch.Generator().manual_seed(seed)
    r, v, nv = (torch.randn(B, T, generator=g).to(dtype) for _ in range(3))
    term = torch.rand(B, T, generator=g) < 0.15
    trunc = (torch.rand(B, T, generator=g) < 0.1) & ~term
    mask = torch.rand(B, T, generator=g) < 0.8
    boot = torch.randn(B, generator=g).to(dtype)
    return r, v, nv, term, trunc, mask, boot


def _all_ops(r, v, nv, term, trunc, mask, boot):
    """Every op with its main option sets, summed into one tensor per output kind."""
    a1, b1 = rlkern.gae(r, v, term, 0.99, 0.95, bootstrap_value=boot)
    a2, b2 = rlkern.gae(r, v, term, 0.99, 0.95, next_values=nv, truncated=trunc)
    d = rlkern.discounted_returns(r, term, 0.9, bootstrap=boot)
    lr = rlkern.lambda_returns(r, nv, term, 0.97, 0.8, truncated=trunc)
    m1, m2 = rlkern.masked_gae(r, v, mask, 1.0, 0.95)
    flat = r.reshape(-1)[: (r.numel() // 3) * 3]
    g1 = rlkern.group_advantages(flat, 3)
    g2 = rlkern.group_advantages(flat, 3, estimator="rloo", scale="batch")
    return a1, b1, a2, b2, d, lr, m1, m2, g1, g2


def _custom_op_calls():
    r, v, nv, term, trunc, mask, boot = _inputs()
    return [
        (torch.ops.rlkern.discounted_returns.default, (r, term, 0.9, boot)),
        (torch.ops.rlkern.discounted_returns.default, (r.double(), term, 0.0, None)),
        (torch.ops.rlkern.gae.default, (r, v, term, 0.99, 0.95, None, None, boot)),
        (torch.ops.rlkern.gae.default, (r.bfloat16(), v, term, 0.99, 0.95, nv, trunc, None)),
        (torch.ops.rlkern.lambda_returns.default, (r, nv, term, 0.97, 0.8, trunc)),
        (torch.ops.rlkern.lambda_returns.default, (r, nv.double(), term, 1e-6, 1.0, None)),
        (torch.ops.rlkern.masked_gae.default, (r, v, mask, 1.0, 0.95)),
        (torch.ops.rlkern.group_advantages.default, (r.reshape(-1)[:30], 3, "grpo", "group", 1e-6)),
        (torch.ops.rlkern.group_advantages.default, (r.reshape(-1)[:30].double(), 5, "rloo", "batch", 0.0)),
    ]


@pytest.mark.parametrize("k", range(9))
def test_opcheck(k):
    op, args = _custom_op_calls()[k]
    torch.library.opcheck(op, args)


def test_custom_ops_outputs_are_constants():
    r, v, nv, term, trunc, mask, boot = _inputs()
    r.requires_grad_(True)
    adv, ret = torch.ops.rlkern.gae(r, v, term, 0.9, 0.9, None, None, None)
    assert not adv.requires_grad and not ret.requires_grad
    assert not torch.ops.rlkern.group_advantages(r.reshape(-1)[:30], 3, "grpo", "group", 1e-6).requires_grad


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager_without_graph_breaks(dynamic):
    torch._dynamo.reset()
    args = _inputs()
    explained = torch._dynamo.explain(_all_ops)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(_all_ops, fullgraph=True, dynamic=dynamic)
    for got, want in zip(compiled(*args), _all_ops(*args)):
        assert torch.equal(got, want)
    other = _inputs(torch.float64, seed=1, B=2, T=17)  # a second shape (and dtype): recompiles or reuses
    for got, want in zip(compiled(*other), _all_ops(*other)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_compile_with_inputs_that_require_grad_uses_the_differentiable_reference():
    """Under tracing as in eager, an input that requires grad routes to the reference
    (torch ops), which compiles whole; values and gradients equal eager's."""
    torch._dynamo.reset()
    r, v, _, term, _, mask, boot = _inputs(torch.float64, B=2, T=4)  # the reference loop unrolls over T

    def step(r, v):
        adv, ret = rlkern.gae(r, v, term, 0.99, 0.95, bootstrap_value=boot)
        return (adv * ret).sum() + rlkern.group_advantages(r.reshape(-1), 4).sum()

    compiled = torch.compile(step, fullgraph=True)  # fullgraph: a graph break would raise
    got_r, got_v = r.clone().requires_grad_(True), v.clone().requires_grad_(True)
    want_r, want_v = r.clone().requires_grad_(True), v.clone().requires_grad_(True)
    got, want = compiled(got_r, got_v), step(want_r, want_v)
    got.backward()
    want.backward()
    assert_close(got, want, 1e-12)
    assert_close(got_r.grad, want_r.grad, 1e-12)
    assert_close(got_v.grad, want_v.grad, 1e-12)


def test_out_buffers_under_tracing_raise_a_clear_error():
    torch._dynamo.reset()
    r, v, _, term, *_ = _inputs()

    def with_out(r, v):
        a, b = torch.empty_like(r), torch.empty_like(r)
        return rlkern.gae(r, v, term, 0.9, 0.9, out=(a, b))

    with pytest.raises(Exception, match="out= is eager-only"):
        torch.compile(with_out, fullgraph=True)(r, v)
    with FakeTensorMode():
        fr, fv = torch.randn(2, 5), torch.randn(2, 5)
        with pytest.raises(RuntimeError, match="out= is eager-only"):
            rlkern.discounted_returns(fr, torch.zeros(2, 5, dtype=torch.bool), 0.9, out=torch.empty(2, 5))


def _shapes_and_dtypes(outs):
    return [(tuple(o.shape), o.dtype) for o in outs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fake_tensor_mode_gives_the_right_shapes_and_dtypes(dtype):
    real = _inputs(dtype)
    want = _shapes_and_dtypes(_all_ops(*real))
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = [mode.from_tensor(t) for t in real]
        outs = _all_ops(*fake)
    assert all(isinstance(o, FakeTensor) for o in outs)
    assert _shapes_and_dtypes(outs) == want
    with FakeTensorMode():  # 1-D rows
        r = torch.randn(T, dtype=dtype)
        adv, ret = rlkern.gae(r, r, torch.zeros(T, dtype=torch.bool), 0.9, 0.9)
        assert adv.shape == (T,) and ret.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_meta_tensors_give_the_right_shapes_and_dtypes(dtype):
    real = _inputs(dtype)
    want = _shapes_and_dtypes(_all_ops(*real))
    outs = _all_ops(*(t.to("meta") for t in real))
    assert all(o.device.type == "meta" for o in outs)
    assert _shapes_and_dtypes(outs) == want
    big = torch.empty(4096, 100000, device="meta")  # no data, no loop over T
    adv, _ = rlkern.gae(big, big, torch.empty(4096, 100000, dtype=torch.bool, device="meta"), 0.99, 0.95)
    assert adv.shape == big.shape and adv.device.type == "meta"


def test_dtensor_stays_a_type_error():
    """DTensor support is the lead's (issue 12): until then it is refused by name; a
    FakeTensor is not refused any more."""
    from torch.testing._internal.two_tensor import TwoTensor

    r, v, _, term, *_ = _inputs()
    with pytest.raises(TypeError, match="values is a .*TwoTensor"):
        rlkern.gae(r, TwoTensor(v, v), term, 0.9, 0.9)


class _GaeModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.value_head = torch.nn.Linear(4, 1)

    def forward(self, obs, rewards, terminated):
        values = self.value_head(obs).squeeze(-1).detach()
        adv, ret = rlkern.gae(rewards, values, terminated, 0.99, 0.95)
        scores = rlkern.group_advantages(rewards.sum(1), 2)
        return adv, ret, scores


def test_torch_export_of_a_module_using_gae():
    module = _GaeModule()
    g = torch.Generator().manual_seed(3)
    obs, rewards = torch.randn(4, 9, 4, generator=g), torch.randn(4, 9, generator=g)
    terminated = torch.rand(4, 9, generator=g) < 0.2
    exported = torch.export.export(module, (obs, rewards, terminated))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "rlkern.gae.default" in targets and "rlkern.group_advantages.default" in targets, targets
    for got, want in zip(exported.module()(obs, rewards, terminated), module(obs, rewards, terminated)):
        assert torch.equal(got, want)
    values = module.value_head(obs).squeeze(-1).detach()
    assert_close(exported.module()(obs, rewards, terminated)[0],
                 ref.gae(rewards.double(), values.double(), terminated, 0.99, 0.95)[0])
