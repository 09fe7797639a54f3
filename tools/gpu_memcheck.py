"""A short run of every rlkern GPU kernel, for ``compute-sanitizer --tool memcheck``.

tools/gpu_check.sh runs it as

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tools/gpu_memcheck.py

Without torch's caching allocator each tensor is its own cudaMalloc, so an access past a
tensor's end lands outside any allocation and memcheck sees it (inside a cached block it
would not). Shapes are small but ragged: rows that are not a multiple of a warp or block,
batches that leave a partial block of warps, vocabularies that are not a multiple of the
Triton block, a strided view of the logits, ignored targets, masked tokens. Prints one
line per kernel family and "memcheck run: ok" at the end; checks values only loosely (the
GPU tests compare against the reference).

``python tools/gpu_memcheck.py cpu`` runs the same calls on the CPU (the C++ core for the
scans, Triton's interpreter for the rest when TRITON_INTERPRET=1): the dry run on machines
without a GPU, so that this script cannot rot unnoticed.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch


def main(argv) -> int:
    dev = torch.device(argv[0] if argv else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("memcheck run: no CUDA device")
        return 2
    import rlkern
    from rlkern import kl, logprobs, losses

    scan_backend = "cuda" if dev.type == "cuda" else "cpu"
    if dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") != "1":
        kernels = contextlib.nullcontext  # the GPU's Triton kernels, or the C++ core on the CPU
    else:
        kernels = lambda: rlkern.use_backend("triton")  # noqa: E731
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=dev, generator=g).to(dtype)

    # CUDA return scans: every kernel, each storage dtype, ragged B and T.
    with rlkern.use_backend(scan_backend):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for B, T in ((1, 1), (5, 77), (9, 33)):
                r, v, nv = randn(B, T, dtype=dtype), randn(B, T, dtype=dtype), randn(B, T, dtype=dtype)
                term = torch.rand(B, T, device=dev, generator=g) < 0.1
                trunc = (torch.rand(B, T, device=dev, generator=g) < 0.1) & ~term
                mask = torch.rand(B, T, device=dev, generator=g) < 0.7
                boot = randn(B, dtype=dtype)
                rlkern.discounted_returns(r, term, 0.99, bootstrap=boot)
                rlkern.gae(r, v, term, 0.99, 0.95, next_values=nv, truncated=trunc)
                rlkern.gae(r, v, term, 0.99, 0.95, bootstrap_value=boot)
                rlkern.lambda_returns(r, nv, term, 0.99, 0.9, truncated=trunc)
                rlkern.masked_gae(r, v, mask, 1.0, 0.95)
                # a non-contiguous row view and an out= pair of slices of one buffer
                wide = randn(B, 2 * T, dtype=dtype)
                out = torch.empty(2, B, T, device=dev, dtype=torch.float64 if dtype == torch.float64 else
                                  torch.float32)
                rlkern.gae(wide[:, ::2], v, term, 0.99, 0.95, out=(out[0], out[1]))
    sync()
    print("scans: ok", flush=True)
    with kernels():
        run_kernels(dev, g, randn, logprobs, losses, kl)
    print("memcheck run: ok", flush=True)
    return 0


def run_kernels(dev, g, randn, logprobs, losses, kl) -> None:

    # Triton log-probs: forward and backward, with and without entropy and truncation.
    for dtype in (torch.float32, torch.bfloat16):
        for N, V in ((3, 1), (7, 5003), (5, 4096)):
            x = (randn(N, V, dtype=dtype) * 2).requires_grad_()
            t = torch.randint(0, V, (N,), device=dev, generator=g)
            t[0] = -100
            lp, ent = logprobs.token_logprobs(x, t, return_entropy=True, temperature=0.7)
            (torch.where(torch.isfinite(lp), lp, 0.0).sum() + ent.sum()).backward()
            x.grad = None
            lp = logprobs.token_logprobs(x, t, top_k=min(3, V), top_p=0.8)
            torch.where(torch.isfinite(lp), lp, 0.0).sum().backward()
        full = randn(2, 9, 3001, dtype=dtype).requires_grad_()
        tgt = torch.randint(0, 3001, (2, 8), device=dev, generator=g)
        lp, ent = logprobs.token_logprobs(full[:, :-1], tgt, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
        h = randn(37, 24, dtype=dtype).requires_grad_()
        w = randn(1000, 24, dtype=dtype).requires_grad_()
        lp, ent = logprobs.linear_token_logprobs(h, w, torch.randint(0, 1000, (37,), device=dev, generator=g),
                                                 return_entropy=True, chunk_tokens=16, chunk_vocab=384)
        (lp.sum() + ent.sum()).backward()
    sync()
    print("logprobs: ok", flush=True)

    # Triton losses: the policy kernel's main variants, KL, value, DPO, Bradley-Terry.
    for dtype in (torch.float32, torch.bfloat16):
        for B, T in ((3, 1), (5, 1500)):
            logp = (-torch.rand(B, T, device=dev, generator=g) * 3).to(dtype).requires_grad_()
            old = (logp.detach().float() + 0.1 * randn(B, T)).to(dtype)
            ref = (logp.detach().float() + 0.1 * randn(B, T)).to(dtype)
            roll = (old.float() + 0.05 * randn(B, T)).to(dtype)
            ent = (torch.rand(B, T, device=dev, generator=g) * 3).to(dtype).requires_grad_()
            adv = randn(B)
            mask = torch.rand(B, T, device=dev, generator=g) < 0.8
            for opts in (dict(ref_logp=ref, kl_coef=0.04, clip_high=0.28),
                         dict(level="sequence", clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean"),
                         dict(objective="cispo", rollout_logp=roll, tis_cap=2.0, entropy=ent, entropy_coef=0.01,
                              ref_logp=ref, kl_coef=0.05, kl_kind="k1", kl_is_correction=True),
                         dict(entropy=ent, entropy_top_fraction=0.3, dual_clip=3.0)):
                losses.policy_loss(logp, old, adv, mask, **opts).loss.backward()
            kl.kl_penalty(logp, ref, "k3", (None, 1.0)).sum().backward()
            v = randn(B, T, dtype=dtype).requires_grad_()
            losses.value_loss(v, randn(B, T, dtype=dtype), randn(B, T, dtype=dtype), mask, clip=0.2).loss.backward()
        for P in (1, 1025):
            c, r = randn(P).requires_grad_(), randn(P).requires_grad_()
            losses.dpo_loss(c, r, randn(P), randn(P), beta=0.1).loss.backward()
            losses.bradley_terry_loss(c, r, randn(P)).loss.backward()
    sync()
    print("losses: ok", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
