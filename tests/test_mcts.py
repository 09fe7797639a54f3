"""Batched MCTS (rlkern.mcts): mctx golden trees, mctx policy oracles, invariants,
determinism, tic-tac-toe against exhaustive minimax, tree reuse and bad input."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

import rlkern
from rlkern import mcts
from rlkern.mcts import games

# -- helpers ---------------------------------------------------------------------------


def random_net(A, seed=0, K=97, two_player=False):
    """A deterministic 'network': outputs looked up by node id (and tree) from a table."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(K, A)).astype(np.float32)
    values = rng.uniform(-1, 1, size=K).astype(np.float32)
    rewards = rng.uniform(-1, 1, size=K).astype(np.float32)

    def fn(leaves):
        k = (leaves.node * 7 + leaves.tree * 13 + leaves.action) % K
        return logits[k], values[k], rewards[k], np.float32(-1.0 if two_player else 0.9)

    return fn, logits, values


def check_invariants(forest, num_simulations, legal_root=None, revisits_possible=False):
    t = forest.export()
    B, N, A = t["children_index"].shape
    used = forest.num_nodes()
    assert (used <= N).all()
    for b in range(B):
        n = used[b]
        ci = t["children_index"][b, :n]
        cv = t["children_visits"][b, :n]
        # children ids are fresh nodes, each has one parent and a larger id
        kids = ci[ci >= 0]
        assert len(np.unique(kids)) == len(kids) == n - 1
        for x in range(n):
            for a in np.flatnonzero(ci[x] >= 0):
                c = ci[x, a]
                assert c > x and t["parents"][b, c] == x and t["action_from_parent"][b, c] == a
                assert cv[x, a] == t["node_visits"][b, c]
                # a child exists only for a legal (finite-prior) action
                assert t["children_prior_logits"][b, x, a] > -1e30
            if not revisits_possible and not t["terminal"][b, x]:
                assert t["node_visits"][b, x] == 1 + cv[x].sum()
            # node value = mean of its own network value and everything backed up through it
            kids_x = np.flatnonzero(ci[x] >= 0)
            if not revisits_possible and not t["terminal"][b, x]:
                backed = t["raw_values"][b, x] + sum(
                    cv[x, a] * (t["children_rewards"][b, x, a] + t["children_discounts"][b, x, a] * t["children_values"][b, x, a])
                    for a in kids_x)
                assert abs(backed - t["node_values"][b, x] * t["node_visits"][b, x]) <= 1e-3 * max(1.0, abs(backed))
        if not revisits_possible:
            assert t["children_visits"][b, 0].sum() == num_simulations
        if legal_root is not None:
            assert (t["children_index"][b, 0][~legal_root[b]] == -1).all()
            assert (t["children_prior_logits"][b, 0][~legal_root[b]] < -1e30).all()
    return t


# -- mctx golden trees -----------------------------------------------------------------

GOLDEN = ["gumbel_muzero_reward_tree.json", "muzero_qtransform_tree.json"]


def _golden_config(d):
    ac = dict(d["algorithm_config"])
    kw = ac.get("qtransform_kwargs", {})
    if d["algorithm"] == "muzero":
        assert ac["qtransform"] == "qtransform_by_parent_and_siblings"
        return mcts.Config(algorithm="puct", c1=ac["pb_c_init"], c2=float(ac["pb_c_base"]),
                           dirichlet_alpha=ac["dirichlet_alpha"], dirichlet_fraction=ac["dirichlet_fraction"])
    assert ac["qtransform"] == "qtransform_completed_by_mix_value"
    return mcts.Config(algorithm="gumbel", gumbel_scale=ac["gumbel_scale"],
                       max_considered_actions=ac["max_num_considered_actions"], **kw)


@pytest.mark.parametrize("name", GOLDEN)
@pytest.mark.parametrize("threads", [1, 0])
def test_golden_tree(data_dir, name, threads):
    d = json.loads((data_dir / "mctx" / name).read_text())
    root = d["tree"]
    A = len(root["child_stats"])
    S = root["visit"] - 1
    cfg = _golden_config(d)
    cfg = mcts.Config(**{**cfg.__dict__, "num_threads": threads})
    nodes = {}

    def walk(n, path):
        nodes[path] = n
        for c in n["child_stats"]:
            if "visit" in c:
                walk(c, path + (c["action"],))

    walk(root, ())

    def net(n):
        return np.log(np.maximum([c["prior"] for c in n["child_stats"]], 1e-30)), n["raw_value_view"]

    # Rows 1 and 2 have most actions illegal and a different network, as in mctx's test:
    # row 0 must not notice them.
    B = 3
    legal = np.ones((B, A), bool)
    legal[1, 1:] = False
    legal[2, 2:] = False
    forest = mcts.Forest(B, A, S + 1, cfg)
    logits0, value0 = net(root)
    forest.set_roots(np.tile(logits0, (B, 1)), np.full(B, value0), legal)
    paths = {(b, 0): () for b in range(B)}
    discount = d["env_config"]["discount"]

    def recurrent_fn(leaves):
        L = len(leaves)
        lg = np.zeros((L, A), np.float32)
        v = np.zeros(L, np.float32)
        r = np.zeros(L, np.float32)
        for i in range(L):
            b, p, a, n = (int(x[i]) for x in leaves)
            path = paths[(b, p)] + (a,)
            paths[(b, n)] = path
            if b == 0:
                g = nodes[path]  # a KeyError here means the search expanded a node mctx did not
                lg[i], v[i] = net(g)
                r[i] = 0.0 if d["env_config"]["zero_reward"] else g["reward"]
            else:
                rng = np.random.default_rng(len(path) * 1000 + sum(path))
                lg[i], v[i], r[i] = rng.normal(size=A), rng.uniform(-1, 1), rng.uniform(-1, 1)
        return lg, v, r, discount

    forest.search(recurrent_fn, S)
    t = forest.export()
    mine = {path: n for (b, n), path in paths.items() if b == 0}
    assert set(mine) == set(nodes)
    for path, g in nodes.items():
        n = mine[path]
        assert t["node_visits"][0, n] == g["visit"], path
        assert abs(t["node_values"][0, n] - g["value_view"]) < 1e-3, path
        assert abs(t["raw_values"][0, n] - g["raw_value_view"]) < 1e-3, path
        if path:
            parent = mine[path[:-1]]
            assert abs(t["children_rewards"][0, parent, path[-1]] - g["reward"]) < 1e-3
        # exported priors are the stored softmax probabilities
        probs = np.exp(t["children_prior_logits"][0, n].astype(np.float64))
        np.testing.assert_allclose(probs, [c["prior"] for c in g["child_stats"]], atol=1e-6)
    check_invariants(forest, S, legal_root=legal)


# -- sequential halving (mctx seq_halving_test) ----------------------------------------

@pytest.mark.parametrize("m,n,expected", [
    (8, 24, [0] * 8 + [1] * 4 + [2] * 4 + [3, 3, 4, 4, 5, 5, 6, 6]),
    (8, 47, [0] * 8 + [1] * 4 + [2] * 4 + [3] * 4 + [4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13,
                                                     14, 14, 15, 15, 16, 16, 17]),
    (8, 2, [0, 0]),
    (8, 13, [0] * 8 + [1] * 4 + [2]),
    (7, 24, [0] * 7 + [1, 1, 1, 2, 2, 2] + [3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8]),
    (0, 16, list(range(16))),
    (1, 16, list(range(16))),
])
def test_considered_visit_sequence(m, n, expected):
    assert mcts.considered_visit_sequence(m, n) == tuple(expected)


# -- mctx policy oracles (policies_test) -----------------------------------------------

def bandit_fn(rewards):
    rewards = np.asarray(rewards, np.float32)

    def fn(leaves):
        L = len(leaves)
        return (np.zeros((L, rewards.shape[1]), np.float32), np.zeros(L, np.float32),
                rewards[leaves.tree, leaves.action], 0.0)

    return fn


def test_muzero_policy_one_simulation():
    forest = mcts.Forest(1, 4, 2, mcts.Config(algorithm="puct", dirichlet_fraction=0.0))
    forest.set_roots(np.array([[-1.0, 0.0, 2.0, 3.0]]), np.zeros(1), np.array([[True, True, True, False]]))
    res = forest.search(bandit_fn(np.zeros((1, 4))), 1)
    assert res.action.tolist() == [2]
    np.testing.assert_array_equal(res.action_weights, [[0.0, 0.0, 1.0, 0.0]])


def _deepest_leaf(t, b):
    best = (0, 0, 0)  # depth, visits, node
    stack = [(0, 0)]
    while stack:
        x, depth = stack.pop()
        best = max(best, (depth, int(t["node_visits"][b, x]), x))
        for c in t["children_index"][b, x]:
            if c >= 0:
                stack.append((int(c), depth + 1))
    return best


@pytest.mark.parametrize("masked", [True, False])
def test_gumbel_muzero_policy_bandit(masked):
    prior = np.array([[0.0, -1.0, 2.0, 3.0]], np.float32)
    rewards = np.array([[20.0, 3.0, -1.0, 10.0]], np.float32)
    invalid = np.array([[True, False, False, True]]) if masked else np.zeros((1, 4), bool)
    S, value_scale, maxvisit_init, root_value = 17, 0.05, 60.0, -5.0
    cfg = mcts.Config(algorithm="gumbel", gumbel_scale=0.0, value_scale=value_scale, maxvisit_init=maxvisit_init,
                      rescale_values=True, max_depth=3)
    forest = mcts.Forest(1, 4, S + 1, cfg)
    forest.set_roots(prior, np.array([root_value]), ~invalid)
    res = forest.search(bandit_fn(rewards), S)
    t = forest.export()
    if masked:
        assert res.action.tolist() == [1]
        assert res.visit_counts.tolist() == [[0, math.ceil(S / 2), S // 2, 0]]
        probs = np.exp(prior - prior.max()) * ~invalid
        probs /= probs.sum()
        mix = (root_value + S * (probs[0, 1] * rewards[0, 1] + probs[0, 2] * rewards[0, 2])) / (S + 1)
        completed = np.array([mix, rewards[0, 1], rewards[0, 2], mix])
        scale = (maxvisit_init + math.ceil(S / 2)) * value_scale
        rescaled = scale * (completed - completed.min()) / (completed.max() - completed.min())
        expected = np.where(invalid[0], -np.inf, prior[0] + rescaled)
        expected = np.exp(expected - expected.max())
        np.testing.assert_allclose(res.action_weights[0], expected / expected.sum(), atol=1e-6)
        depth, visits, _ = _deepest_leaf(t, 0)
        assert (depth, visits) == (3, 6)
    else:
        assert res.action.tolist() == [3]
        assert res.visit_counts.tolist() == [[6, 2, 2, 7]]
        completed = rewards[0]
        scale = (maxvisit_init + res.visit_counts.max()) * value_scale
        logits = prior[0] + scale * (completed - completed.min()) / (completed.max() - completed.min())
        expected = np.exp(logits - logits.max())
        np.testing.assert_allclose(res.action_weights[0], expected / expected.sum(), atol=1e-6)
        assert _deepest_leaf(t, 0)[0] == 3


def test_gumbel_noise_keeps_halving_structure():
    # With Gumbel noise on, the two legal actions still split 17 simulations 9/8.
    B = 64
    rewards = np.tile([[20.0, 3.0, -1.0, 10.0]], (B, 1))
    legal = np.tile([[False, True, True, False]], (B, 1))
    forest = mcts.Forest(B, 4, 18, mcts.Config(algorithm="gumbel", seed=3))
    forest.set_roots(np.tile([[0.0, -1.0, 2.0, 3.0]], (B, 1)), np.full(B, -5.0), legal)
    res = forest.search(bandit_fn(rewards), 17)
    assert (np.sort(res.visit_counts[:, 1:3], axis=1) == [8, 9]).all()
    assert set(res.action.tolist()) == {1, 2}  # noise changes the winner in some rows
    assert (res.visit_counts[np.arange(B), res.action] == 9).all()


def test_temperature():
    B = 4000
    forest = mcts.Forest(B, 3, 40, mcts.Config(algorithm="puct", dirichlet_fraction=0.0, seed=1))
    forest.set_roots(np.tile([[0.0, 0.5, 1.0]], (B, 1)), np.zeros(B))
    res = forest.search(bandit_fn(np.tile([[0.1, 0.2, 0.3]], (B, 1))), 30)
    n = res.visit_counts[0].astype(np.float64)
    assert (res.visit_counts == n).all()  # identical rows without noise
    np.testing.assert_allclose(res.action_weights[0], n / n.sum(), rtol=1e-6)
    assert (forest.result(temperature=0.0).action == np.argmax(n)).all()
    for temp in (1.0, 2.0):
        p = n ** (1 / temp)
        p /= p.sum()
        freq = np.bincount(forest.result(temperature=temp).action, minlength=3) / B
        assert np.abs(freq - p).max() < 4 * np.sqrt(p * (1 - p) / B).max() + 1e-3


def test_dirichlet_noise_over_legal_actions_only():
    B, A = 500, 6
    legal = np.tile([True, False, True, True, False, True], (B, 1))
    forest = mcts.Forest(B, A, 2, mcts.Config(algorithm="puct", dirichlet_fraction=0.25, seed=5))
    forest.set_roots(np.zeros((B, A)), np.zeros(B), legal)
    p = np.exp(forest.export()["children_prior_logits"][:, 0].astype(np.float64))
    assert np.allclose(p[:, [1, 4]], 0.0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert p[:, [0, 2, 3, 5]].min() >= 0.75 * 0.25 - 1e-6
    assert p.std(axis=0)[[0, 2, 3, 5]].min() > 0.01  # rows differ
    np.testing.assert_allclose(p.mean(axis=0)[[0, 2, 3, 5]], 0.25, atol=0.02)


# -- invariants, independence, determinism ---------------------------------------------

@pytest.mark.parametrize("algorithm", ["puct", "gumbel"])
@pytest.mark.parametrize("two_player", [False, True])
def test_invariants_random_trees(algorithm, two_player):
    B, A, S = 8, 7, 60
    fn, logits, values = random_net(A, seed=2, two_player=two_player)
    rng = np.random.default_rng(0)
    legal = rng.random((B, A)) < 0.6
    legal[:, 0] = True
    forest = mcts.Forest(B, A, S + 1, mcts.Config(algorithm=algorithm, seed=4))
    forest.set_roots(rng.normal(size=(B, A)), rng.normal(size=B), legal)

    def masked_fn(leaves):
        out = fn(leaves)
        mask = np.random.default_rng(int(leaves.node.sum())).random((len(leaves), A)) < 0.7
        mask[:, 1] = True
        return mcts.Expansion(*out, legal_mask=mask)

    res = forest.search(masked_fn, S)
    t = check_invariants(forest, S, legal_root=legal)
    assert (res.visit_counts.sum(axis=1) == S).all()
    assert (res.visit_counts[~legal] == 0).all()
    assert legal[np.arange(B), res.action].all()
    np.testing.assert_allclose(res.action_weights.sum(axis=1), 1.0, atol=1e-5)
    assert (res.action_weights[~legal] == 0).all()
    np.testing.assert_allclose(res.root_value, t["node_values"][:, 0])


@pytest.mark.parametrize("algorithm", ["puct", "gumbel"])
def test_batch_independence(algorithm):
    B, A, S = 5, 6, 40
    cfg = mcts.Config(algorithm=algorithm, dirichlet_fraction=0.0, gumbel_scale=0.0)
    rng = np.random.default_rng(1)
    logits, value = rng.normal(size=(B, A)).astype(np.float32), rng.normal(size=B).astype(np.float32)
    net_logits = rng.normal(size=(S + 1, A)).astype(np.float32)
    net_values = rng.uniform(-1, 1, size=S + 1).astype(np.float32)

    def fn(leaves):
        k = (leaves.node + 3 * leaves.action) % (S + 1)
        return net_logits[k], net_values[k], 0.1 * leaves.action.astype(np.float32), -1.0

    together = mcts.Forest(B, A, S + 1, cfg)
    together.set_roots(logits, value)
    together.search(fn, S)
    t_all = together.export()
    for b in range(B):
        alone = mcts.Forest(1, A, S + 1, cfg)
        alone.set_roots(logits[b:b + 1], value[b:b + 1])
        alone.search(fn, S)
        t1 = alone.export()
        for key in t1:
            np.testing.assert_array_equal(t1[key][0], t_all[key][b], err_msg=key)


@pytest.mark.parametrize("algorithm", ["puct", "gumbel"])
@pytest.mark.parametrize("B,A", [(600, 9), (40, 200)])  # large enough to be split over threads
def test_deterministic_across_thread_counts(algorithm, B, A):
    S = 20
    fn, _, _ = random_net(A, seed=7, two_player=True)
    rng = np.random.default_rng(3)
    logits, value = rng.normal(size=(B, A)), rng.normal(size=B)

    def run(config_threads, pool_threads):
        old = rlkern.get_num_threads()
        rlkern.set_num_threads(pool_threads)
        try:
            forest = mcts.Forest(B, A, S + 1, mcts.Config(algorithm=algorithm, seed=11, num_threads=config_threads))
            forest.set_roots(logits, value)
            res = forest.search(fn, S)
            forest.advance(res.action)
            res2 = forest.search(fn, S)
            return res, res2, forest.export()
        finally:
            rlkern.set_num_threads(old)

    base = run(1, 1)
    for cfg_t, pool_t in [(0, 2), (0, 4), (3, 4)]:
        other = run(cfg_t, pool_t)
        for r_base, r_other in zip(base[:2], other[:2]):
            for field in ("action", "action_weights", "visit_counts", "q_values", "root_value"):
                np.testing.assert_array_equal(getattr(r_base, field), getattr(r_other, field))
        for key in base[2]:
            np.testing.assert_array_equal(base[2][key], other[2][key])
    # a different seed changes the noise
    forest = mcts.Forest(B, A, S + 1, mcts.Config(algorithm=algorithm, seed=12))
    forest.set_roots(logits, value)
    assert not np.array_equal(forest.search(fn, S).visit_counts, base[0].visit_counts)


def test_step_api_matches_search_and_node_ids():
    B, A, S = 4, 5, 20
    fn, _, _ = random_net(A, seed=9)
    cfg = mcts.Config(algorithm="gumbel", seed=2)
    a = mcts.Forest(B, A, S + 1, cfg)
    a.set_roots(np.zeros((B, A)), np.zeros(B))
    ra = a.search(fn, S)
    b = mcts.Forest(B, A, S + 1, cfg)
    b.set_roots(np.zeros((B, A)), np.zeros(B), num_simulations=S)
    for step in range(S):
        leaves = b.select()
        assert leaves.tree.dtype == np.int64 and len(leaves) == B
        np.testing.assert_array_equal(leaves.node, step + 1)  # expansion order
        out = fn(leaves)
        b.expand_backup(leaves, torch.from_numpy(out[0]), torch.from_numpy(out[1]), out[2], out[3])
    rb = b.result()
    np.testing.assert_array_equal(ra.visit_counts, rb.visit_counts)
    np.testing.assert_array_equal(ra.action, rb.action)



@pytest.mark.parametrize("algorithm", ["puct", "gumbel"])
@pytest.mark.parametrize("A", [5, 60])  # small nodes scan their edges; over 48 edges, a list
def test_search_matches_step_api_with_terminals_depth_and_full_pool(algorithm, A):
    # search() expands one step's leaves and selects the next step's in one core call; it
    # must build the same trees as select/expand_backup, also across steps that end at
    # existing nodes (terminal, max_depth, full pool: fewer leaves or none), and after
    # advance() moved the kept subtree.
    B, S = 6, 40
    fn, _, _ = random_net(A, seed=4)
    rng = np.random.default_rng(0)
    legal = rng.random((97, A)) < 0.7
    legal[:, 0] = True

    def net(leaves):
        logits, value, reward, discount = fn(leaves)
        k = (leaves.node * 5 + leaves.tree) % 97
        terminal = (leaves.action % 4) == 1
        return mcts.Expansion(logits, value, reward, discount, legal[k], terminal)

    cfg = mcts.Config(algorithm=algorithm, seed=3, max_depth=4, max_considered_actions=4)
    root_logits = rng.normal(size=(B, A)).astype(np.float32)
    a = mcts.Forest(B, A, 25, cfg)
    b = mcts.Forest(B, A, 25, cfg)
    for f in (a, b):
        f.set_roots(root_logits, np.zeros(B, np.float32))
    for round_ in range(2):
        ra = a.search(net, S)
        b.plan(S)
        for _ in range(S):
            leaves = b.select()
            if len(leaves):
                b.expand_backup(leaves, *net(leaves)[:4], legal_mask=net(leaves).legal_mask,
                                terminal=net(leaves).terminal)
        rb = b.result()
        ta, tb = a.export(), b.export()
        for key in ta:
            np.testing.assert_array_equal(ta[key], tb[key], err_msg=f"round {round_}: {key}")
        np.testing.assert_array_equal(ra.action_weights, rb.action_weights)
        np.testing.assert_array_equal(ra.action, rb.action)
        keep = np.where(np.arange(B) % 2 == 0, ra.action, -1)
        np.testing.assert_array_equal(a.advance(keep), b.advance(keep))
        empty = ~a.has_root()
        for f in (a, b):
            if empty.any():
                f.set_roots(root_logits, np.zeros(B, np.float32), rows=empty)


# -- terminal nodes, max_depth, full pool ----------------------------------------------

def test_terminal_nodes():
    # Action 0 ends the game with reward 1; action 1 leads to a normal node of value -0.5.
    forest = mcts.Forest(1, 2, 50, mcts.Config(algorithm="puct", dirichlet_fraction=0.0))
    forest.set_roots(np.zeros((1, 2)), np.zeros(1))

    def fn(leaves):
        L = len(leaves)
        term = leaves.action == 0
        return mcts.Expansion(np.zeros((L, 2)), np.full(L, 7.0), term.astype(np.float32), 1.0, None, term)

    forest.search(fn, 40)
    t = forest.export()
    root_kids = t["children_index"][0, 0]
    term_node = root_kids[0]
    assert t["terminal"][0, term_node] and t["node_values"][0, term_node] == 0.0
    assert (t["children_index"][0, term_node] == -1).all()  # never expanded
    assert t["node_visits"][0, term_node] == t["children_visits"][0, 0, 0] > 1
    # every visit of the terminal child backed up exactly its reward
    assert t["children_rewards"][0, 0, 0] == 1.0
    n_term = t["children_visits"][0, 0, 0]
    other = root_kids[1]
    expected_root = (0.0 + n_term * 1.0 + t["node_visits"][0, other] * t["node_values"][0, other]) / t["node_visits"][0, 0]
    assert abs(t["node_values"][0, 0] - expected_root) < 1e-5


def test_max_depth_and_full_pool():
    A = 3
    fn, _, _ = random_net(A, seed=5)
    forest = mcts.Forest(2, A, 100, mcts.Config(algorithm="puct", max_depth=2, dirichlet_fraction=0.0))
    forest.set_roots(np.zeros((2, A)), np.zeros(2))
    forest.search(fn, 60)
    t = forest.export()
    par = t["parents"][0]
    n = forest.num_nodes()[0]
    depth = np.zeros(n, int)
    for i in range(1, n):
        depth[i] = depth[par[i]] + 1
    assert depth.max() == 2 and n <= 1 + A + A * A
    assert t["node_visits"][:, 0].tolist() == [61, 61]

    small = mcts.Forest(2, A, 5, mcts.Config(algorithm="gumbel"))
    small.set_roots(np.zeros((2, A)), np.zeros(2))
    res = small.search(fn, 30)
    assert (small.num_nodes() == 5).all()
    t = small.export()
    assert (t["node_visits"][:, 0] == 31).all()  # every simulation was backed up somewhere
    assert np.isfinite(t["node_values"]).all() and np.isfinite(res.action_weights).all()


# -- tree reuse --------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["puct", "gumbel"])
def test_advance_keeps_subtree(algorithm):
    B, A, S = 6, 4, 50
    fn, _, _ = random_net(A, seed=3, two_player=True)
    forest = mcts.Forest(B, A, 2 * S + 2, mcts.Config(algorithm=algorithm, dirichlet_fraction=0.0, seed=1))
    forest.set_roots(np.zeros((B, A)), np.zeros(B))
    res = forest.search(fn, S)
    before = forest.export()
    used_before = forest.num_nodes()
    actions = res.action.copy()
    actions[5] = -1  # untouched
    o2n = forest.advance(actions)
    after = forest.export()
    for b in range(B):
        n_old = used_before[b]
        if actions[b] < 0:
            np.testing.assert_array_equal(o2n[b, :n_old], np.arange(n_old))
            continue
        c = before["children_index"][b, 0, actions[b]]
        kept = np.flatnonzero(o2n[b] >= 0)
        assert kept[0] == c and o2n[b, c] == 0
        np.testing.assert_array_equal(o2n[b, kept], np.arange(len(kept)))  # monotone, dense
        assert forest.num_nodes()[b] == len(kept)
        assert len(kept) == 1 + (before["children_index"][b] >= 0)[kept].sum()
        for old in kept:
            new = o2n[b, old]
            for key in ("node_visits", "node_values", "raw_values"):
                assert after[key][b, new] == before[key][b, old], key
            for key in ("children_visits", "children_values"):
                np.testing.assert_array_equal(after[key][b, new], before[key][b, old])
            ci = before["children_index"][b, old]
            np.testing.assert_array_equal(after["children_index"][b, new], np.where(ci >= 0, o2n[b, np.maximum(ci, 0)], -1))
    # searching on continues from the kept statistics
    visits_kept = after["node_visits"][:, 0].copy()
    forest.search(fn, S)
    t = forest.export()
    np.testing.assert_array_equal(t["node_visits"][:, 0], visits_kept + S)
    check_invariants(forest, None, revisits_possible=True)
    for b in range(B):
        x_visits = t["node_visits"][b, :forest.num_nodes()[b]]
        child_sum = t["children_visits"][b, :forest.num_nodes()[b]].sum(axis=1)
        assert (x_visits == 1 + child_sum).all()


def test_advance_to_unexpanded_child_empties_tree():
    forest = mcts.Forest(2, 3, 4, mcts.Config(dirichlet_fraction=0.0))
    forest.set_roots(np.array([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]]), np.zeros(2))
    fn, _, _ = random_net(3)
    forest.search(fn, 1)  # only action 0 is expanded
    o2n = forest.advance(np.array([2, 0]))
    assert (o2n[0] == -1).all() and o2n[1, 1] == 0
    assert forest.has_root().tolist() == [False, True]
    with pytest.raises(ValueError, match="without a root"):
        forest.advance(np.array([0, -1]))
    forest.set_roots(np.zeros((2, 3)), np.zeros(2), rows=np.array([True, False]))
    assert forest.has_root().tolist() == [True, True]
    forest.search(fn, 2)


# -- tic-tac-toe against exhaustive minimax ------------------------------------------

TTT = games.TicTacToe()


def ttt_search(states, S, config):
    B = len(states)
    forest = mcts.Forest(B, 9, S + 1, config)
    boards = np.zeros((B, S + 1, 9), np.int8)
    boards[:, 0] = states
    forest.set_roots(np.zeros((B, 9)), np.zeros(B), TTT.legal(states))

    def fn(leaves):
        nxt, reward, terminal = TTT.step(boards[leaves.tree, leaves.parent], leaves.action)
        boards[leaves.tree, leaves.node] = nxt
        L = len(leaves)
        return mcts.Expansion(np.zeros((L, 9)), np.zeros(L), reward, -1.0, TTT.legal(nxt), terminal)

    return forest.search(fn, S)


def test_tictactoe_game_counts():
    # 255,168 games: 131,184 won by x, 77,904 by o, 46,080 drawn; 5,478 positions.
    memo = {}

    def count(state):
        key = state.tobytes()
        if key not in memo:
            total = np.zeros(3, np.int64)  # mover wins, mover loses, draws (from this state's mover)
            for a in np.flatnonzero(state == 0):
                nxt, r, t = TTT.step(state[None], np.array([a]))
                if t[0]:
                    total += [1, 0, 0] if r[0] else [0, 0, 1]
                else:
                    sub = count(nxt[0])
                    total += [sub[1], sub[0], sub[2]]
            memo[key] = total
        return memo[key]

    wins_x, wins_o, draws = count(TTT.initial(1)[0])
    assert (wins_x, wins_o, draws) == (131184, 77904, 46080)
    assert len(games.tictactoe_states()) == 5478


@pytest.fixture(scope="module")
def ttt_positions():
    states = [s for s in games.tictactoe_states().values() if not (s.any() and games._is_terminal_ttt(s))]
    states = np.stack(states)
    values = np.array([games.tictactoe_value(s) for s in states])
    action_values = np.stack([games.tictactoe_action_values(s) for s in states])
    return states, values, action_values


def test_tictactoe_root_values_agree_with_minimax(ttt_positions):
    states, values, _ = ttt_positions
    res = ttt_search(states, 1000, mcts.Config(algorithm="puct", dirichlet_fraction=0.0))
    decided = values != 0
    assert (np.sign(res.root_value[decided]) == values[decided]).all()
    assert np.abs(res.root_value[~decided]).max() < 0.5


@pytest.mark.parametrize("algorithm", ["puct", "gumbel"])
def test_tictactoe_wins_and_blocks(ttt_positions, algorithm):
    states, values, action_values = ttt_positions
    legal = TTT.legal(states)
    # immediate wins: some move completes a line
    win_now = np.zeros(len(states), bool)
    wins = np.zeros((len(states), 9), bool)
    for a in range(9):
        ok = legal[:, a]
        _, r, _ = TTT.step(np.where(ok[:, None], states, 0), np.full(len(states), a))
        wins[:, a] = ok & (r > 0)
    win_now = wins.any(axis=1)
    # threats: the opponent would complete a line next move
    threat = np.zeros((len(states), 9), bool)
    for a in range(9):
        ok = legal[:, a]
        _, r, _ = TTT.step(np.where(ok[:, None], -states, 0), np.full(len(states), a))
        threat[:, a] = ok & (r > 0)
    must_block = ~win_now & (threat.sum(axis=1) == 1)
    cfg = mcts.Config(algorithm=algorithm, dirichlet_fraction=0.0, gumbel_scale=0.0, temperature=0.0)
    res = ttt_search(states, 200, cfg)
    rows = np.arange(len(states))
    assert wins[rows[win_now], res.action[win_now]].all()
    assert threat[rows[must_block], res.action[must_block]].all()
    assert win_now.sum() > 100 and must_block.sum() > 100


# -- bad input ---------------------------------------------------------------------------

def test_bad_input_raises():
    with pytest.raises(ValueError, match="algorithm"):
        mcts.Config(algorithm="alphago")
    with pytest.raises(ValueError, match="dirichlet_fraction"):
        mcts.Config(dirichlet_fraction=1.5)
    with pytest.raises(ValueError, match="max_depth"):
        mcts.Config(max_depth=0)
    with pytest.raises(ValueError, match="batch_size"):
        mcts.Forest(0, 3, 5)
    with pytest.raises(TypeError, match="config"):
        mcts.Forest(2, 3, 5, config={"algorithm": "puct"})
    forest = mcts.Forest(2, 3, 5)
    with pytest.raises(ValueError, match="prior_logits"):
        forest.set_roots(np.zeros((2, 4)), np.zeros(2))
    with pytest.raises(ValueError, match="value"):
        forest.set_roots(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="no legal action"):
        forest.set_roots(np.zeros((2, 3)), np.zeros(2), np.array([[1, 0, 0], [0, 0, 0]], bool))
    with pytest.raises(ValueError, match="NaN"):
        forest.set_roots(np.array([[0.0, np.nan, 0.0], [0, 0, 0]]), np.zeros(2))
    # NaN on an illegal action is fine
    forest.set_roots(np.array([[0.0, np.nan, 0.0], [0, 0, 0]]), np.zeros(2), np.array([[1, 0, 1], [1, 1, 1]], bool))
    with pytest.raises(ValueError, match="not finite"):
        forest.set_roots(np.zeros((2, 3)), np.array([0.0, np.inf]))
    with pytest.raises(TypeError, match="prior_logits"):
        forest.set_roots(np.array([["a", "b", "c"]] * 2), np.zeros(2))
    leaves = forest.select()
    with pytest.raises(RuntimeError, match="select"):
        forest.select()
    with pytest.raises(ValueError, match="shape"):
        forest.expand_backup(leaves, np.zeros((len(leaves) + 1, 3)), np.zeros(len(leaves)), 0.0, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        forest.expand_backup(leaves, np.full((len(leaves), 3), np.nan), np.zeros(len(leaves)), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"\+inf"):
        forest.expand_backup(leaves, np.full((len(leaves), 3), np.inf), np.zeros(len(leaves)), 0.0, 1.0)
    with pytest.raises(ValueError, match="reward: row 0"):
        forest.expand_backup(leaves, np.zeros((len(leaves), 3)), np.zeros(len(leaves)), np.nan, 1.0)
    with pytest.raises(ValueError, match="terminal"):
        forest.expand_backup(leaves, np.zeros((len(leaves), 3)), np.zeros(len(leaves)), 0.0, 1.0,
                             legal_mask=np.zeros((len(leaves), 3), bool))
    # a failed expand_backup leaves the forest unchanged and the leaves still pending
    forest.expand_backup(leaves, np.zeros((len(leaves), 3)), np.zeros(len(leaves)), 0.0, 1.0)
    with pytest.raises(ValueError, match="last select"):
        forest.expand_backup(leaves, np.zeros((len(leaves), 3)), np.zeros(len(leaves)), 0.0, 1.0)
    with pytest.raises(ValueError, match="not legal"):
        forest.advance(np.array([1, 0]))
    with pytest.raises(ValueError, match="outside"):
        forest.advance(np.array([3, 0]))
    with pytest.raises(TypeError, match="actions"):
        forest.advance(np.array([0.5, 0.0]))
    with pytest.raises(TypeError, match="recurrent_fn"):
        forest.search(lambda leaves: None, 2)
    gumbel = mcts.Forest(1, 2, 3, mcts.Config(algorithm="gumbel"))
    gumbel.set_roots(np.zeros((1, 2)), np.zeros(1))
    with pytest.raises(RuntimeError, match="plan"):
        gumbel.select()
    assert np.isfinite(check_invariants(forest, None, revisits_possible=True)["node_values"]).all()


# -- the benchmark's plain-Python competitor computes the same search ---------------------

@pytest.mark.parametrize("algorithm", ["puct", "gumbel"])
def test_python_competitor_matches_forest(algorithm):
    from rlkern.bench.mcts import TABLE, PythonForest, _table, cases

    B, A, S = 6, 9, 30
    logits, values = _table(A)
    py = PythonForest(algorithm).search(np.broadcast_to(logits[0], (B, A)), np.zeros(B),
                                        lambda ids: (logits[ids % TABLE], values[ids % TABLE]), S)
    forest = mcts.Forest(B, A, S + 1, mcts.Config(algorithm=algorithm, dirichlet_fraction=0.0, gumbel_scale=0.0))
    forest.set_roots(np.broadcast_to(logits[0], (B, A)), np.zeros(B))
    res = forest.search(lambda lv: (logits[lv.node % TABLE], values[lv.node % TABLE], 0.0, -1.0), S)
    np.testing.assert_array_equal(py, res.visit_counts)
    quick = cases(torch.device("cpu"), quick=True)
    assert {c.op for c in quick} == {"puct_search", "gumbel_search"}
    impls = quick[0].make(torch.device("cpu"))
    assert list(impls)[:2] == ["rlkern", "python"]
    impls["rlkern"]()


def test_gumbel_policy_improvement_on_bandits():
    # Gumbel MuZero's guarantee: the expected value of the chosen action is at least the
    # prior's expected value (Danihelka et al. 2022), here with 4 simulations on 8 arms.
    B, A = 4000, 8
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, A)).astype(np.float32)
    q = rng.normal(size=(B, A)).astype(np.float32)
    forest = mcts.Forest(B, A, 5, mcts.Config(algorithm="gumbel", seed=9))
    forest.set_roots(logits, np.zeros(B))
    res = forest.search(bandit_fn(q), 4)
    prior = np.exp(logits - logits.max(axis=1, keepdims=True))
    prior /= prior.sum(axis=1, keepdims=True)
    chosen = q[np.arange(B), res.action].mean()
    baseline = (prior * q).sum(axis=1).mean()
    assert chosen > baseline + 0.3
    improved = (res.action_weights * q).sum(axis=1).mean()
    assert improved > baseline


@pytest.mark.skipif(os.environ.get("RLKERN_ASAN") == "1", reason="ASan's quarantine holds freed memory")
def test_repeated_search_and_advance_keeps_memory_flat():
    from rlkern import _ext

    bench = _ext.load().bench
    B, A, S = 64, 9, 16
    fn, _, _ = random_net(A, seed=1, two_player=True)
    forest = mcts.Forest(B, A, 4 * S, mcts.Config(algorithm="puct", seed=3))
    logits, value = np.zeros((B, A), np.float32), np.zeros(B, np.float32)

    def cycle():
        forest.set_roots(logits, value)
        for _ in range(3):
            res = forest.search(fn, S)
            forest.advance(res.action)
            empty = ~forest.has_root()
            if empty.any():
                forest.set_roots(logits, value, rows=empty)

    for _ in range(50):
        cycle()
    before = bench.current_rss()
    for _ in range(400):
        cycle()
    assert bench.current_rss() - before < 8 * 2**20


# -- issue #11: non-finite options and products, totality, recoverable errors ---------------

def _mctx_considered_visits(m, n):
    """mctx seq_halving.get_sequence_of_considered_visits, transcribed with Python ints."""
    if m <= 1:
        return tuple(range(n))
    log2max = int(math.ceil(math.log2(m)))
    seq, visits, considered = [], [0] * m, m
    while len(seq) < n:
        extra = max(1, int(n / (log2max * considered)))
        for _ in range(extra):
            seq.extend(visits[:considered])
            for i in range(considered):
                visits[i] += 1
        considered = max(2, considered // 2)
    return tuple(seq[:n])


def test_considered_visit_sequence_matches_mctx_and_huge_m_is_instant():
    for m in list(range(0, 20)) + [31, 32, 33, 100]:
        for n in (1, 2, 5, 16, 17, 50, 64, 100):
            assert mcts.considered_visit_sequence(m, n) == _mctx_considered_visits(m, n), (m, n)
    # (2**31 - 1, 1) used to overflow a shift and loop forever: tests/test_crash_safety_mcts.py
    assert mcts.considered_visit_sequence(10**6, 3) == (0, 0, 0)
    with pytest.raises(ValueError, match="max_num_considered_actions"):
        mcts.considered_visit_sequence(2**31, 1)
    with pytest.raises(ValueError, match="num_simulations"):
        mcts.considered_visit_sequence(4, 2**40)


def test_gumbel_plan_is_capped_at_the_number_of_actions():
    import time

    B, A, S = 4, 9, 50
    fn, logits, _ = random_net(A, seed=5, two_player=True)
    results = []
    for m in (A, 10**6):
        forest = mcts.Forest(B, A, S + 1, mcts.Config(algorithm="gumbel", max_considered_actions=m, seed=2))
        forest.set_roots(np.tile(logits[0], (B, 1)), np.zeros(B))
        t0 = time.perf_counter()
        results.append(forest.search(fn, S))
        assert time.perf_counter() - t0 < 2.0, f"max_considered_actions={m}"
    np.testing.assert_array_equal(results[0].visit_counts, results[1].visit_counts)
    np.testing.assert_array_equal(results[0].action, results[1].action)


@pytest.mark.parametrize("kwargs,name", [
    (dict(dirichlet_alpha=math.inf), "dirichlet_alpha"),
    (dict(c2=math.inf), "c2"),
    (dict(c1=math.inf), "c1"),
    (dict(algorithm="gumbel", value_scale=math.inf), "value_scale"),
    (dict(algorithm="gumbel", maxvisit_init=1e39), "maxvisit_init"),
    (dict(algorithm="gumbel", gumbel_scale=1e39), "gumbel_scale"),
    (dict(algorithm="gumbel", maxvisit_init=1e30, value_scale=1e30), "maxvisit_init and value_scale"),
    (dict(temperature=math.inf), "temperature"),
    (dict(max_considered_actions=2**31), "max_considered_actions"),
])
def test_non_finite_config_rejected(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mcts.Config(**kwargs)


def test_core_rejects_non_finite_config_too():
    cls = rlkern._kernel.core().mcts.Forest
    base = [2, 2, 4, 0, 0, 1.25, 19652.0, 0.3, 0.25, 16, 1.0, 50.0, 0.1, True, True, 1.0, 0, 0, 1]
    for index, name in [(6, "c2"), (7, "dirichlet_alpha"), (12, "value_scale")]:
        args = list(base)
        args[index] = math.inf
        with pytest.raises(ValueError, match=name):
            cls(*args)


def _one_step_forest(B=2, A=2, N=8, **cfg):
    forest = mcts.Forest(B, A, N, mcts.Config(dirichlet_fraction=0.0, **cfg))
    forest.set_roots(np.zeros((B, A), np.float32), np.zeros(B, np.float32))
    return forest


@pytest.mark.parametrize("value,reward,discount", [(1e30, 0.0, 1e30), (3e38, 3e38, 1.0), (-3e38, -3e38, 1.0)])
@pytest.mark.parametrize("algorithm", ["puct", "gumbel"])
def test_overflowing_backup_rejected_before_any_change(value, reward, discount, algorithm):
    forest = _one_step_forest(algorithm=algorithm)
    forest.plan(6)
    leaves = forest.select()
    before = forest.export()
    with pytest.raises(ValueError, match=r"reward \+ discount \* value: row 1 overflows"):
        forest.expand_backup(leaves, np.zeros((2, 2)), np.array([0.0, value], np.float32),
                             np.array([0.0, reward], np.float32), np.array([1.0, discount], np.float32))
    after = forest.export()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    forest.expand_backup(leaves, np.zeros((2, 2)), np.zeros(2), 0.0, 1.0)  # still pending, still usable
    assert forest.num_nodes().tolist() == [2, 2]


def test_overflow_along_the_path_rejected():
    # Each edge alone is finite (1e15 * 1e20 = 1e35), but two levels up the return is 1e55.
    forest = _one_step_forest(B=1, A=1, N=6)
    leaves = forest.select()
    forest.expand_backup(leaves, np.zeros((1, 1)), np.float32(1e15), 0.0, np.float32(1e20))
    leaves = forest.select()
    assert leaves.parent.tolist() == [1]
    with pytest.raises(ValueError, match="overflows float32 when backed up"):
        forest.expand_backup(leaves, np.zeros((1, 1)), np.float32(1e15), 0.0, np.float32(1e20))
    forest.expand_backup(leaves, np.zeros((1, 1)), np.float32(1e15), 0.0, np.float32(1e-20))
    assert np.isfinite(forest.export()["node_values"]).all()


@pytest.mark.parametrize("algorithm", ["puct", "gumbel"])
@pytest.mark.parametrize("scale", [3e38, 1e37, 1e31])
def test_values_near_the_float32_limit_stay_finite(algorithm, scale):
    # Finite inputs whose running means (value * n) or mixed value (sum n * mean) overflow
    # float32 in the plain formulas, and nearly equal huge values whose rescaling
    # (q / spread) does.
    B, A, S = 8, 3, 40
    rng = np.random.default_rng(1)
    table = (scale * rng.choice([-1.0, 1.0, 0.999999], size=97)).astype(np.float32)
    forest = mcts.Forest(B, A, S + 1, mcts.Config(algorithm=algorithm, seed=1))
    forest.set_roots(rng.normal(size=(B, A)).astype(np.float32), table[:B])

    def fn(leaves):
        return (rng.normal(size=(len(leaves), A)).astype(np.float32), table[leaves.node % 97], 0.0, 1.0)

    res = forest.search(fn, S)
    t = forest.export()
    for k in ("node_values", "children_values"):
        assert np.isfinite(t[k]).all(), k
    assert np.isfinite(res.root_value).all() and np.isfinite(res.q_values).all()
    assert np.isfinite(res.action_weights).all()
    np.testing.assert_allclose(res.action_weights.sum(axis=1), 1.0, rtol=1e-5)
    assert ((res.action >= 0) & (res.action < A)).all()
    assert (res.visit_counts.sum(axis=1) == S).all()


def test_failed_search_leaves_the_forest_usable():
    B, A = 3, 4
    fn, logits, _ = random_net(A, seed=3, two_player=True)
    calls = []

    def flaky(leaves):
        calls.append(1)
        out = fn(leaves)
        if len(calls) == 3:
            return (np.full_like(out[0], np.nan),) + out[1:]
        return out

    forest = mcts.Forest(B, A, 40, mcts.Config(seed=4))
    forest.set_roots(np.tile(logits[0], (B, 1)), np.zeros(B))
    with pytest.raises(ValueError, match="NaN"):
        forest.search(flaky, 10)
    res = forest.search(fn, 10)  # 2 simulations of the failed search were kept
    assert (res.visit_counts.sum(axis=1) == 12).all()
    check_invariants(forest, 12)

    def boom(leaves):
        raise KeyError("network down")

    with pytest.raises(KeyError):
        forest.search(boom, 5)
    res = forest.search(fn, 4)
    assert (res.visit_counts.sum(axis=1) == 16).all()
    # A pending step of the caller's own: the message says how to get out of it.
    leaves = forest.select()
    with pytest.raises(RuntimeError, match="discard_pending"):
        forest.search(fn, 1)
    forest.discard_pending()
    assert (forest.search(fn, 2).visit_counts.sum(axis=1) == 18).all()
    assert len(leaves) == B


def test_advance_rejects_wrapping_actions():
    B, A = 2, 3
    fn, logits, _ = random_net(A, seed=3, two_player=True)
    forest = mcts.Forest(B, A, 20, mcts.Config(seed=4))
    forest.set_roots(np.tile(logits[0], (B, 1)), np.zeros(B))
    forest.search(fn, 8)
    before = forest.export()["node_visits"].copy()
    with pytest.raises(ValueError, match="row 0 has action 18446744073709551615 outside"):
        forest.advance(np.array([2**64 - 1, 0], np.uint64))
    with pytest.raises(ValueError, match="actions must have shape"):
        forest.advance(np.array([0, 0, 0]))
    np.testing.assert_array_equal(forest.export()["node_visits"], before)
    o2n = forest.advance(np.array([-1, -1], np.int64))  # negative: unchanged
    np.testing.assert_array_equal(forest.export()["node_visits"], before)
    assert (o2n[:, :5] == np.arange(5)).all()
    forest.advance(np.array([1, 2], np.uint8))


def test_set_roots_failure_keeps_pending_step():
    forest = _one_step_forest()
    leaves = forest.select()
    with pytest.raises(ValueError, match="not finite"):
        forest.set_roots(np.zeros((2, 2)), np.array([0.0, np.nan]))
    forest.expand_backup(leaves, np.zeros((2, 2)), np.zeros(2), 0.0, 1.0)
    assert forest.num_nodes().tolist() == [2, 2]


def test_tensor_subclasses_and_meta_tensors_rejected():
    from torch._subclasses.fake_tensor import FakeTensorMode

    forest = _one_step_forest()
    with FakeTensorMode() as mode:
        fake_logits = torch.zeros(2, 2)
        fake_value = torch.zeros(2)
        fake_actions = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(TypeError, match="prior_logits"):
        forest.set_roots(fake_logits, np.zeros(2))
    with pytest.raises(TypeError, match="value"):
        forest.set_roots(np.zeros((2, 2)), fake_value)
    with pytest.raises(TypeError, match="legal_mask"):
        forest.set_roots(np.zeros((2, 2)), np.zeros(2), torch.ones(2, 2, dtype=torch.bool, device="meta"))
    with pytest.raises(TypeError, match="actions"):
        forest.advance(fake_actions)
    leaves = forest.select()
    with pytest.raises(TypeError, match="discount"):
        forest.expand_backup(leaves, np.zeros((2, 2)), np.zeros(2), 0.0, torch.ones(2, device="meta"))
    with pytest.raises(TypeError, match="terminal"):
        forest.expand_backup(leaves, np.zeros((2, 2)), np.zeros(2), 0.0, 1.0, terminal=fake_value)
    forest.expand_backup(leaves, torch.zeros(2, 2), torch.zeros(2), 0.0, 1.0)
    del mode


# -- to_play: games whose turns do not alternate (issue #17) -------------------------------

class DoubleNim:
    """Take 1 or 2 tokens; whoever takes the last one wins (+1 for the mover). Once per
    game each player may instead pass (the turn changes, nothing is taken) or take one
    token and move again (a double move). State: tokens, player, pass used[2], double
    used[2]."""

    A = 4  # take 1, take 2, pass, take 1 and move again

    @staticmethod
    def legal(s):
        s = np.atleast_2d(s)
        n, p = s[:, 0], s[:, 1]
        rows = np.arange(len(s))
        return np.stack([n >= 1, n >= 2, s[rows, 2 + p] == 0, (n >= 2) & (s[rows, 4 + p] == 0)], axis=1)

    @staticmethod
    def step(s, a):
        s = np.array(s, copy=True)
        rows = np.arange(len(s))
        p = s[:, 1].copy()
        take = np.select([a == 0, a == 1, a == 2, a == 3], [1, 2, 0, 1])
        s[:, 0] -= take
        s[rows[a == 2], 2 + p[a == 2]] = 1
        s[rows[a == 3], 4 + p[a == 3]] = 1
        s[:, 1] = np.where(a == 3, p, 1 - p)
        terminal = s[:, 0] == 0
        reward = terminal.astype(np.float32)  # the mover took the last token
        return s, reward, terminal

    @classmethod
    def minimax(cls, s, memo):
        """Value for the player to move, and each legal action's value for them."""
        key = tuple(int(x) for x in s)
        if key in memo:
            return memo[key]
        q = {}
        for a in np.flatnonzero(cls.legal(s)[0]):
            nxt, r, term = cls.step(s[None], np.array([a]))
            if term[0]:
                q[a] = float(r[0])
            else:
                v = cls.minimax(nxt[0], memo)[0]
                q[a] = float(r[0]) + (v if nxt[0, 1] == s[1] else -v)
        memo[key] = (max(q.values()), q)
        return memo[key]


def double_nim_search(states, S, config, to_play_mode=True):
    B, A = len(states), DoubleNim.A
    forest = mcts.Forest(B, A, S + 1, config)
    boards = np.zeros((B, S + 1, states.shape[1]), np.int64)
    boards[:, 0] = states
    kw = dict(to_play=states[:, 1]) if to_play_mode else {}
    forest.set_roots(np.zeros((B, A)), np.zeros(B), DoubleNim.legal(states), **kw)

    def fn(leaves):
        parent = boards[leaves.tree, leaves.parent]
        nxt, reward, terminal = DoubleNim.step(parent, leaves.action)
        boards[leaves.tree, leaves.node] = nxt
        L = len(leaves)
        legal = DoubleNim.legal(nxt)
        legal[terminal] = False
        if to_play_mode:
            return mcts.Expansion(np.zeros((L, A)), np.zeros(L), reward, 1.0, legal, terminal, nxt[:, 1])
        # the same game with hand-made signs: -1 where the mover changes
        return mcts.Expansion(np.zeros((L, A)), np.zeros(L), reward,
                              np.where(nxt[:, 1] == parent[:, 1], 1.0, -1.0), legal, terminal)

    return forest, forest.search(fn, S)


def double_nim_positions():
    states = []
    for n in range(1, 8):
        for p in (0, 1):
            for used in range(16):
                states.append([n, p, used & 1, (used >> 1) & 1, (used >> 2) & 1, (used >> 3) & 1])
    return np.array(states, np.int64)


@pytest.mark.parametrize("algorithm", ["puct", "gumbel"])
def test_to_play_equals_hand_made_discount_signs(algorithm):
    states = double_nim_positions()
    cfg = mcts.Config(algorithm=algorithm, seed=5)
    f1, r1 = double_nim_search(states, 60, cfg, to_play_mode=True)
    f2, r2 = double_nim_search(states, 60, cfg, to_play_mode=False)
    t1, t2 = f1.export(), f2.export()
    for k in t1:
        np.testing.assert_array_equal(t1[k], t2[k], err_msg=k)
    np.testing.assert_array_equal(r1.action, r2.action)


def test_to_play_agrees_with_minimax_on_a_game_with_passes_and_double_moves():
    states = double_nim_positions()
    memo = {}
    values = np.array([DoubleNim.minimax(s, memo)[0] for s in states])
    assert {-1.0, 1.0} <= set(values)
    forest, res = double_nim_search(states, 1500, mcts.Config(algorithm="puct", dirichlet_fraction=0.0))
    assert (np.sign(res.root_value) == values).all()
    # the most visited action is a minimax-optimal one
    best = res.visit_counts.argmax(axis=1)
    for s, a, v in zip(states, best, values):
        assert DoubleNim.minimax(s, memo)[1][a] == v, (s, a)
    # without the per-node mover (plain alternation, discount -1) the search gets it wrong
    alternating = mcts.Forest(len(states), DoubleNim.A, 1501, mcts.Config(algorithm="puct", dirichlet_fraction=0.0))
    boards = np.zeros((len(states), 1501, states.shape[1]), np.int64)
    boards[:, 0] = states
    alternating.set_roots(np.zeros((len(states), 4)), np.zeros(len(states)), DoubleNim.legal(states))

    def fn(leaves):
        nxt, reward, terminal = DoubleNim.step(boards[leaves.tree, leaves.parent], leaves.action)
        boards[leaves.tree, leaves.node] = nxt
        legal = DoubleNim.legal(nxt)
        legal[terminal] = False
        return mcts.Expansion(np.zeros((len(leaves), 4)), np.zeros(len(leaves)), reward, -1.0, legal, terminal)

    wrong = alternating.search(fn, 1500)
    assert (np.sign(wrong.root_value) != values).any()


def test_to_play_survives_advance_and_is_required_once_on():
    states = double_nim_positions()[:8]
    cfg = mcts.Config(algorithm="puct", dirichlet_fraction=0.0)
    forest, res = double_nim_search(states, 40, cfg)
    before = forest._to_play.copy()
    o2n = forest.advance(res.action)
    b, old = np.nonzero(o2n >= 0)
    np.testing.assert_array_equal(forest._to_play[b, o2n[b, old]], before[b, old])
    with pytest.raises(ValueError, match="to_play is required"):
        forest.set_roots(np.zeros((8, 4)), np.zeros(8), DoubleNim.legal(states))
    plain = mcts.Forest(2, 4, 5)
    plain.set_roots(np.zeros((2, 4)), np.zeros(2))
    leaves = plain.select()
    with pytest.raises(ValueError, match="not to set_roots"):
        plain.expand_backup(leaves, np.zeros((2, 4)), np.zeros(2), 0.0, 1.0, to_play=np.zeros(2, int))
