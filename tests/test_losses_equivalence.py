"""policy_loss reproduces TRL's and verl's losses exactly, given the matching options.

The anchors' formulations are restated here from their sources (see
shared/research/llm_losses.md: TRL 1.16 GRPOTrainer._compute_loss and helpers, verl
core_algos compute_policy_loss_vanilla / _gspo, kl_penalty and agg_loss), in float64 on
inputs whose padded positions hold finite values (as those libraries need). Losses and
gradients with respect to the log-probs must agree.
"""

import zlib

import pytest
import torch

import rlkern
from rlkern import losses

from helpers import assert_close
from test_losses import make_batch

TIGHT = 1e-10
# verl's masked_mean divides by sum(mask) + 1e-8, rlkern by max(sum(mask), 1).
VERL_TOKEN_MEAN = 1e-7


def _batch(seed, B=6, T=12, per_token=False):
    b = make_batch(B, T, seed=seed, nan_masked=False, adv_per_token=per_token)
    # verl divides by the raw token count of each sequence: keep every sequence non-empty.
    b["mask"][:, 0] = True
    # TRL takes the entropy quantile in float32: keep the entropies exactly representable there.
    b["entropy"] = b["entropy"].float().double()
    return b


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def _ours(backend, b, logp, **options):
    with rlkern.use_backend(backend):
        return losses.policy_loss(logp, b["old"], b["adv"], b["mask"], **options)


# ---------------------------------------------------------------------------------------
# TRL GRPOTrainer (restated)


def trl_high_entropy_mask(entropies, mask, threshold):
    non_pad = entropies[mask.bool()].float()
    entropy_threshold = torch.quantile(non_pad, threshold)
    return ((entropies * mask) >= entropy_threshold) & mask.bool()


def trl_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold):
    kl_div = sampling_per_token_logps - per_token_logps.detach()
    seq_kl = (kl_div * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (seq_kl <= off_policy_threshold)).to(mask.dtype)


def trl_importance_sampling_ratio(old, sampling, mask, mode, cap):
    diff = (old - sampling) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, max=cap)
    return ratio.masked_fill(ratio > cap, value=0.0)


def trl_compute_loss(per_token_logps, old_per_token_logps, advantages, mask, *, loss_type, level="token",
                     epsilon_low=0.2, epsilon_high=0.2, delta=None, beta=0.0, ref_per_token_logps=None,
                     use_bias_correction_kl=False, entropies=None, top_entropy_quantile=1.0,
                     off_policy_mask_threshold=None, sampling_per_token_logps=None, is_mode=None, is_cap=None,
                     max_completion_length=None, num_items_in_batch=None):
    mask = mask.to(per_token_logps.dtype)
    entropy_mask = None
    if top_entropy_quantile < 1.0:
        entropy_mask = trl_high_entropy_mask(entropies, mask, 1 - top_entropy_quantile)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if off_policy_mask_threshold is not None:
        sampling = old_per_token_logps if sampling_per_token_logps is None else sampling_per_token_logps
        off_policy_mask = trl_off_policy_mask(advantages, per_token_logps, sampling, mask, off_policy_mask_threshold)
    log_ratio = per_token_logps - old_per_token_logps
    if level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = (torch.exp(ref_per_token_logps - per_token_logps)
                        - (ref_per_token_logps - per_token_logps) - 1)
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if is_mode is not None:
        per_token_loss = per_token_loss * trl_importance_sampling_ratio(old_per_token_logps, sampling_per_token_logps,
                                                                        mask, is_mode, is_cap)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type in ("cispo", "dapo"):
        return (per_token_loss * mask).sum() / num_items_in_batch
    raise ValueError(loss_type)


def trl_to_rlkern(b, loss_type, T, *, epsilon_low=0.2, epsilon_high=0.2, num_items_in_batch=None):
    """The policy_loss options that match a TRL loss type."""
    if loss_type == "cispo":
        # TRL caps the weight at epsilon_high (absolute); the lower bound 1 - 1 = 0 is inactive.
        return dict(objective="cispo", clip_low=1.0, clip_high=epsilon_high - 1.0, agg="token-sum",
                    normalizer=num_items_in_batch)
    agg = {"grpo": dict(agg="seq-mean-token-mean"), "bnpo": dict(agg="token-mean"),
           "dr_grpo": dict(agg="token-sum", normalizer=float(b["logp"].shape[0] * T)),
           "dapo": dict(agg="token-mean", normalizer=num_items_in_batch)}[loss_type]
    return dict(clip_low=epsilon_low, clip_high=epsilon_high, **agg)


TRL_EXTRAS = {
    "plain": ({}, {}),
    "kl": (dict(beta=0.04), dict(kl_coef=0.04)),
    "kl_bias_corrected": (dict(beta=0.04, use_bias_correction_kl=True), dict(kl_coef=0.04, kl_is_correction=True)),
    "delta": (dict(delta=1.05), dict(ratio_cap=1.05)),
    "entropy_mask": (dict(top_entropy_quantile=0.4), dict(entropy_top_fraction=0.4)),
    "off_policy": (dict(off_policy_mask_threshold=0.01), dict(off_policy_threshold=0.01)),
    "is_token_truncate": (dict(is_mode="token_truncate", is_cap=1.1), dict(tis_cap=1.1)),
    "is_sequence_truncate": (dict(is_mode="sequence_truncate", is_cap=1.3), dict(tis_cap=1.3, tis_level="sequence")),
    "is_token_mask": (dict(is_mode="token_mask", is_cap=1.1), dict(tis_cap=1.1, tis_mode="mask")),
    "is_sequence_mask": (dict(is_mode="sequence_mask", is_cap=1.3), dict(tis_cap=1.3, tis_level="sequence",
                                                                          tis_mode="mask")),
}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
@pytest.mark.parametrize("extra", list(TRL_EXTRAS))
def test_trl_loss_types(backend, loss_type, level, extra):
    if loss_type == "cispo" and extra == "delta":
        pytest.skip("TRL's delta applies to the clipped objectives only")
    b = _batch(seed=zlib.crc32(f"{loss_type}/{level}/{extra}".encode()) % 1000)
    T = b["logp"].shape[1]
    trl_extra, ours_extra = TRL_EXTRAS[extra]
    eps_high = 4.0 if loss_type == "cispo" else 0.28
    num_items = float(b["mask"].sum()) + 5.0  # a whole generation batch is larger than this micro-batch
    logp = b["logp"].clone().requires_grad_()
    trl_kwargs = dict(loss_type=loss_type, level=level, epsilon_low=0.2, epsilon_high=eps_high,
                      ref_per_token_logps=b["ref"], entropies=b["entropy"], sampling_per_token_logps=b["rollout"],
                      max_completion_length=T, num_items_in_batch=num_items)
    trl_kwargs.update(trl_extra)
    expected = trl_compute_loss(logp, b["old"], b["adv"], b["mask"], **trl_kwargs)
    options = trl_to_rlkern(b, loss_type, T, epsilon_high=eps_high, num_items_in_batch=num_items)
    options.update(ours_extra, level=level)
    if "kl_coef" in ours_extra:
        options["ref_logp"] = b["ref"]
    if "entropy_top_fraction" in ours_extra:
        options["entropy"] = b["entropy"]
    if "tis_cap" in ours_extra or "off_policy_threshold" in ours_extra:
        options["rollout_logp"] = b["rollout"]
    out = _ours(backend, b, logp, **options)
    assert_close(out.loss, expected, TIGHT)
    assert_close(_grad(out.loss, logp), _grad(expected, logp), TIGHT)


# ---------------------------------------------------------------------------------------
# verl core_algos (restated)


def verl_masked_mean(values, mask):
    return (values * mask).sum() / (mask.sum() + 1e-8)


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode):
    """verl 0.9.1's agg_loss (dp_size 1): sequence means over the non-empty sequences, and
    seq-mean-token-sum-norm divides that mean by T."""
    if loss_agg_mode == "token-mean":
        return verl_masked_mean(loss_mat, loss_mask)
    seq_tokens = torch.sum(loss_mask, dim=-1)
    seq_mask = (seq_tokens > 0).to(loss_mat.dtype)
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        loss = (seq_losses * seq_mask).sum() / seq_mask.sum()
        return loss / loss_mask.shape[-1] if loss_agg_mode == "seq-mean-token-sum-norm" else loss
    if loss_agg_mode == "seq-mean-token-mean":
        # verl adds 1e-8 to the count; that relative 1e-8 is below float32 rounding and left out
        # here so that the float64 comparison stays tight.
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / seq_tokens.clamp(min=1)
        return (seq_losses * seq_mask).sum() / seq_mask.sum()
    raise ValueError(loss_agg_mode)


def verl_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, cliprange_low, cliprange_high,
                             clip_ratio_c, loss_agg_mode, rollout_is_weights=None):
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    return verl_agg_loss(pg_losses, response_mask, loss_agg_mode), ppo_kl


def verl_policy_loss_gspo(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high):
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)
    seq_importance_ratio = torch.exp(log_seq_importance_ratio)
    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    return verl_agg_loss(pg_losses, response_mask, "seq-mean-token-mean")


def verl_kl_penalty(logprob, ref_logprob, kl_penalty):
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if kl_penalty in ("low_var_kl", "k3"):
        kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    raise ValueError(kl_penalty)


VERL_AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("agg", VERL_AGGS)
@pytest.mark.parametrize("kl_kind", [None, "kl", "mse", "low_var_kl"])
@pytest.mark.parametrize("with_tis", [False, True])
def test_verl_vanilla_with_dual_clip(backend, agg, kl_kind, with_tis):
    b = _batch(seed=VERL_AGGS.index(agg) * 10 + int(with_tis), per_token=True)
    b["old"][0, :3] = b["logp"][0, :3] - 25.0  # exercise verl's log-ratio clamp at 20
    mask = b["mask"].to(torch.float64)
    adv = torch.where(b["mask"], b["adv"], torch.zeros_like(b["adv"]))
    b["adv"] = adv
    logp = b["logp"].clone().requires_grad_()
    weights = torch.clamp(torch.exp(b["old"] - b["rollout"]), max=1.2) if with_tis else None
    pg_loss, _ = verl_policy_loss_vanilla(b["old"], logp, adv, mask, 0.2, 0.28, 3.0, agg, weights)
    expected = pg_loss
    options = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, log_ratio_clamp=20.0, agg=agg)
    if with_tis:
        options.update(rollout_logp=b["rollout"], tis_cap=1.2)
    if kl_kind is not None:
        expected = expected + 0.05 * verl_agg_loss(verl_kl_penalty(logp, b["ref"], kl_kind), mask, agg)
        options.update(ref_logp=b["ref"], kl_coef=0.05, kl_kind={"kl": "k1", "mse": "k2", "low_var_kl": "k3"}[kl_kind],
                       kl_clamp=10.0 if kl_kind == "low_var_kl" else None)
    out = _ours(backend, b, logp, **options)
    tol = VERL_TOKEN_MEAN if agg == "token-mean" else TIGHT
    assert_close(out.loss, expected, tol)
    assert_close(_grad(out.loss, logp), _grad(expected, logp), tol)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("shift", [0.0, 12.0])
def test_verl_gspo(backend, shift):
    b = _batch(seed=40)
    b["old"][1] = b["logp"][1] - shift  # shift > 10 hits verl's clamp of the sequence log-ratio
    mask = b["mask"].to(torch.float64)
    logp = b["logp"].clone().requires_grad_()
    expected = verl_policy_loss_gspo(b["old"], logp, b["adv"].unsqueeze(1), mask, 3e-4, 4e-4)
    out = _ours(backend, b, logp, level="sequence", clip_low=3e-4, clip_high=4e-4, log_ratio_clamp=(None, 10.0),
                agg="seq-mean-token-mean")
    assert_close(out.loss, expected, TIGHT)
    assert_close(_grad(out.loss, logp), _grad(expected, logp), TIGHT)


def test_verl_gspo_equals_trl_sequence_level():
    """The research note's claim: verl's GSPO and TRL's sequence level with grpo aggregation agree."""
    b = _batch(seed=41)
    mask = b["mask"].to(torch.float64)
    logp = b["logp"].clone().requires_grad_()
    verl = verl_policy_loss_gspo(b["old"], logp, b["adv"].unsqueeze(1), mask, 0.05, 0.08)
    trl = trl_compute_loss(logp, b["old"], b["adv"], b["mask"], loss_type="grpo", level="sequence",
                           epsilon_low=0.05, epsilon_high=0.08)
    assert_close(verl, trl, TIGHT)
    assert_close(_grad(verl, logp), _grad(trl, logp), TIGHT)
