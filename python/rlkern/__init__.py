"""rlkern: fast reinforcement-learning kernels.

Returns and advantages, policy and preference losses, log-probabilities over large
vocabularies and batched MCTS; C++ on the CPU, Triton and CUDA on the GPU, with a
plain-PyTorch reference for every op (``rlkern.reference``).
"""

from __future__ import annotations

from ._backend import use_backend
from ._info import get_num_threads, info, set_num_threads

# Batched MCTS
from . import mcts

__version__ = "0.1.0"

__all__ = ["info", "get_num_threads", "set_num_threads", "use_backend", "__version__"]
__all__ += ["mcts"]
