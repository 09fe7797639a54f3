"""rlkern.integrations.trl.RewardTrainer against TRL's own RewardTrainer, step by step.

Both trainers train the same tiny Llama sequence classifier (its score head drawn once and saved
to a temporary directory with the word-level tokenizer: no download) for two SGD steps from the
same seed, with and without the dataset's margin column and TRL's center_rewards_coefficient.
Losses, gradients and every metric TRL logs must agree within float32 rounding.
"""

from __future__ import annotations

import logging

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration test needs `trl` (pip install trl)")
pytest.importorskip("datasets", reason="the TRL integration test needs `datasets` (installed with trl)")

from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, LlamaForSequenceClassification  # noqa: E402

import rlkern.integrations.trl as rlk_trl  # noqa: E402

from helpers import assert_close  # noqa: E402
from _trl_fixtures import GradRecorder as _Recorder  # noqa: E402
from _trl_fixtures import tiny_model_dir  # noqa: E402,F401  (the shared tiny model fixture)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DATA = {
    "chosen": ["w1 w2 w3", "w3 w3", "w4 w5 w3", "w10", "w11 w3", "w3", "w14 w15 w16", "w17 w3"],
    "rejected": ["w32", "w33 w34", "w35 w36 w37", "w38 w3", "w39 w1", "w5", "w6 w7 w8", "w8 w9 w10"],
    "margin": [0.5, 0.0, 1.0, 0.25, 0.0, 2.0, 0.75, 0.1],
}


@pytest.fixture(scope="module")
def tiny_reward_dir(tiny_model_dir, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("tiny_reward")
    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    with torch.no_grad():  # a score head large enough that the rewards differ visibly between pairs
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


def _run(trainer_cls, model_dir, tmp_path, with_margin, **overrides):
    from trl import RewardConfig

    options = dict(output_dir=str(tmp_path / trainer_cls.__module__), per_device_train_batch_size=4, max_steps=2,
                   learning_rate=0.1, optim="sgd", report_to="none", use_cpu=True, logging_steps=1,
                   save_strategy="no", seed=0, disable_tqdm=True, bf16=False)
    options.update(overrides)
    data = dict(DATA) if with_margin else {k: v for k, v in DATA.items() if k != "margin"}
    recorder = _Recorder()
    trainer = trainer_cls(model=model_dir, args=RewardConfig(**options), train_dataset=Dataset.from_dict(data),
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


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("with_margin,center", [(False, None), (True, 0.01)], ids=["plain", "margin-centred"])
def test_rlkern_reward_trainer_matches_trl(tiny_reward_dir, tmp_path, monkeypatch, caplog, with_margin, center):
    seen = []
    bt = rlk_trl.bradley_terry_loss

    def recording(*a, **kw):
        seen.append(kw.get("margin"))
        return bt(*a, **kw)

    monkeypatch.setattr(rlk_trl, "bradley_terry_loss", recording)
    ref_trainer, ref_losses, ref_grads = _run(trl.RewardTrainer, tiny_reward_dir, tmp_path, with_margin,
                                              center_rewards_coefficient=center)
    assert seen == []
    with caplog.at_level(logging.INFO, logger="rlkern.integrations.trl"):
        trainer, losses, grads = _run(rlk_trl.RewardTrainer, tiny_reward_dir, tmp_path, with_margin,
                                      center_rewards_coefficient=center)
    assert len(seen) == 2 and all((m is not None) == with_margin for m in seen)
    assert "on rlkern: loss (rlkern.bradley_terry_loss" in caplog.text

    for step in range(2):
        diff = (losses[step] - ref_losses[step]).abs().item()
        assert diff <= 1e-5 * max(ref_losses[step].abs().item(), 1e-2), \
            f"step {step}: loss {losses[step].item()} vs TRL {ref_losses[step].item()}"
        assert_close(grads[step], ref_grads[step], tol=1e-4, name=f"step {step} gradients")
    ours = [h for h in trainer.state.log_history if "loss" in h]
    theirs = [h for h in ref_trainer.state.log_history if "loss" in h]
    assert len(ours) == len(theirs) == 2 and theirs[0]["margin"] != 0 and theirs[0]["accuracy"] != theirs[1]["accuracy"]
    for mine, ref in zip(ours, theirs):
        assert set(mine) == set(ref)
        for key, value in ref.items():
            if key not in ("grad_norm", "learning_rate", "epoch", "step"):
                assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
