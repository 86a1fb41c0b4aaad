"""The TD math in isolation (float64): terminal vs truncation vs life loss, n-step, double DQN, the
epsilon schedule, and one update that changes the network and keeps metrics on the device."""

import pytest
import torch

from agents.dqn.config import AgentConfig
from agents.dqn.learner import Learner, epsilon_at, n_step_returns, td_targets
from agents.dqn.replay import ReplayBatch

G = 0.9


def _seq(rewards, terminals=None, truncations=None):
    r = torch.tensor([rewards], dtype=torch.float64)
    z = torch.zeros_like(r, dtype=torch.bool)
    t = z.clone() if terminals is None else torch.tensor([terminals])
    u = z.clone() if truncations is None else torch.tensor([truncations])
    return n_step_returns(r, t, u, G)


def test_one_step_terminal_cuts_bootstrap_truncation_keeps_it():
    ret, disc = _seq([1.0], [True])
    assert ret.item() == 1.0 and disc.item() == 0.0
    ret, disc = _seq([1.0], None, [True])
    assert ret.item() == 1.0 and disc.item() == pytest.approx(G)
    ret, disc = _seq([1.0])
    assert disc.item() == pytest.approx(G)


def test_n_step_return_stops_at_first_end():
    ret, disc = _seq([1.0, 2.0, 4.0])
    assert ret.item() == pytest.approx(1 + G * 2 + G**2 * 4) and disc.item() == pytest.approx(G**3)
    ret, disc = _seq([1.0, 2.0, 4.0], [False, True, False])  # terminal (or life loss) at step 1
    assert ret.item() == pytest.approx(1 + G * 2) and disc.item() == 0.0
    ret, disc = _seq([1.0, 2.0, 4.0], None, [True, False, False])  # truncated at step 0
    assert ret.item() == pytest.approx(1.0) and disc.item() == pytest.approx(G)
    ret, disc = _seq([1.0, 2.0, 4.0], [False, False, True], [False, True, False])  # truncation first
    assert ret.item() == pytest.approx(1 + G * 2) and disc.item() == pytest.approx(G**2)


def test_td_targets_nature_and_double():
    q_target = torch.tensor([[1.0, 5.0, 3.0]], dtype=torch.float64)
    q_online = torch.tensor([[0.0, 0.0, 9.0]], dtype=torch.float64)
    ret, disc = torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    assert td_targets(ret, disc, q_target, None).item() == pytest.approx(1 + 0.5 * 5)
    assert td_targets(ret, disc, q_target, q_online).item() == pytest.approx(1 + 0.5 * 3)
    assert td_targets(ret, torch.zeros(1, dtype=torch.float64), q_target, None).item() == 1.0


def test_epsilon_schedule_is_linear_then_flat():
    assert epsilon_at(0, 1.0, 0.1, 1000) == 1.0
    assert epsilon_at(500, 1.0, 0.1, 1000) == pytest.approx(0.55)
    assert epsilon_at(1000, 1.0, 0.1, 1000) == pytest.approx(0.1)
    assert epsilon_at(10**9, 1.0, 0.1, 1000) == pytest.approx(0.1)
    assert epsilon_at(5, 1.0, 0.1, 0) == 0.1


def _batch(b=8, n=1):
    g = torch.Generator().manual_seed(0)
    return ReplayBatch(
        obs=torch.randn(b, 4, generator=g),
        actions=torch.randint(0, 2, (b,), generator=g),
        rewards=torch.randn(b, n, generator=g) * 3,
        terminals=torch.zeros(b, n, dtype=torch.bool),
        truncations=torch.zeros(b, n, dtype=torch.bool),
        next_obs=torch.randn(b, 4, generator=g),
        next_offsets=torch.full((b,), n),
        indices=torch.arange(b),
    )


def test_update_reduces_loss_and_syncs_target_on_schedule():
    from wn_rl import mlp

    torch.manual_seed(0)
    q = mlp([4, 16, 2], "weight_norm")
    config = AgentConfig(lr=1e-2, target_update_every_updates=3, batch_size=8)
    learner = Learner(q, config, terminal_on_life_loss=False)
    batch = _batch()
    first_loss = learner.loss(batch)[0].item()
    for _ in range(2):
        learner.update(batch)
    assert not torch.equal(learner.target_network[0].v, q[0].v)  # not yet synced
    learner.update(batch)
    assert torch.equal(learner.target_network[0].v, q[0].v)  # synced after 3 updates
    metrics = learner.read_metrics()
    assert set(metrics) == {"loss", "td_error_abs", "q_mean", "grad_norm", "target_mean"}
    assert metrics["grad_norm"] > 0
    assert learner.read_metrics() == {}
    for _ in range(50):
        learner.update(batch)
    assert learner.loss(batch)[0].item() < first_loss


def test_rewards_are_clipped_in_the_learner_only():
    from wn_rl import mlp

    q = mlp([4, 2], "normal")
    batch = _batch()
    batch.rewards.fill_(100.0)
    batch.terminals.fill_(True)
    clipped = Learner(q, AgentConfig(lr=1e-3, clip_rewards=True), False).loss(batch)[3]
    raw = Learner(q, AgentConfig(lr=1e-3, clip_rewards=False), False).loss(batch)[3]
    assert torch.allclose(clipped, torch.ones(8)) and torch.allclose(raw, torch.full((8,), 100.0))
