"""MCTS crash safety (issue #11): the nastiest inputs found by the audit, each in a fresh
interpreter that must exit cleanly (no segfault, heap corruption, abort or hang). Every
child prints what it checked and the parent asserts on that output."""

from __future__ import annotations

from helpers import run_isolated

PRELUDE = """
import math
import numpy as np
from rlkern import mcts

def expect(exc, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc as e:
        return str(e)
    raise AssertionError(f"no {exc.__name__} from {fn}")
"""


def test_overflowing_products_never_reach_selection():
    # Issue reproducer: tree 1 fed value=1e30, discount=1e30 made select() return action -1
    # and write into the previous tree's arrays ("corrupted size vs. prev_size" at exit).
    proc = run_isolated(PRELUDE + """
for algorithm in ("puct", "gumbel"):
    for value, reward, discount in [(1e30, 0.0, 1e30), (3e38, 3e38, 1.0), (1e20, 1e20, -1e20)]:
        f = mcts.Forest(2, 2, 8, mcts.Config(algorithm=algorithm))
        f.set_roots(np.zeros((2, 2), np.float32), np.zeros(2, np.float32), num_simulations=6)
        rejected = 0
        for step in range(6):
            lv = f.select()
            L = len(lv)
            v = np.where(lv.tree == 1, value, 0).astype(np.float32)
            r = np.where(lv.tree == 1, reward, 0).astype(np.float32)
            d = np.where(lv.tree == 1, discount, 1).astype(np.float32)
            try:
                f.expand_backup(lv, np.zeros((L, 2), np.float32), v, r, d)
            except ValueError as e:
                assert "overflows float32" in str(e), e
                rejected += 1
                f.expand_backup(lv, np.zeros((L, 2), np.float32), np.zeros(L), 0.0, 1.0)
            assert ((lv.action >= 0) & (lv.action < 2)).all(), lv
        assert rejected == 6, rejected
        res = f.result()
        assert np.isfinite(res.root_value).all() and (res.action >= 0).all()
print("ok")
""", timeout=60)
    assert proc.stdout.strip() == "ok"


def test_non_finite_options_rejected_before_the_core():
    proc = run_isolated(PRELUDE + """
for kw in [dict(dirichlet_alpha=math.inf), dict(c2=math.inf), dict(algorithm="gumbel", value_scale=math.inf),
           dict(algorithm="gumbel", maxvisit_init=1e39), dict(c1=float("nan"))]:
    msg = expect(ValueError, mcts.Config, **kw)
    assert [k for k in kw if k != "algorithm"][0] in msg, msg
print("ok")
""", timeout=60)
    assert proc.stdout.strip() == "ok"


def test_selection_is_total_when_every_score_is_nan():
    # Finite inputs that pass validation but make sigma(q) = scale * q overflow without
    # rescaling: softmax(inf - inf) scores are NaN at nodes whose children are all
    # expanded. Selection must still pick an edge of the node (it used to pick edge -1).
    proc = run_isolated(PRELUDE + """
for seed in range(4):
    A, B, S = 2, 4, 60
    f = mcts.Forest(B, A, S + 1, mcts.Config(algorithm="gumbel", rescale_values=False, value_scale=1.0,
                                              seed=seed))
    rng = np.random.default_rng(seed)
    f.set_roots(np.zeros((B, A), np.float32), np.zeros(B, np.float32))
    def fn(lv):
        L = len(lv)
        return (np.zeros((L, A), np.float32), rng.choice([-1e37, 1e37], size=L).astype(np.float32), 0.0, 1.0)
    res = f.search(fn, S)
    t = f.export()
    used = f.num_nodes()
    for b in range(B):
        ci = t["children_index"][b, :used[b]]
        assert sorted(ci[ci >= 0].tolist()) == list(range(1, used[b]))
    assert (res.visit_counts.sum(axis=1) == S).all(), res.visit_counts
    assert ((res.action >= 0) & (res.action < A)).all()
print("ok")
""", timeout=60)
    assert proc.stdout.strip() == "ok"


def test_set_roots_with_a_bool_mask_through_the_core_binding():
    # The binding converted the bool mask to a uint8 temporary and kept only its pointer.
    proc = run_isolated(PRELUDE + """
B, A = 64, 65536
f = mcts.Forest(B, A, 2, mcts.Config(dirichlet_fraction=0.0))
rng = np.random.default_rng(0)
mask = rng.random((B, A)) < 0.5
mask[:, 7] = True
logits = rng.normal(size=(B, A)).astype(np.float32)
for _ in range(3):
    f._core.set_roots(logits, np.zeros(B, np.float32), mask, np.ones(B, bool))
    g = mcts.Forest(B, A, 2, mcts.Config(dirichlet_fraction=0.0))
    g.set_roots(logits, np.zeros(B, np.float32), mask.astype(np.uint8))
    a, b = f.export()["children_prior_logits"][:, 0], g.export()["children_prior_logits"][:, 0]
    assert np.array_equal(a, b)
    del g
print("ok")
""", timeout=120)
    assert proc.stdout.strip() == "ok"


def test_considered_visit_sequence_with_huge_m_returns():
    proc = run_isolated(PRELUDE + """
assert mcts.considered_visit_sequence(2**31 - 1, 1) == (0,)
assert mcts.considered_visit_sequence(2**31 - 1, 5) == (0,) * 5
assert mcts.considered_visit_sequence(2**30 + 1, 3) == (0,) * 3
expect(ValueError, mcts.considered_visit_sequence, 2**31, 1)
f = mcts.Forest(2, 3, 51, mcts.Config(algorithm="gumbel", max_considered_actions=2**31 - 1))
f.set_roots(np.zeros((2, 3), np.float32), np.zeros(2, np.float32))
res = f.search(lambda lv: (np.zeros((len(lv), 3), np.float32), 0.0, 0.0, -1.0), 50)
assert (res.visit_counts.sum(axis=1) == 50).all()
print("ok")
""", timeout=30)
    assert proc.stdout.strip() == "ok"


def test_advance_with_uint64_max_and_tensor_subclasses():
    proc = run_isolated(PRELUDE + """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
f = mcts.Forest(2, 3, 20)
f.set_roots(np.zeros((2, 3), np.float32), np.zeros(2, np.float32))
f.search(lambda lv: (np.zeros((len(lv), 3), np.float32), 0.0, 0.0, -1.0), 6)
expect(ValueError, f.advance, np.array([2**64 - 1, 0], np.uint64))
with FakeTensorMode():
    fake = torch.zeros(2, 3)
    fake_a = torch.zeros(2, dtype=torch.int64)
assert "prior_logits" in expect(TypeError, f.set_roots, fake, np.zeros(2))
assert "actions" in expect(TypeError, f.advance, fake_a)
assert "value" in expect(TypeError, f.set_roots, np.zeros((2, 3)), torch.zeros(2, device="meta"))
print("ok")
""", timeout=60)
    assert proc.stdout.strip() == "ok"
