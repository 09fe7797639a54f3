"""Triton kernels of the return scans: discounted returns, GAE, TD(lambda) and token-level
(masked) GAE, for CUDA tensors on any driver Triton supports (and for CPU tensors under
``TRITON_INTERPRET=1``).

They compute what the CPU and CUDA C++ kernels compute (``csrc/include/rlkern/returns.h``
holds the formulation, commented): each step is an affine map y_t = b_t + a_t * y_{t+1},
a_t = 0 marking a cut (episode boundary, or a zero discount) behind which nothing is
read, and a product of nonzero coefficients is held at the smallest normal number at
least, so it is never taken for a cut nor multiplies an infinite carry into NaN.

One program scans one row backwards in tiles of BLOCK steps, the first tile ending at T.
In a tile, a reverse ``tl.associative_scan`` composes each step's map with the maps of the
later steps of the tile, and applying the result to the carry (the output just right of
the tile) gives every output of the tile at once. A tile that would start before step 0
holds identity maps there, which sit before every valid step and change nothing.

Arguments follow the CUDA path's conventions (``rlkern.returns._run_scan``): floating
inputs share one dtype and are contiguous ``[B, T]`` rows (``bootstrap`` ``[B]``), flags
are contiguous bool ``[B, T]``, outputs contiguous float32 (float64 for float64 inputs).
float32, bfloat16 and float16 inputs compute in float32, float64 in float64; gamma and
lam arrive as float64 scalars, rounded to the arithmetic type as the C++ ``Scan`` does.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .aot import AotSpec

MAX_BLOCK = 256

_FLT_MIN = 1.1754943508222875e-38  # smallest normal float32
_DBL_MIN = 2.2250738585072014e-308  # smallest normal float64


@triton.jit
def _compose(later_a, later_b, a, b):
    # A reverse scan hands the combine function the maps of the later steps (already
    # composed) first, then the map of the earlier step: the result is "this step, then
    # the later ones", returns.h's compose(f = (a, b), g = later). A cut in either keeps
    # the coefficient 0; any other product stays at least the smallest normal number.
    # (The smallest normal number is spelt out here: a nested jit call would cost the
    # interpreter, which calls this once per element, about as much as the rest.)
    cut = a == 0
    prod = a * later_a
    if prod.dtype == tl.float64:
        tiny = 2.2250738585072014e-308
    else:
        tiny = 1.1754943508222875e-38
    kept = tl.where(prod < tiny, tiny, prod)
    new_a = tl.where(cut | (later_a == 0), 0.0, kept)
    new_b = tl.where(cut, b, b + a * later_b)
    return new_a, new_b


@triton.jit
def _first_set(later_has, later_value, has, value):
    # The value of the leftmost set entry: this step's own when it is set.
    return tl.where(has != 0, has, later_has), tl.where(has != 0, value, later_value)


@triton.jit
def _scan_tile(a, b, carry):
    """Every output of a tile: the composed maps applied to the carry from the right
    (a cut composes to a = 0 and never reads the carry, NaN or not)."""
    comp_a, comp_b = tl.associative_scan((a, b), 0, _compose, reverse=True)
    return tl.where(comp_a == 0, comp_b, comp_b + comp_a * carry)


@triton.jit
def _first(x, k):
    """The tile's first entry (step t0) as a scalar: the carry of the tile on the left."""
    return tl.sum(tl.where(k == 0, x, 0.0), 0)


@triton.jit
def _discounted_kernel(R, DONE, BOOT, OUT, T, gamma: tl.float64, HAS_BOOT: tl.constexpr, COMPUTE: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    k = tl.arange(0, BLOCK)
    g = tl.full([BLOCK], gamma, COMPUTE)
    if HAS_BOOT:
        carry = tl.load(BOOT + row).to(COMPUTE)
    else:
        carry = tl.zeros([], COMPUTE)
    for i in range(0, tl.cdiv(T, BLOCK)):
        t = T - (i + 1) * BLOCK + k
        valid = t >= 0
        r = tl.load(R + base + t, mask=valid, other=0.0).to(COMPUTE)
        done = tl.load(DONE + base + t, mask=valid, other=0) != 0
        # G_t = r_t + gamma * (1 - done_t) * G_{t+1}; an identity map before step 0.
        a = tl.where(valid, tl.where(done, 0.0, g), 1.0)
        y = _scan_tile(a, r, carry)
        tl.store(OUT + base + t, y, mask=valid)
        carry = _first(y, k)


@triton.jit
def _gae_kernel(R, V, NV, BOOT, TERM, TRUNC, ADV, RET, T, gamma: tl.float64, gamma_lam: tl.float64,
                HAS_NEXT: tl.constexpr, HAS_BOOT: tl.constexpr, HAS_TRUNC: tl.constexpr, COMPUTE: tl.constexpr,
                BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    k = tl.arange(0, BLOCK)
    g = tl.full([BLOCK], gamma, COMPUTE)
    gl = tl.full([BLOCK], gamma_lam, COMPUTE)
    if HAS_BOOT:
        boot = tl.load(BOOT + row).to(COMPUTE)
    else:
        boot = tl.zeros([], COMPUTE)
    carry = tl.zeros([], COMPUTE)
    for i in range(0, tl.cdiv(T, BLOCK)):
        t = T - (i + 1) * BLOCK + k
        valid = t >= 0
        r = tl.load(R + base + t, mask=valid, other=0.0).to(COMPUTE)
        v = tl.load(V + base + t, mask=valid, other=0.0).to(COMPUTE)
        if HAS_NEXT:
            nv = tl.load(NV + base + t, mask=valid, other=0.0).to(COMPUTE)
        else:
            # V'_t = V_{t+1}, the bootstrap value after the row's last step (the shifted
            # load mostly hits the cache lines of this tile's own load).
            nxt = t + 1
            nv = tl.load(V + base + nxt, mask=valid & (nxt < T), other=0.0).to(COMPUTE)
            nv = tl.where(nxt == T, boot, nv)
        term = tl.load(TERM + base + t, mask=valid, other=0) != 0
        done = term
        if HAS_TRUNC:
            done = done | (tl.load(TRUNC + base + t, mask=valid, other=0) != 0)
        delta = tl.where(term, r - v, r + g * nv - v)
        a = tl.where(valid, tl.where(done, 0.0, gl), 1.0)
        b = tl.where(valid, delta, 0.0)
        y = _scan_tile(a, b, carry)
        tl.store(ADV + base + t, y, mask=valid)
        tl.store(RET + base + t, y + v, mask=valid)
        carry = _first(y, k)


@triton.jit
def _lambda_kernel(R, NV, TERM, TRUNC, OUT, T, gamma: tl.float64, lam: tl.float64, gamma_lam: tl.float64,
                   HAS_TRUNC: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    k = tl.arange(0, BLOCK)
    g = tl.full([BLOCK], gamma, COMPUTE)
    gl = tl.full([BLOCK], gamma_lam, COMPUTE)
    g1l = g * (1.0 - tl.full([BLOCK], lam, COMPUTE))
    carry = tl.zeros([], COMPUTE)
    for i in range(0, tl.cdiv(T, BLOCK)):
        t = T - (i + 1) * BLOCK + k
        valid = t >= 0
        r = tl.load(R + base + t, mask=valid, other=0.0).to(COMPUTE)
        nv = tl.load(NV + base + t, mask=valid, other=0.0).to(COMPUTE)
        term = tl.load(TERM + base + t, mask=valid, other=0) != 0
        # c_t = 0 (bootstrap from V'_t alone) where the episode is truncated after t or
        # t is the row's last step.
        cut = t == T - 1
        if HAS_TRUNC:
            cut = cut | (tl.load(TRUNC + base + t, mask=valid, other=0) != 0)
        a = tl.where(valid, tl.where(term | cut, 0.0, gl), 1.0)
        b = tl.where(term, r, tl.where(cut, r + g * nv, r + g1l * nv))
        b = tl.where(valid, b, 0.0)
        y = _scan_tile(a, b, carry)
        tl.store(OUT + base + t, y, mask=valid)
        carry = _first(y, k)


@triton.jit
def _masked_gae_kernel(R, V, MASK, ADV, RET, T, gamma: tl.float64, gamma_lam: tl.float64, COMPUTE: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    k = tl.arange(0, BLOCK)
    g = tl.full([BLOCK], gamma, COMPUTE)
    gl = tl.full([BLOCK], gamma_lam, COMPUTE)
    carry = tl.zeros([], COMPUTE)
    # The value of the first unmasked token right of the tile (0 after the row's last).
    value_after = tl.zeros([], COMPUTE)
    for i in range(0, tl.cdiv(T, BLOCK)):
        t = T - (i + 1) * BLOCK + k
        valid = t >= 0
        unmasked = tl.load(MASK + base + t, mask=valid, other=0) != 0
        # Masked tokens are never read (their inputs may be NaN).
        r = tl.load(R + base + t, mask=unmasked, other=0.0).to(COMPUTE)
        v = tl.load(V + base + t, mask=unmasked, other=0.0).to(COMPUTE)
        # V_next(t), the value of the first unmasked token strictly after t: a reverse
        # scan keeping the leftmost unmasked entry over the tile shifted by one step
        # (its last entry would be the next tile's first: left out, value_after has it).
        s = t + 1
        inside = (k < BLOCK - 1) & (s >= 0)
        s_unmasked = tl.load(MASK + base + s, mask=inside, other=0) != 0
        s_value = tl.load(V + base + s, mask=s_unmasked, other=0.0).to(COMPUTE)
        has, first = tl.associative_scan((s_unmasked.to(tl.int32), s_value), 0, _first_set, reverse=True)
        nv = tl.where(has != 0, first, value_after)
        # Masked tokens are identity maps: the recurrence links unmasked neighbours.
        a = tl.where(unmasked, gl, 1.0)
        b = tl.where(unmasked, r + g * nv - v, 0.0)
        y = _scan_tile(a, b, carry)
        tl.store(ADV + base + t, tl.where(unmasked, y, 0.0), mask=valid)
        tl.store(RET + base + t, tl.where(unmasked, y + v, 0.0), mask=valid)
        carry = _first(y, k)
        value_after = _first(tl.where(unmasked, v, nv), k)


# --- launchers ---------------------------------------------------------------------------


def block_for(T: int) -> int:
    """Steps per tile: the row's length rounded up to a power of two, 32 to MAX_BLOCK
    (short rows waste no lanes on identity maps; long ones take several tiles)."""
    return min(MAX_BLOCK, max(32, triton.next_power_of_2(T)))


def _warps(block: int) -> int:
    return max(1, block // 128)


def coefficient(c: float, double: bool) -> float:
    """gamma, or gamma * lam, in the arithmetic type (returns a float64 holding it): 0
    stays 0 (a cut), any other value is held at the smallest normal number at least, as
    returns.h's ``coefficient`` does."""
    if c == 0.0:
        return 0.0
    if double:
        return max(c, _DBL_MIN)
    return max(float(torch.tensor(c, dtype=torch.float32)), _FLT_MIN)


def _arith(dtype: torch.dtype) -> tuple:
    double = dtype == torch.float64
    return double, (tl.float64 if double else tl.float32)


def _on_device(t: torch.Tensor):
    """Triton launches on the current device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def discounted_returns(rewards: torch.Tensor, dones: torch.Tensor, bootstrap: Optional[torch.Tensor], gamma: float,
                       out: torch.Tensor) -> None:
    B, T = rewards.shape
    if B == 0 or T == 0:
        return
    double, compute = _arith(rewards.dtype)
    block = block_for(T)
    with _on_device(rewards):
        _discounted_kernel[(B,)](rewards, dones, bootstrap if bootstrap is not None else rewards, out, T,
                                 coefficient(gamma, double), HAS_BOOT=bootstrap is not None, COMPUTE=compute,
                                 BLOCK=block, num_warps=_warps(block))


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: Optional[torch.Tensor],
        bootstrap: Optional[torch.Tensor], terminated: torch.Tensor, truncated: Optional[torch.Tensor], gamma: float,
        lam: float, advantages: torch.Tensor, returns: torch.Tensor) -> None:
    B, T = rewards.shape
    if B == 0 or T == 0:
        return
    double, compute = _arith(rewards.dtype)
    block = block_for(T)
    with _on_device(rewards):
        _gae_kernel[(B,)](rewards, values, next_values if next_values is not None else values,
                          bootstrap if bootstrap is not None else values, terminated,
                          truncated if truncated is not None else terminated, advantages, returns, T,
                          coefficient(gamma, double), coefficient(gamma * lam, double),
                          HAS_NEXT=next_values is not None, HAS_BOOT=bootstrap is not None,
                          HAS_TRUNC=truncated is not None, COMPUTE=compute, BLOCK=block, num_warps=_warps(block))


def lambda_returns(rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                   truncated: Optional[torch.Tensor], gamma: float, lam: float, out: torch.Tensor) -> None:
    B, T = rewards.shape
    if B == 0 or T == 0:
        return
    double, compute = _arith(rewards.dtype)
    block = block_for(T)
    lam_a = lam if double else float(torch.tensor(lam, dtype=torch.float32))
    with _on_device(rewards):
        _lambda_kernel[(B,)](rewards, next_values, terminated, truncated if truncated is not None else terminated,
                             out, T, coefficient(gamma, double), lam_a, coefficient(gamma * lam, double),
                             HAS_TRUNC=truncated is not None, COMPUTE=compute, BLOCK=block, num_warps=_warps(block))


def masked_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
               advantages: torch.Tensor, returns: torch.Tensor) -> None:
    B, T = rewards.shape
    if B == 0 or T == 0:
        return
    double, compute = _arith(rewards.dtype)
    block = block_for(T)
    with _on_device(rewards):
        _masked_gae_kernel[(B,)](rewards, values, mask, advantages, returns, T, coefficient(gamma, double),
                                 coefficient(gamma * lam, double), COMPUTE=compute, BLOCK=block,
                                 num_warps=_warps(block))


# --- ahead-of-time compile specs -----------------------------------------------------------

_OUT = {"fp32": "fp32", "bf16": "fp32", "fp16": "fp32", "fp64": "fp64"}


def _compute(dtype: str):
    return tl.float64 if dtype == "fp64" else tl.float32


def _discounted_spec(dtype: str, block: int) -> AotSpec:
    sig = {"R": f"*{dtype}", "DONE": "*i1", "BOOT": f"*{dtype}", "OUT": f"*{_OUT[dtype]}", "T": "i32",
           "gamma": "fp64", "HAS_BOOT": "constexpr", "COMPUTE": "constexpr", "BLOCK": "constexpr"}
    return AotSpec(f"discounted_returns[{dtype},block={block}]", _discounted_kernel, sig,
                   {"HAS_BOOT": True, "COMPUTE": _compute(dtype), "BLOCK": block}, num_warps=_warps(block))


def _gae_spec(dtype: str, block: int, has_next: bool) -> AotSpec:
    sig = {"R": f"*{dtype}", "V": f"*{dtype}", "NV": f"*{dtype}", "BOOT": f"*{dtype}", "TERM": "*i1",
           "TRUNC": "*i1", "ADV": f"*{_OUT[dtype]}", "RET": f"*{_OUT[dtype]}", "T": "i32", "gamma": "fp64",
           "gamma_lam": "fp64", "HAS_NEXT": "constexpr", "HAS_BOOT": "constexpr", "HAS_TRUNC": "constexpr",
           "COMPUTE": "constexpr", "BLOCK": "constexpr"}
    return AotSpec(f"gae[{dtype},block={block},next_values={has_next}]", _gae_kernel, sig,
                   {"HAS_NEXT": has_next, "HAS_BOOT": not has_next, "HAS_TRUNC": has_next,
                    "COMPUTE": _compute(dtype), "BLOCK": block}, num_warps=_warps(block))


def _lambda_spec(dtype: str, block: int) -> AotSpec:
    sig = {"R": f"*{dtype}", "NV": f"*{dtype}", "TERM": "*i1", "TRUNC": "*i1", "OUT": f"*{_OUT[dtype]}",
           "T": "i32", "gamma": "fp64", "lam": "fp64", "gamma_lam": "fp64", "HAS_TRUNC": "constexpr",
           "COMPUTE": "constexpr", "BLOCK": "constexpr"}
    return AotSpec(f"lambda_returns[{dtype},block={block}]", _lambda_kernel, sig,
                   {"HAS_TRUNC": True, "COMPUTE": _compute(dtype), "BLOCK": block}, num_warps=_warps(block))


def _masked_gae_spec(dtype: str, block: int) -> AotSpec:
    sig = {"R": f"*{dtype}", "V": f"*{dtype}", "MASK": "*i1", "ADV": f"*{_OUT[dtype]}", "RET": f"*{_OUT[dtype]}",
           "T": "i32", "gamma": "fp64", "gamma_lam": "fp64", "COMPUTE": "constexpr", "BLOCK": "constexpr"}
    return AotSpec(f"masked_gae[{dtype},block={block}]", _masked_gae_kernel, sig,
                   {"COMPUTE": _compute(dtype), "BLOCK": block}, num_warps=_warps(block))


# Every dtype at the largest tile (most registers) and float32 at the smallest; T is a
# runtime argument, so one compile serves every row length that picks the same block.
_AOT_CASES = [(dt, MAX_BLOCK) for dt in ("fp32", "bf16", "fp64")] + [("fp32", 32)]
AOT_SPECS = [
    *(_discounted_spec(dt, bl) for dt, bl in _AOT_CASES),
    *(_gae_spec(dt, bl, nxt) for dt, bl in _AOT_CASES for nxt in (False, True)),
    *(_lambda_spec(dt, bl) for dt, bl in _AOT_CASES),
    *(_masked_gae_spec(dt, bl) for dt, bl in _AOT_CASES),
]
