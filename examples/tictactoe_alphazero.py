"""Train AlphaZero (Gumbel MuZero search) on tic-tac-toe from scratch until it never
loses against minimax.

    python examples/tictactoe_alphazero.py [--minutes 5] [--threads 2]

Every 10 iterations the greedy player (32 simulations, no noise) is played against every
possible reply of the opponent (not only minimax's optimal ones), moving first and
second; training stops when no line is lost. On 2 CPU cores this takes well under a
minute; the run fails if it needs more than --minutes.
"""

from __future__ import annotations

import argparse
import time

import torch

import rlkern
from rlkern.algorithms import AlphaZero
from rlkern.mcts import Config, games


def train(minutes: float = 5.0, seed: int = 0, threads: int = 2, num_envs: int = 128, num_simulations: int = 16,
          eval_simulations: int = 32, max_iterations: int = 400, verbose: bool = True) -> dict:
    # The network is tiny: one torch thread beats several, whose hand-offs cost more than
    # its matrix products. The trees use the rlkern pool.
    torch.set_num_threads(1)
    rlkern.set_num_threads(threads)
    game = games.TicTacToe()
    agent = AlphaZero(game, num_envs=num_envs, num_simulations=num_simulations,
                      search_config=Config(algorithm="gumbel", seed=seed), random_moves=3, seed=seed)
    start = time.time()
    iteration = 0
    record = None
    while iteration < max_iterations and time.time() - start < minutes * 60:
        history = agent.train(10, moves_per_iteration=9, updates_per_iteration=20)
        iteration += 10
        record = games.tictactoe_losses_vs_minimax(lambda s: agent.act(s, eval_simulations), opponent="all")
        if verbose:
            m = history[-1]
            print(f"iter {iteration:4d}  games {m['games']:6d}  loss {m.get('loss', float('nan')):.3f}  "
                  f"value loss {m.get('value_loss', float('nan')):.3f}  vs every reply: {record}  "
                  f"({time.time() - start:.0f}s)", flush=True)
        if record["lost"] == 0:
            break
    optimal = games.tictactoe_losses_vs_minimax(lambda s: agent.act(s, eval_simulations), opponent="optimal")
    return {"agent": agent, "iterations": iteration, "seconds": time.time() - start, "vs_every_reply": record,
            "vs_minimax": optimal}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    out = train(args.minutes, args.seed, args.threads)
    print(f"done in {out['seconds']:.0f}s after {out['iterations']} iterations; "
          f"against minimax: {out['vs_minimax']}, against every reply: {out['vs_every_reply']}")
    if out["vs_minimax"]["lost"] or out["vs_every_reply"]["lost"]:
        raise SystemExit("the trained player still loses some lines")


if __name__ == "__main__":
    main()
