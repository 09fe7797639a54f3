"""Returns and advantages: discounted returns, GAE, TD(lambda), token-level GAE and
group-relative advantages.

Conventions (docs/DESIGN.md): inputs are batch-first ``[B, T]`` (a 1-D ``[T]`` input is one
row); flags (``dones``, ``terminated``, ``truncated``, ``mask``) are bool or 0/1 of the
same shape; float32, bfloat16 and float16 inputs compute in float32 and return float32,
float64 computes in float64. Episode boundaries may fall anywhere inside a row.

The scans run in C++ on CPU tensors and in CUDA C++ on GPU tensors; both execute the
step functions of ``csrc/include/rlkern/returns.h``. Where the CUDA C++ scans cannot run
(a build without them, or a driver older than the CUDA runtime they link), GPU tensors
take Triton kernels of the same formulation (``rlkern.triton.returns``), which compile
for the installed driver; ``RLKERN_BACKEND=triton`` forces them (on CPU tensors too,
under ``TRITON_INTERPRET=1``). ``rlkern.info()["scans_on_cuda"]`` says which run here.

The results are constants for autograd (as in every trainer, which computes advantages
under ``no_grad``); when an input does require grad, the differentiable reference
computes the result instead, so gradients are right, only slower.

Under ``torch.compile`` / ``torch.export`` and on FakeTensor or meta inputs, each op runs
as a ``torch.library`` custom op (``rlkern::gae``, ``rlkern::discounted_returns``,
``rlkern::lambda_returns``, ``rlkern::masked_gae``, ``rlkern::group_advantages``) whose
fake implementation gives the output shapes, so traced graphs hold no graph break; eager
calls on plain tensors launch the kernels directly (custom-op dispatch would cost small
calls a few microseconds). ``out=`` is eager-only: under tracing it raises a
RuntimeError. DTensors sharded over the batch (``Shard(0)``) or replicated run on their
local shards and come back with the same placements (``rlkern._dtensor``); other tensor
subclasses are refused with a TypeError naming the argument.

NaN and inf: a value behind an episode boundary (after a done, or at a masked token)
never reaches the result; any other non-finite input propagates as IEEE arithmetic does.
A zero coefficient on the carry (``gamma == 0`` in ``discounted_returns``, ``gamma * lam
== 0`` in the others) is a boundary too: later steps are not read. Any nonzero one, however
small, carries a NaN or inf on through the episode, however long (as the reference does
step by step; the kernels never let a product of coefficients round to 0).
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional, Tuple

import torch

from . import _backend, _dtensor, _info, _validate
from ._kernel import DTYPE_CODES, core, cuda_stream, empty_rows, ptr
from .reference import returns as _ref

__all__ = ["discounted_returns", "gae", "lambda_returns", "masked_gae", "group_advantages"]


def _as_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    _validate.tensor(name, t, ndim=(1, 2), floating=True, allow_fake=True)
    return t.unsqueeze(0) if t.dim() == 1 else t


def _is_row(t) -> bool:
    """A 1-D leading input: every input of the call is then one row."""
    return isinstance(t, torch.Tensor) and t.dim() == 1


def _row_of(t, one_d: bool):
    return t.unsqueeze(0) if one_d and isinstance(t, torch.Tensor) else t


def _floats(name: str, t: torch.Tensor, shape) -> torch.Tensor:
    _validate.tensor(name, t, floating=True, allow_fake=True)
    _validate.same_shape(name, t, shape, "rewards")
    return t


def _flags(name: str, t, shape) -> torch.Tensor:
    _validate.mask(name, t, shape, allow_fake=True)
    return t if t.dtype == torch.bool else t != 0


def _common_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    dtype = None
    for t in tensors:
        if t is not None and t.dtype != dtype:
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def _needs_reference(backend: str, *tensors: Optional[torch.Tensor]) -> bool:
    if backend == "reference":
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@functools.lru_cache(maxsize=None)
def _cuda_scans_start() -> bool:
    """False when the CUDA C++ scans cannot run here: the build has none, or the
    installed driver is too old for the CUDA runtime they link (``rlkern.info()["cuda"]``).
    Scans on CUDA tensors then run the Triton kernels (torch ops, the reference, where
    triton is missing) instead of failing at launch; a too-old driver is said once with a
    warning. A build without the CUDA scans (the default wheel) takes the Triton kernels
    silently: they are its GPU path."""
    if not _info.cuda_scans_built():
        if not _triton_available():
            warnings.warn("rlkern: this build has no CUDA C++ scans and triton is not installed: scans on CUDA "
                          "tensors run as torch ops (the reference) instead", RuntimeWarning, stacklevel=3)
        return False
    support = _info.cuda_support()
    if support["driver_ok"] is False:
        instead = "the Triton kernels" if _triton_available() else "torch ops (the reference; triton is not installed)"
        warnings.warn(f"rlkern: the CUDA C++ scans need a driver for CUDA {support['runtime']} "
                      f"(R{support['min_driver']} or newer), this one supports CUDA {support['driver']}: scans on "
                      f"CUDA tensors run {instead} instead", RuntimeWarning, stacklevel=3)
        return False
    return True


def _triton_available() -> bool:
    return _info.triton_importable()


def _scan_backend(device: torch.device) -> str:
    backend = _backend.select(device, gpu="cuda")
    # On CUDA tensors the CUDA C++ scans are the default; where they cannot run (a build
    # without them, or a driver older than their runtime) the Triton scans take over.
    # A forced "triton" runs the Triton scans (on CPU tensors under TRITON_INTERPRET=1).
    if backend == "cuda" and _backend.requested_backend() == "auto" and not _cuda_scans_start():
        return "triton" if _triton_available() else "reference"
    return backend


def _fake(t: Optional[torch.Tensor]) -> bool:
    """A tensor without data (meta, or a FakeTensor). Plain tensors answer in two
    attribute reads: this runs on every eager call."""
    return t is not None and (t.is_meta or (type(t) is not torch.Tensor and _validate.is_fake(t)))


def _route(device: torch.device, traced: bool, *floats: Optional[torch.Tensor]) -> str:
    """How a call runs: "reference" (the differentiable torch ops: a forced reference
    backend, or an input that requires grad), "op" (the rlkern:: custom op: under
    torch.compile/export, or on FakeTensor/meta inputs, whose fake implementation gives
    the shapes), else the backend whose kernel the eager call launches directly (the
    custom op's dispatch costs microseconds that small calls would notice)."""
    backend = "op" if device.type == "meta" else _scan_backend(device)
    if backend == "reference" or _needs_reference("", *floats):
        return "reference"
    return "op" if traced else backend


def _traced(*tensors: Optional[torch.Tensor]) -> bool:
    if torch.compiler.is_compiling():
        return True
    for t in tensors:
        if _fake(t):
            return True
    return False


def _no_out_when_traced(out, traced: bool) -> None:
    if out is not None and traced:
        raise RuntimeError("out= is eager-only: under torch.compile/torch.export, or on FakeTensor/meta inputs, "
                           "call without out= and use the returned tensors (the custom ops do not write into "
                           "caller buffers)")


def _result_dtype_of(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _empty(rewards: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return rewards.new_empty(rewards.shape, dtype=dtype)


# --- custom ops: the way in under torch.compile, torch.export, FakeTensor and meta ---------
#
# Each takes validated [B, T] rows (bool flags, bootstrap [B]) and returns fresh tensors.
# The results are constants for autograd, as in eager: the public functions send an input
# that requires grad to the differentiable reference before any op, and an op called
# directly marks its outputs non-differentiable (_constant_outputs). The fake
# implementations give the output shapes and dtypes without touching data.


def _constant_outputs(ctx, inputs, output):
    outs = output if isinstance(output, tuple) else (output,)
    ctx.mark_non_differentiable(*outs)


def _no_gradient(ctx, *grads):
    raise RuntimeError("rlkern's return ops have no gradient (their outputs are constants); unreachable")

@torch.library.custom_op("rlkern::discounted_returns", mutates_args=())
def _discounted_op(rewards: torch.Tensor, dones: torch.Tensor, gamma: float,
                   bootstrap: Optional[torch.Tensor]) -> torch.Tensor:
    B, T = rewards.shape
    (out,) = _run_scan("discounted_returns", _scan_backend(rewards.device), (rewards, None, None, bootstrap),
                       (dones, None), gamma, 0.0, B, T, 1)
    return out


@_discounted_op.register_fake
def _(rewards, dones, gamma, bootstrap):
    return _empty(rewards, _result_dtype_of(rewards, bootstrap))


@torch.library.custom_op("rlkern::gae", mutates_args=())
def _gae_op(rewards: torch.Tensor, values: torch.Tensor, terminated: torch.Tensor, gamma: float, lam: float,
            next_values: Optional[torch.Tensor], truncated: Optional[torch.Tensor],
            bootstrap_value: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    B, T = rewards.shape
    adv, ret = _run_scan("gae", _scan_backend(rewards.device), (rewards, values, next_values, bootstrap_value),
                         (terminated, truncated), gamma, lam, B, T, 2)
    return adv, ret


@_gae_op.register_fake
def _(rewards, values, terminated, gamma, lam, next_values, truncated, bootstrap_value):
    dt = _result_dtype_of(rewards, values, next_values, bootstrap_value)
    return _empty(rewards, dt), _empty(rewards, dt)


@torch.library.custom_op("rlkern::lambda_returns", mutates_args=())
def _lambda_op(rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor, gamma: float, lam: float,
               truncated: Optional[torch.Tensor]) -> torch.Tensor:
    B, T = rewards.shape
    (out,) = _run_scan("lambda_returns", _scan_backend(rewards.device), (rewards, None, next_values, None),
                       (terminated, truncated), gamma, lam, B, T, 1)
    return out


@_lambda_op.register_fake
def _(rewards, next_values, terminated, gamma, lam, truncated):
    return _empty(rewards, _result_dtype_of(rewards, next_values))


@torch.library.custom_op("rlkern::masked_gae", mutates_args=())
def _masked_gae_op(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    B, T = token_rewards.shape
    adv, ret = _run_scan("masked_gae", _scan_backend(token_rewards.device), (token_rewards, values, None, None),
                         (mask, None), gamma, lam, B, T, 2)
    return adv, ret


@_masked_gae_op.register_fake
def _(token_rewards, values, mask, gamma, lam):
    dt = _result_dtype_of(token_rewards, values)
    return _empty(token_rewards, dt), _empty(token_rewards, dt)


for _op in (_discounted_op, _gae_op, _lambda_op, _masked_gae_op):
    _op.register_autograd(_no_gradient, setup_context=_constant_outputs)


def _run_scan(name: str, backend: str, floats: Tuple[Optional[torch.Tensor], ...],
              flags: Tuple[Optional[torch.Tensor], ...], gamma: float, lam: float, B: int, T: int, outputs: int,
              out: Optional[Tuple[torch.Tensor, ...]] = None) -> Tuple[torch.Tensor, ...]:
    """Launches a scan on ``floats = (rewards, values, next_values, bootstrap)`` and
    ``flags = (terminated, truncated)`` (None where absent), cast to one storage dtype
    and made contiguous; returns the output tensors (float32, or float64), written into
    ``out`` when given (already checked by ``_out_buffers``). ``backend`` is "cpu",
    "cuda", "triton" or "reference" (the custom ops get what ``_scan_backend`` says).
    Kept lean: for small batches this Python is most of the call."""
    dtype = _common_dtype(*floats)
    device = floats[0].device
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if backend == "reference":
        return _write(out, *_reference_scan(name, floats, flags, gamma, lam, out_dtype))
    if out is None:
        out = tuple(empty_rows(floats[0], (B, T), out_dtype) for _ in range(outputs))
    if backend == "triton":
        _triton_scan(name, dtype, floats, flags, gamma, lam, out)
        return tuple(out)

    def p(t, want=None):
        if t is None:
            return 0
        if (want is not None and t.dtype != want) or not t.is_contiguous():
            t = (t.to(want) if want is not None else t).contiguous()
            keep.append(t)  # alive until the kernel has run
        return ptr(t)

    keep = []
    cuda = backend == "cuda"
    if cuda and not _info.cuda_scans_built():  # forced with RLKERN_BACKEND=cuda
        raise RuntimeError("rlkern was built without the CUDA C++ scans (no nvcc at build time): use the "
                           "default backend or RLKERN_BACKEND=triton for scans on CUDA tensors")
    fn = getattr(core().returns, name + "_cuda" if cuda else name)
    rewards, values, next_values, bootstrap = floats
    # Flags are bool or uint8 (0/1): the kernel reads their bytes, so no reinterpreting view is needed.
    fn(DTYPE_CODES[dtype], B, T, p(rewards, dtype), p(values, dtype), p(next_values, dtype), p(bootstrap, dtype),
       p(flags[0]), p(flags[1]), float(gamma), float(lam), p(out[0]), p(out[1]) if outputs > 1 else 0,
       cuda_stream(device) if cuda else 0)
    return tuple(out)


def _triton_scan(name: str, dtype: torch.dtype, floats: Tuple[Optional[torch.Tensor], ...],
                 flags: Tuple[Optional[torch.Tensor], ...], gamma: float, lam: float,
                 out: Tuple[torch.Tensor, ...]) -> None:
    """The Triton scans take what the CUDA ones do: contiguous inputs of one dtype,
    contiguous bool flags."""
    from .triton import returns as kernels

    r, v, nv, boot = (t.to(dtype).contiguous() if t is not None else None for t in floats)
    first, second = (f.contiguous() if f is not None else None for f in flags)
    if name == "discounted_returns":
        kernels.discounted_returns(r, first, boot, gamma, out[0])
    elif name == "gae":
        kernels.gae(r, v, nv, boot, first, second, gamma, lam, out[0], out[1])
    elif name == "lambda_returns":
        kernels.lambda_returns(r, nv, first, second, gamma, lam, out[0])
    else:
        kernels.masked_gae(r, v, first, gamma, lam, out[0], out[1])


def _reference_scan(name: str, floats: Tuple[Optional[torch.Tensor], ...], flags: Tuple[Optional[torch.Tensor], ...],
                    gamma: float, lam: float, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """The reference's torch ops in the arithmetic type (the custom ops' path where no
    kernel can run)."""
    r, v, nv, boot = (t.to(dtype) if t is not None else None for t in floats)
    if name == "discounted_returns":
        return (_ref.discounted_returns(r, flags[0], gamma, boot),)
    if name == "gae":
        return _ref.gae(r, v, flags[0], gamma, lam, next_values=nv, truncated=flags[1], bootstrap_value=boot)
    if name == "lambda_returns":
        return (_ref.lambda_returns(r, nv, flags[0], gamma, lam, truncated=flags[1]),)
    return _ref.masked_gae(r, v, flags[0], gamma, lam)


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """The bytes a tensor's elements can occupy: [lowest, highest] element address, so
    slices of one storage (rewards and advantages side by side in a rollout buffer) do
    not count as overlapping."""
    start, count = t.data_ptr(), t.numel()
    if count == 0:
        return start, start
    if t.is_contiguous():
        return start, start + count * t.element_size()
    low = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st < 0)
    high = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st > 0)
    return t.data_ptr() + low * t.element_size(), t.data_ptr() + (high + 1) * t.element_size()


def _out_buffers(out, count: int, one_d: bool, shape, dtype: torch.dtype, device: torch.device,
                 inputs: Tuple[Optional[torch.Tensor], ...]) -> Optional[Tuple[torch.Tensor, ...]]:
    """Checks ``out`` (one tensor, or a pair for the scans with two outputs) and returns
    it as ``[B, T]`` rows; None when not given."""
    if out is None:
        return None
    what = "a tensor" if count == 1 else "a tuple of two tensors (advantages, returns)"
    bufs = (out,) if count == 1 and isinstance(out, torch.Tensor) else out
    if not isinstance(bufs, (tuple, list)) or len(bufs) != count or \
            not all(isinstance(b, torch.Tensor) for b in bufs):
        raise TypeError(f"out must be {what}, got {type(out).__name__}")
    rows = []
    for i, b in enumerate(bufs):
        name = "out" if count == 1 else f"out[{i}]"
        _validate.tensor(name, b)
        want = tuple(shape[1:]) if one_d else tuple(shape)
        if tuple(b.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(b.shape)}")
        if b.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype} (the result dtype for these inputs), got {b.dtype}")
        if b.device != device:
            raise ValueError(f"{name} is on {b.device} but the inputs are on {device}")
        if not b.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if b.requires_grad:
            raise ValueError(f"{name} must not require grad (the results are constants for autograd)")
        rows.append(_row_of(b, one_d))
    spans = [_span(b) for b in rows]
    others = [_span(t) for t in inputs if t is not None] + spans
    for i, (lo, hi) in enumerate(spans):
        for j, (olo, ohi) in enumerate(others):
            if j == len(others) - len(spans) + i:
                continue  # itself
            if lo < ohi and olo < hi:
                raise ValueError("out must not share memory with the inputs or with the other output "
                                 "(the scan reads steps it has not written yet)")
    return tuple(rows)


def _result_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if _common_dtype(*tensors) == torch.float64 else torch.float32


def _write(out: Optional[Tuple[torch.Tensor, ...]], *results: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Results of the reference path, copied into ``out`` when given."""
    if out is None:
        return results
    for o, r in zip(out, results):
        o.copy_(r.detach())
    return tuple(out)


def _bootstrap(name: str, t: Optional[torch.Tensor], B: int) -> Optional[torch.Tensor]:
    if t is None:
        return None
    _validate.tensor(name, t, floating=True, allow_fake=True)
    if t.dim() == 0:
        t = t.expand(B)
    _validate.same_shape(name, t, (B,))
    return t


def _unrow(t: torch.Tensor, one_d: bool) -> torch.Tensor:
    return t.squeeze(0) if one_d else t


@_dtensor.rowwise()
def discounted_returns(rewards: torch.Tensor, dones: torch.Tensor, gamma: float,
                       bootstrap: Optional[torch.Tensor] = None, *,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Discounted returns, reset at episode ends.

    G_t = r_t + gamma * (1 - done_t) * G_{t+1}, with G after the last step equal to
    ``bootstrap`` (``[B]``, default 0).

    Args:
        rewards: ``[B, T]`` floating.
        dones: ``[B, T]`` bool or 0/1: the episode ends after step t.
        gamma: discount in [0, 1].
        bootstrap: optional ``[B]`` value of the state after each row's last step.
        out: optional result buffer (contiguous, float32, or float64 for float64 inputs,
            sharing no memory with the inputs); reusing one across calls skips the
            page faults of a fresh allocation. (Fresh outputs of 16 MiB and more are
            views that start on a 2 MiB boundary, so the OS backs them with huge pages;
            their faults still cost about as much as the scan.)
    """
    one_d = _is_row(rewards)
    r = _as_rows("rewards", rewards)
    B, T = r.shape
    d = _flags("dones", _row_of(dones, one_d), r.shape)
    boot = _bootstrap("bootstrap", bootstrap, B)
    gamma = _validate.unit_interval("gamma", gamma)
    _validate.same_device(rewards=r, dones=d, bootstrap=boot)
    dt = _result_dtype(r, boot)
    traced = _traced(r, d, boot)
    _no_out_when_traced(out, traced)
    route = _route(r.device, traced, r, boot)
    if route == "op":
        return _unrow(_discounted_op(r, d, gamma, boot), one_d)
    bufs = _out_buffers(out, 1, one_d, r.shape, dt, r.device, (r, d, boot))
    backend = route
    if route == "reference":
        (result,) = _write(bufs, _ref.discounted_returns(r.to(dt), d, gamma, boot.to(dt) if boot is not None else None))
    else:
        (result,) = _run_scan("discounted_returns", backend, (r, None, None, boot), (d, None),
                              gamma, 0.0, B, T, 1, bufs)
    return out if out is not None else _unrow(result, one_d)


@_dtensor.rowwise()
def gae(rewards: torch.Tensor, values: torch.Tensor, terminated: torch.Tensor, gamma: float, lam: float, *,
        next_values: Optional[torch.Tensor] = None, truncated: Optional[torch.Tensor] = None,
        bootstrap_value: Optional[torch.Tensor] = None,
        out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation that tells termination from truncation.

    delta_t = r_t + gamma * (1 - terminated_t) * V'_t - V_t
    A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1},  done = terminated | truncated
    returns_t = A_t + V_t

    V'_t is ``next_values[t]`` when given; otherwise ``values[t + 1]``, and
    ``bootstrap_value`` (``[B]``, default 0) at each row's last step. Termination stops
    bootstrapping; truncation stops the carry but still bootstraps from V'_t, the value
    of the state that was cut off, so truncation needs ``next_values``.

    ``out=(advantages, returns)`` writes into preallocated buffers (see
    ``discounted_returns``) and returns them.

    Returns:
        ``(advantages, returns)``, each ``[B, T]``.
    """
    one_d = _is_row(rewards)
    r = _as_rows("rewards", rewards)
    B, T = r.shape
    v = _floats("values", _row_of(values, one_d), r.shape)
    term = _flags("terminated", _row_of(terminated, one_d), r.shape)
    trunc = _flags("truncated", _row_of(truncated, one_d), r.shape) if truncated is not None else None
    nv = _floats("next_values", _row_of(next_values, one_d), r.shape) if next_values is not None else None
    if trunc is not None and nv is None:
        raise ValueError("truncated needs next_values: the value of the state that was cut off is needed "
                         "to bootstrap a truncated episode")
    if nv is not None and bootstrap_value is not None:
        raise ValueError("pass either next_values or bootstrap_value, not both")
    boot = _bootstrap("bootstrap_value", bootstrap_value, B)
    gamma = _validate.unit_interval("gamma", gamma)
    lam = _validate.unit_interval("lam", lam)
    _validate.same_device(rewards=r, values=v, terminated=term, truncated=trunc, next_values=nv, bootstrap_value=boot)
    dt = _result_dtype(r, v, nv, boot)
    traced = _traced(r, v, term, trunc, nv, boot)
    _no_out_when_traced(out, traced)
    route = _route(r.device, traced, r, v, nv, boot)
    if route == "op":
        adv, ret = _gae_op(r, v, term, gamma, lam, nv, trunc, boot)
        return _unrow(adv, one_d), _unrow(ret, one_d)
    bufs = _out_buffers(out, 2, one_d, r.shape, dt, r.device, (r, v, term, trunc, nv, boot))
    backend = route
    if route == "reference":
        cast = (lambda x: x.to(dt) if x is not None else None)
        adv, ret = _write(bufs, *_ref.gae(cast(r), cast(v), term, gamma, lam, next_values=cast(nv), truncated=trunc,
                                          bootstrap_value=cast(boot)))
    else:
        adv, ret = _run_scan("gae", backend, (r, v, nv, boot), (term, trunc), gamma, lam, B, T, 2, bufs)
    if out is not None:
        return tuple(out)
    return _unrow(adv, one_d), _unrow(ret, one_d)


@_dtensor.rowwise()
def lambda_returns(rewards: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor, gamma: float,
                   lam: float, *, truncated: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TD(lambda) targets.

    G_t = r_t + gamma * (1 - terminated_t) * ((1 - c_t) V'_t + c_t G_{t+1})

    with V'_t = ``next_values[t]`` (the value of the state after step t) and c_t = lam,
    except c_t = 0 where the episode is truncated after step t or t is the row's last
    step (the target then bootstraps from V'_t alone). lam = 0 gives one-step TD
    targets, lam = 1 Monte Carlo returns bootstrapped at cuts. Equals
    ``gae(...)[1]`` when ``next_values`` are the values of the following states.
    ``out`` is an optional result buffer (see ``discounted_returns``).
    """
    one_d = _is_row(rewards)
    r = _as_rows("rewards", rewards)
    B, T = r.shape
    nv = _floats("next_values", _row_of(next_values, one_d), r.shape)
    term = _flags("terminated", _row_of(terminated, one_d), r.shape)
    trunc = _flags("truncated", _row_of(truncated, one_d), r.shape) if truncated is not None else None
    gamma = _validate.unit_interval("gamma", gamma)
    lam = _validate.unit_interval("lam", lam)
    _validate.same_device(rewards=r, next_values=nv, terminated=term, truncated=trunc)
    dt = _result_dtype(r, nv)
    traced = _traced(r, nv, term, trunc)
    _no_out_when_traced(out, traced)
    route = _route(r.device, traced, r, nv)
    if route == "op":
        return _unrow(_lambda_op(r, nv, term, gamma, lam, trunc), one_d)
    bufs = _out_buffers(out, 1, one_d, r.shape, dt, r.device, (r, nv, term, trunc))
    backend = route
    if route == "reference":
        (result,) = _write(bufs, _ref.lambda_returns(r.to(dt), nv.to(dt), term, gamma, lam, truncated=trunc))
    else:
        (result,) = _run_scan("lambda_returns", backend, (r, None, nv, None), (term, trunc), gamma, lam, B, T, 1, bufs)
    return out if out is not None else _unrow(result, one_d)


@_dtensor.rowwise()
def masked_gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
               lam: float = 1.0, *,
               out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-level GAE over a response mask, as LLM PPO trainers (verl, OpenRLHF) use it.

    Masked tokens are skipped: the recurrence links each unmasked token to the next
    unmasked one, and the value after a row's last unmasked token is 0:

    delta_t = r_t + gamma * V_next(t) - V_t,  A_t = delta_t + gamma * lam * A_next(t)

    where next(t) is the next unmasked position. Masked positions get 0 in both outputs
    and their inputs (NaN included) are never read into the result. No whitening is
    applied (verl whitens afterwards over the mask). ``out=(advantages, returns)``
    writes into preallocated buffers (see ``discounted_returns``).

    Returns:
        ``(advantages, returns)``, returns = advantages + values on unmasked tokens.
    """
    one_d = _is_row(token_rewards)
    r = _as_rows("token_rewards", token_rewards)
    B, T = r.shape
    v = _row_of(values, one_d)
    _validate.tensor("values", v, floating=True, allow_fake=True)
    _validate.same_shape("values", v, r.shape, "token_rewards")
    m = _flags("mask", _row_of(mask, one_d), r.shape)
    gamma = _validate.unit_interval("gamma", gamma)
    lam = _validate.unit_interval("lam", lam)
    _validate.same_device(token_rewards=r, values=v, mask=m)
    dt = _result_dtype(r, v)
    traced = _traced(r, v, m)
    _no_out_when_traced(out, traced)
    route = _route(r.device, traced, r, v)
    if route == "op":
        adv, ret = _masked_gae_op(r, v, m, gamma, lam)
        return _unrow(adv, one_d), _unrow(ret, one_d)
    bufs = _out_buffers(out, 2, one_d, r.shape, dt, r.device, (r, v, m))
    backend = route
    if route == "reference":
        adv, ret = _write(bufs, *_ref.masked_gae(r.to(dt), v.to(dt), m, gamma, lam))
    else:
        adv, ret = _run_scan("masked_gae", backend, (r, v, None, None), (m, None), gamma, lam,
                             B, T, 2, bufs)
    if out is not None:
        return tuple(out)
    return _unrow(adv, one_d), _unrow(ret, one_d)


def _non_negative(name: str, value) -> float:
    """_validate.positive(allow_zero=True) without math.isnan, which dynamo cannot trace
    on a float it keeps symbolic (dynamic=True): NaN fails ``v >= 0`` as well."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


_ESTIMATORS = {"grpo": 0, "rloo": 1}
_SCALES = {"none": 0, "group": 1, "batch": 2}


@_dtensor.rowwise(check=_dtensor.whole_groups)
def group_advantages(rewards: torch.Tensor, group_size: int, *, estimator: str = "grpo",
                     scale: Optional[str] = None, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages for GRPO, Dr.GRPO and RLOO.

    ``rewards`` is ``[N]`` with N = groups * group_size, each group contiguous (the
    completions of one prompt).

    - ``estimator="grpo"``: A_i = (r_i - mean_g) / (std + eps)
    - ``estimator="rloo"``: A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_g)
    - ``scale``: "group" divides by the group's unbiased std (TRL's and verl's GRPO),
      "batch" by the unbiased std of all N rewards (TRL's ``scale_rewards="batch"``),
      "none" only centres (Dr.GRPO). Default: "group" for grpo, "none" for rloo.

    A group whose rewards are all equal gets zero advantages (never NaN, whatever eps).
    A group of one is centred on itself (its std taken as 1), so GRPO gives 0; verl
    instead passes the raw score through for such groups, which
    ``rlkern.integrations.verl.compute_grpo_outcome_advantage`` reproduces. RLOO needs
    group_size >= 2.

    Means and spreads are computed in float64 for every input dtype (float32 rewards near
    1e38 would overflow a float32 sum); the result is float32, or float64 for float64
    rewards.
    """
    _validate.tensor("rewards", rewards, floating=True, allow_fake=True)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [groups * group_size], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    N = rewards.shape[0]
    if N % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide the number of rewards {N}")
    _validate.choice("estimator", estimator, tuple(_ESTIMATORS))
    scale = scale if scale is not None else ("group" if estimator == "grpo" else "none")
    _validate.choice("scale", scale, tuple(_SCALES))
    if estimator == "rloo" and group_size < 2:
        raise ValueError("group_size must be at least 2 for estimator='rloo' (the mean of the others)")
    eps = _non_negative("eps", eps)
    traced = torch.compiler.is_compiling() or _fake(rewards)
    on_cpu = rewards.device.type in ("cpu", "meta")
    backend = _backend.select(rewards.device, gpu="cuda") if rewards.device.type != "meta" else "cpu"
    result = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    if traced and on_cpu and not (backend == "reference" or _needs_reference(backend, rewards)):
        return _group_advantages_op(rewards, group_size, estimator, scale, eps)
    if backend == "reference" or not on_cpu or _needs_reference(backend, rewards):
        # On the GPU this is a handful of fused reductions over [groups, group_size]:
        # torch's own kernels are already bandwidth-bound there. In float64 whatever the
        # input, as the CPU kernel: float32 sums of rewards near 1e38 overflow.
        return _ref.group_advantages(rewards.to(torch.float64), group_size, estimator=estimator, scale=scale,
                                     eps=eps).to(result)
    return _group_advantages_cpu(rewards, group_size, estimator, scale, eps)


def _group_advantages_cpu(rewards: torch.Tensor, group_size: int, estimator: str, scale: str,
                          eps: float) -> torch.Tensor:
    r = rewards.contiguous()
    N = r.shape[0]
    batch_std = float(r.double().std()) if scale == "batch" and N > 1 else (1.0 if scale == "batch" else 0.0)
    out = torch.empty(N, dtype=torch.float64 if r.dtype == torch.float64 else torch.float32)
    core().returns.group_advantages(DTYPE_CODES[r.dtype], N // group_size, group_size, ptr(r),
                                    _ESTIMATORS[estimator], _SCALES[scale], eps, batch_std, ptr(out))
    return out


@torch.library.custom_op("rlkern::group_advantages", mutates_args=())
def _group_advantages_op(rewards: torch.Tensor, group_size: int, estimator: str, scale: str,
                         eps: float) -> torch.Tensor:
    """Validated CPU rewards [N] (the public function keeps CUDA tensors on torch ops)."""
    return _group_advantages_cpu(rewards, group_size, estimator, scale, eps)


@_group_advantages_op.register_fake
def _(rewards, group_size, estimator, scale, eps):
    return rewards.new_empty(rewards.shape, dtype=torch.float64 if rewards.dtype == torch.float64 else torch.float32)


_group_advantages_op.register_autograd(_no_gradient, setup_context=_constant_outputs)
