"""Small batched two-player board games in numpy, for tests, examples and AlphaZero.

A state is the board from the point of view of the player to move: +1 for their stones,
-1 for the opponent's, 0 for empty cells. ``step`` plays one move for each row and returns
the next state (again from the next mover's view, so the board is negated), the reward of
the player who moved (+1 for a win, else 0) and whether the game ended. Search trees use
``discount = -1`` between plies (mctx's convention for alternating zero-sum games).
"""

from __future__ import annotations

import functools
import itertools
from typing import Dict, Tuple

import numpy as np


class BoardGame:
    """Common code of the board games: subclasses define the board size, the lines that
    win, and where a move puts its stone."""

    name = "game"
    rows = 0
    cols = 0
    num_actions = 0
    lines: np.ndarray  # [num_lines, k] cell indices

    @property
    def num_cells(self) -> int:
        return self.rows * self.cols

    def initial(self, n: int) -> np.ndarray:
        return np.zeros((n, self.num_cells), dtype=np.int8)

    def legal(self, states: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def cell_of(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(self, states: np.ndarray, actions: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        states = np.asarray(states)
        actions = np.asarray(actions, dtype=np.int64)
        n = states.shape[0]
        if not self.legal(states)[np.arange(n), actions].all():
            raise ValueError(f"{self.name}: illegal action in step()")
        board = states.copy()
        board[np.arange(n), self.cell_of(states, actions)] = 1
        k = self.lines.shape[1]
        win = (board[:, self.lines].sum(axis=2) == k).any(axis=1)
        full = (board != 0).all(axis=1)
        terminal = win | full
        return (-board).astype(np.int8), win.astype(np.float32), terminal

    def observation(self, states: np.ndarray) -> np.ndarray:
        """[n, 2, rows, cols] float32 planes: the mover's stones, the opponent's."""
        s = np.asarray(states).reshape(-1, self.rows, self.cols)
        return np.stack([(s == 1), (s == -1)], axis=1).astype(np.float32)

    def symmetries(self):
        """(cell_perms [k, cells], action_perms [k, A]): board symmetries as permutations,
        the identity first; ``state[:, cell_perms[i]]`` and ``pi[:, action_perms[i]]`` are
        a symmetric position and its policy."""
        return np.arange(self.num_cells)[None], np.arange(self.num_actions)[None]

    def render(self, state: np.ndarray) -> str:
        sym = {1: "x", -1: "o", 0: "."}
        b = np.asarray(state).reshape(self.rows, self.cols)
        return "\n".join("".join(sym[int(v)] for v in row) for row in b)


class TicTacToe(BoardGame):
    name = "tictactoe"
    rows = cols = 3
    num_actions = 9
    lines = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 3, 6], [1, 4, 7], [2, 5, 8], [0, 4, 8], [2, 4, 6]])

    def legal(self, states: np.ndarray) -> np.ndarray:
        return np.asarray(states) == 0

    def cell_of(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        return actions

    def symmetries(self):
        grid = np.arange(9).reshape(3, 3)
        perms = []
        for k in range(4):
            r = np.rot90(grid, k)
            perms += [r.reshape(-1), r[:, ::-1].reshape(-1)]
        perms = np.stack(perms)
        return perms, perms


def _connect_four_lines(rows: int, cols: int) -> np.ndarray:
    out = []
    for r, c in itertools.product(range(rows), range(cols)):
        for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
            cells = [(r + i * dr, c + i * dc) for i in range(4)]
            if all(0 <= rr < rows and 0 <= cc < cols for rr, cc in cells):
                out.append([rr * cols + cc for rr, cc in cells])
    return np.array(out)


class ConnectFour(BoardGame):
    """6 x 7 Connect Four; cell index = row * 7 + column, row 0 at the top."""

    name = "connect4"
    rows, cols = 6, 7
    num_actions = 7
    lines = _connect_four_lines(6, 7)

    def legal(self, states: np.ndarray) -> np.ndarray:
        return np.asarray(states)[:, : self.cols] == 0

    def symmetries(self):
        grid = np.arange(self.num_cells).reshape(self.rows, self.cols)
        cells = np.stack([grid.reshape(-1), grid[:, ::-1].reshape(-1)])
        actions = np.stack([np.arange(self.cols), np.arange(self.cols)[::-1]])
        return cells, actions

    def cell_of(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        s = np.asarray(states).reshape(-1, self.rows, self.cols)
        column = s[np.arange(s.shape[0]), :, actions]  # [n, rows]
        lowest_empty = self.rows - 1 - np.argmax(column[:, ::-1] == 0, axis=1)
        return lowest_empty * self.cols + actions


# -- exact tic-tac-toe ------------------------------------------------------------------
_TTT = TicTacToe()


@functools.lru_cache(maxsize=None)
def _ttt_value(board: bytes) -> int:
    s = np.frombuffer(board, dtype=np.int8)[None]
    best = -2
    for a in np.flatnonzero(s[0] == 0):
        nxt, r, t = _TTT.step(s, np.array([a]))
        v = int(r[0]) if t[0] else -_ttt_value(nxt[0].tobytes())
        best = max(best, v)
    return best


def tictactoe_value(state: np.ndarray) -> int:
    """Minimax value (+1 win, 0 draw, -1 loss) for the player to move in a non-terminal state."""
    return _ttt_value(np.asarray(state, dtype=np.int8).tobytes())


def tictactoe_action_values(state: np.ndarray) -> np.ndarray:
    """Minimax value of each action for the player to move (nan for illegal actions)."""
    s = np.asarray(state, dtype=np.int8)[None]
    out = np.full(9, np.nan)
    for a in np.flatnonzero(s[0] == 0):
        nxt, r, t = _TTT.step(s, np.array([a]))
        out[a] = float(r[0]) if t[0] else -tictactoe_value(nxt[0])
    return out


def tictactoe_states() -> Dict[bytes, np.ndarray]:
    """Every position reachable from the empty board (terminal ones included), keyed by
    the board from the mover's view."""
    seen: Dict[bytes, np.ndarray] = {}
    frontier = [_TTT.initial(1)[0]]
    seen[frontier[0].tobytes()] = frontier[0]
    while frontier:
        nxt_frontier = []
        for s in frontier:
            if s.any() and _is_terminal_ttt(s):
                continue
            for a in np.flatnonzero(s == 0):
                nxt, _, _ = _TTT.step(s[None], np.array([a]))
                key = nxt[0].tobytes()
                if key not in seen:
                    seen[key] = nxt[0]
                    nxt_frontier.append(nxt[0])
        frontier = nxt_frontier
    return seen


def _is_terminal_ttt(s: np.ndarray) -> bool:
    # the previous mover's stones are -1 in the mover's view
    lines = s[TicTacToe.lines]
    return bool((lines.sum(axis=1) == -3).any() or (s != 0).all())


def tictactoe_losses_vs_minimax(act, opponent: str = "optimal") -> Dict[str, int]:
    """Plays a deterministic agent against every reply of a minimax opponent.

    ``act(states [n, 9]) -> actions [n]`` is the agent. The opponent tries every optimal
    move (``opponent="optimal"``) or every legal move (``"all"``) at each of its turns,
    so the agent faces the whole tree of such opponents, moving first and second.
    Returns the number of distinct final positions the agent lost, won and drew.
    """
    out = {"lost": 0, "won": 0, "drawn": 0}
    for agent_first in (True, False):
        start = _TTT.initial(1)
        agent_positions = {start[0].tobytes(): start[0]} if agent_first else {}
        opponent_positions = {} if agent_first else {start[0].tobytes(): start[0]}
        finals = {"lost": set(), "won": set(), "drawn": set()}
        while agent_positions or opponent_positions:
            nxt_opp: Dict[bytes, np.ndarray] = {}
            if agent_positions:
                states = np.stack(list(agent_positions.values()))
                actions = np.asarray(act(states))
                after, r, t = _TTT.step(states, actions)
                for i in range(len(states)):
                    key = after[i].tobytes()
                    if t[i]:
                        finals["won" if r[i] > 0 else "drawn"].add(key)
                    else:
                        nxt_opp[key] = after[i]
            opponent_positions.update(nxt_opp)
            nxt_agent: Dict[bytes, np.ndarray] = {}
            for s in opponent_positions.values():
                values = tictactoe_action_values(s)
                legal = np.flatnonzero(~np.isnan(values))
                moves = legal if opponent == "all" else legal[values[legal] == np.nanmax(values)]
                for a in moves:
                    after, r, t = _TTT.step(s[None], np.array([a]))
                    key = after[0].tobytes()
                    if t[0]:
                        finals["lost" if r[0] > 0 else "drawn"].add(key)
                    else:
                        nxt_agent[key] = after[0]
            agent_positions, opponent_positions = nxt_agent, {}
        for k in out:
            out[k] += len(finals[k])
    return out
