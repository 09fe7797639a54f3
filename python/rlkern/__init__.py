"""rlkern: fast reinforcement-learning kernels.

Returns and advantages, policy and preference losses, log-probabilities over large
vocabularies and batched MCTS; C++ on the CPU, Triton and CUDA on the GPU, with a
plain-PyTorch reference for every op (``rlkern.reference``).
"""

from __future__ import annotations

from ._backend import use_backend
from ._info import get_num_threads, info, set_num_threads

__version__ = "0.1.0"

__all__ = ["info", "get_num_threads", "set_num_threads", "use_backend", "__version__"]

# --- returns and advantages (rlkern.returns) ---
from .returns import discounted_returns, gae, group_advantages, lambda_returns, masked_gae  # noqa: E402

__all__ += ["discounted_returns", "gae", "lambda_returns", "masked_gae", "group_advantages"]

# --- policy, value and preference losses; KL estimators (rlkern.losses, rlkern.kl) ---
from .kl import kl_penalty  # noqa: E402
from .losses import LossOutput, bradley_terry_loss, dpo_loss, policy_loss, value_loss  # noqa: E402

__all__ += ["kl_penalty", "policy_loss", "value_loss", "dpo_loss", "bradley_terry_loss", "LossOutput"]

# --- log-probabilities (rlkern.logprobs) ---
from .logprobs import linear_token_logprobs, token_logprobs, vocab_parallel_token_logprobs  # noqa: E402

__all__ += ["token_logprobs", "linear_token_logprobs", "vocab_parallel_token_logprobs"]

# --- batched MCTS (rlkern.mcts) ---
from .whiten import masked_whiten  # noqa: E402

__all__ += ["masked_whiten"]

from . import mcts  # noqa: E402

__all__ += ["mcts"]
