"""rlkern's fused LM head for TRL (``add_rlkern_lm_head``) against TRL 1.16's own fused head on
tiny local models built in code (no hub): a Gemma-2 with final-logit softcapping and a Mixtral
MoE with router logits. Log-probs, entropy, is_top1, mean logits, the router auxiliary loss, the
loss and the gradients of every parameter."""

import copy

import pytest
import torch

pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from rlkern.integrations import trl as rk_trl  # noqa: E402

from helpers import assert_close  # noqa: E402

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def _gemma2(softcap=1.5, logit_scale=None, seed=0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                       sliding_window=4, final_logit_softcapping=softcap, attn_logit_softcapping=50.0)
    if logit_scale is not None:
        cfg.logit_scale = logit_scale  # read by both fused heads (a pre-cap multiplier)
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(cfg).float()
    with torch.no_grad():  # logits of a few units against the cap: tanh well into its bend
        model.model.embed_tokens.weight.mul_(8.0)
    return model


def _mixtral(output_router_logits=True, seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                        num_local_experts=4, num_experts_per_tok=2, output_router_logits=output_router_logits,
                        router_aux_loss_coef=0.05, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg).float()


def _batch(V=97, seed=1):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (3, 10), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    labels = input_ids.clone()
    labels[1, :3] = -100
    labels[0, :4] = -100  # a prompt
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _heads(model, temperature, outputs=OUTPUTS):
    trl_model = copy.deepcopy(model)
    add_fused_lm_head(trl_model, temperature=temperature, outputs=outputs)
    rk_model = copy.deepcopy(model)
    add_fused_lm_head(rk_model, temperature=temperature, outputs=outputs)
    assert rk_trl._lm_head_unsupported(rk_model) is None
    assert rk_trl.add_rlkern_lm_head(rk_model, temperature=temperature, outputs=outputs)
    return trl_model, rk_model


def _run(model, batch, **kw):
    model.zero_grad()
    out = model(**batch, fused_lm_head=True, **kw)
    gen = torch.Generator().manual_seed(5)
    g1 = torch.randn(out.log_probs.shape, generator=gen)
    g2 = torch.randn(out.log_probs.shape, generator=gen)
    total = out.loss + (out.log_probs * g1).sum()
    if out.entropy is not None:
        total = total + (out.entropy * g2).sum()
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _compare(out_t, grads_t, out_r, grads_r, tol=1e-5, gtol=1e-4):
    assert torch.equal(out_t.label_mask, out_r.label_mask)
    assert_close(out_r.log_probs, out_t.log_probs, tol, "log_probs")
    assert_close(out_r.loss, out_t.loss, tol, "loss")
    if out_t.entropy is not None:
        assert_close(out_r.entropy, out_t.entropy, tol, "entropy")
    if out_t.mean_logits is not None:
        assert_close(out_r.mean_logits, out_t.mean_logits, tol, "mean_logits")
    if out_t.is_top1 is not None:
        assert out_r.is_top1.dtype == torch.bool
        assert torch.equal(out_r.is_top1, out_t.is_top1)
    assert (out_t.aux_loss is None) == (out_r.aux_loss is None)
    if out_t.aux_loss is not None:
        assert_close(out_r.aux_loss, out_t.aux_loss, tol, "aux_loss")
    assert grads_t.keys() == grads_r.keys()
    for name in grads_t:
        assert_close(grads_r[name], grads_t[name], gtol, f"grad {name}")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gemma2_softcapping_matches_trl_head(temperature):
    model = _gemma2()
    batch = _batch()
    trl_model, rk_model = _heads(model, temperature)
    out_t, grads_t = _run(trl_model, batch)
    out_r, grads_r = _run(rk_model, batch)
    _compare(out_t, grads_t, out_r, grads_r)
    # the cap acts (the test would pass vacuously otherwise)
    plain = copy.deepcopy(model)
    plain.config.final_logit_softcapping = None
    add_fused_lm_head(plain, temperature=temperature, outputs=OUTPUTS)
    out_p = plain(**batch, fused_lm_head=True)
    assert (out_p.log_probs - out_t.log_probs).abs().max() > 0.1


def test_gemma2_softcapping_with_logit_scale_matches_trl_head():
    """A pre-cap multiplier: TRL caps scale * logits; rlkern passes cap / scale and T / scale."""
    model = _gemma2(softcap=2.0, logit_scale=0.6)
    batch = _batch(seed=2)
    trl_model, rk_model = _heads(model, 0.8)
    _compare(*_run(trl_model, batch), *_run(rk_model, batch))


def test_gemma2_top1_labels_and_shift_labels():
    """Labels set to each position's argmax: is_top1 all True where labelled (checks the kernel's
    top-1 on a case that exercises it), with pre-shifted labels (no shift in the head)."""
    model = _gemma2(seed=3)
    batch = _batch(seed=3)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_labels = logits.argmax(-1)
    shift_labels[1, :3] = -100
    trl_model, rk_model = _heads(model, 1.0)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], shift_labels=shift_labels)
    out_t, grads_t = _run(trl_model, inputs)
    out_r, grads_r = _run(rk_model, inputs)
    _compare(out_t, grads_t, out_r, grads_r)
    assert torch.equal(out_r.is_top1, shift_labels != -100)


@pytest.mark.parametrize("config_flag", [True, False])
def test_mixtral_router_aux_loss_matches_trl_head(config_flag):
    """With output_router_logits in the config, or passed in the call (as GRPOTrainer does when
    its router_aux_loss_coef is set): aux_loss and loss (coef x aux added) equal TRL's, and the
    router weights get the aux loss's gradient."""
    model = _mixtral(output_router_logits=config_flag)
    batch = _batch(seed=4)
    trl_model, rk_model = _heads(model, 0.9, outputs=("log_probs", "entropy"))
    kw = {} if config_flag else {"output_router_logits": True}
    out_t, grads_t = _run(trl_model, batch, **kw)
    out_r, grads_r = _run(rk_model, batch, **kw)
    assert out_r.aux_loss is not None and out_r.aux_loss.requires_grad
    _compare(out_t, grads_t, out_r, grads_r)
    assert any("gate" in n and g.abs().max() > 0 for n, g in grads_r.items())


def test_mixtral_without_router_logits_has_no_aux_loss():
    model = _mixtral(output_router_logits=False)
    batch = _batch(seed=4)
    trl_model, rk_model = _heads(model, 1.0, outputs=("log_probs",))
    out_t, grads_t = _run(trl_model, batch)
    out_r, grads_r = _run(rk_model, batch)
    assert out_r.aux_loss is None
    _compare(out_t, grads_t, out_r, grads_r)


def test_negative_logit_scale_with_softcap_keeps_trls_head():
    model = _gemma2(logit_scale=-1.0)
    reason = rk_trl._lm_head_unsupported(model)
    assert reason is not None and "negative" in reason
    assert not rk_trl.add_rlkern_lm_head(model)
