"""The value-loss kernel's vector body (eight tokens per step, float32/bfloat16 storage) against
the float64 reference: rows long enough for the vector loop and its 512-token flush, holes
and NaN at masked positions, NaN and infinite old values at active tokens (NaN clip bounds),
ties between the clipped and unclipped errors, every aggregation; once more with the
baseline x86-64 build (RLKERN_DISABLE_AVX2)."""

from __future__ import annotations

import pytest
import torch

import rlkern
from rlkern import losses
from rlkern.reference import losses as ref

from helpers import GRAD_TOL, VALUE_TOL, assert_close, run_with_baseline_isa


def _long_values(B: int = 5, T: int = 1100, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    vo = v + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    R = v + torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[1] = False
    vo[0, :40] = v[0, :40]  # inside the band: both errors equal (a tie)
    mask[2, 5:9] = True
    vo[2, 5] = float("nan")  # NaN clip bounds at an active token
    vo[2, 6] = float("inf")
    vo[2, 7] = -float("inf")
    for t in (v, vo, R):
        t[~mask] = float("nan")
    return v, vo, R, mask


def _run(v, vo, R, mask, clip, agg):
    x = v.clone().requires_grad_()
    with rlkern.use_backend("cpu"):
        out = losses.value_loss(x, vo, R, mask, clip=clip, agg=agg)
    (g,) = torch.autograd.grad(out.loss, x)
    return out, g


def check_long_rows(dtype, clip, agg, T=1100):
    """The vector body (dtype float32/bfloat16) against the scalar body (the same values in
    float64), NaN where it gives NaN; against the reference where the loss is finite."""
    v, vo, R, mask = _long_values(T=T)
    v, vo, R = v.to(dtype), vo.to(dtype), R.to(dtype)
    out, g = _run(v, vo, R, mask, clip, agg)
    scalar, g_scalar = _run(v.double(), vo.double(), R.double(), mask, clip, agg)
    tol = VALUE_TOL if dtype == torch.float32 else 1e-2
    assert torch.isnan(out.loss) == torch.isnan(scalar.loss)
    assert torch.equal(torch.isnan(g), torch.isnan(g_scalar))
    ok = ~torch.isnan(g_scalar)
    assert_close(g.double()[ok], g_scalar[ok], GRAD_TOL if dtype == torch.float32 else 1e-2, "grad vs scalar")
    for k in scalar.metrics:
        assert_close(out.metrics[k].double(), scalar.metrics[k], tol, k)
    if torch.isnan(scalar.loss):
        return
    assert_close(out.loss.double(), scalar.loss, tol)
    x64 = v.double().requires_grad_()
    expected = ref.value_loss(x64, vo.double(), R.double(), mask, clip, agg)
    (ge,) = torch.autograd.grad(expected.loss, x64)
    assert_close(out.loss.double(), expected.loss, tol)
    assert_close(g.double(), ge, GRAD_TOL if dtype == torch.float32 else 1e-2, "grad vs reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("agg", ref.AGG_MODES)
def test_value_loss_long_rows_match_reference(dtype, clip, agg):
    check_long_rows(dtype, clip, agg)


@pytest.mark.parametrize("T", [8, 9, 15, 512, 520])
def test_value_loss_row_lengths_around_the_vector_width(T):
    check_long_rows(torch.float32, 0.2, "seq-mean-token-mean", T=T)


def test_value_loss_finite_clip_bounds_match_reference():
    """Without the NaN/inf old values the loss is finite and must match the reference closely."""
    v, vo, R, mask = _long_values()
    vo[2, 5:8] = v[2, 5:8] + 0.5
    for dtype in (torch.float32, torch.bfloat16):
        x = v.to(dtype).requires_grad_()
        out = losses.value_loss(x, vo.to(dtype), R.to(dtype), mask, clip=0.2)
        (g,) = torch.autograd.grad(out.loss, x)
        x64 = v.to(dtype).double().requires_grad_()
        expected = ref.value_loss(x64, vo.to(dtype).double(), R.to(dtype).double(), mask, 0.2)
        (ge,) = torch.autograd.grad(expected.loss, x64)
        tol = VALUE_TOL if dtype == torch.float32 else 1e-2
        assert_close(out.loss, expected.loss, tol)
        assert_close(g.float().nan_to_num(), ge.float().nan_to_num(), GRAD_TOL if dtype == torch.float32 else 1e-2)


def test_value_loss_baseline_isa(tmp_path):
    run_with_baseline_isa(tmp_path, "test_value_loss_simd", """
import torch
for dtype in (torch.float32, torch.bfloat16):
    for clip in (None, 0.2):
        for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
            t.check_long_rows(dtype, clip, agg)
t.test_value_loss_finite_clip_bounds_match_reference()
""")
