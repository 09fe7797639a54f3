"""torch.library custom ops of the loss family (issue #12): opcheck, torch.compile with
fullgraph and zero graph breaks, torch.export, FakeTensor/meta shapes, torch.func, double
backward, tensor normalizers that never reach the host, and policy_loss's typed options
(issue #15).

Ops: rlkern::kl_penalty, rlkern::policy_loss, rlkern::value_loss, rlkern::dpo_loss,
rlkern::bradley_terry_loss.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import rlkern
from rlkern import _backend, kl, losses
from rlkern.reference import losses as ref_losses

from helpers import CPU_BACKENDS, assert_close


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


# ----------------------------------------------------------------------------- the losses

B, T = 3, 6


def _batch(dtype=torch.float32, B=B, T=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64)).to(dtype)
    old = (logp.double() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    ref = (logp.double() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    roll = (old.double() + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64).to(dtype)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    return logp, old, ref, roll, ent, adv, mask


def _pairs(seed=2, n=5):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, generator=g) - 2 for _ in range(4))


# The main option sets of policy_loss (tensor options by name, filled from _batch).
POLICY_SETS = [
    {},
    {"clip_high": 0.28, "ref_logp": "ref", "kl_coef": 0.04, "kl_kind": "k3"},
    {"objective": "cispo", "level": "sequence", "log_ratio_clamp": (None, 10.0), "agg": "seq-mean-token-mean"},
    {"dual_clip": 3.0, "entropy": "ent", "entropy_coef": 0.01, "agg": "token-sum", "normalizer": 7.0,
     "weights": "wts"},
    {"rollout_logp": "roll", "tis_cap": 2.0, "tis_min": 0.99, "off_policy_threshold": 0.5,
     "off_policy_logp": "ref", "agg": "seq-mean-token-sum-norm",
     "weights": "wts"},
    {"objective": "reinforce", "entropy": "ent", "entropy_top_fraction": 0.5, "agg": "seq-mean-token-sum"},
]


def _options(opts, batch):
    # The entropies, in [0, 1), double as per-token policy weights.
    named = {"ref": batch[2], "roll": batch[3], "ent": batch[4], "wts": batch[4].detach()}
    return {k: named[v] if isinstance(v, str) and v in named else v for k, v in opts.items()}


def _all_losses(logp, ent, old, ref, roll, adv, mask, values, old_values, returns, pairs, normalizer):
    """Every loss with its main option sets, summed into one loss; plus the metrics."""
    batch = (logp, old, ref, roll, ent, adv, mask)
    total = 0
    metrics = {}
    for i, opts in enumerate(POLICY_SETS):
        out = rlkern.policy_loss(logp, old, adv, mask, **_options(opts, batch))
        total = total + out.loss
        metrics.update({f"p{i}_{k}": v for k, v in out.metrics.items()})
    out = rlkern.policy_loss(logp, old, adv, mask, normalizer=normalizer)
    total = total + out.loss
    for opts in ({"clip": 0.2}, {"clip": None, "agg": "seq-mean-token-mean", "normalizer": normalizer}):
        out = rlkern.value_loss(values, old_values, returns, mask, **opts)
        total = total + out.loss
        metrics.update({f"v_{k}": v for k, v in out.metrics.items()})
    c, r, rc, rr = pairs
    for loss_type in ("sigmoid", "ipo"):
        out = rlkern.dpo_loss(c, r, rc, rr, beta=0.2, loss_type=loss_type)
        total = total + out.loss
        metrics.update({f"dpo_{loss_type}_{k}": v for k, v in out.metrics.items()})
    for margin in (None, rc):
        out = rlkern.bradley_terry_loss(c, r, margin=margin)
        total = total + out.loss
        metrics.update({f"bt_{k}": v for k, v in out.metrics.items()})
    return total, metrics


def _all_inputs():
    logp, old, ref, roll, ent, adv, mask = _batch()
    g = torch.Generator().manual_seed(3)
    values = torch.randn(B, T, generator=g)
    old_values = values + 0.3 * torch.randn(B, T, generator=g)
    returns = torch.randn(B, T, generator=g)
    pairs = list(_pairs())
    return logp, ent, old, ref, roll, adv, mask, values, old_values, returns, pairs


def _leaves(inputs):
    logp, ent, *rest = inputs
    values = rest[5]
    pairs = rest[8]
    leaves = [logp.clone().requires_grad_(), ent.clone().requires_grad_(), values.clone().requires_grad_(),
              pairs[0].clone().requires_grad_(), pairs[1].clone().requires_grad_()]
    args = [leaves[0], leaves[1]] + rest[:5] + [leaves[2]] + rest[6:8] + [[leaves[3], leaves[4]] + pairs[2:]]
    return leaves, args


@pytest.mark.parametrize("dynamic", [False, True])
def test_losses_compile_whole_and_match_eager(dynamic):
    torch._dynamo.reset()
    inputs = _all_inputs()
    normalizer = torch.tensor(9.0)

    leaves, args = _leaves(inputs)
    eager, eager_metrics = _all_losses(*args, normalizer)
    eager_grads = torch.autograd.grad(eager, leaves)

    leaves, args = _leaves(inputs)
    assert torch._dynamo.explain(_all_losses)(*args, normalizer).graph_break_count == 0
    torch._dynamo.reset()
    compiled, metrics = torch.compile(_all_losses, fullgraph=True, dynamic=dynamic)(*args, normalizer)
    grads = torch.autograd.grad(compiled, leaves)
    assert_close(compiled, eager, 1e-6)
    for name, g, e in zip(("logp", "entropy", "values", "chosen", "rejected"), grads, eager_grads):
        assert_close(g, e, 1e-5, name=name)
    assert set(metrics) == set(eager_metrics)
    for name, value in eager_metrics.items():
        assert_close(metrics[name], value, 1e-6, name=name)


def test_scalars_given_as_arguments_compile_under_dynamic_shapes():
    """Floats passed into a compiled function (symbolic under dynamic=True) reach the
    checks and the ops without a graph break."""
    torch._dynamo.reset()
    logp, old, ref, roll, ent, adv, mask = _batch()
    pairs = _pairs()

    def f(lp, clip_low, clip, beta, normalizer):
        a = rlkern.policy_loss(lp, old, adv, mask, clip_low=clip_low, normalizer=normalizer)
        b = rlkern.value_loss(lp, old, ref, mask, clip=clip, normalizer=normalizer)
        c = rlkern.dpo_loss(*pairs, beta=beta)
        return a.loss + b.loss + c.loss

    x = logp.clone().requires_grad_()
    eager = f(x, 0.1, 0.3, 0.5, 4.0)
    (ge,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for _ in range(2):  # a second call with the same values reuses the graph
        got = compiled(x, 0.1, 0.3, 0.5, 4.0)
        (gc,) = torch.autograd.grad(got, x)
        assert_close(got, eager, 1e-6)
        assert_close(gc, ge, 1e-5)


def _op_samples(backend):
    """(op, args) for opcheck: every loss op with its main option sets."""
    logp, old, ref, roll, ent, adv, mask = _batch()
    batch = (logp, old, ref, roll, ent, adv, mask)
    samples = []
    # Under the Triton interpreter each sample costs seconds: there, two policy option sets.
    for opts in POLICY_SETS if backend == "cpu" else POLICY_SETS[1::2][:2]:
        o = _options(opts, batch)
        tensors = {k: o.pop(k, None) for k in ("ref_logp", "rollout_logp", "entropy", "weights", "off_policy_logp")}
        spec, values = losses._encode_options(o)
        e = tensors["entropy"]
        samples.append((torch.ops.rlkern.policy_loss.default,
                        (logp.clone().requires_grad_(), old, adv, mask, tensors["ref_logp"], tensors["rollout_logp"],
                         None if e is None else e.clone().requires_grad_(), tensors["weights"],
                         tensors["off_policy_logp"], None, spec, values, e is not None)))
    spec, values = losses._encode_options({"agg": "token-sum"})
    samples.append((torch.ops.rlkern.policy_loss.default,
                    (logp.to(torch.bfloat16).requires_grad_(), old.to(torch.bfloat16), adv, mask, None, None, None,
                     None, None, torch.tensor(5.0), spec, values, False)))
    v = logp.clone().requires_grad_()
    samples.append((torch.ops.rlkern.value_loss.default, (v, old, ref, mask, None, 0.2, "token-mean", None)))
    samples.append((torch.ops.rlkern.value_loss.default,
                    (v, None, ref, mask, torch.tensor(3.0), None, "seq-mean-token-sum", None)))
    c, r, rc, rr = _pairs()
    for loss_type in ("sigmoid", "hinge")[: 2 if backend == "cpu" else 1]:
        samples.append((torch.ops.rlkern.dpo_loss.default,
                        (c.clone().requires_grad_(), r.clone().requires_grad_(), rc, rr, 0.3, loss_type, 0.1)))
    samples.append((torch.ops.rlkern.bradley_terry_loss.default,
                    (c.clone().requires_grad_(), r.clone().requires_grad_(), rc, 0.0)))
    samples.append((torch.ops.rlkern.bradley_terry_loss.default,
                    (c.clone().requires_grad_(), r.clone().requires_grad_(), None, 0.5)))
    return samples


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_ops_opcheck(backend):
    with _backend.use_backend(backend):
        for op, args in _op_samples(backend):
            torch.library.opcheck(op, args)


def test_fake_and_meta_inputs_give_shapes_and_dtypes():
    logp, old, ref, roll, ent, adv, mask = _batch(torch.bfloat16)
    c, r, rc, rr = _pairs()
    values = logp.float()

    def run(convert):
        lp, o, rf, e, a, m, v = (convert(t) for t in (logp, old, ref, ent, adv, mask, values))
        p = rlkern.policy_loss(lp, o, a, m, ref_logp=rf, dual_clip=2.0, entropy=e, normalizer=convert(torch.tensor(4)))
        assert p.loss.shape == () and p.loss.dtype == torch.float32
        assert set(p.metrics) == {"clip_frac_low", "clip_frac_high", "ratio_mean", "approx_kl", "kl", "entropy",
                                  "dual_clip_frac"}
        assert all(x.shape == () and x.dtype == torch.float32 for x in p.metrics.values())
        val = rlkern.value_loss(v.double(), v, v, m, clip=0.1)
        assert val.loss.dtype == torch.float64 and set(val.metrics) == {"clip_frac", "value_mean"}
        d = rlkern.dpo_loss(*(convert(t) for t in (c, r, rc, rr)))
        assert d.loss.shape == () and d.metrics["chosen_rewards"].shape == (5,)
        assert d.metrics["reward_accuracy"].shape == ()
        bt = rlkern.bradley_terry_loss(convert(c), convert(r), margin=convert(rc))
        assert bt.loss.shape == () and set(bt.metrics) == {"accuracy", "reward_margin"}
        return p, d

    with FakeTensorMode() as mode:
        run(mode.from_tensor)
    p, d = run(lambda t: t.to("meta"))
    assert p.loss.device.type == "meta" and d.metrics["rejected_rewards"].device.type == "meta"


def test_checks_run_on_fake_inputs():
    logp, old, ref, roll, ent, adv, mask = _batch()
    with FakeTensorMode() as mode:
        lp, o, a, m = (mode.from_tensor(t) for t in (logp, old, adv, mask))
        with pytest.raises(ValueError, match="old_logp must have shape"):
            rlkern.policy_loss(lp, o[:, 1:], a, m)
        with pytest.raises(ValueError, match="kl_coef needs ref_logp"):
            rlkern.policy_loss(lp, o, a, m, kl_coef=0.1)
        with pytest.raises(ValueError, match="normalizer must be a number or a 0-d tensor"):
            rlkern.policy_loss(lp, o, a, m, normalizer=o)


def test_func_vmap_over_independent_problems():
    logp, old, ref, roll, ent, adv, mask = _batch(B=4)
    problems = [(logp[:2], old[:2], adv[:2], mask[:2]), (logp[2:], old[2:], adv[2:], mask[2:])]
    stacked = [torch.stack(parts) for parts in zip(*problems)]

    def one(lp, o, a, m):
        out = rlkern.policy_loss(lp, o, a, m, clip_high=0.3, agg="seq-mean-token-mean")
        return out.loss, out.metrics["ratio_mean"]

    loss, ratio = torch.func.vmap(one)(*stacked)
    for i, args in enumerate(problems):
        want_loss, want_ratio = one(*args)
        assert_close(loss[i], want_loss, 1e-6)
        assert_close(ratio[i], want_ratio, 1e-6)

    def weighted(lp, o, a, m, w):
        return rlkern.policy_loss(lp, o, a, m, weights=w, agg="token-sum").loss

    w = torch.stack([ent[:2], ent[2:]])
    got = torch.func.vmap(weighted)(*stacked, w)
    for i, args in enumerate(problems):
        assert_close(got[i], weighted(*args, w[i]), 1e-6)

    v = torch.func.vmap(lambda a, b, m: rlkern.value_loss(a, b, b, m, clip=0.1).loss)(*stacked[:2], stacked[3])
    assert_close(v[1], rlkern.value_loss(problems[1][0], problems[1][1], problems[1][1], problems[1][3],
                                         clip=0.1).loss, 1e-6)
    c, r, rc, rr = (x.view(1, 5).expand(2, 5) * torch.tensor([[1.0], [2.0]]) for x in _pairs())
    d = torch.func.vmap(lambda *t: rlkern.dpo_loss(*t, beta=0.3).loss)(c, r, rc, rr)
    assert_close(d[1], rlkern.dpo_loss(c[1], r[1], rc[1], rr[1], beta=0.3).loss, 1e-6)
    bt = torch.func.vmap(lambda a, b: rlkern.bradley_terry_loss(a, b).loss)(c, r)
    assert_close(bt[1], rlkern.bradley_terry_loss(c[1], r[1]).loss, 1e-6)


@pytest.mark.parametrize("name", ["policy_loss", "value_loss", "dpo_loss", "bradley_terry_loss"])
def test_func_grad_and_double_backward_name_the_op(name):
    logp, old, ref, roll, ent, adv, mask = _batch()
    c, r, rc, rr = _pairs()
    call = {
        "policy_loss": (lambda x: rlkern.policy_loss(x, old, adv, mask).loss, logp),
        "value_loss": (lambda x: rlkern.value_loss(x, old, ref, mask, clip=0.2).loss, logp),
        "dpo_loss": (lambda x: rlkern.dpo_loss(x, r, rc, rr).loss, c),
        "bradley_terry_loss": (lambda x: rlkern.bradley_terry_loss(x, r).loss, c),
    }
    fn, x = call[name]
    with pytest.raises(RuntimeError, match=f"rlkern::{name}.*torch.func.grad"):
        torch.func.grad(fn)(x)
    leaf = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match=f"rlkern::{name}.*double backward"):
        (g,) = torch.autograd.grad(fn(leaf), leaf, create_graph=True)
        g.sum().backward()


class _NoHostRead:
    """Fails the test on any read of a tensor's value back to Python."""

    def __init__(self, monkeypatch):
        def refuse(self, *args, **kwargs):
            raise AssertionError("a tensor's value was read back to the host")

        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tensor_normalizer_never_read_back(backend, monkeypatch):
    logp, old, ref, roll, ent, adv, mask = _batch()
    values = logp.float()
    normalizer = torch.tensor(13.0)
    ref_x = logp.double().requires_grad_()
    want_p = ref_losses.policy_loss(ref_x, old, adv, mask, ref_logp=ref, kl_coef=0.1, normalizer=13.0)
    want_p.loss.backward()
    want_v = ref_losses.value_loss(values.double(), old, ref, mask, 0.2, "token-mean", 13.0)
    with _backend.use_backend(backend):
        x = logp.clone().requires_grad_()
        with monkeypatch.context() as m:
            _NoHostRead(m)
            got = rlkern.policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1, normalizer=normalizer)
            got_v = rlkern.value_loss(values, old, ref, mask, clip=0.2, normalizer=normalizer.double())
        got.loss.backward()
    assert_close(got.loss, want_p.loss, 1e-5)
    assert_close(x.grad, ref_x.grad, 1e-4)
    assert_close(got_v.loss, want_v.loss, 1e-5)


def test_tensor_normalizer_on_a_cuda_device_is_never_read(monkeypatch):
    """A stand-in for a GPU: fake CUDA tensors (FakeTensorMode needs no device) through the
    public functions, with every host read refused. (The Triton launcher itself is covered
    on CPU tensors by test_tensor_normalizer_never_read_back[triton].)"""
    with FakeTensorMode():
        lp, o = (torch.empty(B, T, device="cuda") for _ in range(2))
        a = torch.empty(B, device="cuda")
        m = torch.ones(B, T, dtype=torch.bool, device="cuda")
        n = torch.full((), 7.0, device="cuda")
        with monkeypatch.context() as patch:
            _NoHostRead(patch)
            # Forward only: autograd on fake CUDA tensors aborts in a CPU-only torch build; the
            # normalizer is folded into the saved gradient in forward, so backward never sees it.
            out = rlkern.policy_loss(lp, o, a, m, ref_logp=o, kl_coef=0.1, normalizer=n)
            val = rlkern.value_loss(lp, o, o, m, clip=0.1, normalizer=n)
        assert out.loss.device.type == "cuda" and val.loss.device.type == "cuda"
        assert out.metrics["kl"].device.type == "cuda"


class _PpoModule(torch.nn.Module):
    """A small PPO loss module: values and log-probs from linear heads, GAE advantages,
    then the clipped policy loss and the value loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.policy = torch.nn.Linear(4, 1)
        self.value = torch.nn.Linear(4, 1)

    def forward(self, obs, rewards, terminated, old_logp, mask):
        logp = torch.nn.functional.logsigmoid(self.policy(obs).squeeze(-1))
        values = self.value(obs).squeeze(-1)
        adv, ret = rlkern.gae(rewards, values.detach(), terminated, 0.99, 0.95)
        p = rlkern.policy_loss(logp, old_logp, adv, mask, clip_high=0.28, agg="seq-mean-token-mean")
        v = rlkern.value_loss(values, None, ret, mask)
        return p.loss + 0.5 * v.loss, p.metrics["clip_frac_high"]


def test_torch_export_of_a_module_using_gae_and_policy_loss():
    module = _PpoModule()
    g = torch.Generator().manual_seed(4)
    obs, rewards = torch.randn(3, 7, 4, generator=g), torch.randn(3, 7, generator=g)
    terminated = torch.rand(3, 7, generator=g) < 0.2
    old_logp = -torch.rand(3, 7, generator=g)
    mask = torch.rand(3, 7, generator=g) < 0.8
    args = (obs, rewards, terminated, old_logp, mask)
    exported = torch.export.export(module, args)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"rlkern.gae.default", "rlkern.policy_loss.default", "rlkern.value_loss.default"} <= targets, targets
    for got, want in zip(exported.module()(*args), module(*args)):
        assert_close(got, want, 1e-6)


# ----------------------------------------------------------------------------- typed options (issue #15)


def test_policy_loss_signature_lists_every_option_with_the_config_defaults():
    params = inspect.signature(losses.policy_loss).parameters
    options = {name: p for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(options) == set(ref_losses.POLICY_OPTIONS)
    for field in dataclasses.fields(ref_losses.PolicyLossConfig):
        assert options[field.name].default == field.default, field.name
        assert options[field.name].annotation != inspect.Parameter.empty, field.name
    for name in ref_losses.TENSOR_OPTIONS:
        assert options[name].default is None


def test_policy_loss_unknown_option_raises_type_error_naming_it():
    logp, old, ref, roll, ent, adv, mask = _batch()
    with pytest.raises(TypeError, match="clip_lo"):
        rlkern.policy_loss(logp, old, adv, mask, clip_lo=0.2)
    with pytest.raises(TypeError, match="kl_coeff"):
        ref_losses.policy_loss(logp, old, adv, mask, kl_coeff=0.2)


_MYPY_CONFIG = """\
[mypy]
follow_imports = silent
# torch, triton and numpy are left unanalysed (Any): a full pass over torch takes minutes.
[mypy-torch.*]
follow_imports = skip
[mypy-triton.*]
follow_imports = skip
[mypy-numpy.*]
follow_imports = skip
"""


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_mypy_strict_catches_a_misspelt_policy_loss_option(tmp_path):
    snippet = tmp_path / "user_step.py"
    snippet.write_text(textwrap.dedent("""\
        import torch
        import rlkern


        def step(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> None:
            good = rlkern.policy_loss(logp, old, adv, mask, clip_low=0.2, kl_coef=0.0, agg="token-sum")
            bad = rlkern.policy_loss(logp, old, adv, mask, clip_hihg=0.28)
            wrong_type = rlkern.policy_loss(logp, old, adv, mask, clip_low="0.2")
            print(good.loss, bad.loss, wrong_type.loss)
        """))
    (tmp_path / "mypy.ini").write_text(_MYPY_CONFIG)
    python_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--config-file", str(tmp_path / "mypy.ini"),
                           "--cache-dir", str(tmp_path / "cache"), str(snippet)], capture_output=True, text=True,
                          env=dict(os.environ, MYPYPATH=python_dir), timeout=300, cwd=tmp_path)
    report = proc.stdout + proc.stderr
    errors = [line for line in report.splitlines() if ": error:" in line]
    assert any(":7:" in e and "clip_hihg" in e for e in errors), report
    assert any(":8:" in e and "clip_low" in e for e in errors), report
    assert not any(":6:" in e for e in errors), report


def test_bad_tensor_normalizer_raises_naming_it():
    logp, old, ref, roll, ent, adv, mask = _batch()
    with pytest.raises(ValueError, match="normalizer must be a number or a 0-d tensor"):
        rlkern.policy_loss(logp, old, adv, mask, normalizer=torch.ones(2))
    with pytest.raises(TypeError, match="normalizer must be a real number"):
        rlkern.value_loss(logp, None, old, mask, normalizer=torch.tensor(True))
    with pytest.raises(ValueError, match="normalizer is on meta"):
        rlkern.policy_loss(logp, old, adv, mask, normalizer=torch.ones((), device="meta"))
    # An integer count (TRL's num_items_in_batch) is fine, and a float64 one keeps float32 results.
    for n in (torch.tensor(11), torch.tensor(11.0, dtype=torch.float64)):
        out = rlkern.policy_loss(logp, old, adv, mask, agg="token-sum", normalizer=n)
        assert out.loss.dtype == torch.float32
        assert_close(out.loss, rlkern.policy_loss(logp, old, adv, mask, agg="token-sum", normalizer=11.0).loss, 1e-6)
