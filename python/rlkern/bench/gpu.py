"""Benchmark suite ``gpu``: competitors that exist only on a GPU (CUDA devices only).

- Liger-Kernel (``liger_kernel``, a pure-Python package of Triton kernels; on a machine
  without network, install its wheel first, see tools/gpu_check.sh): its fused linear GRPO
  loss against rlkern's ``linear_token_logprobs`` + ``policy_loss`` (same objective: DAPO
  token-mean, clip 0.2/0.28, k3 KL to a reference with beta 0.04), its cross-entropy
  against ``token_logprobs`` and its fused linear cross-entropy against
  ``linear_token_logprobs``. Where it is not installed, a row says so.
- Eager PyTorch at the same shapes: the logits materialised, ``log_softmax`` and gather
  (TRL/verl's plain path) or ``F.cross_entropy``.
- mctx on the GPU through JAX (:mod:`rlkern.bench.mcts_gpu`).

Every callable runs forward and backward. Sizes follow a Qwen-like head (vocabulary
151936, hidden 2048, 4096 tokens) in bfloat16.
"""

from __future__ import annotations

import gc
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from .core import Case
from .losses import BETA, CLIP_HIGH, CLIP_LOW

SUITE = "gpu"
LIGER_MISSING = ("liger_kernel is not installed: bring its wheel (pip download --no-deps liger-kernel) in "
                 "wheels/ or .whl/ for tools/gpu_check.sh")


def _liger(module: str, name: str):
    """A class from liger_kernel, or None when the package (or that class) is absent."""
    try:
        mod = __import__(f"liger_kernel.{module}", fromlist=[name])
    except Exception:  # absent, or broken against this torch/triton: the row says why
        return None
    return getattr(mod, name, None)


def _missing(message: str) -> Callable[[], None]:
    def run() -> None:
        raise RuntimeError(message)

    return run


def _grpo_inputs(B: int, T: int, H: int, V: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(B, T, H, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    # Old and reference log-probs near the policy's (a typical value is -log V).
    base = -torch.rand(B, T, generator=g) * 3 - 9
    old = (base + 0.05 * torch.randn(B, T, generator=g)).to(device)
    ref = (base + 0.05 * torch.randn(B, T, generator=g)).to(device)
    adv = torch.randn(B, generator=g).to(device)
    return hidden, weight, targets, mask, old, ref, adv


def _grpo_loss_terms(logp, old, ref, adv, mask):
    """TRL's GRPO per-token loss (DAPO token-mean, k3 KL), as in bench.losses.trl_grpo."""
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - CLIP_LOW, 1 + CLIP_HIGH)
    a = adv.unsqueeze(1)
    per_token = -torch.min(coef_1 * a, coef_2 * a) + BETA * per_token_kl
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def _linear_grpo_case(B: int, T: int, H: int, V: int, dtype: torch.dtype) -> Case:
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]

    def make(device: torch.device) -> Dict[str, Callable[[], None]]:
        from .. import logprobs, losses

        gc.collect()
        hidden, weight, targets, mask, old, ref, adv = _grpo_inputs(B, T, H, V, dtype, device)

        def step(loss_fn):
            def run() -> None:
                loss_fn().backward()
                hidden.grad = None
                weight.grad = None

            return run

        def ours():
            lp = logprobs.linear_token_logprobs(hidden.view(B * T, H), weight, targets.view(-1)).view(B, T)
            return losses.policy_loss(lp, old, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, ref_logp=ref,
                                      kl_coef=BETA, kl_kind="k3").loss

        def eager():
            logits = (hidden @ weight.t()).float()
            lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
            return _grpo_loss_terms(lp, old, ref, adv, mask)

        impls = {"rlkern": step(ours), "eager (logits + log_softmax + TRL loss)": step(eager)}
        cls = _liger("chunked_loss", "LigerFusedLinearGRPOLoss")
        if cls is None:
            impls["liger FusedLinearGRPO"] = _missing(LIGER_MISSING)
        else:
            liger = cls(beta=BETA, epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH, loss_type="dapo", use_ref_model=True)

            def liger_loss():
                out = liger(hidden, weight, targets, mask.to(torch.int64), adv, ref_per_token_logps=ref,
                            old_per_token_logps=old)
                return out[0] if isinstance(out, tuple) else out

            impls["liger FusedLinearGRPO"] = step(liger_loss)
        return impls

    return Case(SUITE, f"linear_grpo fwd+bwd {name}", f"B={B} T={T} H={H} V={V} {name}", make, items=B * T,
                unit="tok/s", note="LM head + GRPO loss (k3 KL, clip 0.2/0.28, token-mean)", warmup=1, min_repeats=3)


def _ce_case(N: int, V: int, dtype: torch.dtype) -> Case:
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]

    def make(device: torch.device) -> Dict[str, Callable[[], None]]:
        from .. import logprobs

        gc.collect()
        g = torch.Generator().manual_seed(0)
        logits = (torch.randn(N, V, generator=g) * 2).to(device=device, dtype=dtype).requires_grad_()
        targets = torch.randint(0, V, (N,), generator=g).to(device)

        def step(loss_fn, leaf):
            def run() -> None:
                loss_fn().backward()
                leaf.grad = None

            return run

        impls = {"rlkern": step(lambda: -logprobs.token_logprobs(logits, targets).mean(), logits),
                 "F.cross_entropy": step(lambda: F.cross_entropy(logits.float(), targets), logits)}
        cls = _liger("transformers", "LigerCrossEntropyLoss")
        if cls is None:
            impls["liger CrossEntropy"] = _missing(LIGER_MISSING)
        else:
            # Liger writes the gradient into its input in forward: give it its own copy.
            own = logits.detach().clone().requires_grad_()
            ce = cls()
            impls["liger CrossEntropy"] = step(lambda: ce(own, targets), own)
        return impls

    return Case(SUITE, f"token_logprobs cross-entropy fwd+bwd {name}", f"N={N} V={V} {name}", make, items=N,
                unit="tok/s", note="mean -logp of the targets; no entropy", warmup=1, min_repeats=3)


def _linear_ce_case(N: int, H: int, V: int, dtype: torch.dtype) -> Case:
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]

    def make(device: torch.device) -> Dict[str, Callable[[], None]]:
        from .. import logprobs

        gc.collect()
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(N, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
        weight = (torch.randn(V, H, generator=g) / H**0.5).to(device=device, dtype=dtype).requires_grad_()
        targets = torch.randint(0, V, (N,), generator=g).to(device)

        def step(loss_fn):
            def run() -> None:
                loss_fn().backward()
                hidden.grad = None
                weight.grad = None

            return run

        impls = {"rlkern": step(lambda: -logprobs.linear_token_logprobs(hidden, weight, targets).mean()),
                 "matmul + F.cross_entropy": step(lambda: F.cross_entropy((hidden @ weight.t()).float(), targets))}
        cls = _liger("transformers", "LigerFusedLinearCrossEntropyLoss")
        if cls is None:
            impls["liger FusedLinearCrossEntropy"] = _missing(LIGER_MISSING)
        else:
            flce = cls()
            impls["liger FusedLinearCrossEntropy"] = step(lambda: flce(weight, hidden, targets))
        return impls

    return Case(SUITE, f"linear_token_logprobs cross-entropy fwd+bwd {name}", f"N={N} H={H} V={V} {name}", make,
                items=N, unit="tok/s", note="mean -logp of hidden @ weight.T", warmup=1, min_repeats=3)


def cases(device: torch.device, quick: bool) -> List[Case]:
    if device.type != "cuda":
        return []  # every competitor here needs a GPU; the CPU suites cover the rest
    from . import mcts_gpu

    if quick:
        out = [_linear_grpo_case(2, 64, 64, 4096, torch.bfloat16), _ce_case(64, 4096, torch.bfloat16),
               _linear_ce_case(128, 64, 4096, torch.bfloat16)]
    else:
        out = [_linear_grpo_case(4, 1024, 2048, 151936, torch.bfloat16), _ce_case(4096, 151936, torch.bfloat16),
               _linear_ce_case(4096, 2048, 151936, torch.bfloat16)]
    return out + mcts_gpu.cases(device, quick)
