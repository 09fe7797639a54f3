"""AlphaZero self-play with tree reuse (Forest.advance) and overlap (two half-batches on
two threads): the same games as the plain loop where the order of operations is the same,
and a reused subtree equal to a fresh search fed the same network evaluations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rlkern import mcts
from rlkern.algorithms import AlphaZero
from rlkern.algorithms.alphazero import PolicyValueNet
from rlkern.mcts import Config, games

EXPORT_KEYS = ("node_visits", "node_values", "raw_values", "parents", "action_from_parent", "terminal",
               "children_index", "children_visits", "children_values", "children_rewards", "children_discounts",
               "children_prior_logits")


class RowwiseNet(nn.Module):
    """The example's network computed in float64 and rounded to float32: a row's output
    then does not depend on the other rows of its batch (a float32 matrix product may block
    a batch of 4 differently from one of 8), which is what comparing half-batches with
    full batches needs."""

    def __init__(self, game, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        obs_shape = game.observation(game.initial(1)).shape[1:]
        self.inner = PolicyValueNet(obs_shape, game.num_actions, hidden=32).double()

    def forward(self, obs):
        logits, value = self.inner(obs.double())
        return logits.float(), value.float()


def _agent(game, *, algorithm, reuse_tree, overlap, noise=False, num_envs=8, seed=0):
    if algorithm == "puct":
        cfg = Config(algorithm="puct", dirichlet_fraction=0.25 if noise else 0.0, seed=seed)
    else:
        cfg = Config(algorithm="gumbel", gumbel_scale=1.0 if noise else 0.0, seed=seed)
    return AlphaZero(game, RowwiseNet(game), num_envs=num_envs, num_simulations=8, search_config=cfg,
                     temperature_moves=0, random_moves=2, reuse_tree=reuse_tree, overlap=overlap, seed=seed)


def _played(agent):
    n = agent._filled
    return {"obs": agent.replay_obs[:n].copy(), "pi": agent.replay_pi[:n].copy(), "z": agent.replay_z[:n].copy(),
            "done": agent.replay_done[:n].copy(), "states": agent.states.copy(), "games": agent.games_played,
            "outcomes": list(agent.outcomes)}


def _assert_same_play(a, b):
    assert a["games"] == b["games"] and a["outcomes"] == b["outcomes"]
    for key in ("obs", "pi", "z", "done", "states"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("algorithm", ["puct", "gumbel"])
@pytest.mark.parametrize("reuse_tree", [False, True])
def test_overlap_plays_the_plain_loops_games_without_noise(algorithm, reuse_tree):
    game = games.TicTacToe()
    out = []
    for overlap in (False, True):
        agent = _agent(game, algorithm=algorithm, reuse_tree=reuse_tree, overlap=overlap)
        agent.self_play(14)
        out.append(_played(agent))
    assert out[0]["games"] >= 8
    _assert_same_play(*out)


def test_overlap_with_noise_is_deterministic_and_halves_draw_their_own_noise():
    game = games.TicTacToe()
    runs = []
    for _ in range(2):
        agent = _agent(game, algorithm="gumbel", reuse_tree=True, overlap=True, noise=True, num_envs=8)
        agent.random_moves = 0
        agent._random_left[:] = 0
        agent.self_play(3)
        runs.append(_played(agent))
    _assert_same_play(*runs)
    # Every game starts from the empty board: had both halves the same noise, game i and
    # game i + 4 would be the same game.
    states = runs[0]["states"]
    assert any(not np.array_equal(states[i], states[i + 4]) for i in range(4))


@pytest.mark.parametrize("algorithm", ["puct", "gumbel"])
def test_reuse_keeps_each_root_at_its_games_state(algorithm):
    game = games.ConnectFour()
    agent = _agent(game, algorithm=algorithm, reuse_tree=True, overlap=True, noise=True, num_envs=6)
    reused = 0
    for _ in range(10):
        agent.self_play(1)
        for group in agent._groups:
            kept = group.forest.has_root()
            reused += int((group.forest.num_nodes()[kept] > 1).sum())
            np.testing.assert_array_equal(group.boards[kept, 0], agent.states[group.rows][kept])
    assert reused > 20  # most moves start from a subtree that already has children


def _searcher(agent, game, forest, max_nodes):
    """set_roots(states) and a recurrent_fn that steps the game on boards kept by node id."""
    boards = np.zeros((forest.batch_size, max_nodes, game.num_cells), np.int8)

    def set_roots(states):
        boards[:, 0] = states
        logits, value = agent.evaluate(states)
        forest.set_roots(logits, value, game.legal(states))

    def recurrent_fn(leaves):
        nxt, reward, terminal = game.step(boards[leaves.tree, leaves.parent], leaves.action)
        boards[leaves.tree, leaves.node] = nxt
        logits, value = agent.evaluate(nxt)
        return mcts.Expansion(logits, value, reward, -1.0, game.legal(nxt), terminal)

    return set_roots, recurrent_fn, boards


@pytest.mark.parametrize("extra", [0, 16])
def test_reused_subtree_equals_a_fresh_search_fed_the_same_evaluations(extra):
    """PUCT without root noise selects inside a subtree from the subtree's statistics alone,
    so the subtree below the played move is the tree that a fresh search from the move's
    position builds with (its visits - 1) simulations, and ``extra`` more simulations on
    either give the same tree again."""
    game = games.ConnectFour()
    agent = AlphaZero(game, RowwiseNet(game, seed=3), num_envs=4, num_simulations=8)
    cfg = Config(algorithm="puct", dirichlet_fraction=0.0)
    rng = np.random.default_rng(0)
    B, S, N = 4, 48, 160
    states = game.initial(B)
    for _ in range(3):
        legal = game.legal(states)
        states, _, _ = game.step(states, np.argmax(rng.random(legal.shape) * legal, axis=1))

    reused = mcts.Forest(B, 7, N, cfg)
    set_roots, recurrent_fn, boards = _searcher(agent, game, reused, N)
    set_roots(states)
    first = reused.search(recurrent_fn, S)
    played = np.argmax(first.visit_counts, axis=1)
    visits = first.visit_counts[np.arange(B), played]
    assert (visits > 4).all()
    old_to_new = reused.advance(played)
    tree, old = np.nonzero(old_to_new >= 0)
    boards[tree, old_to_new[tree, old]] = boards[tree, old]
    after, _, _ = game.step(states, played)
    np.testing.assert_array_equal(boards[:, 0], after)
    if extra:
        reused.search(recurrent_fn, extra)
    got = reused.export()
    for b in range(B):
        # A forest of one tree per position: each fresh search runs exactly as many
        # simulations as the reused root has seen.
        fresh = mcts.Forest(1, 7, N, cfg)
        fresh_roots, fresh_fn, _ = _searcher(agent, game, fresh, N)
        fresh_roots(after[b:b + 1])
        fresh.search(fresh_fn, int(visits[b]) - 1 + extra)
        want = fresh.export()
        n = int(reused.num_nodes()[b])
        assert n == int(fresh.num_nodes()[0]) > 1
        assert int(got["node_visits"][b, 0]) == int(visits[b]) + extra
        for key in EXPORT_KEYS:
            np.testing.assert_array_equal(np.asarray(got[key])[b, :n], np.asarray(want[key])[0, :n], err_msg=key)


def test_self_play_options_are_checked():
    game = games.TicTacToe()
    with pytest.raises(TypeError, match="reuse_tree"):
        AlphaZero(game, num_envs=4, reuse_tree="yes")
    with pytest.raises(TypeError, match="overlap"):
        AlphaZero(game, num_envs=4, overlap=1)
    with pytest.raises(ValueError, match="num_envs"):
        AlphaZero(game, num_envs=1, overlap=True)


def test_a_failing_network_in_the_worker_leaves_the_agent_usable():
    game = games.TicTacToe()
    agent = _agent(game, algorithm="gumbel", reuse_tree=True, overlap=True)
    agent.self_play(2)
    good = agent.evaluate
    calls = {"n": 0}

    def flaky(states):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("network failed")
        return good(states)

    agent.evaluate = flaky
    with pytest.raises(RuntimeError, match="network failed"):
        agent.self_play(1)
    agent.evaluate = good
    agent.self_play(3)  # the forests dropped the failed step's leaves and search on
