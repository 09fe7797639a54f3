"""rlkern.integrations.trl.GRPOTrainer against TRL's own GRPOTrainer, step by step.

Both trainers train the same tiny Llama (built here, with a word-level tokenizer, saved to a
temporary directory and passed by path: no download) for two optimizer steps with the same seed.
With ``num_iterations=2`` the second step re-uses the first step's generations, so the importance
ratio differs from 1 and the clipping and KL terms are exercised. Each step's completions must be
identical, and the losses and gradients must agree within float32 tolerance.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration test needs `trl` (pip install trl)")
pytest.importorskip("datasets", reason="the TRL integration test needs `datasets` (installed with trl)")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402

import rlkern.integrations.trl as rlk_trl  # noqa: E402

from helpers import assert_close  # noqa: E402

# Single-process loops over tiny networks: one torch thread each (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("torch_one_thread")

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


def _reward(completions, **kwargs):
    return [float(c.count("w3")) - 0.1 * len(c.split()) for c in completions]


class _Recorder(TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(torch.cat([p.grad.detach().reshape(-1).clone() for p in model.parameters()
                                     if p.grad is not None]))


def _run(trainer_cls, model_dir, tmp_path, **overrides):
    from trl import GRPOConfig

    options = dict(output_dir=str(tmp_path / trainer_cls.__module__), per_device_train_batch_size=4,
                   num_generations=4, max_completion_length=6, max_steps=2, learning_rate=0.1, optim="sgd",
                   report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", seed=0,
                   num_iterations=2, epsilon=0.02, disable_tqdm=True, bf16=False)
    options.update(overrides)
    args = GRPOConfig(**options)
    dataset = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"] * 4})
    recorder = _Recorder()
    trainer = trainer_cls(model=model_dir, reward_funcs=_reward, args=args, train_dataset=dataset,
                          callbacks=[recorder])
    losses, completions = [], []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *a, **kw):
        loss = compute_loss(model, inputs, *a, **kw)
        losses.append(loss.detach().clone())
        completions.append(inputs["completion_ids"].clone())
        return loss

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    return trainer, losses, completions, recorder.grads


CASES = [
    # (loss_type, importance_sampling_level, extra GRPOConfig options)
    *[(lt, level, {"beta": 0.04}) for lt in ("grpo", "bnpo", "dr_grpo", "dapo") for level in ("token", "sequence")],
    ("cispo", "token", {"beta": 0.04, "epsilon_high": 1.01}),
    ("cispo", "sequence", {"beta": 0.04, "epsilon_high": 1.01}),
    ("dapo", "token", {"beta": 0.0, "epsilon_high": 0.03, "entropy_coef": 0.01}),
    ("grpo", "sequence", {"beta": 0.04, "use_bias_correction_kl": True}),
    ("bnpo", "token", {"beta": 0.04, "use_bias_correction_kl": True, "temperature": 0.7}),
    ("grpo", "token", {"beta": 0.04, "delta": 1.01}),  # below 1 + epsilon_high, so it binds
    ("dapo", "token", {"beta": 0.0, "off_policy_mask_threshold": 0.002}),
    ("grpo", "token", {"beta": 0.04, "top_entropy_quantile": 0.5, "entropy_coef": 0.01}),
]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("loss_type,level,extra", CASES,
                         ids=[f"{c[0]}-{c[1]}-" + "-".join(f"{k}{v}" for k, v in c[2].items()) for c in CASES])
def test_rlkern_trainer_matches_trl(tiny_model_dir, tmp_path, monkeypatch, loss_type, level, extra):
    calls = {"logprobs": 0, "policy_loss": 0}

    def counting(name, fn):
        def wrapper(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(rlk_trl, "linear_token_logprobs", counting("logprobs", rlk_trl.linear_token_logprobs))
    monkeypatch.setattr(rlk_trl, "policy_loss", counting("policy_loss", rlk_trl.policy_loss))

    options = dict(loss_type=loss_type, importance_sampling_level=level, **extra)
    ref_trainer, ref_losses, ref_completions, ref_grads = _run(trl.GRPOTrainer, tiny_model_dir, tmp_path, **options)
    assert calls == {"logprobs": 0, "policy_loss": 0}
    rlk_trainer, losses, completions, grads = _run(rlk_trl.GRPOTrainer, tiny_model_dir, tmp_path, **options)
    assert rlk_trainer._rlkern_policy_head
    assert calls["policy_loss"] == 2, "rlkern's policy_loss must compute every step's loss"
    assert calls["logprobs"] >= 2, "rlkern's linear_token_logprobs must compute the log-probabilities"

    assert len(losses) == len(ref_losses) == 2 and len(grads) == len(ref_grads) == 2
    for step in range(2):
        assert torch.equal(completions[step], ref_completions[step]), f"step {step}: generations diverged"
        diff = (losses[step] - ref_losses[step]).abs().item()
        assert diff <= 1e-5 * max(ref_losses[step].abs().item(), 1e-2), \
            f"step {step}: loss {losses[step].item()} vs TRL {ref_losses[step].item()}"
        assert_close(grads[step], ref_grads[step], tol=1e-4, name=f"step {step} gradients")

    if loss_type == "grpo" and level == "token":
        # the comparison would be weak if nothing were clipped or the KL term were idle: check it is not
        second = [h for h in ref_trainer.state.log_history if "loss" in h][1]
        assert second["clip_ratio/region_mean"] > 0 and second["kl"] > 0

    # the metrics TRL logs agree too
    ours = [h for h in rlk_trainer.state.log_history if "loss" in h]
    theirs = [h for h in ref_trainer.state.log_history if "loss" in h]
    for mine, ref in zip(ours, theirs):
        for key, value in ref.items():
            if key.startswith(("clip_ratio", "kl", "entropy", "cispo", "policy_loss")):
                assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_unsupported_options_fall_back_to_trl(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(rlk_trl, "policy_loss", lambda *a, **k: calls.append(1))
    _, losses, _, _ = _run(rlk_trl.GRPOTrainer, tiny_model_dir, tmp_path, loss_type="sapo", max_steps=1)
    assert calls == [] and torch.isfinite(losses[0])
