"""Kernel microbenchmarks behind ``rlkern bench``.

Each suite module (``returns``, ``losses``, ``logprobs``, ``mcts``, ``e2e``) defines
``cases(device, quick) -> list[Case]``. A case builds its inputs lazily and returns the
callables to time: ``rlkern`` first, then its competitors.
"""

from .core import Case, Result, measure

__all__ = ["Case", "Result", "measure"]
