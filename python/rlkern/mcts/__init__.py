"""Batched Monte-Carlo tree search (``rlkern.mcts``).

A ``Forest`` of B trees is searched in lockstep by the C++ core while the caller's
network evaluates each step's leaves as one batch::

    forest = mcts.Forest(B, A, max_nodes=S + 1, config=mcts.Config(algorithm="gumbel"))
    forest.set_roots(prior_logits, value, legal_mask)
    result = forest.search(recurrent_fn, num_simulations=S)   # recurrent_fn(leaves) -> Expansion

or step by step with ``select`` / ``expand_backup``; ``advance`` re-roots for tree reuse.
"""

from .config import Config
from .forest import Expansion, Forest, Leaves, SearchResult, considered_visit_sequence

__all__ = ["Config", "Forest", "Leaves", "Expansion", "SearchResult", "considered_visit_sequence"]
