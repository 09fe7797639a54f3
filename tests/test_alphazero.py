"""rlkern.algorithms.AlphaZero: targets, symmetries, and a shortened tic-tac-toe run of
examples/tictactoe_alphazero.py that must never lose against minimax."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import torch

from rlkern.algorithms import AlphaZero
from rlkern.mcts import Config, games

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("game", [games.TicTacToe(), games.ConnectFour()])
def test_symmetries_commute_with_step(game):
    rng = np.random.default_rng(0)
    states = game.initial(64)
    for _ in range(5):  # a few random plies
        legal = game.legal(states)
        states, _, _ = game.step(states, np.argmax(rng.random(legal.shape) * legal, axis=1))
    cells, actions = game.symmetries()
    legal = game.legal(states)
    a = np.argmax(rng.random(legal.shape) * legal, axis=1)
    nxt, r, t = game.step(states, a)
    for cp, ap in zip(cells, actions):
        sym = states[:, cp]
        np.testing.assert_array_equal(game.legal(sym), legal[:, ap])
        a_sym = np.argsort(ap)[a]  # the action of the symmetric position that is a
        nxt_sym, r_sym, t_sym = game.step(sym, a_sym)
        np.testing.assert_array_equal(nxt_sym, nxt[:, cp])
        np.testing.assert_array_equal(r_sym, r)
        np.testing.assert_array_equal(t_sym, t)


def test_outcome_targets_alternate_sign():
    game = games.TicTacToe()
    az = AlphaZero(game, num_envs=1, num_simulations=4, replay_size=100)
    # x: 0, o: 3, x: 1, o: 4, x: 2 wins
    states = game.initial(1)
    for a in [0, 3, 1, 4, 2]:
        rows = az._store(states, np.full((1, 9), 1 / 9, np.float32))
        az._episodes[0].indices.append(rows[:, 0])
        az.replay_owner[rows[:, 0]] = az._episodes[0].serial
        states, r, t = game.step(states, np.array([a]))
    assert t[0] and r[0] == 1.0
    az._finish(0, float(r[0]))
    k = len(game.symmetries()[0])
    z = az.replay_z[: 5 * k].reshape(5, k)
    np.testing.assert_array_equal(z, np.array([1, -1, 1, -1, 1])[:, None] * np.ones((1, k)))
    assert az.replay_done[: 5 * k].all() and not az.replay_done[5 * k:].any()
    assert list(az.outcomes) == [1.0]  # the first player won


def test_train_step_fits_fixed_targets():
    game = games.TicTacToe()
    az = AlphaZero(game, num_envs=8, num_simulations=4, batch_size=64, seed=1)
    az.self_play(12)
    assert az.games_played >= 8
    first = az.train_step()
    for _ in range(60):
        last = az.train_step()
    assert last["loss"] < first["loss"]
    # self-play only ever plays legal moves and stores normalised targets
    done = az.replay_done[: az._filled]
    pi = az.replay_pi[: az._filled][done]
    np.testing.assert_allclose(pi.sum(axis=1), 1.0, atol=1e-5)
    assert (pi[~az.replay_legal[: az._filled][done]] == 0).all()


def test_connect_four_loop_runs():
    az = AlphaZero(games.ConnectFour(), num_envs=16, num_simulations=8, search_config=Config(algorithm="puct"),
                   random_moves=2)
    history = az.train(2, moves_per_iteration=25, updates_per_iteration=2)
    assert az.games_played > 0 and np.isfinite(history[-1]["loss"])
    acts = az.act(games.ConnectFour().initial(3), 8)
    assert acts.shape == (3,) and ((0 <= acts) & (acts < 7)).all()


def test_tictactoe_alphazero_never_loses_short():
    torch.manual_seed(0)
    example = load_example("tictactoe_alphazero")
    out = example.train(minutes=1.0, seed=0, threads=2, max_iterations=60, verbose=False)
    assert out["vs_minimax"]["lost"] == 0
    assert out["vs_every_reply"]["lost"] == 0
    assert out["vs_every_reply"]["won"] > 100  # it punishes bad replies, not only draws


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_tictactoe_alphazero_example_full(seed):
    example = load_example("tictactoe_alphazero")
    out = example.train(minutes=5.0, seed=seed, threads=2, verbose=False)
    assert out["seconds"] < 300
    assert out["vs_minimax"]["lost"] == 0 and out["vs_every_reply"]["lost"] == 0
