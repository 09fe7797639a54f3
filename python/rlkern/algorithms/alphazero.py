"""AlphaZero on top of the batched MCTS Forest: self-play in many games at once, the
network evaluated once per search step for every game.

The game is a batched numpy environment with the interface of
``rlkern.mcts.games.BoardGame``: ``initial(n)``, ``legal(states) [n,A]``,
``step(states, actions) -> (next_states, reward_of_mover, terminal)``,
``observation(states) -> [n, ...] float32``; states are seen from the player to move and
the search uses ``discount = -1`` between plies.

Training targets: the search's ``action_weights`` (visit distribution for PUCT, the
Gumbel improved policy for Gumbel MuZero) and the final outcome z of the game from the
mover's point of view. Loss = cross-entropy(pi, masked softmax(logits)) + (v - z)^2,
minimised with AdamW.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .. import mcts


class PolicyValueNet(nn.Module):
    """A small MLP: observation planes -> (policy logits [A], value in [-1, 1])."""

    def __init__(self, obs_shape, num_actions: int, hidden: int = 128, layers: int = 2):
        super().__init__()
        size = int(np.prod(obs_shape))
        body: List[nn.Module] = [nn.Flatten()]
        for i in range(layers):
            body += [nn.Linear(size if i == 0 else hidden, hidden), nn.ReLU()]
        self.body = nn.Sequential(*body)
        self.policy = nn.Linear(hidden, num_actions)
        self.value = nn.Linear(hidden, 1)

    def forward(self, obs: torch.Tensor):
        h = self.body(obs)
        return self.policy(h), torch.tanh(self.value(h)).squeeze(-1)


@dataclass
class _Episode:
    serial: int = 0  # unique id of the game, stamped on its replay rows
    indices: List[np.ndarray] = field(default_factory=list)  # replay rows written at each ply


class AlphaZero:
    """Batched AlphaZero self-play and training.

    ``num_envs`` games are played in lockstep; each move runs ``num_simulations``
    simulations of a ``Forest`` with ``search_config`` (default: Gumbel MuZero, which
    learns with few simulations). With PUCT, the first ``temperature_moves`` plies of a
    game are sampled from the visit counts and later ones are played greedily. Each game
    opens with a uniform number in [0, ``random_moves``] of uniformly random plies (their
    positions are still searched and trained on), which keeps self-play from collapsing
    onto a few lines once the policy is sharp. Positions are stored with every symmetry
    the game declares (``game.symmetries()``).
    """

    def __init__(self, game, net: Optional[nn.Module] = None, *, num_envs: int = 128, num_simulations: int = 32,
                 search_config: Optional[mcts.Config] = None, learning_rate: float = 3e-3,
                 weight_decay: float = 1e-4, batch_size: int = 256, replay_size: int = 100000,
                 temperature_moves: int = 4, random_moves: int = 0, seed: int = 0, device: str = "cpu"):
        if num_envs < 1 or num_simulations < 1:
            raise ValueError("num_envs and num_simulations must be >= 1")
        self.game = game
        self.num_actions = game.num_actions
        self.device = torch.device(device)
        torch.manual_seed(seed)
        obs_shape = game.observation(game.initial(1)).shape[1:]
        self.net = (net if net is not None else PolicyValueNet(obs_shape, self.num_actions)).to(self.device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=learning_rate, weight_decay=weight_decay)
        self.num_envs = num_envs
        self.num_simulations = num_simulations
        self.config = search_config if search_config is not None else mcts.Config(algorithm="gumbel", seed=seed)
        self.batch_size = batch_size
        self.temperature_moves = temperature_moves
        self.rng = np.random.default_rng(seed)
        self._forest = mcts.Forest(num_envs, self.num_actions, num_simulations + 1, self.config)
        self.states = game.initial(num_envs)
        self.plies = np.zeros(num_envs, np.int64)
        self.random_moves = random_moves
        self._random_left = self.rng.integers(0, random_moves + 1, size=num_envs)
        self._episodes = [_Episode(serial=i) for i in range(num_envs)]
        self._next_serial = num_envs
        cells = self.states.shape[1]
        self.replay_obs = np.zeros((replay_size,) + obs_shape, np.float32)
        self.replay_pi = np.zeros((replay_size, self.num_actions), np.float32)
        self.replay_legal = np.zeros((replay_size, self.num_actions), bool)
        self.replay_z = np.zeros(replay_size, np.float32)
        self.replay_done = np.zeros(replay_size, bool)  # z is known
        self.replay_owner = np.full(replay_size, -1, np.int64)  # serial of the game that wrote the row
        self._write = 0
        self._filled = 0
        self._cells = cells
        sym = getattr(game, "symmetries", None)
        self._symmetries = sym() if sym is not None else (np.arange(cells)[None], np.arange(self.num_actions)[None])
        self.games_played = 0
        self.outcomes: Deque[float] = collections.deque(maxlen=1000)  # reward of the first player

    # -- network ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, states: np.ndarray):
        """(prior logits [n,A], value [n]) as float32 numpy arrays."""
        self.net.eval()
        obs = torch.from_numpy(self.game.observation(states)).to(self.device)
        logits, value = self.net(obs)
        return logits.float().cpu().numpy(), value.float().cpu().numpy()

    # -- search ----------------------------------------------------------------------
    def search(self, states: np.ndarray, num_simulations: Optional[int] = None,
               config: Optional[mcts.Config] = None, forest: Optional[mcts.Forest] = None) -> mcts.SearchResult:
        """One batched search from each state (non-terminal, at least one legal action)."""
        states = np.asarray(states)
        n = states.shape[0]
        S = self.num_simulations if num_simulations is None else num_simulations
        if forest is None:
            forest = mcts.Forest(n, self.num_actions, S + 1, config or self.config)
        boards = np.zeros((n, S + 1, states.shape[1]), states.dtype)
        boards[:, 0] = states
        logits, value = self.evaluate(states)
        forest.set_roots(logits, value, self.game.legal(states))
        game = self.game

        def recurrent_fn(leaves: mcts.Leaves) -> mcts.Expansion:
            nxt, reward, terminal = game.step(boards[leaves.tree, leaves.parent], leaves.action)
            boards[leaves.tree, leaves.node] = nxt
            lg, v = self.evaluate(nxt)
            return mcts.Expansion(lg, v, reward, -1.0, game.legal(nxt), terminal)

        return forest.search(recurrent_fn, S)

    def act(self, states: np.ndarray, num_simulations: Optional[int] = None) -> np.ndarray:
        """Greedy actions for evaluation: no root noise, the most visited (PUCT) or the
        sequential-halving winner without Gumbel noise."""
        cfg = mcts.Config(**{**self.config.__dict__, "dirichlet_fraction": 0.0, "gumbel_scale": 0.0,
                             "temperature": 0.0})
        return self.search(states, num_simulations, cfg).action

    # -- self-play ---------------------------------------------------------------------
    def self_play(self, num_moves: int) -> int:
        """Advances every game by ``num_moves`` plies (finished games restart) and stores
        the positions with their search targets; returns the number of games finished."""
        finished = 0
        for _ in range(num_moves):
            res = self.search(self.states, forest=self._forest)
            actions = res.action
            if self.config.algorithm == "puct":
                sample = self._forest.result(temperature=1.0).action
                actions = np.where(self.plies < self.temperature_moves, sample, self._forest.result(0.0).action)
            explore = self._random_left > 0
            if explore.any():
                legal = self.game.legal(self.states[explore])
                pick = self.rng.random(legal.shape) * legal
                actions = np.array(actions)
                actions[explore] = np.argmax(pick, axis=1)
                self._random_left[explore] -= 1
            rows = self._store(self.states, res.action_weights)  # [k, num_envs]
            for env in range(self.num_envs):
                self._episodes[env].indices.append(rows[:, env])
                self.replay_owner[rows[:, env]] = self._episodes[env].serial
            self.states, reward, terminal = self.game.step(self.states, actions)
            self.plies += 1
            for env in np.flatnonzero(terminal):
                self._finish(env, float(reward[env]))
                finished += 1
            if terminal.any():
                self.states[terminal] = self.game.initial(int(terminal.sum()))
                self.plies[terminal] = 0
                self._random_left[terminal] = self.rng.integers(0, self.random_moves + 1, size=int(terminal.sum()))
        return finished

    def _store(self, states: np.ndarray, pi: np.ndarray) -> np.ndarray:
        cell_perms, action_perms = self._symmetries
        n, k = states.shape[0], len(cell_perms)
        size = self.replay_obs.shape[0]
        rows = ((self._write + np.arange(n * k)) % size).reshape(k, n)
        for i in range(k):
            s = states[:, cell_perms[i]]
            self.replay_obs[rows[i]] = self.game.observation(s)
            self.replay_pi[rows[i]] = pi[:, action_perms[i]]
            self.replay_legal[rows[i]] = self.game.legal(s)
        self.replay_done[rows] = False
        self._write = int((self._write + n * k) % size)
        self._filled = min(size, self._filled + n * k)
        return rows

    def _finish(self, env: int, last_reward: float) -> None:
        idx = self._episodes[env].indices
        # z alternates sign going back: the last mover got last_reward
        z = last_reward * (-1.0) ** np.arange(len(idx))[::-1]
        serial = self._episodes[env].serial
        for rows, z_ply in zip(idx, z):
            rows = rows[self.replay_owner[rows] == serial]  # rows a newer game overwrote keep its data
            self.replay_z[rows] = z_ply
            self.replay_done[rows] = True
        self.outcomes.append(float(last_reward if len(idx) % 2 == 1 else -last_reward))
        self._episodes[env] = _Episode(serial=self._next_serial)
        self._next_serial += 1
        self.games_played += 1

    # -- training ----------------------------------------------------------------------
    def train_step(self) -> Optional[Dict[str, float]]:
        """One gradient step on a minibatch of finished positions (None until there is one)."""
        ready = np.flatnonzero(self.replay_done[: self._filled])
        if len(ready) == 0:
            return None
        rows = self.rng.choice(ready, size=min(self.batch_size, len(ready)), replace=len(ready) < self.batch_size)
        obs = torch.from_numpy(self.replay_obs[rows]).to(self.device)
        pi = torch.from_numpy(self.replay_pi[rows]).to(self.device)
        legal = torch.from_numpy(self.replay_legal[rows]).to(self.device)
        z = torch.from_numpy(self.replay_z[rows]).to(self.device)
        self.net.train()
        logits, value = self.net(obs)
        logp = torch.log_softmax(logits.masked_fill(~legal, -1e9), dim=-1)
        policy_loss = -(pi * logp.masked_fill(~legal, 0.0)).sum(-1).mean()
        value_loss = ((value - z) ** 2).mean()
        loss = policy_loss + value_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "policy_loss": policy_loss.item(), "value_loss": value_loss.item()}

    def train(self, iterations: int, moves_per_iteration: int = 9, updates_per_iteration: int = 20,
              callback: Optional[Callable[[int, Dict[str, float]], None]] = None) -> List[Dict[str, float]]:
        """Alternates self-play and gradient steps; returns one metrics dict per iteration."""
        history = []
        for it in range(iterations):
            games = self.self_play(moves_per_iteration)
            losses = [m for m in (self.train_step() for _ in range(updates_per_iteration)) if m is not None]
            metrics = {"iteration": it, "games": self.games_played, "new_games": games}
            if losses:
                for key in losses[0]:
                    metrics[key] = float(np.mean([m[key] for m in losses]))
            history.append(metrics)
            if callback is not None:
                callback(it, metrics)
        return history
