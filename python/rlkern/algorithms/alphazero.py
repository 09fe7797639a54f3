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

Self-play can keep the subtree below the played move as the next search's root
(``reuse_tree``) and overlap the network with the tree (``overlap``): the games are split
into two half-batches with a forest each, searched at the same time by the main thread
and one worker thread, each stepping its own half through select, game step, network and
backup. What runs at the same time on a CPU: the tree's C++ (select, expand_backup)
releases the GIL, and so do torch's kernels (the matrix products, which are most of a
step's time with the examples' networks), so one half's network overlaps the other
half's tree and network on a second core; the Python glue of both halves (numpy game
steps, the network's module calls, the forest's argument checks) takes turns on the GIL.
With the network on a GPU, a thread waiting for its results releases the GIL as well.
Overlap pays only with a free core: on a 2-core machine busy with other jobs, self-play
with overlap was a quarter slower than the plain loop (``rlkern bench --only selfplay``).
"""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Deque, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .. import mcts


class _NoPool:
    """Stands in for the worker pool when self-play does not overlap."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


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


# With reuse_tree, each tree holds this many times num_simulations nodes (plus the root),
# so a reused subtree and a full search fit together; a subtree too large for another full
# search is dropped and its root searched afresh (see _prepare_roots).
_REUSE_CAPACITY = 4
# The forest of the second half-batch gets its own noise: trees are keyed by their index in
# their forest, and two halves with the same key would search their games identically.
_GROUP_SEED_STRIDE = 0x9E3779B97F4A7C15


class _Group:
    """One forest over a contiguous slice of the games, with the boards of its nodes."""

    __slots__ = ("rows", "forest", "boards")

    def __init__(self, rows: slice, forest: mcts.Forest, boards: np.ndarray):
        self.rows, self.forest, self.boards = rows, forest, boards


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

    ``reuse_tree=True`` keeps the subtree below each played move (``Forest.advance``) and
    searches ``num_simulations`` more from it, so the root starts with the statistics the
    last search gathered there; a game whose move was never expanded, that ended, or whose
    subtree leaves no room for a full search starts from a fresh root.
    ``overlap=True`` (``num_envs >= 2``) searches two half-batches at the same time, one
    on a worker thread (see the module notes; each network call then sees half as many
    rows, and each thread runs torch with the caller's thread count). Per half, the operations run
    in the same order as in the plain loop; the second half's forest draws its own root
    noise (its seed is offset), so with noise-free search (PUCT without Dirichlet noise and
    with ``temperature_moves=0``, or Gumbel with ``gumbel_scale=0``) and a network whose
    rows do not depend on the batch they are evaluated in, self-play is the same with and
    without ``overlap``.
    """

    def __init__(self, game, net: Optional[nn.Module] = None, *, num_envs: int = 128, num_simulations: int = 32,
                 search_config: Optional[mcts.Config] = None, learning_rate: float = 3e-3,
                 weight_decay: float = 1e-4, batch_size: int = 256, replay_size: int = 100000,
                 temperature_moves: int = 4, random_moves: int = 0, reuse_tree: bool = False,
                 overlap: bool = False, seed: int = 0, device: str = "cpu"):
        if num_envs < 1 or num_simulations < 1:
            raise ValueError("num_envs and num_simulations must be >= 1")
        for name, flag in (("reuse_tree", reuse_tree), ("overlap", overlap)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if overlap and num_envs < 2:
            raise ValueError(f"overlap splits the games into two half-batches: num_envs must be >= 2, got {num_envs}")
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
        self.reuse_tree = reuse_tree
        self.overlap = overlap
        self.states = game.initial(num_envs)
        nodes = (_REUSE_CAPACITY if reuse_tree else 1) * num_simulations + 1
        bounds = [0, num_envs // 2, num_envs] if overlap else [0, num_envs]
        self._groups = []
        for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            cfg = replace(self.config, seed=self.config.seed + g * _GROUP_SEED_STRIDE) if g else self.config
            self._groups.append(_Group(slice(lo, hi), mcts.Forest(hi - lo, self.num_actions, nodes, cfg),
                                       np.zeros((hi - lo, nodes) + self.states.shape[1:], self.states.dtype)))
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
        if self.net.training:  # eval() walks every module: not on each of thousands of calls
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
        if self.net.training:  # once here, not in both threads' first evaluate()
            self.net.eval()
        if self.overlap:
            # torch's thread count is per thread (an OpenMP setting): a new thread would run
            # the network on every core, spinning against the tree threads, 25x slower on
            # a 2-core machine than with the caller's setting, which it gets here.
            pool = ThreadPoolExecutor(1, thread_name_prefix="rlkern-alphazero", initializer=torch.set_num_threads,
                                      initargs=(torch.get_num_threads(),))
        else:
            pool = _NoPool()
        with pool:
            for _ in range(num_moves):
                finished += self._play_move(pool)
        return finished

    def _play_move(self, pool) -> int:
        self._prepare_roots()
        try:
            if self.overlap:
                # The second half's whole search (game steps, network, tree) on the worker,
                # the first half's here: each thread releases the GIL in the network's
                # kernels and in the tree's C++, where the other runs.
                other = pool.submit(self._search_group, self._groups[1])
                try:
                    self._search_group(self._groups[0])
                finally:
                    other.exception()  # wait for the worker before touching its forest
                other.result()
            else:
                for group in self._groups:
                    self._search_group(group)
        except BaseException:
            for group in self._groups:
                group.forest.discard_pending()
            raise
        results = [g.forest.result() for g in self._groups]
        actions = np.concatenate([r.action for r in results])
        weights = np.concatenate([r.action_weights for r in results])
        if self.config.algorithm == "puct":
            sample = np.concatenate([g.forest.result(temperature=1.0).action for g in self._groups])
            greedy = np.concatenate([g.forest.result(0.0).action for g in self._groups])
            actions = np.where(self.plies < self.temperature_moves, sample, greedy)
        explore = self._random_left > 0
        if explore.any():
            legal = self.game.legal(self.states[explore])
            pick = self.rng.random(legal.shape) * legal
            actions = np.array(actions)
            actions[explore] = np.argmax(pick, axis=1)
            self._random_left[explore] -= 1
        rows = self._store(self.states, weights)  # [k, num_envs]
        for env in range(self.num_envs):
            self._episodes[env].indices.append(rows[:, env])
            self.replay_owner[rows[:, env]] = self._episodes[env].serial
        self.states, reward, terminal = self.game.step(self.states, actions)
        self.plies += 1
        if self.reuse_tree:
            for group in self._groups:
                old_to_new = group.forest.advance(actions[group.rows])
                tree, old = np.nonzero(old_to_new >= 0)
                group.boards[tree, old_to_new[tree, old]] = group.boards[tree, old]
        finished = 0
        for env in np.flatnonzero(terminal):
            self._finish(env, float(reward[env]))
            finished += 1
        if terminal.any():
            self.states[terminal] = self.game.initial(int(terminal.sum()))
            self.plies[terminal] = 0
            self._random_left[terminal] = self.rng.integers(0, self.random_moves + 1, size=int(terminal.sum()))
        return finished

    def _prepare_roots(self) -> None:
        """Gives every tree without a usable root a fresh one at its game's state (one
        network call for all of them) and plans this move's search."""
        S = self.num_simulations
        if self.reuse_tree:
            # A finished game's tree was emptied by advance (its move led to a terminal
            # node), as was one whose move had never been expanded.
            need = np.concatenate([~g.forest.has_root() | (g.forest.num_nodes() > g.forest.max_nodes - S)
                                   for g in self._groups])
        else:
            need = np.ones(self.num_envs, bool)
        fresh = np.flatnonzero(need)
        logits = np.zeros((self.num_envs, self.num_actions), np.float32)
        value = np.zeros(self.num_envs, np.float32)
        if fresh.size:
            logits[fresh], value[fresh] = self.evaluate(self.states[fresh])
        legal = self.game.legal(self.states)
        for group in self._groups:
            rows = group.rows
            mine = need[rows]
            group.forest.plan(S)
            if mine.all():
                group.forest.set_roots(logits[rows], value[rows], legal[rows])
            elif mine.any():
                group.forest.set_roots(logits[rows], value[rows], legal[rows], rows=mine)
            group.boards[mine, 0] = self.states[rows][mine]

    def _expand(self, group: _Group, leaves: mcts.Leaves):
        """The game step and network evaluation of one batch of leaves: the arguments of
        ``expand_backup`` after ``leaves``."""
        game = self.game
        nxt, reward, terminal = game.step(group.boards[leaves.tree, leaves.parent], leaves.action)
        group.boards[leaves.tree, leaves.node] = nxt
        logits, value = self.evaluate(nxt)
        return logits, value, reward, -1.0, game.legal(nxt), terminal

    def _search_group(self, group: _Group) -> None:
        forest = group.forest
        for _ in range(self.num_simulations):
            leaves = forest.select()
            if len(leaves):
                forest.expand_backup(leaves, *self._expand(group, leaves))

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
