"""PPO with a Matryoshka actor-critic: GAE and the loss by hand, greedy evaluation, the recipe."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from matryoshka.apps.rl import (
    MatryoshkaActorCritic,
    RLConfig,
    Rollout,
    action_agreement,
    evaluate_policy,
    gae,
    greedy_states,
    make_env,
    ppo_loss,
    run_rl,
    train_ppo,
)
from matryoshka.nesting import Nesting
from matryoshka.report import load_results, write_report


def _net(nesting: Nesting, shared: bool = False) -> MatryoshkaActorCritic:
    torch.manual_seed(0)
    return MatryoshkaActorCritic(4, 2, nesting, hidden=16, shared_encoder=shared)


def _rollout(n: int = 12) -> Rollout:
    g = torch.Generator().manual_seed(0)
    return Rollout(
        obs=torch.randn(n, 4, generator=g),
        action=torch.randint(0, 2, (n,), generator=g),
        logp=torch.log(torch.rand(n, generator=g) * 0.8 + 0.1),
        advantage=torch.randn(n, generator=g),
        ret=torch.randn(n, generator=g) * 5,
    )


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [1.0], [1.5]])
    dones = torch.tensor([[0.0], [1.0], [0.0]])
    last = torch.tensor([4.0])
    g, lam = 0.9, 0.8
    adv = gae(rewards, values, dones, last, g, lam)
    d2 = 3.0 + g * 4.0 - 1.5
    d1 = 2.0 - 1.0  # episode ended: no bootstrap, and no advantage flows back past it
    d0 = 1.0 + g * 1.0 - 0.5
    expected = torch.tensor([[d0 + g * lam * d1], [d1], [d2]])
    torch.testing.assert_close(adv, expected)
    # λ = 1 without dones: discounted return minus the value
    adv1 = gae(rewards, values, torch.zeros(3, 1), last, g, 1.0)
    ret0 = 1.0 + g * 2.0 + g**2 * 3.0 + g**3 * 4.0
    assert adv1[0, 0].item() == pytest.approx(ret0 - 0.5)


@pytest.mark.parametrize("shared", [False, True])
def test_ppo_loss_is_the_weighted_sum_of_each_sizes_ppo_loss(shared):
    nesting = Nesting([1, 2, 8], weights=[2.0, 1.0, 0.5])
    net = _net(nesting, shared)
    batch = _rollout()
    clip, vf, ent = 0.2, 0.5, 0.01
    loss, per_size = ppo_loss(net, batch, clip, vf, ent)
    adv = (batch.advantage - batch.advantage.mean()) / (batch.advantage.std() + 1e-8)
    expected = 0.0
    for i, m in enumerate(nesting):
        logits = net.logits_size(batch.obs, m)
        logp_all = logits.log_softmax(-1)
        logp = logp_all[torch.arange(12), batch.action]
        ratio = (logp - batch.logp).exp()
        surr = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()
        z_v = net.critic_encoder(batch.obs)
        v = net.value.forward_size(z_v, m).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
        l_m = -surr + vf * 0.5 * (v - batch.ret).pow(2).mean() - ent * entropy
        assert per_size[i].item() == pytest.approx(l_m.item(), rel=1e-5, abs=1e-6)
        expected += nesting.weights[i] * l_m.item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert net.encoder[0].weight.grad is not None
    assert net.critic_encoder[0].weight.grad is not None


def test_size_m_reads_only_the_first_m_dimensions():
    net = _net(Nesting([1, 2, 8]))
    obs = torch.randn(5, 4)
    z = net.encoder(obs)
    z2 = z.clone()
    z2[:, 2:] = torch.randn(5, 6)
    for m in (1, 2):
        torch.testing.assert_close(net.policy.forward_size(z, m), net.policy.forward_size(z2, m))
    logits, values = net(obs)
    assert logits.shape == (3, 5, 2)
    assert values.shape == (3, 5)
    torch.testing.assert_close(logits[1], net.logits_size(obs, 2))


def test_logits_truncated_of_an_ordinary_network_uses_the_first_columns():
    net = _net(Nesting([8]))
    obs = torch.randn(3, 4)
    torch.testing.assert_close(net.logits_truncated(obs, 8), net.logits_size(obs, 8))
    z = net.encoder(obs)
    expected = z[:, :3] @ net.policy.weight_for(8)[:, :3].T + net.policy.bias_for(8)
    torch.testing.assert_close(net.logits_truncated(obs, 3), expected)


def _tiny(tmp_path: Path, **kw: object) -> RLConfig:
    base: dict[str, object] = dict(
        embed_dim=4,
        hidden=16,
        total_steps=512,
        n_envs=4,
        n_steps=32,
        epochs=2,
        minibatch_size=64,
        eval_episodes=2,
        n_seeds=1,
        progress=False,
        out_dir=str(tmp_path / "rl"),
    )
    base.update(kw)
    return RLConfig(**base)  # type: ignore[arg-type]


def test_short_training_runs_and_every_size_acts_in_cartpole(tmp_path):
    config = _tiny(tmp_path)
    net, episodes = train_ppo(config, Nesting([1, 2, 4]))
    assert len(episodes) > 0
    steps = [s for s, _ in episodes]
    assert steps == sorted(steps)
    assert steps[-1] <= 512
    assert all(1 <= r <= 500 for _, r in episodes)
    for m in (1, 2, 4):
        returns = evaluate_policy(net, m, episodes=2)
        assert len(returns) == 2
        assert all(1.0 <= r <= 500.0 for r in returns)
    # seeded: the same config trains the same network
    net2, episodes2 = train_ppo(config, Nesting([1, 2, 4]))
    assert episodes2 == episodes
    torch.testing.assert_close(net2.encoder[0].weight, net.encoder[0].weight)
    states = greedy_states(net, episodes=2)
    assert states.shape[1] == 4
    assert len(states) >= 2
    assert action_agreement(net, states, 4) == 1.0
    assert 0.0 <= action_agreement(net, states, 1) <= 1.0


def test_evaluation_errors_name_the_size():
    net = _net(Nesting([1, 2, 8]))
    with pytest.raises(
        ValueError, match=r"m=3 is not a size of this network: pick one of \[1, 2, 8\]"
    ):
        evaluate_policy(net, 3, episodes=1)
    with pytest.raises(ValueError, match=r"m=9 must be an int in \[1, 8\]"):
        evaluate_policy(net, 9, episodes=1, truncated_embedding=True)
    with pytest.raises(ValueError, match="episodes=0 must be a positive int"):
        evaluate_policy(net, 2, episodes=0)


def test_run_rl_writes_a_report_in_return_units(tmp_path):
    config = _tiny(tmp_path, n_seeds=2)
    results = run_rl(config)
    sizes = results["sizes"]
    assert sizes == [1, 2, 4]
    table = results["metrics"]["return"]
    assert set(table) == {"Matryoshka PPO", "ordinary PPO, truncated"}
    for values in table.values():
        assert len(values) == 3
        assert all(1.0 <= v <= 500.0 for v in values)
    for name, rows in results["meta"]["return_per_seed"].items():
        assert len(rows) == 2  # one row per seed, averaged into the table
        assert table[name] == pytest.approx([sum(c) / 2 for c in zip(*rows, strict=True)])
    agreement = results["metrics"]["action_agreement"]["Matryoshka PPO"]
    assert agreement[-1] == 100.0
    assert all(0.0 <= a <= 100.0 for a in agreement)
    out = Path(config.out_dir)
    text = (out / "report.md").read_text()
    assert "Values are episode returns in environment reward units" in text
    assert "Values are percentages" not in text
    assert "| m | Matryoshka PPO | ordinary PPO, truncated |" in text
    first = table["Matryoshka PPO"][0]
    assert f"| 1 | {first:.4g} |" in text  # printed as a return, not multiplied by 100
    for png in ("return.png", "action_agreement.png", "curve_training.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = load_results(out)
    assert back["metrics"]["return"] == table  # JSON round-trips floats exactly
    assert back["units"].startswith("episode returns")


def test_report_units_default_and_errors(tmp_path):
    base = {"task": "t", "sizes": [1, 2], "metrics": {"r": {"A": [0.5, 250.0]}}}
    text = write_report(base, tmp_path / "a").read_text()
    assert "Values are percentages" in text
    assert "| 1 | 50.0 |" in text
    text = write_report({**base, "units": "returns"}, tmp_path / "b").read_text()
    assert "Values are returns (rows" in text
    assert "| 1 | 0.5 |" in text
    with pytest.raises(ValueError, match=r"results\['units'\]=3 must be a non-empty string"):
        write_report({**base, "units": 3}, tmp_path / "c")


def test_missing_gymnasium_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    with pytest.raises(ImportError, match=r"pip install 'matryoshka\[rl\]'"):
        make_env()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"gamma": 1.5}, r"gamma=1.5 must be in \(0, 1\]"),
        ({"gae_lambda": 0.0}, r"gae_lambda=0.0 must be in \(0, 1\]"),
        ({"total_steps": 0}, "total_steps=0 must be a positive int"),
        ({"n_envs": 0}, "n_envs=0 must be a positive int"),
        ({"n_seeds": 0}, "n_seeds=0 must be a positive int"),
        ({"clip": 1.5}, r"clip=1.5 must be in \(0, 1\)"),
        ({"lr": 0.0}, "lr=0.0 must be > 0"),
        ({"ent_coef": -0.1}, "ent_coef=-0.1 must be >= 0"),
        (
            {"total_steps": 100, "n_envs": 8, "n_steps": 32},
            r"total_steps=100 is less than one rollout of n_envs \* n_steps = 256",
        ),
        ({"embed_dim": 4, "nesting_start": 8}, None),  # start is clipped to the dim: valid
    ],
)
def test_config_errors(kw, message):
    if message is None:
        RLConfig(**kw)
        return
    with pytest.raises(ValueError, match=message):
        RLConfig(**kw)
