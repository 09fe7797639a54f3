"""MCTS with the network on the GPU: rlkern's CPU forest against mctx on the GPU (JAX).

The shapes of ``rlkern bench``'s mcts suite that fit a batched self-play step, (B, A, S) =
(256, 9, 50), (1024, 9, 50) and (256, 362, 50), with the same trivial network as that
suite (prior logits and value looked up by node id from a 64-row table, reward 0,
discount -1), here held on the GPU:

- ``rlkern``: :class:`rlkern.mcts.Forest` on the CPU; each simulation step sends the
  leaves' node ids to the GPU, looks the rows up there with torch and copies them back,
  as a search whose network runs on the GPU does.
- ``mctx``: ``muzero_policy`` / ``gumbel_muzero_policy`` jitted on JAX's GPU backend with
  the lookup inside the jit (timed after compilation). Left out, with a row that says
  why, when mctx or a JAX GPU backend is missing.

JAX would take 75% of the GPU's memory when first used; this module turns that
preallocation off before importing JAX, so torch keeps the memory it needs.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List

import numpy as np
import torch

from .core import Case

SHAPES = [(256, 9, 50), (1024, 9, 50), (256, 362, 50)]
QUICK_SHAPES = [(16, 9, 8)]


def _table(A: int):
    from .mcts import _table as cpu_table

    return cpu_table(A)


def _rlkern_gpu_net(algorithm: str, B: int, A: int, S: int, device: torch.device) -> Callable[[], object]:
    from .. import mcts
    from .mcts import TABLE

    logits_np, value_np = _table(A)
    logits_t = torch.from_numpy(logits_np).to(device)
    value_t = torch.from_numpy(value_np).to(device)
    forest = mcts.Forest(B, A, S + 1, mcts.Config(algorithm=algorithm))
    root_logits = np.ascontiguousarray(np.broadcast_to(logits_np[0], (B, A)))
    root_value = np.zeros(B, np.float32)

    def recurrent_fn(leaves):
        rows = torch.from_numpy(leaves.node % TABLE).to(device, non_blocking=True)
        # One device-to-host copy of [L, A + 1] per step: the prior logits and the value.
        out = torch.cat([logits_t.index_select(0, rows), value_t.index_select(0, rows)[:, None]], 1).cpu().numpy()
        return out[:, :A], out[:, A], 0.0, -1.0

    def run():
        forest.set_roots(root_logits, root_value)
        return forest.search(recurrent_fn, S)

    return run


def _mctx_gpu(algorithm: str, B: int, A: int, S: int) -> Callable[[], object]:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax
        import jax.numpy as jnp
        import mctx
    except ImportError as e:
        raise RuntimeError(f"mctx on the GPU needs jax and mctx ({e}); bring mctx's wheel in wheels/ or .whl/") \
            from None
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError as e:
        raise RuntimeError(f"JAX has no GPU backend here: {e}") from None
    from .mcts import TABLE

    logits_np, value_np = _table(A)
    logits_table = jax.device_put(logits_np, gpu)
    value_table = jax.device_put(value_np, gpu)

    def recurrent_fn(params, rng_key, action, embedding):
        child = embedding + action + 1  # a counter standing in for the node id, as in the mcts suite
        row = child % TABLE
        out = mctx.RecurrentFnOutput(reward=jnp.zeros(B), discount=jnp.full(B, -1.0),
                                     prior_logits=logits_table[row], value=value_table[row])
        return out, child

    policy = mctx.muzero_policy if algorithm == "puct" else mctx.gumbel_muzero_policy

    def search(key):
        root = mctx.RootFnOutput(prior_logits=jnp.broadcast_to(logits_table[0], (B, A)), value=jnp.zeros(B),
                                 embedding=jnp.zeros(B, jnp.int32))
        return policy(params=(), rng_key=key, root=root, recurrent_fn=recurrent_fn,
                      num_simulations=S).action_weights

    # The key and the tables are committed to the GPU, so the jitted search runs there.
    fn = jax.jit(search)
    key = jax.device_put(jax.random.PRNGKey(0), gpu)
    fn(key).block_until_ready()  # compile outside the timing
    return lambda: fn(key).block_until_ready()


def _failing(message: str) -> Callable[[], None]:
    def run() -> None:
        raise RuntimeError(message)

    return run


def cases(device: torch.device, quick: bool) -> List[Case]:
    if device.type != "cuda":
        return []
    out = []
    for algorithm in ("puct", "gumbel"):
        for B, A, S in (QUICK_SHAPES if quick else SHAPES):
            def make(dev, algorithm=algorithm, B=B, A=A, S=S) -> Dict[str, Callable[[], object]]:
                impls: Dict[str, Callable[[], object]] = {"rlkern": _rlkern_gpu_net(algorithm, B, A, S, dev)}
                try:
                    impls["mctx (JAX, GPU)"] = _mctx_gpu(algorithm, B, A, S)
                except Exception as e:  # a missing competitor is a row with the reason, not a failed run
                    impls["mctx (JAX, GPU)"] = _failing(f"{type(e).__name__}: {e}")
                return impls

            out.append(Case("gpu", f"{algorithm}_search gpu-network", f"B={B} A={A} S={S}", make, items=B * S,
                            unit="sims/s", note="rlkern: CPU forest, network on the GPU; mctx: search and network "
                            "jitted on the GPU"))
    return out
