"""The bytes-moved model of each benchmarked op, and the copy bandwidth it is measured against.

For every op ``rlkern bench`` times on a GPU, :func:`model_for` gives the fewest bytes any
implementation must move through device memory (each input read once, each output written
once, at the dtypes the benchmark uses) and, for ops with a matrix product, the fewest
floating-point operations. A time then turns into an achieved bandwidth (model bytes /
time), and that into a fraction of the device-to-device copy bandwidth measured in the
same run (:func:`copy_bandwidth`, bytes read plus bytes written). The model counts what the
*op* must move, not what a given kernel moves: rlkern's log-prob kernels read the logits
twice (forward and backward), so their ceiling is two thirds of the copy bandwidth, and a
competitor that writes float32 intermediates shows as a lower fraction.

The model is keyed by the benchmark cases' ``suite``, ``op`` and ``shape`` strings (parsed
here, so the suite modules need no extra fields); tests/test_gpu_bench.py fails when a GPU
case has no model.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
import time
from typing import Dict, Iterable, List, NamedTuple, Optional

import torch

from .core import Case, Result

_DTYPE_BYTES = {"f32": 4, "fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
                "f64": 8, "float64": 8}


class Model(NamedTuple):
    """Fewest bytes to move and fewest floating-point operations (0 when not matrix-bound)."""

    bytes: float
    flops: float = 0.0
    note: str = ""


# ---- per-op models (also usable directly) -------------------------------------------------

SCAN_IO = {
    # op: (float inputs, flag inputs, float32 outputs)
    "discounted_returns": (1, 1, 1),
    "gae": (2, 1, 2),
    "lambda_returns": (2, 1, 1),
    "masked_gae": (2, 1, 2),
}


def scan_bytes(op: str, B: int, T: int, itemsize: int = 4) -> float:
    """A return scan: each float input (``itemsize``) and bool flag (1 byte) read once, each
    output written once (float32, float64 for float64 inputs)."""
    floats, flags, outs = SCAN_IO[op]
    out_size = 8 if itemsize == 8 else 4
    return float(B * T * (floats * itemsize + flags + outs * out_size))


def policy_loss_bytes(B: int, T: int, itemsize: int, *, ref: bool, adv_per_token: bool = False) -> float:
    """policy_loss forward + backward: logp, old_logp (and ref_logp) read once, the bool mask
    read once, advantages read once, the gradient of logp written once (in logp's dtype)."""
    per_token = (2 + int(ref)) * itemsize + 1 + itemsize
    adv = B * T * 4 if adv_per_token else B * 4
    return float(B * T * per_token + adv)


def whiten_bytes(B: int, T: int, itemsize: int) -> float:
    """masked_whiten: the values and the bool mask read once, the output written once in the
    values' dtype. The statistics need a pass of their own, so a two-pass kernel reads the
    inputs twice and tops out near two thirds of this model's ceiling."""
    return float(B * T * (2 * itemsize + 1))


def token_logprobs_bytes(N: int, V: int, itemsize: int, *, backward: bool = True, entropy: bool = True) -> float:
    """token_logprobs: the logits read once, int64 targets read once, logp (and entropy)
    written in float32; with backward, the logits' gradient written once in their dtype."""
    nbytes = N * V * itemsize + N * 8 + N * 4 * (1 + int(entropy))
    if backward:
        nbytes += N * V * itemsize
    return float(nbytes)


def linear_logprobs_model(N: int, H: int, V: int, itemsize: int) -> Model:
    """linear_token_logprobs forward + backward: hidden and weight read, their gradients
    written, targets read; 2NHV flops forward and 4NHV backward (grad_hidden and
    grad_weight), with no recomputation counted: this op is bound by the matrix units."""
    nbytes = 2 * (N * H + V * H) * itemsize + N * 8 + N * 8
    return Model(float(nbytes), float(6 * N * H * V), "matmul-bound: compare TFLOP/s, not GB/s")


# ---- parsing the benchmark cases -----------------------------------------------------------

def _dims(text: str) -> List[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _itemsize(text: str, default: int = 4) -> int:
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        if word in _DTYPE_BYTES:
            return _DTYPE_BYTES[word]
    return default


def _named(shape: str) -> Dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"([A-Za-z]+)=(\d+)", shape)}


def model_for(case: Case) -> Optional[Model]:
    """The model of a benchmark case, or None for ops it does not cover (MCTS on the CPU,
    whole training steps)."""
    op, shape = case.op, case.shape
    if case.suite == "returns" and op in SCAN_IO:
        B, T = _dims(shape)[:2]
        return Model(scan_bytes(op, B, T, _itemsize(shape)))
    if case.suite == "losses" and op.startswith("policy_loss"):
        B, T = _dims(shape)[:2]
        return Model(policy_loss_bytes(B, T, _itemsize(op), ref=" grpo " in f" {op} "))
    if case.suite == "losses" and op.startswith("masked_whiten"):
        B, T = _dims(shape)[:2]
        return Model(whiten_bytes(B, T, _itemsize(op)))
    if case.suite == "logprobs" and op.startswith("token_logprobs"):
        N, V = _dims(shape)[:2]
        return Model(token_logprobs_bytes(N, V, _itemsize(shape), entropy="+entropy" in op))
    if case.suite == "logprobs" and op.startswith("linear_token_logprobs"):
        N, H, V = _dims(shape)[:3]
        return linear_logprobs_model(N, H, V, _itemsize(shape))
    if case.suite == "gpu":
        d = _named(shape)
        size = _itemsize(shape)
        if op.startswith("token_logprobs"):
            return Model(token_logprobs_bytes(d["N"], d["V"], size, entropy="+entropy" in op))
        if op.startswith("linear_token_logprobs") or op.startswith("linear_grpo"):
            N = d.get("N", d.get("B", 1) * d.get("T", 1))
            m = linear_logprobs_model(N, d["H"], d["V"], size)
            if op.startswith("linear_grpo"):
                # plus the loss's own inputs: old and ref log-probs (float32), mask, advantages
                m = m._replace(bytes=m.bytes + N * (4 + 4 + 1) + d.get("B", 1) * 4)
            return m
    return None


# ---- the ceiling --------------------------------------------------------------------------

def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes per second), counting the bytes
    read plus the bytes written: the median of ``repeats`` timed copies of ``nbytes`` after
    warm-up. The buffer is several times any L2 (1 GiB on a GPU, 128 MiB on the CPU, where
    the result is the memory bandwidth one thread of torch's copy reaches) and holds
    random data, not zeros."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = []
    if device.type == "cuda":
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
    else:
        dst.copy_(src)
        for _ in range(max(3, repeats // 4)):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times) / 1e9


def annotate(case: Case, results: Iterable[Result], copy_gbps: Optional[float]) -> List[Result]:
    """Fills ``Result.roofline`` (model bytes and flops, achieved GB/s and TFLOP/s, fraction
    of the copy bandwidth) for every result of ``case`` that ran."""
    results = list(results)
    model = model_for(case)
    if model is None:
        return results
    for r in results:
        if r.error is not None or not (r.median_ms > 0) or math.isnan(r.median_ms):
            continue
        seconds = r.median_ms / 1e3
        gbps = model.bytes / seconds / 1e9
        r.roofline = {"bytes": model.bytes, "gbps": gbps,
                      "copy_fraction": gbps / copy_gbps if copy_gbps else None,
                      "flops": model.flops or None, "tflops": model.flops / seconds / 1e12 if model.flops else None}
    return results


def print_table(results: List[Result], copy_gbps: Optional[float], file=None) -> None:
    """One line per timed implementation of a modelled op: achieved GB/s, the fraction of
    the measured copy bandwidth, and TFLOP/s for matrix-bound ops."""
    rows = [r for r in results if getattr(r, "roofline", None)]
    if not rows:
        return
    out = file or sys.stdout
    head = f"bandwidth against the bytes-moved model (copy: {copy_gbps:,.0f} GB/s read+write)" if copy_gbps \
        else "bandwidth against the bytes-moved model"
    print(head, file=out)
    widths = (44, 28, 34)
    for r in rows:
        m = r.roofline
        frac = f"{100 * m['copy_fraction']:5.1f}% of copy" if m.get("copy_fraction") is not None else ""
        flops = f"  {m['tflops']:.1f} TFLOP/s" if m.get("tflops") else ""
        print(f"  {(r.suite + '/' + r.op)[:widths[0]]:<{widths[0]}} {r.shape[:widths[1]]:<{widths[1]}} "
              f"{r.impl[:widths[2]]:<{widths[2]}} {m['gbps']:9.1f} GB/s  {frac}{flops}", file=out)
