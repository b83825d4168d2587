"""Reinforcement learning with a Matryoshka state encoder: PPO on CartPole-v1.

The actor-critic has a Matryoshka state encoder ``obs -> z in R^d`` read by a policy
:class:`~matryoshka.models.heads.MatryoshkaHead` (action logits), and a value ``MatryoshkaHead``; the
size-``m`` heads read only ``z[:, :m]``, so every prefix is its own policy and value function.
By default the critic has its own Matryoshka encoder (``shared_encoder=False``): with one shared
encoder the value regression competes with the policy for the first coordinates, and in a trial
run sizes 1-4 collapsed to a constant action.

Training is PPO (clipped surrogate, GAE, ``n_envs`` environments in a
``gymnasium.vector.SyncVectorEnv``, learning rate decayed linearly to 0). Rollouts act with the
full-size policy; every size ``m`` gets its own PPO loss on those rollouts, ``L_m =
-clip-surrogate(π_m(a|s) / π_old(a|s), A) + vf_coef · (V_m(s) - R)^2 / 2 - ent_coef · H(π_m)``,
where ``π_old`` is the full-size policy that collected the data (so the ratio is the importance
ratio of size ``m`` against the behaviour policy), ``A`` the GAE advantages of the full-size
critic and ``R = A + V_old`` the returns; the losses are summed with the nesting's weights. An
episode cut by the time limit is bootstrapped with the critic's value of its last state.

The report gives, for each prefix size, the greedy episode return (argmax of the size-``m``
logits) and the share of states on which that greedy action equals the full size's, beside an
ordinary PPO agent (one head at the full size) whose embedding is truncated (its heads' first
``m`` columns), averaged over ``eval_episodes`` episodes and ``n_seeds`` training seeds. With
``configs/app_rl.yaml`` (3 seeds, 100k steps each) both agents reach the maximum return 500 at
every size in about 4 minutes on 2 CPU cores; the action agreement is where they differ.

``gymnasium`` is optional: ``pip install 'matryoshka[rl]'``.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from matryoshka._validate import positive_int
from matryoshka.apps.common import check_positive, config_to_dict, finish, make_nesting
from matryoshka.config import help_field
from matryoshka.models.heads import MatryoshkaHead
from matryoshka.nesting import Nesting
from matryoshka.training.image import seed_everything

__all__ = [
    "MatryoshkaActorCritic",
    "RLConfig",
    "Rollout",
    "action_agreement",
    "evaluate_policy",
    "gae",
    "greedy_states",
    "make_env",
    "make_vector_env",
    "ppo_loss",
    "run_rl",
    "train_ppo",
]


def _gymnasium() -> Any:
    try:
        import gymnasium
    except ImportError as e:
        raise ImportError(
            "matryoshka.apps.rl needs gymnasium: install it with `pip install 'matryoshka[rl]'`."
        ) from e
    return gymnasium


def make_env(name: str = "CartPole-v1") -> Any:
    """A gymnasium environment; a clear error names the extra when gymnasium is missing."""
    return _gymnasium().make(name)


def make_vector_env(name: str, n_envs: int) -> Any:
    """``n_envs`` copies of ``name`` in a ``SyncVectorEnv`` that resets a finished copy in the
    same step (its last observation is in ``info["final_obs"]``)."""
    gym = _gymnasium()
    return gym.vector.SyncVectorEnv(
        [lambda: gym.make(name) for _ in range(n_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )


class MatryoshkaActorCritic(nn.Module):
    """``(B, obs_dim) -> (logits (L, B, A), values (L, B))`` from every prefix of one state
    embedding.

    A ``Nesting([d])`` gives an ordinary actor-critic whose embedding can still be truncated
    (:meth:`logits_truncated`).
    """

    def __init__(
        self,
        obs_dim: int,
        n_actions: int,
        nesting: Nesting,
        hidden: int = 64,
        shared_encoder: bool = False,
    ) -> None:
        super().__init__()
        self.nesting = nesting
        self.embed_dim = nesting.dim

        def encoder() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(obs_dim, hidden),
                nn.Tanh(),
                nn.Linear(hidden, hidden),
                nn.Tanh(),
                nn.Linear(hidden, nesting.dim),
            )

        self.encoder = encoder()
        self.critic_encoder = self.encoder if shared_encoder else encoder()
        self.shared_encoder = shared_encoder
        self.policy = MatryoshkaHead(nesting.dim, n_actions, nesting)
        self.value = MatryoshkaHead(nesting.dim, 1, nesting)

    def _embed(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(obs)
        return z, (z if self.shared_encoder else self.critic_encoder(obs))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, obs_dim) -> ((L, B, A), (L, B))``: the logits and values of every size."""
        z, zv = self._embed(obs)
        return self.policy(z), self.value(zv).squeeze(-1)

    def act_full(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The full size's logits ``(B, A)`` and values ``(B,)`` (what rollouts act with)."""
        z, zv = self._embed(obs)
        d = self.nesting.dim
        return self.policy.forward_size(z, d), self.value.forward_size(zv, d).squeeze(-1)

    def logits_size(self, obs: torch.Tensor, m: int) -> torch.Tensor:
        """Action logits of the size-``m`` policy head: ``(B, obs_dim) -> (B, A)``."""
        return self.policy.forward_size(self.encoder(obs), m)

    def logits_truncated(self, obs: torch.Tensor, m: int) -> torch.Tensor:
        """The largest policy head applied to ``z[:, :m]`` (the tail dropped): ``(B, A)``. For
        an ordinary network this is what truncating its embedding does to its policy."""
        z = self.encoder(obs)
        d = self.nesting.dim
        return F.linear(z[:, :m], self.policy.weight_for(d)[:, :m], self.policy.bias_for(d))


class Rollout(NamedTuple):
    """Flattened PPO data: ``obs (N, o)``, ``action (N,)`` int64, ``logp (N,)`` log-probability
    of the action under the behaviour (full-size) policy, ``advantage (N,)``, ``ret (N,)`` the
    value targets."""

    obs: torch.Tensor
    action: torch.Tensor
    logp: torch.Tensor
    advantage: torch.Tensor
    ret: torch.Tensor


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    last_value: torch.Tensor,
    gamma: float,
    lam: float,
) -> torch.Tensor:
    """Generalised advantage estimates ``(T, N)`` of ``T`` steps of ``N`` envs.

    ``dones[t]`` is 1 where transition ``t`` ended its episode (nothing is bootstrapped past it);
    ``last_value (N,)`` is the value of the state after the last step.
    ``A_t = δ_t + γλ (1 - done_t) A_{t+1}`` with ``δ_t = r_t + γ (1 - done_t) V_{t+1} - V_t``.
    """
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(last_value)
    next_value = last_value
    for t in range(rewards.shape[0] - 1, -1, -1):
        keep = 1.0 - dones[t]
        delta = rewards[t] + gamma * keep * next_value - values[t]
        next_adv = delta + gamma * lam * keep * next_adv
        adv[t] = next_adv
        next_value = values[t]
    return adv


def ppo_loss(
    net: MatryoshkaActorCritic,
    batch: Rollout,
    clip: float,
    vf_coef: float = 0.5,
    ent_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_l c_l * L_l`` with the PPO loss ``L_l`` of size ``l`` (see the module docstring):
    ``(scalar, (L,) detached per-size losses)``. Advantages are normalised over the batch."""
    logits, values = net(batch.obs)  # (L, B, A), (L, B)
    logp_all = logits.log_softmax(-1)
    idx = batch.action[None, :, None].expand(logits.shape[0], -1, 1)
    logp = logp_all.gather(2, idx).squeeze(2)  # (L, B)
    adv = batch.advantage
    if adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    ratio = (logp - batch.logp).exp()
    surrogate = torch.min(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)  # (L, B)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (L, B)
    per_size = (
        -surrogate.mean(1)
        + vf_coef * 0.5 * (values - batch.ret).pow(2).mean(1)
        - ent_coef * entropy.mean(1)
    )
    w = torch.tensor(net.nesting.weights, dtype=per_size.dtype)
    return (w * per_size).sum(), per_size.detach()


def _check_size(net: MatryoshkaActorCritic, m: int, truncated_embedding: bool) -> None:
    if truncated_embedding:
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= net.nesting.dim:
            raise ValueError(f"m={m!r} must be an int in [1, {net.nesting.dim}].")
    elif m not in list(net.nesting):
        raise ValueError(
            f"m={m!r} is not a size of this network: pick one of {list(net.nesting)}, or pass "
            "truncated_embedding=True to cut the full-size head."
        )


def _greedy_logits(
    net: MatryoshkaActorCritic, obs: torch.Tensor, m: int, truncated_embedding: bool
) -> torch.Tensor:
    return net.logits_truncated(obs, m) if truncated_embedding else net.logits_size(obs, m)


@torch.no_grad()
def _greedy_episodes(
    net: MatryoshkaActorCritic,
    m: int,
    episodes: int,
    seed: int,
    env_name: str,
    truncated_embedding: bool,
) -> tuple[list[float], torch.Tensor]:
    """Returns of ``episodes`` greedy episodes run side by side, and every state they visited."""
    _check_size(net, m, truncated_embedding)
    positive_int(episodes, "episodes")
    envs = [make_env(env_name) for _ in range(episodes)]
    obs = np.stack([env.reset(seed=seed + i)[0] for i, env in enumerate(envs)])
    returns = np.zeros(episodes)
    active = np.ones(episodes, bool)
    visited: list[torch.Tensor] = []
    net.eval()
    while active.any():
        ids = np.flatnonzero(active)
        o = torch.as_tensor(obs[ids], dtype=torch.float32)
        visited.append(o)
        actions = _greedy_logits(net, o, m, truncated_embedding).argmax(-1).tolist()
        for i, a in zip(ids, actions, strict=True):
            obs[i], reward, terminated, truncated, _ = envs[i].step(a)
            returns[i] += float(reward)
            active[i] = not (terminated or truncated)
    for env in envs:
        env.close()
    return returns.tolist(), torch.cat(visited)


def evaluate_policy(
    net: MatryoshkaActorCritic,
    m: int,
    episodes: int = 10,
    seed: int = 10_000,
    env_name: str = "CartPole-v1",
    truncated_embedding: bool = False,
) -> list[float]:
    """Undiscounted returns of ``episodes`` episodes (seeds ``seed, seed + 1, ...``, run side by
    side) of the greedy policy of size ``m``: the argmax of
    :meth:`~MatryoshkaActorCritic.logits_size`, or of
    :meth:`~MatryoshkaActorCritic.logits_truncated` with ``truncated_embedding``."""
    return _greedy_episodes(net, m, episodes, seed, env_name, truncated_embedding)[0]


def greedy_states(
    net: MatryoshkaActorCritic,
    episodes: int = 10,
    seed: int = 10_000,
    env_name: str = "CartPole-v1",
) -> torch.Tensor:
    """Every state ``(N, obs_dim)`` visited by ``episodes`` greedy episodes of the full size."""
    return _greedy_episodes(net, net.nesting.dim, episodes, seed, env_name, False)[1]


@torch.no_grad()
def action_agreement(
    net: MatryoshkaActorCritic, states: torch.Tensor, m: int, truncated_embedding: bool = False
) -> float:
    """Share of ``states`` on which the greedy action of size ``m`` equals that of the full
    size: a finer measure than the return, which saturates."""
    _check_size(net, m, truncated_embedding)
    full = net.logits_size(states, net.nesting.dim).argmax(-1)
    return float(
        (_greedy_logits(net, states, m, truncated_embedding).argmax(-1) == full).float().mean()
    )


@dataclass
class RLConfig:
    """PPO on CartPole-v1 with a Matryoshka state encoder (and an ordinary one as baseline)."""

    env: str = help_field("gymnasium environment id", default="CartPole-v1")
    embed_dim: int = help_field("state embedding size d", default=32)
    nesting_start: int = help_field("first size of the doubling ladder", default=1)
    hidden: int = help_field("hidden width of the encoder", default=64)
    total_steps: int = help_field("environment steps of training per agent", default=100000)
    n_envs: int = help_field("environments stepped side by side", default=8)
    n_steps: int = help_field("steps per environment in each rollout", default=32)
    epochs: int = help_field("PPO passes over each rollout", default=20)
    minibatch_size: int = help_field("transitions per gradient step", default=256)
    lr: float = help_field("Adam learning rate (decays linearly to 0)", default=1e-3)
    gamma: float = help_field("discount", default=0.98)
    gae_lambda: float = help_field("GAE λ", default=0.8)
    clip: float = help_field("PPO ratio clip ε", default=0.2)
    vf_coef: float = help_field("weight of the value loss", default=0.5)
    ent_coef: float = help_field("weight of the entropy bonus", default=0.0)
    shared_encoder: bool = help_field(
        "one encoder for policy and value (else the critic has its own)", default=False
    )
    max_grad_norm: float = help_field("gradient-norm clip", default=0.5)
    eval_episodes: int = help_field("greedy episodes per size", default=10)
    n_seeds: int = help_field("training seeds per agent (seed, seed + 1, ...)", default=3)
    baseline: bool = help_field("also train an ordinary PPO agent and truncate it", default=True)
    seed: int = help_field("first seed", default=0)
    out_dir: str = help_field("report folder", default="runs/app_rl")
    threads: int = help_field(
        "torch CPU threads while training (1 is fastest for these small networks)", default=1
    )
    progress: bool = help_field("progress bars", default=True)

    def __post_init__(self) -> None:
        check_positive(
            self,
            "embed_dim",
            "nesting_start",
            "hidden",
            "total_steps",
            "n_envs",
            "n_steps",
            "epochs",
            "minibatch_size",
            "eval_episodes",
            "n_seeds",
            "threads",
        )
        for name in ("gamma", "gae_lambda"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name}={value} must be in (0, 1].")
        if not 0.0 < self.clip < 1.0:
            raise ValueError(f"clip={self.clip} must be in (0, 1), e.g. 0.2.")
        for name in ("lr", "max_grad_norm"):
            value = getattr(self, name)
            if not value > 0.0:
                raise ValueError(f"{name}={value} must be > 0.")
        for name in ("vf_coef", "ent_coef"):
            value = getattr(self, name)
            if not value >= 0.0:
                raise ValueError(f"{name}={value} must be >= 0.")
        if self.total_steps < self.n_envs * self.n_steps:
            raise ValueError(
                f"total_steps={self.total_steps} is less than one rollout of n_envs * n_steps = "
                f"{self.n_envs * self.n_steps} steps: raise total_steps or lower n_envs/n_steps."
            )
        make_nesting(self.embed_dim, self.nesting_start)


def train_ppo(
    config: RLConfig, nesting: Nesting, seed: int | None = None, desc: str = "PPO"
) -> tuple[MatryoshkaActorCritic, list[tuple[int, float]]]:
    """Train a PPO agent whose policy and value have a head per size of ``nesting``; returns the
    network and ``(environment step, return)`` of every finished training episode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train_ppo(config, nesting, config.seed if seed is None else seed, desc)
    finally:
        torch.set_num_threads(threads)


def _train_ppo(
    config: RLConfig, nesting: Nesting, seed: int, desc: str
) -> tuple[MatryoshkaActorCritic, list[tuple[int, float]]]:
    seed_everything(seed)
    envs = make_vector_env(config.env, config.n_envs)
    obs_dim = int(envs.single_observation_space.shape[0])
    n_actions = int(envs.single_action_space.n)
    net = MatryoshkaActorCritic(obs_dim, n_actions, nesting, config.hidden, config.shared_encoder)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, eps=1e-5)
    T, N = config.n_steps, config.n_envs
    n_updates = math.ceil(config.total_steps / (T * N))
    obs_buf = torch.zeros(T, N, obs_dim)
    act_buf = torch.zeros(T, N, dtype=torch.int64)
    logp_buf, rew_buf, done_buf, val_buf = (torch.zeros(T, N) for _ in range(4))
    obs_np, _ = envs.reset(seed=seed)
    obs = torch.as_tensor(obs_np, dtype=torch.float32)
    ep_return = np.zeros(N)
    episodes: list[tuple[int, float]] = []
    step = 0
    bar = tqdm(range(n_updates), desc=desc, disable=not config.progress, leave=False)
    for update in bar:
        for group in opt.param_groups:
            group["lr"] = config.lr * (1.0 - update / n_updates)
        net.eval()
        for t in range(T):
            with torch.no_grad():
                logits, value = net.act_full(obs)
                dist = torch.distributions.Categorical(logits=logits)
                action = dist.sample()
            next_obs, reward, terminated, truncated, info = envs.step(action.numpy())
            reward = reward.astype(np.float32)
            step += N
            ep_return += reward
            cut = truncated & ~terminated
            if cut.any():  # bootstrap a time-limit cut from the value of its last state
                final = torch.as_tensor(np.stack(info["final_obs"][cut]), dtype=torch.float32)
                with torch.no_grad():
                    reward[cut] += config.gamma * net.act_full(final)[1].numpy()
            done = terminated | truncated
            for i in np.flatnonzero(done):
                episodes.append((step, float(ep_return[i])))
                ep_return[i] = 0.0
            obs_buf[t], act_buf[t], logp_buf[t], val_buf[t] = (
                obs,
                action,
                dist.log_prob(action),
                value,
            )
            rew_buf[t] = torch.as_tensor(reward)
            done_buf[t] = torch.as_tensor(done, dtype=torch.float32)
            obs = torch.as_tensor(next_obs, dtype=torch.float32)
        with torch.no_grad():
            last_value = net.act_full(obs)[1]
        adv = gae(rew_buf, val_buf, done_buf, last_value, config.gamma, config.gae_lambda)
        data = Rollout(
            obs_buf.reshape(T * N, obs_dim),
            act_buf.reshape(-1),
            logp_buf.reshape(-1),
            adv.reshape(-1),
            (adv + val_buf).reshape(-1),
        )
        net.train()
        for _ in range(config.epochs):
            for idx in torch.randperm(T * N).split(config.minibatch_size):
                loss, _ = ppo_loss(
                    net,
                    Rollout(*(x[idx] for x in data)),
                    config.clip,
                    config.vf_coef,
                    config.ent_coef,
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), config.max_grad_norm)
                opt.step()
        if episodes:
            bar.set_postfix(ret=f"{np.mean([r for _, r in episodes[-20:]]):.0f}")
    envs.close()
    return net.eval(), episodes


def _smoothed(episodes: list[tuple[int, float]], points: int = 20) -> dict[str, list[float]]:
    """Mean training return in ``points`` equal windows of environment steps."""
    if not episodes:
        return {"x": [], "y": []}
    steps = np.array([s for s, _ in episodes], float)
    rets = np.array([r for _, r in episodes], float)
    edges = np.linspace(0.0, steps.max(), points + 1)
    xs, ys = [], []
    for lo, hi in itertools.pairwise(edges):
        sel = (steps > lo) & (steps <= hi)
        if sel.any():
            xs.append(float(hi))
            ys.append(float(rets[sel].mean()))
    return {"x": xs, "y": ys}


def run_rl(config: RLConfig) -> dict[str, Any]:
    """Train the Matryoshka PPO agent (and an ordinary one) on ``n_seeds`` seeds; greedy return
    per size; the report."""
    t0 = time.perf_counter()
    make_env(config.env).close()  # fail early, naming the extra, if gymnasium is missing
    nesting = make_nesting(config.embed_dim, config.nesting_start)
    sizes = list(nesting)
    seeds = [config.seed + k for k in range(config.n_seeds)]
    agents = {"Matryoshka PPO": (nesting, False)}
    if config.baseline:
        agents["ordinary PPO, truncated"] = (Nesting([nesting.dim]), True)
    per_seed: dict[str, list[list[float]]] = {}  # agent -> seed -> mean return per size
    agree_seed: dict[str, list[list[float]]] = {}  # agent -> seed -> action agreement per size
    curves: dict[str, dict[str, list[float]]] = {}
    meta: dict[str, Any] = {"config": config_to_dict(config), "seeds": seeds}
    for name, (agent_nesting, truncate) in agents.items():
        per_seed[name], agree_seed[name] = [], []
        for s in seeds:
            t_agent = time.perf_counter()
            net, episodes = train_ppo(config, agent_nesting, s, f"{name} (seed {s})")
            ret = [
                float(
                    np.mean(
                        evaluate_policy(net, m, config.eval_episodes, 10_000, config.env, truncate)
                    )
                )
                for m in sizes
            ]
            states = greedy_states(net, config.eval_episodes, 10_000, config.env)
            agree = [100.0 * action_agreement(net, states, m, truncate) for m in sizes]
            per_seed[name].append(ret)
            agree_seed[name].append(agree)
            curves[f"{name}, seed {s}"] = _smoothed(episodes)
            meta[f"seconds {name}, seed {s}"] = round(time.perf_counter() - t_agent, 1)
    table = {name: np.mean(rows, axis=0).tolist() for name, rows in per_seed.items()}
    worst = {name: np.min(rows, axis=0).tolist() for name, rows in per_seed.items()}
    agreement = {name: np.mean(rows, axis=0).tolist() for name, rows in agree_seed.items()}
    meta["return_per_seed"] = per_seed
    meta["action_agreement_per_seed"] = agree_seed
    probe = make_env(config.env)
    limit = probe.spec.max_episode_steps if probe.spec is not None else None
    probe.close()
    notes = [
        f"{config.env}, PPO with {config.total_steps} environment steps per agent and seed, "
        f"{len(seeds)} seed(s) {seeds}; greedy return averaged over {config.eval_episodes} "
        f"evaluation episodes per size and over the seeds"
        + (f" (episodes are cut at {limit} steps)" if limit else ""),
    ]
    for name, values in table.items():
        notes.append(
            f"{name} return by size: "
            + ", ".join(f"m={m}: {r:.0f}" for m, r in zip(sizes, values, strict=True))
        )
    if config.baseline:
        a_mrl = agreement["Matryoshka PPO"][0]
        a_ord = agreement["ordinary PPO, truncated"][0]
        notes.append(
            f"at m={sizes[0]} the greedy action equals the full size's on {a_mrl:.1f}% of the "
            f"states the full-size policy visits for the Matryoshka agent, {a_ord:.1f}% for the "
            "truncated ordinary agent"
        )
        ord_ret = table["ordinary PPO, truncated"]
        if min(ord_ret) >= 0.98 * ord_ret[-1]:
            notes.append(
                "the truncated ordinary agent keeps at least 98% of its full-size return at every "
                "size although its smaller prefixes pick other actions: this task forgives "
                "wrong actions, so the return is a coarse measure of what truncation costs and "
                "the action agreement a finer one"
            )
    results = {
        "task": f"PPO with a Matryoshka state encoder on {config.env}",
        "sizes": sizes,
        "metrics": {
            "return": table,
            "return_worst_seed": worst,
            "action_agreement": agreement,
        },
        "metric_labels": {
            "return": "mean greedy episode return (mean over seeds)",
            "return_worst_seed": "mean greedy episode return of the worst seed",
            "action_agreement": "% of the full-size policy's visited states where size m picks "
            "the same greedy action (mean over seeds)",
        },
        "units": "episode returns in environment reward units, and action agreement in percent",
        "curves": {
            "training": {
                "title": "training episode return (full-size policy, sampled actions)",
                "xlabel": "environment steps",
                "ylabel": "episode return",
                "series": curves,
            }
        },
        "notes": notes,
        "meta": meta,
    }
    return finish(results, Path(config.out_dir), t0)
