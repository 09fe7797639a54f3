"""What the TRL integration tests share: the tiny local Llama, its word-level tokenizer, a gradient recorder.

Import it after ``pytest.importorskip("trl")``: it imports transformers and tokenizers. The model
is built here from a fixed seed and saved to a temporary directory (no hub access); the test
modules re-export the ``tiny_model_dir`` fixture by importing it.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

VOCAB = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


class GradRecorder(TrainerCallback):
    """Every optimizer step's flattened gradient, taken just before the step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(torch.cat([p.grad.detach().reshape(-1).clone() for p in model.parameters()
                                     if p.grad is not None]))
