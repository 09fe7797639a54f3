"""rlkern.integrations.trl.GRPOTrainer against TRL's own GRPOTrainer, step by step.

Both trainers train the same tiny Llama (built here, with a word-level tokenizer, saved to a
temporary directory and passed by path: no download) for two optimizer steps with the same seed.
With ``num_iterations=2`` the second step re-uses the first step's generations, so the importance
ratio differs from 1 and the clipping and KL terms are exercised. Each step's completions must be
identical, and the losses and gradients must agree within float32 tolerance.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration test needs `trl` (pip install trl)")
pytest.importorskip("datasets", reason="the TRL integration test needs `datasets` (installed with trl)")

from datasets import Dataset  # noqa: E402

import rlkern.integrations.trl as rlk_trl  # noqa: E402

from _trl_fixtures import GradRecorder as _Recorder  # noqa: E402
from _trl_fixtures import tiny_model_dir  # noqa: E402,F401  (the shared tiny model fixture)
from helpers import assert_close  # noqa: E402

# Single-process loops over tiny networks: one torch thread each (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _reward(completions, **kwargs):
    return [float(c.count("w3")) - 0.1 * len(c.split()) for c in completions]


def _run(trainer_cls, model_dir, tmp_path, setup=None, **overrides):
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
    if setup is not None:
        setup(trainer)
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
    ("cispo", "sequence", {"beta": 0.0, "epsilon_high": 0.9}),  # a cap below 1: every weight near 1 is capped
    ("sapo", "token", {"beta": 0.04}),
    ("sapo", "sequence", {"beta": 0.0, "sapo_temperature_pos": 2.0}),
    ("luspo", "sequence", {"beta": 0.04}),
    ("vespo", "token", {"beta": 0.04}),
    # the controller applies 0 at step 1 (no entropy measured yet), then entropy_coef + delta
    ("grpo", "token", {"beta": 0.0, "use_adaptive_entropy": True, "entropy_coef": 0.01, "entropy_target": 10.0}),
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

    if extra.get("use_adaptive_entropy"):
        coefs = [h["entropy_coef"] for h in ref_trainer.state.log_history if "loss" in h]
        assert coefs[0] != coefs[1] and rlk_trainer.entropy_coef == ref_trainer.entropy_coef
    if loss_type == "cispo" and extra["epsilon_high"] < 1:
        second = [h for h in ref_trainer.state.log_history if "loss" in h][1]
        assert 0 < second["cispo_clip_ratio"]
    if loss_type == "grpo" and level == "token" and extra["beta"]:
        # the comparison would be weak if nothing were clipped or the KL term were idle: check it is not
        second = [h for h in ref_trainer.state.log_history if "loss" in h][1]
        assert second["clip_ratio/region_mean"] > 0 and second["kl"] > 0

    # the metrics TRL logs agree too
    ours = [h for h in rlk_trainer.state.log_history if "loss" in h]
    theirs = [h for h in ref_trainer.state.log_history if "loss" in h]
    for mine, ref in zip(ours, theirs):
        for key, value in ref.items():
            if key.startswith(("clip_ratio", "kl", "entropy", "cispo", "policy_loss", "vespo")):
                assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_selection_over_processes_path_matches_trl(tiny_model_dir, tmp_path, monkeypatch):
    """Several processes hand policy_loss the selection (not its own quantile); forced here in one."""
    modes = []
    local = rlk_trl.GRPOTrainer._rlkern_local_selection
    monkeypatch.setattr(rlk_trl.GRPOTrainer, "_rlkern_local_selection", lambda self: modes.append(local(self)))
    options = dict(loss_type="dapo", beta=0.04, top_entropy_quantile=0.3, entropy_coef=0.01)
    ref_trainer, ref_losses, _, ref_grads = _run(trl.GRPOTrainer, tiny_model_dir, tmp_path, **options)
    rlk_trainer, losses, _, grads = _run(rlk_trl.GRPOTrainer, tiny_model_dir, tmp_path, **options)
    assert modes == [True, True]  # one process: the fused selection would have been used
    for step in range(2):
        assert (losses[step] - ref_losses[step]).abs().item() <= 1e-5 * max(ref_losses[step].abs().item(), 1e-2)
        assert_close(grads[step], ref_grads[step], tol=1e-4, name=f"step {step} gradients")


@pytest.mark.parametrize("selected_count", [0, 1, 5, 9])
def test_selection_as_entropy_options_keeps_exactly_the_selection(selected_count):
    gen = torch.Generator().manual_seed(selected_count)
    logp = (-torch.rand(2, 6, generator=gen) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(2, 6, generator=gen)
    ref = logp.detach() + 0.1 * torch.randn(2, 6, generator=gen)
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    selected = torch.zeros(2, 6, dtype=torch.bool)
    selected[mask.bool().nonzero()[torch.randperm(9, generator=gen)[:selected_count]].unbind(-1)] = True
    options, zero = rlk_trl._selection_as_entropy_options(selected, mask)
    out = rlk_trl.policy_loss(logp, old, torch.zeros_like(adv) if zero else adv, mask, clip_low=0.2,
                              ref_logp=ref, kl_coef=0.04, agg="token-mean", **options)
    # TRL's per-token loss: the policy term times the selection, plus the KL on every active token
    r = torch.exp(logp - old)
    pg = -torch.min(r * adv[:, None], torch.clamp(r, 0.8, 1.2) * adv[:, None]) * selected
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    expected = ((pg + 0.04 * kl) * mask).sum() / mask.sum()
    assert zero == (selected_count == 0)
    assert_close(out.loss, expected, tol=1e-5, name="loss")
    (g,) = torch.autograd.grad(out.loss, logp)
    (g_ref,) = torch.autograd.grad(expected, logp)
    assert_close(g, g_ref, tol=1e-5, name="gradient")


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_unsupported_options_fall_back_to_trl(tiny_model_dir, tmp_path, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(rlk_trl, "policy_loss", lambda *a, **k: calls.append(1))
    with caplog.at_level(logging.INFO, logger="rlkern.integrations.trl"):
        _, losses, _, _ = _run(rlk_trl.GRPOTrainer, tiny_model_dir, tmp_path, loss_type="cispo", epsilon_high=0.0,
                               beta=0.04, max_steps=1)
    assert calls == [] and torch.isfinite(losses[0])
    # said once, at start, as a warning: the head is rlkern's, the loss TRL's, and why
    records = [r for r in caplog.records if r.name == "rlkern.integrations.trl"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert "on rlkern: log-probabilities and entropies" in message
    assert ("on TRL's code: policy loss (loss_type='cispo'), because CISPO with epsilon_high=0.0 (a cap <= 0 "
            "on a positive ratio) is left to TRL") in message


def _grpo_args(tmp_path, **overrides):
    from trl import GRPOConfig

    options = dict(output_dir=str(tmp_path / "plan"), per_device_train_batch_size=4, num_generations=4,
                   max_completion_length=6, report_to="none", use_cpu=True, save_strategy="no", bf16=False)
    options.update(overrides)
    return GRPOConfig(**options)


PLANS = [
    # (GRPOConfig options, attributes set after construction, expected level, expected lines)
    ({}, {}, logging.INFO, ["on rlkern: policy loss (rlkern.policy_loss: loss_type='dapo', "
                            "importance_sampling_level='token')"]),
    ({"loss_type": "grpo", "beta": 0.04, "use_bias_correction_kl": True, "off_policy_mask_threshold": 0.5,
      "top_entropy_quantile": 0.2, "use_adaptive_entropy": True}, {}, logging.INFO,
     ["on rlkern: policy loss (rlkern.policy_loss: loss_type='grpo', importance_sampling_level='token', k3 KL "
      "with bias correction, off-policy sequence mask, top_entropy_quantile=0.2)",
      "on rlkern: entropy bonus with adaptive control"]),
    ({"loss_type": "cispo", "epsilon_high": 0.8, "beta": 0.04, "use_bias_correction_kl": True}, {}, logging.INFO,
     ["on rlkern: policy loss (rlkern.policy_loss: loss_type='cispo', importance_sampling_level='token', k3 KL "
      "with bias correction)"]),
    ({"loss_type": "cispo", "epsilon_high": 0.0}, {}, logging.WARNING,
     ["on TRL's code: policy loss (loss_type='cispo'), because CISPO with epsilon_high=0.0 (a cap <= 0"]),
    ({"vllm_importance_sampling_clip_min": 0.5}, {"use_vllm": True}, logging.INFO,
     ["vLLM importance sampling sequence_mask"]),
    # GRPOConfig refuses such a band; set on a built trainer, it stays on TRL's code
    ({}, {"use_vllm": True, "vllm_importance_sampling_clip_min": 4.0}, logging.WARNING,
     ["on TRL's code: policy loss (loss_type='dapo'), because vllm_importance_sampling_clip_min=4.0 exceeds"]),
    ({"vllm_importance_sampling_mode": "sequence_truncate"}, {"use_vllm": True}, logging.INFO,
     ["vLLM importance sampling sequence_truncate"]),
]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("options,attributes,level,lines", PLANS)
def test_start_log_names_what_runs_where(tiny_model_dir, tmp_path, caplog, options, attributes, level, lines):
    with caplog.at_level(logging.INFO, logger="rlkern.integrations.trl"):
        trainer = rlk_trl.GRPOTrainer(model=tiny_model_dir, reward_funcs=_reward,
                                      args=_grpo_args(tmp_path, **options),
                                      train_dataset=Dataset.from_dict({"prompt": ["w1 w2"] * 4}))
    if attributes:  # what a vLLM run sets, which cannot be constructed here: log the plan again
        caplog.clear()
        for name, value in attributes.items():
            setattr(trainer, name, value)
        with caplog.at_level(logging.INFO, logger="rlkern.integrations.trl"):
            trainer._rlkern_log_plan()
    records = [r for r in caplog.records if r.name == "rlkern.integrations.trl"]
    assert len(records) == 1 and records[0].levelno == level
    message = records[0].getMessage()
    for line in lines:
        assert line in message, message


# --- vLLM importance-sampling correction -------------------------------------------------------
#
# vLLM cannot run here, so the trainer is built without it and then told it samples with vLLM:
# generation stays transformers' (TRL's own non-vLLM branch), and the log-probs "the engine"
# reports are made up per token (off the model's by up to +-0.45, one of them unscorable: None,
# as vLLM reports a NaN). TRL's _generate_and_score_completions then computes the importance
# weights and the sampling metrics from them exactly as on a vLLM run, and _compute_loss reads
# old_per_token_logps, sampling_per_token_logps and importance_sampling_ratio from its inputs.


def _sample_with_fake_vllm(trainer, unscorable=True):
    trainer.use_vllm = True
    original = trainer._generate_single_turn
    calls = []

    def generate(prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        trainer.use_vllm = False
        try:
            completion_ids, _ = original(prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs)
        finally:
            trainer.use_vllm = True
        model = trainer.model
        logprobs = []
        for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
            ids = torch.tensor([list(prompt) + list(completion)])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            own = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
            shift = 0.45 * torch.sin(torch.arange(len(completion)) * 1.3 + 0.7 * i + len(calls))
            row = (own - shift).tolist()
            if unscorable and i == 1 and len(row) > 1:
                row[1] = None
            logprobs.append(row)
        calls.append(1)
        return completion_ids, logprobs

    trainer._generate_single_turn = generate


VLLM_CASES = [
    # (vllm_importance_sampling_mode, loss_type, importance_sampling_level, extra options)
    ("token_truncate", "grpo", "token", {"beta": 0.04, "max_steps": 2}),
    ("token_mask", "dapo", "sequence", {"beta": 0.0, "entropy_coef": 0.01}),
    ("sequence_truncate", "cispo", "token", {"beta": 0.04, "epsilon_high": 1.01}),
    ("sequence_mask", "bnpo", "token", {"beta": 0.04, "use_bias_correction_kl": True}),
    ("token_mask", "dr_grpo", "token", {"beta": 0.0, "vllm_importance_sampling_clip_max": None,
                                        "vllm_importance_sampling_clip_min": 0.0}),
]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("is_mode,loss_type,level,extra", VLLM_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in VLLM_CASES])
def test_vllm_importance_sampling_matches_trl(tiny_model_dir, tmp_path, monkeypatch, is_mode, loss_type, level, extra):
    seen = {"policy_loss": [], "is_ratio": []}
    policy = rlk_trl.policy_loss

    def recording_policy_loss(*a, **kw):
        seen["policy_loss"].append(kw)
        return policy(*a, **kw)

    monkeypatch.setattr(rlk_trl, "policy_loss", recording_policy_loss)
    trl_compute = trl.GRPOTrainer._compute_loss

    def recording_trl_compute(self, model, inputs):
        if type(self) is trl.GRPOTrainer:
            m = inputs["completion_mask"].bool()
            ratio = inputs["importance_sampling_ratio"]
            seen["is_ratio"].append(ratio if ratio.shape[1] == 1 else ratio[m])
            assert torch.isnan(inputs["sampling_per_token_logps"][m]).sum() == 1
        return trl_compute(self, model, inputs)

    monkeypatch.setattr(trl.GRPOTrainer, "_compute_loss", recording_trl_compute)
    options = dict(loss_type=loss_type, importance_sampling_level=level, vllm_importance_sampling_mode=is_mode,
                   vllm_importance_sampling_clip_max=1.2, max_steps=1, num_iterations=1)
    options.update(extra)
    steps = options["max_steps"]
    ref_trainer, ref_losses, _, ref_grads = _run(trl.GRPOTrainer, tiny_model_dir, tmp_path,
                                                 setup=_sample_with_fake_vllm, **options)
    rlk_trainer, losses, _, grads = _run(rlk_trl.GRPOTrainer, tiny_model_dir, tmp_path,
                                         setup=_sample_with_fake_vllm, **options)
    assert len(seen["policy_loss"]) == steps, "rlkern's policy_loss must compute every step's loss"
    assert all(kw["tis_mode"] == is_mode.split("_")[1] and kw["tis_level"] == is_mode.split("_")[0]
               for kw in seen["policy_loss"])

    # the weights TRL applied are not all 1: the cap (or the mask) binds on some tokens and not on others
    ratios = torch.cat([r.reshape(-1) for r in seen["is_ratio"]])
    cap = options["vllm_importance_sampling_clip_max"]
    if cap is not None and is_mode.endswith("truncate"):
        assert (ratios == cap).any() and (ratios < cap).any() and (ratios != 1).any()
    elif cap is not None:
        assert (ratios == 0).any() and (ratios > 0).any()
    else:
        assert (ratios > 1.2).any() and (ratios < 1).any()

    for step in range(steps):
        diff = (losses[step] - ref_losses[step]).abs().item()
        assert diff <= 1e-5 * max(ref_losses[step].abs().item(), 1e-2), \
            f"step {step}: loss {losses[step].item()} vs TRL {ref_losses[step].item()}"
        assert_close(grads[step], ref_grads[step], tol=1e-4, name=f"step {step} gradients")
    ours = [h for h in rlk_trainer.state.log_history if "loss" in h]
    theirs = [h for h in ref_trainer.state.log_history if "loss" in h]
    assert len(ours) == len(theirs) == steps
    for mine, ref in zip(ours, theirs):
        assert any(key.startswith("sampling/importance_sampling_ratio") for key in ref)
        for key, value in ref.items():
            if key.startswith(("clip_ratio", "kl", "entropy", "cispo", "policy_loss", "sampling/")):
                assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_high_entropy_mask_in_one_process_and_bad_input():
    import types

    from accelerate import Accelerator

    trl_like = types.SimpleNamespace(accelerator=Accelerator(cpu=True))
    gen = torch.Generator().manual_seed(3)
    entropies = torch.round(torch.rand(4, 7, generator=gen) * 4)  # ties
    mask = (torch.rand(4, 7, generator=gen) > 0.25).long()
    for q in (0.0, 0.3, 0.5, 0.8, 1.0):
        expected = trl.GRPOTrainer.get_high_entropy_mask(trl_like, entropies, mask, q)
        assert torch.equal(rlk_trl.high_entropy_mask(entropies, mask, q), expected), q
    with pytest.raises(ValueError, match="quantile"):
        rlk_trl.high_entropy_mask(entropies, mask, 1.5)
    with pytest.raises(ValueError, match="mask"):
        rlk_trl.high_entropy_mask(entropies, mask[:, :3], 0.5)
    with pytest.raises(TypeError, match="entropies"):
        rlk_trl.high_entropy_mask(mask, mask, 0.5)


# --- The full grid, through _compute_loss ------------------------------------------------------
#
# Every loss type TRL 1.16 has x importance-sampling level x beta x top_entropy_quantile, and the
# four vLLM modes with every loss type and level. Training runs per case would take minutes, so
# one TRL trainer and one rlkern trainer are built once, and each case sets the options TRL reads
# per step on both, then drives _compute_loss on the same prepared micro-batch: completions TRL's
# _generate_and_score_completions produced (for the vLLM modes with the made-up engine
# log-probs of _sample_with_fake_vllm, so the inputs carry sampling_per_token_logps and TRL's
# importance_sampling_ratio), after which both policies move by the same small perturbation, so
# the importance ratios differ from 1 and clip. Each case compares the loss, every metric TRL
# logs, the gradient and its norm.

GRID_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
GRID_LEVELS = ("token", "sequence")
VLLM_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
GRID_PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]


def test_grid_covers_every_trl_loss_type():
    import inspect
    import re

    source = inspect.getsource(trl.GRPOTrainer._compute_loss)
    trl_types = set(re.findall(r'"(\w+)"', " ".join(re.findall(r"self\.loss_type (?:==|in) [^:]+:", source))))
    assert trl_types == set(GRID_LOSS_TYPES), trl_types


def _grid_config(tmp_path, name, **overrides):
    from trl import GRPOConfig

    options = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=8, num_generations=4,
                   gradient_accumulation_steps=2, max_completion_length=6, report_to="none", use_cpu=True,
                   save_strategy="no", seed=0, num_iterations=2, epsilon=0.2, epsilon_high=0.28, beta=0.04,
                   entropy_coef=0.01, bf16=False, disable_tqdm=True, vllm_importance_sampling_clip_max=1.2)
    options.update(overrides)
    return GRPOConfig(**options)


def _micro_batch(trainer, generation_batch, rows):
    """The first micro-batch of a generation batch, as TRL's _prepare_inputs splits it."""
    return {k: (v[:rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 2 * rows else v)
            for k, v in generation_batch.items()}


@pytest.fixture(scope="module")
def grid(tiny_model_dir, tmp_path_factory):
    import warnings

    tmp_path = tmp_path_factory.mktemp("grid")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = Dataset.from_dict({"prompt": GRID_PROMPTS * 4})
        ours = rlk_trl.GRPOTrainer(model=tiny_model_dir, reward_funcs=_reward, args=_grid_config(tmp_path, "rlkern"),
                                   train_dataset=dataset)
        theirs = trl.GRPOTrainer(model=tiny_model_dir, reward_funcs=_reward, args=_grid_config(tmp_path, "trl"),
                                 train_dataset=dataset)
        for trainer in (ours, theirs):
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = 2
        batch = [{"prompt": p} for p in GRID_PROMPTS for _ in range(4)]  # 4 prompts x 4 generations
        torch.manual_seed(1)
        inputs = {None: _micro_batch(theirs, theirs._generate_and_score_completions(batch), 8)}
        _sample_with_fake_vllm(theirs)
        for mode in VLLM_MODES:
            theirs.vllm_importance_sampling_mode = mode
            torch.manual_seed(2)
            inputs[mode] = _micro_batch(theirs, theirs._generate_and_score_completions(batch), 8)
        # the same samples' weights with a lower bound as well (TRL computes them while sampling)
        theirs.vllm_importance_sampling_clip_min = BAND_MIN
        for mode in VLLM_MODES:
            theirs.vllm_importance_sampling_mode = mode
            torch.manual_seed(2)
            inputs[mode, "band"] = _micro_batch(theirs, theirs._generate_and_score_completions(batch), 8)
        theirs.vllm_importance_sampling_clip_min = None
        theirs.use_vllm = False
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():  # the policy moves after sampling; the reference stays
            for p, q in zip(ours.model.parameters(), theirs.model.parameters()):
                assert torch.equal(p, q)
                step = 0.08 * torch.randn(p.shape, generator=gen)
                p.add_(step)
                q.add_(step)
        for micro in inputs.values():
            # mixed signs, one advantage of exactly 0 (the >= 0 / > 0 boundaries of cispo, sapo and vespo)
            micro["advantages"] = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.0, 0.9, -0.3, 0.6])
            assert micro["old_per_token_logps"] is not None and micro["ref_per_token_logps"] is not None
    yield ours, theirs, inputs
    torch.set_num_threads(threads)


def _drive(trainer, inputs, **fields):
    for name, value in fields.items():
        setattr(trainer, name, value)
    trainer._metrics["train"].clear()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, dict(inputs))
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), grad, {k: list(v) for k, v in trainer._metrics["train"].items()}


def _compare_case(grid, monkeypatch, vllm_mode, on_rlkern, band=False, **fields):
    ours, theirs, all_inputs = grid
    inputs = {vllm_mode: all_inputs[(vllm_mode, "band") if band else vllm_mode]}
    calls = []
    policy = rlk_trl.policy_loss
    monkeypatch.setattr(rlk_trl, "policy_loss", lambda *a, **k: calls.append(k) or policy(*a, **k))
    vllm = dict(use_vllm=vllm_mode is not None, vllm_importance_sampling_mode=vllm_mode or "sequence_mask")
    loss_ref, grad_ref, metrics_ref = _drive(theirs, inputs[vllm_mode], **fields, **vllm)
    assert calls == []
    loss, grad, metrics = _drive(ours, inputs[vllm_mode], **fields, **vllm)
    if on_rlkern:
        assert calls, "rlkern's policy_loss must compute the loss"
    else:
        assert calls == [], "this combination must run on TRL's code"
    assert torch.isfinite(loss_ref)
    # float32 rounding on the scale of the terms (the loss is a difference of terms of both signs)
    assert (loss - loss_ref).abs().item() <= 2e-6 * max(1.0, loss_ref.abs().item()), \
        f"loss {loss.item()} vs TRL {loss_ref.item()}"
    assert grad.norm().item() == pytest.approx(grad_ref.norm().item(), rel=1e-5, abs=1e-7)
    assert_close(grad, grad_ref, tol=1e-4, name="gradient")
    assert metrics.keys() == metrics_ref.keys()
    for key, values in metrics_ref.items():
        # policy_loss is the loss (times the 2 accumulation steps): the loss's tolerance
        assert metrics[key] == pytest.approx(values, rel=1e-5, abs=4e-6 if key == "policy_loss" else 1e-7), key
    return calls, metrics_ref


# beta: 0, and 0.04 with TRL's default bias-corrected KL ("kl") and without it ("plainkl")
BETAS = {"beta0": (0.0, True), "kl": (0.04, True), "plainkl": (0.04, False)}
GRID = [(lt, level, beta, q) for lt in GRID_LOSS_TYPES for level in GRID_LEVELS for beta in BETAS for q in (1.0, 0.5)]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("loss_type,level,beta,quantile", GRID,
                         ids=[f"{lt}-{level}-{beta}-q{q}" for lt, level, beta, q in GRID])
def test_grid_matches_trl(grid, monkeypatch, loss_type, level, beta, quantile):
    # CISPO's cap above 1 here (a cap below 1 is tested on its own below): 1.02 binds on some tokens
    epsilon_high = 1.02 if loss_type == "cispo" else 0.28
    coef, correction = BETAS[beta]
    grid[0].args.use_bias_correction_kl = grid[1].args.use_bias_correction_kl = correction
    calls, metrics = _compare_case(grid, monkeypatch, None, True, loss_type=loss_type,
                                   importance_sampling_level=level, beta=coef, top_entropy_quantile=quantile,
                                   epsilon_high=epsilon_high)
    kw = calls[0]
    assert kw["level"] == level and kw["kl_coef"] == coef and kw["kl_is_correction"] == correction
    assert ("entropy_top_fraction" in kw) == (quantile < 1.0)
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo") and level == "token":
        assert 0 < metrics["clip_ratio/region_mean"][0] < 1, "nothing clipped: the case tests less than it says"
    if loss_type == "cispo":
        assert 0 < metrics["cispo_clip_ratio"][0] < 1


VLLM_GRID = [(mode, lt, level) for mode in VLLM_MODES for lt in GRID_LOSS_TYPES for level in GRID_LEVELS]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("mode,loss_type,level", VLLM_GRID, ids=[f"{m}-{lt}-{level}" for m, lt, level in VLLM_GRID])
def test_vllm_grid_matches_trl(grid, monkeypatch, mode, loss_type, level):
    # TRL refuses VESPO with a sequence-level vLLM mode at construction (below); set on a built
    # trainer, rlkern leaves the combination to TRL's code
    invalid = loss_type == "vespo" and mode.startswith("sequence")
    epsilon_high = 1.02 if loss_type == "cispo" else 0.28
    grid[0].args.use_bias_correction_kl = grid[1].args.use_bias_correction_kl = True
    calls, _ = _compare_case(grid, monkeypatch, mode, not invalid, loss_type=loss_type,
                             importance_sampling_level=level, beta=0.04, top_entropy_quantile=1.0,
                             epsilon_high=epsilon_high)
    if not invalid:
        kw = calls[0]
        assert (kw["tis_level"], kw["tis_mode"]) == tuple(mode.split("_")) and kw["tis_cap"] == 1.2
    ratio = grid[2][mode]["importance_sampling_ratio"]
    assert ((ratio == 0) if mode.endswith("mask") else (ratio == 1.2)).any()  # the cap binds on some


BAND_MIN = 0.9
BAND_CASES = [(mode, lt, opm) for mode in VLLM_MODES for lt in ("dapo", "sapo", "vespo") for opm in (None, 0.002)
              if not (lt == "vespo" and mode.startswith("sequence"))]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("mode,loss_type,threshold", BAND_CASES,
                         ids=[f"{m}-{lt}-opm{t}" for m, lt, t in BAND_CASES])
def test_vllm_band_and_off_policy_mask_match_trl(grid, monkeypatch, mode, loss_type, threshold):
    # vllm_importance_sampling_clip_min > 0 (rlkern's tis_min), with and without the off-policy
    # mask, on samples where the engine could not score a token (NaN): TRL's weight counts it as
    # no correction and its mask as no drift, which rlkern reads from two tensors
    grid[0].args.use_bias_correction_kl = grid[1].args.use_bias_correction_kl = True
    sampling = grid[2][mode, "band"]["sampling_per_token_logps"]
    assert torch.isnan(sampling)[grid[2][mode, "band"]["completion_mask"].bool()].any()
    calls, _ = _compare_case(grid, monkeypatch, mode, True, band=True, loss_type=loss_type,
                             importance_sampling_level="token", beta=0.04, top_entropy_quantile=1.0,
                             epsilon_high=0.28, vllm_importance_sampling_clip_min=BAND_MIN,
                             off_policy_mask_threshold=threshold)
    kw = calls[0]
    assert kw["tis_min"] == BAND_MIN and kw["tis_cap"] == 1.2
    assert ("off_policy_logp" in kw) == (threshold is not None)
    ratio = grid[2][mode, "band"]["importance_sampling_ratio"]
    assert ((ratio == 0) if mode.endswith("mask") else (ratio == BAND_MIN)).any()  # the lower bound binds
    for trainer in grid[:2]:
        trainer.vllm_importance_sampling_clip_min, trainer.off_policy_mask_threshold = None, None


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("mode", ["sequence_truncate", "sequence_mask"])
def test_vespo_with_sequence_vllm_mode_raises_as_trl(tiny_model_dir, tmp_path, mode):
    config = dict(loss_type="vespo", use_vllm=True, vllm_importance_sampling_mode=mode)
    dataset = Dataset.from_dict({"prompt": GRID_PROMPTS})
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        for trainer_cls in (trl.GRPOTrainer, rlk_trl.GRPOTrainer):
            with pytest.raises(ValueError, match="VESPO loss requires `vllm_importance_sampling_mode`"):
                trainer_cls(model=tiny_model_dir, reward_funcs=_reward, args=_grid_config(tmp_path, "v", **config),
                            train_dataset=dataset)
    finally:
        # the config reset accelerate's process-wide state and the failed constructor built none: the
        # grid's trainers (built with use_cpu) need it back
        if not AcceleratorState._shared_state:
            Accelerator(cpu=True)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("loss_type", ["vespo", "grpo"])
@pytest.mark.parametrize("selected", ["none", "some"])
def test_selection_over_processes_in_grid_matches_trl(grid, monkeypatch, loss_type, selected):
    """The several-process selection path (policy_loss handed the selection), forced in one process,
    with a process whose tokens are all below the global quantile ("none") and one with some above."""
    def selection(self, entropies, mask, threshold):
        if selected == "none":
            return torch.zeros_like(mask, dtype=torch.bool)
        return (entropies >= entropies[mask.bool()].median()) & mask.bool()

    monkeypatch.setattr(trl.GRPOTrainer, "get_high_entropy_mask", selection)
    monkeypatch.setattr(rlk_trl.GRPOTrainer, "get_high_entropy_mask", selection)
    monkeypatch.setattr(rlk_trl.GRPOTrainer, "_rlkern_local_selection", lambda self: False)
    grid[0].args.use_bias_correction_kl = grid[1].args.use_bias_correction_kl = True
    _compare_case(grid, monkeypatch, None, True, loss_type=loss_type, importance_sampling_level="token", beta=0.04,
                  top_entropy_quantile=0.5, epsilon_high=0.28)


CISPO_CAPS = [(cap, level, beta, mode) for cap in (0.9, 0.97) for level in GRID_LEVELS for beta in BETAS
              for mode in (None, "token_truncate")]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("cap,level,beta,mode", CISPO_CAPS,
                         ids=[f"cap{c}-{level}-{beta}-{m or 'novllm'}" for c, level, beta, m in CISPO_CAPS])
def test_cispo_cap_below_one_matches_trl(grid, monkeypatch, cap, level, beta, mode):
    """CISPO's weight sg(min(w, epsilon_high)) with a cap below 1, where the cap binds on most
    ratios, with the KL (bias-corrected by the uncapped ratio, as TRL) and a vLLM mode."""
    coef, correction = BETAS[beta]
    grid[0].args.use_bias_correction_kl = grid[1].args.use_bias_correction_kl = correction
    calls, metrics = _compare_case(grid, monkeypatch, mode, True, loss_type="cispo", importance_sampling_level=level,
                                   beta=coef, top_entropy_quantile=1.0, epsilon_high=cap)
    assert calls[0]["log_ratio_clamp"] == (None, pytest.approx(math.log(cap)))
    # the second pass, for the KL only, exactly when the KL is weighed by the ratio
    assert len(calls) == (2 if coef and correction else 1)
    assert 0 < metrics["cispo_clip_ratio"][0] < 1


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "vespo"])
@pytest.mark.parametrize("quantile", [1.0, 0.5])
def test_adaptive_entropy_over_accumulation_windows_matches_trl(grid, monkeypatch, loss_type, quantile):
    """Three optimizer steps of two micro-batches each: the coefficient applied in a window is the
    one set at the end of the previous window, from the window's entropy over its tokens."""
    ours, theirs, inputs = grid
    calls = []
    policy = rlk_trl.policy_loss
    monkeypatch.setattr(rlk_trl, "policy_loss", lambda *a, **k: calls.append(k) or policy(*a, **k))
    fields = dict(loss_type=loss_type, importance_sampling_level="token", beta=0.0, top_entropy_quantile=quantile,
                  epsilon_high=0.28, use_vllm=False, use_adaptive_entropy=True, _entropy_bonus_enabled=True,
                  entropy_coef=0.01, _last_world_entropy=float("inf"), _entropy_window_stats=None)
    # another micro-batch: the completions of the vLLM case, without what only a vLLM run's inputs carry
    # (TRL's VESPO folds an importance_sampling_ratio in whenever its inputs have one)
    other = {k: v for k, v in inputs["token_truncate"].items()
             if k not in ("importance_sampling_ratio", "sampling_per_token_logps")}
    micro_batches = [inputs[None], other]
    entropies = {id(ours): [], id(theirs): []}
    try:
        for trainer in (ours, theirs):
            for name, value in fields.items():
                setattr(trainer, name, value)
            # between the two micro-batches' mean entropies: one window raises the coefficient, the next lowers it
            trainer.args.entropy_target = 3.66 if quantile == 1.0 else 3.78
            trainer.args.entropy_coef_delta = 0.004
        for window in range(3):
            for micro, batch in enumerate(micro_batches if window != 1 else micro_batches[::-1]):
                losses = []
                for trainer in (theirs, ours):
                    trainer.accelerator.gradient_state._set_sync_gradients(micro == 1)
                    loss, grad, metrics = _drive(trainer, batch if window != 2 else micro_batches[1])
                    losses.append((loss, grad, metrics))
                    entropies[id(trainer)].append((trainer.entropy_coef, trainer._last_world_entropy))
                (loss_ref, grad_ref, metrics_ref), (loss, grad, metrics) = losses
                assert (loss - loss_ref).abs().item() <= 2e-6 * max(1.0, loss_ref.abs().item()), (window, micro)
                assert_close(grad, grad_ref, tol=1e-4, name=f"window {window} micro-batch {micro} gradient")
                assert metrics.keys() == metrics_ref.keys()
                for key, values in metrics_ref.items():
                    assert metrics[key] == pytest.approx(values, rel=1e-5, abs=4e-6), key
    finally:
        for trainer in (ours, theirs):
            trainer.accelerator.gradient_state._set_sync_gradients(True)
            trainer.use_adaptive_entropy = False
    assert len(calls) == 6
    ours_trace, theirs_trace = entropies[id(ours)], entropies[id(theirs)]
    assert [c for c, _ in ours_trace] == pytest.approx([c for c, _ in theirs_trace], rel=1e-6)
    assert [e for _, e in ours_trace] == pytest.approx([e for _, e in theirs_trace], rel=1e-6)
    coefs = [c for c, _ in theirs_trace[1::2]]
    assert len(set(coefs)) == 3, f"the controller must move the coefficient both ways: {coefs}"
