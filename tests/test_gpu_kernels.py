"""Every CUDA scan and Triton kernel on a GPU, at the sizes of ``rlkern bench``, against the
float64 reference: forward values and backward gradients.

- log-probs: 4096 x 151936 bfloat16 logits with entropy, also with top-k and top-k + top-p;
  the linear head at the bench's 2048 x 1024 -> 65536;
- policy losses: 256 x 4096 for every objective and option family, float32 and bfloat16;
  the KL, value, DPO and Bradley-Terry kernels;
- return scans: 4096 x 2048, float32 and bfloat16 inputs;
- ``torch.compile`` of the ops once they are registered as ``rlkern::`` custom ops.

The reference runs on the GPU in float64. The log-prob references go in row chunks (one
float64 copy of 4096 x 151936 is 5 GB, and autograd keeps several), and every comparison
is made on the device with the rule of ``helpers.assert_close`` (non-finite entries at the
same places, max |a - e| <= tol * max |e| over the whole tensor). Gradient buffers are
poisoned with NaN before each run (through the caching allocator), so an element a
kernel never wrote shows up. Skipped without CUDA; marked ``gpu``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import rlkern
from rlkern import kl as kl_mod
from rlkern import logprobs, losses
from rlkern.reference import kl as kl_ref
from rlkern.reference import logprobs as lp_ref
from rlkern.reference import losses as loss_ref
from rlkern.reference import returns as ret_ref

from helpers import GRAD_TOL, VALUE_TOL, needs_cuda

# RLKERN_GPU_TESTS_ON_CPU=1 with TRITON_INTERPRET=1 runs this module on CPU tensors at small
# sizes (Triton kernels under the interpreter, the C++ scans): the dry run of tools/gpu_check.sh
# uses it so that this code is exercised where no GPU is.
ON_CPU = os.environ.get("RLKERN_GPU_TESTS_ON_CPU") == "1" and os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if ON_CPU else "cuda"
KERNELS = "triton" if ON_CPU else "auto"  # the backend of the Triton kernels under test
SCANS = "cpu" if ON_CPU else "cuda"
pytestmark = [pytest.mark.gpu] + ([] if ON_CPU else [needs_cuda])

N_TOKENS, VOCAB = (40, 3001) if ON_CPU else (4096, 151936)
ROW_CHUNK = 16 if ON_CPU else 256
LINEAR = (40, 16, 1000) if ON_CPU else (2048, 1024, 65536)
B_LOSS, T_LOSS = (6, 300) if ON_CPU else (256, 4096)
SCAN_SHAPE = (9, 77) if ON_CPU else (4096, 2048)
PAIRS = 1100 + 77 if ON_CPU else (1 << 20) + 77


@pytest.fixture(autouse=True)
def _kernel_backend():
    with rlkern.use_backend(KERNELS):
        yield
GRAD_TOL_BY_DTYPE = {torch.float32: GRAD_TOL, torch.bfloat16: 2**-7}


# ---- comparison on the device --------------------------------------------------------------

class Close:
    """Accumulates ``helpers.assert_close``'s test over chunks of one tensor, on the device."""

    def __init__(self, name: str, tol: float):
        self.name, self.tol = name, tol
        self.diff = 0.0
        self.scale = 1e-30
        self.bad_mismatch = 0

    def add(self, actual: torch.Tensor, expected: torch.Tensor) -> None:
        assert actual.shape == expected.shape, f"{self.name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        a, e = actual.detach().double(), expected.detach().double()
        a_bad, e_bad = ~torch.isfinite(a), ~torch.isfinite(e)
        self.bad_mismatch += int((a_bad != e_bad).sum())
        both = a_bad & e_bad
        if both.any():
            self.bad_mismatch += int((a[both].nan_to_num(nan=0.0, posinf=1.0, neginf=-1.0)
                                      != e[both].nan_to_num(nan=0.0, posinf=1.0, neginf=-1.0)).sum())
        fin = ~e_bad & ~a_bad
        if fin.any():
            self.diff = max(self.diff, (a[fin] - e[fin]).abs().max().item())
            self.scale = max(self.scale, e[fin].abs().max().item())

    def check(self) -> None:
        assert self.bad_mismatch == 0, f"{self.name}: {self.bad_mismatch} non-finite entries differ"
        assert self.diff <= self.tol * self.scale, \
            f"{self.name}: max abs diff {self.diff:.3e} exceeds {self.tol:.0e} x reference max {self.scale:.3e}"


def assert_close_dev(actual, expected, tol=VALUE_TOL, name="value"):
    c = Close(name, tol)
    c.add(actual, expected)
    c.check()


def poison_next(nbytes: int, device=DEV) -> None:
    """Leaves a freed block of ``nbytes`` of NaN (all bits set) in the caching allocator,
    so the next allocation of that size (the kernel's output) starts as NaN."""
    if device != "cuda":
        return
    torch.cuda.synchronize()
    block = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=device)
    del block


# ---- log-probs ---------------------------------------------------------------------------

def _logit_inputs(N: int, V: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    logits = (torch.randn(N, V, generator=g, device=DEV) * 2).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g, device=DEV)
    g_lp = torch.randn(N, generator=g, device=DEV, dtype=torch.float64)
    g_ent = torch.randn(N, generator=g, device=DEV, dtype=torch.float64)
    return logits, targets, g_lp, g_ent


def _upstream_loss(lp, ent, g_lp, g_ent):
    # -inf log-probs (targets outside a top-k/top-p set) have no gradient by definition.
    g_lp, g_ent = g_lp.to(lp.dtype), g_ent.to(ent.dtype)
    return torch.where(torch.isfinite(lp), lp * g_lp, 0.0).sum() + (ent * g_ent).sum()


def _ambiguous_rows(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """Rows whose kept set differs between float32 (what the GPU path decides it in) and
    float64 arithmetic: a top-p boundary within rounding of the cumulative mass."""
    out = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    if top_p is None:
        return out
    for s in range(0, logits.shape[0], ROW_CHUNK):
        rows = logits[s:s + ROW_CHUNK]
        t32 = lp_ref.truncation_threshold(rows.float(), 1.0, top_k, top_p).double()
        t64 = lp_ref.truncation_threshold(rows.double(), 1.0, top_k, top_p)
        out[s:s + ROW_CHUNK] = t32 != t64
    return out


@pytest.mark.parametrize("truncation", [None, "top_k", "top_k_top_p"])
def test_token_logprobs_bench_size_bf16(truncation):
    kw = {None: {}, "top_k": dict(top_k=50), "top_k_top_p": dict(top_k=1000, top_p=0.9)}[truncation]
    logits, targets, g_lp, g_ent = _logit_inputs(N_TOKENS, VOCAB, torch.bfloat16)
    x = logits.clone().requires_grad_()
    lp, ent = logprobs.token_logprobs(x, targets, return_entropy=True, **kw)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    poison_next(x.numel() * x.element_size())
    _upstream_loss(lp, ent, g_lp, g_ent).backward()
    grad = x.grad
    assert grad.dtype == torch.bfloat16 and grad.shape == x.shape
    skip = _ambiguous_rows(logits, kw.get("top_k"), kw.get("top_p"))
    assert int(skip.sum()) <= max(2, N_TOKENS // 100), f"{int(skip.sum())} rows with a precision-dependent kept set"
    c_lp, c_ent = Close("logp", VALUE_TOL), Close("entropy", VALUE_TOL)
    c_grad = Close("grad", GRAD_TOL_BY_DTYPE[torch.bfloat16])
    for s in range(0, N_TOKENS, ROW_CHUNK):
        sl = slice(s, s + ROW_CHUNK)
        keep = ~skip[sl]
        ref_x = logits[sl].double().requires_grad_()
        r_lp, r_ent = lp_ref.token_logprobs(ref_x, targets[sl], return_entropy=True, **kw)
        _upstream_loss(r_lp, r_ent, g_lp[sl], g_ent[sl]).backward()
        c_lp.add(lp[sl][keep], r_lp.detach()[keep])
        c_ent.add(ent[sl][keep], r_ent.detach()[keep])
        c_grad.add(grad[sl][keep], ref_x.grad[keep])
        del ref_x, r_lp, r_ent
    for c in (c_lp, c_ent, c_grad):
        c.check()


def test_token_logprobs_fp32_strided_rows_and_ignored():
    """float32 logits read in place from a [B, T + 1, V] tensor (``logits[:, :-1]``), with
    ignored targets, at 2 x 1025 x 151936 (2 x 41 x 3001 on the CPU)."""
    B, T = (2, 40) if ON_CPU else (2, 1024)
    g = torch.Generator(device=DEV).manual_seed(3)
    full = torch.randn(B, T + 1, VOCAB, generator=g, device=DEV) * 3
    targets = torch.randint(0, VOCAB, (B, T), generator=g, device=DEV)
    targets[:, -7:] = -100
    x = full.clone().requires_grad_()
    lp, ent = logprobs.token_logprobs(x[:, :-1], targets, return_entropy=True, temperature=0.8)
    g_lp = torch.randn(B, T, generator=g, device=DEV, dtype=torch.float64)
    g_ent = torch.randn(B, T, generator=g, device=DEV, dtype=torch.float64)
    _upstream_loss(lp, ent, g_lp, g_ent).backward()
    assert torch.all(x.grad[:, -1] == 0)
    c = [Close("logp", VALUE_TOL), Close("entropy", VALUE_TOL), Close("grad", GRAD_TOL)]
    for b in range(B):
        for s in range(0, T, ROW_CHUNK):
            sl = slice(s, s + ROW_CHUNK)
            ref_x = full[b, :T][sl].double().requires_grad_()
            r_lp, r_ent = lp_ref.token_logprobs(ref_x, targets[b, sl], return_entropy=True, temperature=0.8)
            _upstream_loss(r_lp, r_ent, g_lp[b, sl], g_ent[b, sl]).backward()
            c[0].add(lp[b, sl], r_lp.detach())
            c[1].add(ent[b, sl], r_ent.detach())
            c[2].add(x.grad[b, :T][sl], ref_x.grad)
    for x_ in c:
        x_.check()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_token_logprobs_bench_size(dtype):
    N, H, V = LINEAR
    g = torch.Generator(device=DEV).manual_seed(5)
    hidden = torch.randn(N, H, generator=g, device=DEV).to(dtype)
    weight = (torch.randn(V, H, generator=g, device=DEV) / H**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g, device=DEV)
    g_lp = torch.randn(N, generator=g, device=DEV, dtype=torch.float64)
    g_ent = torch.randn(N, generator=g, device=DEV, dtype=torch.float64)
    # Explicit chunks, so that the reference below forms its logits with matrix products of
    # the same shapes: the same cuBLAS kernels, hence the same bf16 rounding of each logit
    # (a product of another shape may round a logit one bf16 ulp apart, 1e-3 in a logp).
    chunk_vocab = 384 if ON_CPU else 8192
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = logprobs.linear_token_logprobs(h, w, targets, return_entropy=True, chunk_tokens=ROW_CHUNK,
                                             chunk_vocab=chunk_vocab)
    _upstream_loss(lp, ent, g_lp, g_ent).backward()
    # The reference takes the logits as the kernels do (the product rounded to the inputs'
    # dtype), then float64.
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    c_lp, c_ent = Close("logp", 1e-4 if dtype == torch.bfloat16 else VALUE_TOL), Close("entropy", 1e-4)
    grad_h = torch.zeros(N, H, dtype=torch.float64, device=DEV)
    grad_w = torch.zeros(V, H, dtype=torch.float64, device=DEV)
    for s in range(0, N, ROW_CHUNK):
        sl = slice(s, s + ROW_CHUNK)
        logits = torch.cat([hidden[sl] @ weight[v0:v0 + chunk_vocab].t() for v0 in range(0, V, chunk_vocab)], 1)
        logits = logits.double().requires_grad_()
        r_lp, r_ent = lp_ref.token_logprobs(logits, targets[sl], return_entropy=True)
        _upstream_loss(r_lp, r_ent, g_lp[sl], g_ent[sl]).backward()
        c_lp.add(lp[sl], r_lp.detach())
        c_ent.add(ent[sl], r_ent.detach())
        grad_h[sl] = logits.grad @ wr.detach()
        grad_w += logits.grad.t() @ hr.detach()[sl]
    c_lp.check()
    c_ent.check()
    # bf16/fp32 matrix products of the gradient against float64 ones: tf32-free float32
    # accumulation for fp32, one bf16 rounding of the logits' gradient for bf16.
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    assert_close_dev(h.grad, grad_h, tol, "grad_hidden")
    assert_close_dev(w.grad, grad_w, tol, "grad_weight")


# ---- policy and other losses -----------------------------------------------------------------

POLICY_CONFIGS = {
    "grpo_clip_higher_k3": (("ref",), dict(clip_low=0.2, clip_high=0.28, kl_coef=0.04, kl_kind="k3")),
    "ppo_dual_clip": ((), dict(dual_clip=3.0, agg="seq-mean-token-mean")),
    "ratio_cap_log_clamp": ((), dict(clip_low=0.1, ratio_cap=1.2, log_ratio_clamp=0.25)),
    "gspo": ((), dict(level="sequence", clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean")),
    "gspo_clamp_kl_correction": (("ref",), dict(level="sequence", log_ratio_clamp=(None, 0.05), kl_coef=0.2,
                                                kl_is_correction=True)),
    "cispo_tis_entropy": (("ref", "rollout", "entropy"),
                          dict(objective="cispo", clip_low=1.0, clip_high=0.3, kl_coef=0.05, kl_kind="k1",
                               kl_is_correction=True, tis_cap=2.0, entropy_coef=0.01)),
    "cispo_sequence": ((), dict(level="sequence", objective="cispo", clip_low=0.05)),
    "reinforce_k2": (("ref",), dict(objective="reinforce", kl_coef=0.1, kl_kind="k2", agg="token-sum")),
    "tis_sequence_mask_off_policy": (("rollout",), dict(tis_cap=1.5, tis_level="sequence", tis_mode="mask",
                                                        off_policy_threshold=0.02)),
    "entropy_top_fraction": (("entropy",), dict(entropy_top_fraction=0.2, agg="seq-mean-token-sum-norm")),
    "everything_token_normalizer": (("ref", "rollout", "entropy"),
                                    dict(clip_high=0.28, dual_clip=2.5, ratio_cap=3.0, log_ratio_clamp=5.0,
                                         kl_coef=0.05, kl_kind="k3", kl_clamp=10.0, tis_cap=1.3,
                                         off_policy_threshold=0.01, entropy_coef=0.02, entropy_top_fraction=0.6,
                                         agg="seq-mean-token-sum", normalizer=300.0)),
}


def _policy_batch(B: int, T: int, seed: int, adv_per_token: bool):
    g = torch.Generator(device=DEV).manual_seed(seed)
    f64 = dict(device=DEV, dtype=torch.float64, generator=g)
    logp = -torch.rand(B, T, **f64) * 3 - 0.05
    old = logp + 0.1 * torch.randn(B, T, **f64)
    ref = logp + 0.1 * torch.randn(B, T, **f64)
    rollout = old + 0.05 * torch.randn(B, T, **f64)
    entropy = torch.rand(B, T, **f64) * 3
    adv = torch.randn((B, T) if adv_per_token else (B,), **f64)
    lengths = torch.randint(1, T + 1, (B,), device=DEV, generator=g)
    mask = torch.arange(T, device=DEV)[None, :] < lengths[:, None]
    mask &= torch.rand(B, T, device=DEV, generator=g) > 0.05
    mask[1] = False  # a sequence without active tokens
    for t in (logp, old, ref, rollout, entropy):
        t[~mask] = float("nan")  # masked positions are never read
    return dict(logp=logp, old=old, ref=ref, rollout=rollout, entropy=entropy, adv=adv, mask=mask)


def _policy_run(batch, needs, options, dtype, backend):
    """(loss output, [grad logp, grad entropy]) with inputs rounded to ``dtype``."""
    conv = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t.clone())
    logp = conv(batch["logp"]).requires_grad_()
    opts = dict(options)
    for name, key in (("ref", "ref_logp"), ("rollout", "rollout_logp")):
        if name in needs:
            opts[key] = conv(batch[name])
    if "entropy" in needs:
        opts["entropy"] = conv(batch["entropy"]).requires_grad_()
    args = (logp, conv(batch["old"]), conv(batch["adv"]), batch["mask"])
    with rlkern.use_backend(backend):
        out = losses.policy_loss(*args, **opts)
    leaves = [logp] + ([opts["entropy"]] if "entropy" in opts else [])
    grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
    return out, [torch.zeros_like(l) if g is None else g for l, g in zip(leaves, grads)], args, opts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(POLICY_CONFIGS))
def test_policy_loss_bench_size(name, dtype):
    needs, options = POLICY_CONFIGS[name]
    batch = _policy_batch(B_LOSS, T_LOSS, seed=len(name), adv_per_token=name.startswith("reinforce"))
    poison_next(B_LOSS * T_LOSS * dtype.itemsize)
    out, grads, args, opts = _policy_run(batch, needs, options, dtype, KERNELS)
    assert out.loss.dtype == torch.float32 and grads[0].dtype == dtype
    # The reference gets the same rounded values, upcast.
    up = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in dict(logp=args[0].detach(), old=args[1], adv=args[2], mask=args[3], ref=opts.get("ref_logp"),
                           rollout=opts.get("rollout_logp"),
                           entropy=None if "entropy" not in opts else opts["entropy"].detach()).items()}
    up = {k: v for k, v in up.items() if v is not None}
    expected, expected_grads, _, _ = _policy_run(up, needs, options, None, "reference")
    grad_tol = GRAD_TOL if dtype == torch.float32 else 1e-2
    assert_close_dev(out.loss, expected.loss, VALUE_TOL, "loss")
    assert set(out.metrics) == set(expected.metrics)
    for k in expected.metrics:
        assert_close_dev(out.metrics[k], expected.metrics[k], VALUE_TOL, f"metric {k}")
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        m = batch["mask"]
        assert torch.isfinite(g).all(), f"grad {i}: non-finite (unwritten or NaN leaked from masked positions)"
        assert torch.all(g[~m] == 0), f"grad {i}: masked positions must get zero gradient"
        assert_close_dev(g, e, grad_tol, f"grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,clamp", [("k1", None), ("k2", 0.5), ("k3", (None, 0.3))])
def test_kl_penalty_bench_size(kind, clamp, dtype):
    g = torch.Generator(device=DEV).manual_seed(7)
    logp = (-torch.rand(B_LOSS, T_LOSS, device=DEV, generator=g, dtype=torch.float64) * 3).to(dtype)
    refp = (logp.double() + 0.3 * torch.randn(B_LOSS, T_LOSS, device=DEV, generator=g,
                                              dtype=torch.float64)).to(dtype)
    x = logp.clone().requires_grad_()
    out = kl_mod.kl_penalty(x, refp, kind, clamp)
    up = torch.randn(out.shape, device=DEV, generator=g, dtype=torch.float64)
    (out * up.to(out.dtype)).sum().backward()
    xr = logp.double().requires_grad_()
    expected = kl_ref.kl_penalty(xr, refp.double(), kind, clamp)
    (expected * up).sum().backward()
    assert_close_dev(out, expected, VALUE_TOL, "kl")
    assert_close_dev(x.grad, xr.grad, GRAD_TOL if dtype == torch.float32 else 1e-2, "grad")


@pytest.mark.parametrize("clip,agg", [(None, "token-mean"), (0.2, "seq-mean-token-mean")])
def test_value_loss_bench_size(clip, agg):
    g = torch.Generator(device=DEV).manual_seed(8)
    shape = (B_LOSS, T_LOSS)
    v = torch.randn(shape, device=DEV, generator=g)
    v_old = v + 0.3 * torch.randn(shape, device=DEV, generator=g)
    ret = torch.randn(shape, device=DEV, generator=g)
    mask = torch.rand(shape, device=DEV, generator=g) < 0.8
    x = v.clone().requires_grad_()
    out = losses.value_loss(x, v_old, ret, mask, clip=clip, agg=agg)
    out.loss.backward()
    xr = v.double().requires_grad_()
    expected = loss_ref.value_loss(xr, v_old.double(), ret.double(), mask, clip=clip, agg=agg)
    expected.loss.backward()
    assert_close_dev(out.loss, expected.loss, VALUE_TOL, "loss")
    for k in expected.metrics:
        assert_close_dev(out.metrics[k], expected.metrics[k], VALUE_TOL, k)
    assert_close_dev(x.grad, xr.grad, GRAD_TOL, "grad")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_and_bradley_terry_many_pairs(loss_type):
    B = PAIRS  # many blocks of pairs, with a ragged last block
    g = torch.Generator(device=DEV).manual_seed(9)
    c, r, rc, rr = (-torch.rand(B, device=DEV, generator=g) * 50 for _ in range(4))
    xc, xr_ = c.clone().requires_grad_(), r.clone().requires_grad_()
    out = losses.dpo_loss(xc, xr_, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=0.1
                          if loss_type == "sigmoid" else 0.0)
    out.loss.backward()
    ec, er = c.double().requires_grad_(), r.double().requires_grad_()
    expected = loss_ref.dpo_loss(ec, er, rc.double(), rr.double(), beta=0.1, loss_type=loss_type,
                                 label_smoothing=0.1 if loss_type == "sigmoid" else 0.0)
    expected.loss.backward()
    assert_close_dev(out.loss, expected.loss, VALUE_TOL, "dpo loss")
    for k in expected.metrics:
        assert_close_dev(out.metrics[k], expected.metrics[k], VALUE_TOL, k)
    assert_close_dev(xc.grad, ec.grad, GRAD_TOL, "dpo grad chosen")
    assert_close_dev(xr_.grad, er.grad, GRAD_TOL, "dpo grad rejected")
    margin = torch.rand(B, device=DEV, generator=g)
    xc, xr_ = c.clone().requires_grad_(), r.clone().requires_grad_()
    out = losses.bradley_terry_loss(xc, xr_, margin)
    out.loss.backward()
    ec, er = c.double().requires_grad_(), r.double().requires_grad_()
    expected = loss_ref.bradley_terry_loss(ec, er, margin.double())
    expected.loss.backward()
    assert_close_dev(out.loss, expected.loss, VALUE_TOL, "bt loss")
    assert_close_dev(xc.grad, ec.grad, GRAD_TOL, "bt grad")


# ---- return scans --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scans_bench_size(dtype):
    B, T = SCAN_SHAPE
    g = torch.Generator(device=DEV).manual_seed(11)
    r, v, nv = (torch.randn(B, T, device=DEV, generator=g).to(dtype) for _ in range(3))
    term = torch.rand(B, T, device=DEV, generator=g) < 0.01
    trunc = (torch.rand(B, T, device=DEV, generator=g) < 0.005) & ~term
    mask = torch.rand(B, T, device=DEV, generator=g) < 0.9
    boot = torch.randn(B, device=DEV, generator=g).to(dtype)
    f = lambda x: x.double()  # noqa: E731
    out_bytes = B * T * 4
    with rlkern.use_backend(SCANS):
        poison_next(out_bytes)
        out = rlkern.discounted_returns(r, term, 0.99, bootstrap=boot)
        assert_close_dev(out, ret_ref.discounted_returns(f(r), term, 0.99, f(boot)), VALUE_TOL, "discounted")
        poison_next(out_bytes)
        adv, ret = rlkern.gae(r, v, term, 0.99, 0.95, next_values=nv, truncated=trunc)
        eadv, eret = ret_ref.gae(f(r), f(v), term, 0.99, 0.95, next_values=f(nv), truncated=trunc)
        assert_close_dev(adv, eadv, VALUE_TOL, "gae adv")
        assert_close_dev(ret, eret, VALUE_TOL, "gae ret")
        adv, _ = rlkern.gae(r, v, term, 0.99, 0.95, bootstrap_value=boot)
        assert_close_dev(adv, ret_ref.gae(f(r), f(v), term, 0.99, 0.95, bootstrap_value=f(boot))[0], VALUE_TOL,
                         "gae bootstrap")
        poison_next(out_bytes)
        out = rlkern.lambda_returns(r, nv, term, 0.99, 0.9, truncated=trunc)
        assert_close_dev(out, ret_ref.lambda_returns(f(r), f(nv), term, 0.99, 0.9, truncated=trunc), VALUE_TOL,
                         "lambda")
        poison_next(out_bytes)
        adv, ret = rlkern.masked_gae(r, v, mask, 1.0, 0.95)
        eadv, eret = ret_ref.masked_gae(f(r), f(v), mask, 1.0, 0.95)
        assert_close_dev(adv, eadv, VALUE_TOL, "masked_gae adv")
        assert_close_dev(ret, eret, VALUE_TOL, "masked_gae ret")
        # out= buffers reused across calls, as a training loop keeps them.
        bufs = (torch.full((B, T), math.nan, device=DEV), torch.full((B, T), math.nan, device=DEV))
        rlkern.gae(r, v, term, 0.99, 0.95, out=bufs)
        eadv, eret = ret_ref.gae(f(r), f(v), term, 0.99, 0.95)
        assert_close_dev(bufs[0], eadv, VALUE_TOL, "gae out= adv")
        assert_close_dev(bufs[1], eret, VALUE_TOL, "gae out= ret")


# ---- torch.compile once the ops are custom ops ---------------------------------------------

def _custom_ops():
    try:
        names = torch._C._dispatch_get_all_op_names()
    except AttributeError:
        return set()
    return {n.split("::", 1)[1].split(".")[0] for n in names if n.startswith("rlkern::")}


def _compile_case(op: str):
    """(function, inputs) of one op at a mid size; gradients flow to the first input."""
    g = torch.Generator(device=DEV).manual_seed(12)
    if op == "token_logprobs":
        x = torch.randn(512, 32000, device=DEV, generator=g).to(torch.bfloat16)
        t = torch.randint(0, 32000, (512,), device=DEV, generator=g)
        return (lambda x: sum(o.sum() for o in logprobs.token_logprobs(x, t, return_entropy=True, top_k=40))), x
    if op == "policy_loss":
        b = _policy_batch(64, 512, seed=1, adv_per_token=False)
        return (lambda lp: losses.policy_loss(lp, b["old"].float(), b["adv"].float(), b["mask"],
                                              ref_logp=b["ref"].float(), kl_coef=0.04).loss), b["logp"].float()
    if op == "gae":
        r = torch.randn(64, 512, device=DEV, generator=g)
        v = torch.randn(64, 512, device=DEV, generator=g)
        d = torch.rand(64, 512, device=DEV, generator=g) < 0.05
        return (lambda r: sum(o.sum() for o in rlkern.gae(r, v, d, 0.99, 0.95))), r
    raise KeyError(op)


@pytest.mark.parametrize("op", ["token_logprobs", "policy_loss", "gae"])
def test_torch_compile_of_custom_ops_matches_eager(op):
    if ON_CPU:
        pytest.skip("torch.compile of the CUDA path: GPU only")
    if op not in _custom_ops():
        pytest.skip(f"rlkern::{op} is not a registered custom op in this build")
    fn, x = _compile_case(op)
    eager_x = x.detach().clone().requires_grad_(x.is_floating_point() and op != "gae")
    comp_x = x.detach().clone().requires_grad_(eager_x.requires_grad)
    expected = fn(eager_x)
    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(comp_x)
    assert_close_dev(got, expected, VALUE_TOL, f"{op} compiled value")
    if eager_x.requires_grad:
        expected.backward()
        got.backward()
        assert_close_dev(comp_x.grad, eager_x.grad, GRAD_TOL_BY_DTYPE.get(x.dtype, GRAD_TOL), f"{op} compiled grad")
