"""Benchmark suite ``selfplay``: AlphaZero self-play positions per second on Connect Four.

One timed call plays ``MOVES`` moves in each of B games with ``rlkern.algorithms.AlphaZero``
and the network of ``examples/connect4_alphazero.py`` (an MLP of 3 x 256 units, untrained:
its speed does not depend on its weights), Gumbel search of S simulations per move, and
the example's random opening moves, on the CPU (where the example runs; the device
argument is not used, as in the ``mcts`` suite). The throughput is positions (searched moves) per
second. Implementations are the self-play options: ``rlkern`` is the plain loop, the
others add tree reuse (``reuse_tree``), the two half-batches on two threads
(``overlap``), or both; their speed-up column is the plain loop's time / theirs.

Tree reuse runs the same S simulations per move; what it saves is the network call of
the roots it keeps (one call in 33 per move here), and it makes the search stronger.
Overlap needs a free second core: on a machine whose cores are busy with other work, its
two threads only take turns. Measured on a 2-core machine under a load of about 7 (other
jobs), the four variants interleaved over 5 rounds (median, best): plain 1,271 and 2,041
positions/s, reuse 1,278 and 1,957, overlap 984 and 1,553, both 815 and 1,614: reuse as
fast as the plain loop, overlap a quarter slower without a free core.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from .core import Case

SHAPES = [(128, 32)]  # (games B, simulations S): the example's settings
QUICK_SHAPES = [(16, 8)]
MOVES = 2
VARIANTS = {"rlkern": (False, False), "rlkern reuse": (True, False), "rlkern overlap": (False, True),
            "rlkern reuse+overlap": (True, True)}


def _selfplay_fn(B: int, S: int, reuse_tree: bool, overlap: bool):
    from ..algorithms import AlphaZero
    from ..algorithms.alphazero import PolicyValueNet
    from ..mcts import Config, games

    game = games.ConnectFour()
    torch.manual_seed(0)
    net = PolicyValueNet((2, 6, 7), game.num_actions, hidden=256, layers=3)
    agent = AlphaZero(game, net, num_envs=B, num_simulations=S, search_config=Config(algorithm="gumbel"),
                      random_moves=4, replay_size=4096, reuse_tree=reuse_tree, overlap=overlap)

    def run():
        # The example's setting: one torch thread per network call (a small MLP: more
        # threads cost more in hand-offs than they save), restored for the other suites.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return agent.self_play(MOVES)
        finally:
            torch.set_num_threads(threads)

    return run


def cases(device: torch.device, quick: bool) -> List[Case]:
    out = []
    for B, S in (QUICK_SHAPES if quick else SHAPES):
        def make(dev, B=B, S=S) -> Dict[str, object]:
            return {name: _selfplay_fn(B, S, reuse, overlap) for name, (reuse, overlap) in VARIANTS.items()}

        out.append(Case("selfplay", "alphazero_selfplay", f"connect4 B={B} S={S} gumbel", make, items=B * MOVES,
                        unit="positions/s", note="positions searched and played per second", warmup=1,
                        min_repeats=3))
    return out
