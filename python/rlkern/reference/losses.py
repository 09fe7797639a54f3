"""Reference policy, value and preference losses: the readable specification.

Plain PyTorch, differentiable by autograd, run in float64 by the tests. The fused
kernels (``rlkern.losses``) must reproduce these values and gradients.

Conventions shared with the kernels:

- ``mask`` marks active tokens. Inactive positions are replaced by zero before any
  arithmetic (``torch.where``), so they may hold NaN or inf, contribute nothing and get
  zero gradient.
- Sequences with no active token contribute nothing and are left out of every sequence
  mean (see :func:`aggregate`); their own token count is taken as 1 where a per-sequence
  mean needs one (the sequence-level ratio, the off-policy divergence).
- Every "detached" quantity (clipped CISPO weight, truncated importance weights, masks)
  carries no gradient; every other term is differentiated exactly as autograd would,
  including torch's convention for ties in max/min (the gradient is split in half) and
  for clamp (the gradient passes at the bounds).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch

from .kl import KL_KINDS, Clamp, clamp_bounds, kl_penalty

OBJECTIVES = ("clip", "cispo", "reinforce", "sapo", "geo_mean", "vespo", "dppo_tv", "dppo_kl")
# Objectives whose importance ratio is a sequence quantity of their own (level must be "token").
_SEQUENCE_OBJECTIVES = ("geo_mean",)
# VESPO's fixed clamps of the log-ratio (TRL 1.16 ``get_gamma_weights``): each token's to [-20, 20],
# the sequence sum and the log of each importance weight to [log(1e-8), 20].
VESPO_TOKEN_CLAMP = 20.0
VESPO_LOG_LOW = math.log(1e-8)
VESPO_LOG_HIGH = 20.0
# The lower clamp of VESPO's lambda and the epsilon of DPPO's binary KL, as in TRL and verl.
VESPO_LAMBDA_MIN = 1e-4
DPPO_KL_EPS = 1e-8
LEVELS = ("token", "sequence")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
TIS_MODES = ("truncate", "mask")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")

# Options of policy_loss that are tensors (the rest are in PolicyLossConfig).
TENSOR_OPTIONS = ("ref_logp", "rollout_logp", "entropy", "weights", "off_policy_logp")


class LossOutput(NamedTuple):
    """``loss`` (a 0-d tensor, differentiable) and ``metrics`` (detached tensors)."""

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor]


@dataclass(frozen=True)
class PolicyLossConfig:
    """Scalar options of :func:`policy_loss`; each default is written here once.

    objective: "clip" (PPO), "cispo", "reinforce", "sapo", "geo_mean", "vespo", "dppo_tv" or
        "dppo_kl" (see :func:`policy_loss` for each formula).
    level: "token", or "sequence" (GSPO: one ratio per sequence from the masked mean log-ratio).
    clip_low, clip_high: the clip range is [1 - clip_low, 1 + clip_high]; clip_high defaults to clip_low.
    dual_clip: c > 1 bounding the loss of negative-advantage tokens by -c A (verl's clip_ratio_c).
    ratio_cap: caps the unclipped ratio from above before the PPO min (TRL's ``delta``,
        two-sided clipping); above the cap the unclipped branch has zero gradient.
    log_ratio_clamp: clamps the (token or sequence) log-ratio before exp; a number c means
        [-c, c], a pair gives (low, high) with None for no bound. verl's vanilla loss uses 20,
        its GSPO loss (None, 10). Where it clamps the gradient is zero.
    kl_coef, kl_kind, kl_clamp, kl_is_correction: KL to the reference policy as a loss term
        (see ``rlkern.kl.kl_penalty``); with kl_is_correction the per-token KL is multiplied by
        the (non-detached) ratio.
    tis_cap, tis_level, tis_mode: truncated importance sampling against ``rollout_logp``:
        the policy term is multiplied by the detached weight w = exp(old - rollout) per token
        ("token") or exp(sum over the sequence of old - rollout) ("sequence"); "truncate" uses
        min(w, tis_cap), "mask" uses w where w <= tis_cap and 0 elsewhere. Off when tis_cap is None
        (tis_cap=inf keeps the weights unbounded above).
    tis_min: a lower bound (needs tis_cap, 0 < tis_min <= tis_cap): "truncate" uses
        clamp(w, tis_min, tis_cap), "mask" keeps w where tis_min <= w <= tis_cap (TRL 1.16's
        ``vllm_importance_sampling_clip_min``/``_clip_max``, verl 0.9.1's IcePop
        ``rollout_is_threshold`` lower/upper pair, OpenRLHF 0.11.2's token-level
        ``is_correction_threshold`` (low, high) with mode clip/mask). A NaN weight stays NaN.
    off_policy_threshold: tokens with negative advantage in sequences whose masked mean of
        (behaviour - logp) exceeds this get no policy term; the behaviour log-probs are the
        tensor ``off_policy_logp`` when given, else ``rollout_logp``, else ``old_logp``.
        (TRL 1.16 reads its sampling log-probs for both this mask and the vLLM importance
        weight, but replaces a NaN one by the current log-prob here and by the old one there:
        pass the two versions as off_policy_logp and rollout_logp.)
    entropy_coef: subtracts entropy_coef * agg(entropy).
    entropy_top_fraction: keep the policy term only on the top fraction of active tokens by
        entropy (threshold = the (1 - fraction) quantile of the active entropies in float32,
        linear interpolation, as TRL computes it; tokens with entropy >= threshold are kept).
    agg, normalizer: the aggregation (see :func:`aggregate`).
    sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures for tokens with
        A > 0 and A <= 0 (TRL 1.16's names and defaults; verl's ``tau_pos``/``tau_neg``, same
        defaults 1.0 and 1.05). Must be > 0.
    vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma weight
        phi(w) = exp(lambda + k log w - lambda w) for tokens with A >= 0 (pos) and A < 0 (neg);
        TRL 1.16's names and defaults (2.0, 3.0, 3.0, 2.0). lambda is clamped to >= 1e-4 as TRL does.

    Objective-specific meanings of the shared options: for "geo_mean" clip_low/clip_high
    bound the token LOG-ratio to [-clip_low, clip_high] (verl's GMPO uses its clip_ratio so);
    for "dppo_tv" they bound the probability difference p - p_old to [-clip_low, clip_high]
    and for "dppo_kl" the binary KL on either side (verl's DPPO reads its clip_ratio so),
    and ratio_cap truncates DPPO's detached ratio weight (verl's ``clip_ratio_c``).
    """

    objective: str = "clip"
    level: str = "token"
    clip_low: float = 0.2
    clip_high: Optional[float] = None
    dual_clip: Optional[float] = None
    ratio_cap: Optional[float] = None
    log_ratio_clamp: Clamp = None
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    kl_clamp: Clamp = None
    kl_is_correction: bool = False
    tis_cap: Optional[float] = None
    tis_min: Optional[float] = None
    tis_level: str = "token"
    tis_mode: str = "truncate"
    off_policy_threshold: Optional[float] = None
    entropy_coef: float = 0.0
    entropy_top_fraction: Optional[float] = None
    agg: str = "token-mean"
    # A number, or a 0-d tensor kept on its device and never read (no host sync).
    normalizer: Union[None, float, torch.Tensor] = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    @property
    def clip_range(self) -> Tuple[float, float]:
        high = self.clip_low if self.clip_high is None else self.clip_high
        return 1.0 - self.clip_low, 1.0 + high

    def validate(self) -> "PolicyLossConfig":
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        def number(name, *, low=None, low_open=False, optional=True):
            v = getattr(self, name)
            if v is None:
                if optional:
                    return
                raise TypeError(f"{name} must be a number, got None")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number, got {v!r}")
            if v != v:
                raise ValueError(f"{name} must not be NaN")
            if low is not None and (v < low or (low_open and v == low)):
                raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v}")

        choice("objective", OBJECTIVES)
        choice("level", LEVELS)
        choice("kl_kind", KL_KINDS)
        choice("tis_level", LEVELS)
        choice("tis_mode", TIS_MODES)
        choice("agg", AGG_MODES)
        number("clip_low", low=0.0, optional=False)
        number("clip_high", low=0.0)
        number("dual_clip", low=1.0, low_open=True)
        number("ratio_cap", low=0.0, low_open=True)
        number("kl_coef", optional=False)
        number("tis_cap", low=0.0, low_open=True)
        number("tis_min", low=0.0, low_open=True)
        if self.tis_min is not None:
            if self.tis_cap is None:
                raise ValueError("tis_min needs tis_cap (the upper bound; tis_cap=inf for none)")
            if self.tis_min > self.tis_cap:
                raise ValueError(f"tis_min must be <= tis_cap, got tis_min={self.tis_min} > tis_cap={self.tis_cap}")
        number("off_policy_threshold")
        number("entropy_coef", optional=False)
        number("entropy_top_fraction", low=0.0, low_open=True)
        if self.entropy_top_fraction is not None and self.entropy_top_fraction > 1:
            raise ValueError(f"entropy_top_fraction must be in (0, 1], got {self.entropy_top_fraction}")
        number("normalizer", low=0.0, low_open=True)
        if not isinstance(self.kl_is_correction, bool):
            raise TypeError(f"kl_is_correction must be a bool, got {self.kl_is_correction!r}")
        number("sapo_temperature_pos", low=0.0, low_open=True, optional=False)
        number("sapo_temperature_neg", low=0.0, low_open=True, optional=False)
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            number(name, optional=False)
        clamp_bounds("log_ratio_clamp", self.log_ratio_clamp)
        clamp_bounds("kl_clamp", self.kl_clamp)
        if self.objective in _SEQUENCE_OBJECTIVES:
            # GMPO's loss is one term per sequence; per-token weights and a per-token ratio in
            # the KL term would need a second pass over the row and are not offered.
            for name, bad in (("level", self.level != "token"), ("kl_is_correction", self.kl_is_correction),
                              ("entropy_top_fraction", self.entropy_top_fraction is not None),
                              ("off_policy_threshold", self.off_policy_threshold is not None),
                              ("tis_level", self.tis_cap is not None and self.tis_level != "sequence")):
                if bad:
                    raise ValueError(f"objective={self.objective!r} does not take {name}={getattr(self, name)!r}: "
                                     "its loss is one term per sequence (use level='token', tis_level='sequence', "
                                     "no kl_is_correction, entropy_top_fraction or off_policy_threshold)")
        if self.objective == "vespo" and self.tis_cap is not None and self.tis_level != "token":
            raise ValueError("objective='vespo' folds the importance weights into its sequence weight token by "
                             "token: tis_level must be 'token' (TRL allows only the token vLLM modes with VESPO)")
        return self


POLICY_OPTIONS = tuple(f.name for f in dataclasses.fields(PolicyLossConfig)) + TENSOR_OPTIONS


def parse_policy_options(options: dict) -> Tuple[PolicyLossConfig, Dict[str, Optional[torch.Tensor]]]:
    """Split ``**options`` into the scalar config and the optional tensors; unknown names raise.

    A tensor ``normalizer`` (0-d) is kept as it is on the config, unvalidated (reading its
    value would synchronise with its device). Traceable by dynamo: under torch.compile the
    config is built and validated without the cache (options are constants there, so the
    checks fold away)."""
    for name in options:
        if name not in POLICY_OPTIONS:
            raise TypeError(f"policy_loss got an unknown option {name!r}; options are {', '.join(POLICY_OPTIONS)}")
    tensors = {name: options.get(name) for name in TENSOR_OPTIONS}
    scalars = {k: v for k, v in options.items() if k not in TENSOR_OPTIONS}
    normalizer = scalars.get("normalizer")
    tensor_normalizer = isinstance(normalizer, torch.Tensor)
    if tensor_normalizer:
        scalars["normalizer"] = None
    if torch.compiler.is_compiling():
        cfg = PolicyLossConfig(**scalars).validate()
    else:
        # Each value's type is part of the key: 1, 1.0 and True compare equal but validate differently.
        key = tuple((k, type(v), v) for k, v in scalars.items())
        try:
            cfg = _config_of(key)
        except TypeError as e:
            if "unhashable" not in str(e):
                raise
            cfg = PolicyLossConfig(**scalars).validate()  # e.g. a list for a clamp
    if tensor_normalizer:
        cfg = dataclasses.replace(cfg, normalizer=normalizer)
    return cfg, tensors


@functools.lru_cache(maxsize=256)
def _config_of(scalars: Tuple[Tuple[str, type, object], ...]) -> PolicyLossConfig:
    # A trainer passes the same options every step: validating them once saves a good part
    # of a small batch's Python time. Errors are not cached (lru_cache stores only results).
    return PolicyLossConfig(**{k: v for k, _, v in scalars}).validate()


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str,
              normalizer: Union[None, float, torch.Tensor] = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss over the active tokens to a scalar (verl 0.9.1's
    ``agg_loss``).

    - token-mean: sum(l m) / sum(m) (0 when no token is active);
    - token-sum: sum(l m);
    - seq-mean-token-mean: mean over the non-empty sequences of sum_t(l m) / n_i;
    - seq-mean-token-sum: mean over the non-empty sequences of sum_t(l m);
    - seq-mean-token-sum-norm: mean over the non-empty sequences of sum_t(l m) / T, T the
      padded length (Dr.GRPO; verl's default ``loss_scale_factor``).

    A sequence with no active token (n_i = 0) is left out of every sequence mean: it
    neither contributes nor counts, as in verl 0.9.1 and OpenRLHF 0.11.2. A batch without
    any active token gives 0. A given ``normalizer`` replaces the final denominator: the
    token count for token-mean, 1 for token-sum, the number of non-empty sequences for the
    seq-* modes (so data-parallel ranks pass the global token or sequence count).
    """
    m = mask.to(per_token.dtype)
    seq_sums = (per_token * m).sum(-1)
    count = m.sum(-1)
    T = per_token.shape[-1]
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if agg == "seq-mean-token-mean":
        seq_sums = seq_sums / count.clamp(min=1)
    elif agg == "seq-mean-token-sum-norm":
        seq_sums = seq_sums / T
    if normalizer is not None:
        denom = normalizer
    elif agg == "token-mean":
        denom = count.sum().clamp(min=1)
    elif agg == "token-sum":
        denom = 1.0
    else:
        denom = (count > 0).sum().clamp(min=1).to(per_token.dtype)
    return seq_sums.sum() / denom


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """The (1 - top_fraction) quantile of the active entropies, taken in float32 with linear
    interpolation exactly as TRL's ``get_high_entropy_mask`` does (``torch.quantile`` of the
    float32 values), so that ties at the threshold resolve the same way; +inf when no token
    is active. Returns a float32 0-d tensor."""
    values = entropy.detach()[mask].float()
    if values.numel() == 0:
        return torch.full((), float("inf"), dtype=torch.float32, device=entropy.device)
    q = 1.0 - top_fraction
    if values.numel() <= 2**24:  # torch.quantile's input limit
        return torch.quantile(values, q)
    values, _ = torch.sort(values)
    pos = q * (values.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, values.numel() - 1)
    return torch.lerp(values[lo], values[hi], torch.tensor(pos - lo, dtype=values.dtype, device=values.device))


def bound_importance_weight(w: torch.Tensor, cfg: PolicyLossConfig) -> torch.Tensor:
    """The truncated ("truncate": clamp to [tis_min, tis_cap]) or masked ("mask": 0 outside
    [tis_min, tis_cap]) importance weight; NaN stays NaN (torch.clamp, and no comparison
    with NaN is true)."""
    if cfg.tis_mode == "truncate":
        return torch.clamp(w, min=cfg.tis_min, max=cfg.tis_cap)
    outside = w > cfg.tis_cap
    if cfg.tis_min is not None:
        outside = outside | (w < cfg.tis_min)
    return torch.where(outside, torch.zeros_like(w), w)


def check_tensor_options(cfg: PolicyLossConfig, tensors: Dict[str, Optional[torch.Tensor]]) -> None:
    """Per-token ``weights`` are refused where the loss is one term per sequence;
    ``off_policy_logp`` is read only by the off-policy mask."""
    if tensors["off_policy_logp"] is not None and cfg.off_policy_threshold is None:
        raise ValueError("off_policy_logp is only read by the off-policy sequence mask: it needs off_policy_threshold")
    weights = tensors["weights"]
    if weights is not None and cfg.objective in _SEQUENCE_OBJECTIVES:
        raise ValueError(f"objective={cfg.objective!r} does not take weights (per-token weights): its loss is one "
                         "term per sequence (fold a per-sequence weight into the advantages instead)")


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    mf = m.to(x.dtype)
    return ((x * mf).sum() / mf.sum().clamp(min=1)).detach()


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                **options) -> LossOutput:
    """Reference of :func:`rlkern.losses.policy_loss` (same options)."""
    cfg, tensors = parse_policy_options(options)
    ref_logp, rollout_logp, entropy = tensors["ref_logp"], tensors["rollout_logp"], tensors["entropy"]
    weights, off_policy_logp = tensors["weights"], tensors["off_policy_logp"]
    check_tensor_options(cfg, tensors)
    m = mask != 0
    # Arithmetic in the widest floating type among the inputs (float64 when any is).
    dtype = logp.dtype
    for t in (old_logp, advantages, ref_logp, rollout_logp, entropy, weights, off_policy_logp):
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)

    def active(x: torch.Tensor) -> torch.Tensor:
        return torch.where(m, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))

    lp = active(logp)
    old = active(old_logp)
    adv = active(advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages)
    count = m.sum(-1, keepdim=True).clamp(min=1).to(dtype)

    log_ratio = lp - old
    if cfg.level == "sequence":
        log_ratio = ((log_ratio.sum(-1, keepdim=True)) / count).expand_as(lp)
    low, high = clamp_bounds("log_ratio_clamp", cfg.log_ratio_clamp)
    if low is not None or high is not None:
        log_ratio = torch.clamp(log_ratio, min=low, max=high)
    clamped_log_ratio = log_ratio.detach()
    ratio = torch.exp(log_ratio)

    clip_lo, clip_hi = cfg.clip_range
    clip_high = cfg.clip_low if cfg.clip_high is None else cfg.clip_high
    extra_metrics: Dict[str, torch.Tensor] = {}
    valid = None  # DPPO's trust-region mask
    if cfg.objective == "geo_mean":
        # GMPO: y_t = sign(A_t) min(sign(A_t) x_t, sign(A_t) clamp(x_t, -clip_low, clip_high)) clips
        # each token's log-ratio on the side that would grow the objective; the sequence ratio
        # is exp of their masked mean, shared with the masked-mean advantage by every token.
        sgn = torch.sign(adv)
        x_clamped = torch.clamp(log_ratio, -cfg.clip_low, clip_high)
        y = sgn * torch.minimum(sgn * log_ratio, sgn * x_clamped)
        ratio = torch.exp((y * m.to(dtype)).sum(-1, keepdim=True) / count).expand_as(lp)
        seq_adv = ((adv * m.to(dtype)).sum(-1, keepdim=True) / count).expand_as(lp)
        outside = (log_ratio.detach() != x_clamped.detach()) & m
        extra_metrics["clip_frac_low"] = _masked_mean((outside & (adv < 0)).to(dtype), m)
        extra_metrics["clip_frac_high"] = _masked_mean((outside & (adv > 0)).to(dtype), m)
        pg = -seq_adv * ratio
    elif cfg.objective == "clip":
        unclipped = ratio if cfg.ratio_cap is None else torch.clamp(ratio, max=cfg.ratio_cap)
        pg = torch.maximum(-adv * unclipped, -adv * torch.clamp(ratio, clip_lo, clip_hi))
        if cfg.dual_clip is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -adv * cfg.dual_clip), pg)
    elif cfg.objective == "cispo":
        pg = -torch.clamp(ratio, clip_lo, clip_hi).detach() * adv * lp
        # The tokens whose weight the clip changes, whatever the advantage's sign (verl's
        # pg_clipfrac: ratio != clip(ratio), so a NaN ratio counts as clipped).
        r = ratio.detach()
        extra_metrics["clip_frac"] = _masked_mean((~((r >= clip_lo) & (r <= clip_hi))).to(dtype), m)
    elif cfg.objective == "sapo":
        # The soft gate f(r) = sigmoid(tau (r - 1)) 4 / tau replaces the hard clip: its slope
        # 4 sigmoid (1 - sigmoid) is 1 at r = 1 and decays smoothly away from it.
        tau = torch.where(adv > 0, torch.full_like(adv, cfg.sapo_temperature_pos),
                          torch.full_like(adv, cfg.sapo_temperature_neg))
        pg = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    elif cfg.objective == "vespo":
        # phi(w) = exp(lambda + k log w - lambda w) of the sequence weight w = prod_t r_t (times
        # the importance weights against the rollout, in log space), detached.
        log_w = torch.clamp(lp - old, -VESPO_TOKEN_CLAMP, VESPO_TOKEN_CLAMP).sum(-1, keepdim=True)
        if cfg.tis_cap is not None:
            w_tis = bound_importance_weight(torch.exp(old - active(rollout_logp)), cfg)
            log_tis = torch.clamp(torch.log(w_tis), VESPO_LOG_LOW, VESPO_LOG_HIGH)
            log_w = log_w + torch.where(m, log_tis, torch.zeros_like(log_tis)).sum(-1, keepdim=True)
        log_w = torch.clamp(log_w, VESPO_LOG_LOW, VESPO_LOG_HIGH)
        nonneg = adv >= 0
        k = torch.where(nonneg, torch.full_like(adv, cfg.vespo_k_pos), torch.full_like(adv, cfg.vespo_k_neg))
        lam = torch.where(nonneg, torch.full_like(adv, cfg.vespo_lambda_pos),
                          torch.full_like(adv, cfg.vespo_lambda_neg)).clamp(min=VESPO_LAMBDA_MIN)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        phi = phi.detach()
        pg = -phi * adv * lp
        extra_metrics["phi_mean"] = _masked_mean(phi, m)
        row_phi = (phi * m.to(dtype)).sum(-1) / count[:, 0]
        nonempty = m.any(-1)
        extra_metrics["phi_seq_mean"] = (row_phi[nonempty].sum() / nonempty.sum().clamp(min=1)).detach()
    elif cfg.objective in ("dppo_tv", "dppo_kl"):
        # DPPO: REINFORCE with the detached (truncated) ratio as weight, dropped where the
        # token left the trust region in the direction its advantage pushes.
        p_new, p_old = torch.exp(lp.detach()), torch.exp(old)
        if cfg.objective == "dppo_tv":
            valid = torch.where(adv > 0, (p_new - p_old) <= clip_high, (p_new - p_old) >= -cfg.clip_low)
        else:
            bkl = p_old * (old - lp.detach()) + (1 - p_old) * torch.log((1.0 - p_old + DPPO_KL_EPS)
                                                                        / (1.0 - p_new + DPPO_KL_EPS))
            valid = torch.where(adv > 0, (bkl <= clip_high) | (p_new <= p_old),
                                (bkl <= cfg.clip_low) | (p_new >= p_old))
        w = ratio if cfg.ratio_cap is None else torch.clamp(ratio, max=cfg.ratio_cap)
        pg = -adv * w.detach() * lp * valid.to(dtype)
        invalid = ~valid & m
        extra_metrics["clip_frac_low"] = _masked_mean((invalid & ~(adv > 0)).to(dtype), m)
        extra_metrics["clip_frac_high"] = _masked_mean((invalid & (adv > 0)).to(dtype), m)
        trunc = torch.zeros_like(m) if cfg.ratio_cap is None else (ratio.detach() > cfg.ratio_cap)
        extra_metrics["trunc_frac"] = _masked_mean((trunc & valid).to(dtype), m)
    else:
        pg = -adv * lp

    if cfg.off_policy_threshold is not None:
        behaviour = old if rollout_logp is None else active(rollout_logp)
        if off_policy_logp is not None:
            behaviour = active(off_policy_logp)
        divergence = (behaviour - lp.detach()).sum(-1, keepdim=True) / count
        pg = pg * ((adv >= 0) | (divergence <= cfg.off_policy_threshold)).to(dtype)
    if cfg.entropy_top_fraction is not None:
        ent = active(entropy)
        pg = pg * (ent.detach() >= entropy_threshold(ent, m, cfg.entropy_top_fraction)).to(dtype)
    if cfg.tis_cap is not None and cfg.objective != "vespo":
        log_w = old - active(rollout_logp)
        if cfg.tis_level == "sequence":
            log_w = log_w.sum(-1, keepdim=True)
        else:
            # The tokens whose weight the band changes: in "mask" mode those not inside it (a NaN
            # weight counts), in "truncate" mode those below or above it (OpenRLHF's is_filter_ratio).
            w_raw = torch.exp(log_w).detach()
            lo = 0.0 if cfg.tis_min is None else cfg.tis_min
            if cfg.tis_mode == "mask":
                outside = ~((w_raw >= lo) & (w_raw <= cfg.tis_cap))
            else:
                outside = (w_raw < lo) | (w_raw > cfg.tis_cap)
            extra_metrics["tis_clip_frac"] = _masked_mean(outside.to(dtype), m)
        w = bound_importance_weight(torch.exp(log_w), cfg)
        pg = pg * w.detach()
    if weights is not None:
        # Multiplied like the TIS weight: a zero weight zeroes a finite term, but 0 * inf is NaN.
        pg = pg * active(weights).detach()

    per_token = pg
    metrics: Dict[str, torch.Tensor] = {}
    if ref_logp is not None:
        kl = kl_penalty(lp, active(ref_logp), cfg.kl_kind, cfg.kl_clamp)
        metrics["kl"] = _masked_mean(kl, m)
        if cfg.kl_coef != 0:
            per_token = per_token + cfg.kl_coef * (kl * ratio if cfg.kl_is_correction else kl)
    if rollout_logp is not None:
        # k1 of KL(rollout || old) on the rollout's tokens (OpenRLHF's vllm_kl)
        metrics["rollout_kl"] = _masked_mean(active(rollout_logp) - old, m)
    if entropy is not None:
        ent = active(entropy)
        metrics["entropy"] = _masked_mean(ent, m)
        if cfg.entropy_coef != 0:
            per_token = per_token - cfg.entropy_coef * ent

    loss = aggregate(per_token, m, cfg.agg, cfg.normalizer)

    r = ratio.detach()
    metrics["clip_frac_low"] = _masked_mean(((r < clip_lo) & (adv < 0)).to(dtype), m)
    metrics["clip_frac_high"] = _masked_mean(((r > clip_hi) & (adv > 0)).to(dtype), m)
    metrics["ratio_mean"] = _masked_mean(r, m)
    metrics["approx_kl"] = _masked_mean(old - lp.detach(), m)
    if cfg.level == "token" and (low is not None or high is not None):
        # What verl reports as ppo_kl: the mean of the negated log-ratio after the clamp.
        metrics["approx_kl_clamped"] = _masked_mean(-clamped_log_ratio, m)
    metrics.update(extra_metrics)
    if cfg.objective == "clip" and cfg.dual_clip is not None:
        unclipped = r if cfg.ratio_cap is None else torch.clamp(r, max=cfg.ratio_cap)
        surrogate = torch.maximum(-adv * unclipped, -adv * torch.clamp(r, clip_lo, clip_hi))
        metrics["dual_clip_frac"] = _masked_mean(((adv < 0) & (surrogate > -adv * cfg.dual_clip)).to(dtype), m)
    return LossOutput(loss, metrics)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: Optional[float] = None, agg: str = "token-mean", normalizer: Optional[float] = None) -> LossOutput:
    """0.5 * agg(max((v - R)^2, (clip(v, v_old - clip, v_old + clip) - R)^2)); without clip 0.5 * agg((v - R)^2).

    metrics: ``clip_frac`` (active tokens where the clipped error is the larger),
    ``value_mean`` (masked mean of v).
    """
    m = mask != 0
    dtype = torch.promote_types(values.dtype, returns.dtype)
    if clip is not None and old_values is not None:
        dtype = torch.promote_types(dtype, old_values.dtype)

    def active(x):
        return torch.where(m, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))

    v, R = active(values), active(returns)
    err = (v - R) ** 2
    metrics: Dict[str, torch.Tensor] = {}
    if clip is not None:
        v_old = active(old_values)
        err_clipped = (torch.clamp(v, v_old - clip, v_old + clip) - R) ** 2
        metrics["clip_frac"] = _masked_mean((err_clipped > err).to(dtype), m)
        err = torch.maximum(err, err_clipped)
    else:
        metrics["clip_frac"] = torch.zeros((), dtype=dtype, device=values.device)
    metrics["value_mean"] = _masked_mean(v, m)
    return LossOutput(0.5 * aggregate(err, m, agg, normalizer), metrics)


def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> LossOutput:
    """DPO family over sequence log-probs [B]; the loss is the batch mean.

    z = (chosen - ref_chosen) - (rejected - ref_rejected);
    sigmoid: -(1 - ls) log sigmoid(beta z) - ls log sigmoid(-beta z);
    ipo: (z - 1 / (2 beta))^2; hinge: relu(1 - beta z).
    metrics: ``chosen_rewards`` = beta (chosen - ref_chosen), ``rejected_rewards`` likewise
    ([B], detached), ``reward_margin`` and ``reward_accuracy`` (batch means).
    """
    z = (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)
    if loss_type == "sigmoid":
        losses = (-torch.nn.functional.logsigmoid(beta * z) * (1 - label_smoothing)
                  - torch.nn.functional.logsigmoid(-beta * z) * label_smoothing)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    chosen_rewards = (beta * (chosen_logp - ref_chosen_logp)).detach()
    rejected_rewards = (beta * (rejected_logp - ref_rejected_logp)).detach()
    metrics = {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
    }
    return LossOutput(losses.mean(), metrics)


def bradley_terry_loss(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor,
                       margin: Optional[torch.Tensor] = None) -> LossOutput:
    """mean(-log sigmoid(chosen - rejected - margin)) over the batch (TRL's RewardTrainer).

    metrics: ``accuracy`` (fraction with chosen > rejected), ``reward_margin`` (mean of chosen - rejected).
    """
    diff = chosen_reward - rejected_reward
    if margin is not None:
        diff = diff - margin
    loss = -torch.nn.functional.logsigmoid(diff).mean()
    d = (chosen_reward - rejected_reward).detach()
    return LossOutput(loss, {"accuracy": (d > 0).to(d.dtype).mean(), "reward_margin": d.mean()})
