"""OpenRLHF's PPO losses on rlkern kernels: swap an import, or swap OpenRLHF's classes in one line.

    # from openrlhf.models.loss import PolicyLoss, ValueLoss
    # from openrlhf.models.utils import compute_approx_kl, compute_reward, masked_mean
    from rlkern.integrations.openrlhf import PolicyLoss, ValueLoss, compute_approx_kl, compute_reward, masked_mean
    # or, before building the trainer, patch OpenRLHF itself (uninstall() restores it):
    import rlkern.integrations.openrlhf as ro; ro.install()

Constructors, ``forward`` signatures and return values follow ``openrlhf/models/loss.py`` and
``openrlhf/models/utils.py`` of OpenRLHF 0.11.2: ``PolicyLoss`` takes the ``is_correction_*``
arguments and its ``forward`` takes ``rollout_log_probs`` and the global-batch arguments
(``dp_size``, ``batch_num_tokens``, ``global_batch_size``) and returns
``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``. The PPO log-ratio is clamped to
[-20, 20] and every KL estimate to [-10, 10] (zero gradient where clamped), as OpenRLHF does.
OpenRLHF itself is needed only for :func:`install`.

Deliberate differences, at degenerate inputs: where OpenRLHF divides by a zero token count (an
all-masked batch) the loss and the token metrics here are 0 instead of NaN; with token-level
ratio gating (the fused kernel's importance-sampling band) a NaN importance ratio at an active
token (a NaN rollout log-prob, or -inf in both old and rollout) makes the loss NaN, where
OpenRLHF's mask mode drops the token.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .. import _backend
from .._kernel import core, dtype_code, ptr
from ..kl import _kl_penalty_capped
from ..losses import _policy_loss_reading as _reading
from ..losses import value_loss
from ..returns import discounted_returns, gae, group_advantages
from . import _peers

__all__ = ["PolicyLoss", "ValueLoss", "compute_approx_kl", "compute_reward", "masked_mean",
           "get_advantages_and_returns", "get_cumulative_returns", "normalize_advantages",
           "compute_advantages_and_returns", "install", "uninstall"]

_LOG_RATIO_CLAMP = 20.0
# The kernel's metrics PolicyLoss returns (clip_ratio, ppo_kl); the kernel computes only those
# totals (rlkern.losses._policy_loss_reading).
_CLIP_KL = ("clip_frac_low", "clip_frac_high", "approx_kl")
_KL_CLAMP = 10.0
KL_IS_WEIGHT_CLIP = 10.0


def masked_mean(tensor: torch.Tensor, mask: Optional[torch.Tensor], dim: int = None) -> torch.Tensor:
    """OpenRLHF's ``masked_mean``: sum(x m) / sum(m) over ``dim`` (all when None); the plain mean without a mask."""
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def _agg(token_level: bool, mask: torch.Tensor, dp_size, batch_num_tokens, global_batch_size):
    """OpenRLHF's ``aggregate_loss`` as rlkern's agg/normalizer (token-mean or seq-mean-token-mean,
    empty sequences left out of the sequence mean)."""
    if token_level:
        if batch_num_tokens is None:
            return "token-mean", None
        return "token-mean", _peers.scaled(batch_num_tokens, dp_size)
    if global_batch_size is None:
        return "seq-mean-token-mean", None
    return "seq-mean-token-mean", _peers.scaled(global_batch_size, dp_size)


class PolicyLoss(nn.Module):
    """PPO clipped policy loss (OpenRLHF's ``PolicyLoss``) on rlkern's fused kernel.

    ``policy_loss_type="ppo"``: r = exp(clamp(lp - old, -20, 20)) per token; ``"gspo"``:
    r = exp(masked mean over the sequence of lp - old (lp - rollout with IS correction on)).
    loss = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), for A < 0 bounded by -dual_clip A.
    With ``is_correction_level`` "token"/"seq" (ppo), a detached coefficient from
    pi_train / pi_rollout = exp(old - rollout) multiplies each token's loss: the gate reads the
    ratio (``is_correction_gating="ratio"``; per sequence its geometric mean), or the sampled-token
    ``binary_kl`` / ``tv`` divergence (per sequence its mean); ``"mask"`` keeps the token's IS
    weight inside [low, high] and 0 outside, ``"clip"`` clamps the ratio into [low, high].
    Aggregated as the token mean (``token_level_loss``) or the mean over non-empty sequences of
    their token means (always for gspo), over the global batch when its sizes are given.
    ``forward`` returns ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``.

    On CPU tensors the sequence-level ratio gate is one compiled pass over the rows
    (``is_seq_gate``), after which the fused kernel forms the kept rows' weights itself; the
    token-level bands the kernel's band does not take (low > high, high <= 0) are one compiled
    pass (``is_correction_gate``) whose coefficient is the kernel's ``weights``; the divergence
    gates and device tensors take torch ops. Masked positions never reach a gate's statistic (NaN held
    there does not leak, unlike OpenRLHF's masked mean); an empty row's statistic is NaN, so
    its sequence counts as filtered, as in OpenRLHF.
    """

    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo", is_correction_level: str = "off",
                 is_correction_mode: str = "mask", is_correction_gating: str = "ratio",
                 is_correction_threshold: list = (0.5, 5.0)) -> None:
        super().__init__()
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"Invalid policy loss type: {policy_loss_type}")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        if is_correction_level not in {"off", "token", "seq"}:
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level}")
        if is_correction_mode not in {"mask", "clip"}:
            raise ValueError(f"is_correction_mode must be mask/clip, got {is_correction_mode}")
        if is_correction_gating not in {"ratio", "binary_kl", "tv"}:
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}")
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode=clip requires is_correction_level=token and "
                             "is_correction_gating=ratio")
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only (a single delta)")
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.policy_loss_type = policy_loss_type
        self.token_level_loss = False if policy_loss_type == "gspo" else token_level_loss
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold

    def _gate_inputs(self, old_log_probs, rollout_log_probs, m):
        """(old, rollout, mask bytes) for the compiled ratio gates, contiguous in one floating
        storage dtype; None where they do not apply (another gating, device tensors or tensor
        subclasses, the reference backend, tracing, shapes OpenRLHF would broadcast)."""
        if self.is_correction_gating != "ratio" or m.dim() != 2 or m.numel() == 0:
            return None
        tensors = (old_log_probs, rollout_log_probs, m)
        if any(type(t) is not torch.Tensor or t.device.type != "cpu" for t in tensors) \
                or torch.compiler.is_compiling() or _backend.select(m.device) != "cpu":
            return None
        if old_log_probs.shape != m.shape or rollout_log_probs.shape != m.shape:
            return None
        storage = old_log_probs.dtype if old_log_probs.dtype == rollout_log_probs.dtype else \
            torch.promote_types(torch.promote_types(old_log_probs.dtype, rollout_log_probs.dtype), torch.float32)
        if not storage.is_floating_point:
            return None
        return (old_log_probs.detach().to(storage).contiguous(), rollout_log_probs.detach().to(storage).contiguous(),
                m.contiguous().view(torch.uint8))

    def _compiled_seq_gate(self, old_log_probs, rollout_log_probs, m):
        """The sequence-level ratio gate (mask mode) for the fused kernel's own importance weights:
        kept rows keep their rollout log-probs, so the kernel's weight there is exp(old - rollout),
        OpenRLHF's token_is; a dropped row's rollout log-probs become +inf (weight exp(-inf) = 0).
        The kernel then reads the bfloat16 inputs as they are (a float32 ``weights`` tensor would
        make it upcast every input). Returns (rollout for the kernel, vllm_kl, is_filter_ratio),
        or None where the compiled gate does not apply."""
        if self.is_correction_level != "seq" or self.is_correction_mode != "mask":
            return None
        inputs = self._gate_inputs(old_log_probs, rollout_log_probs, m)
        if inputs is None:
            return None
        old, roll, mb = inputs
        B, T = m.shape
        keep = torch.empty(B, dtype=torch.bool)
        low, high = (float(x) for x in self.is_correction_threshold)
        filtered, kl_sum, active = core().losses.is_seq_gate(B, T, dtype_code(old), ptr(old), ptr(roll), ptr(mb),
                                                             low, high, ptr(keep))
        rollout = rollout_log_probs.detach()
        if filtered:
            rollout = torch.where(keep.unsqueeze(-1), rollout, torch.tensor(math.inf, dtype=rollout.dtype))
        acc = torch.float64 if old.dtype == torch.float64 else torch.float32
        return (rollout, torch.tensor(kl_sum / max(active, 1), dtype=acc), torch.tensor(filtered / B, dtype=acc))

    def _compiled_gate(self, old_log_probs, rollout_log_probs, m):
        """The ratio gate in one pass of the CPU kernel (``is_correction_gate``): the coefficient
        (float32, float64 for float64 inputs) and the filtered fraction; None where it does not
        apply (see _gate_inputs)."""
        inputs = self._gate_inputs(old_log_probs, rollout_log_probs, m)
        if inputs is None:
            return None
        old, roll, mb = inputs
        B, T = m.shape
        coef = torch.empty((B, T), dtype=torch.float64 if old.dtype == torch.float64 else torch.float32)
        low, high = (float(x) for x in self.is_correction_threshold)
        seq_level = self.is_correction_level == "seq"
        filtered = core().losses.is_correction_gate(B, T, dtype_code(old), ptr(old), ptr(roll), ptr(mb), seq_level,
                                                     self.is_correction_mode == "clip", low, high, ptr(coef))
        units = B if seq_level else int(mb.sum())
        return coef, torch.tensor(filtered / max(units, 1))

    @torch.no_grad()
    def _is_coefficient(self, old_log_probs, rollout_log_probs, m):
        """The detached per-token coefficient of the IS correction, and the filtered fraction."""
        compiled = self._compiled_gate(old_log_probs, rollout_log_probs, m)
        if compiled is not None:
            return compiled
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        mf = m.to(torch.float32)
        zero = torch.zeros((), dtype=torch.float32, device=m.device)

        def row_mean(x):  # masked positions selected out: a NaN held there does not leak
            return (torch.where(m, x, zero).sum(-1) / mf.sum(-1)).unsqueeze(-1)

        is_log_ratio = old_log_probs.float() - rollout_log_probs.float()
        token_is = is_log_ratio.exp()
        if self.is_correction_gating == "ratio":
            stat = row_mean(is_log_ratio) if seq_level else is_log_ratio
            stat = stat.exp()
        else:
            p = rollout_log_probs.float().exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.float().exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq_level:
                stat = row_mean(stat)
        if self.is_correction_mode == "clip":
            coef = stat.clamp(min=low, max=high)
            filtered = (stat < low) | (stat > high)
        else:
            keep = (stat >= low) & (stat <= high)
            coef = torch.where(keep, token_is, zero)
            filtered = ~keep
        if seq_level:
            filter_ratio = filtered.float().mean()
        else:
            filter_ratio = (filtered & m).float().sum() / mf.sum().clamp(min=1)
        return coef.expand(m.shape), filter_ratio

    def _kernel_band(self) -> Optional[dict]:
        """The IS correction as the fused kernel's token-level band (tis_*), when it is one:
        token level, gated by the ratio itself, a band the kernel takes (0 < high, low <= high).
        OpenRLHF's mask keeps exp(old - rollout) inside [low, high] (the kernel's "mask" mode),
        its clip clamps it into the band ("truncate"); its is_filter_ratio is the kernel's
        tis_clip_frac in either mode. None: the coefficient is formed here and passed as weights."""
        if self.is_correction_level != "token" or self.is_correction_gating != "ratio":
            return None
        low, high = (float(x) for x in self.is_correction_threshold)
        if not (high > 0 and low <= high):  # NaN fails too
            return None
        return dict(tis_cap=high, tis_min=low if low > 0 else None,
                    tis_mode="mask" if self.is_correction_mode == "mask" else "truncate")

    def forward(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                action_mask: Optional[torch.Tensor] = None, rollout_log_probs: Optional[torch.Tensor] = None,
                dp_size: int = 1, batch_num_tokens: Optional[float] = None,
                global_batch_size: Optional[float] = None):
        m = torch.ones(log_probs.shape, dtype=torch.bool, device=log_probs.device) if action_mask is None \
            else action_mask.bool()
        correcting = self.is_correction_level != "off"
        if correcting and rollout_log_probs is None:
            raise ValueError("rollout_log_probs is required when is_correction_level is not 'off'")
        agg, norm = _agg(self.token_level_loss, m, dp_size, batch_num_tokens, global_batch_size)
        vllm_kl = is_filter_ratio = None
        common = dict(objective="clip", clip_low=self.clip_eps_low, clip_high=self.clip_eps_high,
                      dual_clip=self.dual_clip, agg=agg, normalizer=norm)
        if self.policy_loss_type == "gspo":
            # OpenRLHF's GSPO ratio is taken against the rollout policy when IS correction is on
            base = rollout_log_probs if correcting else old_log_probs
            read = ("clip_frac_low", "clip_frac_high") + (() if correcting else ("approx_kl",))
            out = _reading(read, log_probs, base, advantages, m, level="sequence", **common)
            clip_ratio = out.metrics["clip_frac_low"] + out.metrics["clip_frac_high"]
            if correcting:
                with torch.no_grad():
                    ppo_kl = _peers.masked_mean(old_log_probs.float() - log_probs.detach().float(), m)
            else:
                ppo_kl = out.metrics["approx_kl"]
            return _peers.owned(out.loss), clip_ratio, ppo_kl, vllm_kl, is_filter_ratio
        if not correcting:
            out = _reading(_CLIP_KL, log_probs, old_log_probs, advantages, m, log_ratio_clamp=_LOG_RATIO_CLAMP,
                           **common)
            clip_ratio = out.metrics["clip_frac_low"] + out.metrics["clip_frac_high"]
            return _peers.owned(out.loss), clip_ratio, out.metrics["approx_kl"], vllm_kl, is_filter_ratio
        # OpenRLHF's ppo_kl is of the unclamped log-ratio: the kernel's approx_kl (not approx_kl_clamped);
        # its vllm_kl is the kernel's rollout_kl
        seq_gate = self._compiled_seq_gate(old_log_probs, rollout_log_probs, m)
        if seq_gate is not None:
            rollout, vllm_kl, is_filter_ratio = seq_gate
            out = _reading(_CLIP_KL, log_probs, old_log_probs, advantages, m, log_ratio_clamp=_LOG_RATIO_CLAMP,
                           rollout_logp=rollout, tis_cap=math.inf, tis_mode="mask", **common)
            clip_ratio = out.metrics["clip_frac_low"] + out.metrics["clip_frac_high"]
            return _peers.owned(out.loss), clip_ratio, out.metrics["approx_kl"], vllm_kl, is_filter_ratio
        band = self._kernel_band()
        if band is not None:
            out = _reading(_CLIP_KL + ("rollout_kl", "tis_clip_frac"), log_probs, old_log_probs, advantages, m,
                           log_ratio_clamp=_LOG_RATIO_CLAMP, rollout_logp=rollout_log_probs, **band, **common)
            is_filter_ratio = out.metrics["tis_clip_frac"]
        else:
            coef, is_filter_ratio = self._is_coefficient(old_log_probs, rollout_log_probs, m)
            # the coefficient is the kernel's per-token weight: its clip counts stay the unweighted tokens'
            out = _reading(_CLIP_KL + ("rollout_kl",), log_probs, old_log_probs, advantages, m,
                           log_ratio_clamp=_LOG_RATIO_CLAMP, rollout_logp=rollout_log_probs, weights=coef, **common)
        clip_ratio = out.metrics["clip_frac_low"] + out.metrics["clip_frac_high"]
        return _peers.owned(out.loss), clip_ratio, out.metrics["approx_kl"], out.metrics["rollout_kl"], is_filter_ratio


class ValueLoss(nn.Module):
    """PPO value loss (OpenRLHF's ``ValueLoss``): 0.5 agg(max((v_clip - R)^2, (v - R)^2)) with
    v_clip = old + clamp(v - old, -clip_eps, clip_eps); without ``clip_eps``, 0.5 agg((v - R)^2);
    agg as in :class:`PolicyLoss`."""

    def __init__(self, clip_eps: float = None, token_level_loss: bool = True) -> None:
        super().__init__()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(self, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                action_mask: Optional[torch.Tensor] = None, dp_size: int = 1,
                batch_num_tokens: Optional[float] = None, global_batch_size: Optional[float] = None) -> torch.Tensor:
        m = torch.ones(values.shape, dtype=torch.bool, device=values.device) if action_mask is None \
            else action_mask.bool()
        agg, norm = _agg(self.token_level_loss, m, dp_size, batch_num_tokens, global_batch_size)
        return value_loss(values, old_values, returns, m, clip=self.clip_eps, agg=agg, normalizer=norm).loss


class _KLGradient(torch.autograd.Function):
    """Forward value of a KL estimate with the gradient w (lp - base) (OpenRLHF's unbiased_gradient)."""

    @staticmethod
    def forward(ctx, log_probs, value, log_ratio, w):
        ctx.save_for_backward(log_ratio if w is None else log_ratio * w)
        ctx.dtype = log_probs.dtype
        return value

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return (grad * g).to(ctx.dtype), None, None, None


def compute_approx_kl(log_probs: torch.Tensor, log_probs_base: torch.Tensor,
                      log_probs_old: Optional[torch.Tensor] = None, kl_estimator: str = "k1",
                      unbiased_gradient: bool = False) -> torch.Tensor:
    """OpenRLHF's ``compute_approx_kl`` in float32 (Schulman's estimators, log_ratio = lp - base):
    k1 = log_ratio; k2 = log_ratio^2 / 2; k3 = exp(-log_ratio) - 1 + log_ratio with log_ratio
    first bounded below by -10 (so lp = -inf gives 10, not NaN); each clamped to [-10, 10] (zero
    gradient where clamped). With ``unbiased_gradient`` the value is kept and the
    gradient is w (lp - base), w = min(exp(lp - old), 10) detached (1 without ``log_probs_old``)."""
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    # OpenRLHF bounds the k3 log-ratio below by -10 before exp: d = base - lp <= 10
    value = _kl_penalty_capped(log_probs, log_probs_base, kl_estimator, _KL_CLAMP,
                               _KL_CLAMP if kl_estimator == "k3" else math.inf)
    if not unbiased_gradient:
        return value
    value = value.detach()
    if not log_probs.requires_grad:
        return value
    with torch.no_grad():
        log_ratio = log_probs.float() - log_probs_base.float()
        w = None
        if log_probs_old is not None:
            w = (log_probs.float() - log_probs_old.float()).exp().clamp(max=KL_IS_WEIGHT_CLIP)
    return _KLGradient.apply(log_probs, value, log_ratio, w)


def compute_reward(r: Union[torch.Tensor, float], kl_coef: float, kl: Union[torch.Tensor, List[torch.Tensor]],
                   action_mask: Optional[torch.Tensor] = None,
                   reward_clip_range: Tuple[float, float] = None) -> Union[torch.Tensor, List[torch.Tensor]]:
    """OpenRLHF's ``compute_reward``: -kl_coef * kl per token plus the (clipped) sequence reward r
    at each row's last active token (the last position for a row without one, as OpenRLHF)."""
    if kl_coef <= 0.0:
        kl_coef = 0.0
    if reward_clip_range:
        r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    T = action_mask.size(1)
    last = T - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    reward = torch.zeros_like(kl).scatter_(1, last, r.unsqueeze(1).to(kl.dtype))
    return reward - kl_coef * kl


@torch.no_grad()
def get_advantages_and_returns(values: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor,
                               gamma: float, lambd: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """OpenRLHF's GAE (``get_advantages_and_returns``): rewards and values are zeroed outside the
    mask and the recursion runs through every position (a hole is a step with reward 0 and value
    0, unlike verl, which skips it), on ``rlkern.gae``. Returns ``(advantages, returns)``."""
    if action_mask is not None:
        values = action_mask * values
        rewards = action_mask * rewards
    zeros = torch.zeros(rewards.shape, dtype=torch.bool, device=rewards.device)
    adv, _ = gae(rewards, values, zeros, gamma=float(gamma), lam=float(lambd))
    adv = adv.to(torch.promote_types(rewards.dtype, values.dtype))
    return adv, adv + values


@torch.no_grad()
def get_cumulative_returns(rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """OpenRLHF's REINFORCE returns (``get_cumulative_returns``): discounted sums of the masked
    rewards through every position, on ``rlkern.discounted_returns``."""
    if action_mask is not None:
        rewards = action_mask * rewards
    zeros = torch.zeros(rewards.shape, dtype=torch.bool, device=rewards.device)
    return discounted_returns(rewards, zeros, float(gamma)).to(rewards.dtype)


@torch.no_grad()
def normalize_advantages(advantages: torch.Tensor, action_mask: torch.Tensor, std_norm: bool = True) -> torch.Tensor:
    """OpenRLHF's advantage whitening for gae/reinforce/reinforce_baseline: (A - mean) * rsqrt(max(var, 1e-8))
    over the action mask (biased variance), or only centred without ``std_norm``."""
    a = advantages.float()
    mf = action_mask.to(torch.float32)
    n = mf.sum()
    mean = (a * mf).sum() / n
    if not std_norm:
        return a - mean
    var = ((a - mean).pow(2) * mf).sum() / n
    return (a - mean) * var.clamp(min=1e-8).rsqrt()


ESTIMATORS = ("gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo", "flash_reinforce")


@torch.no_grad()
def compute_advantages_and_returns(rewards: torch.Tensor, action_mask: torch.Tensor, estimator: str,
                                   n_samples_per_prompt: int, *, kl: Optional[torch.Tensor] = None,
                                   kl_coef: float = 0.0, values: Optional[torch.Tensor] = None, gamma: float = 1.0,
                                   lambd: float = 1.0, reward_clip_range: Optional[Tuple[float, float]] = None,
                                   std_norm: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """OpenRLHF's advantage pipeline (``compute_advantages_and_returns`` of its experience maker,
    without the optional length penalties) for one batch whose rows are in prompt order, the
    ``n_samples_per_prompt`` samples of a prompt contiguous.

    1. Sequence rewards ``[N]`` shaped per prompt group (``rlkern.group_advantages``): rloo:
       r - mean of the others; reinforce_baseline, dr_grpo: r - group mean; group_norm:
       (r - mean) / (unbiased std + 1e-9); flash_reinforce: r - batch mean; gae, reinforce: r.
    2. Token rewards: :func:`compute_reward` (``-kl_coef * kl`` plus r at the last active token).
    3. gae: :func:`get_advantages_and_returns` (needs ``values``); the others: returns =
       :func:`get_cumulative_returns` with ``gamma`` (forced to 1 except for reinforce, as
       OpenRLHF does), advantages = returns.
    4. gae, reinforce, reinforce_baseline: advantages whitened over the mask
       (:func:`normalize_advantages`, only centred without ``std_norm``).

    Returns ``(advantages, returns)``, ``[N, T]``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    n = int(n_samples_per_prompt)
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    if r.dim() != 1 or n < 1 or r.shape[0] % n != 0:
        raise ValueError(f"rewards must be [prompts * n_samples_per_prompt], got {tuple(r.shape)} with n={n}")
    if estimator == "rloo":
        if n < 2:
            raise ValueError("rloo needs n_samples_per_prompt >= 2")
        r = group_advantages(r, n, estimator="rloo").to(r.dtype)
    elif estimator in ("reinforce_baseline", "dr_grpo"):
        r = group_advantages(r, n, estimator="grpo", scale="none").to(r.dtype)
    elif estimator == "group_norm":
        r = group_advantages(r, n, estimator="grpo", scale="group", eps=1e-9).to(r.dtype)
    elif estimator == "flash_reinforce":
        r = r - r.mean()
    if kl is None:
        kl = torch.zeros(action_mask.shape, dtype=r.dtype, device=r.device)
    token_rewards = compute_reward(r, kl_coef, kl, action_mask=action_mask, reward_clip_range=reward_clip_range)
    if estimator == "gae":
        if values is None:
            raise ValueError("the gae estimator needs values")
        advantages, returns = get_advantages_and_returns(values, token_rewards, action_mask, gamma, lambd)
    else:
        returns = get_cumulative_returns(token_rewards, action_mask, gamma if estimator == "reinforce" else 1.0)
        advantages = returns.clone()
    if estimator in ("gae", "reinforce", "reinforce_baseline"):
        advantages = normalize_advantages(advantages, action_mask, std_norm)
    return advantages, returns


# ------------------------------------------------------------------------------------------
# install into OpenRLHF

_PATCHES = {"PolicyLoss": PolicyLoss, "ValueLoss": ValueLoss, "compute_approx_kl": compute_approx_kl}
_saved: Optional[list] = None


def install() -> None:
    """Swap OpenRLHF's loss classes for rlkern's: ``openrlhf.models.loss.PolicyLoss``/``ValueLoss``,
    ``openrlhf.models.utils.compute_approx_kl`` and every loaded ``openrlhf`` module that imported
    them by name (the actor and critic trainers, the experience maker) now use these. Call it once
    before OpenRLHF builds its trainers; :func:`uninstall` restores OpenRLHF's. Idempotent."""
    global _saved
    import sys

    import openrlhf.models.loss as loss_mod
    import openrlhf.models.utils as utils_mod

    if _saved is not None:
        return
    originals = {"PolicyLoss": loss_mod.PolicyLoss, "ValueLoss": loss_mod.ValueLoss,
                 "compute_approx_kl": utils_mod.compute_approx_kl}
    saved = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "openrlhf" or name.startswith("openrlhf.")):
            continue
        for attr, new in _PATCHES.items():
            if getattr(mod, attr, None) is originals[attr]:
                saved.append((mod, attr, originals[attr]))
                setattr(mod, attr, new)
    _saved = saved


def uninstall() -> None:
    """Undo :func:`install`."""
    global _saved
    if _saved is None:
        return
    for mod, attr, fn in reversed(_saved):
        setattr(mod, attr, fn)
    _saved = None
