"""DTensor inputs: ops on batch-sharded or replicated DTensors.

A DTensor never reaches a kernel. An op that supports DTensors runs on the local shards
and wraps its results back, so the answer is the one a single process gives on the whole
batch:

- Row-wise ops (the return scans, ``kl_penalty``, per-pair metrics): rows are
  independent, so inputs sharded over the batch dimension (``Shard(0)``) or replicated
  give outputs with the same placements. ``kl_penalty`` is element-wise and takes any
  ``Shard(d)``.
- Aggregated losses (``policy_loss``, ``value_loss``, ``dpo_loss``,
  ``bradley_terry_loss``): each rank reduces its own rows against the global denominator
  (the all-reduced count of active tokens, of non-empty sequences or of pairs), and the
  loss is the sum of the ranks' parts (a ``Partial`` placement made ``Replicate``). The
  loss and the metrics come back as replicated 0-d DTensors; gradients reach each rank's
  shard as they would in one process.

Every DTensor argument of a call must share one mesh and one placement per mesh
dimension; plain tensors may only be 0-d (a scalar such as ``normalizer``). Any other
placement (``Partial``, or a shard over a dimension the op reduces over) raises
``ValueError`` naming it.

Cost: the denominators take one small all-reduce per sharded mesh dimension, and the loss
one more; the global count reaches the losses as a device tensor (``normalizer``), so
nothing is read back to the host.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar, cast

import torch

from . import _validate

# The decorators hand back a function with the decorated one's signature, so type checkers
# and IDEs see each op's real parameters (a misspelt policy_loss option is a mypy error).
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class _Layout:
    mesh: Any
    placements: Tuple[Any, ...]

    @property
    def sharded(self) -> bool:
        return any(p.is_shard() for p in self.placements)

    def partial(self):
        """Placements of a per-rank partial sum over the sharded mesh dimensions."""
        from torch.distributed.tensor import Partial, Replicate

        return tuple(Partial() if p.is_shard() else Replicate() for p in self.placements)

    def replicate(self):
        from torch.distributed.tensor import Replicate

        return tuple(Replicate() for _ in self.placements)


@functools.lru_cache(maxsize=None)
def _positional_names(fn: Callable) -> Tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _tensors(fn: Callable, args, kwargs):
    """(name, value) of every argument, one level into tuples and lists (``out=``)."""
    names = _positional_names(fn)
    for name, value in list(enumerate(args)) + list(kwargs.items()):
        label = (names[name] if name < len(names) else f"argument {name}") if isinstance(name, int) else name
        if isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                yield f"{label}[{i}]", v
        else:
            yield label, value


def _layout(fn: Callable, args, kwargs, *, batch_dim_only: bool) -> _Layout:
    op = fn.__name__
    layout = None
    first = None
    for name, t in _tensors(fn, args, kwargs):
        if not _validate.is_dtensor(t):
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                raise ValueError(f"{op}: {name} is a plain tensor of shape {tuple(t.shape)} while other arguments are "
                                 "DTensors: pass every tensor argument as a DTensor on the same mesh")
            continue
        for p in t.placements:
            if p.is_partial():
                raise ValueError(f"{op}: {name} has placement {p!r}: reduce it first (redistribute to Shard(0) or "
                                 "Replicate())")
            if p.is_shard() and batch_dim_only and p.dim not in (0, -t.dim()):
                raise ValueError(f"{op}: {name} has placement {p!r}: only the batch dimension (Shard(0)) may be "
                                 "sharded, since the op reduces over the other dimensions")
        if layout is None:
            layout, first = _Layout(t.device_mesh, tuple(t.placements)), name
        elif t.device_mesh != layout.mesh or tuple(t.placements) != layout.placements:
            raise ValueError(f"{op}: {name} has mesh {t.device_mesh} and placements {tuple(t.placements)!r}, but {first} "
                             f"has {layout.mesh} and {layout.placements!r}: all DTensor arguments must share them")
    return layout


def _local(value):
    if _validate.is_dtensor(value):
        return value.to_local()
    if isinstance(value, (tuple, list)):
        return type(value)(_local(v) for v in value)
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    return value


def _wrap(local: torch.Tensor, layout: _Layout, like) -> Any:
    """``local`` as a DTensor with the layout's placements. ``like`` is the input DTensor
    it was computed from: an output with its local shape has its global shape; one that
    differs only past the batch dimension keeps its global batch size."""
    from torch.distributed.tensor import DTensor

    shape = None
    if local.shape == like.to_local().shape:
        shape = like.shape
    elif local.dim() == like.dim() and local.dim() > 0:
        shape = torch.Size(like.shape[:1]) + local.shape[1:]
    stride = None
    if shape is not None:
        stride, step = [], 1
        for n in reversed(shape):
            stride.append(step)
            step *= max(n, 1)
        stride = tuple(reversed(stride))
    return DTensor.from_local(local, layout.mesh, layout.placements, run_check=False, shape=shape, stride=stride)


def global_sum(t: torch.Tensor, layout: _Layout):
    """The sum over the sharded mesh dimensions of each rank's ``t``, as a replicated
    DTensor (differentiable)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, layout.mesh, layout.partial(), run_check=False).redistribute(
        layout.mesh, layout.replicate())


def _first_dtensor(fn: Callable, args, kwargs):
    return next(t for _, t in _tensors(fn, args, kwargs) if _validate.is_dtensor(t))


def _on_dtensor(fn: F, handle: Callable) -> F:
    """``fn`` as it is, with ``handle(args, kwargs)`` for calls that reach a DTensor.

    The plain path pays nothing: the op's own checks raise ``DTensorArgument`` when they
    meet a DTensor (before any kernel runs), and only then is the call handed over."""

    @functools.wraps(fn)
    def op(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _validate.DTensorArgument:
            pass
        return handle(args, kwargs)

    return cast(F, op)


def _replicated_loss(out, layout: _Layout, like):
    """A loss computed whole on every rank (replicated inputs): the same as DTensors."""
    return type(out)(_replicated(out.loss, layout),
                     {k: _replicated(v, layout) if v.dim() == 0 else _wrap(v, layout, like)
                      for k, v in out.metrics.items()})


# ----------------------------------------------------------------------------- row-wise ops


def rowwise(*, any_shard: bool = False, check: Optional[Callable] = None) -> Callable[[F], F]:
    """Decorator for an op whose outputs are row-wise functions of its inputs: a DTensor
    call runs on the local shards and returns DTensors with the inputs' placements.
    ``check(fn, args, kwargs, first_dtensor)`` replaces the default check of a sharded
    call (that a 1-D input is not split in time)."""

    def decorate(fn: F) -> F:
        def handle(args, kwargs):
            layout = _layout(fn, args, kwargs, batch_dim_only=not any_shard)
            like = _first_dtensor(fn, args, kwargs)
            if layout.sharded and check is not None:
                check(fn, args, kwargs, like)
            elif not any_shard and like.dim() < 2 and layout.sharded:
                raise ValueError(f"{fn.__name__}: a 1-D DTensor is one sequence, so Shard(0) would split it in "
                                 "time: pass [B, T] inputs sharded over B")
            out = fn(*_local(args), **_local(kwargs))
            if isinstance(out, tuple):
                return tuple(_wrap(o, layout, like) for o in out)
            return _wrap(out, layout, like)

        return _on_dtensor(fn, handle)

    return decorate


def whole_groups(fn: Callable, args, kwargs, rewards) -> None:
    """group_advantages on [N] rewards sharded over N: each shard must hold whole groups,
    and the batch-wide std of ``scale="batch"`` would need every shard."""
    group_size = args[1] if len(args) > 1 else kwargs.get("group_size")
    if kwargs.get("scale") == "batch":
        raise ValueError(f"{fn.__name__}: scale='batch' needs the whole batch; with rewards sharded over the batch "
                         "use scale='group' or 'none', or pass replicated rewards")
    n = rewards.to_local().shape[0]
    if isinstance(group_size, int) and group_size > 0 and n % group_size:
        raise ValueError(f"{fn.__name__}: this rank's shard of rewards has {n} entries, not a multiple of group_size "
                         f"({group_size}): shard the rewards at group boundaries")


# ----------------------------------------------------------------------------- aggregated losses


def _replicated(t: torch.Tensor, layout: _Layout):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, layout.mesh, layout.replicate(), run_check=False)


def _token_metrics(metrics: Dict[str, torch.Tensor], n_local: torch.Tensor, n_global: torch.Tensor,
                   layout: _Layout) -> Dict[str, Any]:
    """Masked means over each rank's active tokens -> masked means over all of them."""
    out = {}
    denom = n_global.clamp(min=1)
    for name, value in metrics.items():
        if value.dim() == 0:
            out[name] = global_sum(value.detach() * n_local, layout) / denom
        else:
            out[name] = value
    return out


def token_loss(*, mask_arg: int, agg_default: str = "token-mean") -> Callable[[F], F]:
    """Decorator for a loss over [B, T] tokens with ``agg``/``normalizer`` keywords and a
    ``mask`` (positional index ``mask_arg``): Shard(0) or replicated DTensors give the
    single-process loss on the whole batch."""

    def decorate(fn: F) -> F:
        def handle(args, kwargs):
            layout = _layout(fn, args, kwargs, batch_dim_only=True)
            largs, lkwargs = _local(args), _local(kwargs)
            if not layout.sharded:
                return _replicated_loss(fn(*largs, **lkwargs), layout, _first_dtensor(fn, args, kwargs))
            mask = largs[mask_arg] if len(largs) > mask_arg else lkwargs.get("mask")
            active = torch.ones(largs[0].shape, dtype=torch.bool, device=largs[0].device) if mask is None else mask != 0
            if active.dim() == 1:
                raise ValueError(f"{fn.__name__}: a 1-D DTensor is one sequence, so Shard(0) would split it in time: "
                                 "pass [B, T] inputs sharded over B")
            n_local = active.sum()
            n_global = global_sum(n_local, layout).to_local()
            if lkwargs.get("normalizer") is None:
                # The global count goes in as a device tensor: no host read.
                agg = lkwargs.get("agg", agg_default)
                if agg == "token-mean":
                    lkwargs["normalizer"] = n_global.clamp(min=1)
                elif agg != "token-sum":
                    seqs = global_sum(active.any(dim=-1).sum(), layout).to_local()
                    lkwargs["normalizer"] = seqs.clamp(min=1)
            out = fn(*largs, **lkwargs)
            loss = global_sum(out.loss, layout)
            return type(out)(loss, _token_metrics(out.metrics, n_local, n_global, layout))

        return _on_dtensor(fn, handle)

    return decorate


def pair_loss(fn: F) -> F:
    """Decorator for a batch-mean loss over [B] pairs: Shard(0) or replicated DTensors give
    the mean over all pairs; [B] metrics stay sharded, scalar metrics become global means."""

    def handle(args, kwargs):
        layout = _layout(fn, args, kwargs, batch_dim_only=True)
        like = _first_dtensor(fn, args, kwargs)
        out = fn(*_local(args), **_local(kwargs))
        if not layout.sharded:
            return _replicated_loss(out, layout, like)
        b_local = torch.tensor(float(like.to_local().shape[0]), dtype=out.loss.dtype, device=out.loss.device)
        b_global = float(like.shape[0])
        metrics = {k: (global_sum(v.detach() * b_local, layout) / b_global) if v.dim() == 0 else _wrap(v, layout, like)
                   for k, v in out.metrics.items()}
        return type(out)(global_sum(out.loss * (b_local / b_global), layout), metrics)

    return _on_dtensor(fn, handle)
