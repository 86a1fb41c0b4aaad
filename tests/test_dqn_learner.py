"""The TD math in isolation (float64): terminal vs truncation vs life loss, n-step, double DQN, the
epsilon schedule, and one update that changes the network and keeps metrics on the device."""

import copy

import numpy as np
import pytest
import torch

from agents.dqn.config import AgentConfig
from agents.dqn.learner import Learner, NonFiniteError, epsilon_at, n_step_returns, td_targets
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


def test_epsilon_decay_can_begin_when_learning_starts():
    # deep_q_rl (the paper's code): random acting until the replay start, the decay only from there
    assert epsilon_at(0, 1.0, 0.1, 1000, begin=200) == 1.0
    assert epsilon_at(200, 1.0, 0.1, 1000, begin=200) == 1.0
    assert epsilon_at(700, 1.0, 0.1, 1000, begin=200) == pytest.approx(0.55)
    assert epsilon_at(1200, 1.0, 0.1, 1000, begin=200) == pytest.approx(0.1)
    assert epsilon_at(5, 1.0, 0.1, 0, begin=200) == 0.1


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


def test_targets_come_from_a_folded_copy_kept_in_step_with_the_target_network():
    """The TD targets use the target network with its WN layers folded (no norms per update); the copy is
    refreshed in place at every sync and on a checkpoint load, and equals the target network's outputs."""
    from wn_rl import WNLayer, mlp

    torch.manual_seed(0)
    q = mlp([4, 16, 2], "weight_norm")
    learner = Learner(q, AgentConfig(lr=1e-2, target_update_every_updates=2, batch_size=8), terminal_on_life_loss=False)
    folded = learner.target_values
    assert not any(isinstance(m, WNLayer) for m in folded.modules())
    tensors = [t.data_ptr() for t in folded.state_dict().values()]
    x = torch.randn(32, 4)

    def agree():
        with torch.no_grad():
            torch.testing.assert_close(folded(x), learner.target_network(x), rtol=1e-5, atol=1e-6)

    agree()
    batch = _batch()
    before = folded(x).detach().clone()
    learner.update(batch)
    assert torch.equal(folded(x), before)  # not synced yet: the targets stand still
    learner.update(batch)  # second update: sync
    assert not torch.equal(folded(x), before)
    agree()
    state = copy.deepcopy(learner.state_dict())
    for _ in range(3):
        learner.update(batch)
    learner.load_state_dict(state)
    agree()
    assert [t.data_ptr() for t in folded.state_dict().values()] == tensors  # written in place
    plain = Learner(mlp([4, 16, 2], "normal"), AgentConfig(lr=1e-3), terminal_on_life_loss=False)
    assert plain.target_values is plain.target_network  # nothing to fold: no copy


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


@pytest.mark.parametrize(
    ("optimizer", "beta1", "beta2"),
    [("adam", 0.9, 0.999), ("adam", 0.5, 0.999), ("adamax", 0.5, 0.999), ("rmsprop", 0.9, 0.999)],
)
def test_step_bound_bounds_every_parameter_change(optimizer, beta1, beta2):
    """The CPU guard skips its copy of the state when lr * K cannot overflow: K must really bound |dp| / lr,
    here under gradients that jump over 12 orders of magnitude and flip sign."""
    from agents.dqn.optimizer import make_optimizer, step_bound

    config = AgentConfig(optimizer=optimizer, lr=1.0, beta1=beta1, beta2=beta2)
    bound = step_bound(config)
    p = torch.nn.Parameter(torch.zeros(1000, dtype=torch.float64))
    opt = make_optimizer([p], config)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for step in range(300):
        scale = 10.0 ** torch.randint(-6, 7, (1000,), generator=g).double()
        p.grad = torch.randn(1000, generator=g, dtype=torch.float64) * scale * (-1) ** step
        before = p.detach().clone()
        opt.step()
        worst = max(worst, (p.detach() - before).abs().max().item())
    assert 0.5 < worst <= bound


def test_cpu_guard_without_a_copy_gives_the_same_steps_and_still_undoes_an_overflow():
    from wn_rl import mlp

    torch.manual_seed(0)
    q = mlp([4, 16, 2], "weight_norm")
    fast = Learner(q, AgentConfig(lr=1e-2, batch_size=8), terminal_on_life_loss=False)
    slow = Learner(copy.deepcopy(q), AgentConfig(lr=1e-2, batch_size=8), terminal_on_life_loss=False)
    slow._host_checks = False  # always copy the state and select with torch.where, as on a GPU
    copies = []
    real_copy = torch._foreach_copy_
    for _ in range(5):
        for learner in (fast, slow):
            torch._foreach_copy_ = lambda dst, src, who=learner, **kw: copies.append(who) or real_copy(dst, src, **kw)
            try:
                learner.update(_batch())
            finally:
                torch._foreach_copy_ = real_copy
    assert copies.count(fast) == 1 and copies.count(slow) == 5  # fast: only before its first step
    for a, b in zip(fast.q_network.parameters(), slow.q_network.parameters(), strict=True):
        assert torch.equal(a, b)
    # lr * K near float32's limit: the step may overflow, so the state is copied and an overflow undone
    for group in fast.optimizer.param_groups:
        group["lr"] = 1e37
    real_step = fast.optimizer.step

    def overflowing_step():
        real_step()
        with torch.no_grad():
            next(fast.q_network.parameters()).view(-1)[0] = float("inf")

    fast.optimizer.step = overflowing_step
    before = [p.detach().clone() for p in fast.q_network.parameters()]
    fast.update(_batch())
    assert all(torch.equal(a, p) for a, p in zip(before, fast.q_network.parameters(), strict=True))
    with pytest.raises(NonFiniteError, match="parameters after the optimizer step"):
        fast.raise_if_nonfinite()


def test_a_learner_without_a_learning_rate_is_refused_with_the_fix():
    from wn_rl import mlp

    with pytest.raises(ValueError, match="explicit lr"):
        Learner(mlp([4, 8, 2], "normal"), AgentConfig(), terminal_on_life_loss=False)


@pytest.mark.parametrize("host_checks", [True, False])  # a CPU's skip, and the device's copy-and-select
def test_a_rejected_step_takes_back_the_batch_statistics_its_forward_moved(host_checks):
    """A non-finite batch through a network with batch norms moves their running statistics in the forward,
    before any check: the rejected step restores them with the parameters (they became NaN, and acting
    in eval mode then gave NaN Q-values)."""
    from wn_rl import mlp

    torch.manual_seed(0)
    learner = Learner(mlp([4, 16, 2], "batch_norm"), AgentConfig(lr=1e-2, batch_size=8), terminal_on_life_loss=False)
    learner._host_checks = host_checks
    learner.update(_batch())
    buffers = {n: b.clone() for n, b in learner.q_network.named_buffers() if b.is_floating_point()}
    params = [p.detach().clone() for p in learner.q_network.parameters()]
    bad = _batch()
    bad.obs[0, 0] = float("nan")
    learner.update(bad)
    for name, value in learner.q_network.named_buffers():
        if name in buffers:
            assert torch.equal(value, buffers[name]), name
    assert all(torch.equal(a, p) for a, p in zip(params, learner.q_network.parameters(), strict=True))
    with pytest.raises(NonFiniteError):
        learner.raise_if_nonfinite()
    learner.update(_batch())  # a good step after it moves them again
    assert any(not torch.equal(b, buffers[n]) for n, b in learner.q_network.named_buffers() if n in buffers)


@pytest.mark.parametrize("parameterization", ["batch_norm", "mean_only_bn", "weight_norm+mean_only_bn"])
def test_the_nature_network_is_built_in_training_mode(parameterization):
    """Its flattened size is probed in eval mode; the norm layers must not stay there (they would train on frozen
    statistics until something switched the whole network back)."""
    from agents.dqn.config import NetworkConfig
    from agents.dqn.envs import EnvSpec
    from agents.dqn.networks import build_q_network

    spec = EnvSpec("atari", "breakout", 1, (84, 84), 4, np.dtype(np.uint8), 4, {})
    q = build_q_network(NetworkConfig(parameterization=parameterization), spec)
    assert all(module.training for module in q.modules())
