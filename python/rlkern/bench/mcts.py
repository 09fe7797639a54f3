"""Benchmark suite ``mcts``: one batched search of S simulations in B trees with A actions.

The network is trivial on purpose (prior logits and value looked up by node id from a
small table, reward 0, discount -1), so the timings measure the tree. A case times a
whole search (``set_roots`` plus S steps of select / network / expand_backup); milliseconds
per batched simulation step = median ms / S, and the throughput is B * S simulations per
second. Competitors: a plain-Python tree (objects per node, numpy per node, the way
Python MCTS code is usually written; kept here) and mctx's ``muzero_policy`` /
``gumbel_muzero_policy`` on the CPU when ``mctx`` is installed (pinned to jax's CPU device
even where a GPU is visible; timed after compilation; the trivial network runs inside the
jit).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
import torch

from .core import Case

SHAPES = [(256, 9, 50), (1024, 9, 50), (256, 362, 50), (64, 362, 200)]
QUICK_SHAPES = [(16, 9, 8), (4, 362, 8)]
TABLE = 64  # rows of the trivial network's lookup table (a power of two: row = id & (TABLE - 1))


def _table(A: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(TABLE, A)).astype(np.float32), rng.uniform(-1, 1, size=TABLE).astype(np.float32)


# -- the plain-Python competitor ----------------------------------------------------------

class _PyNode:
    __slots__ = ("visits", "value", "raw_value", "reward", "discount", "prior", "logits", "children",
                 "child_visits", "child_values", "child_rewards", "child_discounts", "node_id")

    def __init__(self, logits: np.ndarray, value: float, reward: float, discount: float, node_id: int):
        z = np.exp(logits - logits.max())
        self.prior = z / z.sum()
        self.logits = logits
        self.visits = 1
        self.value = value
        self.raw_value = value
        self.reward = reward
        self.discount = discount
        self.node_id = node_id
        A = len(logits)
        self.children: List[Optional[_PyNode]] = [None] * A
        self.child_visits = np.zeros(A)
        self.child_values = np.zeros(A)
        self.child_rewards = np.zeros(A)
        self.child_discounts = np.zeros(A)


class PythonForest:
    """A straightforward Python MCTS (mctx semantics, no masks) for B trees."""

    def __init__(self, algorithm: str, c1: float = 1.25, c2: float = 19652.0, max_considered: int = 16,
                 maxvisit_init: float = 50.0, value_scale: float = 0.1):
        self.algorithm = algorithm
        self.c1, self.c2 = c1, c2
        self.max_considered = max_considered
        self.maxvisit_init, self.value_scale = maxvisit_init, value_scale

    def _q(self, node):
        return node.child_rewards + node.child_discounts * node.child_values

    def _completed(self, node):
        q = self._q(node)
        n = node.child_visits
        visited = n > 0
        if visited.any():
            p = np.maximum(node.prior, np.finfo(np.float32).tiny)
            weighted = (p[visited] * q[visited]).sum() / p[visited].sum()
            v = (node.raw_value + n.sum() * weighted) / (n.sum() + 1)
        else:
            v = node.raw_value
        cq = np.where(visited, q, v)
        cq = (cq - cq.min()) / max(cq.max() - cq.min(), 1e-8)
        return (self.maxvisit_init + n.max()) * self.value_scale * cq

    def _select(self, node, depth, tree_index):
        if self.algorithm == "puct":
            q = self._q(node)
            n = node.child_visits
            lo = min(node.value, q[n > 0].min()) if (n > 0).any() else node.value
            hi = max(node.value, q[n > 0].max()) if (n > 0).any() else node.value
            qn = np.where(n > 0, (q - lo) / max(hi - lo, 1e-8), 0.0)
            pb_c = self.c1 + math.log((node.visits + self.c2 + 1) / self.c2)
            return int(np.argmax(qn + math.sqrt(node.visits) * pb_c * node.prior / (n + 1)))
        cq = self._completed(node)
        n = node.child_visits
        if depth == 0:
            sim = int(n.sum())
            table = self.table[min(self.max_considered, len(n))]
            target = table[sim] if sim < len(table) else n.max()
            score = np.where(n == target, self.gumbel[tree_index] + node.logits - node.logits.max() + cq, -np.inf)
            return int(np.argmax(score))
        z = node.logits + cq
        pi = np.exp(z - z.max())
        pi /= pi.sum()
        return int(np.argmax(pi - n / (1 + n.sum())))

    def search(self, root_logits, root_value, recurrent_fn, num_simulations):
        from ..mcts import considered_visit_sequence

        B = root_logits.shape[0]
        self.table = [considered_visit_sequence(m, num_simulations) for m in range(self.max_considered + 1)]
        self.gumbel = np.zeros(root_logits.shape)  # gumbel_scale 0: deterministic
        roots = [_PyNode(root_logits[b].astype(np.float64), float(root_value[b]), 0.0, 1.0, 0) for b in range(B)]
        for sim in range(num_simulations):
            paths, parents, actions = [], [], []
            for b, root in enumerate(roots):
                node, path, depth = root, [], 0
                while True:
                    a = self._select(node, depth, b)
                    path.append((node, a))
                    depth += 1
                    if node.children[a] is None:
                        break
                    node = node.children[a]
                paths.append(path)
                parents.append(node.node_id)
                actions.append(a)
            logits, values = recurrent_fn(np.full(B, sim + 1))
            for b, path in enumerate(paths):
                parent, a = path[-1]
                leaf = _PyNode(logits[b].astype(np.float64), float(values[b]), 0.0, -1.0, sim + 1)
                parent.children[a] = leaf
                parent.child_rewards[a], parent.child_discounts[a] = leaf.reward, leaf.discount
                v = leaf.value
                child = leaf
                for node, act in reversed(path):
                    v = child.reward + child.discount * v
                    node.value = (node.value * node.visits + v) / (node.visits + 1)
                    node.visits += 1
                    node.child_visits[act] += 1
                    node.child_values[act] = child.value
                    child = node
        return np.stack([r.child_visits for r in roots])


# -- cases ----------------------------------------------------------------------------------

def _rlkern_fn(algorithm: str, B: int, A: int, S: int):
    from .. import mcts

    logits_table, value_table = _table(A)
    forest = mcts.Forest(B, A, S + 1, mcts.Config(algorithm=algorithm))
    root_logits = np.ascontiguousarray(np.broadcast_to(logits_table[0], (B, A)))
    root_value = np.zeros(B, np.float32)

    def recurrent_fn(leaves):
        # id & (TABLE - 1) is id % TABLE for the non-negative ids, without a division (mctx's
        # network below takes its rows the same way); ndarray.take gives the rows of
        # logits_table[row] without fancy indexing's overhead.
        row = leaves.node & (TABLE - 1)
        return logits_table.take(row, axis=0), value_table.take(row), 0.0, -1.0

    def run():
        forest.set_roots(root_logits, root_value)
        return forest.search(recurrent_fn, S)

    return run


def _python_fn(algorithm: str, B: int, A: int, S: int):
    logits_table, value_table = _table(A)
    tree = PythonForest(algorithm)
    root_logits = np.broadcast_to(logits_table[0], (B, A))

    def recurrent_fn(node_ids):
        row = node_ids % TABLE
        return logits_table[row], value_table[row]

    return lambda: tree.search(root_logits, np.zeros(B), recurrent_fn, S)


def _mctx_fn(algorithm: str, B: int, A: int, S: int):
    try:
        import jax
        import jax.numpy as jnp
        import mctx
    except ImportError:
        return None
    # On the CPU, like rlkern: on a machine with a GPU, jax would otherwise put the arrays
    # and the jitted search there, and the comparison would not be CPU against CPU.
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        return _mctx_on_device(jax, jnp, mctx, cpu, algorithm, B, A, S)


def _mctx_on_device(jax, jnp, mctx, cpu, algorithm: str, B: int, A: int, S: int):
    logits_table, value_table = (jnp.asarray(x) for x in _table(A))

    def recurrent_fn(params, rng_key, action, embedding):
        # the embedding is a counter standing in for the node id
        child = embedding + action + 1
        row = child & (TABLE - 1)
        out = mctx.RecurrentFnOutput(reward=jnp.zeros(B), discount=jnp.full(B, -1.0),
                                     prior_logits=logits_table[row], value=value_table[row])
        return out, child

    root = mctx.RootFnOutput(prior_logits=jnp.broadcast_to(logits_table[0], (B, A)), value=jnp.zeros(B),
                             embedding=jnp.zeros(B, jnp.int32))
    policy = mctx.muzero_policy if algorithm == "puct" else mctx.gumbel_muzero_policy
    fn = jax.jit(lambda key: policy(params=(), rng_key=key, root=root, recurrent_fn=recurrent_fn,
                                    num_simulations=S).action_weights)
    # A key committed to the CPU keeps every later call there too, outside default_device.
    key = jax.device_put(jax.random.PRNGKey(0), cpu)
    fn(key).block_until_ready()  # compile outside the timing
    devices = fn(key).devices()
    if {d.platform for d in devices} != {"cpu"}:
        raise RuntimeError(f"mctx competitor ran on {devices}, expected the CPU")
    return lambda: fn(key).block_until_ready()


def cases(device: torch.device, quick: bool) -> List[Case]:
    out = []
    for algorithm in ("puct", "gumbel"):
        for B, A, S in (QUICK_SHAPES if quick else SHAPES):
            def make(dev, algorithm=algorithm, B=B, A=A, S=S) -> Dict[str, object]:
                impls = {"rlkern": _rlkern_fn(algorithm, B, A, S), "python": _python_fn(algorithm, B, A, S)}
                mctx_fn = _mctx_fn(algorithm, B, A, S)
                if mctx_fn is not None:
                    impls["mctx"] = mctx_fn
                return impls

            out.append(Case("mcts", f"{algorithm}_search", f"B={B} A={A} S={S}", make, items=B * S, unit="sims/s",
                            note="median ms / S = ms per batched simulation step"))
    return out
