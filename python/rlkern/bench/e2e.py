"""End-to-end benchmark: one GRPO training step of a tiny Llama with a 32k vocabulary.

One step = the backbone forward over prompt + completion, the completion tokens' log-probabilities
(and entropies), TRL's GRPO loss (loss_type "grpo", token-level ratio, k3 KL with beta 0.04), and
the backward pass through the whole model. Implementations:

- ``rlkern``: the backbone's hidden states of the completion tokens -> :func:`rlkern.linear_token_logprobs`
  (no ``[tokens, vocab]`` logits kept) -> :func:`rlkern.policy_loss`: what
  ``rlkern.integrations.trl.GRPOTrainer`` runs.
- ``trl``: TRL's code path: its fused LM head (``add_fused_lm_head``, chunked log-probs) and the
  loss of ``GRPOTrainer._compute_loss`` written out in PyTorch, as TRL does (needs ``trl``).
- ``eager``: the full logits, ``log_softmax`` and gather, then the same loss (TRL before its fused
  head, verl without fused kernels).

The model is a ``transformers`` Llama; without ``transformers`` it is a plain-PyTorch causal
transformer of the same size (and the ``trl`` row is left out).
"""

from __future__ import annotations

import copy
from typing import Dict, List

import torch
import torch.nn as nn

from .core import Case

SUITE = "e2e"
BETA = 0.04
EPS = 0.2


class _TorchLM(nn.Module):
    """A small causal transformer for machines without ``transformers`` (same interface as the Llama here)."""

    def __init__(self, vocab: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        layer = nn.TransformerEncoderLayer(hidden, 4, 2 * hidden, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def hidden_states(self, input_ids, attention_mask):
        T = input_ids.shape[1]
        causal = torch.triu(torch.full((T, T), float("-inf"), device=input_ids.device), diagonal=1)
        return self.norm(self.blocks(self.embed(input_ids), mask=causal, is_causal=True))

    def logits(self, input_ids, attention_mask):
        return self.lm_head(self.hidden_states(input_ids, attention_mask))


class _Llama(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0,
                             eos_token_id=1, bos_token_id=None)
        self.hf = LlamaForCausalLM(config)
        self.lm_head = self.hf.lm_head

    def hidden_states(self, input_ids, attention_mask):
        return self.hf.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def logits(self, input_ids, attention_mask):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _model(vocab: int, hidden: int, layers: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    try:
        import transformers  # noqa: F401
    except ImportError:
        return _TorchLM(vocab, hidden, layers).to(device)
    return _Llama(vocab, hidden, layers).to(device)


def _batch(B: int, prompt: int, completion: int, vocab: int, device: torch.device) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, vocab, (B, prompt + completion), generator=g)
    lengths = torch.randint(completion // 2, completion + 1, (B,), generator=g)
    completion_mask = (torch.arange(completion)[None] < lengths[:, None]).long()
    attention_mask = torch.cat([torch.ones(B, prompt, dtype=torch.long), completion_mask], 1)
    old = -torch.rand(B, completion, generator=g) * 5 - 5
    return {
        "input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
        "completion_mask": completion_mask.to(device), "advantages": torch.randn(B, generator=g).to(device),
        "old_logp": old.to(device), "ref_logp": (old + 0.05 * torch.randn(B, completion, generator=g)).to(device),
    }


def _trl_loss(per_token_logps, batch):
    """GRPOTrainer._compute_loss (trl 1.16, loss_type="grpo", token level, beta != 0) in PyTorch."""
    mask = batch["completion_mask"]
    adv = batch["advantages"].unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - batch["old_logp"])
    coef_2 = torch.clamp(coef_1, 1 - EPS, 1 + EPS)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    d = batch["ref_logp"] - per_token_logps
    per_token_loss = per_token_loss + BETA * (torch.exp(d) - d - 1)
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _labels(batch, completion):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :-completion] = -100
    return labels


def _make(B, prompt, completion, vocab, hidden, layers):
    def make(device: torch.device):
        from ..logprobs import linear_token_logprobs
        from ..losses import policy_loss

        model = _model(vocab, hidden, layers, device)
        batch = _batch(B, prompt, completion, vocab, device)
        labels = _labels(batch, completion)

        def rlkern_step():
            model.zero_grad(set_to_none=True)
            hidden_states = model.hidden_states(batch["input_ids"], batch["attention_mask"])[:, -completion - 1:-1]
            mask = batch["completion_mask"].bool()
            targets = batch["input_ids"][:, -completion:]
            logp, entropy = linear_token_logprobs(hidden_states[mask], model.lm_head.weight, targets[mask],
                                                  return_entropy=True)
            per_token = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
            out = policy_loss(per_token, batch["old_logp"], batch["advantages"], mask, clip_low=EPS,
                              ref_logp=batch["ref_logp"], kl_coef=BETA, kl_kind="k3", agg="seq-mean-token-mean")
            out.loss.backward()
            return out.loss.detach()

        def eager_step():
            model.zero_grad(set_to_none=True)
            logits = model.logits(batch["input_ids"], batch["attention_mask"])[:, -completion - 1:-1]
            logp_all = torch.log_softmax(logits.float(), -1)
            per_token = logp_all.gather(-1, batch["input_ids"][:, -completion:, None]).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # TRL and verl compute it for logging
            loss = _trl_loss(per_token, batch)
            loss.backward()
            del entropy
            return loss.detach()

        impls = {"rlkern": rlkern_step}
        try:
            from trl.trainer.utils import add_fused_lm_head

            if not isinstance(model, _Llama):
                raise ImportError("TRL's fused head patches a transformers model")
            trl_model = copy.deepcopy(model.hf)
            add_fused_lm_head(trl_model, outputs=("log_probs", "entropy"))

            def trl_step():
                trl_model.zero_grad(set_to_none=True)
                out = trl_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                labels=labels, fused_lm_head=True)
                loss = _trl_loss(out.log_probs[:, -completion:], batch)
                loss.backward()
                return loss.detach()

            impls["trl"] = trl_step
        except ImportError:
            pass
        impls["eager"] = eager_step
        return impls

    return make


def cases(device: torch.device, quick: bool) -> List[Case]:
    vocab = 32000
    if quick:
        B, prompt, completion, hidden, layers = 2, 8, 32, 64, 1
    else:
        B, prompt, completion, hidden, layers = (8, 64, 256, 256, 2) if device.type == "cpu" else (16, 128, 1024, 512, 4)
    shape = f"B={B} prompt={prompt} completion={completion} H={hidden} L={layers} V={vocab}"
    return [Case(SUITE, "grpo_train_step", shape, _make(B, prompt, completion, vocab, hidden, layers),
                 items=float(B * completion), unit="tokens/s",
                 note="forward + log-probs + GRPO loss (k3 KL) + backward of a tiny Llama")]
