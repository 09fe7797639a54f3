"""The nastiest inputs of the log-prob ops, each batch in a fresh interpreter: a crash
(segfault, abort, hang) fails one test with its output instead of killing the run, and
each case must end in its documented result or a clear exception naming the argument."""

from helpers import run_isolated

PRELUDE = """
import math, sys, torch, rlkern
from rlkern.logprobs import token_logprobs, linear_token_logprobs, vocab_parallel_token_logprobs

def expect(exc, fragment, fn):
    try:
        fn()
    except exc as e:
        assert fragment in str(e), f"{exc.__name__} without {fragment!r}: {e}"
        print("ok", exc.__name__, fragment)
        return
    except Exception as e:
        raise AssertionError(f"expected {exc.__name__} naming {fragment!r}, got {type(e).__name__}: {e}")
    raise AssertionError(f"expected {exc.__name__} naming {fragment!r}, got no error")

x = torch.randn(3, 7)
t = torch.tensor([1, 2, 3])
hidden, weight, bias = torch.randn(3, 4), torch.randn(7, 4), torch.randn(7)
"""


def _run(body: str) -> str:
    proc = run_isolated(PRELUDE + body + "\nprint('done')\n", timeout=180)
    assert proc.stdout.rstrip().endswith("done"), proc.stdout
    return proc.stdout


def test_tensor_subclasses_and_layouts():
    out = _run("""
class Sub(torch.Tensor):
    pass

sub = x.as_subclass(Sub)
expect(TypeError, "logits", lambda: token_logprobs(sub, t))
expect(TypeError, "targets", lambda: token_logprobs(x, t.as_subclass(Sub)))
expect(TypeError, "hidden", lambda: linear_token_logprobs(hidden.as_subclass(Sub), weight, t))
expect(TypeError, "weight", lambda: linear_token_logprobs(hidden, weight.as_subclass(Sub), t))
expect(TypeError, "bias", lambda: linear_token_logprobs(hidden, weight, t, bias=bias.as_subclass(Sub)))
expect(TypeError, "logits_shard", lambda: vocab_parallel_token_logprobs(sub, t, 0))
expect(TypeError, "logits", lambda: token_logprobs(x.to_sparse(), t))
expect(TypeError, "targets", lambda: token_logprobs(x, t.to_sparse()))
expect(TypeError, "weight", lambda: linear_token_logprobs(hidden, weight.to_sparse(), t))

# Zero strides (an expanded row) and overlapping views are read in place, never written.
row = torch.randn(1, 7).expand(3, 7)
lp = token_logprobs(row.requires_grad_(), t)
lp.sum().backward()
assert torch.isfinite(lp).all()
print("ok expanded")
""")
    assert out.count("ok ") == 10


def test_fake_and_meta_tensors_never_reach_a_pointer():
    _run("""
from torch._subclasses.fake_tensor import FakeTensorMode

# Real tensors inside a FakeTensorMode: the op's own buffers would be fake, so the call
# takes the custom op's fake implementation.
with FakeTensorMode(allow_non_fake_inputs=True):
    assert token_logprobs(x, t).shape == (3,)
    assert linear_token_logprobs(hidden, weight, t).shape == (3,)
    print("ok real under FakeTensorMode")

with FakeTensorMode() as mode:
    fx, ft = mode.from_tensor(x), mode.from_tensor(t)
    fh, fw = mode.from_tensor(hidden), mode.from_tensor(weight)
    for name, call in [("logits", lambda: token_logprobs(fx, ft)),
                       ("hidden", lambda: linear_token_logprobs(fh, fw, ft)),
                       ("logits_shard", lambda: vocab_parallel_token_logprobs(fx, ft, 0))]:
        out = call()
        assert out.shape == (3,) and out.dtype == torch.float32, out
        print("ok fake", name, "shapes")

for call in [lambda: token_logprobs(x.to("meta"), t.to("meta")),
             lambda: linear_token_logprobs(hidden.to("meta"), weight.to("meta"), t.to("meta"))]:
    out = call()
    assert out.shape == (3,) and out.device.type == "meta"
    print("ok meta shapes")
""")


def test_extreme_values_and_arguments():
    _run("""
V = 5000
big = torch.full((4, V), 3e38)
big[0, 0] = -3e38
big[1] = float("-inf")
big[2, 17] = float("nan")
big[3, ::2] = float("inf")
for backend in ("cpu", "triton"):
    with rlkern.use_backend(backend):
        for kw in ({}, {"top_k": 3}, {"top_p": 0.3}, {"top_k": 10**30, "top_p": 1e-300}):
            lp, ent = token_logprobs(big.requires_grad_(), torch.tensor([1, 2, 3, 4]), return_entropy=True, **kw)
            (lp.nan_to_num() + ent.nan_to_num()).sum().backward()
            assert torch.isnan(lp[1:]).all() and torch.isnan(ent[1:]).all(), (backend, kw, lp, ent)
            big.grad = None
        for T in (2.0**-126, 2.0**126):
            lp = token_logprobs(big[:1], torch.tensor([0]), temperature=T)
            assert not torch.isnan(lp).any(), (T, lp)
print("ok extremes")

expect(ValueError, "temperature", lambda: token_logprobs(x, t, temperature=1e-39))
expect(ValueError, "temperature", lambda: token_logprobs(x, t, temperature=float("nan")))
expect(ValueError, "ignore_index", lambda: token_logprobs(x, t, ignore_index=2**70))
expect(ValueError, "targets", lambda: token_logprobs(x, torch.full((3,), 2**63 - 1)))
expect(ValueError, "targets", lambda: token_logprobs(x, torch.full((3,), -2**63)))
expect(ValueError, "vocab_start", lambda: vocab_parallel_token_logprobs(x, t, 2**64))
expect(ValueError, "chunk_tokens", lambda: linear_token_logprobs(hidden, weight, t, chunk_tokens=-2**70))
expect(TypeError, "targets", lambda: token_logprobs(x, t.to(torch.uint64)))
expect(TypeError, "top_k", lambda: token_logprobs(x, t, top_k=3.0))
expect(ValueError, "top_p", lambda: token_logprobs(x, t, top_p=-1e400))

# The process group is checked by torch.distributed, not by a pointer.
try:
    vocab_parallel_token_logprobs(x, t, 0)
except (RuntimeError, ValueError) as e:
    print("ok no process group:", type(e).__name__)
""")


def test_concurrent_calls_share_the_pool():
    _run("""
import threading
rlkern.set_num_threads(2)
x = torch.randn(64, 3000)
t = torch.randint(0, 3000, (64,))
expected = token_logprobs(x, t, top_k=20, top_p=0.9)
errors = []

def work():
    try:
        for _ in range(5):
            assert torch.equal(token_logprobs(x, t, top_k=20, top_p=0.9), expected)
    except Exception as e:
        errors.append(e)

threads = [threading.Thread(target=work) for _ in range(4)]
for th in threads:
    th.start()
for th in threads:
    th.join()
assert not errors, errors
print("ok threads")
""")


def test_softcap_and_top1_nasty_inputs():
    """Soft-capping and is_top1 on every backend: bad caps named, and NaN / inf / empty / V = 1
    rows / huge caps end in their documented results."""
    out = _run("""
from rlkern.reference import logprobs as ref

for bad in (0.0, -2.0, float("nan"), float("inf"), -float("inf"), 10**400):
    expect(ValueError, "softcap", lambda: token_logprobs(x, t, softcap=bad))
    expect(ValueError, "softcap", lambda: linear_token_logprobs(hidden, weight, t, softcap=bad))
expect(TypeError, "softcap", lambda: token_logprobs(x, t, softcap=True))
expect(TypeError, "softcap", lambda: linear_token_logprobs(hidden, weight, t, softcap=[1.0]))
for backend in ("cpu", "triton"):
    with rlkern.use_backend(backend):
        y = torch.tensor([[float("nan"), 1.0, 2.0], [float("inf"), -float("inf"), 0.0],
                          [-float("inf")] * 3, [1e38, -3e38, 5.0]])
        tg = torch.tensor([1, 0, 2, 0])
        lp, ent, top1 = token_logprobs(y, tg, softcap=2.0, return_entropy=True, return_top1=True)
        lp_r, ent_r, top1_r = ref.token_logprobs(y.double(), tg, softcap=2.0, return_entropy=True, return_top1=True)
        assert torch.isnan(lp[0]) and not top1[0]
        assert torch.allclose(lp[1:].double(), lp_r[1:], atol=1e-5), (lp, lp_r)
        assert torch.equal(top1, top1_r), (top1, top1_r)
        # with a kept set on the capped logits (+inf caps to a finite value, NaN keeps all)
        for top in ({"top_k": 1}, {"top_p": 0.5}, {"top_k": 2, "top_p": 0.9}):
            yg = y.clone().requires_grad_()
            lp, ent = token_logprobs(yg, tg, softcap=2.0, return_entropy=True, **top)
            lp_r, ent_r = ref.token_logprobs(y.double(), tg, softcap=2.0, return_entropy=True, **top)
            assert torch.equal(torch.isnan(lp), torch.isnan(lp_r)) and torch.isnan(lp[0]), (lp, lp_r)
            ok = ~torch.isnan(lp_r)
            assert torch.equal(lp[ok].isinf(), lp_r[ok].isinf()), (top, lp, lp_r)
            fin = torch.isfinite(lp_r)
            assert torch.allclose(lp[fin].double(), lp_r[fin], atol=1e-5), (top, lp, lp_r)
            assert torch.allclose(ent[1:].double(), ent_r[1:], atol=1e-5), (top, ent, ent_r)
            torch.where(torch.isfinite(lp), lp, 0.0).sum().backward()
            assert torch.isfinite(yg.grad[1:]).all()
        print("ok top", backend)
        for shape in ((0, 5), (4, 1)):
            z = torch.randn(shape).requires_grad_()
            tz = torch.zeros(shape[:-1], dtype=torch.long)
            lp, top1 = token_logprobs(z, tz, softcap=1e-30, return_top1=True)
            lp.sum().backward()
            assert lp.shape == tz.shape and top1.shape == tz.shape and torch.isfinite(z.grad).all()
        lp, top1 = linear_token_logprobs(hidden[:0], weight, t[:0], softcap=1e30, return_top1=True)
        assert lp.shape == (0,) and top1.shape == (0,)
        print("ok", backend)
""")
    assert out.count("ok ") == 18
