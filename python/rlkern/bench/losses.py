"""Benchmarks of the fused policy loss: forward plus backward.

Configurations: GRPO as DAPO-style trainers run it (clip-higher 0.2/0.28, k3 KL to a
reference policy with coefficient 0.04, token-mean) and GSPO (sequence-level ratio,
clip 3e-4/4e-4, seq-mean-token-mean). Competitors: the eager PyTorch formulation as TRL's
GRPOTrainer writes it, verl's (``compute_policy_loss_vanilla``/``_gspo`` + ``kl_penalty`` +
``agg_loss``), and ``torch.compile`` of the TRL one. Every implementation computes the
loss, the clip and KL metrics, and the gradient with respect to the log-probs.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .core import Case, Impl

CLIP_LOW, CLIP_HIGH, BETA = 0.2, 0.28, 0.04
GSPO_LOW, GSPO_HIGH = 3e-4, 4e-4


def _inputs(B: int, T: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + 0.05 * torch.randn(B, T, generator=g)
    ref = logp + 0.05 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # right padding, as trainers produce it
    to = dict(device=device)
    return (logp.to(dtype=dtype, **to).requires_grad_(), old.to(dtype=dtype, **to), ref.to(dtype=dtype, **to),
            adv.to(**to), mask.to(**to))


# ---- the anchors' formulations, restated -------------------------------------------------

def trl_grpo(logp, old, ref, adv, mask):
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - CLIP_LOW, 1 + CLIP_HIGH)
    a = adv.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a) + BETA * per_token_kl
    m = mask.to(per_token_loss.dtype)
    loss = (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    with torch.no_grad():
        denom = m.sum().clamp(min=1.0)
        metrics = (((coef_1 < 1 - CLIP_LOW) & (a < 0)) * m).sum() / denom, \
            (((coef_1 > 1 + CLIP_HIGH) & (a > 0)) * m).sum() / denom, (per_token_kl * m).sum() / denom
    return loss, metrics


def trl_gspo(logp, old, adv, mask):
    m = mask.to(logp.dtype)
    log_w = ((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    coef_1 = torch.exp(log_w.unsqueeze(-1))
    coef_2 = torch.clamp(coef_1, 1 - GSPO_LOW, 1 + GSPO_HIGH)
    a = adv.unsqueeze(1)
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    loss = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    with torch.no_grad():
        denom = m.sum().clamp(min=1.0)
        metrics = (((coef_1 < 1 - GSPO_LOW) & (a < 0)) * m).sum() / denom, \
            (((coef_1 > 1 + GSPO_HIGH) & (a > 0)) * m).sum() / denom
    return loss, metrics


def _masked_mean(x, m):
    return (x * m).sum() / (m.sum() + 1e-8)


def verl_grpo(logp, old, ref, adv, mask):
    m = mask.to(logp.dtype)
    a = adv.unsqueeze(1)
    neg_kl = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    ppo_kl = _masked_mean(-neg_kl, m)
    l1 = -a * ratio
    l2 = -a * torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH)
    c1 = torch.maximum(l1, l2)
    clipfrac = _masked_mean(torch.gt(l2, l1).float(), m)
    l3 = -a * 3.0
    c2 = torch.min(l3, c1)
    clipfrac_lower = _masked_mean(torch.gt(c1, l3) * (a < 0).float(), m)
    pg = torch.where(a < 0, c2, c1)
    pg_loss = _masked_mean(pg, m)
    d = torch.clamp(ref - logp, min=-20, max=20)
    kl = torch.clamp(torch.exp(d) - d - 1, min=-10, max=10)
    kl_loss = _masked_mean(kl, m)
    return pg_loss + BETA * kl_loss, (ppo_kl.detach(), clipfrac.detach(), clipfrac_lower.detach())


def verl_gspo(logp, old, adv, mask):
    m = mask.to(logp.dtype)
    a = adv.unsqueeze(1)
    neg_kl = logp - old
    seq_lengths = torch.sum(m, dim=-1).clamp(min=1)
    neg_kl_seq = torch.sum(neg_kl * m, dim=-1) / seq_lengths
    log_s = logp - logp.detach() + neg_kl_seq.detach().unsqueeze(-1)
    log_s = torch.clamp(log_s, max=10.0)
    s = torch.exp(log_s)
    l1 = -a * s
    l2 = -a * torch.clamp(s, 1 - GSPO_LOW, 1 + GSPO_HIGH)
    pg = torch.maximum(l1, l2)
    loss = ((pg * m).sum(-1) / m.sum(-1)).mean()
    clipfrac = _masked_mean(torch.gt(l2, l1).float(), m)
    return loss, (clipfrac.detach(),)


# ---- the peers' own functions for the objectives beyond PPO ---------------------------------
# verl 0.9.1's compute_policy_loss_<name> (sapo, geo_mean, dppo_tv, dppo_kl) and TRL 1.16's
# GRPOTrainer.get_gamma_weights for VESPO, called as they are; None when not installed.

VERL_OBJECTIVES = ("sapo", "geo_mean", "dppo_tv", "dppo_kl")


def _verl_objective(name: str):
    try:
        from verl.trainer.ppo import core_algos as ca
        from verl.workers.config import ActorConfig
        from verl.workers.config.actor import PolicyLossConfig as VerlPolicyLossConfig
    except Exception:  # verl not installed: leave the competitor out
        return None
    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2,
                      clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=3.0,
                      policy_loss=VerlPolicyLossConfig(loss_mode=name))
    fn = getattr(ca, f"compute_policy_loss_{name}")
    mode = "seq-mean-token-mean" if name == "sapo" else "token-mean"

    def run(logp, old, adv, mask):
        return fn(old, logp, adv.unsqueeze(1) * mask, mask, mode, cfg)

    return run


def _ours_objective(name: str, B: int):
    # the policy_loss options that make rlkern compute verl's objective (as its adapter passes them)
    return {
        "sapo": dict(objective="sapo", log_ratio_clamp=20.0, agg="seq-mean-token-mean"),
        "geo_mean": dict(objective="geo_mean", clip_low=CLIP_LOW, clip_high=CLIP_HIGH, agg="seq-mean-token-mean",
                         normalizer=float(B)),
        "dppo_tv": dict(objective="dppo_tv", clip_low=CLIP_LOW, clip_high=CLIP_HIGH, ratio_cap=3.0,
                        log_ratio_clamp=20.0),
        "dppo_kl": dict(objective="dppo_kl", clip_low=CLIP_LOW, clip_high=CLIP_HIGH, ratio_cap=3.0,
                        log_ratio_clamp=20.0),
        "vespo": dict(objective="vespo", agg="token-sum"),
    }[name]


def _trl_vespo():
    try:
        from trl import GRPOTrainer
    except Exception:
        return None

    def run(logp, old, adv, mask):
        m = mask.to(logp.dtype)
        a = adv.unsqueeze(1)
        phi = GRPOTrainer.get_gamma_weights(advantages=a, log_ratio_per_token=logp - old, mask=m,
                                            importance_sampling_ratio=None)
        loss = (-phi * a * logp * m).sum() / m.sum().clamp(min=1.0)
        with torch.no_grad():
            metric = phi.mean()
        return loss, (metric,)

    return run


# ---- cases ----------------------------------------------------------------------------------

def _backward(fn):
    def run(logp, *args):
        logp.grad = None
        out = fn(logp, *args)
        loss = out[0] if isinstance(out, tuple) else out.loss
        loss.backward()
        return loss.detach()
    return run


def _compiled(fn):
    try:
        compiled = torch.compile(fn, dynamic=False)
    except Exception:  # no compiler toolchain: leave the competitor out
        return None
    return compiled


def _make(config: str, B: int, T: int, dtype: torch.dtype):
    def make(device: torch.device) -> Dict[str, Impl]:
        from .. import losses

        logp, old, ref, adv, mask = _inputs(B, T, dtype, device)
        impls: Dict[str, Impl] = {}
        if config in VERL_OBJECTIVES or config == "vespo":
            opts = _ours_objective(config, B)
            if config == "vespo":
                # a sequence weight that is not 0: per-token ratios close to 1
                old_ = (logp.detach() + 1e-4 * torch.randn_like(logp)).to(dtype)
                opts = dict(opts, normalizer=float(mask.sum()))
            else:
                old_ = old
            ours = _backward(lambda lp: losses.policy_loss(lp, old_, adv, mask, **opts))
            impls["rlkern"] = lambda: ours(logp)
            peer = _trl_vespo() if config == "vespo" else _verl_objective(config)
            if peer is not None:
                peer_run = _backward(peer)
                impls["trl eager" if config == "vespo" else "verl eager"] = lambda: peer_run(logp, old_, adv, mask)
            return impls
        if config == "grpo":
            ours = _backward(lambda lp: losses.policy_loss(lp, old, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                                                           ref_logp=ref, kl_coef=BETA, kl_kind="k3"))
            impls["rlkern"] = lambda: ours(logp)
            trl = _backward(trl_grpo)
            impls["trl eager"] = lambda: trl(logp, old, ref, adv, mask)
            verl = _backward(verl_grpo)
            impls["verl eager"] = lambda: verl(logp, old, ref, adv, mask)
            compiled = _compiled(trl_grpo)
            if compiled is not None:
                comp = _backward(compiled)
                impls["torch.compile(trl)"] = lambda: comp(logp, old, ref, adv, mask)
        else:
            ours = _backward(lambda lp: losses.policy_loss(lp, old, adv, mask, level="sequence", clip_low=GSPO_LOW,
                                                           clip_high=GSPO_HIGH, agg="seq-mean-token-mean"))
            impls["rlkern"] = lambda: ours(logp)
            trl = _backward(trl_gspo)
            impls["trl eager"] = lambda: trl(logp, old, adv, mask)
            verl = _backward(verl_gspo)
            impls["verl eager"] = lambda: verl(logp, old, adv, mask)
            compiled = _compiled(trl_gspo)
            if compiled is not None:
                comp = _backward(compiled)
                impls["torch.compile(trl)"] = lambda: comp(logp, old, adv, mask)
        return impls

    return make


def _eager_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked whitening as the peers write it in PyTorch (verl's masked_whiten: unbiased
    variance, rsqrt(var + 1e-8)); the competitor where verl is not installed."""
    m = mask.to(values.dtype)
    n = m.sum()
    mean = (values * m).sum() / n
    var = ((values - mean) ** 2 * m).sum() / (n - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def _whiten_make(B: int, T: int, dtype: torch.dtype):
    def make(device: torch.device) -> Dict[str, Impl]:
        from ..whiten import masked_whiten

        _, _, _, _, mask = _inputs(B, T, dtype, device)
        gen = torch.Generator(device="cpu").manual_seed(1)
        values = torch.randn(B, T, generator=gen).to(device=device, dtype=dtype)
        impls: Dict[str, Impl] = {"rlkern": lambda: masked_whiten(values, mask),
                                  "eager": lambda: _eager_whiten(values, mask)}
        try:
            from verl.utils.torch_functional import masked_whiten as verl_whiten
        except ImportError:
            verl_whiten = None
        if verl_whiten is not None:
            impls["verl masked_whiten"] = lambda: verl_whiten(values, mask)
        compiled = _compiled(_eager_whiten)
        if compiled is not None:
            impls["torch.compile"] = lambda: compiled(values, mask)
        return impls

    return make


def cases(device: torch.device, quick: bool) -> List[Case]:
    shapes = [(8, 128)] if quick else [(64, 1024), (256, 4096)]
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    out: List[Case] = []
    for config in ("grpo", "gspo") + VERL_OBJECTIVES + ("vespo",):
        for dtype in dtypes:
            for B, T in shapes:
                if config not in ("grpo", "gspo") and (B, T) == (64, 1024):
                    continue  # the objectives beyond PPO: the 256 x 4096 shape only
                out.append(Case("losses", f"policy_loss {config} fwd+bwd {str(dtype).replace('torch.', '')}",
                                f"{B}x{T}", _make(config, B, T, dtype), items=B * T, unit="tokens/s"))
    for dtype in dtypes:
        B, T = shapes[-1]
        out.append(Case("losses", f"masked_whiten {str(dtype).replace('torch.', '')}", f"{B}x{T}",
                        _whiten_make(B, T, dtype), items=B * T, unit="tokens/s"))
    return out
