"""rlkern.integrations.openrlhf against OpenRLHF 0.11.2's own code (openrlhf.models.loss / utils).

OpenRLHF is the oracle: PolicyLoss, ValueLoss, compute_approx_kl, compute_reward and masked_mean
are run side by side with OpenRLHF's on the same inputs (float32 and bfloat16, right-padded and
holed masks, an empty row, log-ratios of +-25) and must give the same values, metrics and
gradients. OpenRLHF is installed with --no-deps (plus deepspeed, pylatexenc, einops, hjson, see the
skip reason). The only thing stubbed is flash_attn, a CUDA-only package that
openrlhf/models/ring_attn_utils.py imports at module level (GPU stack): a tiny fake module is put
in sys.modules while openrlhf.models is imported and removed right after. OpenRLHF's GAE and
REINFORCE returns are methods of its experience maker, whose module needs vLLM (GPU stack); their
source is read from the installed file and executed as is.
"""

from __future__ import annotations

import ast
import itertools
import logging
import importlib.util
import os

import pytest
import torch

from helpers import assert_close
from rlkern.integrations._peers import import_openrlhf_losses

_INSTALL = ("needs OpenRLHF 0.11.2: pip install --no-deps openrlhf==0.11.2 and "
            "DS_BUILD_OPS=0 pip install --no-deps --no-build-isolation deepspeed==0.19.6 and "
            "pip install --no-deps pylatexenc einops hjson (see the README's test extra)")


# The package's own importer: it puts a GPU-stack stand-in for flash_attn (CUDA only,
# imported by openrlhf/models/ring_attn_utils.py at module level, never called by the loss
# code) in sys.modules only while openrlhf.models is imported.
_mods = import_openrlhf_losses()
if _mods is None:
    pytest.skip(_INSTALL, allow_module_level=True)
L, U = _mods

from rlkern.integrations import openrlhf as O  # noqa: E402


def _experience_maker_functions():
    """OpenRLHF's get_advantages_and_returns / get_cumulative_returns, executed from its source."""
    path = os.path.join(os.path.dirname(importlib.util.find_spec("openrlhf").origin), "trainer", "ppo_utils",
                        "experience_maker.py")
    tree = ast.parse(open(path).read())
    wanted = {"get_advantages_and_returns", "get_cumulative_returns", "compute_advantages_and_returns"}
    defs = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name in wanted]
    assert {d.name for d in defs} == wanted
    # the module's other names these methods use: its imports (compute_reward, masked_mean from
    # openrlhf.models.utils) and the length penalties, which are off here (no-op)
    namespace = {"torch": torch, "Tuple": tuple, "List": list, "Experience": object, "itertools": itertools,
                 "compute_reward": U.compute_reward, "masked_mean": U.masked_mean,
                 "apply_length_penalties": lambda experiences, args: None,
                 "logger": logging.getLogger("openrlhf-oracle")}
    for d in defs:
        d.decorator_list = []
        exec(compile(ast.Module(body=[d], type_ignores=[]), path, "exec"), namespace)
    return {name: namespace[name] for name in wanted}


B, T = 6, 11


def make_mask(kind: str) -> torch.Tensor:
    m = torch.ones(B, T, dtype=torch.bool)
    for i, n in enumerate([T, 7, 3, 9, 1, 5]):
        m[i, n:] = False
    if kind == "holed":
        m[0, 2:5] = False
        m[3, 1] = False
        m[5, :] = False  # an empty row
    return m


def make_inputs(kind: str, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = make_mask(kind)
    old = -torch.rand(B, T, generator=g) * 3 - 0.05
    lp = old + 0.3 * torch.randn(B, T, generator=g)
    lp[0, 0] = old[0, 0] + 25.0  # beyond OpenRLHF's +-20 log-ratio clamp
    lp[3, 0] = old[3, 0] - 25.0
    roll = old + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    return old.to(dtype), lp.to(dtype), roll.to(dtype), adv, m


def _float(x):
    return None if x is None else float(x)


POLICY_CONFIGS = [
    dict(), dict(dual_clip=3.0), dict(token_level_loss=False), dict(clip_eps_high=0.28),
    dict(policy_loss_type="gspo"), dict(policy_loss_type="gspo", is_correction_level="token"),
    dict(is_correction_level="token"), dict(is_correction_level="seq"),
    dict(is_correction_level="token", is_correction_mode="clip"),
    dict(is_correction_level="token", is_correction_threshold=(0.9, 1.1)),
    # bands the fused kernel takes with no lower bound, and one it does not (low > high: weights path)
    dict(is_correction_level="token", is_correction_threshold=(0.0, 1.05)),
    dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.0, 1.05)),
    dict(is_correction_level="token", is_correction_threshold=(1.2, 0.8)),
    dict(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=(0, 0.05)),
    dict(is_correction_level="token", is_correction_gating="binary_kl", is_correction_threshold=(0, 0.01)),
    dict(is_correction_level="seq", is_correction_gating="binary_kl", is_correction_threshold=(0, 0.01)),
]


@pytest.mark.parametrize("config", POLICY_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "ppo")
@pytest.mark.parametrize("kind", ["padded", "holed"])
@pytest.mark.parametrize("batch", [{}, dict(dp_size=2, batch_num_tokens=90, global_batch_size=12)],
                         ids=["local", "global"])
def test_policy_loss_matches_openrlhf(config, kind, batch):
    old, lp, roll, adv, m = make_inputs(kind)
    if kind == "holed" and config.get("is_correction_level") == "seq":
        m = m.clone()
        m[5, 0] = True  # OpenRLHF's per-sequence gate divides by the row's token count (NaN for an empty row)
    outs = []
    for cls in (O.PolicyLoss, L.PolicyLoss):
        x = lp.clone().requires_grad_()
        out = cls(**config)(x, old, adv, m, roll, **batch)
        (grad,) = torch.autograd.grad(out[0], x)
        outs.append((out, grad))
    (ours, g_ours), (theirs, g_theirs) = outs
    assert len(ours) == 5
    assert_close(ours[0], theirs[0], 1e-5, "loss")
    for name, a, b in zip(("clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), ours[1:], theirs[1:]):
        assert (a is None) == (b is None), name
        if b is not None:
            assert abs(_float(a) - _float(b)) <= 1e-5 * max(1.0, abs(_float(b))), f"{name}: {a} vs {b}"
    assert_close(g_ours, g_theirs, 1e-4, "grad")


@pytest.mark.parametrize("config", [dict(is_correction_level="token"), dict(is_correction_level="seq"),
                                    dict(is_correction_level="token", is_correction_mode="clip"),
                                    dict(is_correction_level="token", is_correction_threshold=(0.8, 5.0))],
                         ids=["token-mask", "seq-mask", "token-clip", "token-mask-0.8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_is_correction_lower_bound_matches_openrlhf(config, dtype):
    """OpenRLHF's default band (0.5, 5.0) has a lower bound: tokens (or sequences) whose IS ratio
    pi_train / pi_rollout is below it are dropped (mask) or raised to it (clip), as those above 5."""
    old, lp, roll, adv, m = make_inputs("padded")
    roll = roll.clone()
    roll[1, :3] = old[1, :3] + 1.2     # ratio exp(-1.2) = 0.30 < 0.5
    roll[2, :3] = old[2, :3] + 0.5     # 0.61: inside (0.5, 5) but below 0.8
    roll[3, 2:6] = old[3, 2:6] - 1.9   # 6.7 > 5
    roll[4, 0] = old[4, 0] + 2.0       # the row's only token, ratio 0.14: its sequence is gated out
    old, lp, roll = old.to(dtype), lp.to(dtype), roll.to(dtype)
    outs = []
    for cls in (O.PolicyLoss, L.PolicyLoss):
        x = lp.clone().requires_grad_()
        # bf16: OpenRLHF on the float32 values of the same numbers (the adapter computes in float32)
        args = (old, adv, m, roll) if cls is O.PolicyLoss else (old.float(), adv, m, roll.float())
        out = cls(**config)(x if cls is O.PolicyLoss else x.float(), *args)
        (grad,) = torch.autograd.grad(out[0], x)
        outs.append((out, grad))
    (ours, g_ours), (theirs, g_theirs) = outs
    assert float(theirs[4]) > 0, "the case must filter something"
    assert_close(ours[0], theirs[0], 1e-5, "loss")
    for name, a, b in zip(("clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), ours[1:], theirs[1:]):
        assert abs(_float(a) - _float(b)) <= 1e-5 * max(1.0, abs(_float(b))), f"{name}: {a} vs {b}"
    assert_close(g_ours.float(), g_theirs.float(), 1e-4 if dtype == torch.float32 else 1e-2, "grad")


def test_log_ratio_clamp_gives_zero_gradient():
    """log-ratio 25: OpenRLHF clamps to 20 (loss exp(20) A, gradient 0), not exp(25)."""
    old = torch.zeros(1, 2)
    lp = torch.tensor([[25.0, 0.1]], requires_grad=True)
    adv = torch.tensor([[-1.0, 1.0]])
    m = torch.ones(1, 2, dtype=torch.bool)
    loss = O.PolicyLoss()(lp, old, adv, m)[0]
    (grad,) = torch.autograd.grad(loss, lp)
    ref = L.PolicyLoss()(lp, old, adv, m)[0]
    assert_close(loss, ref, 1e-6)
    assert grad[0, 0] == 0


@pytest.mark.parametrize("config", [dict(), dict(is_correction_level="token"), dict(policy_loss_type="gspo")])
def test_policy_loss_bf16_matches_openrlhf_in_float32(config):
    old, lp, roll, adv, m = make_inputs("holed", torch.bfloat16)
    x = lp.clone().requires_grad_()
    ours = O.PolicyLoss(**config)(x, old, adv, m, roll)
    (g_ours,) = torch.autograd.grad(ours[0], x)
    y = lp.float().requires_grad_()
    theirs = L.PolicyLoss(**config)(y, old.float(), adv, m, roll.float())
    (g_theirs,) = torch.autograd.grad(theirs[0], y)
    assert g_ours.dtype == torch.bfloat16
    assert_close(ours[0].float(), theirs[0], 1e-5, "loss")
    assert_close(g_ours.float(), g_theirs.to(torch.bfloat16).float(), 1e-2, "grad")


def test_policy_loss_rejects_what_openrlhf_rejects():
    with pytest.raises(ValueError):
        O.PolicyLoss(is_correction_level="seq", is_correction_mode="clip")
    with pytest.raises(ValueError):
        O.PolicyLoss(is_correction_level="token", is_correction_gating="tv")  # default band has a lower bound
    with pytest.raises(ValueError):
        O.PolicyLoss(policy_loss_type="dpo")
    old, lp, roll, adv, m = make_inputs("padded")
    with pytest.raises(ValueError):
        O.PolicyLoss(is_correction_level="token")(lp, old, adv, m)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("batch", [{}, dict(dp_size=2, batch_num_tokens=90, global_batch_size=12)],
                         ids=["local", "global"])
def test_value_loss_matches_openrlhf(clip_eps, token_level_loss, batch):
    g = torch.Generator().manual_seed(5)
    m = make_mask("holed")
    v = torch.randn(B, T, generator=g)
    old_v = v + 0.3 * torch.randn(B, T, generator=g)
    ret = torch.randn(B, T, generator=g)
    res = []
    for cls in (O.ValueLoss, L.ValueLoss):
        x = v.clone().requires_grad_()
        loss = cls(clip_eps, token_level_loss)(x, old_v, ret, m, **batch)
        res.append((loss, torch.autograd.grad(loss, x)[0]))
    assert_close(res[0][0], res[1][0], 1e-5, "loss")
    assert_close(res[0][1], res[1][1], 1e-5, "grad")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("with_old", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compute_approx_kl_matches_openrlhf(estimator, unbiased, with_old, dtype):
    old, lp, roll, _, _ = make_inputs("padded", dtype)
    lp = lp.clone()
    lp[2, 3] = roll[2, 3] - 15.0  # k3 beyond the [-10, 10] clamp
    lp[2, 4] = roll[2, 4] + 15.0  # k1, k2 beyond the clamp
    res = []
    for fn in (O.compute_approx_kl, U.compute_approx_kl):
        x = lp.clone().requires_grad_()
        kl = fn(x, roll, old if with_old else None, estimator, unbiased)
        res.append((kl, torch.autograd.grad(kl.sum(), x)[0]))
    assert res[0][0].dtype == torch.float32
    assert_close(res[0][0], res[1][0], 1e-6, "value")
    assert_close(res[0][1].float(), res[1][1].float(), 1e-5, "grad")


def test_masked_mean_matches_openrlhf():
    _, lp, _, _, m = make_inputs("padded")
    for dim in (None, -1, 0):
        assert_close(O.masked_mean(lp, m, dim=dim), U.masked_mean(lp, m, dim=dim), 1e-6)
    assert_close(O.masked_mean(lp, None), U.masked_mean(lp, None), 1e-6)


@pytest.mark.parametrize("clip", [None, (-0.5, 0.5)])
def test_compute_reward_matches_openrlhf(clip):
    old, lp, _, _, m = make_inputs("holed")
    r = torch.randn(B, generator=torch.Generator().manual_seed(3))
    kl = lp - old
    assert_close(O.compute_reward(r, 0.05, kl, m, clip), U.compute_reward(r, 0.05, kl, m, clip), 1e-6)


@pytest.mark.parametrize("kind", ["padded", "holed"])
def test_gae_and_cumulative_returns_match_openrlhf(kind):
    """OpenRLHF runs its recursions through masked holes (zero reward and value), unlike verl."""
    fns = _experience_maker_functions()
    g = torch.Generator().manual_seed(6)
    m = make_mask(kind).float()
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    ours = O.get_advantages_and_returns(values, rewards, m, 0.97, 0.9)
    theirs = fns["get_advantages_and_returns"](None, values, rewards, m, 0.97, 0.9)
    assert_close(ours[0], theirs[0], 1e-5, "advantages")
    assert_close(ours[1], theirs[1], 1e-5, "returns")
    assert_close(O.get_cumulative_returns(rewards, m, 0.9), fns["get_cumulative_returns"](None, rewards, m, 0.9),
                 1e-5)


@pytest.mark.parametrize("estimator", ["gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo",
                                       "flash_reinforce"])
@pytest.mark.parametrize("std_norm", [True, False])
def test_advantage_pipeline_matches_openrlhf(estimator, std_norm):
    from types import SimpleNamespace as NS

    fns = _experience_maker_functions()
    g = torch.Generator().manual_seed(9)
    n, prompts = 3, 4
    N = n * prompts
    m = torch.ones(N, T)
    for i in range(N):
        m[i, 2 + (3 * i) % (T - 2):] = 0
    m[2, 1] = 0  # a hole
    rewards = torch.randint(0, 3, (N,), generator=g).float()
    kl = 0.1 * torch.randn(N, T, generator=g) * m
    values = torch.randn(N, T, generator=g)
    gamma, lambd, kl_coef, clip = 0.9, 0.95, 0.05, (-1.5, 1.5)
    args = NS(rollout=NS(n_samples_per_prompt=n),
              algo=NS(advantage=NS(estimator=estimator, gamma=gamma, lambd=lambd, no_std_norm=not std_norm)),
              reward=NS(clip_range=clip))
    maker = NS(strategy=NS(args=args), kl_ctl=NS(value=kl_coef), advantage_estimator=estimator,
               get_advantages_and_returns=lambda *a: fns["get_advantages_and_returns"](None, *a),
               get_cumulative_returns=lambda *a: fns["get_cumulative_returns"](None, *a))
    exp = NS(rewards=rewards.clone(), index=list(range(N)), kl=kl, action_mask=m, values=values, info={})
    fns["compute_advantages_and_returns"](maker, [exp])
    adv, ret = O.compute_advantages_and_returns(rewards, m, estimator, n, kl=kl, kl_coef=kl_coef, values=values,
                                                gamma=gamma, lambd=lambd, reward_clip_range=clip, std_norm=std_norm)
    assert_close(adv, exp.advantages, 1e-5, "advantages")
    assert_close(ret, exp.returns, 1e-5, "returns")


def test_install_swaps_openrlhf_classes_and_uninstall_restores():
    orig = (L.PolicyLoss, L.ValueLoss, U.compute_approx_kl)
    import openrlhf.models as models_pkg

    pkg_orig = models_pkg.PolicyLoss
    O.install()
    try:
        O.install()  # idempotent
        assert L.PolicyLoss is O.PolicyLoss and L.ValueLoss is O.ValueLoss
        assert U.compute_approx_kl is O.compute_approx_kl
        assert models_pkg.PolicyLoss is O.PolicyLoss  # re-exported names are patched too
        old, lp, roll, adv, m = make_inputs("padded")
        out = L.PolicyLoss(is_correction_level="token")(lp, old, adv, m, roll)
        ref = orig[0](is_correction_level="token")(lp, old, adv, m, roll)
        assert_close(out[0], ref[0], 1e-5)
    finally:
        O.uninstall()
    assert (L.PolicyLoss, L.ValueLoss, U.compute_approx_kl) == orig
    assert models_pkg.PolicyLoss is pkg_orig


# ------------------------------------------------------------------------------------------
# the compiled paths (CPU): the ratio-gated IS coefficient, the k3 log-ratio bound, the value
# loss, against OpenRLHF at extreme inputs

_OVERFLOW = 88.7228317  # float32's exp overflow threshold
_INF = float("inf")


def _openrlhf_gate(config, old, roll, m):
    """OpenRLHF 0.11.2's gate (PolicyLoss.forward, ratio gating) as written there, in float32."""
    low, high = config.get("is_correction_threshold", (0.5, 5.0))
    seq_level = config["is_correction_level"] == "seq"
    is_log_ratio = old.float() - roll.float()
    token_is = is_log_ratio.exp()
    stat = U.masked_mean(is_log_ratio, m, dim=-1).unsqueeze(-1) if seq_level else is_log_ratio
    stat = stat.exp()
    if config.get("is_correction_mode", "mask") == "clip":
        coef = stat.clamp(min=low, max=high)
        filtered = (stat < low) | (stat > high)
    else:
        keep = (stat >= low) & (stat <= high)
        coef = torch.where(keep, token_is, 0.0)
        filtered = ~keep
    ratio = filtered.float().mean() if seq_level else U.masked_mean(filtered.float(), m, dim=None)
    return coef.expand(m.shape) * m, ratio


def _extreme_gate_inputs(dtype, nan_masked: bool, finite_kept: bool = False):
    """IS log-ratios x = old - rollout at and around exp's overflow threshold, +-inf, holes and
    an empty row; with ``nan_masked`` NaN and inf at masked positions. Row 1's mean log-ratio
    is about 0, so a sequence gate keeps its token of weight exp(1000) = inf, unless
    ``finite_kept``."""
    old, lp, roll, adv, m = make_inputs("holed")
    roll = roll.clone()
    roll[0, 0] = old[0, 0] - _OVERFLOW          # exp(x) at the threshold: finite
    roll[0, 1] = old[0, 1] - 88.75              # just above: inf
    roll[1, 0] = old[1, 0] - 1000.0
    roll[1, 1] = old[1, 1] + (500.0 if finite_kept else 1000.0)  # exp(x) = 0
    roll[2, 0] = -_INF                          # x = +inf
    roll[3, 0] = old[3, 0] - 0.9                # 2.46: inside the band
    roll[3, 2] = old[3, 2] + 0.8                # 0.45: below 0.5
    roll[4, 0] = old[4, 0] - 1.7                # 5.47: above 5 (the row's only token)
    if nan_masked:
        old, roll = old.clone(), roll.clone()
        old[~m] = float("nan")
        roll[0, 2] = _INF                       # a masked hole
        roll[5, :] = -_INF                      # the empty row
    return old.to(dtype), lp.to(dtype), roll.to(dtype), adv, m


GATE_CONFIGS = [dict(is_correction_level="seq"), dict(is_correction_level="token"),
                dict(is_correction_level="token", is_correction_mode="clip"),
                dict(is_correction_level="seq", is_correction_threshold=(0.0, 1.05)),
                dict(is_correction_level="token", is_correction_threshold=(1.2, 0.8)),
                dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(1.2, 0.8))]


@pytest.mark.parametrize("config", GATE_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nan_masked", [False, True], ids=["finite", "nan-masked"])
def test_compiled_is_gate_matches_openrlhf(config, dtype, nan_masked):
    """The CPU kernel's coefficient and filtered fraction are OpenRLHF's (on finite masked
    inputs: OpenRLHF's masked mean lets a masked NaN through), for log-ratios at exp's
    overflow threshold, beyond it, +-inf, holes and an empty row."""
    old, _, roll, _, m = _extreme_gate_inputs(dtype, nan_masked)
    coef, ratio = O.PolicyLoss(**config)._compiled_gate(old, roll, m)
    assert coef.dtype == torch.float32
    fin_old, _, fin_roll, _, _ = _extreme_gate_inputs(dtype, False)
    want, want_ratio = _openrlhf_gate(config, fin_old, fin_roll, m)
    assert torch.equal(coef[~m], torch.zeros_like(coef[~m]))
    assert_close(coef * m, want, 1e-6, "coef")
    assert abs(float(ratio) - float(want_ratio)) <= 1e-6, (float(ratio), float(want_ratio))
    if config["is_correction_level"] == "token" and config.get("is_correction_mode") != "clip":
        assert torch.isinf(fin_old[0, 1].float() - fin_roll[0, 1].float()) or coef[0, 1] == 0


@pytest.mark.parametrize("config", GATE_CONFIGS[:1] + GATE_CONFIGS[3:5],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_is_gate_matches_the_torch_path(config, dtype):
    """The same PolicyLoss through the compiled gate and through the torch gate (the reference
    backend's path): loss, metrics and gradient agree, at extreme log-ratios."""
    import rlkern

    old, lp, roll, adv, m = _extreme_gate_inputs(dtype, False, finite_kept=True)
    res = []
    for backend in ("cpu", "reference"):
        x = lp.clone().requires_grad_()
        with rlkern.use_backend(backend):
            out = O.PolicyLoss(**config)(x, old, adv, m, roll)
            (g,) = torch.autograd.grad(out[0], x)
        res.append((out, g))
    (a, ga), (b, gb) = res
    assert_close(a[0].float(), b[0].float(), 1e-5, "loss")
    for name, u, v in zip(("clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), a[1:], b[1:]):
        assert_close(torch.as_tensor(_float(u)), torch.as_tensor(_float(v)), 1e-5, name)  # vllm_kl: -inf
    assert_close(ga.float(), gb.float(), 1e-4 if dtype == torch.float32 else 1e-2, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("token_level_loss", [True, False])
def test_seq_is_correction_matches_openrlhf_with_nan_at_masked_positions(dtype, token_level_loss):
    """Sequence-level IS correction, default band, holed mask: equal to OpenRLHF on finite
    masked values, and unchanged when the masked positions hold NaN (OpenRLHF's would be NaN)."""
    old, lp, roll, adv, m = make_inputs("holed")
    roll = roll.clone()
    roll[1, :3] = old[1, :3] + 1.2  # the row's mean ratio falls below 0.5
    roll[3, 0] = old[3, 0] - _OVERFLOW
    m = m.clone()
    m[5, 0] = True  # OpenRLHF's gate divides by the row's token count: NaN for an empty row
    config = dict(is_correction_level="seq", token_level_loss=token_level_loss)
    x = lp.to(dtype).float().requires_grad_()
    theirs = L.PolicyLoss(**config)(x, old.to(dtype).float(), adv, m, roll.to(dtype).float())
    (g_theirs,) = torch.autograd.grad(theirs[0], x)
    nan_old, nan_roll, nan_lp = old.clone(), roll.clone(), lp.clone()
    nan_old[~m], nan_roll[~m], nan_lp[~m] = float("nan"), _INF, float("nan")
    for o, r, p in ((old, roll, lp), (nan_old, nan_roll, nan_lp)):
        y = p.to(dtype).requires_grad_()
        ours = O.PolicyLoss(**config)(y, o.to(dtype), adv, m, r.to(dtype))
        (g_ours,) = torch.autograd.grad(ours[0], y)
        assert_close(ours[0].float(), theirs[0], 1e-5, "loss")
        for name, i in (("clip_ratio", 1), ("vllm_kl", 3), ("is_filter_ratio", 4)):
            assert abs(_float(ours[i]) - _float(theirs[i])) <= 1e-5 * max(1.0, abs(_float(theirs[i]))), name
        assert_close(g_ours.float(), (g_theirs * m).to(dtype).float(), 1e-4 if dtype == torch.float32 else 1e-2, "grad")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compute_approx_kl_extremes_match_openrlhf(estimator, dtype, backend):
    """log_ratio = lp - base at +-10, beyond the clamp, past exp's overflow threshold (k3's exp(-log_ratio)),
    +-inf and NaN: OpenRLHF's values and gradients (its k3 bounds the log-ratio below by -10 first, so
    lp = -inf gives 10 with zero gradient; k2's inf * 0 derivative stays NaN, as in torch)."""
    g = torch.Generator().manual_seed(11)
    base = -torch.rand(4, 16, generator=g) * 3
    lr = 0.5 * torch.randn(4, 16, generator=g)
    lr[0, :10] = torch.tensor([10.0, -10.0, 10.5, -10.5, -_OVERFLOW, -88.75, -200.0, 200.0, 4.4, -4.4])
    lp = base + lr
    lp[1, 0], lp[1, 1], lp[1, 2] = -_INF, _INF, float("nan")
    base[1, 3] = -_INF
    lp, base = lp.to(dtype), base.to(dtype)
    import rlkern

    res = []
    for fn in (O.compute_approx_kl, U.compute_approx_kl):
        x = lp.clone().requires_grad_()
        with rlkern.use_backend(backend):  # "reference": the torch ops that device tensors take
            kl = fn(x, base, None, estimator)
        res.append((kl, torch.autograd.grad(kl.sum(), x)[0]))
    (a, ga), (b, gb) = res
    assert a.dtype == torch.float32 and ga.dtype == dtype
    assert_close(a, b, 1e-6, "value")
    assert_close(ga.float(), gb.float(), 1e-5, "grad")


def test_compute_approx_kl_backward_scales_and_retains():
    """The gradient buffer handed over in backward: scaled by a non-uniform incoming gradient,
    kept for a second backward with retain_graph, refused for a second one without it."""
    old, lp, roll, _, _ = make_inputs("padded")
    w = torch.rand(lp.shape, generator=torch.Generator().manual_seed(2))
    for estimator in ("k1", "k3"):
        x, y = lp.clone().requires_grad_(), lp.clone().requires_grad_()
        ours = O.compute_approx_kl(x, roll, None, estimator)
        theirs = U.compute_approx_kl(y, roll, None, estimator)
        (g1,) = torch.autograd.grad((ours * w).sum(), x, retain_graph=True)
        (g2,) = torch.autograd.grad(ours.sum() * 3.0, x, retain_graph=True)
        (g3,) = torch.autograd.grad(ours.sum(), x)
        (h1,) = torch.autograd.grad((theirs * w).sum(), y, retain_graph=True)
        (h3,) = torch.autograd.grad(theirs.sum(), y)
        assert_close(g1, h1, 1e-5, "weighted")
        assert_close(g2, 3.0 * h3, 1e-5, "scaled")
        assert_close(g3, h3, 1e-5, "unit")
        with pytest.raises(RuntimeError, match="already run"):
            torch.autograd.grad(ours.sum(), x)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [{}, dict(dp_size=2, batch_num_tokens=90, global_batch_size=12)],
                         ids=["local", "global"])
def test_value_loss_matches_openrlhf_holed_bf16_nan_masked(clip_eps, token_level_loss, dtype, batch):
    """ValueLoss over 37 tokens a row (vector steps and a scalar tail), holes, an empty row and
    NaN at masked positions: OpenRLHF's loss and gradient (OpenRLHF on the finite values)."""
    g = torch.Generator().manual_seed(8)
    Tn = 37
    m = torch.rand(B, Tn, generator=g) > 0.3
    m[2, :] = False
    m[4, :] = True
    v = torch.randn(B, Tn, generator=g).to(dtype)
    old_v = (v.float() + 0.3 * torch.randn(B, Tn, generator=g)).to(dtype)
    ret = torch.randn(B, Tn, generator=g).to(dtype)
    x = v.float().requires_grad_()
    theirs = L.ValueLoss(clip_eps, token_level_loss)(x, old_v.float(), ret.float(), m, **batch)
    (g_theirs,) = torch.autograd.grad(theirs, x)
    nv, nold, nret = v.clone(), old_v.clone(), ret.clone()
    nv[~m], nold[~m], nret[~m] = float("nan"), _INF, float("nan")
    for vals, o, r in ((v, old_v, ret), (nv, nold, nret)):
        y = vals.clone().requires_grad_()
        ours = O.ValueLoss(clip_eps, token_level_loss)(y, o, r, m, **batch)
        (g_ours,) = torch.autograd.grad(ours, y)
        assert g_ours.dtype == dtype
        assert_close(ours.float(), theirs, 1e-5, "loss")
        assert_close(g_ours.float(), g_theirs.to(dtype).float(), 1e-5 if dtype == torch.float32 else 1e-2, "grad")
