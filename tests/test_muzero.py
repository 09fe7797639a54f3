"""examples/muzero_cartpole.py: its unroll targets, and a shortened run that must learn."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("gymnasium", reason="the MuZero example plays gymnasium's CartPole")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _example():
    spec = importlib.util.spec_from_file_location("muzero_cartpole", ROOT / "examples" / "muzero_cartpole.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["muzero_cartpole"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("terminated", [True, False])
def test_unroll_targets(terminated):
    ex = _example()
    agent = ex.MuZero(num_envs=2, num_simulations=4, unroll=2, td_steps=2, gamma=0.5, replay_size=16)
    roots = [0.8, 0.4, 0.2, 0.1]
    ep = {"obs": [np.full(4, t, np.float32) for t in range(4)], "action": [0, 1, 1, 0],
          "reward": [0.0, 0.0, 0.0, -1.0 if terminated else 0.0],
          "policy": [np.array([0.25 * t, 1 - 0.25 * t], np.float32) for t in range(4)], "root_value": roots}
    agent._store(ep, terminated)
    assert agent._filled == 4
    last = -1.0 if terminated else 0.0
    # z_t = r_t + g r_(t+1) + g^2 v_(t+2); at the end: 0 after a terminal state, else the
    # last root value
    tail = 0.0 if terminated else roots[-1]
    z = [0.25 * roots[2], 0.25 * roots[3], 0.5 * last + 0.25 * tail, last + 0.5 * tail]
    want_value = [[z[0], z[1], z[2]], [z[1], z[2], z[3]], [z[2], z[3], 0.0], [z[3], 0.0, 0.0]]
    np.testing.assert_allclose(agent.r_value[:4], want_value, rtol=1e-6)
    inside = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]], np.float32)
    np.testing.assert_array_equal(agent.r_value_mask[:4], np.ones_like(inside) if terminated else inside)
    np.testing.assert_array_equal(agent.r_policy_mask[:4], inside)
    # unroll step k + 1 predicts the reward of action t + k
    np.testing.assert_array_equal(agent.r_reward[:4], [[0, 0], [0, 0], [0, last], [last, 0]])
    np.testing.assert_array_equal(agent.r_actions[:3], [[0, 1], [1, 1], [1, 0]])
    assert agent.r_actions[3, 0] == 0
    np.testing.assert_array_equal(agent.r_obs[:4, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(agent.r_policy[1, 1], ep["policy"][2])


def test_search_runs_through_the_learned_model():
    ex = _example()
    agent = ex.MuZero(num_envs=4, num_simulations=8)
    res = agent.search(agent.obs, agent.forest)
    assert res.visit_counts.sum(axis=1).tolist() == [8] * 4
    np.testing.assert_allclose(res.action_weights.sum(axis=1), 1.0, rtol=1e-5)
    assert np.isfinite(res.root_value).all()


def test_short_run_learns():
    """6,144 environment steps (about 40 s on a busy 2-core machine): the greedy return
    rises far above random play (about 22) and pushing one way (about 9); this seed reaches
    about 400."""
    ex = _example()
    out = ex.train(minutes=2.0, seed=0, threads=2, max_steps=6144, eval_every=3072, target=1000, verbose=False)
    assert out["env_steps"] == 6144, out  # not cut short by the time limit
    assert out["best"] >= 100, out["history"]
