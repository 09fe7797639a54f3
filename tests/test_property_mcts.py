"""Property-based tests of the batched MCTS (issue #11): random forests, options, masks,
terminals and extreme (finite) values. Whatever the inputs, every simulation passes
through the root once, only legal edges are expanded, every statistic stays finite and
the results do not depend on the thread count."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlkern import mcts

MAGNITUDES = [1.0, 1e6, 1e30, 1e37, 3e38]


@st.composite
def problems(draw):
    algorithm = draw(st.sampled_from(["puct", "gumbel"]))
    B = draw(st.sampled_from([1, 2, 3, 5, 300]))  # 300: several chunks on the thread pool
    A = draw(st.integers(1, 7))
    S = draw(st.integers(1, 24))
    N = draw(st.integers(2, S + 2))  # sometimes a full pool
    cfg = dict(
        algorithm=algorithm,
        c1=draw(st.sampled_from([0.0, 1.25, 1e6, 1e30])),
        c2=draw(st.sampled_from([1e-30, 1.0, 19652.0, 3e38])),
        dirichlet_alpha=draw(st.sampled_from([1e-30, 0.3, 1e30])),
        dirichlet_fraction=draw(st.sampled_from([0.0, 0.25, 1.0])),
        max_considered_actions=draw(st.sampled_from([1, 2, 16, 10**6])),
        gumbel_scale=draw(st.sampled_from([0.0, 1.0, 1e30])),
        maxvisit_init=draw(st.sampled_from([0.0, 50.0, 1e20])),
        value_scale=draw(st.sampled_from([0.0, 0.1, 1e5])),
        rescale_values=draw(st.booleans()),
        use_mixed_value=draw(st.booleans()),
        max_depth=draw(st.sampled_from([None, 1, 3])),
        seed=draw(st.integers(0, 2**64 - 1)),
    )
    mag = draw(st.sampled_from(MAGNITUDES))
    seed = draw(st.integers(0, 2**32 - 1))
    p_terminal = draw(st.sampled_from([0.0, 0.3]))
    masked = draw(st.booleans())
    return B, A, S, N, cfg, mag, seed, p_terminal, masked


def run(problem, threads):
    B, A, S, N, cfg, mag, seed, p_terminal, masked = problem
    rng = np.random.default_rng(seed)
    K = 61
    logits = rng.normal(scale=rng.choice([1.0, 50.0, 1e30]), size=(K, A)).astype(np.float32)
    logits[rng.random((K, A)) < 0.1] = -np.inf
    values = (mag * rng.uniform(-1, 1, K)).astype(np.float32)
    rewards = (mag * rng.uniform(-1, 1, K) * (rng.random(K) < 0.5)).astype(np.float32)
    discounts = rng.choice(np.array([-1.0, 1.0, 0.9, 0.0, -0.5], np.float32), K)
    legal = rng.random((K, A)) < 0.7
    legal[:, 0] = True
    terminal = rng.random(K) < p_terminal
    forest = mcts.Forest(B, A, N, mcts.Config(**cfg, num_threads=threads))
    roots = np.arange(B) % K
    root_legal = legal[roots] if masked else None
    forest.set_roots(logits[roots], values[roots], root_legal, num_simulations=S)
    rejected = 0
    for _ in range(S):
        leaves = forest.select()
        L = len(leaves)
        if not L:
            continue
        assert ((leaves.action >= 0) & (leaves.action < A)).all()
        k = (leaves.node * 7 + leaves.tree * 13 + leaves.action) % K
        args = (logits[k], values[k], rewards[k], discounts[k], legal[k] if masked else None, terminal[k])
        try:
            forest.expand_backup(leaves, *args)
        except ValueError as e:
            assert "overflows float32" in str(e), e
            rejected += 1
            forest.expand_backup(leaves, logits[k], np.zeros(L, np.float32), 0.0, 1.0, None, terminal[k])
    return forest, forest.result(), root_legal, rejected


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_forests_keep_their_invariants(problem):
    B, A, S, N, cfg, *_ = problem
    forest, res, root_legal, _ = run(problem, threads=1)
    t = forest.export()
    used = forest.num_nodes()
    for b in range(B):
        n = used[b]
        assert t["node_visits"][b, 0] == 1 + S  # every simulation passes the root once
        ci = t["children_index"][b, :n]
        kids = np.sort(ci[ci >= 0])
        np.testing.assert_array_equal(kids, np.arange(1, n))  # each node has exactly one parent
        expanded = ci >= 0
        assert (t["children_prior_logits"][b, :n][expanded] > np.finfo(np.float32).min).all()  # legal edges only
        if root_legal is not None:
            assert not expanded[0][~root_legal[b]].any()
        for x in range(n):
            if not t["terminal"][b, x]:
                assert t["node_visits"][b, x] >= 1 + t["children_visits"][b, x].sum()
        assert n <= N
    for k in ("node_values", "raw_values", "children_values", "children_rewards"):
        assert np.isfinite(t[k]).all(), k
    assert np.isfinite(res.root_value).all() and np.isfinite(res.q_values).all()
    assert np.isfinite(res.action_weights).all()
    assert ((res.action >= 0) & (res.action < A)).all()
    if root_legal is not None:
        assert root_legal[np.arange(B), res.action].all()
        assert (res.action_weights[~root_legal] == 0).all()


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_results_do_not_depend_on_the_thread_count(problem):
    one, res1, _, rej1 = run(problem, threads=1)
    many, res2, _, rej2 = run(problem, threads=3)
    assert rej1 == rej2
    a, b = one.export(), many.export()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for x, y in zip(res1.__dict__.values(), res2.__dict__.values()):
        np.testing.assert_array_equal(x, y)
