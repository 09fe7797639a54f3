"""Argument checks shared by the public functions. Each error names the argument."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# Tensor types whose data pointer is the data: plain tensors and parameters.
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


class DTensorArgument(TypeError):
    """A DTensor reached an op's checks. Ops that support DTensors catch it and run on the
    local shards (``rlkern._dtensor``); elsewhere it is the TypeError the user sees."""


def is_dtensor(t) -> bool:
    if type(t) in PLAIN_TYPES or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_fake(t: torch.Tensor) -> bool:
    """A tensor without data that a trace or a shape computation passes in: a FakeTensor
    (torch.compile, torch.export, FakeTensorMode) or a meta tensor."""
    if t.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def cpu_data(t: torch.Tensor) -> bool:
    """Whether a compiled CPU pass may read ``t`` through its data pointer: a plain tensor or
    parameter on the CPU, neither fake nor meta. Callers with a torch fallback test this
    instead of raising, as :func:`plain` does."""
    return type(t) in PLAIN_TYPES and t.device.type == "cpu" and not is_fake(t)


def plain(name: str, t: torch.Tensor, *, allow_fake: bool = False) -> torch.Tensor:
    """Rejects what must never reach a raw data pointer: tensor subclasses (FakeTensor,
    DTensor, functorch wrappers...) and tensors without strided storage (sparse, nested).

    ``allow_fake=True`` admits FakeTensors, for an op whose call routes them to its
    custom op's fake implementation. Meta tensors pass here: dispatch sends them to the
    reference or a fake implementation, which never takes a pointer."""
    if type(t) not in PLAIN_TYPES and not (allow_fake and is_fake(t)):
        error = DTensorArgument if is_dtensor(t) else TypeError
        raise error(f"{name} is a {type(t).__module__}.{type(t).__name__}, a tensor subclass that rlkern's "
                    "kernels cannot read: pass a plain torch.Tensor (for a DTensor, its .to_local() shard)")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    return t


def tensor(name: str, t, *, ndim: Optional[Iterable[int]] = None, floating: bool = False,
           dtypes: Optional[Sequence[torch.dtype]] = None, allow_fake: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    plain(name, t, allow_fake=allow_fake)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOATING:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    return t


def mask(name: str, t, shape: Sequence[int], *, allow_fake: bool = False) -> torch.Tensor:
    """A 0/1 mask: bool, integer or floating, of exactly ``shape``."""
    tensor(name, t, allow_fake=allow_fake)
    if t.is_complex():
        raise TypeError(f"{name} must be bool, integer or floating, got {t.dtype}")
    same_shape(name, t, shape)
    return t


def same_shape(name: str, t: torch.Tensor, shape: Sequence[int], other: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        against = f" (the shape of {other})" if other else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{against}, got {tuple(t.shape)}")


def same_device(**tensors) -> torch.device:
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}: all tensors must share a device")
    return device


def unit_interval(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {v}")
    return v


def positive(name: str, value, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    # v != v rather than math.isnan(v): under torch.compile(dynamic=True) v may be a symbolic
    # float, which math.isnan cannot trace; the comparisons can.
    if v != v or (v < 0 or (v == 0 and not allow_zero)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {v}")
    return v


def choice(name: str, value, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value
