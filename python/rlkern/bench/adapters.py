"""Benchmarks of the drop-in adapters against the peers' own functions: forward plus backward.

Each case runs one function of ``rlkern.integrations.verl`` / ``rlkern.integrations.openrlhf``
("rlkern") and the function of the same name in verl 0.9.1 / OpenRLHF 0.11.2 ("verl" /
"openrlhf") on the same inputs, with the same metrics returned, and backpropagates to the
log-probs (values for the value losses). Cases whose peer is not importable are left out.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Dict, List

import torch

from .core import Case, Impl

# the objectives beyond PPO (sapo, geo_mean, dppo_*) run the fused kernels' objective bodies
VERL_LOSSES = ("vanilla", "gspo", "cispo", "gpg", "dro", "sapo", "geo_mean", "dppo_tv", "dppo_kl", "clip_cov", "kl_cov")
# the remaining per-token losses, each with its own options: bypass_mode (verl's rollout
# correction inside the loss: token-level IS weights, plus a sequence-level rejection for
# ppo_clip), verl's REINFORCE (not in its registry) and vanilla, both with rollout IS weights
VERL_EXTRA_LOSSES = {
    "bypass_mode ppo_clip": dict(name="bypass_mode", rollout_correction=dict(
        loss_type="ppo_clip", rollout_is="token", rollout_is_threshold=2.0, rollout_rs="seq_mean_k3",
        rollout_rs_threshold=0.01)),
    "bypass_mode reinforce": dict(name="bypass_mode", rollout_correction=dict(
        loss_type="reinforce", rollout_is="token", rollout_is_threshold=2.0)),
    "reinforce +is_weights": dict(name="reinforce", weights=True),
    "vanilla +is_weights": dict(name="vanilla", weights=True),
}
# the IS correction at OpenRLHF's default band (0.5, 5.0): token-level mask (the default mode),
# token-level clip, and the per-sequence mask
OPENRLHF_LOSSES = {"ppo": dict(), "ppo-dual-clip": dict(dual_clip=3.0), "gspo": dict(policy_loss_type="gspo"),
                   "ppo-is-token": dict(is_correction_level="token"),
                   "ppo-is-token-clip": dict(is_correction_level="token", is_correction_mode="clip"),
                   "ppo-is-seq": dict(is_correction_level="seq")}
OPENRLHF_KL = ("k1", "k2", "k3")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _inputs(B: int, T: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + 0.05 * torch.randn(B, T, generator=g)
    rollout = old + 0.05 * torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, generator=g)[:, None] * mask  # GRPO-style: one advantage per sequence
    to = dict(device=device)
    return (logp.to(dtype=dtype, **to).requires_grad_(), old.to(dtype=dtype, **to), rollout.to(dtype=dtype, **to),
            adv.to(**to), mask.to(**to))


def _backward(fn: Callable, x: torch.Tensor) -> Impl:
    def run():
        x.grad = None
        out = fn()
        loss = out[0] if isinstance(out, tuple) else out
        loss = loss if loss.dim() == 0 else loss.sum()
        loss.backward()
        return loss.detach()
    return run


def _verl_config(rollout_correction=None):
    from verl.workers.config import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig

    policy = PolicyLossConfig(dro_beta=0.1)
    if rollout_correction is not None:
        from verl.trainer.config.algorithm import RolloutCorrectionConfig

        policy = PolicyLossConfig(loss_mode="bypass_mode",
                                  rollout_correction=RolloutCorrectionConfig(**rollout_correction))
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2,
                       clip_ratio_low=0.2, clip_ratio_high=0.28, policy_loss=policy)


def _verl_policy(name: str, B: int, T: int, dtype: torch.dtype, rollout_correction=None, weights: bool = False):
    def make(device: torch.device) -> Dict[str, Impl]:
        from verl.trainer.ppo import core_algos as ca

        from ..integrations import verl as rv

        cfg = _verl_config(rollout_correction)
        logp, old, rollout, adv, mask = _inputs(B, T, dtype, device)
        # truncated token-level IS weights of the rollout policy, as verl's trainer passes them
        w = (old.float() - rollout.float()).exp().clamp(max=2.0) * mask if weights else None
        if name == "reinforce":  # not in verl's registry
            ours, theirs = rv.compute_policy_loss_reinforce, ca.compute_policy_loss_reinforce
        else:
            ours, theirs = rv.get_policy_loss_fn(name), ca.get_policy_loss_fn(name)
        return {"rlkern": _backward(lambda: ours(old, logp, adv, mask, "token-mean", cfg, w), logp),
                "verl": _backward(lambda: theirs(old, logp, adv, mask, "token-mean", cfg, w), logp)}
    return make


def _verl_kl(mode: str, B: int, T: int, dtype: torch.dtype):
    def make(device: torch.device) -> Dict[str, Impl]:
        from verl.trainer.ppo import core_algos as ca

        from ..integrations import verl as rv

        logp, old, _, _, mask = _inputs(B, T, dtype, device)
        return {"rlkern": _backward(lambda: rv.agg_loss(rv.kl_penalty(logp, old, mode), mask, "token-mean"), logp),
                "verl": _backward(lambda: ca.agg_loss(ca.kl_penalty(logp, old, mode), mask, "token-mean"), logp)}
    return make


def _verl_value(B: int, T: int, dtype: torch.dtype):
    def make(device: torch.device) -> Dict[str, Impl]:
        from verl.trainer.ppo import core_algos as ca

        from ..integrations import verl as rv

        v, old, ret, _, mask = _inputs(B, T, dtype, device)
        return {"rlkern": _backward(lambda: rv.compute_value_loss(v, ret, old, mask, 0.2), v),
                "verl": _backward(lambda: ca.compute_value_loss(v, ret, old, mask, 0.2), v)}
    return make


def _openrlhf_policy(config: dict, B: int, T: int, dtype: torch.dtype):
    def make(device: torch.device) -> Dict[str, Impl]:
        from ..integrations import _peers
        from ..integrations import openrlhf as ro

        peer = _peers.import_openrlhf_losses()
        if peer is None:
            return {}
        logp, old, rollout, adv, mask = _inputs(B, T, dtype, device)
        ours, theirs = ro.PolicyLoss(**config), peer[0].PolicyLoss(**config)
        return {"rlkern": _backward(lambda: ours(logp, old, adv, mask, rollout), logp),
                "openrlhf": _backward(lambda: theirs(logp, old, adv, mask, rollout), logp)}
    return make


def _openrlhf_value(B: int, T: int, dtype: torch.dtype):
    def make(device: torch.device) -> Dict[str, Impl]:
        from ..integrations import _peers
        from ..integrations import openrlhf as ro

        peer = _peers.import_openrlhf_losses()
        if peer is None:
            return {}
        v, old, ret, _, mask = _inputs(B, T, dtype, device)
        ours, theirs = ro.ValueLoss(0.2), peer[0].ValueLoss(0.2)
        return {"rlkern": _backward(lambda: ours(v, old, ret, mask), v),
                "openrlhf": _backward(lambda: theirs(v, old, ret, mask), v)}
    return make


def _openrlhf_kl(estimator: str, B: int, T: int, dtype: torch.dtype):
    def make(device: torch.device) -> Dict[str, Impl]:
        from ..integrations import _peers
        from ..integrations import openrlhf as ro

        peer = _peers.import_openrlhf_losses()
        if peer is None:
            return {}
        logp, old, rollout, _, _ = _inputs(B, T, dtype, device)
        return {"rlkern": _backward(lambda: ro.compute_approx_kl(logp, rollout, old, estimator), logp),
                "openrlhf": _backward(lambda: peer[1].compute_approx_kl(logp, rollout, old, estimator), logp)}
    return make


def cases(device: torch.device, quick: bool) -> List[Case]:
    shapes = [(8, 128)] if quick else [(256, 4096)]
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    out: List[Case] = []

    def add(op: str, make, B: int, T: int, dtype: torch.dtype) -> None:
        out.append(Case("adapters", f"{op} fwd+bwd {str(dtype).replace('torch.', '')}", f"{B}x{T}", make,
                        items=B * T, unit="tokens/s"))

    for B, T in shapes:
        for dtype in dtypes:
            if _has("verl"):
                for name in VERL_LOSSES:
                    add(f"verl {name}", _verl_policy(name, B, T, dtype), B, T, dtype)
                for label, extra in VERL_EXTRA_LOSSES.items():
                    add(f"verl {label}", _verl_policy(extra["name"], B, T, dtype, extra.get("rollout_correction"),
                                                      extra.get("weights", False)), B, T, dtype)
                add("verl kl_penalty low_var_kl", _verl_kl("low_var_kl", B, T, dtype), B, T, dtype)
                add("verl compute_value_loss", _verl_value(B, T, dtype), B, T, dtype)
            if _has("openrlhf"):
                for label, config in OPENRLHF_LOSSES.items():
                    add(f"openrlhf PolicyLoss {label}", _openrlhf_policy(config, B, T, dtype), B, T, dtype)
                add("openrlhf ValueLoss", _openrlhf_value(B, T, dtype), B, T, dtype)
                for estimator in OPENRLHF_KL:
                    add(f"openrlhf compute_approx_kl {estimator}", _openrlhf_kl(estimator, B, T, dtype), B, T, dtype)
    return out
