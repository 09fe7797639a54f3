"""TRL's ``GRPOTrainer``, ``DPOTrainer`` and ``RewardTrainer`` on rlkern's kernels: change one import.

    # from trl import GRPOTrainer, DPOTrainer, RewardTrainer
    from rlkern.integrations.trl import GRPOTrainer, DPOTrainer, RewardTrainer

The constructors are TRL's. What changes:

- The fused LM head TRL patches onto the policy and reference models (GRPO and DPO) computes
  log-probabilities and entropies with :func:`rlkern.linear_token_logprobs` (chunked over the
  vocabulary, no ``[tokens, vocab]`` logits kept for backward) from the backbone's hidden states.
- ``GRPOTrainer._compute_loss`` evaluates the policy loss with :func:`rlkern.policy_loss` (ratio,
  clipping, the k3 KL term, masking and aggregation in one fused op) for ``loss_type`` grpo, bnpo,
  dr_grpo, dapo and cispo (``epsilon_high`` below 1 included) at ``importance_sampling_level``
  token and sequence, with or without the KL term (``beta``, ``use_bias_correction_kl``), the
  entropy bonus (static or adaptive), two-sided clipping (``delta``), the off-policy sequence mask
  (``off_policy_mask_threshold``), the high-entropy token selection (``top_entropy_quantile``,
  over all processes as TRL: :func:`high_entropy_mask`) and vLLM's importance-sampling correction
  (``vllm_importance_sampling_mode`` token_truncate, token_mask, sequence_truncate, sequence_mask
  with ``vllm_importance_sampling_clip_max``). It logs the metrics TRL logs.
- ``DPOTrainer`` computes the loss with :func:`rlkern.dpo_loss` for ``loss_type`` sigmoid, hinge,
  ipo and sigmoid_norm; ``RewardTrainer`` with :func:`rlkern.bradley_terry_loss`.

Configurations rlkern does not cover run on TRL's own code, unchanged, and each trainer's
constructor says so once (logger ``rlkern.integrations.trl``: INFO when everything runs on
rlkern, WARNING naming each part left to TRL and why). For GRPO: VESPO with a sequence-level vLLM
mode (set on a built trainer: TRL's constructor refuses it), an importance-sampling band whose
``vllm_importance_sampling_clip_min`` exceeds its ``clip_max`` and CISPO with ``epsilon_high <= 0``. Models with
final-logit softcapping run on rlkern's head (the cap is a kernel option) and MoE models get
TRL's router auxiliary loss through it. Checked against trl 1.16.0 and transformers 5.24.
"""

from __future__ import annotations

import functools
import logging
import math
import types
from typing import Any, Optional

import torch

try:
    import transformers
    from packaging.version import Version
    from trl import DPOTrainer as _TRLDPOTrainer
    from trl import GRPOTrainer as _TRLGRPOTrainer
    from trl import RewardTrainer as _TRLRewardTrainer
    from trl.trainer.utils import FusedCausalLMOutput, nanmax, nanmin
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("rlkern.integrations.trl needs the `trl` package (pip install trl)") from exc

from ..logprobs import linear_token_logprobs
from ..losses import bradley_terry_loss, dpo_loss, policy_loss

__all__ = ["DPOTrainer", "GRPOTrainer", "RewardTrainer", "add_rlkern_lm_head", "high_entropy_mask"]

logger = logging.getLogger("rlkern.integrations.trl")


def _logit_scale(text_config) -> float:
    # the same attributes TRL's fused head reads, in the same order
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        s = text_config.logits_scaling
        scale = s if text_config.model_type == "hyperclovax" else 1 / s
    return 1.0 if scale is None else float(scale)


_HEAD_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def _lm_head_unsupported(model) -> Optional[str]:
    """Why rlkern's fused LM head cannot replace TRL's on ``model``, or None."""
    text_config = model.config.get_text_config()
    scale = _logit_scale(text_config)
    if scale == 0.0:
        return "the model's logit scale is 0"
    if getattr(text_config, "final_logit_softcapping", None) is not None and not scale > 0:
        return f"the model soft-caps logits scaled by a negative factor (logit scale {scale})"
    return None


def _router_aux_loss(model, text_config, backbone_outputs, attention_mask):
    """The MoE load-balancing loss exactly as TRL's fused head computes it: transformers'
    Mixtral ``load_balancing_loss_func`` (the one every MoE family shares) over the backbone's
    router logits, with the expert counts read where TRL reads them."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    if Version(transformers.__version__) < Version("5.0.0"):
        num_experts, num_experts_per_tok = model.num_experts, model.num_experts_per_tok
    else:
        if text_config.model_type == "gpt_oss" and Version("5.0.0") <= Version(transformers.__version__) \
                < Version("5.6.0"):
            num_experts = model.num_experts  # GptOssConfig lacks num_experts there (TRL #5754)
        else:
            num_experts = text_config.num_experts
        num_experts_per_tok = text_config.num_experts_per_tok
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts, num_experts_per_tok,
                                    attention_mask)


def add_rlkern_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                       outputs: tuple = ("log_probs",)) -> bool:
    """Route ``model(..., labels=..., fused_lm_head=True)`` through rlkern's fused log-prob kernel.

    Call after TRL's ``add_fused_lm_head`` (the GRPOTrainer constructor does): calls without
    ``fused_lm_head`` keep TRL's head. Returns whether the rlkern head was installed.

    As TRL's head: logits = (hidden @ W.T + b) * logit_scale, soft-capped (Gemma-2's
    ``final_logit_softcapping`` c: c * tanh(logits / c), passed to the kernel as the cap c / scale
    and the temperature T / scale, the same function), divided by the temperature. MoE models
    (``output_router_logits`` in the config or the call) get TRL's router load-balancing loss:
    ``aux_loss`` on the output, and ``router_aux_loss_coef`` times it added to ``loss``.

    ``outputs`` as TRL's: "log_probs" and "entropy" come from the kernel, and so does "is_top1"
    (the label is the first argmax of the capped logits, from the same pass, no gradient);
    "mean_logits" (the mean over the vocabulary of the scaled, capped, tempered logits) is a
    detached metric: the hidden state times the mean row of the head, or under a cap one more
    projection in vocabulary chunks without gradient. "log_sum_sq_probs" is not available: with
    it the head is not installed.
    """
    if _lm_head_unsupported(model) is not None or not set(outputs) <= set(_HEAD_OUTPUTS):
        return False
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    want_mean, want_top1 = "mean_logits" in outputs, "is_top1" in outputs
    previous_forward = model.forward
    logit_scale = _logit_scale(text_config)
    # c * tanh(s x / c) / T == (c / s) * tanh(x / (c / s)) / (T / s) for s > 0
    kernel_softcap = None if softcap is None else float(softcap) / logit_scale
    want_entropy = "entropy" in outputs
    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        backbone_attr = "model"
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()

    @functools.wraps(type(model).forward)
    def _rlkern_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                        **kwargs):
        if not fused_lm_head:
            return previous_forward(*args, fused_lm_head=False, labels=labels, shift_labels=shift_labels,
                                    num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        # MoE models: like the model's own forward (and TRL's head), router logits when the config asks
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = getattr(self, backbone_attr)(*args, **kwargs)
        if shift_labels is None:
            hidden = backbone_outputs.last_hidden_state[:, :-1]
            labels = labels[:, 1:]
        else:
            hidden = backbone_outputs.last_hidden_state
            labels = shift_labels
        lm_head = self.get_output_embeddings()
        hidden = hidden.to(lm_head.weight.device)
        labels = labels.to(lm_head.weight.device)
        mask = labels != -100
        weight, bias = lm_head.weight, lm_head.bias
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
            if bias is not None:
                bias = bias.full_tensor()
        selected = hidden[mask]
        device_type = hidden.device.type
        if cast_lm_head_to_fp32:
            compute_dtype = torch.float32
        elif torch.is_autocast_enabled(device_type):
            # as TRL's head (and autocast's matmul): the projection in the autocast dtype
            compute_dtype = torch.get_autocast_dtype(device_type)
        else:
            compute_dtype = weight.dtype
        selected = selected.to(compute_dtype)
        weight = weight.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)
        # logits * scale / T == logits / (T / scale)
        with torch.autocast(device_type, enabled=False):
            result = linear_token_logprobs(selected, weight, labels[mask], bias=bias,
                                           temperature=temperature / logit_scale, return_entropy=want_entropy,
                                           softcap=kernel_softcap, return_top1=want_top1)
        if not isinstance(result, tuple):
            result = (result,)
        logp = result[0]
        entropy = result[1] if want_entropy else None
        top1 = result[-1] if want_top1 else None
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a zero loss, not an error)
        log_probs = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
        entropy = None if entropy is None else entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)
        is_top1 = None if top1 is None else torch.zeros(mask.shape, dtype=torch.bool,
                                                        device=top1.device).masked_scatter(mask, top1)
        mean_logits = None
        if want_mean:
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                if softcap is None:
                    mean = selected.float() @ weight.float().mean(0)
                    if bias is not None:
                        mean = mean + bias.float().mean()
                    mean = mean * (logit_scale / temperature)
                else:  # the mean of capped logits is no projection of the mean row: tile by tile
                    mean = torch.zeros(selected.shape[0], device=selected.device)
                    for v0 in range(0, weight.shape[0], 8192):
                        tile = (selected @ weight[v0:v0 + 8192].t()).float()
                        if bias is not None:
                            tile = tile + bias[v0:v0 + 8192].float()
                        mean += (softcap * torch.tanh(tile * logit_scale / softcap)).sum(-1)
                    mean = mean / (weight.shape[0] * temperature)
                mean_logits = torch.zeros(mask.shape, device=mean.device).masked_scatter(mask, mean)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / denom
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_aux_loss(self, text_config, backbone_outputs, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, mean_logits=mean_logits,
                                   is_top1=is_top1, label_mask=mask, aux_loss=aux_loss)

    model.forward = types.MethodType(_rlkern_forward, model)
    return True


# ---------------------------------------------------------------------------------------------
# The high-entropy token selection over several processes


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float, group=None) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask`` over the processes of ``group``, without gathering every entropy.

    The tokens (``mask`` != 0) whose entropy is at least the ``quantile`` quantile (linear
    interpolation, float32, as ``torch.quantile``) of the active entropies of all processes;
    all False when there is no active token anywhere or one of them is NaN (TRL's quantile is
    then NaN). Every process of ``group`` must call it (two all-gathers); without an initialized
    ``torch.distributed`` it is the selection of this process's tokens.

    The quantile reads two neighbouring order statistics of the N active entropies, at rank
    ~quantile * (N - 1). Both lie among the K = min(q, 1 - q) * N + 3 largest (q >= 1/2) or
    smallest (q < 1/2) values, and each process holds at most K of those, so each sends its own
    K most extreme values, not all of them: one all-gather of the counts (two integers per
    process, which TRL's padded gather also does), one of at most K values per process. The
    quantile of the N-long vector made of the K gathered extremes and N - K copies of the
    innermost one is the quantile of all entropies, bit for bit.

    This moves min(K, n) instead of n values per process (n the largest local token count):
    a saving when the world is smaller than 1 / min(q, 1 - q) (with TRL's quantile 0.8, up to 4
    processes). An exact selection that moves less for any world size needs several rounds (a
    radix select over the float bits, one all-reduce of a histogram per round); one round of
    4 bytes per token was chosen, as the entropies are small next to everything else a step moves.
    """
    import torch.distributed as dist

    if not isinstance(entropies, torch.Tensor) or not entropies.is_floating_point():
        raise TypeError(f"entropies must be a floating-point tensor, got {type(entropies).__name__}")
    if not isinstance(mask, torch.Tensor) or mask.shape != entropies.shape:
        raise ValueError(f"mask must be a tensor of the shape of entropies {tuple(entropies.shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be a number in [0, 1], got {quantile!r}")
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size(group) if distributed else 1

    def all_gather(tensor):
        if not distributed:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(out, tensor, group=group)
        return out

    active = mask.bool()
    local = entropies.detach()[active].float()
    header = torch.tensor([local.numel(), int(torch.isnan(local).any())], dtype=torch.long, device=local.device)
    headers = all_gather(header)
    counts = [int(h[0]) for h in headers]
    total = sum(counts)
    if total == 0 or any(int(h[1]) for h in headers):
        return torch.zeros_like(active)
    top_side = quantile >= 0.5
    keep = min(total, int(math.floor(min(quantile, 1.0 - quantile) * total)) + 3)
    width = min(keep, max(counts))
    extreme = torch.sort(local, descending=top_side).values[:width]
    payload = torch.full((width,), float("nan"), dtype=torch.float32, device=local.device)
    payload[:extreme.numel()] = extreme
    candidates = torch.cat(all_gather(payload))
    candidates = candidates[~torch.isnan(candidates)]
    extremes = torch.sort(candidates, descending=top_side).values[:keep]
    innermost = extremes[-1:].expand(total - keep)
    stand_in = torch.cat([extremes, innermost])
    threshold = torch.quantile(stand_in, quantile)
    return ((entropies * mask.float()) >= threshold) & active


def _selection_as_entropy_options(selected: torch.Tensor, mask: torch.Tensor):
    """policy_loss options that keep the policy term on exactly the ``selected`` active tokens.

    policy_loss selects by a quantile of its ``entropy`` input over the micro-batch; given the
    selection as 1.0 (selected) and 0.0 (not) and the top fraction (k - 1/2) / (n - 1) of the n
    active tokens (k selected), that quantile falls between the zeros and the ones, so it keeps
    the ones. Without a selected token there is no fraction that keeps nothing: the advantages
    are then zeroed, which zeroes the policy term exactly as TRL's multiplication by the mask.
    Returns (options, zero_advantages).
    """
    active = mask.bool()
    n = int(active.sum())
    k = int((selected & active).sum())
    if k == 0:
        return {}, n > 0
    fraction = 1.0 if k == n else (k - 0.5) / (n - 1)
    return dict(entropy=selected.float(), entropy_top_fraction=fraction), False


# ---------------------------------------------------------------------------------------------
# loss_type -> rlkern.policy_loss options. A TRL loss type that rlkern computes is one entry of
# _LOSS_TYPES: (objective options, aggregation). Both are functions of the trainer; an objective
# function returns a string (the reason) for a configuration it cannot express exactly.


def _clip_objective(trainer):
    return dict(objective="clip", clip_low=trainer.epsilon_low, clip_high=trainer.epsilon_high,
                ratio_cap=getattr(trainer.args, "delta", None))


def _cispo_objective(trainer):
    # TRL weighs the token by sg(min(w, epsilon_high)), no lower bound: clip(w, 1 - 1, 1 + (epsilon_high - 1))
    eps = trainer.epsilon_high
    if eps >= 1.0:
        return dict(objective="cispo", clip_low=1.0, clip_high=eps - 1.0)
    if not eps > 0.0:
        return f"CISPO with epsilon_high={eps} (a cap <= 0 on a positive ratio) is left to TRL"
    # min(w, eps) = exp(min(log w, log eps)); the ratio is detached in CISPO, so the clamp changes
    # nothing else but the bias-corrected KL's weight, which _compute_loss computes apart
    return dict(objective="cispo", clip_low=1.0, clip_high=0.0, log_ratio_clamp=(None, math.log(eps)))


def _sapo_objective(trainer):
    return dict(objective="sapo", sapo_temperature_pos=float(trainer.args.sapo_temperature_pos),
                sapo_temperature_neg=float(trainer.args.sapo_temperature_neg))


def _vespo_objective(trainer):
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction and \
            not str(trainer.vllm_importance_sampling_mode).startswith("token_"):
        return (f"VESPO folds the vLLM importance weight into its sequence weight per token; the "
                f"{trainer.vllm_importance_sampling_mode} mode is left to TRL")
    args = trainer.args
    return dict(objective="vespo", vespo_k_pos=float(args.vespo_k_pos), vespo_lambda_pos=float(args.vespo_lambda_pos),
                vespo_k_neg=float(args.vespo_k_neg), vespo_lambda_neg=float(args.vespo_lambda_neg))


def _seq_mean(trainer, B, mask, inputs, mode, accumulation):
    """grpo: mean over the micro-batch's sequences of each one's token mean."""
    return "seq-mean-token-mean", B * accumulation


def _token_mean(trainer, B, mask, inputs, mode, accumulation):
    """bnpo: mean over the micro-batch's tokens."""
    return "token-mean", mask.sum().clamp(min=1.0).item() * accumulation


def _seq_token_sum(trainer, B, mask, inputs, mode, accumulation):
    """luspo: mean over the micro-batch's sequences (empty ones counted) of each one's token sum."""
    return "seq-mean-token-sum", B * accumulation


def _constant_length(trainer, B, mask, inputs, mode, accumulation):
    """dr_grpo: token sum over B * max_completion_length."""
    return "token-sum", B * trainer.max_completion_length * accumulation


def _generation_tokens(trainer, B, mask, inputs, mode, accumulation):
    """dapo, cispo: the token count of the generation batch, rescaled to one accumulation window."""
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0).item() / trainer.accelerator.num_processes
    if mode == "train":
        normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
    return "token-sum", normalizer


# loss_type: (objective, aggregation, whether TRL logs the policy term before the accumulation scaling)
_LOSS_TYPES = {
    "grpo": (_clip_objective, _seq_mean, True),
    "bnpo": (_clip_objective, _token_mean, True),
    "dr_grpo": (_clip_objective, _constant_length, True),
    "dapo": (_clip_objective, _generation_tokens, False),
    "cispo": (_cispo_objective, _generation_tokens, False),
    "sapo": (_sapo_objective, _seq_mean, True),
    "luspo": (_clip_objective, _seq_token_sum, True),
    "vespo": (_vespo_objective, _generation_tokens, False),
}
_RLKERN_LOSS_TYPES = tuple(_LOSS_TYPES)

_VLLM_IS_MODES = {
    "token_truncate": ("token", "truncate"),
    "token_mask": ("token", "mask"),
    "sequence_truncate": ("sequence", "truncate"),
    "sequence_mask": ("sequence", "mask"),
}


class GRPOTrainer(_TRLGRPOTrainer):
    """TRL's ``GRPOTrainer`` whose log-probabilities and policy loss run on rlkern kernels.

    Same constructor and behaviour as ``trl.GRPOTrainer``; see the module docstring for what is
    computed by rlkern and what falls back to TRL. The constructor logs (logger
    ``rlkern.integrations.trl``) which parts run on rlkern and which on TRL's code, and why.
    For loss_type ``grpo`` the loss is::

        w_i,t = exp(lp - old)  (token)  or  exp(sum_t m (lp - old) / sum_t m)  (sequence)
        l_i,t = -min(w A_i, clip(w, 1 - epsilon, 1 + epsilon_high) A_i) * is_i,t + beta k3(lp, ref)
        L     = mean_i sum_t m l / sum_t m  - entropy_coef mean_t H_t

    with is_i,t the vLLM importance weight (1 without vLLM correction): exp(old - sampling) per
    token or exp(sum_t m (old - sampling)) per sequence, truncated at or masked above
    ``vllm_importance_sampling_clip_max``. The other types change only the aggregation (bnpo:
    over all tokens; dr_grpo: divided by B * max_completion_length; dapo, cispo: by the tokens of
    the whole generation batch) or, for cispo, the objective -sg(min(w, epsilon_high)) A lp.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._rlkern_head_reason = _lm_head_unsupported(base)
        self._rlkern_policy_head = self._rlkern_head_reason is None and add_rlkern_lm_head(
            base, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
            outputs=("log_probs", "entropy"))
        if self.ref_model is not None and _lm_head_unsupported(self.ref_model) is None:
            add_rlkern_lm_head(self.ref_model, temperature=self.temperature,
                               cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        self._rlkern_runtime_fallbacks = set()
        self._rlkern_log_plan()

    # -- what runs where --------------------------------------------------------------------

    def _rlkern_loss_fallback(self) -> Optional[str]:
        """Why the policy loss of this configuration runs on TRL's code, or None when rlkern computes it."""
        if self.loss_type not in _LOSS_TYPES:
            return f"loss_type={self.loss_type!r} has no rlkern objective"
        objective = _LOSS_TYPES[self.loss_type][0](self)
        if isinstance(objective, str):
            return objective
        if self.use_vllm and self.vllm_importance_sampling_correction:
            if self.vllm_importance_sampling_mode not in _VLLM_IS_MODES:
                return f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r} is unknown"
            clip_min, clip_max = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
            if clip_min is not None and clip_max is not None and clip_min > clip_max:
                return (f"vllm_importance_sampling_clip_min={clip_min} exceeds clip_max={clip_max}, an empty band "
                        "that rlkern's tis_min/tis_cap refuse")
        return None

    def _rlkern_plan(self):
        """([parts on rlkern], [(part, reason) on TRL's code]) for this configuration."""
        on_rlkern, on_trl = [], []
        if self._rlkern_policy_head:
            on_rlkern.append("log-probabilities and entropies (rlkern.linear_token_logprobs, fused LM head)")
        else:
            on_trl.append(("log-probabilities and entropies (TRL's fused LM head)", self._rlkern_head_reason))
        reason = self._rlkern_loss_fallback()
        if reason is not None:
            on_trl.append((f"policy loss (loss_type={self.loss_type!r})", reason))
            return on_rlkern, on_trl
        parts = [f"loss_type={self.loss_type!r}", f"importance_sampling_level={self.importance_sampling_level!r}"]
        if self.beta != 0.0:
            parts.append("k3 KL" + (" with bias correction" if self.args.use_bias_correction_kl else ""))
        if self.use_vllm and self.vllm_importance_sampling_correction:
            parts.append(f"vLLM importance sampling {self.vllm_importance_sampling_mode}")
        if self.off_policy_mask_threshold is not None:
            parts.append("off-policy sequence mask")
        if self.top_entropy_quantile < 1.0:
            parts.append(f"top_entropy_quantile={self.top_entropy_quantile}")
        on_rlkern.append("policy loss (rlkern.policy_loss: " + ", ".join(parts) + ")")
        if self._entropy_bonus_enabled:
            on_rlkern.append("entropy bonus" + (" with adaptive control" if self.use_adaptive_entropy else ""))
        return on_rlkern, on_trl

    def _rlkern_log_plan(self):
        on_rlkern, on_trl = self._rlkern_plan()
        lines = ["rlkern GRPOTrainer:", *(f"  on rlkern: {p}" for p in on_rlkern),
                 *(f"  on TRL's code: {p}, because {r}" for p, r in on_trl)]
        logger.log(logging.WARNING if on_trl else logging.INFO, "\n".join(lines))

    def _rlkern_runtime_fallback(self, reason: str) -> None:
        if reason not in self._rlkern_runtime_fallbacks:
            self._rlkern_runtime_fallbacks.add(reason)
            logger.warning("rlkern GRPOTrainer: a micro-batch's policy loss runs on TRL's code, because %s "
                           "(logged once)", reason)

    # -- the loss -----------------------------------------------------------------------------

    def _rlkern_handles(self, inputs) -> bool:
        return self._rlkern_loss_fallback() is None

    @staticmethod
    def _rlkern_mask(inputs):
        return inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]

    def _compute_loss(self, model, inputs):
        if not self._rlkern_handles(inputs):
            return super()._compute_loss(model, inputs)

        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = self._rlkern_mask(inputs)

        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                          "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                          "mm_token_type_ids", "image_position_ids")},
        )

        advantages = inputs["advantages"]
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:
            old_per_token_logps = per_token_logps.detach()

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        objective, aggregation, logs_unscaled = _LOSS_TYPES[self.loss_type]
        agg, normalizer = aggregation(self, per_token_logps.size(0), mask, inputs, mode, accumulation)

        options = dict(objective(self))
        if options.get("ratio_cap") is None:
            options.pop("ratio_cap", None)
        vllm_is = self.use_vllm and self.vllm_importance_sampling_correction
        if vllm_is:
            # TRL's weight: exp(old - sampling) per token or exp(sum over the sequence), a token the
            # engine could not score (NaN) giving no correction (a zero log-difference)
            sampling = inputs["sampling_per_token_logps"]
            level, kind = _VLLM_IS_MODES[self.vllm_importance_sampling_mode]
            cap, clip_min = self.vllm_importance_sampling_clip_max, self.vllm_importance_sampling_clip_min
            options.update(rollout_logp=torch.where(torch.isnan(sampling), old_per_token_logps, sampling),
                           tis_cap=math.inf if cap is None else float(cap), tis_level=level, tis_mode=kind)
            if clip_min is not None and clip_min > 0.0:
                options["tis_min"] = float(clip_min)  # TRL's clamp(min=...) / its mask below the band
        if self.off_policy_mask_threshold is not None:
            # TRL measures the drift from the sampling engine's log-probs (or the old ones); a token
            # it could not score (NaN) counts as no drift here, while the importance weight above
            # counts it as no correction: two tensors, so the kernel reads each its own
            options["off_policy_threshold"] = float(self.off_policy_mask_threshold)
            sampling = inputs.get("sampling_per_token_logps", old_per_token_logps)
            options["off_policy_logp"] = torch.where(torch.isnan(sampling), per_token_logps.detach(), sampling)
        entropy_mask, loss_advantages = None, advantages
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            if self._rlkern_local_selection():
                options.update(entropy=entropies.detach(), entropy_top_fraction=float(self.top_entropy_quantile))
            else:
                # the quantile is over all processes: hand policy_loss the selection itself
                selection, no_token = _selection_as_entropy_options(entropy_mask, mask)
                options.update(selection)
                if no_token:
                    loss_advantages = torch.zeros_like(advantages)
        use_kl = self.beta != 0.0
        kl_correction = bool(self.args.use_bias_correction_kl)
        # A capped log-ratio (CISPO's cap below 1) would also cap the ratio the bias-corrected KL
        # is multiplied by, where TRL uses the uncapped one: the KL then takes a second pass of its
        # own, with zero advantages (no policy term) and the plain ratio.
        kl_apart = use_kl and kl_correction and "log_ratio_clamp" in options
        out = policy_loss(
            per_token_logps, old_per_token_logps, loss_advantages, mask, level=self.importance_sampling_level,
            ref_logp=inputs["ref_per_token_logps"] if use_kl and not kl_apart else None,
            kl_coef=0.0 if kl_apart else self.beta, kl_kind="k3", kl_is_correction=kl_correction and not kl_apart,
            agg=agg, normalizer=float(normalizer), **options,
        )
        loss = out.loss
        if kl_apart:
            loss = loss + policy_loss(
                per_token_logps, old_per_token_logps, torch.zeros_like(advantages), mask,
                level=self.importance_sampling_level, ref_logp=inputs["ref_per_token_logps"], kl_coef=self.beta,
                kl_kind="k3", kl_is_correction=True, agg=agg, normalizer=float(normalizer),
            ).loss
        policy_term = loss.detach() * (accumulation if logs_unscaled else 1.0)
        metrics = out.metrics
        if loss_advantages is not advantages and self.loss_type == "vespo":
            # zero advantages pick VESPO's (k_pos, lambda_pos) for every sequence: TRL's
            # vespo/phi_seq_mean is of the true advantages' weights, without the selection
            with torch.no_grad():
                unselected = {k: v for k, v in options.items() if k not in ("entropy", "entropy_top_fraction")}
                metrics = policy_loss(
                    per_token_logps.detach(), old_per_token_logps, advantages, mask,
                    level=self.importance_sampling_level, agg=agg, normalizer=float(normalizer), **unselected,
                ).metrics

        if self._entropy_bonus_enabled:
            loss = loss - self._rlkern_entropy_bonus(entropies, mask, entropy_mask, mode, accumulation)
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_term).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_rlkern_metrics(mode, per_token_logps, old_per_token_logps, advantages, mask, entropies,
                                 inputs.get("ref_per_token_logps") if use_kl else None, metrics)
        return loss

    def _rlkern_local_selection(self) -> bool:
        """Whether policy_loss's own (micro-batch) entropy quantile is TRL's: in one process."""
        return self.accelerator.num_processes == 1

    def get_high_entropy_mask(self, entropies, mask, threshold):
        import torch.distributed as dist

        if self.accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
            return high_entropy_mask(entropies, mask, threshold)
        return super().get_high_entropy_mask(entropies, mask, threshold)

    def _rlkern_entropy_bonus(self, entropies, mask, entropy_mask, mode, accumulation):
        """coef * the mean entropy of the tokens the policy term acts on, and TRL's adaptive controller.

        As TRL: the coefficient applied in an accumulation window is the one set at the end of
        the previous optimizer step (0 while the adaptive controller's last entropy is above
        ``entropy_target``); at each optimizer step the window's token-weighted entropy over all
        processes moves it by ``entropy_coef_delta`` within [entropy_coef_min, entropy_coef_max].
        """
        m = (mask if entropy_mask is None else mask * entropy_mask).to(entropies.dtype)
        entropy_mean = (entropies * m).sum() / m.sum().clamp(min=1.0) / accumulation
        coef = self.entropy_coef
        if self.use_adaptive_entropy:
            if self._last_world_entropy > self.args.entropy_target:
                coef = 0.0
            if mode == "train":
                stats = torch.stack([(entropies * m).sum(), m.sum()]).detach()
                window = self._entropy_window_stats
                self._entropy_window_stats = stats if window is None else window + stats
                if self.accelerator.sync_gradients:
                    totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                    world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                    step = self.args.entropy_coef_delta
                    if world_entropy <= self.args.entropy_target:
                        self.entropy_coef = min(self.entropy_coef + step, self.args.entropy_coef_max)
                    else:
                        self.entropy_coef = max(self.entropy_coef - step, self.args.entropy_coef_min)
                    self._last_world_entropy = world_entropy
                    self._entropy_window_stats = None
        return coef * entropy_mean

    @torch.no_grad()
    def _log_rlkern_metrics(self, mode, logps, old_logps, advantages, mask, entropies, ref_logps, loss_metrics=None):
        """The metrics TRL's ``_compute_loss`` logs, with its definitions."""
        m = mask.to(logps.dtype)
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        log_ratio = logps - old_logps
        if self.importance_sampling_level == "sequence":
            log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        else:
            log_w = log_ratio
        w = torch.exp(log_w)

        def masked_seq_mean(x):
            if x.shape[1] == 1:
                return x.squeeze(1)
            return (x * m).sum(-1) / m.sum(-1)

        def global_masked_mean(x):
            if x.shape[1] == 1:
                local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                local_sum, local_count = (x * m).sum(), m.sum().float()
            totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if ref_logps is not None:
            d = ref_logps - logps
            kl = torch.exp(d) - d - 1
            if self.args.use_bias_correction_kl:
                kl = kl * w
            self._metrics[mode]["kl"].append(global_masked_mean(kl))
        self._metrics[mode]["entropy"].append(global_masked_mean(entropies))
        if self.loss_type == "sapo":
            return  # TRL logs no clip fractions for the soft gate
        if self.loss_type == "vespo":
            # TRL averages the [B, 1] sequence weight over every row; the kernel's phi_seq_mean is over
            # the non-empty rows, the same number whenever every completion has a token (a completion
            # always has its end-of-sequence token)
            rows = (m.sum(-1) > 0).sum().to(torch.float32)
            phi_sum = loss_metrics["phi_seq_mean"].to(torch.float32) * rows
            totals = self.accelerator.reduce(torch.stack([phi_sum, rows]), reduction="sum")
            self._metrics[mode]["vespo/phi_seq_mean"].append((totals[0] / totals[1].clamp(min=1.0)).item())
            return
        if self.loss_type == "cispo":
            clipped = (w > self.epsilon_high) & (adv > 0)
            self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped.float()))
            return
        delta = getattr(self.args, "delta", None)
        if delta is not None:
            w = w.clamp(max=delta)  # TRL reports the clip fractions of the capped ratio
        low = (w < 1 - self.epsilon_low) & (adv < 0)
        high = (w > 1 + self.epsilon_high) & (adv > 0)
        self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low.float()))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high.float()))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean((low | high).float()))
        self._metrics[mode]["clip_ratio/low_min"].append(
            nanmin(self.accelerator.gather(masked_seq_mean(low.float()))).item())
        self._metrics[mode]["clip_ratio/high_max"].append(
            nanmax(self.accelerator.gather(masked_seq_mean(high.float()))).item())


# ---------------------------------------------------------------------------------------------
# DPO

# TRL loss_type -> (rlkern.dpo_loss loss_type, whether TRL divides each score by its completion's
# token count first). The other TRL types are not per-pair formulas rlkern has: robust divides
# by 1 - 2 ls and adds (not subtracts) the flipped term, exo_pair, nca_pair, bco_pair, sppo_hard,
# apo_zero, apo_down and discopop have other per-pair formulas, aot and aot_unpaired sort the
# batch, sft is a token mean.
_DPO_LOSS_TYPES = {
    "sigmoid": ("sigmoid", False),
    "hinge": ("hinge", False),
    "ipo": ("ipo", True),
    "sigmoid_norm": ("sigmoid", True),
}


class DPOTrainer(_TRLDPOTrainer):
    """TRL's ``DPOTrainer`` whose sequence log-probabilities and loss run on rlkern kernels.

    Same constructor and behaviour as ``trl.DPOTrainer``. The fused LM head TRL patches onto the
    policy and reference models computes the per-token log-probabilities and entropies with
    :func:`rlkern.linear_token_logprobs` (no ``[tokens, vocab]`` logits kept for backward), and
    for ``loss_type`` sigmoid, hinge, ipo and sigmoid_norm (any mix of them, with
    ``loss_weights``) the loss is :func:`rlkern.dpo_loss` of the summed sequence log-probs
    (divided by the completion's token count for ipo and sigmoid_norm, as TRL does), with the
    metrics TRL logs. Other loss types, ``use_weighting`` (WPO), ``ld_alpha``, an f-divergence
    other than reverse_kl and MoE router losses run on TRL's code; the constructor logs (logger
    ``rlkern.integrations.trl``) which parts run where, and why.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._rlkern_install_heads()
        self._rlkern_runtime_fallbacks = set()
        on_rlkern, on_trl = [], []
        if self._rlkern_policy_head:
            on_rlkern.append("log-probabilities and entropies (rlkern.linear_token_logprobs, fused LM head)")
        else:
            on_trl.append(("log-probabilities and entropies (TRL's fused LM head)", self._rlkern_head_reason))
        reason = self._rlkern_loss_fallback()
        if reason is None:
            on_rlkern.append(f"loss (rlkern.dpo_loss: loss_type={self.loss_types})")
        else:
            on_trl.append((f"loss (loss_type={self.loss_types})", reason))
        lines = ["rlkern DPOTrainer:", *(f"  on rlkern: {p}" for p in on_rlkern),
                 *(f"  on TRL's code: {p}, because {r}" for p, r in on_trl)]
        logger.log(logging.WARNING if on_trl else logging.INFO, "\n".join(lines))

    def _rlkern_install_heads(self):
        if getattr(self, "_rlkern_heads_installed", False):
            return
        self._rlkern_heads_installed = True
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
        self._rlkern_head_reason = _lm_head_unsupported(base)
        if self._rlkern_head_reason is None and self.use_weighting:
            self._rlkern_head_reason = "use_weighting needs log(sum p^2), which rlkern's head does not compute"
        self._rlkern_policy_head = self._rlkern_head_reason is None and add_rlkern_lm_head(base, outputs=outputs)
        if self.ref_model is not None and _lm_head_unsupported(self.ref_model) is None:
            add_rlkern_lm_head(self.ref_model)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL's constructor precomputes the reference log-probs after patching its head: patch rlkern's first
        self._rlkern_install_heads()
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _rlkern_loss_fallback(self) -> Optional[str]:
        """Why the loss of this configuration runs on TRL's code, or None when rlkern computes it."""
        others = [t for t in self.loss_types if t not in _DPO_LOSS_TYPES]
        if others:
            return f"loss_type {others} is not a per-pair formula rlkern.dpo_loss has"
        if self.use_weighting:
            return "use_weighting (WPO) weighs each pair, and rlkern.dpo_loss returns the batch mean"
        if self.ld_alpha is not None:
            return "ld_alpha (length-desensitised log-probs) is TRL's"
        if self.f_divergence_type != "reverse_kl":
            return f"f_divergence_type={self.f_divergence_type!r} is TRL's"
        if self.aux_loss_enabled:
            return "the MoE router auxiliary loss is TRL's"
        return None

    def _compute_loss(self, model, inputs, return_outputs):
        if self._rlkern_loss_fallback() is not None or return_outputs:
            if return_outputs and "return_outputs" not in self._rlkern_runtime_fallbacks:
                self._rlkern_runtime_fallbacks.add("return_outputs")
                logger.warning("rlkern DPOTrainer: return_outputs=True (logits for compute_metrics) runs on TRL's "
                               "code (logged once)")
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        model_kwargs = {k: v for k, v in inputs.items()
                        if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        shift_mask = completion_mask[..., 1:]
        seq_len = shift_mask.size(1)
        # prompt-learning PEFT prepends virtual tokens: keep the positions of the real ones
        per_token_logps = outputs.log_probs[:, -seq_len:]
        chosen_logps, rejected_logps = per_token_logps.sum(1).chunk(2, dim=0)  # the batch is [chosen; rejected]
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_inputs = {k: v for k, v in inputs.items() if k not in ("ref_chosen_logps", "ref_rejected_logps")}
            ref_chosen, ref_rejected = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, ref_inputs)

        tokens_chosen, tokens_rejected = completion_mask.sum(1).clamp(min=1.0).chunk(2, dim=0)
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights):
            kind, per_token = _DPO_LOSS_TYPES[loss_type]
            pair = (chosen_logps, rejected_logps, ref_chosen, ref_rejected)
            if per_token:
                pair = (chosen_logps / tokens_chosen, rejected_logps / tokens_rejected,
                        ref_chosen / tokens_chosen, ref_rejected / tokens_rejected)
            loss = loss + dpo_loss(*pair, beta=self.beta, loss_type=kind).loss * weight

        self._log_rlkern_metrics(mode, inputs, outputs, seq_len, chosen_logps, rejected_logps, ref_chosen, ref_rejected)
        return loss

    @torch.no_grad()
    def _log_rlkern_metrics(self, mode, inputs, outputs, seq_len, chosen_logps, rejected_logps, ref_chosen,
                            ref_rejected):
        """The metrics TRL's ``_compute_loss`` logs, with its definitions."""
        acc = self.accelerator
        mask = inputs["completion_mask"][..., 1:]
        chosen_mask, rejected_mask = mask.chunk(2, dim=0)

        def total(x):  # summed over this process's batch and then over all processes
            return acc.gather_for_metrics(x).sum()

        def ratio(numerator, count):
            numerator, count = total(numerator).item(), total(count).item()
            return numerator / count if count > 0 else 0.0

        self._metrics[mode]["entropy"].append(ratio((outputs.entropy[:, -seq_len:] * mask).sum(), mask.sum()))
        if mode == "train":
            self._total_train_tokens += total(inputs["attention_mask"].sum()).item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        chosen_mean, rejected_mean = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
        self._metrics[mode]["logits/chosen"].append(ratio(chosen_mean[chosen_mask.bool()].sum(), chosen_mask.sum()))
        self._metrics[mode]["logits/rejected"].append(
            ratio(rejected_mean[rejected_mask.bool()].sum(), rejected_mask.sum()))
        chosen_top1 = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)[0] & chosen_mask.bool()
        self._metrics[mode]["mean_token_accuracy"].append(ratio(chosen_top1.sum(), chosen_mask.sum()))
        chosen_rewards = self.beta * (chosen_logps - ref_chosen)
        rejected_rewards = self.beta * (rejected_logps - ref_rejected)
        self._metrics[mode]["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
        self._metrics[mode]["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
        self._metrics[mode]["rewards/accuracies"].append(
            acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
        self._metrics[mode]["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
        self._metrics[mode]["logps/chosen"].append(acc.gather(chosen_logps).mean().item())
        self._metrics[mode]["logps/rejected"].append(acc.gather(rejected_logps).mean().item())


# ---------------------------------------------------------------------------------------------
# Reward model


class RewardTrainer(_TRLRewardTrainer):
    """TRL's ``RewardTrainer`` whose pairwise loss is :func:`rlkern.bradley_terry_loss`.

    Same constructor and behaviour as ``trl.RewardTrainer``: the loss is
    mean(-log sigmoid(r_chosen - r_rejected - margin)) (the dataset's ``margin`` column when it has
    one) plus ``center_rewards_coefficient`` * mean((r_chosen + r_rejected)^2), with the metrics TRL
    logs. The model (a sequence classifier) is unchanged.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        logger.info("rlkern RewardTrainer:\n  on rlkern: loss (rlkern.bradley_terry_loss%s)",
                    ", with the reward-centring term" if self.args.center_rewards_coefficient is not None else "")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs)
        rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        loss = bradley_terry_loss(rewards_chosen, rewards_rejected, margin=inputs.get("margin")).loss
        coef = self.args.center_rewards_coefficient
        if coef is not None:
            loss = loss + coef * torch.mean((rewards_chosen + rewards_rejected) ** 2)

        acc = self.accelerator
        if mode == "train":
            self._total_train_tokens += acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            every = acc.gather(outputs.logits)
            self._metrics[mode]["min_reward"].append(every.min().item())
            self._metrics[mode]["mean_reward"].append(every.mean().item())
            self._metrics[mode]["max_reward"].append(every.max().item())
            # means of each process's batch mean, as TRL
            accuracy = (rewards_chosen > rewards_rejected).float().mean()
            self._metrics[mode]["accuracy"].append(acc.gather_for_metrics(accuracy).mean().item())
            margin = (rewards_chosen - rewards_rejected).mean()
            self._metrics[mode]["margin"].append(acc.gather_for_metrics(margin).mean().item())
        return (loss, outputs) if return_outputs else loss
