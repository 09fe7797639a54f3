"""Benchmarks of rlkern.logprobs: log-prob + entropy, forward and backward.

Competitors are the formulations LLM RL trainers use in eager PyTorch:

- ``eager``: ``log_softmax(logits.float()).gather(...)`` with the entropy from the
  softmax (``logsumexp - sum softmax * logits``), as verl's ``logprobs_from_logits`` /
  ``entropy_from_logits`` and TRL/OpenRLHF's plain path do it.
- ``trl_restated``: TRL's ``selective_log_softmax`` (float32: gather minus a per-row
  loop of ``logsumexp``; bf16/fp16: a per-row loop of ``log_softmax`` + gather) and
  ``entropy_from_logits`` (``log_softmax`` over chunks of 128 rows, ``-(exp(lp) * lp).sum``),
  restated here because trl is not a dependency (its row-loop formulation, not its code).
- ``torch.compile``: the eager formulation compiled (left out if compiling fails, and
  in ``--quick`` runs).

Every callable runs forward and backward and drops the gradient before returning, so
"peak extra MB" counts the gradient of the logits (one logits-sized tensor in their
dtype) plus whatever else the method allocates.
"""

from __future__ import annotations

import gc
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from .. import logprobs as lp_mod
from .core import Case

SUITE = "logprobs"


def _eager(logits: torch.Tensor, targets: torch.Tensor):
    x = logits.float()
    logp = torch.log_softmax(x, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    probs = torch.softmax(x, dim=-1)
    entropy = torch.logsumexp(x, dim=-1) - (probs * x).sum(-1)
    return logp, entropy


def _trl_restated(logits: torch.Tensor, targets: torch.Tensor):
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, -1, targets[:, None]).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        logp = selected - lse
    else:
        logp = torch.stack([F.log_softmax(row, dim=-1).gather(-1, t[None]).squeeze(-1)
                            for row, t in zip(logits, targets)])
    entropies = []
    for chunk in logits.split(128, dim=0):
        chunk_logp = F.log_softmax(chunk, dim=-1)
        entropies.append(-(torch.exp(chunk_logp) * chunk_logp).sum(-1))
    return logp, torch.cat(entropies)


def _fwd_bwd(fn: Callable, leaf: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        logp, entropy = fn(leaf, targets)
        (logp.sum() + entropy.sum()).backward()
        leaf.grad = None

    return run


# Peak extra memory of each method in float32 logits-sized tensors (N x V x 4 bytes),
# measured with this module's own sampler at 512 x 32768 on the CPU (bf16, fp32) and
# rounded up: eager keeps the float32 copy, log_softmax, softmax and their gradients
# alive at once (about 8 copies: 19 GB at 4096 x 151936), the row-loop formulation
# saves each row's log_softmax for backward. The row-loop's float32 peak moves with the
# heap's state, because its 16 MB per-chunk buffers can come from malloc's heap rather than
# fresh mappings: 6.8 to 7.3 copies in a fresh process here, 7.8 in CI after an hour of
# other tests, hence 8.5. torch.compile's is assumed, not measured (its fused graph keeps
# fewer copies than eager). Used to skip a method that would not fit, never to report a
# number.
_TOKEN_PEAK_COPIES = {"rlkern": 1.1, "eager": 8.5, "trl_restated": 8.5, "torch.compile": 5.0}
_LINEAR_PEAK_COPIES = {"rlkern": 3.5, "matmul+eager": 9.0}


def _peak_estimate(copies: Dict[str, float], N: int, V: int) -> Dict[str, float]:
    one = N * V * 4 / 2**20
    return {name: k * one for name, k in copies.items()}


def _token_case(N: int, V: int, dtype: torch.dtype, heavy: bool, compile_eager: bool = True) -> Case:
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]

    def make(device: torch.device) -> Dict[str, Callable[[], None]]:
        gc.collect()
        gen = torch.Generator(device="cpu").manual_seed(0)
        logits = (torch.randn(N, V, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_()
        targets = torch.randint(0, V, (N,), generator=gen).to(device)

        def ours(x, t):
            return lp_mod.token_logprobs(x, t, return_entropy=True)

        impls = {"rlkern": _fwd_bwd(ours, logits, targets),
                 "eager": _fwd_bwd(_eager, logits, targets),
                 "trl_restated": _fwd_bwd(_trl_restated, logits, targets)}
        if not compile_eager:
            return impls
        try:
            compiled = _fwd_bwd(torch.compile(_eager), logits, targets)
            compiled()  # compiles here; a failure leaves the competitor out
            impls["torch.compile"] = compiled
        except Exception:
            pass
        return impls

    note = (f"logits {N}x{V} {name} = {N * V * dtype.itemsize / 2**20:.0f} MB; peak extra includes the "
            "gradient of the logits (the same size)")
    return Case(SUITE, "token_logprobs+entropy fwd+bwd", f"{N}x{V} {name}", make, items=N, unit="tok/s",
                note=note, warmup=1 if heavy else 2, min_repeats=2 if heavy else 5,
                peak_mb_estimate=_peak_estimate(_TOKEN_PEAK_COPIES, N, V))


def _linear_inputs(N: int, H: int, V: int, dtype: torch.dtype, device: torch.device):
    """Hidden states and an LM head (both requiring grad) and targets, the same for every linear case."""
    gc.collect()
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(N, H, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen).to(device)
    return hidden, weight, targets


def _linear_case(N: int, H: int, V: int, dtype: torch.dtype, heavy: bool) -> Case:
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]

    def make(device: torch.device) -> Dict[str, Callable[[], None]]:
        hidden, weight, targets = _linear_inputs(N, H, V, dtype, device)

        def run(fn):
            def call() -> None:
                logp, entropy = fn()
                (logp.sum() + entropy.sum()).backward()
                hidden.grad = None
                weight.grad = None

            return call

        def ours():
            return lp_mod.linear_token_logprobs(hidden, weight, targets, return_entropy=True)

        def matmul_eager():
            return _eager(hidden @ weight.t(), targets)

        return {"rlkern": run(ours), "matmul+eager": run(matmul_eager)}

    note = f"logits would be {N}x{V} {name} = {N * V * dtype.itemsize / 2**20:.0f} MB"
    return Case(SUITE, "linear_token_logprobs+entropy fwd+bwd", f"{N}x{H}->{V} {name}", make, items=N,
                unit="tok/s", note=note, warmup=1 if heavy else 2, min_repeats=2 if heavy else 5,
                peak_mb_estimate=_peak_estimate(_LINEAR_PEAK_COPIES, N, V))


def _linear_logp_case(N: int, H: int, V: int, dtype: torch.dtype, heavy: bool) -> Case:
    """The trainers' head: log-probs only (no entropy), against ``hidden @ weight.T`` then
    ``log_softmax(logits.float()).gather`` (TRL's and verl's plain path), forward and
    backward into hidden and the LM head."""
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]

    def make(device: torch.device) -> Dict[str, Callable[[], None]]:
        hidden, weight, targets = _linear_inputs(N, H, V, dtype, device)

        def run(fn):
            def call() -> None:
                fn().sum().backward()
                hidden.grad = None
                weight.grad = None

            return call

        def ours():
            return lp_mod.linear_token_logprobs(hidden, weight, targets)

        def matmul_log_softmax():
            logits = hidden @ weight.t()
            return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)

        return {"rlkern": run(ours), "matmul+log_softmax": run(matmul_log_softmax)}

    note = (f"logits would be {N}x{V} {name} = {N * V * dtype.itemsize / 2**20:.0f} MB; rlkern keeps up to "
            f"{lp_mod.LINEAR_SAVED_LOGITS_BYTES / 2**20:.0f} MB of chunk logits for backward")
    return Case(SUITE, "linear_token_logprobs fwd+bwd", f"{N}x{H}->{V} {name}", make, items=N,
                unit="tok/s", note=note, warmup=1 if heavy else 2, min_repeats=2 if heavy else 5,
                peak_mb_estimate=_linear_logp_peak(N, H, V, dtype.itemsize))


def _linear_logp_peak(N: int, H: int, V: int, itemsize: int) -> Dict[str, float]:
    """rlkern: the kept chunk logits (at most LINEAR_SAVED_LOGITS_BYTES), two 16 MB chunk
    buffers and the weight's gradient with its float32 accumulator; eager: logits,
    log_softmax, their gradients and the weight's gradient (measured at 1024x512->151936
    float32 on the CPU: 828 MB and 1781 MB; this gives 1221 and 3264)."""
    logits, head = N * V * itemsize / 2**20, V * H * 4 / 2**20
    kept = min(lp_mod.LINEAR_SAVED_LOGITS_BYTES / 2**20, logits)
    return {"rlkern": kept * 1.1 + 64 + 2 * head, "matmul+log_softmax": 4.5 * logits + 2 * head}


def _native_bf16_gemm(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run at full speed on ``device``: on a GPU, and on a
    CPU with AVX512-BF16 or AMX. Elsewhere torch falls back to a generic GEMM (on a 2-core
    AVX2 machine: 21 GFLOP/s in bf16 against 118 in fp32, and the backward's products on one
    thread): the bf16 linear case there times that fallback on both sides for over 15
    minutes, and says nothing about rlkern."""
    if device.type != "cpu":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cases(device: torch.device, quick: bool) -> List[Case]:
    if quick:
        # Smoke shapes; torch.compile (tens of seconds to compile on a small CPU) is left out.
        return [_token_case(64, 4096, torch.bfloat16, False, compile_eager=False),
                _token_case(64, 4096, torch.float32, False, compile_eager=False),
                _linear_case(128, 64, 4096, torch.bfloat16, False),
                _linear_logp_case(128, 64, 4096, torch.float32, False)]
    # The trainers bench's shapes (16 sequences of 64..192 tokens, hidden 512). bf16 eager on
    # a CPU without bf16 instructions takes minutes per step at these sizes (torch's bf16
    # GEMM there): only float32 is in the suite.
    linear_dtypes = [torch.bfloat16, torch.float32] if _native_bf16_gemm(device) else [torch.float32]
    return [_token_case(4096, 151936, torch.bfloat16, True), _token_case(4096, 151936, torch.float32, True),
            *(_linear_case(2048, 1024, 65536, dtype, True) for dtype in linear_dtypes),
            *(_linear_logp_case(n, 512, v, torch.float32, True) for v in (32000, 151936) for n in (1024, 3072))]
