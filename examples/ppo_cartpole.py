"""PPO on gymnasium's CartPole-v1 with rlkern.algorithms.PPO (GAE, clipped policy and value losses).

    pip install ".[examples]"        # once, from the repository root (gymnasium)
    python examples/ppo_cartpole.py  # trains until the average return reaches 475

Runs on two CPU cores in a few minutes. The loop is CleanRL-style: 4 environments, 128-step
rollouts, 4 epochs of 4 minibatches, Adam 2.5e-4 annealed; rlkern computes the advantages
(`PPO.advantages`, truncation handled by bootstrapping from the value of the cut-off state) and the
loss (`PPO.loss`). Success: the mean return of the last 20 training episodes >= 475, then a greedy
evaluation over 10 episodes is reported.
"""

from __future__ import annotations

import argparse
import time
from collections import deque

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

from rlkern.algorithms import PPO, PPOConfig


class ActorCritic(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 64):
        super().__init__()

        def mlp(out: int, gain: float) -> nn.Sequential:
            layers = [nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, out)]
            for layer in layers:
                if isinstance(layer, nn.Linear):
                    nn.init.orthogonal_(layer.weight, np.sqrt(2))
                    nn.init.zeros_(layer.bias)
            nn.init.orthogonal_(layers[-1].weight, gain)
            return nn.Sequential(*layers)

        self.actor = mlp(n_actions, 0.01)
        self.critic = mlp(1, 1.0)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def policy(self, obs: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self.actor(obs))


def evaluate(model: ActorCritic, episodes: int = 10, seed: int = 10_000) -> float:
    env = gym.make("CartPole-v1")
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = model.policy(torch.as_tensor(obs, dtype=torch.float32)).probs.argmax().item()
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


def train(total_steps: int = 500_000, target: float = 475.0, seed: int = 1, num_envs: int = 4,
          rollout: int = 128, epochs: int = 4, minibatches: int = 4, lr: float = 2.5e-4,
          log_every: int = 20, verbose: bool = True) -> dict:
    torch.manual_seed(seed)
    np.random.seed(seed)
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1") for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    model = ActorCritic(envs.single_observation_space.shape[0], envs.single_action_space.n)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-5)
    ppo = PPO(PPOConfig(gamma=0.99, lam=0.95, clip=0.2, value_clip=0.2, vf_coef=0.5, entropy_coef=0.01))

    obs_np, _ = envs.reset(seed=seed)
    obs = torch.as_tensor(obs_np, dtype=torch.float32)
    shape = (num_envs, rollout)
    recent = deque(maxlen=20)
    episode_return = np.zeros(num_envs)
    updates = total_steps // (num_envs * rollout)
    steps, start, reached = 0, time.time(), None
    history = []
    for update in range(updates):
        optimizer.param_groups[0]["lr"] = lr * (1 - update / updates)
        b_obs = torch.zeros(*shape, obs.shape[-1])
        b_actions = torch.zeros(shape, dtype=torch.long)
        b_logp, b_values, b_rewards, b_next_values = (torch.zeros(shape) for _ in range(4))
        b_term, b_trunc = torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)
        for t in range(rollout):
            with torch.no_grad():
                dist = model.policy(obs)
                action = dist.sample()
                b_logp[:, t] = dist.log_prob(action)
                b_values[:, t] = model.value(obs)
            b_obs[:, t], b_actions[:, t] = obs, action
            next_np, reward, terminated, truncated, info = envs.step(action.numpy())
            steps += num_envs
            episode_return += reward
            b_rewards[:, t] = torch.as_tensor(reward, dtype=torch.float32)
            b_term[:, t] = torch.as_tensor(terminated)
            b_trunc[:, t] = torch.as_tensor(truncated)
            next_obs = torch.as_tensor(next_np, dtype=torch.float32)
            # V of the state each step led to: for a finished episode that is the final observation
            # (the returned one already belongs to the next episode)
            successor = next_obs.clone()
            done = terminated | truncated
            if done.any():
                final = info["final_obs"]
                for i in np.nonzero(done)[0]:
                    successor[i] = torch.as_tensor(final[i], dtype=torch.float32)
                    recent.append(episode_return[i])
                    episode_return[i] = 0.0
            with torch.no_grad():
                b_next_values[:, t] = model.value(successor)
            obs = next_obs

        advantages, returns = ppo.advantages(b_rewards, b_values, b_term, truncated=b_trunc,
                                             next_values=b_next_values)
        n = num_envs * rollout
        flat = dict(obs=b_obs.reshape(n, -1), actions=b_actions.reshape(n), logp=b_logp.reshape(n),
                    values=b_values.reshape(n), adv=advantages.reshape(n), ret=returns.reshape(n))
        for _ in range(epochs):
            for idx in torch.randperm(n).chunk(minibatches):
                dist = model.policy(flat["obs"][idx])
                out = ppo.loss(dist.log_prob(flat["actions"][idx]), flat["logp"][idx], flat["adv"][idx],
                               flat["ret"][idx], model.value(flat["obs"][idx]), flat["values"][idx],
                               entropy=dist.entropy())
                optimizer.zero_grad()
                out.loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                optimizer.step()
        mean_return = float(np.mean(recent)) if recent else 0.0
        history.append((steps, mean_return))
        if verbose and (update % log_every == 0 or (len(recent) == 20 and mean_return >= target)):
            print(f"update {update:4d}  steps {steps:7d}  mean return (last 20) {mean_return:6.1f}  "
                  f"{time.time() - start:6.1f}s", flush=True)
        if len(recent) == 20 and mean_return >= target:
            reached = steps
            break
    envs.close()
    result = {"steps": steps, "mean_return": float(np.mean(recent)) if recent else 0.0, "reached_at": reached,
              "eval_return": evaluate(model), "seconds": time.time() - start, "history": history}
    if verbose:
        print(f"mean return of the last 20 episodes {result['mean_return']:.1f} after {steps} steps "
              f"({'target reached' if reached else 'target NOT reached'}); greedy evaluation "
              f"{result['eval_return']:.1f}; {result['seconds']:.0f}s")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-steps", type=int, default=500_000)
    parser.add_argument("--target", type=float, default=475.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    return train(total_steps=args.total_steps, target=args.target, seed=args.seed)


if __name__ == "__main__":
    main()
