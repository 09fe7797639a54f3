"""A Forest of B search trees stepped in lockstep by the C++ core.

The tree never sees embeddings. Node ids are assigned in expansion order (root 0, then
1, 2, ... in each tree), so the caller keeps its embeddings in a tensor
``[B, max_nodes, ...]``: ``select()`` says which ``(tree, parent)`` embedding to expand
with which ``action`` and which slot ``node`` the result goes to.

Semantics follow mctx (``muzero_policy`` and ``gumbel_muzero_policy``) and reproduce its
golden search trees. Where this Forest differs, on purpose:

* Legal-action masks apply at every node, not only the root: a node holds one edge per
  legal action. Completed Q-values of illegal actions still enter the Gumbel rescaling,
  as mctx's root does.
* Dirichlet noise is drawn over the legal actions only.
* Ties in an argmax go to the lowest action (mctx adds 1e-7 uniform noise in PUCT).
* ``terminal`` leaves are never expanded. Their value is 0; a later simulation reaching
  one backs up its edge reward again (``reward + discount * 0``).
* ``max_depth``: a simulation that reaches an existing node at that depth revisits it
  (its visit count grows and its network value is averaged in again) instead of calling
  the network, which mctx does.
* Pool full (``max_nodes`` nodes, or no room for ``num_actions`` more edges): the
  simulation stops at the node whose child it wanted to create and backs up that node's
  network value. Such a node then has more visits than 1 + its children's.
* Two-player zero-sum games use ``discount = -1`` on every edge (mctx's convention):
  every node's value is from the point of view of the player to move there. For games
  whose turns do not alternate (a pass, a double move), give each node its player to
  move instead (``to_play`` in ``set_roots`` and ``expand_backup``, or the ``to_play``
  field of an ``Expansion``): the forest then flips the sign of an edge's discount where
  the mover changes and keeps it where the same player moves again. Values stay from the
  view of the node's mover and an edge's reward from the view of the player who moved.
* A Forest is not thread-safe: call it from one Python thread at a time (it runs its
  trees on the rlkern pool itself).

NaN policy: a NaN or +inf prior logit on a legal action, a non-finite value, reward or
discount, a leaf whose ``reward + discount * value`` would overflow float32 anywhere on
its way up to the root, or a non-terminal node without any legal action raises
``ValueError`` before the forest changes (``Config`` rejects non-finite options). Legal
logits that are all -inf give a uniform prior. Finite values up to the float32 limit
give finite statistics (means and rescalings that would overflow are evaluated in a
safe form), and selection always returns an edge of the node it is at: should every
score of a node compare false (NaN), its lowest legal action is taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import torch

from .. import _validate
from .._kernel import core
from .config import INT32_MAX, Config

ArrayLike = Union[np.ndarray, torch.Tensor]


class Leaves:
    """Leaves chosen by one ``select()``: row i asks to expand ``action[i]`` below node
    ``parent[i]`` of tree ``tree[i]``; the new node gets id ``node[i]``. int64 arrays of
    length L (one per tree whose simulation needs the network); ``len(leaves)`` is L and
    ``tree, parent, action, node = leaves`` unpacks the four arrays."""

    __slots__ = ("tree", "parent", "action", "node")

    def __init__(self, tree: np.ndarray, parent: np.ndarray, action: np.ndarray, node: np.ndarray):
        self.tree, self.parent, self.action, self.node = tree, parent, action, node

    def __len__(self) -> int:
        return int(self.tree.shape[0])

    def __iter__(self):
        return iter((self.tree, self.parent, self.action, self.node))

    def __repr__(self) -> str:
        return f"Leaves(L={len(self)}, tree={self.tree}, parent={self.parent}, action={self.action}, node={self.node})"


class Expansion(NamedTuple):
    """What a ``recurrent_fn`` returns for L leaves: ``prior_logits [L,A]``, ``value [L]``,
    ``reward [L]`` and ``discount [L]`` (scalars broadcast), optional ``legal_mask [L,A]``
    and ``terminal [L]``, and ``to_play [L]`` (the player to move at each new node) for a
    forest whose roots were given a ``to_play``."""

    prior_logits: ArrayLike
    value: ArrayLike
    reward: ArrayLike
    discount: ArrayLike
    legal_mask: Optional[ArrayLike] = None
    terminal: Optional[ArrayLike] = None
    to_play: Optional[ArrayLike] = None


@dataclass
class SearchResult:
    """Root statistics after a search (numpy arrays).

    ``action [B]`` the action to play (-1 for a tree without root); ``action_weights [B,A]``
    the training target (visit distribution for PUCT, softmax(logits + sigma(completedQ))
    for Gumbel); ``visit_counts [B,A]`` root child visits; ``q_values [B,A]`` reward +
    discount * value of each visited root child (0 otherwise); ``root_value [B]``."""

    action: np.ndarray
    action_weights: np.ndarray
    visit_counts: np.ndarray
    q_values: np.ndarray
    root_value: np.ndarray


def _numpy(name: str, x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        # A FakeTensor, DTensor or meta tensor has no data for the core to read.
        _validate.plain(name, x)
        if x.device.type == "meta":
            raise TypeError(f"{name} is a meta tensor, which holds no data: pass a CPU tensor or a numpy array")
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}") from None


def _floats(name: str, x, length: Optional[int] = None) -> np.ndarray:
    """float32 C-contiguous view (a copy only when the input is not one already).
    A scalar is broadcast to ``[length]``."""
    if type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous and x.ndim:
        return x  # the common case, kept cheap: this runs for every input of every step
    if isinstance(x, (int, float)) and length is not None:
        return np.full(length, x, dtype=np.float32)
    a = _numpy(name, x)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.ndim == 0 and length is not None:
        return np.full(length, float(a), dtype=np.float32)
    if a.dtype == np.float32 and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, dtype=np.float32)


def _row_floats(name: str, x, length: int):
    """Like ``_floats`` for one value per leaf, but a Python scalar stays a float: the core
    broadcasts it, which is cheaper than building the array here."""
    if type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous and x.ndim:
        return x
    if isinstance(x, (int, float)):
        return float(x)
    return _floats(name, x, length)


def _mask(name: str, x) -> Optional[np.ndarray]:
    """uint8 0/1 view of a bool, integer or floating mask."""
    if x is None:
        return None
    a = _numpy(name, x)
    if a.dtype == np.bool_:
        return np.ascontiguousarray(a).view(np.uint8)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be bool, integer or floating, got dtype {a.dtype}")
    return np.ascontiguousarray(a != 0).view(np.uint8)


def _core_class():
    """The C++ forest for this CPU: the AVX2 build where the CPU runs it (the same results
    bit for bit, in about a fifth fewer instructions per Gumbel simulation at 9 actions),
    the baseline x86-64 build otherwise or when ``RLKERN_DISABLE_AVX2`` is set."""
    m = core().mcts
    return m.ForestAVX2 if hasattr(m, "ForestAVX2") and m.cpu_has_avx2() else m.Forest


def _int(name: str, value, low: int, high: int = 2**62) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < low or v > high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {v}")
    return v


class Forest:
    """B independent search trees in preallocated struct-of-arrays pools.

    ``Forest(batch_size, num_actions, max_nodes, config)``; ``max_nodes`` bounds each tree
    (``num_simulations + 1`` suffices for one search from a fresh root) and ``max_edges``
    its edges (default ``max_nodes * num_actions``). Inputs are numpy arrays or CPU tensors
    (float32 and C-contiguous ones cross without a copy); outputs are numpy arrays. The
    trees run on the ``rlkern`` thread pool with the GIL released.
    """

    def __init__(self, batch_size: int, num_actions: int, max_nodes: int, config: Optional[Config] = None, *,
                 max_edges: Optional[int] = None):
        self.batch_size = _int("batch_size", batch_size, 1)
        self.num_actions = _int("num_actions", num_actions, 1, 2**30)
        self.max_nodes = _int("max_nodes", max_nodes, 1, 2**30)
        edges = 0 if max_edges is None else _int("max_edges", max_edges, self.num_actions)
        if config is None:
            config = Config()
        if not isinstance(config, Config):
            raise TypeError(f"config must be a rlkern.mcts.Config, got {type(config).__name__}")
        self.config = config
        c = config
        self._core = _core_class()(
            self.batch_size, self.num_actions, self.max_nodes, edges, 0 if c.algorithm == "puct" else 1,
            c.c1, c.c2, c.dirichlet_alpha, c.dirichlet_fraction, c.max_considered_actions, c.gumbel_scale,
            c.maxvisit_init, c.value_scale, c.rescale_values, c.use_mixed_value, c.temperature,
            0 if c.max_depth is None else c.max_depth, c.seed & 0xFFFFFFFFFFFFFFFF, c.num_threads)
        self._pending: Optional[Leaves] = None
        self._to_play: Optional[np.ndarray] = None  # [B, max_nodes] player to move, in to_play mode

    def _players(self, name: str, x, length: int) -> np.ndarray:
        a = _numpy(name, x)
        if a.dtype.kind not in "iub":
            raise TypeError(f"{name} must hold integers (player ids), got dtype {a.dtype}")
        if a.shape != (length,):
            raise ValueError(f"{name} must have shape ({length},), got {a.shape}")
        return a.astype(np.int64)

    def _signed_discount(self, leaves: Leaves, discount, to_play):
        """In to_play mode, the discount with its sign flipped where the mover changes."""
        if self._to_play is None:
            if to_play is not None:
                raise ValueError("to_play given to expand_backup but not to set_roots: pass the roots' to_play too")
            return discount
        L = len(leaves)
        if to_play is None:
            raise ValueError("to_play is required: this forest's roots were given a player to move")
        players = self._players("to_play", to_play, L)
        same = players == self._to_play[leaves.tree, leaves.parent]
        d = np.broadcast_to(_floats("discount", discount, L), (L,))
        if d.shape != (L,):
            raise ValueError(f"discount must have shape ({L},), got {d.shape}")
        self._new_players = players
        return np.where(same, d, -d).astype(np.float32)

    def _record_players(self, leaves: Leaves) -> None:
        if self._to_play is not None:
            self._to_play[leaves.tree, leaves.node] = self._new_players

    # -- roots ---------------------------------------------------------------------------
    def plan(self, num_simulations: int) -> None:
        """Sets the simulation budget the Gumbel root schedule is built for (``search`` and
        ``set_roots(num_simulations=...)`` call this)."""
        self._core.plan(_int("num_simulations", num_simulations, 0, INT32_MAX))

    def set_roots(self, prior_logits: ArrayLike, value: ArrayLike, legal_mask: Optional[ArrayLike] = None, *,
                  rows: Optional[ArrayLike] = None, num_simulations: Optional[int] = None,
                  to_play: Optional[ArrayLike] = None) -> None:
        """Starts a fresh tree per row: ``prior_logits [B,A]``, ``value [B]``, ``legal_mask
        [B,A]`` (default: all legal; every root needs at least one legal action).
        ``rows [B]`` (bool) resets only those trees and leaves the others as they are.
        ``to_play [B]`` (integer player ids) turns on to_play mode for this forest: every
        later expansion then says who moves at its node (see the module notes)."""
        B, A = self.batch_size, self.num_actions
        logits = _floats("prior_logits", prior_logits)
        values = _floats("value", value)
        legal = _mask("legal_mask", legal_mask)
        sel = _mask("rows", rows)
        players = None if to_play is None else self._players("to_play", to_play, B)
        if players is None and self._to_play is not None:
            raise ValueError("to_play is required: this forest's roots were given a player to move before")
        if num_simulations is not None:
            self.plan(num_simulations)
        self._core.set_roots(logits, values, legal, sel)  # validates every row before any change
        self._pending = None
        if players is not None:
            if self._to_play is None:
                self._to_play = np.zeros((B, self.max_nodes), np.int64)
            keep = np.ones(B, bool) if sel is None else sel.astype(bool)
            self._to_play[keep, 0] = players[keep]

    # -- one simulation step -------------------------------------------------------------
    def select(self) -> Leaves:
        """Runs one simulation in every tree down to a leaf. Simulations that end at an
        existing node (terminal, ``max_depth``, full pool) are backed up here; the others
        are returned and wait for ``expand_backup``."""
        if self._pending is not None:
            raise RuntimeError("select() called again before expand_backup() for the pending leaves")
        buf = np.empty((4, self.batch_size), dtype=np.int64)
        L = self._core.select_into(buf)
        leaves = Leaves(buf[0, :L], buf[1, :L], buf[2, :L], buf[3, :L])
        self._pending = leaves if L else None
        return leaves

    def expand_backup(self, leaves: Leaves, prior_logits: ArrayLike, value: ArrayLike, reward: ArrayLike,
                      discount: ArrayLike, legal_mask: Optional[ArrayLike] = None,
                      terminal: Optional[ArrayLike] = None, to_play: Optional[ArrayLike] = None) -> None:
        """Creates the nodes of ``leaves`` (row i of every input belongs to leaf i) and backs
        their values up to the roots: ``leaf_value = reward + discount * leaf_value``."""
        if leaves is not self._pending:
            if len(leaves) == 0 and self._pending is None:
                return
            raise ValueError("leaves must be the object returned by the last select()")
        L = len(leaves)
        discount = self._signed_discount(leaves, discount, to_play)
        self._core.expand_backup(_floats("prior_logits", prior_logits), _row_floats("value", value, L),
                                 _row_floats("reward", reward, L), _row_floats("discount", discount, L),
                                 _mask("legal_mask", legal_mask), _mask("terminal", terminal))
        self._record_players(leaves)
        self._pending = None

    # -- whole searches ------------------------------------------------------------------
    def search(self, recurrent_fn: Callable[[Leaves], Union[Expansion, tuple]], num_simulations: int) -> SearchResult:
        """Runs ``num_simulations`` steps of select, ``recurrent_fn(leaves)``, expand_backup.

        ``recurrent_fn`` returns ``(prior_logits, value, reward, discount)`` or an
        ``Expansion``; it is not called for a step without leaves."""
        n = _int("num_simulations", num_simulations, 0, INT32_MAX)
        if self._pending is not None:
            raise RuntimeError("search() called while the leaves of your last select() wait for expand_backup(): "
                               "finish that step, or call discard_pending() to drop it")
        core, B = self._core, self.batch_size
        core.plan(n)
        try:
            self._search_steps(recurrent_fn, n)
        except BaseException:
            # The step that failed never reached its backup: forget its leaves so the forest
            # stays usable (the simulations completed before it are kept).
            self.discard_pending()
            raise
        return self.result()

    def _search_steps(self, recurrent_fn, n: int) -> None:
        core, B = self._core, self.batch_size
        select, expand, expand_select = core.select_into, core.expand_backup, core.expand_select
        to_play_mode = self._to_play is not None
        # Step i is select, recurrent_fn, expand_backup; the expansion of step i and the
        # selection of step i + 1 go to the core as one call (one pass over the trees).
        # A fresh leaf buffer per step: recurrent_fn may keep the leaf arrays it was given.
        buf = np.empty((4, B), dtype=np.int64)
        L = select(buf) if n else 0
        left = n - 1  # selections still to run
        while True:
            if L == 0:
                if left <= 0:
                    return
                left -= 1
                L = select(buf)
                continue
            leaves = self._pending = Leaves(buf[0, :L], buf[1, :L], buf[2, :L], buf[3, :L])
            out = recurrent_fn(leaves)
            if type(out) is Expansion:
                logits, value, reward, discount, legal, terminal, to_play = out
            elif isinstance(out, tuple) and len(out) in (4, 5, 6, 7):
                logits, value, reward, discount = out[:4]
                legal = out[4] if len(out) > 4 else None
                terminal = out[5] if len(out) > 5 else None
                to_play = out[6] if len(out) > 6 else None
            else:
                raise TypeError("recurrent_fn must return an Expansion or (prior_logits, value, reward, discount)")
            if to_play is not None or to_play_mode:
                discount = self._signed_discount(leaves, discount, to_play)
            args = (_floats("prior_logits", logits), _row_floats("value", value, L),
                    _row_floats("reward", reward, L), _row_floats("discount", discount, L),
                    None if legal is None else _mask("legal_mask", legal),
                    None if terminal is None else _mask("terminal", terminal))
            if left <= 0:
                expand(*args)
                L = 0
            else:
                buf = np.empty((4, B), dtype=np.int64)
                left -= 1
                L = expand_select(*args, buf)
            if to_play_mode:
                self._record_players(leaves)
            self._pending = None

    def discard_pending(self) -> None:
        """Drops the leaves of the last ``select()`` without expanding them, as if that
        step had not run (``select`` changes no statistics for a leaf it returns). After an
        ``expand_backup`` that raised, this or a corrected ``expand_backup`` continues."""
        self._core.discard_pending()
        self._pending = None

    def result(self, temperature: Optional[float] = None) -> SearchResult:
        """Root statistics and the action to play (``temperature`` overrides the config's)."""
        t = self.config.temperature if temperature is None else float(temperature)
        if not t >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        return SearchResult(*self._core.result(t))

    # -- tree reuse and inspection -------------------------------------------------------
    def advance(self, actions: ArrayLike) -> np.ndarray:
        """Keeps the subtree below ``actions [B]`` as each tree's new root and returns
        ``old_to_new [B, max_nodes]`` (-1 for dropped nodes), for re-indexing embeddings.
        Node ids stay in expansion order. A negative action leaves that tree unchanged; a
        tree whose chosen child was never expanded (or is terminal) is emptied and needs
        ``set_roots(..., rows=...)``. Root noise is drawn again for the new roots."""
        a = _numpy("actions", actions)
        if a.dtype.kind not in "iu":
            raise TypeError(f"actions must be integers, got dtype {a.dtype}")
        if a.shape != (self.batch_size,):
            raise ValueError(f"actions must have shape ({self.batch_size},), got {a.shape}")
        # Check the range before the int64 cast: a uint64 2**64-1 would wrap to -1, which
        # means "leave this tree alone".
        if a.size and a.dtype.kind == "u" and int(a.max()) >= self.num_actions:
            bad = int(np.argmax(a >= self.num_actions))
            raise ValueError(f"actions: row {bad} has action {int(a[bad])} outside [0, num_actions={self.num_actions}) "
                             "(negative values leave a tree unchanged)")
        old_to_new = self._core.advance(np.ascontiguousarray(a, dtype=np.int64))
        self._pending = None
        if self._to_play is not None:
            moved = np.zeros_like(self._to_play)
            b, old = np.nonzero(old_to_new >= 0)
            moved[b, old_to_new[b, old]] = self._to_play[b, old]
            self._to_play = moved
        return old_to_new

    def export(self) -> dict:
        """The trees in mctx's ``Tree`` layout: ``node_visits``, ``node_values``,
        ``raw_values``, ``parents``, ``action_from_parent``, ``terminal`` ``[B,N]`` and
        ``children_index`` (-1 where unexpanded), ``children_visits``, ``children_values``,
        ``children_rewards``, ``children_discounts``, ``children_prior_logits`` ``[B,N,A]``
        (log prior; the lowest float for illegal actions)."""
        return self._core.export()

    def num_nodes(self) -> np.ndarray:
        return self._core.num_nodes()

    def has_root(self) -> np.ndarray:
        return self._core.has_root().astype(bool)


def considered_visit_sequence(max_num_considered_actions: int, num_simulations: int) -> tuple:
    """mctx's sequential-halving schedule: the visit count an action must have to be
    considered at each simulation of the Gumbel root."""
    return tuple(core().mcts.considered_visit_sequence(
        _int("max_num_considered_actions", max_num_considered_actions, 0, INT32_MAX),
        _int("num_simulations", num_simulations, 0, INT32_MAX)))
