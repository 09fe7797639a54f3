"""Thin algorithm classes over rlkern's kernels: a dataclass config with the reference
implementation's defaults and a few methods that compose returns, advantages and losses.
No training loops: they plug into whatever loop, trainer or framework you already run
(AlphaZero, built on the batched MCTS, is the exception)."""

# --- algorithms from the kernels (returns, losses, KL) ---
from .dqn import DQN, DQNConfig, TDLoss
from .grpo import (CISPO, CISPOConfig, DAPO, DAPOConfig, DrGRPO, DrGRPOConfig, GRPO, GRPOConfig, GSPO,
                   GSPOConfig)
from .ppo import PPO, RLHFPPO, AdaptiveKLController, FixedKLController, PPOConfig, PPOLoss, RLHFPPOConfig
from .preference import DPO, DPOConfig, PreferenceOutput, RewardModel, RewardModelConfig, sequence_logprobs
from .reinforce import REINFORCE, REINFORCEConfig
from .shaping import kimi_length_penalty, overlong_penalty, process_rewards, steps_to_tokens

__all__ = [
    "PPO", "PPOConfig", "PPOLoss", "RLHFPPO", "RLHFPPOConfig", "AdaptiveKLController", "FixedKLController",
    "GRPO", "GRPOConfig", "DAPO", "DAPOConfig", "DrGRPO", "DrGRPOConfig", "GSPO", "GSPOConfig",
    "CISPO", "CISPOConfig",
    "DPO", "DPOConfig", "RewardModel", "RewardModelConfig", "PreferenceOutput", "sequence_logprobs",
    "REINFORCE", "REINFORCEConfig", "DQN", "DQNConfig", "TDLoss",
    "process_rewards", "steps_to_tokens", "overlong_penalty", "kimi_length_penalty",
]
# --- end of the algorithms from the kernels ---

# --- search ---
from .alphazero import AlphaZero  # noqa: E402

__all__ += ["AlphaZero"]
