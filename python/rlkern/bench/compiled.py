"""rlkern inside ``torch.compile``, and the per-call overhead of small calls.

- ``grpo step compiled``: one GRPO training step of a small policy head (hidden states
  from a linear layer, LM head of V tokens, token-level PPO clip with clip-higher and a k3
  KL term), the whole step under ``torch.compile``: rlkern's ops
  (``linear_token_logprobs`` -> ``policy_loss``) inside the compiled step, against
  the same step written as TRL's GRPOTrainer writes it (full logits, ``log_softmax``,
  gather, the loss in PyTorch) compiled the same way, and both eager.
- ``overhead``: tiny calls (1 x 8 ``gae``, 2 x 8 and 64 x 1024 ``policy_loss`` forward
  and backward), where the Python around a kernel is most of the time: rlkern eager, the
  same call through ``torch.compile``, and the eager PyTorch formulation.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .core import Case, Impl
from .losses import BETA, CLIP_HIGH, CLIP_LOW, _inputs, trl_grpo

SUITE = "compiled"


def _compile(fn):
    # fullgraph: every rlkern op is a custom op (issue #12), so a step that breaks the graph
    # is a regression, and it fails here rather than being measured half-eager. The compiled
    # function computes the loss; backward() runs outside it (dynamo does not trace a
    # .backward() call) on the backward graph that AOTAutograd compiled with the forward.
    try:
        return torch.compile(fn, fullgraph=True)
    except Exception:  # no compiler toolchain here: leave the competitor out
        return None


def _step_inputs(B: int, T: int, H: int, V: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(B * T, H, generator=g).to(device)
    body = torch.nn.Linear(H, H).to(device)
    head = torch.nn.Linear(H, V, bias=False).to(device)
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    _, old, ref, adv, mask = _inputs(B, T, torch.float32, device)
    return features, body, head, targets, old, ref, adv, mask


def _grpo_step_make(B: int, T: int, H: int, V: int):
    def make(device: torch.device) -> Dict[str, Impl]:
        import rlkern

        features, body, head, targets, old, ref, adv, mask = _step_inputs(B, T, H, V, device)
        params = list(body.parameters()) + list(head.parameters())

        def ours():
            h = torch.tanh(body(features))
            logp = rlkern.linear_token_logprobs(h, head.weight, targets.reshape(-1)).view(B, T)
            out = rlkern.policy_loss(logp, old, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, ref_logp=ref,
                                     kl_coef=BETA, kl_kind="k3")
            return out.loss

        def trl():
            h = torch.tanh(body(features))
            logits = head(h).float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.reshape(-1, 1)).view(B, T)
            loss, _ = trl_grpo(logp, old, ref, adv, mask)
            return loss

        def zero_then(loss_fn):
            def run():
                for p in params:
                    p.grad = None
                loss = loss_fn()
                loss.backward()
                return loss.detach()
            return run

        # "rlkern" (the row the ratios refer to) is the compiled step; eager when nothing compiles here.
        compiled_ours = _compile(ours)
        impls: Dict[str, Impl] = {"rlkern": zero_then(compiled_ours if compiled_ours is not None else ours)}
        if compiled_ours is not None:
            impls["rlkern eager"] = zero_then(ours)
        compiled_trl = _compile(trl)
        if compiled_trl is not None:
            impls["torch.compile(trl)"] = zero_then(compiled_trl)
        impls["trl eager"] = zero_then(trl)
        return impls

    return make


def _gae_make(B: int, T: int):
    def make(device: torch.device) -> Dict[str, Impl]:
        import rlkern

        g = torch.Generator().manual_seed(0)
        r, v = (torch.randn(B, T, generator=g).to(device) for _ in range(2))
        done = (torch.rand(B, T, generator=g) > 0.9).to(device)

        def eager_loop():
            adv = torch.zeros_like(r)
            last = torch.zeros(B, device=device)
            for t in reversed(range(T)):
                nv = v[:, t + 1] if t + 1 < T else torch.zeros(B, device=device)
                keep = (~done[:, t]).float()
                delta = r[:, t] + 0.99 * nv * keep - v[:, t]
                last = delta + 0.99 * 0.95 * keep * last
                adv[:, t] = last
            return adv

        impls: Dict[str, Impl] = {"rlkern": lambda: rlkern.gae(r, v, done, 0.99, 0.95)}
        compiled = _compile(lambda: rlkern.gae(r, v, done, 0.99, 0.95))
        if compiled is not None:
            impls["rlkern compiled"] = compiled
        impls["eager loop"] = eager_loop
        return impls

    return make


def _policy_make(B: int, T: int):
    def make(device: torch.device) -> Dict[str, Impl]:
        import rlkern

        logp, old, ref, adv, mask = _inputs(B, T, torch.float32, device)

        def ours(lp):
            return rlkern.policy_loss(lp, old, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, ref_logp=ref,
                                      kl_coef=BETA, kl_kind="k3").loss

        def trl(lp):
            loss, _ = trl_grpo(lp, old, ref, adv, mask)
            return loss

        def fresh(loss_fn):
            def run():
                logp.grad = None
                loss = loss_fn(logp)
                loss.backward()
                return loss.detach()
            return run

        impls: Dict[str, Impl] = {"rlkern": fresh(ours)}
        compiled = _compile(ours)
        if compiled is not None:
            impls["rlkern compiled"] = fresh(compiled)
        impls["trl eager"] = fresh(trl)
        return impls

    return make


def cases(device: torch.device, quick: bool) -> List[Case]:
    out = [
        Case(SUITE, "overhead gae", "1x8", _gae_make(1, 8)),
        Case(SUITE, "overhead policy_loss fwd+bwd", "2x8", _policy_make(2, 8)),
    ]
    if not quick:
        out.append(Case(SUITE, "overhead policy_loss fwd+bwd", "64x1024", _policy_make(64, 1024)))
    B, T, H, V = (2, 16, 64, 512) if quick else (8, 256, 512, 32000)
    out.append(Case(SUITE, "grpo step compiled", f"{B}x{T} H{H} V{V}", _grpo_step_make(B, T, H, V), items=B * T,
                    unit="tokens/s"))
    return out
