"""verl 0.9.1's rollout correction (``verl/trainer/ppo/rollout_corr_helper.py``) over the whole
batch with one host sync per call (not public API: the names are re-exported by
``rlkern.integrations.verl``).

verl reads every one of its ~40 metrics back with its own ``.item()`` and branches on tensor
values in Python (a device sync each); here every metric is a 0-d tensor until one
``tolist()`` at the end, and the data-dependent branches are ``torch.where``. Weights, masks
and metric values are verl's (same formulas, same metric names and key sets).

Deliberate differences: bfloat16/float16 log-probs are computed in float32 (verl works in the
input precision); where verl raises ZeroDivisionError for the effective sample size of an
all-zero weight batch (IcePop rejecting every token) the metric is inf.
"""

from __future__ import annotations

import math
import types
from typing import Any, Dict, List, Optional, Tuple

import torch

SAFETY_BOUND = 20.0
RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
              "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
_EMPTY = "response_mask must contain at least one valid token (1)."

Metrics = Dict[str, torch.Tensor]


def parse_is_threshold(spec: Any) -> Tuple[float, Optional[float]]:
    """``rollout_is_threshold`` as (upper, lower): a number or "u" is TIS (lower None), "l_u" IcePop."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"rollout_is_threshold must be a float or a 'lower_upper' string, got {spec!r}")
    lower = None
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError("rollout_is_threshold must not be an empty string.")
        try:
            if "_" in text:
                low_text, high_text = text.split("_", 1)
                lower, upper = float(low_text), float(high_text)
            else:
                upper = float(text)
        except ValueError as exc:
            raise ValueError(f"Invalid rollout_is_threshold '{spec}'.") from exc
    else:
        upper = float(spec)
    if not upper > 0:
        raise ValueError(f"rollout_is_threshold upper bound must be positive, got {upper}.")
    if lower is not None:
        if not lower > 0:
            raise ValueError(f"rollout_is_threshold lower bound must be positive, got {lower}.")
        if lower > upper:
            raise ValueError("rollout_is_threshold lower bound must be <= upper bound.")
    return upper, lower


def parse_rs(rollout_rs: Any, spec: Any) -> List[Tuple[str, Optional[float], float]]:
    """``rollout_rs`` options (comma separated, duplicates dropped, order kept) with their
    (lower, upper) thresholds: one spec shared by all or one per option; k1 options take
    "l_u" ratio bounds (a single u means [1/u, u]), the others one upper bound."""
    if rollout_rs is None or not isinstance(rollout_rs, str):
        raise ValueError("rollout_rs must be a non-empty string (comma separated for multiple options).")
    if spec is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")
    options: List[str] = []
    for name in (part.strip() for part in rollout_rs.split(",")):
        if not name:
            continue
        if name not in RS_OPTIONS:
            raise ValueError(f"Invalid rollout_rs option: {name}. Must be one of {sorted(RS_OPTIONS)}.")
        if name not in options:
            options.append(name)
    if not options:
        raise ValueError("rollout_rs must contain at least one valid option.")
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        specs = [str(spec)]
    elif isinstance(spec, str):
        specs = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        raise TypeError("rollout_rs_threshold must be a string or numeric value specifying per-option thresholds.")
    if not specs:
        raise ValueError("rollout_rs_threshold must contain at least one threshold value.")
    if len(specs) not in (1, len(options)):
        raise ValueError(f"rollout_rs_threshold expects either one threshold shared by all options or exactly "
                         f"{len(options)} thresholds to match the provided rollout_rs options.")
    specs = specs * len(options) if len(specs) == 1 else specs
    parsed = []
    for name, text in zip(options, specs):
        if name.endswith("k1"):
            try:
                if "_" in text:
                    low_text, high_text = text.split("_", 1)
                    lower, upper = float(low_text), float(high_text)
                else:
                    upper = float(text)
                    lower = 1.0 / upper
            except (ValueError, ZeroDivisionError) as exc:
                raise ValueError(f"Invalid numeric threshold '{text}' for option '{name}'.") from exc
            if not (lower > 0 and upper > 0):
                raise ValueError(f"Thresholds for option '{name}' must be positive, got {text}.")
            if lower > upper:
                raise ValueError(f"Thresholds for option '{name}' must be lower <= upper, got {text}.")
        else:
            if "_" in text:
                raise ValueError(f"rollout_rs_threshold for option '{name}' must provide a single upper bound "
                                 f"without '_'. Received '{text}'.")
            try:
                upper = float(text)
            except ValueError as exc:
                raise ValueError(f"Invalid numeric threshold '{text}' for option '{name}'.") from exc
            if not upper > 0:
                raise ValueError(f"Threshold for option '{name}' must be positive, got {text}.")
            lower = None
        parsed.append((name, lower, upper))
    return parsed


# ------------------------------------------------------------------------------------------
# masked reductions with verl's conventions (NaN at masked positions does not leak)


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _msum(v: torch.Tensor, m: torch.Tensor, dim=None) -> torch.Tensor:
    s = torch.where(m, v, _zero(v))
    return s.sum() if dim is None else s.sum(dim)


def _mmean(v: torch.Tensor, m: torch.Tensor, dim=None) -> torch.Tensor:
    """verl's masked_mean: masked sum / (count + 1e-8), so an empty row gives 0."""
    count = m.sum() if dim is None else m.sum(dim)
    return _msum(v, m, dim) / (count.to(v.dtype) + 1e-8)


def _mmax(v: torch.Tensor, m: torch.Tensor, dim=None) -> torch.Tensor:
    x = torch.where(m, v, torch.full((), float("-inf"), dtype=v.dtype, device=v.device))
    return x.amax() if dim is None else x.amax(dim)


def _mmin(v: torch.Tensor, m: torch.Tensor, dim=None) -> torch.Tensor:
    x = torch.where(m, v, torch.full((), float("inf"), dtype=v.dtype, device=v.device))
    return x.amin() if dim is None else x.amin(dim)


def _frac(cond: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _mmean(cond.float(), m)


def _row_stats(values: torch.Tensor, rows: torch.Tensor, n_rows: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Mean, unbiased std (0 for fewer than two rows), max and min over the selected rows."""
    z = _zero(values)
    nf = n_rows.to(values.dtype)
    mean = torch.where(rows, values, z).sum() / nf.clamp(min=1)
    var = torch.where(rows, (values - mean) ** 2, z).sum() / (nf - 1).clamp(min=1)
    std = torch.where(n_rows > 1, var.sqrt(), z)
    return {"mean": mean, "std": std, "max": _mmax(values, rows), "min": _mmin(values, rows)}


def _clamped_std(stat: torch.Tensor, m: torch.Tensor, n: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """verl's std of the statistic clamped into [low, high] (0 with fewer than two tokens)."""
    c = stat.clamp(min=low, max=high)
    mean = _mmean(c, m)
    var = (_mmean(c.square(), m) - mean.square()).clamp(min=0.0)
    return torch.where(n > 1, var.sqrt(), _zero(var))


# ------------------------------------------------------------------------------------------
# IS weights


def is_weights(log_ratio: torch.Tensor, m: torch.Tensor, n: torch.Tensor, level: str, upper: float,
               lower: Optional[float], batch_normalize: bool) -> Tuple[torch.Tensor, Metrics]:
    """Truncated (TIS) or band-masked (IcePop) IS weights and verl's ``rollout_is_*`` metrics."""
    if level not in ("token", "sequence"):
        raise ValueError(f"Invalid rollout_is: {level}. Must be one of {{'token', 'sequence'}}.")
    mf = m.to(log_ratio.dtype)
    if level == "token":
        stat = log_ratio
        raw = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp() * mf
    else:
        stat = _msum(log_ratio, m, -1).unsqueeze(-1)
        raw = stat.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp().expand_as(log_ratio) * mf
    # raw is 0 at masked positions (NaN there is dropped: 0 * NaN would not be)
    raw = torch.where(m, raw, _zero(raw))
    if lower is None:
        w = raw.clamp(max=upper)
    else:
        w = torch.where((raw >= lower) & (raw <= upper), raw, _zero(raw))
    low_metric = 1.0 / upper if lower is None else lower
    mt: Metrics = {}
    if level == "sequence":
        thr = torch.tensor([upper, low_metric], dtype=torch.float32, device=log_ratio.device).log()
        mt["rollout_is_max"] = stat.amax().clamp(max=SAFETY_BOUND).exp()
        mt["rollout_is_min"] = stat.amin().exp()
        mt["rollout_is_mean"] = _mmean(w, m)
        mt["rollout_is_ratio_fraction_high"] = (stat > thr[0]).float().mean()
        mt["rollout_is_ratio_fraction_low"] = (stat < thr[1]).float().mean()
    else:
        mt["rollout_is_mean"] = _mmean(w, m)
        mt["rollout_is_ratio_fraction_high"] = _frac(raw > upper, m)
        mt["rollout_is_ratio_fraction_low"] = _frac(raw < low_metric, m)
        mt["rollout_is_max"] = _mmax(w, m)
        mt["rollout_is_min"] = _mmin(w, m)
    mt["rollout_is_std"] = _clamped_std(w, m, n, 0.0, upper)
    we = w.clamp(min=0.0, max=upper)
    normed = we / (_mmean(we, m) + 1e-8)
    mt["rollout_is_eff_sample_size"] = 1.0 / _mmean(normed.square(), m)
    seq_w = _mmean(w, m, -1)
    mt["rollout_is_seq_mean"] = seq_w.mean()
    mt["rollout_is_seq_std"] = seq_w.std() if seq_w.numel() > 1 else _zero(seq_w)
    mt["rollout_is_seq_max"] = seq_w.amax()
    mt["rollout_is_seq_min"] = seq_w.amin()
    mt["rollout_is_seq_max_deviation"] = (seq_w - 1.0).abs().amax()
    raw_seq = _mmean(raw, m, -1)
    mt["rollout_is_seq_fraction_high"] = (raw_seq > upper).float().mean()
    mt["rollout_is_seq_fraction_low"] = (raw_seq < low_metric).float().mean()
    if lower is not None:
        mt["rollout_is_oob_ratio"] = _frac((raw < lower) | (raw > upper), m)
    if batch_normalize:
        mean = _batch_mean(w, m, level)
        ok = mean > 1e-8
        w = torch.where(ok, w / mean, w)
        mt["rollout_is_batch_norm_factor"] = torch.where(ok, mean, torch.ones_like(mean))
    return w.detach(), mt


def _batch_mean(w: torch.Tensor, m: torch.Tensor, level: str) -> torch.Tensor:
    """The mean IS weight that batch normalisation divides by: over tokens ("token") or over the
    non-empty sequences ("sequence"), across the ranks when torch.distributed is initialised."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if level == "token":
        if not dist:
            return _mmean(w, m)
        values, weights = w, m.to(w.dtype)
    else:
        values, weights = _mmean(w, m, -1), (m.sum(-1) > 0).to(w.dtype)
        if not dist:
            return (values * weights).sum() / weights.sum().clamp_min(1e-8)
    total = (torch.where(weights > 0, values, _zero(values)) * weights).sum()
    count = weights.sum()
    torch.distributed.all_reduce(total)
    torch.distributed.all_reduce(count)
    return total / count


# ------------------------------------------------------------------------------------------
# rejection sampling


def rejection_mask(log_ratio: torch.Tensor, m: torch.Tensor, n: torch.Tensor,
                   options: List[Tuple[str, Optional[float], float]]) -> Tuple[torch.Tensor, Metrics]:
    """verl's product of the options' keep masks (token or sequence level) and its
    ``rollout_rs_*`` metrics."""
    safe = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    token = {"k1": -safe, "k2": 0.5 * safe ** 2, "k3": safe.exp() - 1.0 - safe}
    rows = m.any(-1)
    n_rows = rows.sum()
    keep_all = torch.ones_like(log_ratio)
    mt: Metrics = {}
    z = _zero(log_ratio)
    for name, lower, upper in options:
        kind = name[-2:]
        k1 = kind == "k1"
        hi = math.log(upper) if k1 else upper
        lo = math.log(lower) if k1 else 0.0
        per_token = token[kind]
        if name.startswith("token"):
            stat = per_token
            seq_values = _mmean(stat, m, -1)
        else:
            if name.startswith("seq_sum"):
                seq_values = _msum(per_token, m, -1)
            elif name.startswith("seq_mean"):
                seq_values = _mmean(per_token, m, -1)
            else:
                mx = _mmax(per_token, m, -1)
                seq_values = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx)
            stat = seq_values.unsqueeze(-1).expand_as(log_ratio)
        keep = (stat <= hi) & (stat >= lo) if k1 else stat <= hi
        keep_all = keep_all * keep.to(log_ratio.dtype)
        seq_keep = (keep | ~m).all(-1)
        p = f"rollout_rs_{name}"
        mt[f"{p}_mean"] = _mmean(stat, m)
        if name.startswith("token"):
            mt[f"{p}_max"], mt[f"{p}_min"] = _mmax(stat, m), _mmin(stat, m)
            mt[f"{p}_fraction_high"] = _frac(stat > hi, m)
            mt[f"{p}_fraction_low"] = _frac(stat < lo, m) if k1 else z
        else:
            mt[f"{p}_max"], mt[f"{p}_min"] = _mmax(seq_values, rows), _mmin(seq_values, rows)
            mt[f"{p}_fraction_high"] = _mmean_rows(seq_values > hi, rows, n_rows)
            mt[f"{p}_fraction_low"] = _mmean_rows(seq_values < lo, rows, n_rows) if k1 else z
        mt[f"{p}_std"] = _clamped_std(stat, m, n, lo, hi)
        s = _row_stats(seq_values, rows, n_rows)
        mt[f"{p}_seq_mean"], mt[f"{p}_seq_std"] = s["mean"], s["std"]
        mt[f"{p}_seq_max"], mt[f"{p}_seq_min"] = s["max"], s["min"]
        mt[f"{p}_seq_max_deviation"] = _mmax(seq_values.abs(), rows)
        mt[f"{p}_seq_fraction_high"] = _mmean_rows(seq_values > hi, rows, n_rows)
        if k1:
            mt[f"{p}_seq_fraction_low"] = _mmean_rows(seq_values < lo, rows, n_rows)
        mt[f"{p}_masked_fraction"] = _frac(~keep, m)
        mt[f"{p}_seq_masked_fraction"] = _mmean_rows(~seq_keep, rows, n_rows)
    mt["rollout_rs_masked_fraction"] = _mmean(1 - keep_all, m)
    mt["rollout_rs_seq_masked_fraction"] = ((keep_all <= 0.5) & m).any(-1).float().mean()
    return keep_all, mt


def _mmean_rows(cond: torch.Tensor, rows: torch.Tensor, n_rows: torch.Tensor) -> torch.Tensor:
    return (cond & rows).sum().float() / n_rows.float().clamp(min=1)


# ------------------------------------------------------------------------------------------
# off-policy diagnostics


def offpolicy_metrics(old: torch.Tensor, rollout: Optional[torch.Tensor], m: torch.Tensor) -> Metrics:
    """verl's ``compute_offpolicy_metrics``: perplexities, KL (k1, k3), log-PPL gap and chi^2."""
    mt: Metrics = {}
    mean_train = _mmean(old, m, -1)
    mt["training_ppl"] = (-mean_train).exp().mean()
    mt["training_log_ppl"] = (-mean_train).mean()
    if rollout is None:
        return mt
    lr = old - rollout
    mt["kl"] = _mmean(-lr, m)
    mt["k3_kl"] = _mmean(lr.exp() - lr - 1, m)
    mean_roll = _mmean(rollout, m, -1)
    mt["rollout_ppl"] = (-mean_roll).exp().mean()
    mt["rollout_log_ppl"] = (-mean_roll).mean()
    gap = mean_roll - mean_train
    mt["log_ppl_diff"] = gap.mean()
    mt["log_ppl_abs_diff"] = gap.abs().mean()
    mt["log_ppl_diff_max"] = gap.amax()
    mt["log_ppl_diff_min"] = gap.amin()
    mt["ppl_ratio"] = gap.exp().mean()
    mt["chi2_token"] = _mmean(lr.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp().square(), m) - 1.0
    seq = _msum(lr, m, -1).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    mt["chi2_seq"] = (2.0 * seq).exp().mean() - 1.0
    return mt


# ------------------------------------------------------------------------------------------
# entry points


def _prepare(old: torch.Tensor, rollout: Optional[torch.Tensor], mask: torch.Tensor, first: str = "old_log_prob"):
    for name, t in ((first, old), ("rollout_log_prob", rollout), ("response_mask", mask)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rollout is not None and old.shape != rollout.shape:
        raise ValueError(f"old_log_prob shape {old.shape} does not match rollout_log_prob shape {rollout.shape}.")
    if old.shape != mask.shape:
        raise ValueError(f"log_prob shape {old.shape} does not match response_mask shape {mask.shape}.")
    if old.dim() != 2:
        raise ValueError(f"{first} must be [batch, response_length], got shape {tuple(old.shape)}")
    if not old.is_floating_point() or (rollout is not None and not rollout.is_floating_point()):
        raise TypeError(f"{first} and rollout_log_prob must be floating point")
    dtype = torch.promote_types(old.dtype, torch.float32)
    if rollout is not None:
        dtype = torch.promote_types(dtype, rollout.dtype)
    return (old.detach().to(dtype), None if rollout is None else rollout.detach().to(dtype), mask.bool())


def _read(metrics: Metrics, n: torch.Tensor, prefix: str = "") -> Dict[str, float]:
    """Every metric as a Python float with one device sync; an empty mask raises as verl does."""
    keys = list(metrics)
    values = torch.stack([n.to(torch.float64)] + [metrics[k].detach().to(torch.float64).reshape(())
                                                   for k in keys]).tolist()
    if values[0] == 0:
        raise ValueError(_EMPTY)
    return {prefix + k: v for k, v in zip(keys, values[1:])}


def wrap_weights(weights: Optional[torch.Tensor]):
    """The weights as verl's ``DataProto`` (key "rollout_is_weights"), or a stand-in with the
    same ``.batch`` mapping when verl is not installed."""
    if weights is None:
        return None
    try:
        from verl.protocol import DataProto
    except ImportError:
        return types.SimpleNamespace(batch={"rollout_is_weights": weights})
    return DataProto.from_dict(tensors={"rollout_is_weights": weights})


def correction_and_rejection(old_log_prob, rollout_log_prob, response_mask, rollout_is=None,
                             rollout_is_threshold=2.0, rollout_is_batch_normalize=False, rollout_rs=None,
                             rollout_rs_threshold=None) -> Tuple[Optional[torch.Tensor], torch.Tensor,
                                                                  Dict[str, float]]:
    """(IS weights or None, rejection-masked response mask, metrics with "rollout_corr/")."""
    if rollout_log_prob is None:
        raise ValueError("rollout_log_prob is required")
    old, rollout, m = _prepare(old_log_prob, rollout_log_prob, response_mask)
    n = m.sum()
    log_ratio = old - rollout
    metrics: Metrics = {}
    weights = None
    if rollout_is is not None and rollout_is_threshold is not None:
        upper, lower = parse_is_threshold(rollout_is_threshold)
        weights, mt = is_weights(log_ratio, m, n, rollout_is, upper, lower, rollout_is_batch_normalize)
        metrics.update(mt)
    new_mask = response_mask.clone()
    if rollout_rs is not None:
        if rollout_rs_threshold is None:
            raise ValueError("rollout_rs_threshold must be explicitly provided when rollout_rs is enabled. "
                             "Set rollout_rs_threshold to the desired threshold value.")
        options = parse_rs(rollout_rs, rollout_rs_threshold)
        if log_ratio.shape[0] > 0:
            keep, mt = rejection_mask(log_ratio, m, n, options)
            metrics.update(mt)
            new_mask = (response_mask * keep).to(response_mask.dtype)
    metrics.update(offpolicy_metrics(old, rollout, m))
    return weights, new_mask, _read(metrics, n, "rollout_corr/")


def correction_weights(log_ratio, response_mask, rollout_is="token", rollout_is_threshold=2.0,
                       rollout_is_batch_normalize=False):
    lr, _, m = _prepare(log_ratio, None, response_mask, "log_ratio")
    upper, lower = parse_is_threshold(rollout_is_threshold)
    n = m.sum()
    weights, mt = is_weights(lr, m, n, rollout_is, upper, lower, rollout_is_batch_normalize)
    return weights, _read(mt, n)


def rejection(log_ratio, response_mask, rollout_rs="token_k1", rollout_rs_threshold=None):
    options = parse_rs(rollout_rs, rollout_rs_threshold)
    if log_ratio.shape[0] == 0:
        return response_mask, {}
    lr, _, m = _prepare(log_ratio, None, response_mask, "log_ratio")
    n = m.sum()
    keep, mt = rejection_mask(lr, m, n, options)
    return (response_mask * keep).to(response_mask.dtype), _read(mt, n)


def offpolicy(old_log_prob, rollout_log_prob, response_mask) -> Dict[str, float]:
    old, rollout, m = _prepare(old_log_prob, rollout_log_prob, response_mask)
    n = m.sum()
    return _read(offpolicy_metrics(old, rollout, m), n)
