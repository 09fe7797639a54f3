"""The nastiest inputs of the return scans and group advantages, each batch in a fresh
interpreter that must exit cleanly (no signal, no abort, no hang): an error is a Python
exception of the documented kind, never a crash."""

from helpers import run_isolated

_PRELUDE = """
import os, threading, warnings
import torch, rlkern
from torch._subclasses.fake_tensor import FakeTensorMode

def expect(kinds, fn, *a, **k):
    try:
        fn(*a, **k)
    except kinds as e:
        return type(e).__name__
    return "ok"
"""


def test_degenerate_and_non_finite_inputs_exit_cleanly():
    proc = run_isolated(_PRELUDE + """
nan, inf = float("nan"), float("inf")
shapes = [(0, 0), (0, 5), (5, 0), (1, 1), (2, 16384 + 3), (3000, 1)]
for B, T in shapes:
    for fill in (nan, inf, -inf, 3.4e38, -3.4e38, 1e-45, 0.0):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            r = torch.full((B, T), fill).to(dtype)
            flags = torch.ones(B, T, dtype=torch.bool)
            for gamma, lam in ((0.0, 0.0), (1.0, 1.0), (1e-6, 1e-6), (1e-300, 1e-300)):
                rlkern.discounted_returns(r, flags, gamma)
                rlkern.gae(r, r, ~flags, gamma, lam, bootstrap_value=torch.full((B,), fill).to(dtype))
                rlkern.gae(r, r, ~flags, gamma, lam, next_values=r, truncated=flags)
                rlkern.lambda_returns(r, r, ~flags, gamma, lam, truncated=flags)
                rlkern.masked_gae(r, r, flags, gamma, lam)
                rlkern.masked_gae(r, r, ~flags, gamma, lam)
    print("shape", B, T)
for n, g in ((0, 1), (1, 1), (12, 3), (4096, 4096)):
    for fill in (nan, inf, 3e38, -3e38):
        for est, scale in (("grpo", "group"), ("grpo", "batch"), ("rloo", "none"), ("rloo", "group")):
            if est == "rloo" and g < 2:
                continue
            rlkern.group_advantages(torch.full((n,), fill), g, estimator=est, scale=scale, eps=0.0)
print("done")
""", timeout=300)
    assert "done" in proc.stdout


def test_hostile_arguments_raise_python_errors():
    proc = run_isolated(_PRELUDE + """
r, v = torch.randn(3, 9), torch.randn(3, 9)
term = torch.zeros(3, 9, dtype=torch.bool)
E = (TypeError, ValueError)
results = [
    expect(E, rlkern.gae, r, v, term, float("nan"), 0.9),
    expect(E, rlkern.gae, r, v, term, 0.9, float("inf")),
    expect(E, rlkern.gae, r, v, term, 0.9, 2**70),
    expect(E, rlkern.gae, r, v, term, "0.9", None),
    expect(E, rlkern.gae, r.to_sparse(), v, term, 0.9, 0.9),
    expect(E, rlkern.gae, r, v, term, 0.9, 0.9, out=(r, v)),
    expect(E, rlkern.gae, r, v, term, 0.9, 0.9, out=(torch.empty(3, 9), torch.empty(3, 9)[:, :]).__iter__()),
    expect(E, rlkern.gae, r, v.expand(3, 9)[:, :8], term, 0.9, 0.9),
    expect(E, rlkern.gae, r, v, term.to(torch.complex64), 0.9, 0.9),
    expect(E, rlkern.discounted_returns, r, term, 0.9, out=torch.empty(9, 3).t()),
    expect(E, rlkern.discounted_returns, r, term, 0.9, bootstrap=torch.randn(3, 1)),
    expect(E, rlkern.masked_gae, r, v, term, out=(torch.empty(3, 9), torch.empty(3, 9, dtype=torch.float64))),
    expect(E, rlkern.lambda_returns, r, v.to("meta"), term, 0.9, 0.9),
    expect(E, rlkern.group_advantages, torch.randn(12), 2**70),
    expect(E, rlkern.group_advantages, torch.randn(12), 4, eps=float("nan")),
    expect(E, rlkern.group_advantages, torch.randn(12, 1), 4),
    expect(E, rlkern.group_advantages, torch.randn(12), 4, estimator="rloo", scale="batch", eps=-1.0),
]
storage = torch.randn(4, 3, 9)
results.append(expect(E, rlkern.gae, storage[0], storage[1], term, 0.9, 0.9, out=(storage[1], storage[2])))
with FakeTensorMode():
    fr = torch.randn(3, 9)
results.append(expect(E, rlkern.gae, r, v, term, 0.9, 0.9, out=(fr, torch.empty(3, 9))))
print(results)
assert "ok" not in results, results
print("done")
""", timeout=120)
    assert "done" in proc.stdout


def test_concurrent_calls_thread_changes_and_fork_exit_cleanly():
    proc = run_isolated(_PRELUDE + """
g = torch.Generator().manual_seed(0)
r, v = torch.randn(64, 5000, generator=g), torch.randn(64, 5000, generator=g)
term = torch.rand(64, 5000, generator=g) < 0.01
want = rlkern.gae(r, v, term, 0.99, 0.95)[0]
bad = []

def worker(k):
    for i in range(20):
        got = rlkern.gae(r, v, term, 0.99, 0.95)[0]
        if not torch.equal(got, want):
            bad.append(k)
        rlkern.group_advantages(r[0], 8)

threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
for t in threads:
    t.start()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for n in (1, 3, 100000, 0, 2):
        rlkern.set_num_threads(n)
for t in threads:
    t.join()
assert not bad, bad
pid = os.fork()
if pid == 0:
    # rlkern's pool is rebuilt in the child; numpy compares (torch's own intra-op pool is
    # not fork-safe: torch.equal can hang in a forked child, whatever rlkern does)
    import numpy as np
    ok = np.array_equal(rlkern.gae(r, v, term, 0.99, 0.95)[0].numpy(), want.numpy())
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert status == 0, status
print("done")
""", timeout=240)
    assert "done" in proc.stdout
