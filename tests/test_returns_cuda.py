"""The CUDA return kernels against the float64 reference (runs where a GPU is present)."""

import pytest
import torch

import rlkern
from rlkern.reference import returns as ref
from helpers import assert_close, needs_cuda

pytestmark = [needs_cuda, pytest.mark.gpu]


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (1000, 3), (4096, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_scans_match_reference(shape, dtype):
    g = torch.Generator().manual_seed(shape[0] + shape[1])
    r, v, nv = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    term = torch.rand(shape, generator=g) < 0.05
    trunc = (torch.rand(shape, generator=g) < 0.05) & ~term
    mask = torch.rand(shape, generator=g) < 0.7
    boot = torch.randn(shape[0], generator=g).to(dtype)
    c = {k: x.cuda() for k, x in dict(r=r, v=v, nv=nv, term=term, trunc=trunc, mask=mask, boot=boot).items()}
    f = lambda x: x.double()  # noqa: E731
    with rlkern.use_backend("cuda"):
        out = rlkern.discounted_returns(c["r"], c["term"], 0.99, bootstrap=c["boot"])
        assert_close(out, ref.discounted_returns(f(r), term, 0.99, f(boot)))
        adv, ret = rlkern.gae(c["r"], c["v"], c["term"], 0.99, 0.95, bootstrap_value=c["boot"])
        eadv, eret = ref.gae(f(r), f(v), term, 0.99, 0.95, bootstrap_value=f(boot))
        assert_close(adv, eadv)
        assert_close(ret, eret)
        adv, _ = rlkern.gae(c["r"], c["v"], c["term"], 0.99, 0.95, next_values=c["nv"], truncated=c["trunc"])
        assert_close(adv, ref.gae(f(r), f(v), term, 0.99, 0.95, next_values=f(nv), truncated=trunc)[0])
        out = rlkern.lambda_returns(c["r"], c["nv"], c["term"], 0.99, 0.9, truncated=c["trunc"])
        assert_close(out, ref.lambda_returns(f(r), f(nv), term, 0.99, 0.9, truncated=trunc))
        adv, ret = rlkern.masked_gae(c["r"], c["v"], c["mask"], 1.0, 0.95)
        eadv, eret = ref.masked_gae(f(r), f(v), mask, 1.0, 0.95)
        assert_close(adv, eadv)
        assert_close(ret, eret)
    out = rlkern.group_advantages(c["r"].flatten()[: (r.numel() // 8) * 8], 8)
    assert_close(out, ref.group_advantages(f(r).flatten()[: (r.numel() // 8) * 8], 8))


def test_cuda_group_advantages_of_huge_rewards_match_float64():
    r = torch.tensor([3e38, 3e38, -1e38, 2e38, 3e38, 3e38, 3e38, -3e38])
    for scale in ("group", "batch", "none"):
        out = rlkern.group_advantages(r.cuda(), 4, scale=scale)
        assert out.dtype == torch.float32
        assert_close(out, ref.group_advantages(r.double(), 4, scale=scale))


def test_compiled_with_cuda():
    assert "cuda" in rlkern.info()["runnable"]
