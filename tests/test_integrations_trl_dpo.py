"""rlkern.integrations.trl.DPOTrainer against TRL's own DPOTrainer, step by step.

Both trainers train the same tiny Llama (tests/test_integrations_trl.py builds it, with a
word-level tokenizer, in a temporary directory: no download) for two SGD steps from the same seed;
at step 1 the policy equals the reference, at step 2 it has moved, so the implicit rewards and
margins are not 0. Losses, gradients and every metric TRL logs must agree within float32
rounding.
"""

from __future__ import annotations

import logging

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration test needs `trl` (pip install trl)")
pytest.importorskip("datasets", reason="the TRL integration test needs `datasets` (installed with trl)")

from datasets import Dataset  # noqa: E402

import rlkern.integrations.trl as rlk_trl  # noqa: E402

from helpers import assert_close  # noqa: E402
from _trl_fixtures import GradRecorder as _Recorder  # noqa: E402
from _trl_fixtures import tiny_model_dir  # noqa: E402,F401  (the shared tiny model fixture)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DATA = {
    "prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10", "w11 w12", "w13", "w14 w15 w16", "w17"],
    "chosen": ["w3 w3", "w20 w21 w22", "w3", "w23 w24", "w3 w25", "w26 w27 w28 w29", "w30", "w3 w31"],
    "rejected": ["w32", "w33 w34", "w35 w36 w37", "w38", "w39 w1 w2 w3", "w5", "w6 w7", "w8 w9 w10"],
}


def _run(trainer_cls, model_dir, tmp_path, **overrides):
    from trl import DPOConfig

    options = dict(output_dir=str(tmp_path / trainer_cls.__module__), per_device_train_batch_size=4, max_steps=2,
                   learning_rate=0.1, optim="sgd", report_to="none", use_cpu=True, logging_steps=1,
                   save_strategy="no", seed=0, disable_tqdm=True, bf16=False, beta=0.1)
    options.update(overrides)
    recorder = _Recorder()
    trainer = trainer_cls(model=model_dir, args=DPOConfig(**options), train_dataset=Dataset.from_dict(DATA),
                          callbacks=[recorder])
    losses = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *a, **kw):
        loss = compute_loss(model, inputs, *a, **kw)
        losses.append(loss.detach().clone())
        return loss

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    return trainer, losses, recorder.grads


CASES = [
    {"loss_type": ["sigmoid"]},
    {"loss_type": ["hinge"]},
    {"loss_type": ["ipo"]},
    {"loss_type": ["sigmoid_norm"], "precompute_ref_log_probs": True},
    {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.5]},
]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("options", CASES, ids=["-".join(c["loss_type"]) + ("-precomputed" if len(c) > 1 and
                                                 "precompute_ref_log_probs" in c else "") for c in CASES])
def test_rlkern_dpo_trainer_matches_trl(tiny_model_dir, tmp_path, monkeypatch, options):
    calls = {"logprobs": 0, "dpo_loss": 0}

    def counting(name, fn):
        def wrapper(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(rlk_trl, "linear_token_logprobs", counting("logprobs", rlk_trl.linear_token_logprobs))
    monkeypatch.setattr(rlk_trl, "dpo_loss", counting("dpo_loss", rlk_trl.dpo_loss))
    ref_trainer, ref_losses, ref_grads = _run(trl.DPOTrainer, tiny_model_dir, tmp_path, **options)
    assert calls == {"logprobs": 0, "dpo_loss": 0}
    trainer, losses, grads = _run(rlk_trl.DPOTrainer, tiny_model_dir, tmp_path, **options)
    assert trainer._rlkern_policy_head
    assert calls["dpo_loss"] == 2 * len(options["loss_type"]), "rlkern's dpo_loss must compute every loss"
    # policy and reference, chosen and rejected in one batch, each step (the reference once, before, if precomputed)
    assert calls["logprobs"] >= 3

    assert len(losses) == len(ref_losses) == 2 and len(grads) == len(ref_grads) == 2
    for step in range(2):
        diff = (losses[step] - ref_losses[step]).abs().item()
        assert diff <= 1e-5 * max(ref_losses[step].abs().item(), 1e-2), \
            f"step {step}: loss {losses[step].item()} vs TRL {ref_losses[step].item()}"
        assert_close(grads[step], ref_grads[step], tol=1e-4, name=f"step {step} gradients")
    ours = [h for h in trainer.state.log_history if "loss" in h]
    theirs = [h for h in ref_trainer.state.log_history if "loss" in h]
    assert len(ours) == len(theirs) == 2
    assert theirs[1]["rewards/margins"] != 0 and theirs[1]["rewards/chosen"] != 0  # the policy has moved
    for mine, ref in zip(ours, theirs):
        assert set(mine) == set(ref)
        for key, value in ref.items():
            if key not in ("grad_norm", "learning_rate", "epoch", "step"):
                assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_dpo_fallback_is_logged_and_runs_trl(tiny_model_dir, tmp_path, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(rlk_trl, "dpo_loss", lambda *a, **k: calls.append(1))
    with caplog.at_level(logging.INFO, logger="rlkern.integrations.trl"):
        _, losses, _ = _run(rlk_trl.DPOTrainer, tiny_model_dir, tmp_path, loss_type=["sigmoid", "robust"],
                            label_smoothing=0.1, max_steps=1)
    assert calls == [] and torch.isfinite(losses[0])
    records = [r for r in caplog.records if r.name == "rlkern.integrations.trl"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "on rlkern: log-probabilities and entropies" in message
    assert "because loss_type ['robust'] is not a per-pair formula rlkern.dpo_loss has" in message


def test_rlkern_head_outputs_match_trl_head(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    theirs = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add_fused_lm_head(theirs, outputs=outputs)
    add_fused_lm_head(ours, outputs=outputs)
    assert rlk_trl.add_rlkern_lm_head(ours, outputs=outputs)
    assert not rlk_trl.add_rlkern_lm_head(ours, outputs=outputs + ("log_sum_sq_probs",))
    torch.manual_seed(1)
    input_ids = torch.randint(3, 43, (3, 9))
    with torch.no_grad():
        argmax = theirs(input_ids=input_ids).logits.argmax(-1)
    # half of the next tokens are the model's own top-1, so is_top1 is neither all False nor all True
    input_ids[:, 1:] = torch.where(torch.arange(8) % 2 == 0, argmax[:, :-1], input_ids[:, 1:])
    labels = input_ids.clone()
    labels[0, :4] = -100
    a = theirs(input_ids=input_ids, labels=labels, fused_lm_head=True)
    b = ours(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert a.is_top1.any() and not a.is_top1[a.label_mask].all()
    assert torch.equal(a.is_top1, b.is_top1) and torch.equal(a.label_mask, b.label_mask)
    for name in ("log_probs", "entropy", "mean_logits"):
        assert_close(getattr(b, name), getattr(a, name), tol=1e-5, name=name)
    assert not b.mean_logits.requires_grad and b.log_probs.requires_grad
