"""The policy objectives beyond PPO/CISPO/REINFORCE: sapo, geo_mean (GMPO), vespo, dppo_tv, dppo_kl.

Each is checked three ways: both CPU backends (C++ and Triton under the interpreter) against the
float64 reference in float64/float32/bfloat16 with holes, empty rows and NaN at masked positions;
the reference against finite differences where the objective is differentiable through the ratio;
and the fused op against the peers' OWN code (verl 0.9.1's ``compute_policy_loss_<name>`` and TRL
1.16's ``GRPOTrainer._compute_loss``), not against a restatement of their formulas.
"""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from rlkern import losses
from rlkern.reference import losses as ref

from helpers import CPU_BACKENDS, assert_close, run_with_baseline_isa
from test_losses import build, check_against_reference, make_batch, reference_of, run

OBJ_CASES = {
    "sapo": ((), dict(objective="sapo")),
    "sapo_temperatures": ((), dict(objective="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=3.0,
                                   agg="seq-mean-token-mean")),
    "sapo_sequence": ((), dict(objective="sapo", level="sequence", log_ratio_clamp=(None, 0.1))),
    "sapo_everything": (("ref", "rollout", "entropy", "weights"),
                        dict(objective="sapo", log_ratio_clamp=20.0, kl_coef=0.05, kl_is_correction=True,
                             tis_cap=1.2, off_policy_threshold=0.01, entropy_coef=0.02, entropy_top_fraction=0.6,
                             agg="seq-mean-token-sum")),
    "sapo_sequence_kl": (("ref",), dict(objective="sapo", level="sequence", kl_coef=0.1, kl_kind="k2",
                                        kl_is_correction=True)),
    "geo_mean": ((), dict(objective="geo_mean", clip_low=0.1, clip_high=0.15, agg="seq-mean-token-mean")),
    "geo_mean_token_mean": ((), dict(objective="geo_mean", clip_low=0.4, log_ratio_clamp=0.3)),
    "geo_mean_everything": (("ref", "rollout", "entropy"),
                            dict(objective="geo_mean", clip_low=0.1, clip_high=0.2, kl_coef=0.05, kl_kind="k1",
                                 tis_cap=1.5, tis_min=0.7, tis_mode="mask", tis_level="sequence", entropy_coef=0.01,
                                 agg="seq-mean-token-mean", normalizer=6.0)),
    "vespo": ((), dict(objective="vespo", agg="token-sum")),
    "vespo_params": ((), dict(objective="vespo", vespo_k_pos=1.0, vespo_lambda_pos=0.5, vespo_k_neg=4.0,
                              vespo_lambda_neg=0.0)),
    "vespo_tis_truncate": (("rollout",), dict(objective="vespo", tis_cap=1.05)),
    "vespo_tis_mask": (("rollout", "ref"), dict(objective="vespo", tis_cap=1.05, tis_mode="mask", kl_coef=0.1)),
    "vespo_tis_min_mask": (("rollout",), dict(objective="vespo", tis_cap=1.05, tis_min=0.97, tis_mode="mask")),
    "vespo_tis_min_truncate": (("rollout",), dict(objective="vespo", tis_cap=1.05, tis_min=0.97)),
    "vespo_weights": (("rollout", "weights", "entropy"), dict(objective="vespo", tis_cap=1.05, entropy_coef=0.01,
                                                              agg="seq-mean-token-mean")),
    # the importance-weight band and a separate off-policy tensor on the vector objective body
    "sapo_band": (("rollout", "behaviour", "weights"),
                  dict(objective="sapo", tis_cap=1.1, tis_min=0.9, tis_mode="mask", off_policy_threshold=0.01)),
    "dppo_tv_band": (("rollout", "behaviour"), dict(objective="dppo_tv", clip_low=0.05, tis_cap=1.1, tis_min=0.95,
                                                    off_policy_threshold=-0.01)),
    "dppo_tv": ((), dict(objective="dppo_tv", clip_low=0.05, clip_high=0.08, ratio_cap=1.3)),
    "dppo_tv_sequence": ((), dict(objective="dppo_tv", level="sequence", clip_low=0.05)),
    "dppo_kl": ((), dict(objective="dppo_kl", clip_low=0.01, clip_high=0.02, ratio_cap=1.2,
                         log_ratio_clamp=20.0)),
    "dppo_kl_everything": (("ref", "rollout", "entropy", "weights"),
                           dict(objective="dppo_kl", clip_low=0.01, clip_high=0.03, kl_coef=0.05, tis_cap=1.1,
                                tis_mode="mask", entropy_top_fraction=0.5, agg="seq-mean-token-sum-norm")),
}


@pytest.mark.parametrize("name", list(OBJ_CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_matches_reference(backend, name):
    needs, options = OBJ_CASES[name]
    for adv_per_token in (False, True):
        batch = make_batch(6, 11, seed=1, spread=0.2, adv_per_token=adv_per_token)
        args, opts = build(batch, needs, options)
        out, grads = run(backend, args, opts)
        assert out.loss.dtype == torch.float64
        expected, expected_grads = reference_of(args, opts)
        # Triton receives the scalar options as float32 kernel arguments.
        tol = 1e-10 if backend == "cpu" else 1e-6
        check_against_reference(out, grads, expected, expected_grads, tol, tol)


@pytest.mark.parametrize("name", list(OBJ_CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_matches_reference(backend, name, dtype):
    needs, options = OBJ_CASES[name]
    batch = make_batch(5, 13, seed=2, spread=0.2, adv_per_token=name.endswith("everything"))
    args, opts = build(batch, needs, options, dtype=dtype)
    out, grads = run(backend, args, opts)
    assert out.loss.dtype == torch.float32
    # The reference runs on the same (rounded) inputs; the gradient comes back in the input
    # dtype, so bfloat16 gradients carry bfloat16's rounding.
    expected, expected_grads = reference_of(args, opts)
    grad_tol = 1e-4 if dtype == torch.float32 else 1e-2
    check_against_reference(out, grads, expected, expected_grads, 1e-5, grad_tol)


LONG_ROW_CASES = ["sapo_everything", "sapo_sequence_kl", "geo_mean_everything", "geo_mean_token_mean", "vespo",
                  "vespo_tis_mask", "vespo_tis_min_mask", "dppo_tv", "dppo_kl_everything", "sapo_band",
                  "dppo_tv_band"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", LONG_ROW_CASES)
def test_long_rows(backend, name):
    # float32 rows of several blocks: the CPU kernel's 8-token vector bodies (the row prepass
    # and the token pass) with a scalar tail; per-token advantages where the case has extras.
    batch = make_batch(3, 1100 if backend == "triton" else 701, seed=3, adv_per_token=name.endswith("everything"))
    if name.startswith("vespo"):
        # a sequence weight of a few hundred tokens' ratios that does not underflow phi to 0
        noise = 0.002 * torch.randn(batch["logp"].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        batch["old"] = batch["logp"] + noise
        batch["rollout"] = batch["old"] + noise.flip(-1)
    needs, options = OBJ_CASES[name]
    args, opts = build(batch, needs, options, dtype=torch.float32)
    out, grads = run(backend, args, opts)
    check_against_reference(out, grads, *reference_of(args, opts))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extreme_log_ratios_follow_reference(backend):
    """Ratios of exp(+-30) and beyond: SAPO's gate saturates, VESPO's weight underflows to 0,
    GMPO's clip and DPPO's region act."""
    batch = make_batch(4, 7, seed=5)
    batch["logp"][0, :3] = batch["old"][0, :3] + torch.tensor([30.0, -30.0, 80.0], dtype=torch.float64)
    for name in ("sapo", "geo_mean", "vespo", "dppo_tv", "dppo_kl"):
        needs, options = OBJ_CASES[name]
        args, opts = build(batch, needs, options)
        out, grads = run(backend, args, opts)
        tol = 1e-10 if backend == "cpu" else 1e-6
        check_against_reference(out, grads, *reference_of(args, opts), tol, tol)


@pytest.mark.parametrize("name", ["sapo", "sapo_sequence", "sapo_temperatures", "geo_mean", "geo_mean_token_mean",
                                  "geo_mean_everything", "sapo_sequence_kl"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck(backend, name):
    # vespo and dppo are left out: their weights are detached by definition (as CISPO's).
    needs, options = OBJ_CASES[name]
    batch = make_batch(4, 6, seed=4, spread=0.1)
    args, opts = build(batch, needs, options)
    ent = opts.pop("entropy", None)

    def f(lp, *maybe_ent):
        extra = {"entropy": maybe_ent[0]} if maybe_ent else {}
        with rlkern.use_backend(backend):
            return losses.policy_loss(lp, *args[1:], **opts, **extra).loss

    inputs = (args[0],) + ((ent,) if ent is not None else ())
    clean = tuple(torch.where(args[3], x.detach(), torch.zeros_like(x)).requires_grad_() for x in inputs)
    assert torch.autograd.gradcheck(f, clean, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_extreme_log_ratios_in_vector_body(backend):
    """The extreme ratios of the test above in float32 rows of 37 tokens, where they fall in
    the CPU kernel's 8-token vector body (its own exp and log) rather than the scalar tail."""
    batch = make_batch(4, 37, seed=5, adv_per_token=True, nan_masked=False)
    batch["logp"][0, 8:11] = batch["old"][0, 8:11] + torch.tensor([30.0, -30.0, 80.0], dtype=torch.float64)
    batch["logp"][3, 17:19] = batch["old"][3, 17:19] + torch.tensor([-40.0, 25.0], dtype=torch.float64)
    batch["mask"][0, 8:11] = True
    batch["mask"][3, 17:19] = True
    for name in ("sapo", "geo_mean", "vespo", "dppo_tv", "dppo_kl", "dppo_kl_everything"):
        needs, options = OBJ_CASES[name]
        args, opts = build(batch, needs, options, dtype=torch.float32)
        out, grads = run(backend, args, opts)
        check_against_reference(out, grads, *reference_of(args, opts))


def test_baseline_x86_build_matches(tmp_path):
    """The objective bodies compiled for baseline x86-64 (RLKERN_DISABLE_AVX2) agree too."""
    run_with_baseline_isa(tmp_path, "test_objectives", """
for name in t.OBJ_CASES:
    for dtype in (t.torch.float32, t.torch.bfloat16):
        t.test_low_precision_matches_reference('cpu', name, dtype)
for name in t.LONG_ROW_CASES:
    t.test_long_rows('cpu', name)
t.test_float32_extreme_log_ratios_in_vector_body('cpu')
""")


def test_empty_batch_rows_and_all_masked():
    for name, (needs, options) in OBJ_CASES.items():
        batch = make_batch(3, 5, seed=6)
        batch["mask"][:] = False
        args, opts = build(batch, needs, options)
        for backend in CPU_BACKENDS:
            out, grads = run(backend, args, opts)
            assert float(out.loss) == 0.0, name
            assert all(torch.count_nonzero(g) == 0 for g in grads), name


@pytest.mark.parametrize("options,match", [
    (dict(objective="sapo", sapo_temperature_pos=0.0), "sapo_temperature_pos"),
    (dict(objective="sapo", sapo_temperature_neg=-1.0), "sapo_temperature_neg"),
    (dict(objective="sapo", sapo_temperature_neg=float("nan")), "sapo_temperature_neg"),
    (dict(objective="vespo", vespo_k_pos=None), "vespo_k_pos"),
    (dict(objective="vespo", vespo_lambda_neg="2"), "vespo_lambda_neg"),
    (dict(objective="geo_mean", level="sequence"), "level"),
    (dict(objective="geo_mean", off_policy_threshold=0.1), "off_policy_threshold"),
    (dict(objective="geo_mean", kl_is_correction=True), "kl_is_correction"),
    (dict(objective="geo_mean", tis_cap=2.0), "tis_level"),
    (dict(objective="vespo", tis_cap=2.0, tis_level="sequence"), "tis_level"),
    (dict(objective="gmpo"), "objective"),
])
def test_bad_options_raise(options, match):
    batch = make_batch(2, 4, seed=7)
    args, _ = build(batch, (), {})
    opts = dict(options)
    if "tis_cap" in opts:
        opts["rollout_logp"] = batch["rollout"]
    with pytest.raises((ValueError, TypeError), match=match):
        losses.policy_loss(*args, **opts)


def test_vespo_phi_is_one_on_policy():
    """phi(1) = exp(lambda + 0 - lambda) = 1: on-policy VESPO is REINFORCE."""
    batch = make_batch(4, 8, seed=8)
    batch["old"] = batch["logp"].clone()
    for backend in CPU_BACKENDS:
        args, opts = build(batch, (), dict(objective="vespo"))
        out, grads = run(backend, args, opts)
        args2, opts2 = build(batch, (), dict(objective="reinforce"))
        out2, grads2 = run(backend, args2, opts2)
        assert_close(out.loss, out2.loss, 1e-12)
        assert_close(grads[0], grads2[0], 1e-12)
        assert float(out.metrics["phi_mean"]) == pytest.approx(1.0)


def test_objective_list_is_documented():
    doc = losses.policy_loss.__doc__
    for name in ref.OBJECTIVES:
        assert f'"{name}"' in doc, name
    assert math.isclose(ref.VESPO_LOG_LOW, math.log(1e-8))


# ---------------------------------------------------------------------------------------
# against the peers' own code


def _peer_inputs(seed=0, B=6, T=9, dtype=torch.float32, token_adv=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    for i, n in enumerate([T, 7, 3, 9, 1, 5][:B]):
        mask[i, n:] = False
    mask[0, 2:4] = False
    old = -torch.rand(B, T, generator=g) * 3 - 0.05
    lp = old + 0.3 * torch.randn(B, T, generator=g)
    lp[0, 0] = old[0, 0] + 25.0
    lp[3, 0] = old[3, 0] - 25.0
    rollout = old + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g) if token_adv else torch.randn(B, generator=g)
    return old.to(dtype), lp.to(dtype), rollout.to(dtype), adv, mask


def _grad_of(fn, lp):
    lp = lp.detach().clone().requires_grad_()
    loss, metrics = fn(lp)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), metrics, grad


verl_ca = None


def _verl():
    global verl_ca
    verl_ca = pytest.importorskip("verl.trainer.ppo.core_algos", reason="needs verl 0.9.1 (pip install --no-deps verl)")
    from verl.workers.config import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig as VerlPolicyLossConfig

    cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2,
                      clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, tau_pos=0.9, tau_neg=1.4,
                      policy_loss=VerlPolicyLossConfig(loss_mode="vanilla"))
    return verl_ca, cfg


# The options that make policy_loss compute verl 0.9.1's objective (its config as above).
VERL_OPTIONS = {
    "sapo": lambda B: dict(objective="sapo", sapo_temperature_pos=0.9, sapo_temperature_neg=1.4,
                           log_ratio_clamp=20.0, agg="seq-mean-token-mean"),
    "geo_mean": lambda B: dict(objective="geo_mean", clip_low=0.2, clip_high=0.28, agg="seq-mean-token-mean",
                               normalizer=float(B)),
    "dppo_tv": lambda B: dict(objective="dppo_tv", clip_low=0.2, clip_high=0.28, ratio_cap=3.0, log_ratio_clamp=20.0),
    "dppo_kl": lambda B: dict(objective="dppo_kl", clip_low=0.2, clip_high=0.28, ratio_cap=3.0, log_ratio_clamp=20.0),
}
# verl's metric -> ours
VERL_METRICS = {
    "sapo": {},
    "geo_mean": {"actor/pg_clipfrac": ("clip_frac_high",), "actor/pg_clipfrac_lower": ("clip_frac_low",),
                 "actor/ppo_kl": ("approx_kl",)},
    "dppo_tv": {"actor/pg_clipfrac": ("clip_frac_low", "clip_frac_high"), "actor/pg_clipfrac_lower": ("trunc_frac",)},
    "dppo_kl": {"actor/pg_clipfrac": ("clip_frac_low", "clip_frac_high"), "actor/pg_clipfrac_lower": ("trunc_frac",)},
}


@pytest.mark.parametrize("name", list(VERL_OPTIONS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("token_adv", [False, True])
def test_matches_verls_own_function(name, backend, token_adv):
    ca, cfg = _verl()
    old, lp, _, adv, mask = _peer_inputs(seed=1, token_adv=token_adv)
    adv2 = adv[:, None] * mask if adv.dim() == 1 else adv
    verl_fn = getattr(ca, f"compute_policy_loss_{name}")
    loss_mode = "seq-mean-token-mean" if name == "sapo" else "token-mean"
    theirs = _grad_of(lambda x: verl_fn(old, x, adv2, mask, loss_mode, cfg), lp)

    def ours_fn(x):
        with rlkern.use_backend(backend):
            out = losses.policy_loss(x, old, adv2, mask, **VERL_OPTIONS[name](lp.shape[0]))
        return out.loss, out.metrics

    ours = _grad_of(ours_fn, lp)
    assert_close(ours[0], theirs[0], 1e-5, f"{name} loss")
    assert_close(ours[2], theirs[2], 1e-4, f"{name} grad")
    for key, parts in VERL_METRICS[name].items():
        value = sum(float(ours[1][p]) for p in parts)
        assert value == pytest.approx(theirs[1][key], rel=1e-5, abs=1e-6), key


# --- TRL 1.16: GRPOTrainer._compute_loss itself, fed the same log-probs


TRL_VOCAB = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(20)]


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    trl = pytest.importorskip("trl", reason="needs trl 1.16")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama_objectives")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TRL_VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(TRL_VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0,
                         eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    args = trl.GRPOConfig(output_dir=str(path / "out"), per_device_train_batch_size=6, num_generations=6,
                          max_completion_length=9, report_to="none", use_cpu=True, disable_tqdm=True, bf16=False)
    dataset = datasets.Dataset.from_dict({"prompt": ["w1 w2"] * 6})
    trainer = trl.GRPOTrainer(model=str(path), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=args, train_dataset=dataset)
    trainer.model.eval()  # eval mode: no gradient-accumulation scaling inside _compute_loss
    return trainer


def _trl_loss(trainer, monkeypatch, lp, inputs, **settings):
    for key, value in settings.items():
        if key.startswith("args."):
            monkeypatch.setattr(trainer.args, key[5:], value)
        else:
            monkeypatch.setattr(trainer, key, value, raising=False)
    B, T = lp.shape
    entropies = torch.zeros_like(lp)
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies",
                        lambda *a, **k: (lp, entropies, None))
    trainer._metrics["eval"].clear()
    full = dict(prompt_ids=torch.ones(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
                completion_ids=torch.ones(B, T, dtype=torch.long), **inputs)
    loss = trainer._compute_loss(trainer.model, full)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


TRL_CASES = {
    # (TRL settings, policy_loss options given (B, number of active tokens)). TRL 1.16 multiplies
    # the KL by the ratio by default (use_bias_correction_kl=True): kl_is_correction.
    "sapo-token": (dict(loss_type="sapo", importance_sampling_level="token", beta=0.0,
                        **{"args.sapo_temperature_pos": 0.7, "args.sapo_temperature_neg": 1.6}),
                   lambda B, n: dict(objective="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=1.6,
                                     agg="seq-mean-token-mean", normalizer=float(B))),
    "sapo-sequence-kl": (dict(loss_type="sapo", importance_sampling_level="sequence", beta=0.04),
                         lambda B, n: dict(objective="sapo", level="sequence", kl_coef=0.04, kl_is_correction=True,
                                           agg="seq-mean-token-mean", normalizer=float(B))),
    "luspo-sequence": (dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.0, epsilon_low=0.2,
                            epsilon_high=0.28),
                       lambda B, n: dict(objective="clip", level="sequence", clip_low=0.2, clip_high=0.28,
                                         agg="seq-mean-token-sum", normalizer=float(B))),
    "luspo-token-delta-kl": (dict(loss_type="luspo", importance_sampling_level="token", beta=0.04, epsilon_low=0.2,
                                  epsilon_high=0.28, **{"args.delta": 1.25, "args.use_bias_correction_kl": False}),
                             lambda B, n: dict(objective="clip", clip_low=0.2, clip_high=0.28, ratio_cap=1.25,
                                               kl_coef=0.04, agg="seq-mean-token-sum", normalizer=float(B))),
    "vespo": (dict(loss_type="vespo", importance_sampling_level="token", beta=0.0,
                   **{"args.vespo_k_pos": 1.5, "args.vespo_lambda_pos": 2.5, "args.vespo_k_neg": 2.0,
                      "args.vespo_lambda_neg": 1.0}),
              lambda B, n: dict(objective="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.0,
                                vespo_lambda_neg=1.0, agg="token-sum", normalizer=float(n))),
    "vespo-vllm-token_truncate": (dict(loss_type="vespo", importance_sampling_level="token", beta=0.04,
                                       use_vllm=True, vllm_importance_sampling_correction=True),
                                  lambda B, n: dict(objective="vespo", kl_coef=0.04, kl_is_correction=True,
                                                    tis_cap=1.05, agg="token-sum", normalizer=float(n))),
    "vespo-vllm-token_mask": (dict(loss_type="vespo", importance_sampling_level="token", beta=0.0,
                                   use_vllm=True, vllm_importance_sampling_correction=True),
                              lambda B, n: dict(objective="vespo", tis_cap=1.05, tis_mode="mask", agg="token-sum",
                                                normalizer=float(n))),
}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("case", list(TRL_CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_trls_compute_loss(trl_trainer, monkeypatch, case, backend):
    settings, options_of = TRL_CASES[case]
    old, lp, rollout, adv, mask = _peer_inputs(seed=2)
    # TRL's own log-ratio range for the extreme tokens: VESPO clamps them, the others do not
    # (keep them finite for the clip objective's exp).
    ref_lp = lp + 0.2 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(9))
    B, n = lp.shape[0], int(mask.sum())
    inputs = dict(completion_mask=mask.long(), advantages=adv, old_per_token_logps=old,
                  ref_per_token_logps=ref_lp, num_items_in_batch=torch.tensor(float(n)))
    options = options_of(B, n)
    if options.get("tis_cap") is not None:
        # what TRL's generation step hands _compute_loss for vLLM samples (token modes)
        w = torch.exp((old - rollout) * mask)
        w = torch.clamp(w, max=1.05) if options.get("tis_mode", "truncate") == "truncate" else w.masked_fill(w > 1.05,
                                                                                                               0.0)
        inputs["importance_sampling_ratio"] = w
        settings = dict(settings, vllm_importance_sampling_mode="token_truncate" if options.get(
            "tis_mode", "truncate") == "truncate" else "token_mask")
        options["rollout_logp"] = rollout
    if options.get("kl_coef"):
        options["ref_logp"] = ref_lp
    x = lp.detach().clone().requires_grad_()
    theirs, trl_metrics = _trl_loss(trl_trainer, monkeypatch, x, inputs, **settings)
    (g_theirs,) = torch.autograd.grad(theirs, x)
    y = lp.detach().clone().requires_grad_()
    with rlkern.use_backend(backend):
        out = losses.policy_loss(y, old, adv, mask, **options)
    (g_ours,) = torch.autograd.grad(out.loss, y)
    assert_close(out.loss, theirs.detach(), 1e-5, f"{case} loss")
    assert_close(g_ours, g_theirs, 1e-4, f"{case} grad")
    if "vespo/phi_seq_mean" in trl_metrics:
        assert float(out.metrics["phi_seq_mean"]) == pytest.approx(trl_metrics["vespo/phi_seq_mean"], rel=1e-5)
    if "kl" in trl_metrics and not options.get("kl_is_correction"):  # TRL logs the corrected KL
        assert float(out.metrics["kl"]) == pytest.approx(trl_metrics["kl"], rel=1e-5)


# --- the importance-weight band [tis_min, tis_cap] against the peers' own code


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tis_band_matches_verls_icepop_weights(backend, level):
    """verl 0.9.1's IcePop (rollout_is_threshold "lower_upper"): its own weights, fed to
    policy_loss as ``weights``, give what tis_min/tis_cap with tis_mode="mask" give."""
    helper = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper",
                                 reason="needs verl 0.9.1 (pip install --no-deps verl)")
    old, lp, rollout, adv, mask = _peer_inputs(seed=3)
    lo, hi = (0.97, 1.04) if level == "token" else (0.8, 1.25)
    w, _ = helper.compute_rollout_correction_weights(old - rollout, mask.float(), rollout_is=level,
                                                     rollout_is_threshold=f"{lo}_{hi}")
    assert 0 < int((w[mask] == 0).sum()) < int(mask.sum())  # the band drops some tokens, not all
    results = []
    for opts in (dict(weights=w), dict(rollout_logp=rollout, tis_cap=hi, tis_min=lo, tis_mode="mask",
                                       tis_level=level)):
        x = lp.detach().clone().requires_grad_()
        with rlkern.use_backend(backend):
            out = losses.policy_loss(x, old, adv, mask, clip_high=0.28, **opts)
        results.append((out.loss, torch.autograd.grad(out.loss, x)[0]))
    assert_close(results[1][0], results[0][0], 1e-5, "loss")
    assert_close(results[1][1], results[0][1], 1e-5, "grad")


@pytest.mark.parametrize("mode", ["clip", "mask"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tis_band_matches_openrlhf_policy_loss(backend, mode):
    """OpenRLHF 0.11.2's token-level IS correction with its (low, high) band: "clip" is
    tis_mode="truncate" with tis_min, "mask" is tis_mode="mask"."""
    from rlkern.integrations._peers import import_openrlhf_losses

    mods = import_openrlhf_losses()
    if mods is None:
        pytest.skip("needs OpenRLHF 0.11.2 (see tests/test_integrations_openrlhf.py)")
    L, _ = mods
    old, lp, rollout, adv, mask = _peer_inputs(seed=4)
    adv_tok = adv[:, None].expand_as(lp).contiguous()
    lo, hi = 0.97, 1.04
    theirs_fn = L.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, is_correction_level="token",
                             is_correction_mode=mode, is_correction_threshold=(lo, hi))
    x = lp.detach().clone().requires_grad_()
    theirs = theirs_fn(x, old, adv_tok, mask.float(), rollout_log_probs=rollout)[0]
    (g_theirs,) = torch.autograd.grad(theirs, x)
    y = lp.detach().clone().requires_grad_()
    with rlkern.use_backend(backend):
        out = losses.policy_loss(y, old, adv, mask, clip_high=0.28, log_ratio_clamp=20.0, rollout_logp=rollout,
                                 tis_cap=hi, tis_min=lo, tis_mode="truncate" if mode == "clip" else "mask")
    (g_ours,) = torch.autograd.grad(out.loss, y)
    assert_close(out.loss, theirs.detach(), 1e-5, "loss")
    assert_close(g_ours, g_theirs, 1e-5, "grad")


# --- on a GPU (tools/gpu_check.sh runs every test marked gpu): the Triton kernels at a
# realistic row length, float32 and bfloat16, against the float64 reference on the device.

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(OBJ_CASES))
def test_objectives_on_cuda_tensors(name, dtype):
    needs, options = OBJ_CASES[name]
    batch = make_batch(64, 1031, seed=4, spread=0.2, adv_per_token=name.endswith("everything"))
    batch = {k: v.cuda() for k, v in batch.items()}
    args, opts = build(batch, needs, options, dtype=dtype)
    out, grads = run("triton", args, opts)
    assert out.loss.device.type == "cuda"
    expected, expected_grads = reference_of(args, opts)
    check_against_reference(out, grads, expected, expected_grads, 1e-5, 1e-4 if dtype == torch.float32 else 1e-2)


def test_metric_scalars_read_on_the_cpu_match_the_stacked_read():
    """The adapters' metrics (_peers.scalars): CPU values are read one by one, without the
    stack the device path uses for its single sync, and give the same float32-rounded
    numbers: tensors of any dtype and shape (1,), Python numbers, bools, NaN, infinities
    and values beyond float32's range."""
    from rlkern.integrations import _peers

    values = [torch.tensor(0.123456789, dtype=torch.float64), 0.1, torch.tensor(3), True, float("nan"),
              torch.tensor(-float("inf")), 1e300, torch.tensor([2.5], dtype=torch.bfloat16), torch.tensor(True),
              -1e39, 3.4028235e38 * 1.00000001, 2**40 + 1]
    got = _peers.scalars(values)
    stacked = torch.stack([v.detach().float().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                           for v in values]).tolist()
    assert len(got) == len(stacked)
    for g, e in zip(got, stacked):
        assert type(g) is float and (g == e or (g != g and e != e)), (g, e)
