"""Triton kernels of the fused losses: one program per sequence (or per block of pairs)
computes the loss terms and the gradient with respect to the current-policy inputs in the
same pass, as the C++ kernels do on the CPU (csrc/cpu/losses.cpp holds the same math,
commented). Per-row totals go to a small [rows, K] buffer that torch reduces, so the
result is deterministic and needs no host synchronisation.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from .aot import AotSpec

# Totals per row, in this order (as the C++ kernel's Stat enum).
NUM_STATS = 14
# Objective codes (the order of reference.losses.OBJECTIVES, as the C++ enum).
OBJECTIVE_CODES = {"clip": 0, "cispo": 1, "reinforce": 2, "sapo": 3, "geo_mean": 4, "vespo": 5, "dppo_tv": 6,
                   "dppo_kl": 7}
_BLOCK = 1024
_PAIR_BLOCK = 1024
INF = float("inf")


@triton.jit
def _clamp(x, lo, hi):
    # Not tl.minimum/tl.maximum: they return the bound for a NaN x, where torch.clamp (and
    # the C++ kernels) keep the NaN. Comparisons with NaN are false, so x passes through.
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _sigmoid_(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# Per-token functions of the objectives beyond clip/CISPO/REINFORCE (losses.h has the same
# math in C++): each returns its value and derivative.


@triton.jit
def _sapo_gate(r, a, tau_pos, tau_neg):
    # f(r) = sigmoid(tau (r - 1)) 4 / tau, df/dr = 4 s (1 - s), tau by the advantage's sign.
    tau = tl.where(a > 0.0, tau_pos, tau_neg)
    sg = _sigmoid_(tau * (r - 1.0))
    return sg * 4.0 / tau, 4.0 * sg * (1.0 - sg)


@triton.jit
def _gmpo_log_ratio(x, a, lo, hi):
    # y = sgn(a) min(sgn(a) x, sgn(a) clamp(x, lo, hi)) and dy/dx (torch.minimum's ties: half each).
    sgn = tl.where(a > 0.0, 1.0, tl.where(a < 0.0, -1.0, tl.where(a == a, 0.0, a)))
    xc = _clamp(x, lo, hi)
    dc = tl.where((x < lo) | (x > hi), 0.0, 1.0)
    u = sgn * x
    v = sgn * xc
    mn = tl.where((u < v) | (u != u), u, v)
    dmn = tl.where(u < v, sgn, tl.where(u > v, sgn * dc, 0.5 * (sgn + sgn * dc)))
    return sgn * mn, sgn * dmn


@triton.jit
def _vespo_phi(log_w, k, lam):
    # exp(lambda + k log w - lambda w); non-finite becomes 0 (TRL's nan_to_num).
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    return tl.where((phi == phi) & (phi != float("inf")), phi, 0.0)


@triton.jit
def _dppo_valid(lp, o, a, low, high, BINARY_KL: tl.constexpr):
    p = tl.exp(lp)
    p_old = tl.exp(o)
    if BINARY_KL:
        bkl = p_old * (o - lp) + (1.0 - p_old) * tl.log((1.0 - p_old + 1e-8) / (1.0 - p + 1e-8))
        valid = tl.where(a > 0.0, (bkl <= high) | (p <= p_old), (bkl <= low) | (p >= p_old))
    else:
        valid = tl.where(a > 0.0, (p - p_old) <= high, (p - p_old) >= -low)
    return valid


@triton.jit
def _bound_weight(w, lo, hi, mask_mode):
    # Truncated: clamp to [lo, hi]; masked: 0 outside it. NaN stays NaN in both.
    outside = (w > hi) | (w < lo)
    return tl.where(outside, tl.where(mask_mode != 0, 0.0, tl.where(w > hi, hi, lo)), w)


@triton.jit
def _policy_loss_kernel(LOGP, OLD, ADV, MASK, REF, ROLL, ENT, WTS, OFFLP, ENT_THR, GRAD_SCALE, GRAD, GRAD_ENT, STATS, T,
                        clip_lo, clip_hi, cap, dual, lr_lo, lr_hi, kl_lo, kl_hi, kl_coef, ent_coef, tis_cap,
                        tis_min, off_thr, row_scale, clip_low, clip_high, tau_pos, tau_neg, vk_pos, vl_pos, vk_neg, vl_neg,
                        has_dual, tis_token, tis_seq, tis_mask_mode, has_off, has_select, row_mean,
                        OBJECTIVE: tl.constexpr, SEQ: tl.constexpr, KL: tl.constexpr, USE_KL: tl.constexpr,
                        KL_CORR: tl.constexpr, HAS_ROLL: tl.constexpr, HAS_ENT: tl.constexpr,
                        ADV_PER_TOKEN: tl.constexpr, USE_ENT: tl.constexpr, WRITE_ENT_GRAD: tl.constexpr, COMPUTE: tl.constexpr,
                        BLOCK: tl.constexpr, HAS_W: tl.constexpr = False, HAS_OFFLP: tl.constexpr = False):
    row = tl.program_id(0)
    base = row.to(tl.int64) * T
    offs = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], COMPUTE)

    # Per-sequence quantities: token count, mean log-ratio, off-policy divergence and the
    # sequence-level log importance weight (masked positions are never loaded).
    n = tl.sum(zero, 0)
    s_lr = tl.sum(zero, 0)
    s_div = tl.sum(zero, 0)
    s_tis = tl.sum(zero, 0)
    s_obj = tl.sum(zero, 0)  # GMPO: clipped log-ratios; VESPO: the log sequence weight
    s_adv = tl.sum(zero, 0)
    s_obj2 = tl.sum(zero, 0)  # VESPO: the log importance weights against the rollout
    for start in range(0, T, BLOCK):
        idx = start + offs
        m = tl.load(MASK + base + idx, mask=idx < T, other=0) != 0
        lp = tl.load(LOGP + base + idx, mask=m, other=0.0).to(COMPUTE)
        o = tl.load(OLD + base + idx, mask=m, other=0.0).to(COMPUTE)
        n += tl.sum(m.to(COMPUTE), 0)
        s_lr += tl.sum(lp - o, 0)
        if HAS_ROLL:
            ro = tl.load(ROLL + base + idx, mask=m, other=0.0).to(COMPUTE)
            s_tis += tl.sum(o - ro, 0)
        # The off-policy mask's behaviour log-probs: off_policy_logp, else the rollout's, else old.
        if HAS_OFFLP:
            s_div += tl.sum(tl.load(OFFLP + base + idx, mask=m, other=0.0).to(COMPUTE) - lp, 0)
        elif HAS_ROLL:
            s_div += tl.sum(ro - lp, 0)
        else:
            s_div += tl.sum(o - lp, 0)
        if OBJECTIVE == 4:
            if ADV_PER_TOKEN:
                a0 = tl.load(ADV + base + idx, mask=m, other=0.0).to(COMPUTE)
            else:
                a0 = tl.where(m, tl.load(ADV + row).to(COMPUTE), 0.0)
            y0, _ = _gmpo_log_ratio(_clamp(lp - o, lr_lo, lr_hi), a0, -clip_low, clip_high)
            s_obj += tl.sum(tl.where(m, y0, 0.0), 0)
            s_adv += tl.sum(a0, 0)
        if OBJECTIVE == 5:
            s_obj += tl.sum(_clamp(lp - o, -20.0, 20.0), 0)
            if HAS_ROLL:
                w0 = tl.exp(o - ro)
                w0 = _bound_weight(w0, tis_min, tis_cap, tis_mask_mode)
                lw0 = _clamp(tl.log(w0), -18.420680743952367, 20.0)
                s_obj2 += tl.sum(tl.where(m & (tis_token != 0), lw0, 0.0), 0)
    n1 = tl.maximum(n, 1.0)
    if OBJECTIVE == 4:
        geo_r = tl.exp(s_obj / n1)
        geo_adv = s_adv / n1
    if OBJECTIVE == 5:
        ves_lw = _clamp(s_obj + s_obj2, -18.420680743952367, 20.0)
        phi_pos = _vespo_phi(ves_lw, vk_pos, tl.maximum(vl_pos, 1e-4))
        phi_neg = _vespo_phi(ves_lw, vk_neg, tl.maximum(vl_neg, 1e-4))
    # seq-mean-token-mean weighs a row by 1 / n_i, seq-mean-token-sum-norm by 1 / T (row_scale).
    row_w = tl.where(row_mean != 0, 1.0 / n1, row_scale)
    # Gradients are written finished: row weight times 1 / the aggregation's denominator.
    grad_w = row_w * tl.load(GRAD_SCALE).to(COMPUTE)
    drop_negative = (has_off != 0) & (s_div / n1 > off_thr)
    seq_x = s_lr / n1
    seq_xc = _clamp(seq_x, lr_lo, lr_hi)
    seq_dx = tl.where((seq_x < lr_lo) | (seq_x > lr_hi), 0.0, 1.0)
    seq_r = tl.exp(seq_xc)
    w_seq = tl.exp(s_tis)
    w_seq = _bound_weight(w_seq, tis_min, tis_cap, tis_mask_mode)
    seq_tis = tl.where(tis_seq != 0, w_seq, 1.0)
    if HAS_ENT:
        ent_thr = tl.load(ENT_THR).to(COMPUTE)

    acc_loss = tl.sum(zero, 0)
    acc_low = tl.sum(zero, 0)
    acc_high = tl.sum(zero, 0)
    acc_ratio = tl.sum(zero, 0)
    acc_approx = tl.sum(zero, 0)
    acc_kl = tl.sum(zero, 0)
    acc_ent = tl.sum(zero, 0)
    acc_dual = tl.sum(zero, 0)
    acc_dseq = tl.sum(zero, 0)
    acc_obj = tl.sum(zero, 0)
    acc_approxc = tl.sum(zero, 0)
    acc_tiso = tl.sum(zero, 0)
    acc_rkl = tl.sum(zero, 0)
    for start in range(0, T, BLOCK):
        idx = start + offs
        inb = idx < T
        m = tl.load(MASK + base + idx, mask=inb, other=0) != 0
        lp = tl.load(LOGP + base + idx, mask=m, other=0.0).to(COMPUTE)
        o = tl.load(OLD + base + idx, mask=m, other=0.0).to(COMPUTE)
        if ADV_PER_TOKEN:
            a = tl.load(ADV + base + idx, mask=m, other=0.0).to(COMPUTE)
        else:
            a = tl.where(m, tl.load(ADV + row).to(COMPUTE), 0.0)
        if SEQ:
            r = zero + seq_r
            dx = zero + seq_dx
            xc = zero
        else:
            x = lp - o
            xc = _clamp(x, lr_lo, lr_hi)
            dx = tl.where((x < lr_lo) | (x > lr_hi), 0.0, 1.0)
            r = tl.exp(xc)
            # Summed here, where xc is at hand, so that it need not stay live in registers.
            acc_approxc += tl.sum(tl.where(m, -xc, 0.0), 0)
        obj_stat = zero
        # PPO clip with ratio cap and dual clip; ties split the gradient as torch does.
        r1 = tl.where(r > cap, cap, r)
        dr1 = tl.where(r > cap, 0.0, 1.0)
        rc = tl.where(r < clip_lo, clip_lo, tl.where(r > clip_hi, clip_hi, r))
        drc = tl.where((r < clip_lo) | (r > clip_hi), 0.0, 1.0)
        u = -a * r1
        v = -a * rc
        du = -a * dr1
        dv = -a * drc
        s = tl.where((u > v) | (u != u), u, v)  # max and min that keep NaN, as torch's
        ds = tl.where(u > v, du, tl.where(u < v, dv, 0.5 * (du + dv)))
        dual_on = (has_dual != 0) & (a < 0.0)
        bound = -a * dual
        dual_hit = dual_on & (s > bound)
        ds = tl.where(dual_on, tl.where(s < bound, ds, tl.where(s > bound, 0.0, 0.5 * ds)), ds)
        s = tl.where(dual_on, tl.where(s > bound, bound, s), s)
        if OBJECTIVE == 0:
            pg = s
            dr = ds
            direct = zero
        elif OBJECTIVE == 1:
            pg = -rc * a * lp
            dr = zero
            direct = -rc * a
            # the clipped tokens whatever the advantage's sign (a NaN ratio counts, as verl's)
            acc_obj += tl.sum((m & ~((r >= clip_lo) & (r <= clip_hi))).to(COMPUTE), 0)
        elif OBJECTIVE == 2:
            pg = -a * lp
            dr = zero
            direct = -a
        elif OBJECTIVE == 3:
            f, df = _sapo_gate(r, a, tau_pos, tau_neg)
            pg = -f * a
            dr = -df * a
            direct = zero
        elif OBJECTIVE == 4:
            # The sequence's -mean(A) exp(mean y) on each token; d/dlp_t = that times dy_t/dx_t.
            _, dy = _gmpo_log_ratio(xc, a, -clip_low, clip_high)
            r = zero + geo_r
            pg = zero - geo_adv * geo_r
            dr = zero
            direct = pg * dy * dx
            outside = (xc < -clip_low) | (xc > clip_high)
            low_hit = outside & (a < 0.0)
            high_hit = outside & (a > 0.0)
        elif OBJECTIVE == 5:
            phi = tl.where(a >= 0.0, phi_pos, phi_neg)
            direct = -phi * a
            pg = direct * lp
            dr = zero
            obj_stat = phi
        else:
            valid = _dppo_valid(lp, o, a, clip_low, clip_high, OBJECTIVE == 7)
            w = tl.where(r > cap, cap, r)
            v = tl.where(valid, 1.0, 0.0)
            direct = -a * w * v
            pg = -a * w * lp * v
            dr = zero
            low_hit = (~valid) & (~(a > 0.0))
            high_hit = (~valid) & (a > 0.0)
            obj_stat = tl.where(valid & (r > cap), 1.0, 0.0)
        weight = tl.where(drop_negative & (~(a >= 0.0)), 0.0, 1.0)
        if HAS_ENT:
            h = tl.load(ENT + base + idx, mask=m, other=0.0).to(COMPUTE)
            weight = tl.where((has_select != 0) & (~(h >= ent_thr)), 0.0, weight)
        if HAS_ROLL:
            ro = tl.load(ROLL + base + idx, mask=m, other=0.0).to(COMPUTE)
            acc_rkl += tl.sum(ro - o, 0)
        if HAS_ROLL and OBJECTIVE != 5:  # VESPO folds these weights into its sequence weight
            wt = tl.exp(o - ro)
            # the tokens the band changes: "mask" counts those not inside it (NaN too)
            outside = tl.where(tis_mask_mode != 0, ~((wt >= tis_min) & (wt <= tis_cap)),
                               (wt < tis_min) | (wt > tis_cap))
            acc_tiso += tl.sum((m & outside & (tis_token != 0)).to(COMPUTE), 0)
            wt = _bound_weight(wt, tis_min, tis_cap, tis_mask_mode)
            weight = tl.where(tis_token != 0, weight * wt, weight)
        if HAS_W:
            weight = weight * tl.load(WTS + base + idx, mask=m, other=0.0).to(COMPUTE)
        weight = weight * seq_tis
        l_tok = weight * pg
        dr = weight * dr
        direct = weight * direct
        kl = zero
        if KL != 0:
            ref = tl.load(REF + base + idx, mask=m, other=0.0).to(COMPUTE)
            d = ref - lp
            if KL == 1:
                kl = -d
                dkl = zero + 1.0
            elif KL == 2:
                kl = 0.5 * d * d
                dkl = -d
            else:
                e = tl.exp(d)
                kl = e - 1.0 - d
                dkl = 1.0 - e
            dkl = tl.where((kl < kl_lo) | (kl > kl_hi), 0.0, dkl)
            kl = _clamp(kl, kl_lo, kl_hi)
            if USE_KL:
                if KL_CORR:
                    l_tok += kl_coef * kl * r
                    direct += kl_coef * dkl * r
                    dr += kl_coef * kl
                else:
                    l_tok += kl_coef * kl
                    direct += kl_coef * dkl
        if HAS_ENT:
            # Left out, not multiplied by 0, when entropy_coef is 0: an infinite entropy
            # feeding only the metric must not make the loss NaN.
            if USE_ENT:
                l_tok -= ent_coef * h
            acc_ent += tl.sum(h, 0)
            if WRITE_ENT_GRAD:
                tl.store(GRAD_ENT + base + idx, tl.where(m, -ent_coef * grad_w, 0.0).to(GRAD_ENT.dtype.element_ty),
                         mask=inb)
        if SEQ:
            g = grad_w * direct
            acc_dseq += tl.sum(tl.where(m, grad_w * dr, 0.0), 0)
        elif OBJECTIVE == 0 or OBJECTIVE == 3 or (USE_KL and KL_CORR and KL != 0):
            g = grad_w * (direct + dr * r * dx)
        else:
            # REINFORCE and CISPO never evaluate r into the loss: a NaN or infinite r (from
            # old_logp) must not reach their gradient.
            g = grad_w * direct
        tl.store(GRAD + base + idx, tl.where(m, g, 0.0).to(GRAD.dtype.element_ty), mask=inb)
        acc_loss += tl.sum(tl.where(m, row_w * l_tok, 0.0), 0)
        acc_ratio += tl.sum(tl.where(m, r, 0.0), 0)
        acc_approx += tl.sum(o - lp, 0)
        acc_kl += tl.sum(tl.where(m, kl, 0.0), 0)
        if OBJECTIVE == 4 or OBJECTIVE >= 6:  # their own clip counts (see the objectives above)
            acc_low += tl.sum((m & low_hit).to(COMPUTE), 0)
            acc_high += tl.sum((m & high_hit).to(COMPUTE), 0)
        else:
            acc_low += tl.sum((m & (r < clip_lo) & (a < 0.0)).to(COMPUTE), 0)
            acc_high += tl.sum((m & (r > clip_hi) & (a > 0.0)).to(COMPUTE), 0)
        acc_dual += tl.sum((m & dual_hit).to(COMPUTE), 0)
        if OBJECTIVE >= 5:
            acc_obj += tl.sum(tl.where(m, obj_stat, 0.0), 0)
    if SEQ and (OBJECTIVE == 0 or OBJECTIVE == 3 or (USE_KL and KL_CORR and KL != 0)):
        # r = exp(mean_t (lp_t - old_t)): dr/dlp_t = r / n for every active token.
        add = acc_dseq * seq_r * seq_dx / n1
        tl.debug_barrier()
        for start in range(0, T, BLOCK):
            idx = start + offs
            m = tl.load(MASK + base + idx, mask=idx < T, other=0) != 0
            g = tl.load(GRAD + base + idx, mask=m, other=0.0).to(COMPUTE)
            tl.store(GRAD + base + idx, (g + add).to(GRAD.dtype.element_ty), mask=m)
    out = STATS + row * 14  # NUM_STATS
    tl.store(out + 0, n)
    tl.store(out + 1, acc_loss)
    tl.store(out + 2, acc_low)
    tl.store(out + 3, acc_high)
    tl.store(out + 4, acc_ratio)
    tl.store(out + 5, acc_approx)
    tl.store(out + 6, acc_kl)
    tl.store(out + 7, acc_ent)
    tl.store(out + 8, acc_dual)
    tl.store(out + 9, acc_obj)
    tl.store(out + 10, acc_obj / n1)
    if SEQ:
        tl.store(out + 11, n * 0.0)
    else:
        tl.store(out + 11, acc_approxc)
    # Stored only where they are summed, so that other configurations carry no dead
    # accumulators through the token loop (register pressure).
    if HAS_ROLL:
        tl.store(out + 12, acc_tiso)
        tl.store(out + 13, acc_rkl)
    else:
        tl.store(out + 12, n * 0.0)
        tl.store(out + 13, n * 0.0)


@triton.jit
def _kl_kernel(LOGP, REF, OUT, GRAD, N, kl_lo, kl_hi, KL: tl.constexpr, WRITE_GRAD: tl.constexpr,
               COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < N
    lp = tl.load(LOGP + idx, mask=inb, other=0.0).to(COMPUTE)
    d = tl.load(REF + idx, mask=inb, other=0.0).to(COMPUTE) - lp
    if KL == 1:
        kl = -d
        dkl = tl.zeros([BLOCK], COMPUTE) + 1.0
    elif KL == 2:
        kl = 0.5 * d * d
        dkl = -d
    else:
        e = tl.exp(d)
        kl = e - 1.0 - d
        dkl = 1.0 - e
    dkl = tl.where((kl < kl_lo) | (kl > kl_hi), 0.0, dkl)
    kl = _clamp(kl, kl_lo, kl_hi)
    tl.store(OUT + idx, kl, mask=inb)
    if WRITE_GRAD:
        tl.store(GRAD + idx, dkl, mask=inb)


@triton.jit
def _value_loss_kernel(V, VOLD, RET, MASK, GRAD, STATS, T, clip, row_scale, HAS_CLIP: tl.constexpr,
                       ROW_MEAN: tl.constexpr,
                       COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * T
    offs = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], COMPUTE)
    n = tl.sum(zero, 0)
    if ROW_MEAN:
        for start in range(0, T, BLOCK):
            idx = start + offs
            n += tl.sum((tl.load(MASK + base + idx, mask=idx < T, other=0) != 0).to(COMPUTE), 0)
        row_w = 1.0 / tl.maximum(n, 1.0)
    else:
        row_w = row_scale
    acc_n = tl.sum(zero, 0)
    acc_loss = tl.sum(zero, 0)
    acc_clip = tl.sum(zero, 0)
    acc_v = tl.sum(zero, 0)
    for start in range(0, T, BLOCK):
        idx = start + offs
        inb = idx < T
        m = tl.load(MASK + base + idx, mask=inb, other=0) != 0
        v = tl.load(V + base + idx, mask=m, other=0.0).to(COMPUTE)
        R = tl.load(RET + base + idx, mask=m, other=0.0).to(COMPUTE)
        e = (v - R) * (v - R)
        de = 2.0 * (v - R)
        if HAS_CLIP:
            vo = tl.load(VOLD + base + idx, mask=m, other=0.0).to(COMPUTE)
            lo = vo - clip
            hi = vo + clip
            # torch.clamp with a NaN bound gives NaN; where a bound clamps no gradient passes
            # (selected, not multiplied: vc - R may be infinite there).
            nan_bound = (lo != lo) | (hi != hi)
            vc = tl.where(nan_bound, lo + hi, tl.where(v < lo, lo, tl.where(v > hi, hi, v)))
            e2 = (vc - R) * (vc - R)
            de2 = tl.where(nan_bound, e2, tl.where((v < lo) | (v > hi), 0.0, 2.0 * (vc - R)))
            acc_clip += tl.sum((m & (e2 > e)).to(COMPUTE), 0)
            # max that keeps NaN (tl.maximum drops it), ties split as torch does
            tie = 0.5 * (de + de2)
            de = tl.where(e > e2, de, tl.where(e < e2, de2, tl.where(e2 != e2, de2, tl.where(e != e, de, tie))))
            e = tl.where(e < e2, e2, tl.where(e2 != e2, e2, e))
        tl.store(GRAD + base + idx, tl.where(m, 0.5 * row_w * de, 0.0), mask=inb)
        acc_n += tl.sum(m.to(COMPUTE), 0)
        acc_loss += tl.sum(tl.where(m, 0.5 * row_w * e, 0.0), 0)
        acc_v += tl.sum(v, 0)
    out = STATS + row * 4
    tl.store(out + 0, acc_n)
    tl.store(out + 1, acc_loss)
    tl.store(out + 2, acc_clip)
    tl.store(out + 3, acc_v)


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _dpo_kernel(C, R, RC, RR, GRAD, CREW, RREW, STATS, B, beta, label_smoothing, LOSS_TYPE: tl.constexpr,
                COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    inb = idx < B
    dc = tl.load(C + idx, mask=inb, other=0.0).to(COMPUTE) - tl.load(RC + idx, mask=inb, other=0.0).to(COMPUTE)
    dr = tl.load(R + idx, mask=inb, other=0.0).to(COMPUTE) - tl.load(RR + idx, mask=inb, other=0.0).to(COMPUTE)
    z = dc - dr
    if LOSS_TYPE == 0:
        x = beta * z
        loss = -(1.0 - label_smoothing) * _log_sigmoid(x) - label_smoothing * _log_sigmoid(-x)
        g = -(1.0 - label_smoothing) * beta * _sigmoid(-x) + label_smoothing * beta * _sigmoid(x)
    elif LOSS_TYPE == 1:
        u = z - 1.0 / (2.0 * beta)
        loss = u * u
        g = 2.0 * u
    else:
        u = 1.0 - beta * z
        loss = tl.where(u < 0.0, 0.0, u)  # relu that keeps NaN, as torch.relu
        g = tl.where(u > 0.0, -beta, 0.0)
    crew = beta * dc
    rrew = beta * dr
    tl.store(GRAD + idx, g, mask=inb)
    tl.store(CREW + idx, crew, mask=inb)
    tl.store(RREW + idx, rrew, mask=inb)
    tl.store(STATS + pid * 3 + 0, tl.sum(tl.where(inb, loss, 0.0), 0))
    tl.store(STATS + pid * 3 + 1, tl.sum(tl.where(inb, crew - rrew, 0.0), 0))
    tl.store(STATS + pid * 3 + 2, tl.sum((inb & (crew > rrew)).to(COMPUTE), 0))


@triton.jit
def _bt_kernel(C, R, MARGIN, GRAD, STATS, B, margin_scalar, HAS_MARGIN: tl.constexpr, COMPUTE: tl.constexpr,
               BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    inb = idx < B
    d = tl.load(C + idx, mask=inb, other=0.0).to(COMPUTE) - tl.load(R + idx, mask=inb, other=0.0).to(COMPUTE)
    if HAS_MARGIN:
        x = d - tl.load(MARGIN + idx, mask=inb, other=0.0).to(COMPUTE)
    else:
        x = d - margin_scalar
    tl.store(GRAD + idx, -_sigmoid(-x), mask=inb)
    tl.store(STATS + pid * 3 + 0, tl.sum(tl.where(inb, -_log_sigmoid(x), 0.0), 0))
    tl.store(STATS + pid * 3 + 1, tl.sum(tl.where(inb, d, 0.0), 0))
    tl.store(STATS + pid * 3 + 2, tl.sum((inb & (d > 0.0)).to(COMPUTE), 0))


# ---------------------------------------------------------------------------------------
# launchers


def _compute(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _bound(value: Optional[float], default: float) -> float:
    return default if value is None else float(value)


def policy_loss(logp, old_logp, advantages, mask, cfg, tensors: Dict[str, Optional[torch.Tensor]],
                want_entropy_grad: bool):
    """Runs the fused kernel; returns (loss, metrics, grad_logp, grad_entropy), the gradients
    finished and in the inputs' storage dtype (as the C++ path)."""
    from ..losses import (_agg_denominator, _as, _input_storage, _mask_bytes, _metrics_from_totals, _policy_dtypes,
                          _row_scale)
    from ..reference.kl import clamp_bounds
    from ..reference.losses import entropy_threshold

    B, T = logp.shape
    ref_logp, rollout_logp, entropy = tensors["ref_logp"], tensors["rollout_logp"], tensors["entropy"]
    storage, acc = _policy_dtypes(logp, old_logp, advantages, tensors)
    # float32 weights beside bfloat16/float16 log-probs: each pointer is loaded in its own
    # type, so the log-probs are not copied to float32 (the gradient stays in `storage`)
    inputs, weights_f32 = _input_storage(storage, acc, logp, old_logp, tensors, (torch.bfloat16, torch.float16))
    lp, old = _as(logp, inputs), _as(old_logp, inputs)
    ref, roll, ent = _as(ref_logp, inputs), _as(rollout_logp, inputs), _as(entropy, inputs)
    wts = _as(tensors.get("weights"), torch.float32 if weights_f32 else inputs)
    offlp = _as(tensors.get("off_policy_logp"), inputs)
    adv = _as(advantages, acc)
    m = _mask_bytes(mask)
    grad = torch.empty((B, T), dtype=storage, device=lp.device)
    grad_ent = torch.empty((B, T), dtype=storage, device=lp.device) if want_entropy_grad else grad
    stats = torch.empty((B, NUM_STATS), dtype=acc, device=lp.device)
    if ent is not None and cfg.entropy_top_fraction is not None:
        thr = entropy_threshold(ent, mask != 0, cfg.entropy_top_fraction).reshape(1)
    else:
        thr = stats  # never read
    # The final denominator is known before the pass except for token-mean's token count,
    # which stays on the device (no host synchronisation).
    active = m.sum() if cfg.agg == "token-mean" and cfg.normalizer is None else 0
    nonempty = m.view(B, T).any(1).sum() if cfg.agg.startswith("seq-") and cfg.normalizer is None else 0
    denom = _agg_denominator(cfg.agg, cfg.normalizer, active, nonempty)
    # In the arithmetic dtype: float64 gradients must not carry a float32 rounding of the
    # scale. Formed in float64 and cast, so that a scale beyond float32's range (normalizer
    # 1e-300) becomes inf as on the C++ path instead of raising.
    if isinstance(denom, torch.Tensor):
        grad_scale = (1.0 / denom.to(torch.float64)).to(acc).reshape(1)
    else:
        grad_scale = torch.tensor([1.0 / denom], dtype=torch.float64, device=lp.device).to(acc)
    lr_lo, lr_hi = clamp_bounds("log_ratio_clamp", cfg.log_ratio_clamp)
    kl_lo, kl_hi = clamp_bounds("kl_clamp", cfg.kl_clamp)
    clip_lo, clip_hi = cfg.clip_range
    kl = 0 if ref is None else {"k1": 1, "k2": 2, "k3": 3}[cfg.kl_kind]
    _policy_loss_kernel[(B,)](
        lp, old, adv, m, ref if ref is not None else lp, roll if roll is not None else lp,
        ent if ent is not None else lp, wts if wts is not None else lp, offlp if offlp is not None else lp, thr,
        grad_scale, grad, grad_ent, stats, T,
        clip_lo, clip_hi, _bound(cfg.ratio_cap, INF), float(cfg.dual_clip or 0.0), _bound(lr_lo, -INF),
        _bound(lr_hi, INF), _bound(kl_lo, -INF), _bound(kl_hi, INF), float(cfg.kl_coef), float(cfg.entropy_coef),
        float(cfg.tis_cap or 0.0), float(cfg.tis_min or 0.0), float(cfg.off_policy_threshold or 0.0), _row_scale(cfg.agg, T),
        float(cfg.clip_low), float(cfg.clip_low if cfg.clip_high is None else cfg.clip_high),
        float(cfg.sapo_temperature_pos), float(cfg.sapo_temperature_neg), float(cfg.vespo_k_pos),
        float(cfg.vespo_lambda_pos), float(cfg.vespo_k_neg), float(cfg.vespo_lambda_neg),
        int(cfg.dual_clip is not None), int(cfg.tis_cap is not None and cfg.tis_level == "token"),
        int(cfg.tis_cap is not None and cfg.tis_level == "sequence"), int(cfg.tis_mode == "mask"),
        int(cfg.off_policy_threshold is not None), int(cfg.entropy_top_fraction is not None),
        int(cfg.agg == "seq-mean-token-mean"),
        OBJECTIVE=OBJECTIVE_CODES[cfg.objective], SEQ=cfg.level == "sequence", KL=kl,
        USE_KL=cfg.kl_coef != 0, KL_CORR=bool(cfg.kl_is_correction), HAS_ROLL=roll is not None,
        HAS_ENT=ent is not None, ADV_PER_TOKEN=adv.dim() == 2,
        USE_ENT=cfg.entropy_coef != 0, WRITE_ENT_GRAD=want_entropy_grad,
        COMPUTE=_compute(grad), BLOCK=min(_BLOCK, triton.next_power_of_2(T)), HAS_W=wts is not None,
        HAS_OFFLP=offlp is not None)
    totals = stats.sum(0)
    loss = totals[1] / denom
    nonempty_rows = (stats[:, 0] > 0).sum()
    metrics = {k: v.detach() for k, v in
               _metrics_from_totals(totals, cfg, ref is not None, ent is not None, nonempty_rows,
                                    roll is not None).items()}
    return loss, metrics, grad, (grad_ent if want_entropy_grad else None)


def kl_penalty(logp, ref_logp, kind_code: int, low, high, out, grad) -> None:
    N = logp.numel()
    if N == 0:
        return
    _kl_kernel[(triton.cdiv(N, _BLOCK),)](logp, ref_logp, out, grad if grad is not None else out, N,
                                         _bound(low, -INF), _bound(high, INF), KL=kind_code + 1,
                                         WRITE_GRAD=grad is not None, COMPUTE=_compute(out), BLOCK=_BLOCK)


def value_loss(values, old_values, returns, mask, clip, agg_code: int, row_scale: float, grad) -> torch.Tensor:
    """Totals [active, loss sum, clipped, sum of v, non-empty rows] as the C++ kernel."""
    B, T = values.shape
    stats = torch.empty((B, 4), dtype=grad.dtype, device=values.device)
    _value_loss_kernel[(B,)](values, old_values, returns, mask, grad, stats, T, float(clip or 0.0), float(row_scale),
                             HAS_CLIP=clip is not None, ROW_MEAN=agg_code == 2, COMPUTE=_compute(grad),
                             BLOCK=min(_BLOCK, triton.next_power_of_2(T)))
    return torch.cat([stats.sum(0), (stats[:, 0] > 0).sum().to(stats.dtype).reshape(1)])


def dpo_loss(c, r, rc, rr, beta, loss_type_code, label_smoothing, grad_z, chosen_rewards,
             rejected_rewards) -> torch.Tensor:
    B = c.shape[0]
    blocks = triton.cdiv(B, _PAIR_BLOCK)
    stats = torch.empty((blocks, 3), dtype=grad_z.dtype, device=c.device)
    _dpo_kernel[(blocks,)](c, r, rc, rr, grad_z, chosen_rewards, rejected_rewards, stats, B, float(beta),
                           float(label_smoothing), LOSS_TYPE=loss_type_code, COMPUTE=_compute(grad_z),
                           BLOCK=min(_PAIR_BLOCK, triton.next_power_of_2(B)))
    return stats.sum(0)


def bradley_terry_loss(c, r, margin, margin_scalar, grad) -> torch.Tensor:
    B = c.shape[0]
    blocks = triton.cdiv(B, _PAIR_BLOCK)
    stats = torch.empty((blocks, 3), dtype=grad.dtype, device=c.device)
    _bt_kernel[(blocks,)](c, r, margin if margin is not None else c, grad, stats, B, float(margin_scalar),
                          HAS_MARGIN=margin is not None, COMPUTE=_compute(grad),
                          BLOCK=min(_PAIR_BLOCK, triton.next_power_of_2(B)))
    return stats.sum(0)


# ---------------------------------------------------------------------------------------
# ahead-of-time compile specs: the configurations the launchers use, fp32 and bf16 inputs.


def _policy_spec(name: str, dt: str, **constexprs) -> AotSpec:
    ptr = f"*{dt}"
    signature = {"LOGP": ptr, "OLD": ptr, "ADV": "*fp32", "MASK": "*u8", "REF": ptr, "ROLL": ptr, "ENT": ptr, "WTS": ptr, "OFFLP": ptr,
                 "ENT_THR": "*fp32", "GRAD_SCALE": "*fp32", "GRAD": ptr, "GRAD_ENT": ptr, "STATS": "*fp32", "T": "i32"}
    for arg in ("clip_lo", "clip_hi", "cap", "dual", "lr_lo", "lr_hi", "kl_lo", "kl_hi", "kl_coef", "ent_coef",
                "tis_cap", "tis_min", "off_thr", "row_scale", "clip_low", "clip_high", "tau_pos", "tau_neg", "vk_pos", "vl_pos",
                "vk_neg", "vl_neg"):
        signature[arg] = "fp32"
    for arg in ("has_dual", "tis_token", "tis_seq", "tis_mask_mode", "has_off", "has_select", "row_mean"):
        signature[arg] = "i32"
    full = dict(OBJECTIVE=0, SEQ=False, KL=0, USE_KL=False, KL_CORR=False, HAS_ROLL=False, HAS_ENT=False,
                ADV_PER_TOKEN=False, USE_ENT=False, WRITE_ENT_GRAD=False, COMPUTE=tl.float32, BLOCK=_BLOCK,
                HAS_W=False, HAS_OFFLP=False)
    full.update(constexprs)
    for k in full:
        signature[k] = "constexpr"
    return AotSpec(f"{name}_{dt}", _policy_loss_kernel, signature, full)


def _specs():
    specs = []
    for dt in ("fp32", "bf16"):
        ptr = f"*{dt}"
        specs += [
            _policy_spec("policy_grpo", dt, KL=3, USE_KL=True),
            _policy_spec("policy_gspo", dt, SEQ=True),
            _policy_spec("policy_sapo", dt, OBJECTIVE=3),
            _policy_spec("policy_sapo_seq_kl", dt, OBJECTIVE=3, SEQ=True, KL=3, USE_KL=True),
            _policy_spec("policy_geo_mean", dt, OBJECTIVE=4),
            _policy_spec("policy_vespo_tis", dt, OBJECTIVE=5, HAS_ROLL=True),
            _policy_spec("policy_dppo_tv", dt, OBJECTIVE=6),
            _policy_spec("policy_dppo_kl_entropy", dt, OBJECTIVE=7, HAS_ENT=True, USE_ENT=True, KL=1, USE_KL=True),
            _policy_spec("policy_cispo_tis_entropy", dt, OBJECTIVE=1, HAS_ROLL=True, HAS_ENT=True,
                         USE_ENT=True, WRITE_ENT_GRAD=True, KL=1, USE_KL=True, KL_CORR=True),
            _policy_spec("policy_clip_tis_weights", dt, HAS_ROLL=True, HAS_W=True, KL=3, USE_KL=True),
            _policy_spec("policy_clip_tis_off_policy_logp", dt, HAS_ROLL=True, HAS_OFFLP=True),
            AotSpec(f"kl_k3_{dt}", _kl_kernel,
                    {"LOGP": ptr, "REF": ptr, "OUT": "*fp32", "GRAD": "*fp32", "N": "i32", "kl_lo": "fp32",
                     "kl_hi": "fp32", "KL": "constexpr", "WRITE_GRAD": "constexpr", "COMPUTE": "constexpr",
                     "BLOCK": "constexpr"},
                    dict(KL=3, WRITE_GRAD=True, COMPUTE=tl.float32, BLOCK=_BLOCK)),
            AotSpec(f"value_clip_{dt}", _value_loss_kernel,
                    {"V": ptr, "VOLD": ptr, "RET": ptr, "MASK": "*u8", "GRAD": "*fp32", "STATS": "*fp32", "T": "i32",
                     "clip": "fp32", "row_scale": "fp32", "HAS_CLIP": "constexpr", "ROW_MEAN": "constexpr", "COMPUTE": "constexpr",
                     "BLOCK": "constexpr"},
                    dict(HAS_CLIP=True, ROW_MEAN=False, COMPUTE=tl.float32, BLOCK=_BLOCK)),
            AotSpec(f"dpo_sigmoid_{dt}", _dpo_kernel,
                    {"C": ptr, "R": ptr, "RC": ptr, "RR": ptr, "GRAD": "*fp32", "CREW": "*fp32", "RREW": "*fp32",
                     "STATS": "*fp32", "B": "i32", "beta": "fp32", "label_smoothing": "fp32",
                     "LOSS_TYPE": "constexpr", "COMPUTE": "constexpr", "BLOCK": "constexpr"},
                    dict(LOSS_TYPE=0, COMPUTE=tl.float32, BLOCK=_PAIR_BLOCK)),
            AotSpec(f"bradley_terry_{dt}", _bt_kernel,
                    {"C": ptr, "R": ptr, "MARGIN": ptr, "GRAD": "*fp32", "STATS": "*fp32", "B": "i32",
                     "margin_scalar": "fp32", "HAS_MARGIN": "constexpr", "COMPUTE": "constexpr",
                     "BLOCK": "constexpr"},
                    dict(HAS_MARGIN=True, COMPUTE=tl.float32, BLOCK=_PAIR_BLOCK)),
        ]
    return specs


AOT_SPECS = _specs()
