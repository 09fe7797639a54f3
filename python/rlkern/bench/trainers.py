"""One training step of each TRL trainer rlkern.integrations.trl replaces, rlkern against TRL.

At hidden size 512 and the vocabularies of Llama 2 (32000) and Qwen 2 (151936), where the LM head
dominates a small model's step:

- ``grpo_train_step``: what ``rlkern.integrations.trl.GRPOTrainer`` runs for loss_type "grpo"
  against TRL's fused head and its loss in PyTorch (the step of ``rlkern.bench.e2e``, at these sizes;
  the ``eager`` row materializes the logits).
- ``dpo_train_step``: the policy forward over [chosen; rejected], the reference forward without
  gradient, the sigmoid DPO loss and the backward. ``rlkern``: ``add_rlkern_lm_head`` (the head
  ``rlkern.integrations.trl.DPOTrainer`` installs, with the metrics outputs DPO asks for) and
  :func:`rlkern.dpo_loss`; ``trl``: TRL's fused head (``add_fused_lm_head``) and its loss.

The reward trainer is left out: its model is a sequence classifier (no LM head), and rlkern
replaces only its [B] pairwise loss, which no step time would show. Needs ``trl``.
"""

from __future__ import annotations

import copy
from typing import List

import torch
import torch.nn.functional as F

from .core import Case

SUITE = "trainers"
BETA = 0.1
DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def _llama(vocab: int, hidden: int, layers: int, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config).to(device)


def _pairs(B: int, prompt: int, completion: int, vocab: int, device: torch.device):
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(2, vocab, (2 * B, prompt + completion), generator=g)
    lengths = torch.randint(completion // 2, completion + 1, (2 * B,), generator=g)
    completion_mask = torch.cat([torch.zeros(2 * B, prompt, dtype=torch.long),
                                 (torch.arange(completion)[None] < lengths[:, None]).long()], 1)
    attention_mask = torch.cat([torch.ones(2 * B, prompt, dtype=torch.long), completion_mask[:, prompt:]], 1)
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def _dpo_make(B, prompt, completion, vocab, hidden, layers):
    def make(device: torch.device):
        from trl.trainer.utils import add_fused_lm_head

        from ..integrations.trl import add_rlkern_lm_head
        from ..losses import dpo_loss

        input_ids, attention_mask, labels = _pairs(B, prompt, completion, vocab, device)
        base = _llama(vocab, hidden, layers, device)
        models = {}
        for name in ("rlkern", "trl"):
            policy, ref = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
            add_fused_lm_head(policy, outputs=DPO_OUTPUTS)
            add_fused_lm_head(ref)
            if name == "rlkern":
                assert add_rlkern_lm_head(policy, outputs=DPO_OUTPUTS) and add_rlkern_lm_head(ref)
            models[name] = (policy, ref)
        del base

        def sequence_logps(model):
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
            return out.log_probs.sum(1).chunk(2)

        def step(name):
            policy, ref = models[name]

            def run():
                policy.zero_grad(set_to_none=True)
                chosen, rejected = sequence_logps(policy)
                with torch.no_grad():
                    ref_chosen, ref_rejected = sequence_logps(ref)
                if name == "rlkern":
                    loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=BETA).loss
                else:
                    loss = -F.logsigmoid(BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
                loss.backward()
                return loss.detach()

            return run

        return {"rlkern": step("rlkern"), "trl": step("trl")}

    return make


def _estimates(tokens: int, vocab: int, hidden: int, eager: bool):
    head = vocab * hidden * 4 / 2**20  # MB of one float32 copy of the LM head
    chunked = 8 * head + 1024  # the models' heads and their gradients, the backbone, chunk buffers
    estimate = {"rlkern": chunked, "trl": chunked}
    if eager:  # logits, log-softmax, its exp (entropy) and the logits' gradient, float32
        estimate["eager"] = chunked + 4 * tokens * vocab * 4 / 2**20
    return estimate


def cases(device: torch.device, quick: bool) -> List[Case]:
    try:
        import transformers  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return []
    from .e2e import _make as grpo_make

    if quick:
        sizes, (B, prompt, completion, layers), hidden = (1000,), (2, 8, 16, 1), 64
    else:
        sizes, hidden = (32000, 151936), 512
        # On a CPU one step at the GPU shapes takes minutes, and even B=2 with 128-token
        # completions cost TRL's DPO 65 s a step at V=151936 on a busy 2-core machine (the
        # suite took 17 minutes): the CPU run keeps the vocabularies and the hidden size,
        # with fewer and shorter sequences.
        B, prompt, completion, layers = (2, 16, 64, 1) if device.type == "cpu" else (16, 128, 1024, 4)
    out = []
    for vocab in sizes:
        shape = f"prompt={prompt} completion={completion} H={hidden} L={layers} V={vocab}"
        out.append(Case(SUITE, "grpo_train_step", f"B={B} " + shape, grpo_make(B, prompt, completion, vocab, hidden, layers),
                        items=float(B * completion), unit="tokens/s", warmup=1, min_repeats=3,
                        peak_mb_estimate=_estimates(B * completion, vocab, hidden, eager=True),
                        note="forward + log-probs + GRPO loss (k3 KL) + backward of a Llama"))
        out.append(Case(SUITE, "dpo_train_step", f"pairs={B} " + shape,
                        _dpo_make(B, prompt, completion, vocab, hidden, layers),
                        items=float(2 * B * completion), unit="tokens/s", warmup=1, min_repeats=3,
                        peak_mb_estimate=_estimates(2 * B * completion, vocab, hidden, eager=False),
                        note="policy + reference forward over chosen and rejected, sigmoid DPO loss, backward"))
    return out
