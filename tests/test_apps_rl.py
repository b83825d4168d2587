"""DQN with a Matryoshka Q-network: TD targets and loss by hand, replay buffer, environment."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from matryoshka.apps.rl import (
    Batch,
    MatryoshkaQNetwork,
    ReplayBuffer,
    RLConfig,
    dqn_loss,
    evaluate_policy,
    make_env,
    td_targets,
    train_dqn,
)
from matryoshka.nesting import Nesting


def _batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(
        obs=torch.randn(6, 4, generator=g),
        action=torch.tensor([0, 1, 1, 0, 1, 0]),
        reward=torch.ones(6),
        next_obs=torch.randn(6, 4, generator=g),
        terminated=torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 0.0]),
    )


def _nets(nesting: Nesting) -> tuple[MatryoshkaQNetwork, MatryoshkaQNetwork]:
    torch.manual_seed(0)
    return MatryoshkaQNetwork(4, 2, nesting, 16), MatryoshkaQNetwork(4, 2, nesting, 16)


def test_td_targets_match_a_hand_computation():
    nesting = Nesting([1, 2, 8])
    _, target = _nets(nesting)
    batch = _batch()
    y = td_targets(target, batch, gamma=0.9)
    assert y.shape == (3, 6)
    for i, m in enumerate(nesting):
        with torch.no_grad():
            q_next = target.q_size(batch.next_obs, m)  # (6, 2), only z[:, :m]
        for b in range(6):
            boot = 0.0 if batch.terminated[b] else 0.9 * q_next[b].max().item()
            assert y[i, b].item() == pytest.approx(1.0 + boot, rel=1e-5)


def test_dqn_loss_is_the_weighted_huber_of_each_size():
    nesting = Nesting([1, 2, 8], weights=[2.0, 1.0, 0.5])
    online, target = _nets(nesting)
    batch = _batch()
    loss, per_size = dqn_loss(online, target, batch, gamma=0.99)
    y = td_targets(target, batch, 0.99)
    expected = 0.0
    for i, m in enumerate(nesting):
        q_sa = online.q_size(batch.obs, m)[torch.arange(6), batch.action]
        huber = F.smooth_l1_loss(q_sa, y[i]).item()
        assert per_size[i].item() == pytest.approx(huber, rel=1e-5)
        expected += nesting.weights[i] * huber
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()  # gradients reach the encoder, not the target network
    assert online.encoder[0].weight.grad is not None
    assert target.encoder[0].weight.grad is None


def test_q_truncated_of_an_ordinary_network_uses_the_first_columns():
    torch.manual_seed(0)
    net = MatryoshkaQNetwork(4, 2, Nesting([8]), 16)
    obs = torch.randn(3, 4)
    torch.testing.assert_close(net.q_truncated(obs, 8), net.q_size(obs, 8))
    z = net.encoder(obs)
    expected = z[:, :3] @ net.head.weight_for(8)[:, :3].T + net.head.bias_for(8)
    torch.testing.assert_close(net.q_truncated(obs, 3), expected)


def test_replay_buffer_is_a_ring():
    buf = ReplayBuffer(3, 2)
    for i in range(5):
        buf.add(np.full(2, i, np.float32), i % 2, float(i), np.full(2, i + 1, np.float32), i == 4)
    assert buf.size == 3
    assert sorted(buf.reward.tolist()) == [2.0, 3.0, 4.0]  # the two oldest were overwritten
    batch = buf.sample(10, np.random.default_rng(0))
    assert batch.obs.shape == (10, 2)
    assert set(batch.reward.tolist()) <= {2.0, 3.0, 4.0}
    torch.testing.assert_close(batch.next_obs, batch.obs + 1)
    with pytest.raises(ValueError, match="replay buffer is empty"):
        ReplayBuffer(3, 2).sample(1, np.random.default_rng(0))


def test_short_training_runs_and_policies_act_in_cartpole():
    config = RLConfig(
        total_steps=300,
        learning_starts=100,
        target_update=100,
        embed_dim=4,
        hidden=16,
        progress=False,
        baseline=False,
    )
    net, returns = train_dqn(config, Nesting([2, 4]))
    assert len(returns) > 0
    assert all(r >= 1 for r in returns)
    ret = evaluate_policy(net, 2, episodes=2)
    assert 1.0 <= ret <= 500.0


def test_missing_gymnasium_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    with pytest.raises(ImportError, match=r"pip install 'matryoshka\[rl\]'"):
        make_env()


def test_config_errors():
    with pytest.raises(ValueError, match=r"gamma=1.5 must be in \(0, 1\]"):
        RLConfig(gamma=1.5)
    with pytest.raises(ValueError, match="total_steps=0 must be a positive int"):
        RLConfig(total_steps=0)
    with pytest.raises(ValueError, match=r"eps_fraction=0\.0"):
        RLConfig(eps_fraction=0.0)
