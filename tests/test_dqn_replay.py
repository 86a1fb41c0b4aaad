"""Replay memory: every sampled stack is the stack the env returned, across game boundaries, life
losses and the ring's wrap-around; n-step sequences and bootstrap observations are the right ones."""

import numpy as np
import pytest
import torch

from agents.dqn.config import EnvConfig
from agents.dqn.envs import make_env
from agents.dqn.replay import ReplayMemory, replay_bytes


def _add(replay, obs, first, final, actions, step):
    """Write one vector step (numpy, as the env returned it) into ``replay``."""
    replay.add(
        torch.from_numpy(obs),
        torch.from_numpy(first),
        torch.from_numpy(final),
        torch.from_numpy(actions),
        torch.from_numpy(step.rewards),
        terminated=torch.from_numpy(step.terminated),
        truncated=torch.from_numpy(step.truncated),
        life_loss=torch.from_numpy(step.life_loss),
    )


def _fill(env, replay, steps, seed=0):
    """Random play; returns the per-step observations and step results as the replay saw them."""
    rng = np.random.default_rng(seed)
    obs = env.reset(seed=seed)
    n = env.spec.num_envs
    first, final = np.ones(n, bool), np.zeros(n, bool)
    record = []
    for _ in range(steps):
        actions = rng.integers(0, env.spec.n_actions, n)
        step = env.step(actions)
        _add(replay, obs, first, final, actions, step)
        record.append((obs, final.copy(), step))
        first, final = step.episode_start, step.terminated | step.truncated
        obs = step.obs
    return record


@pytest.fixture(scope="module")
def atari_run():
    env = make_env(EnvConfig(suite="atari", name="breakout", num_envs=2, noop_max=5))
    replay = ReplayMemory(2 * 300, 2, env.spec.frame_shape, np.uint8, 4, 3, "cpu")
    record = _fill(env, replay, 900)
    env.close()
    return replay, record


def test_atari_run_covers_boundaries_life_losses_and_wraparound(atari_run):
    replay, record = atari_run
    assert replay.writes > replay.length  # wrapped around
    recent = record[-replay.length :]
    assert sum(int(s.terminated.sum()) for _, _, s in recent) >= 1  # a game over inside the memory
    assert sum(int(s.life_loss.sum()) for _, _, s in recent) >= 2  # life losses inside the memory
    assert sum(int(s.episode_start.sum()) for _, _, s in recent) >= 1


def _global_step(replay, slot):
    """The step whose observation slot ``slot`` holds (the memory holds the last ``length`` steps)."""
    newest = replay.writes - 1
    age = (replay.position - 1 - slot) % replay.length
    return newest - age


def test_every_valid_stack_equals_the_env_stack(atari_run):
    replay, record = atari_run
    valid = torch.nonzero(replay.valid_mask().flatten()).flatten()
    assert valid.numel() > 0.9 * len(replay) - 2 * 20
    slots, envs = valid // replay.num_envs, valid % replay.num_envs
    stacks = replay.stacks(slots, envs).numpy()
    for k, (slot, env) in enumerate(zip(slots.tolist(), envs.tolist(), strict=True)):
        obs, final, _ = record[_global_step(replay, slot)]
        assert not final[env]
        np.testing.assert_array_equal(stacks[k], obs[env])


def test_sampled_n_step_sequences_and_bootstrap_observations(atari_run):
    replay, record = atari_run
    torch.manual_seed(0)
    batch = replay.sample(512, terminal_on_life_loss=True)
    slots, envs = batch.indices // replay.num_envs, batch.indices % replay.num_envs
    for k in range(512):
        g, e = _global_step(replay, int(slots[k])), int(envs[k])
        np.testing.assert_array_equal(batch.obs[k].numpy(), record[g][0][e])
        offset = int(batch.next_offsets[k])
        np.testing.assert_array_equal(batch.next_obs[k].numpy(), record[g + offset][0][e])
        for j in range(replay.n_step):
            step = record[g + j][2]
            assert float(batch.rewards[k, j]) == float(step.rewards[e])
            assert bool(batch.terminals[k, j]) == bool(step.terminated[e] or step.life_loss[e])
            assert bool(batch.truncations[k, j]) == bool(step.truncated[e])
        ends = [j for j in range(replay.n_step) if batch.terminals[k, j] or batch.truncations[k, j]]
        assert offset == (ends[0] + 1 if ends else replay.n_step)
        assert int(batch.actions[k]) >= 0


class _Counter:
    """A fake vector env whose frame value is (env, step-in-episode) encoded, with known episode ends."""

    def __init__(self, lengths):
        from agents.dqn.envs import EnvSpec

        self.lengths = lengths  # episode length per env
        self.spec = EnvSpec("gym", "counter", len(lengths), (2,), 3, np.dtype(np.float32), 2, {})

    def reset(self, seed):
        self.t = np.zeros(len(self.lengths), int)
        self.ep = np.zeros(len(self.lengths), int)
        self.done = np.zeros(len(self.lengths), bool)
        self.hist = [[self._frame(i)] * 1 for i in range(len(self.lengths))]
        return self._obs(start=True)

    def _frame(self, i):
        return np.array([100 * self.ep[i] + self.t[i] + 1, i], np.float32)

    def _obs(self, start=False):
        out = []
        for i in range(len(self.lengths)):
            frames = self.hist[i][-3:]
            frames = [np.zeros(2, np.float32)] * (3 - len(frames)) + frames
            out.append(np.stack(frames))
        return np.stack(out)

    def step(self, actions):
        from agents.dqn.envs import StepResult

        n = len(self.lengths)
        start = self.done.copy()
        for i in range(n):
            if start[i]:
                self.t[i], self.ep[i] = 0, self.ep[i] + 1
                self.hist[i] = [self._frame(i)]
            else:
                self.t[i] += 1
                self.hist[i].append(self._frame(i))
        term = np.array([not start[i] and self.t[i] == self.lengths[i] and self.ep[i] % 2 == 0 for i in range(n)])
        trunc = np.array([not start[i] and self.t[i] == self.lengths[i] and self.ep[i] % 2 == 1 for i in range(n)])
        self.done = term | trunc
        rewards = (self.t + 1).astype(np.float32) * ~start
        return StepResult(self._obs(), rewards, term, trunc, np.zeros(n, bool), start)


def test_stacks_with_short_episodes_terminals_and_truncations():
    env = _Counter([2, 5, 1])
    replay = ReplayMemory(3 * 17, 3, (2,), np.float32, 3, 2, "cpu")
    record = _fill(env, replay, 60)
    valid = torch.nonzero(replay.valid_mask().flatten()).flatten()
    slots, envs = valid // 3, valid % 3
    stacks = replay.stacks(slots, envs).numpy()
    for k, (slot, e) in enumerate(zip(slots.tolist(), envs.tolist(), strict=True)):
        np.testing.assert_array_equal(stacks[k], record[_global_step(replay, slot)][0][e])
    batch = replay.gather(valid, terminal_on_life_loss=False)
    assert batch.truncations.any() and batch.terminals.any()
    # env 2 has one-step episodes: every transition ends at once and bootstraps from its final obs
    two = envs == 2
    assert (batch.next_offsets[two] == 1).all()


def test_memory_is_refused_with_numbers_before_allocating(monkeypatch):
    import agents.dqn.replay as replay_module

    monkeypatch.setattr(replay_module, "available_memory_bytes", lambda device: 10 * 2**30)
    with pytest.raises(MemoryError, match=r"needs 9\.88 GiB but cpu has 10\.00 GiB free"):
        ReplayMemory(1_500_000, 8, (84, 84), np.uint8, 4, 1, "cpu")


def test_one_million_atari_transitions_fit_in_7_5_gb():
    assert replay_bytes(1_000_000, 8, (84, 84), np.uint8) < 7.5e9


@pytest.mark.parametrize(
    ("capacity", "num_envs", "frame_shape", "dtype"), [(5000, 3, (2, 3), np.uint8), (999, 4, (4,), np.float32)]
)
def test_the_memory_check_predicts_what_is_allocated(capacity, num_envs, frame_shape, dtype):
    replay = ReplayMemory(capacity, num_envs, frame_shape, dtype, 1, 1, "cpu")
    storages = {  # every tensor the memory holds, views counted once; not the few indices of _older
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for name, t in vars(replay).items()
        if isinstance(t, torch.Tensor) and name != "_older"
    }
    assert replay.nbytes == sum(storages.values()) == replay_bytes(capacity, num_envs, frame_shape, dtype)


def test_incremental_validity_equals_the_rule_at_every_step():
    env = _Counter([2, 5, 1, 7])
    replay = ReplayMemory(4 * 13, 4, (2,), np.float32, 3, 2, "cpu")
    obs = env.reset(seed=0)
    first, final = np.ones(4, bool), np.zeros(4, bool)
    for _ in range(40):
        step = env.step(np.zeros(4, np.int64))
        _add(replay, obs, first, final, np.zeros(4, np.int64), step)
        first, final, obs = step.episode_start, step.terminated | step.truncated, step.obs
        assert torch.equal(replay.valid_mask(), replay.valid_mask_reference())


def test_life_loss_is_terminal_only_under_the_nature_protocol(atari_run):
    replay, _ = atari_run
    valid = torch.nonzero(replay.valid_mask().flatten()).flatten()
    nature = replay.gather(valid, terminal_on_life_loss=True)
    machado = replay.gather(valid, terminal_on_life_loss=False)
    slots, envs = valid // replay.num_envs, valid % replay.num_envs
    lost = replay.life_loss[slots, envs]
    assert lost.any()
    assert nature.terminals[lost, 0].all()
    assert not (machado.terminals[:, 0] & lost).any()
    # without the terminal, a life loss neither cuts the n-step sequence nor the bootstrap
    assert (machado.next_offsets[lost & ~machado.truncations[:, 0]] > 1).all()


def test_blocked_sampler_equals_a_cumulative_sum_over_the_whole_mask():
    """The two-level sampler picks the same slot as ``searchsorted(cumsum(valid))`` for every draw."""
    from agents.dqn.replay import SAMPLE_BLOCK

    replay = ReplayMemory(3 * SAMPLE_BLOCK + 300, 3, (2,), np.uint8, 1, 1, "cpu")  # last block padded
    g = torch.Generator().manual_seed(0)
    replay.valid.copy_(torch.rand(replay.valid.shape, generator=g) < 0.3)
    replay.valid[200:700] = False  # a stretch of empty blocks
    replay.recount_valid()
    u = torch.rand(4096, generator=g)
    u[:3] = torch.tensor([0.0, 0.5, 1.0 - 1e-7])
    flat = replay.valid.flatten()
    cumulative = torch.cumsum(flat, 0)
    ranks = (u * cumulative[-1]).long().clamp_max(cumulative[-1] - 1)
    expected = torch.searchsorted(cumulative, ranks, right=True)
    indices = replay.sample_indices(len(u), uniforms=u)
    assert torch.equal(indices, expected)
    assert flat[indices].all()


def _sample_by_summing_blocks(replay, u):
    """The sampler as it was before the block counts were kept: counts summed from the mask per draw."""
    from agents.dqn.replay import SAMPLE_BLOCK

    counts = replay._valid_blocks.sum(1)
    cumulative = torch.cumsum(counts, 0)
    ranks = (u * cumulative[-1]).long().clamp_max(cumulative[-1] - 1)
    block = torch.searchsorted(cumulative, ranks, right=True)
    within = ranks - (cumulative[block] - counts[block])
    inside = torch.cumsum(replay._valid_blocks[block], 1)
    return block * SAMPLE_BLOCK + torch.searchsorted(inside, within[:, None], right=True).squeeze(1)


@pytest.mark.parametrize(("stack", "n_step", "block"), [(3, 2, 8), (1, 3, 8), (4, 1, 5), (3, 2, 1024)])
def test_block_counts_stay_exact_through_episode_ends_and_wraparound(monkeypatch, stack, n_step, block):
    """The per-block valid counts kept by ``add`` equal a sum over the mask after every write (small
    blocks: rows straddle blocks and the written rows wrap around the ring), and the sampler draws the
    same indices as when it summed the mask itself; ``load_state_dict`` recounts them."""
    import agents.dqn.replay as replay_module

    monkeypatch.setattr(replay_module, "SAMPLE_BLOCK", block)
    env = _Counter([2, 5, 1])
    replay = ReplayMemory(3 * 17, 3, (2,), np.float32, stack, n_step, "cpu")
    obs = env.reset(seed=0)
    first, final = np.ones(3, bool), np.zeros(3, bool)
    g = torch.Generator().manual_seed(0)
    for _ in range(3 * replay.length):
        step = env.step(np.zeros(3, np.int64))
        frames = obs if stack > 1 else obs[:, -1]  # add() keeps only the newest frame
        _add(replay, frames, first, final, np.zeros(3, np.int64), step)
        first, final, obs = step.episode_start, step.terminated | step.truncated, step.obs
        assert torch.equal(replay._block_counts, replay._valid_blocks.sum(1))
        if replay.valid.any():
            u = torch.rand(64, generator=g)
            assert torch.equal(replay.sample_indices(64, uniforms=u), _sample_by_summing_blocks(replay, u))
    assert replay.writes > replay.length and final.any()  # wrapped around, with episode ends
    state = replay.state_dict()
    assert "_block_counts" not in state  # derived: checkpoints hold only the mask
    restored = ReplayMemory(3 * 17, 3, (2,), np.float32, stack, n_step, "cpu")
    restored.load_state_dict(state)
    assert torch.equal(restored._block_counts, replay._block_counts)
    assert any(t is replay._block_counts for t in replay.state_tensors())


def test_compiled_sampling_copies_atari_rows_and_equals_eager(atari_run):
    """Compiled on a CPU, Atari frames are gathered by the opaque ``take_rows`` copy (inductor's fused
    gather in channels-last order cost ~25 ms per minibatch); the batch equals the eager one."""
    from torch._inductor.utils import run_and_get_code

    replay, _ = atari_run
    u = torch.rand(32, generator=torch.Generator().manual_seed(3))

    def sample(uniforms):
        batch = replay.sample(32, True, uniforms=uniforms)
        return batch.obs.float() / 255, batch.next_obs.float() / 255, batch.rewards, batch.terminals

    compiled = torch.compile(sample, fullgraph=True, dynamic=False)
    got, codes = run_and_get_code(compiled, u)
    # on a CPU, inductor before torch 2.9 divides by a constant as a product with its reciprocal (1 ulp off)
    rtol = 0 if torch.__version__ >= (2, 9) else 2**-23
    for a, b in zip(got, sample(u), strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=0)
    assert any("take_rows" in code for code in codes)


@pytest.mark.parametrize("n_step", [1, 3])
def test_games_restarted_after_a_resume_are_cut_from_the_stored_ones(n_step):
    """A resumed run whose games could not be restored starts new ones after the loaded replay's newest
    slot: no transition or n-step sequence may bootstrap from the new games' first observations."""
    replay = ReplayMemory(3 * 30, 3, (2,), np.float32, 3, n_step, "cpu")
    old = _Counter([4, 6, 9])
    _fill(old, replay, 12)
    replay.end_games()  # the runner's fresh-games start, before the first write of the new games
    new = _Counter([5, 3, 7])  # told apart from the old games by write order (no wrap-around here)
    boundary = replay.writes
    _fill(new, replay, 10, seed=1)
    valid = torch.nonzero(replay.valid_mask().flatten()).flatten()
    batch = replay.gather(valid, terminal_on_life_loss=False)
    slots = (valid // replay.num_envs).numpy()
    next_slots = (slots + batch.next_offsets.numpy()) % replay.length
    crossing = (slots < boundary) & (next_slots >= boundary)
    assert not crossing.any(), valid[torch.from_numpy(crossing)]
    # what stays: the transition into the newest old observation bootstraps from it, as a time limit does
    last = boundary - 1
    assert replay.final[last].all() and (replay.truncated[last - 1] | replay.final[last - 1]).all()
