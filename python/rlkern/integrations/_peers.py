"""Helpers shared by the verl and OpenRLHF adapters (not public API)."""

from __future__ import annotations

import math
import struct
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch

Number = Union[int, float, torch.Tensor]


def cfg(config: Any, name: str, default: Any = None) -> Any:
    """A field of a DictConfig, a dataclass config (verl's ActorConfig) or a plain dict; None reads as default."""
    if config is None:
        return default
    if isinstance(config, dict):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask, 0 for an empty mask; NaN held at masked positions does not leak."""
    m = mask.bool()
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / m.sum().clamp(min=1)


def scaled(value: Number, dp_size: Number) -> Number:
    return value if isinstance(dp_size, (int, float)) and dp_size == 1 else value / dp_size


def _plain(x: Optional[Number]) -> Optional[Number]:
    """A CPU 0-d tensor as a Python number (free); device tensors stay tensors (no sync)."""
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() == 0:
        return x.item()
    return x


def global_agg(mode: str, mask: torch.Tensor, dp_size: Number = 1, batch_num_tokens: Optional[Number] = None,
               global_batch_size: Optional[Number] = None,
               loss_scale_factor: Optional[Number] = None) -> Tuple[str, Optional[Number]]:
    """verl's ``agg_loss`` (and OpenRLHF's ``aggregate_loss``) global-batch arguments as rlkern's
    ``agg`` and ``normalizer`` (see docs/DESIGN.md: the normalizer replaces the final denominator).

    verl multiplies the local loss by dp_size because DDP/FSDP average gradients over the
    ranks; dividing the global denominator by dp_size is the same thing.
    """
    dp_size, batch_num_tokens = _plain(dp_size), _plain(batch_num_tokens)
    global_batch_size, loss_scale_factor = _plain(global_batch_size), _plain(loss_scale_factor)
    if mode == "token-mean":
        if batch_num_tokens is None:
            if _gt1(dp_size):
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            return mode, None
        return mode, scaled(batch_num_tokens, dp_size)
    if mode == "token-sum":
        return mode, None if not _gt1(dp_size) and not _lt1(dp_size) else 1.0 / dp_size
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        norm = mode == "seq-mean-token-sum-norm"
        if global_batch_size is None:
            if _gt1(dp_size):
                raise ValueError("global_batch_size is required when dp_size > 1")
            if not norm or loss_scale_factor is None:
                return mode, None
            # the number of non-empty sequences times the constant scale factor
            count = _plain(mask.bool().any(-1).sum().clamp(min=1))
            return "seq-mean-token-sum", count * loss_scale_factor
        denom = scaled(global_batch_size, dp_size)
        if norm:
            denom = denom * (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return "seq-mean-token-sum", denom
    if mode == "seq-mean-token-mean":
        if global_batch_size is None:
            if _gt1(dp_size):
                raise ValueError("global_batch_size is required when dp_size > 1")
            return mode, None
        return mode, scaled(global_batch_size, dp_size)
    raise ValueError(f"Invalid loss_agg_mode: {mode}")


def _gt1(x: Number) -> bool:
    return bool(x > 1)


def _lt1(x: Number) -> bool:
    return bool(x < 1)


def owned(loss: torch.Tensor) -> torch.Tensor:
    """The fused loss as a tensor of its own: verl's trainer adds to the returned loss in place
    (``policy_loss += kl_loss * coef``), which autograd forbids on a custom Function's view output."""
    return loss.clone() if loss._base is not None else loss


def weighted_advantages(advantages: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """advantages ([B] or [B, T]) times non-negative per-token weights [B, T], in at least float32.

    For w >= 0, w * max(-A r, -A clip(r)) = max(-(w A) r, -(w A) clip(r)) (and likewise the
    dual clip and the cispo/reinforce terms), so a detached per-token weight on the loss is
    a per-token advantage for the fused kernel.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    dtype = torch.promote_types(torch.promote_types(adv.dtype, weights.dtype), torch.float32)
    return adv.to(dtype) * weights.detach().to(dtype)


def group_ids(index: Any, n: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Group id per row (0..G-1) and the size of each group from a uid array in any order."""
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    keys = np.asarray(index)
    if keys.shape[0] != n:
        raise ValueError(f"index must have {n} entries, got {keys.shape[0]}")
    _, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return (torch.as_tensor(inv.reshape(-1), dtype=torch.long, device=device),
            torch.as_tensor(counts, dtype=torch.long, device=device))


def group_sum(values: torch.Tensor, gid: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum of the rows of ``values`` ([N, ...]) per group id ([N] in 0..groups-1): [groups, ...]."""
    out = torch.zeros((groups, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add_(0, gid, values)


def _float32(x) -> float:
    """x rounded to the nearest float32 (to +-inf beyond its range), as a Python float."""
    x = float(x)
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # (Pythons that refuse to round a finite value to infinity)
        return math.copysign(math.inf, x)


def scalars(values) -> list:
    """Detached scalars (0-d tensors or numbers) as Python floats with one device sync."""
    if not values:
        return []
    if all(v.device.type == "cpu" for v in values if isinstance(v, torch.Tensor)):
        # no sync to share: read each value, rounded to float32 like the stacked path below
        return [_float32(v.reshape(()).item() if isinstance(v, torch.Tensor) else v) for v in values]
    dev = next(v.device for v in values if isinstance(v, torch.Tensor))
    return torch.stack([v.detach().float().reshape(()).to(dev) if isinstance(v, torch.Tensor)
                        else torch.tensor(float(v), device=dev) for v in values]).tolist()


def import_openrlhf_losses():
    """``(openrlhf.models.loss, openrlhf.models.utils)``, or None when OpenRLHF is not importable.

    openrlhf/models/ring_attn_utils.py imports flash_attn (a CUDA-only package) at module level
    although the loss code never uses it; without flash_attn installed a stand-in module is
    placed in sys.modules for the duration of the import only.
    """
    import importlib.machinery
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("openrlhf") is None:
        return None
    added = []
    if importlib.util.find_spec("flash_attn") is None:
        for name in ("flash_attn", "flash_attn.bert_padding", "flash_attn.utils", "flash_attn.utils.distributed"):
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = mod
            added.append(name)
        for attr in ("index_first_axis", "pad_input", "rearrange", "unpad_input"):
            setattr(sys.modules["flash_attn.bert_padding"], attr, None)
        sys.modules["flash_attn.utils.distributed"].all_gather = None
    try:
        import openrlhf.models.loss as loss_mod
        import openrlhf.models.utils as utils_mod
    except ImportError:
        return None
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return loss_mod, utils_mod
