"""Reinforcement learning with a Matryoshka state encoder: DQN on CartPole-v1.

The Q-network is ``encoder (obs -> z in R^d)`` followed by a
:class:`~matryoshka.heads.MatryoshkaHead` whose size-``m`` head reads ``z[:, :m]``, so every
prefix is its own Q-function. Each size is trained with its own TD target from the target
network's head of the same size, ``y_m = r + γ (1 - terminated) max_a Q^-_m(s', a)``, and the
Huber losses are summed with the nesting's weights. Acting during training uses the full size;
the report gives the greedy episode return when acting with each prefix size, beside an ordinary
DQN whose embedding is truncated (its head's first ``m`` columns).

``gymnasium`` is optional: ``pip install 'matryoshka[rl]'``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from matryoshka.apps.common import check_positive, config_to_dict, finish, help_field, make_nesting
from matryoshka.heads import MatryoshkaHead
from matryoshka.nesting import Nesting
from matryoshka.train import seed_everything

__all__ = [
    "Batch",
    "MatryoshkaQNetwork",
    "RLConfig",
    "ReplayBuffer",
    "dqn_loss",
    "evaluate_policy",
    "make_env",
    "run_rl",
    "td_targets",
    "train_dqn",
]


def make_env(name: str = "CartPole-v1") -> Any:
    """A gymnasium environment; a clear error names the extra when gymnasium is missing."""
    try:
        import gymnasium
    except ImportError as e:
        raise ImportError(
            "matryoshka.apps.rl needs gymnasium: install it with `pip install 'matryoshka[rl]'`."
        ) from e
    return gymnasium.make(name)


class MatryoshkaQNetwork(nn.Module):
    """``(B, obs_dim) -> (L, B, n_actions)``: Q-values from every prefix of the state embedding.

    A ``Nesting([d])`` gives an ordinary DQN network whose embedding can still be truncated
    (:meth:`q_truncated`).
    """

    def __init__(self, obs_dim: int, n_actions: int, nesting: Nesting, hidden: int = 128) -> None:
        super().__init__()
        self.nesting = nesting
        self.embed_dim = nesting.dim
        self.encoder = nn.Sequential(
            nn.Linear(obs_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, nesting.dim),
        )
        self.head = MatryoshkaHead(nesting.dim, n_actions, nesting)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """``(B, obs_dim) -> (L, B, A)``."""
        return self.head(self.encoder(obs))

    def q_size(self, obs: torch.Tensor, m: int) -> torch.Tensor:
        """Q-values of the size-``m`` head: ``(B, obs_dim) -> (B, A)``."""
        return self.head.forward_size(self.encoder(obs), m)

    def q_truncated(self, obs: torch.Tensor, m: int) -> torch.Tensor:
        """The largest head applied to ``z[:, :m]`` (the tail zeroed): ``(B, A)``. For an
        ordinary network this is what truncating its embedding does to its Q-values."""
        z = self.encoder(obs)
        w, b = self.head.weight_for(self.nesting.dim), self.head.bias_for(self.nesting.dim)
        return F.linear(z[:, :m], w[:, :m], b)


class Batch(NamedTuple):
    """Transitions: ``obs (B, o)``, ``action (B,)`` int64, ``reward (B,)``, ``next_obs (B, o)``,
    ``terminated (B,)`` float (1 where the episode ended in a terminal state)."""

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor


class ReplayBuffer:
    """A ring buffer of transitions with uniform sampling."""

    def __init__(self, capacity: int, obs_dim: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1.")
        self.capacity = capacity
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.action = np.zeros(capacity, np.int64)
        self.reward = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.float32)
        self.size = 0
        self._pos = 0

    def add(
        self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, terminated: bool
    ) -> None:
        """Store one transition (overwriting the oldest when full)."""
        i = self._pos
        self.obs[i], self.action[i], self.reward[i] = obs, action, reward
        self.next_obs[i], self.terminated[i] = next_obs, float(terminated)
        self._pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """``batch_size`` transitions drawn uniformly with replacement."""
        if self.size == 0:
            raise ValueError("the replay buffer is empty: add transitions before sampling.")
        idx = rng.integers(0, self.size, batch_size)
        return Batch(
            torch.from_numpy(self.obs[idx]),
            torch.from_numpy(self.action[idx]),
            torch.from_numpy(self.reward[idx]),
            torch.from_numpy(self.next_obs[idx]),
            torch.from_numpy(self.terminated[idx]),
        )


@torch.no_grad()
def td_targets(target_net: MatryoshkaQNetwork, batch: Batch, gamma: float) -> torch.Tensor:
    """``y_l = r + γ (1 - terminated) max_a Q^-_l(s', a)`` for every size: ``(L, B)``."""
    next_q = target_net(batch.next_obs).max(-1).values  # (L, B)
    return batch.reward + gamma * (1.0 - batch.terminated) * next_q


def dqn_loss(
    online: MatryoshkaQNetwork, target_net: MatryoshkaQNetwork, batch: Batch, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_l c_l * Huber(Q_l(s, a), y_l)``: ``(scalar, (L,) detached per-size losses)``."""
    q = online(batch.obs)  # (L, B, A)
    idx = batch.action[None, :, None].expand(q.shape[0], -1, 1)
    q_sa = q.gather(2, idx).squeeze(2)  # (L, B)
    y = td_targets(target_net, batch, gamma)  # (L, B)
    per_size = F.smooth_l1_loss(q_sa, y, reduction="none").mean(1)  # (L,)
    w = torch.tensor(online.nesting.weights, dtype=per_size.dtype)
    return (w * per_size).sum(), per_size.detach()


@torch.no_grad()
def evaluate_policy(
    net: MatryoshkaQNetwork,
    m: int,
    episodes: int = 10,
    seed: int = 10_000,
    env_name: str = "CartPole-v1",
    truncated_embedding: bool = False,
) -> float:
    """Mean undiscounted return of the greedy policy of size ``m`` over ``episodes`` episodes
    (seeds ``seed, seed + 1, ...``). ``truncated_embedding`` acts with :meth:`q_truncated`."""
    env = make_env(env_name)
    net.eval()
    returns = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        total, done = 0.0, False
        while not done:
            o = torch.as_tensor(obs, dtype=torch.float32)[None]
            q = net.q_truncated(o, m) if truncated_embedding else net.q_size(o, m)
            obs, reward, terminated, truncated, _ = env.step(int(q.argmax(-1)))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return float(np.mean(returns))


@dataclass
class RLConfig:
    """DQN on CartPole-v1 with a Matryoshka state encoder (and an ordinary one as baseline)."""

    env: str = help_field("gymnasium environment id", default="CartPole-v1")
    embed_dim: int = help_field("state embedding size d", default=32)
    nesting_start: int = help_field("first size of the doubling ladder", default=1)
    hidden: int = help_field("hidden width of the encoder", default=128)
    total_steps: int = help_field("environment steps of training", default=30000)
    learning_starts: int = help_field("random steps before updates begin", default=1000)
    batch_size: int = help_field("transitions per update", default=64)
    buffer_size: int = help_field("replay capacity", default=50000)
    lr: float = help_field("Adam learning rate", default=5e-4)
    gamma: float = help_field("discount", default=0.99)
    target_update: int = help_field("steps between target-network copies", default=500)
    eps_end: float = help_field("final exploration rate", default=0.02)
    eps_fraction: float = help_field("share of training over which ε decays", default=0.3)
    eval_episodes: int = help_field("greedy episodes per size", default=10)
    baseline: bool = help_field("also train an ordinary DQN and truncate it", default=True)
    seed: int = help_field("seed", default=0)
    out_dir: str = help_field("report folder", default="runs/app_rl")
    progress: bool = help_field("progress bars", default=True)

    def __post_init__(self) -> None:
        check_positive(
            self,
            "embed_dim",
            "nesting_start",
            "hidden",
            "total_steps",
            "batch_size",
            "buffer_size",
            "target_update",
            "eval_episodes",
        )
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma={self.gamma} must be in (0, 1].")
        if not 0.0 <= self.eps_end <= 1.0 or not 0.0 < self.eps_fraction <= 1.0:
            raise ValueError(
                f"eps_end={self.eps_end} must be in [0, 1] and eps_fraction={self.eps_fraction} "
                "in (0, 1]."
            )
        make_nesting(self.embed_dim, self.nesting_start)


def train_dqn(
    config: RLConfig, nesting: Nesting, desc: str = "DQN"
) -> tuple[MatryoshkaQNetwork, list[float]]:
    """Train a DQN whose Q-network has a head per size of ``nesting``; returns the network and
    the return of every finished training episode."""
    seed_everything(config.seed)
    env = make_env(config.env)
    obs_dim, n_actions = int(env.observation_space.shape[0]), int(env.action_space.n)
    online = MatryoshkaQNetwork(obs_dim, n_actions, nesting, config.hidden)
    target = MatryoshkaQNetwork(obs_dim, n_actions, nesting, config.hidden)
    target.load_state_dict(online.state_dict())
    opt = torch.optim.Adam(online.parameters(), lr=config.lr)
    buffer = ReplayBuffer(config.buffer_size, obs_dim)
    rng = np.random.default_rng(config.seed)
    obs, _ = env.reset(seed=config.seed)
    episode_returns: list[float] = []
    ep_return = 0.0
    decay_steps = max(1, int(config.eps_fraction * config.total_steps))
    bar = tqdm(range(config.total_steps), desc=desc, disable=not config.progress, leave=False)
    for step in bar:
        eps = max(config.eps_end, 1.0 - (1.0 - config.eps_end) * step / decay_steps)
        if step < config.learning_starts or rng.random() < eps:
            action = int(rng.integers(n_actions))
        else:
            with torch.no_grad():
                q = online.q_size(torch.as_tensor(obs, dtype=torch.float32)[None], nesting.dim)
            action = int(q.argmax(-1))
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(obs, action, float(reward), next_obs, terminated)
        ep_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            episode_returns.append(ep_return)
            bar.set_postfix(ret=f"{np.mean(episode_returns[-10:]):.0f}", eps=f"{eps:.2f}")
            ep_return = 0.0
            obs, _ = env.reset()
        if step >= config.learning_starts:
            online.train()
            loss, _ = dqn_loss(online, target, buffer.sample(config.batch_size, rng), config.gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(online.parameters(), 10.0)
            opt.step()
            if step % config.target_update == 0:
                target.load_state_dict(online.state_dict())
    env.close()
    return online.eval(), episode_returns


def run_rl(config: RLConfig) -> dict[str, Any]:
    """Train the Matryoshka DQN (and an ordinary one); greedy return per size; the report."""
    t0 = time.perf_counter()
    make_env(config.env).close()  # fail early, naming the extra, if gymnasium is missing
    nesting = make_nesting(config.embed_dim, config.nesting_start)
    sizes = list(nesting)
    mrl, mrl_returns = train_dqn(config, nesting, "Matryoshka DQN")
    metrics: dict[str, dict[str, list[Any]]] = {
        "return": {
            "Matryoshka DQN": [
                evaluate_policy(mrl, m, config.eval_episodes, env_name=config.env) for m in sizes
            ]
        }
    }
    meta: dict[str, Any] = {
        "config": config_to_dict(config),
        "train_episodes_mrl": len(mrl_returns),
        "last10_train_return_mrl": float(np.mean(mrl_returns[-10:])),
    }
    if config.baseline:
        plain, plain_returns = train_dqn(config, Nesting([nesting.dim]), "ordinary DQN")
        metrics["return"]["ordinary DQN, truncated"] = [
            evaluate_policy(
                plain, m, config.eval_episodes, env_name=config.env, truncated_embedding=True
            )
            for m in sizes
        ]
        meta["last10_train_return_ordinary"] = float(np.mean(plain_returns[-10:]))
    ret = metrics["return"]["Matryoshka DQN"]
    notes = [
        f"{config.env}, {config.total_steps} training steps per agent; greedy return averaged over "
        f"{config.eval_episodes} evaluation episodes per size (500 is the maximum)",
        "Matryoshka DQN return by size: "
        + ", ".join(f"m={m}: {r:.0f}" for m, r in zip(sizes, ret, strict=True)),  # type: ignore[str-format]
        "the return table is in environment reward units, not a percentage",
    ]
    results = {
        "task": f"DQN with a Matryoshka state encoder on {config.env}",
        "sizes": sizes,
        "metrics": metrics,
        "metric_labels": {"return": "mean greedy episode return"},
        "notes": notes,
        "meta": meta,
    }
    return finish(results, Path(config.out_dir), t0)
