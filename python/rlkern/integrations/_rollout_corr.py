"""verl 0.9.1's rollout correction (``verl/trainer/ppo/rollout_corr_helper.py``) over the whole
batch with one host sync per call (not public API: the names are re-exported by
``rlkern.integrations.verl``).

verl reads every one of its ~40 metrics back with its own ``.item()`` and branches on tensor
values in Python (a device sync each); here every metric is a 0-d tensor until one
``tolist()`` at the end, and the data-dependent branches are ``torch.where``. CPU
float32/bfloat16 log-probs take one compiled pass over [B, T] (csrc/cpu/rollout_corr.cpp)
that writes per-row sums, the weights and the rejection mask; the metrics are then
finished on [B] vectors with the same formulas. Weights, masks
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

from .. import _validate
from .._kernel import core, dtype_code, ptr

SAFETY_BOUND = 20.0
RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
              "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
_EMPTY = "response_mask must contain at least one valid token (1)."

Metrics = Dict[str, torch.Tensor]


def _band(text: str) -> Tuple[Optional[float], float]:
    """A threshold text as (lower, upper): "l_u" gives both, a single number only the upper
    bound (lower None). Raises ValueError on text that is not numbers."""
    if "_" in text:
        low_text, high_text = text.split("_", 1)
        return float(low_text), float(high_text)
    return None, float(text)


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
            lower, upper = _band(text)
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
                lower, upper = _band(text)
                lower = 1.0 / upper if lower is None else lower
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


def _count(b: torch.Tensor, dim=None) -> torch.Tensor:
    """Number of True entries (count_nonzero: summing a bool tensor converts it to int64 first)."""
    return torch.count_nonzero(b) if dim is None else torch.count_nonzero(b, dim=dim)


def _msum(v: torch.Tensor, m: torch.Tensor, dim=None) -> torch.Tensor:
    s = torch.where(m, v, _zero(v))
    return s.sum() if dim is None else s.sum(dim)


def _mmean(v: torch.Tensor, m: torch.Tensor, dim=None) -> torch.Tensor:
    """verl's masked_mean: masked sum / (count + 1e-8), so an empty row gives 0."""
    return _msum(v, m, dim) / (_count(m, dim).to(v.dtype) + 1e-8)


def _mmax(v: torch.Tensor, m: torch.Tensor, dim=None) -> torch.Tensor:
    x = torch.where(m, v, torch.full((), float("-inf"), dtype=v.dtype, device=v.device))
    return x.amax() if dim is None else x.amax(dim)


def _mmin(v: torch.Tensor, m: torch.Tensor, dim=None) -> torch.Tensor:
    x = torch.where(m, v, torch.full((), float("inf"), dtype=v.dtype, device=v.device))
    return x.amin() if dim is None else x.amin(dim)


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


def _weight_fn(upper: float, lower: Optional[float]):
    """TIS truncates the ratios at ``upper``; IcePop (``lower`` given) zeroes those outside [lower, upper]."""
    def weight(raw):
        if lower is None:
            return raw.clamp(max=upper)
        return torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    return weight


def _seq_is_parts(stat: torch.Tensor, count: torch.Tensor, nf: torch.Tensor, upper: float, lower: Optional[float],
                  low_metric: float, mt: Metrics):
    """Sequence level from each row's summed log-ratio ``stat`` [B]: the row weights and the
    sums the common metrics need; the level's own metrics go into ``mt``."""
    dtype = stat.dtype
    raw_b = stat.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp()
    w_b = _weight_fn(upper, lower)(raw_b)
    rows = count > 0
    row_w = torch.where(rows, w_b, torch.zeros_like(w_b))  # a row without tokens has weight 0
    sum_w, sum_w2 = (count * row_w).sum(), (count * row_w.square()).sum()
    seq_w = count * row_w / (count + 1e-8)
    raw_seq = count * torch.where(rows, raw_b, torch.zeros_like(raw_b)) / (count + 1e-8)
    thr = torch.tensor([upper, low_metric], dtype=torch.float32, device=stat.device).log()
    mt["rollout_is_max"] = stat.amax().clamp(max=SAFETY_BOUND).exp()
    mt["rollout_is_min"] = stat.amin().exp()
    mt["rollout_is_mean"] = sum_w / (nf + 1e-8)
    mt["rollout_is_ratio_fraction_high"] = (stat > thr[0]).float().mean()
    mt["rollout_is_ratio_fraction_low"] = (stat < thr[1]).float().mean()
    if lower is not None:
        oob = ((raw_b < lower) | (raw_b > upper)).to(dtype)
        mt["rollout_is_oob_ratio"] = (count * oob).sum() / (nf + 1e-8)
    return row_w, sum_w, sum_w2, seq_w, raw_seq


def _is_common(mt: Metrics, level: str, n: torch.Tensor, nf: torch.Tensor, count: torch.Tensor, sum_w, sum_w2,
               seq_w, raw_seq, upper: float, low_metric: float, batch_normalize: bool) -> Optional[torch.Tensor]:
    """The metrics both levels share; with ``batch_normalize`` the divisor of the weights
    (1 where verl leaves them as they are), else None."""
    # the applied weights already lie in [0, upper]: verl's clamp before its std and ESS is a no-op
    mean = sum_w / (nf + 1e-8)
    var = (sum_w2 / (nf + 1e-8) - mean.square()).clamp(min=0.0)
    mt["rollout_is_std"] = torch.where(n > 1, var.sqrt(), _zero(var))
    mt["rollout_is_eff_sample_size"] = 1.0 / (sum_w2 / (mean + 1e-8).square() / (nf + 1e-8))
    mt["rollout_is_seq_mean"] = seq_w.mean()
    mt["rollout_is_seq_std"] = seq_w.std() if seq_w.numel() > 1 else _zero(seq_w)
    mt["rollout_is_seq_max"] = seq_w.amax()
    mt["rollout_is_seq_min"] = seq_w.amin()
    mt["rollout_is_seq_max_deviation"] = (seq_w - 1.0).abs().amax()
    mt["rollout_is_seq_fraction_high"] = (raw_seq > upper).float().mean()
    mt["rollout_is_seq_fraction_low"] = (raw_seq < low_metric).float().mean()
    if not batch_normalize:
        return None
    if level == "token":
        local = (sum_w, nf)
    else:
        seq_rows = (count > 0).to(seq_w.dtype)
        local = ((seq_w * seq_rows).sum(), seq_rows.sum())
    norm = _batch_mean(local, level)
    ok = norm > 1e-8
    divisor = torch.where(ok, norm, torch.ones_like(norm))
    mt["rollout_is_batch_norm_factor"] = divisor
    return divisor


def _check_level(level: str) -> None:
    if level not in ("token", "sequence"):
        raise ValueError(f"Invalid rollout_is: {level}. Must be one of {{'token', 'sequence'}}.")


def is_weights(log_ratio: torch.Tensor, m: torch.Tensor, n: torch.Tensor, level: str, upper: float,
               lower: Optional[float], batch_normalize: bool) -> Tuple[torch.Tensor, Metrics]:
    """Truncated (TIS) or band-masked (IcePop) IS weights and verl's ``rollout_is_*`` metrics.

    Few passes over [B, T]: the weights are >= 0 and 0 at masked positions, so their masked
    sums are plain row sums and every token mean is a sum of row sums; at sequence level a row's
    active tokens share one weight and the metrics come from [B] vectors weighted by the row
    token counts (verl's token means over the broadcast weight)."""
    _check_level(level)
    dtype = log_ratio.dtype
    count = _count(m, -1).to(dtype)
    nf = n.to(dtype)
    low_metric = 1.0 / upper if lower is None else lower
    mt: Metrics = {}
    if level == "sequence":
        row_w, sum_w, sum_w2, seq_w, raw_seq = _seq_is_parts(_msum(log_ratio, m, -1), count, nf, upper, lower,
                                                             low_metric, mt)
        w = torch.where(m, row_w.unsqueeze(-1), torch.zeros((), dtype=dtype, device=m.device))
    else:
        raw = torch.where(m, log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp(), _zero(log_ratio))
        w = _weight_fn(upper, lower)(raw)
        row_sum = w.sum(-1)
        sum_w, sum_w2 = row_sum.sum(), w.square().sum()
        seq_w = row_sum / (count + 1e-8)
        raw_seq = raw.sum(-1) / (count + 1e-8)
        mt["rollout_is_mean"] = sum_w / (nf + 1e-8)
        # raw is 0 at masked positions: never above upper, always below the lower threshold
        mt["rollout_is_ratio_fraction_high"] = _count(raw > upper) / (nf + 1e-8)
        below = _count((raw < low_metric) & m)
        mt["rollout_is_ratio_fraction_low"] = below / (nf + 1e-8)
        mt["rollout_is_max"] = _mmax(w, m)
        mt["rollout_is_min"] = _mmin(w, m)
        if lower is not None:
            mt["rollout_is_oob_ratio"] = (_count((raw < lower) & m) + _count(raw > upper)) / (nf + 1e-8)
    divisor = _is_common(mt, level, n, nf, count, sum_w, sum_w2, seq_w, raw_seq, upper, low_metric, batch_normalize)
    if divisor is not None:
        w = w / divisor
    return w.detach(), mt


def _batch_mean(local: Tuple[torch.Tensor, torch.Tensor], level: str) -> torch.Tensor:
    """The mean IS weight that batch normalisation divides by, from the local (sum, count) over
    tokens ("token") or non-empty sequences ("sequence"), summed over the ranks when
    torch.distributed is initialised (verl's distributed_masked_mean)."""
    total, count = local
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        total, count = total.clone(), count.clone()
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
        return total / count
    if level == "token":
        return total / (count + 1e-8)
    return total / count.clamp_min(1e-8)


# ------------------------------------------------------------------------------------------
# rejection sampling


def _seq_option_metrics(mt: Metrics, p: str, seq_values, keep_b, rows, count, n, nf, n_rows, lo: float, hi: float,
                        k1: bool) -> None:
    """verl's ``{p}_*`` metrics of a sequence-level rejection option (seq_sum/seq_mean/seq_max):
    token-weighted means over the sequences' values, the torch and the compiled path alike."""
    dtype = seq_values.dtype
    z = _zero(seq_values)
    weighted = torch.where(rows, seq_values, torch.zeros_like(seq_values))
    mt[f"{p}_mean"] = (count * weighted).sum() / nf
    mt[f"{p}_max"], mt[f"{p}_min"] = _mmax(seq_values, rows), _mmin(seq_values, rows)
    mt[f"{p}_fraction_high"] = _mmean_rows(seq_values > hi, rows, n_rows)
    mt[f"{p}_fraction_low"] = _mmean_rows(seq_values < lo, rows, n_rows) if k1 else z
    c = torch.where(rows, seq_values.clamp(min=lo, max=hi), torch.zeros_like(seq_values))
    c_mean = (count * c).sum() / nf
    var = ((count * c.square()).sum() / nf - c_mean.square()).clamp(min=0.0)
    mt[f"{p}_std"] = torch.where(n > 1, var.sqrt(), z)
    mt[f"{p}_masked_fraction"] = (count * (~keep_b).to(dtype)).sum() / nf


def _seq_value_metrics(mt: Metrics, p: str, seq_values, seq_keep, rows, n_rows, lo: float, hi: float,
                       k1: bool) -> None:
    """verl's ``{p}_seq_*`` metrics of every rejection option: per-sequence statistics of the
    sequences' values over the non-empty rows."""
    s_ = _row_stats(seq_values, rows, n_rows)
    mt[f"{p}_seq_mean"], mt[f"{p}_seq_std"] = s_["mean"], s_["std"]
    mt[f"{p}_seq_max"], mt[f"{p}_seq_min"] = s_["max"], s_["min"]
    mt[f"{p}_seq_max_deviation"] = _mmax(seq_values.abs(), rows)
    mt[f"{p}_seq_fraction_high"] = _mmean_rows(seq_values > hi, rows, n_rows)
    if k1:
        mt[f"{p}_seq_fraction_low"] = _mmean_rows(seq_values < lo, rows, n_rows)
    mt[f"{p}_seq_masked_fraction"] = _mmean_rows(~seq_keep, rows, n_rows)


def rejection_mask(log_ratio: torch.Tensor, m: torch.Tensor, n: torch.Tensor,
                   options: List[Tuple[str, Optional[float], float]]) -> Tuple[torch.Tensor, Metrics]:
    """verl's product of the options' keep masks (token or sequence level) and its
    ``rollout_rs_*`` metrics. A sequence option's statistic is one value per row: its metrics
    (verl's token means over the broadcast value) come from [B] vectors weighted by the row
    token counts."""
    safe = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    token_stats: Dict[str, torch.Tensor] = {}

    def token_stat(kind: str) -> torch.Tensor:
        if kind not in token_stats:
            token_stats[kind] = {"k1": lambda: -safe, "k2": lambda: 0.5 * safe ** 2,
                                 "k3": lambda: safe.exp() - 1.0 - safe}[kind]()
        return token_stats[kind]

    dtype = log_ratio.dtype
    count = _count(m, -1).to(dtype)
    rows = count > 0
    n_rows = _count(rows)
    nf = n.to(dtype) + 1e-8
    token_keep: Optional[torch.Tensor] = None
    row_keep = torch.ones_like(rows)
    mt: Metrics = {}
    z = _zero(log_ratio)
    for name, lower, upper in options:
        kind = name[-2:]
        k1 = kind == "k1"
        hi = math.log(upper) if k1 else upper
        lo = math.log(lower) if k1 else 0.0
        p = f"rollout_rs_{name}"

        def band(x):
            return (x <= hi) & (x >= lo) if k1 else x <= hi

        if name.startswith("token"):
            stat = token_stat(kind)
            keep = band(stat)
            token_keep = keep if token_keep is None else token_keep & keep
            seq_values = _mmean(stat, m, -1)
            seq_keep = (keep | ~m).all(-1)
            mt[f"{p}_mean"] = _mmean(stat, m)
            mt[f"{p}_max"], mt[f"{p}_min"] = _mmax(stat, m), _mmin(stat, m)
            mt[f"{p}_fraction_high"] = _count((stat > hi) & m) / nf
            mt[f"{p}_fraction_low"] = _count((stat < lo) & m) / nf if k1 else z
            mt[f"{p}_std"] = _clamped_std(stat, m, n, lo, hi)
            mt[f"{p}_masked_fraction"] = _count(~keep & m) / nf
        else:
            per_token = token_stat(kind)
            if name.startswith("seq_sum"):
                seq_values = _msum(per_token, m, -1)
            elif name.startswith("seq_mean"):
                seq_values = _mmean(per_token, m, -1)
            else:
                mx = _mmax(per_token, m, -1)
                seq_values = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx)
            keep_b = band(seq_values)
            row_keep = row_keep & keep_b
            seq_keep = keep_b | ~rows
            _seq_option_metrics(mt, p, seq_values, keep_b, rows, count, n, nf, n_rows, lo, hi, k1)
        _seq_value_metrics(mt, p, seq_values, seq_keep, rows, n_rows, lo, hi, k1)
    keep_all = row_keep.unsqueeze(-1) if token_keep is None else token_keep & row_keep.unsqueeze(-1)
    keep_all = keep_all.expand_as(m)
    rejected = ~keep_all & m
    mt["rollout_rs_masked_fraction"] = _count(rejected) / nf
    mt["rollout_rs_seq_masked_fraction"] = rejected.any(-1).float().mean()
    return keep_all.to(dtype), mt


def _mmean_rows(cond: torch.Tensor, rows: torch.Tensor, n_rows: torch.Tensor) -> torch.Tensor:
    return _count(cond & rows).float() / n_rows.float().clamp(min=1)


# ------------------------------------------------------------------------------------------
# off-policy diagnostics


def _ppl_gap_metrics(mt: Metrics, mean_roll: torch.Tensor, mean_train: torch.Tensor) -> None:
    """verl's rollout perplexity and log-PPL gap metrics from the per-sequence mean log-probs
    of the rollout and the training policy (the torch and the compiled path alike)."""
    mt["rollout_ppl"] = (-mean_roll).exp().mean()
    mt["rollout_log_ppl"] = (-mean_roll).mean()
    gap = mean_roll - mean_train
    mt["log_ppl_diff"] = gap.mean()
    mt["log_ppl_abs_diff"] = gap.abs().mean()
    mt["log_ppl_diff_max"] = gap.amax()
    mt["log_ppl_diff_min"] = gap.amin()
    mt["ppl_ratio"] = gap.exp().mean()


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
    _ppl_gap_metrics(mt, mean_roll, mean_train)
    mt["chi2_token"] = _mmean(lr.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp().square(), m) - 1.0
    seq = _msum(lr, m, -1).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    mt["chi2_seq"] = (2.0 * seq).exp().mean() - 1.0
    return mt


# ------------------------------------------------------------------------------------------
# the compiled pass for CPU tensors (csrc/cpu/rollout_corr.cpp)
#
# One pass over [B, T] writes per-row sums, counts and extrema (float64), the IS weights and
# the rejection-masked mask; the metrics are then verl's formulas on [B] vectors, in float32
# as the torch path's. The row layout is the kernel's (its Row and Opt enums).

(_R_COUNT, _R_LOGP, _R_ROLLOUT, _R_LR, _R_K3, _R_RATIO2, _R_W, _R_W2, _R_RAW, _R_HIGH, _R_LOW, _R_MAXW, _R_MINW,
 _R_OOB, _R_REJECTED, _R_BASE) = range(16)
_O_SUM, _O_MAX, _O_MIN, _O_HIGH, _O_LOW, _O_CSUM, _O_CSQ, _O_NOTKEEP, _O_STATS = range(9)
_O_KEEP, _O_VALUE = _O_MIN, _O_HIGH  # sequence options
_AGG_CODES = {"token": 0, "seq_sum": 1, "seq_mean": 2, "seq_max": 3}
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _native_inputs(old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor):
    """(log-probs, rollout log-probs) as the compiled pass reads them, or None where the torch
    path runs: other devices, traced/fake/meta tensors, float64/float16, an empty batch, or
    a build without the kernel."""
    for t in (old, rollout, mask):
        if not _validate.cpu_data(t):
            return None
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    if old.dim() != 2 or old.numel() == 0 or not {old.dtype, rollout.dtype} <= set(_NATIVE_DTYPES):
        return None
    if not hasattr(core().losses, "rollout_correction_rows"):
        return None
    lp, ro = old.detach(), rollout.detach()
    if lp.dtype != ro.dtype:  # the kernel reads both as one type: float32, as the torch path computes
        lp, ro = lp.float(), ro.float()
    return lp.contiguous(), ro.contiguous()


def _native_pass(lp, ro, mask, level: Optional[str], upper: float, lower: Optional[float], options,
                 want_weights: bool):
    """Runs the kernel: (rows [B, K] float64, weights [B, T] float32 or None, kept-mask bool [B, T]
    or None)."""
    B, T = lp.shape
    m = (mask if mask.dtype == torch.bool else mask != 0).contiguous().view(torch.uint8)
    codes, los, his = [], [], []
    for name, lo_bound, hi_bound in options:
        k = int(name[-1])
        codes.append(_AGG_CODES[name[:-3]] * 3 + k - 1)
        his.append(math.log(hi_bound) if k == 1 else hi_bound)
        los.append(math.log(lo_bound) if k == 1 else 0.0)
    K = _R_BASE + _O_STATS * len(options)
    rows = torch.empty((B, K), dtype=torch.float64)
    weights = torch.empty((B, T), dtype=torch.float32) if want_weights and level is not None else None
    keep = torch.empty((B, T), dtype=torch.uint8) if options else None
    code = {None: 0, "token": 1, "sequence": 2}[level]
    low_metric = 0.0 if level is None else (1.0 / upper if lower is None else lower)
    core().losses.rollout_correction_rows(
        B, T, dtype_code(lp), ptr(lp), ptr(ro), ptr(m), code, float(upper), float(lower or 0.0), float(low_metric),
        codes, los, his, 0 if weights is None else ptr(weights), 0 if keep is None else ptr(keep), ptr(rows))
    return rows, weights, None if keep is None else keep.view(torch.bool)


def _native_is_metrics(R: torch.Tensor, count: torch.Tensor, n: torch.Tensor, level: str, upper: float,
                       lower: Optional[float], batch_normalize: bool) -> Tuple[Metrics, Optional[torch.Tensor]]:
    """verl's rollout_is_* metrics from the kernel's rows, and the batch-normalisation divisor."""
    dtype = torch.float32
    nf = n.to(dtype)
    low_metric = 1.0 / upper if lower is None else lower
    mt: Metrics = {}
    col = lambda i: R[:, i].to(dtype)  # noqa: E731
    if level == "sequence":
        _, sum_w, sum_w2, seq_w, raw_seq = _seq_is_parts(col(_R_LR), count, nf, upper, lower, low_metric, mt)
    else:
        sum_w, sum_w2 = R[:, _R_W].sum().to(dtype), R[:, _R_W2].sum().to(dtype)
        seq_w = col(_R_W) / (count + 1e-8)
        raw_seq = col(_R_RAW) / (count + 1e-8)
        mt["rollout_is_mean"] = sum_w / (nf + 1e-8)
        mt["rollout_is_ratio_fraction_high"] = R[:, _R_HIGH].sum().to(dtype) / (nf + 1e-8)
        mt["rollout_is_ratio_fraction_low"] = R[:, _R_LOW].sum().to(dtype) / (nf + 1e-8)
        mt["rollout_is_max"] = col(_R_MAXW).amax()
        mt["rollout_is_min"] = col(_R_MINW).amin()
        if lower is not None:
            mt["rollout_is_oob_ratio"] = R[:, _R_OOB].sum().to(dtype) / (nf + 1e-8)
    divisor = _is_common(mt, level, n, nf, count, sum_w, sum_w2, seq_w, raw_seq, upper, low_metric, batch_normalize)
    return mt, divisor


def _native_rs_metrics(R: torch.Tensor, count: torch.Tensor, n: torch.Tensor, options) -> Metrics:
    """verl's rollout_rs_* metrics from the kernel's rows (see :func:`rejection_mask`)."""
    dtype = torch.float32
    rows = count > 0
    n_rows = _count(rows)
    nf = n.to(dtype) + 1e-8
    z = torch.zeros((), dtype=dtype)
    mt: Metrics = {}
    for j, (name, lower, upper) in enumerate(options):
        o = R[:, _R_BASE + _O_STATS * j:_R_BASE + _O_STATS * (j + 1)]
        col = lambda i: o[:, i].to(dtype)  # noqa: E731
        k1 = name.endswith("k1")
        hi = math.log(upper) if k1 else upper
        lo = math.log(lower) if k1 else 0.0
        p = f"rollout_rs_{name}"
        if name.startswith("token"):
            seq_values = col(_O_SUM) / (count + 1e-8)
            seq_keep = o[:, _O_NOTKEEP] == 0
            mt[f"{p}_mean"] = o[:, _O_SUM].sum().to(dtype) / nf
            mt[f"{p}_max"], mt[f"{p}_min"] = col(_O_MAX).amax(), col(_O_MIN).amin()
            mt[f"{p}_fraction_high"] = o[:, _O_HIGH].sum().to(dtype) / nf
            mt[f"{p}_fraction_low"] = o[:, _O_LOW].sum().to(dtype) / nf if k1 else z
            c_mean = o[:, _O_CSUM].sum().to(dtype) / nf
            var = (o[:, _O_CSQ].sum().to(dtype) / nf - c_mean.square()).clamp(min=0.0)
            mt[f"{p}_std"] = torch.where(n > 1, var.sqrt(), z)
            mt[f"{p}_masked_fraction"] = o[:, _O_NOTKEEP].sum().to(dtype) / nf
        else:
            seq_values = col(_O_VALUE)
            keep_b = o[:, _O_KEEP] > 0.5
            seq_keep = keep_b | ~rows
            _seq_option_metrics(mt, p, seq_values, keep_b, rows, count, n, nf, n_rows, lo, hi, k1)
        _seq_value_metrics(mt, p, seq_values, seq_keep, rows, n_rows, lo, hi, k1)
    rejected = R[:, _R_REJECTED]
    mt["rollout_rs_masked_fraction"] = rejected.sum().to(dtype) / nf
    mt["rollout_rs_seq_masked_fraction"] = (rejected > 0).float().mean()
    return mt


def _native_offpolicy(R: torch.Tensor, count: torch.Tensor, n: torch.Tensor) -> Metrics:
    """verl's off-policy diagnostics from the kernel's rows (see :func:`offpolicy_metrics`)."""
    dtype = torch.float32
    nf = n.to(dtype) + 1e-8
    col = lambda i: R[:, i].to(dtype)  # noqa: E731
    mt: Metrics = {}
    mean_train = col(_R_LOGP) / (count + 1e-8)
    mt["training_ppl"] = (-mean_train).exp().mean()
    mt["training_log_ppl"] = (-mean_train).mean()
    mt["kl"] = -R[:, _R_LR].sum().to(dtype) / nf
    mt["k3_kl"] = R[:, _R_K3].sum().to(dtype) / nf
    mean_roll = col(_R_ROLLOUT) / (count + 1e-8)
    _ppl_gap_metrics(mt, mean_roll, mean_train)
    mt["chi2_token"] = R[:, _R_RATIO2].sum().to(dtype) / nf - 1.0
    seq = col(_R_LR).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    mt["chi2_seq"] = (2.0 * seq).exp().mean() - 1.0
    return mt


def _native_correction(lp, ro, response_mask, level, upper, lower, batch_normalize, options, want_weights):
    """The compiled counterpart of the body of :func:`correction_and_rejection`."""
    rows, weights, kept = _native_pass(lp, ro, response_mask, level, upper, lower, options, want_weights)
    count = rows[:, _R_COUNT].to(torch.float32)
    n = rows[:, _R_COUNT].sum().to(torch.int64)
    metrics: Metrics = {}
    if level is not None:
        mt, divisor = _native_is_metrics(rows, count, n, level, upper, lower, batch_normalize)
        metrics.update(mt)
        if divisor is not None and weights is not None:
            weights.div_(divisor)
    new_mask = None
    if options:
        metrics.update(_native_rs_metrics(rows, count, n, options))
        new_mask = kept if response_mask.dtype == torch.bool else (response_mask * kept).to(response_mask.dtype)
    metrics.update(_native_offpolicy(rows, count, n))
    return weights, new_mask, metrics, n


# ------------------------------------------------------------------------------------------
# entry points


def _prepare(old: torch.Tensor, rollout: Optional[torch.Tensor], mask: torch.Tensor, first: str = "old_log_prob",
             cast: bool = True):
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
    if cast:
        old, rollout = _promote(old, rollout)
    return old, rollout, mask.bool()


def _promote(old: torch.Tensor, rollout: Optional[torch.Tensor]):
    """Both log-probs detached in the type the torch path computes in: float32 or wider."""
    dtype = torch.promote_types(old.dtype, torch.float32)
    if rollout is not None:
        dtype = torch.promote_types(dtype, rollout.dtype)
    return old.detach().to(dtype), None if rollout is None else rollout.detach().to(dtype)


def _read(metrics: Metrics, n: torch.Tensor, prefix: str = "") -> Dict[str, float]:
    """Every metric as a Python float with one device sync; an empty mask raises as verl does."""
    keys = list(metrics)
    parts = [metrics[k].detach().reshape(()) for k in keys]
    dtypes = {p.dtype for p in parts}
    if len(dtypes) == 1:  # one stack, one cast (n only decides the empty-mask error)
        values = torch.stack([n.to(parts[0].dtype)] + parts).to(torch.float64).tolist()
    else:
        values = torch.stack([n.to(torch.float64)] + [p.to(torch.float64) for p in parts]).tolist()
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
                             rollout_rs_threshold=None, want_weights: bool = True,
                             copy_mask: bool = True) -> Tuple[Optional[torch.Tensor], torch.Tensor, Dict[str, float]]:
    """(IS weights or None, rejection-masked response mask, metrics with "rollout_corr/").

    ``want_weights=False`` skips writing the weights (their metrics are still computed; None
    is returned), ``copy_mask=False`` returns ``response_mask`` itself when nothing is rejected
    (for callers that only read it). CPU float32/bfloat16 log-probs take the compiled pass."""
    if rollout_log_prob is None:
        raise ValueError("rollout_log_prob is required")
    old, rollout, m = _prepare(old_log_prob, rollout_log_prob, response_mask, cast=False)
    level = None
    upper, lower = 0.0, None
    if rollout_is is not None and rollout_is_threshold is not None:
        upper, lower = parse_is_threshold(rollout_is_threshold)
        _check_level(rollout_is)
        level = rollout_is
    options = []
    if rollout_rs is not None:
        if rollout_rs_threshold is None:
            raise ValueError("rollout_rs_threshold must be explicitly provided when rollout_rs is enabled. "
                             "Set rollout_rs_threshold to the desired threshold value.")
        options = parse_rs(rollout_rs, rollout_rs_threshold)
    native = _native_inputs(old, rollout, response_mask)
    if native is not None:
        weights, new_mask, metrics, n = _native_correction(*native, response_mask, level, upper, lower,
                                                           rollout_is_batch_normalize, options, want_weights)
        if new_mask is None:
            new_mask = response_mask.clone() if copy_mask else response_mask
        return weights, new_mask, _read(metrics, n, "rollout_corr/")
    old, rollout = _promote(old, rollout)
    n = _count(m)
    log_ratio = old - rollout
    metrics: Metrics = {}
    weights = None
    if level is not None:
        weights, mt = is_weights(log_ratio, m, n, level, upper, lower, rollout_is_batch_normalize)
        metrics.update(mt)
        if not want_weights:
            weights = None
    new_mask = response_mask.clone() if copy_mask else response_mask
    if options and log_ratio.shape[0] > 0:
        keep, mt = rejection_mask(log_ratio, m, n, options)
        metrics.update(mt)
        new_mask = (response_mask * keep).to(response_mask.dtype)
    metrics.update(offpolicy_metrics(old, rollout, m))
    return weights, new_mask, _read(metrics, n, "rollout_corr/")


def correction_weights(log_ratio, response_mask, rollout_is="token", rollout_is_threshold=2.0,
                       rollout_is_batch_normalize=False):
    lr, _, m = _prepare(log_ratio, None, response_mask, "log_ratio")
    upper, lower = parse_is_threshold(rollout_is_threshold)
    n = _count(m)
    weights, mt = is_weights(lr, m, n, rollout_is, upper, lower, rollout_is_batch_normalize)
    return weights, _read(mt, n)


def rejection(log_ratio, response_mask, rollout_rs="token_k1", rollout_rs_threshold=None):
    options = parse_rs(rollout_rs, rollout_rs_threshold)
    if log_ratio.shape[0] == 0:
        return response_mask, {}
    lr, _, m = _prepare(log_ratio, None, response_mask, "log_ratio")
    n = _count(m)
    keep, mt = rejection_mask(lr, m, n, options)
    return (response_mask * keep).to(response_mask.dtype), _read(mt, n)


def offpolicy(old_log_prob, rollout_log_prob, response_mask) -> Dict[str, float]:
    old, rollout, m = _prepare(old_log_prob, rollout_log_prob, response_mask)
    n = _count(m)
    return _read(offpolicy_metrics(old, rollout, m), n)
