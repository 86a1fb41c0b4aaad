"""Replay memory on the training device, each frame stored once.

Layout: ``L = capacity // N`` time slots for each of the N parallel envs, all envs written together
(one slot per vector step). Slot ``t`` of env ``e`` holds the newest frame of observation s_t, the
action a_t taken from it, the raw reward r_t and the flags of the transition s_t -> s_{t+1}
(terminated, truncated, life loss), plus two flags of s_t itself: ``first`` (s_t starts an episode)
and ``final`` (s_t is the last observation of an episode, so its action was ignored by the autoreset
and it starts no transition). The observation of slot t is frames t-S+1..t, with frames from before
the episode's first slot zeroed, which is exactly the stack the Atari env returns (it zero-pads the
stack at reset). So a sampled stack never mixes two games, and a 1M-transition Atari memory is
1M x 84 x 84 bytes (7.1 GB) instead of four times that.

Sampling is uniform over the valid transitions, entirely on the device, without host synchronisation:
the mask is cut into blocks of ``SAMPLE_BLOCK`` slots whose valid counts are kept up to date by
:meth:`ReplayMemory.add` (a write changes at most ``n_step + stack`` consecutive slot rows, so only the
one or two blocks holding them are recounted); a sampled rank picks a block by ``searchsorted`` over the
cumulative block counts, then its slot by a cumulative sum inside that one block. That is the same
index a cumulative sum over the whole mask would give, without reading the mask outside the sampled
blocks: a scan of a 100k memory cost ~1 ms per update on a CPU, a sum of it (the block counts
recomputed at every sample) ~0.15 ms. A slot is valid when it is not ``final``, its next ``n_step``
slots are written (the n-step return and bootstrap observation are present) and its stack has not
been overwritten by the ring's wrap-around.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["ReplayBatch", "ReplayMemory", "available_memory_bytes", "replay_bytes"]

_SCALARS = {"actions": torch.int32, "rewards": torch.float32}
SAMPLE_BLOCK = 1024  # slots per block of the two-level sampler
# Frames of at least this many elements are gathered by take_rows in compiled CPU graphs. Measured with
# acting, sampling and update compiled in one process (2-core CPU, batch 32): Atari's 84x84 frames 71 ms
# per update with take_rows against 99 ms fused; MinAtar's 4x10x10, where inductor's own gather reads
# within one row, 2.05 ms against 1.78 ms fused (an extern call costs more than that gather).
TAKE_ROWS_MIN_ELEMENTS = 4096
_FLAGS = ("terminated", "truncated", "life_loss", "first", "final")


# the schema written out: torch 2.4 cannot read it from this module's string annotations
@torch.library.custom_op("wn_rl::take_rows", mutates_args=(), schema="(Tensor table, Tensor index) -> Tensor")
def take_rows(table: Tensor, index: Tensor) -> Tensor:
    """``table.index_select(0, index)`` as an opaque op: inside a compiled CPU graph, inductor calls it (a
    copy of whole rows) instead of fusing the gather into its consumer. Fused there, the gather of an Atari
    minibatch's stacks runs in the channels-last order inductor picks for CPU convolutions: the four frames
    of a pixel come from four rows 7 kB apart, one scattered byte load per output element, which cost
    ~25 ms per update against ~0.3 ms for the copy (``scripts/bench_dqn_update.py --source replay``)."""
    return table.index_select(0, index)


@take_rows.register_fake
def _(table: Tensor, index: Tensor) -> Tensor:
    return table.new_empty((index.shape[0], *table.shape[1:]))


@dataclass
class ReplayBatch:
    """A minibatch for the learner. ``rewards``/``terminals``/``truncations`` are ``(B, n_step)``
    sequences starting at the sampled transition (raw rewards; terminals include life losses when they
    count as terminal); ``next_obs`` is the observation ``next_offsets`` steps later: ``n_step`` steps,
    or fewer where the episode ended first."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    terminals: Tensor
    truncations: Tensor
    next_obs: Tensor
    next_offsets: Tensor
    indices: Tensor


def replay_bytes(capacity: int, num_envs: int, frame_shape: tuple[int, ...], frame_dtype: np.dtype) -> int:
    """Bytes a :class:`ReplayMemory` of ``capacity`` transitions allocates (computed before allocating)."""
    slots = math.ceil(capacity / num_envs) * num_envs
    frame = int(np.prod(frame_shape)) * np.dtype(frame_dtype).itemsize
    scalars = sum(torch.empty((), dtype=d).element_size() for d in _SCALARS.values())
    blocks = math.ceil(slots / SAMPLE_BLOCK)  # the validity mask padded to whole blocks, and their counts
    return slots * (frame + scalars + len(_FLAGS)) + blocks * (SAMPLE_BLOCK + 8)


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA free memory, else the host's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class ReplayMemory:
    """Frame-deduplicated replay for N synchronous envs (see the module docstring)."""

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        frame_shape: tuple[int, ...],
        frame_dtype: np.dtype,
        stack: int,
        n_step: int,
        device: torch.device | str,
        *,
        headroom: float = 0.9,
    ) -> None:
        self.device = torch.device(device)
        self.num_envs, self.stack, self.n_step = num_envs, stack, n_step
        self.frame_shape = tuple(frame_shape)
        self.length = math.ceil(capacity / num_envs)
        if self.length < stack + n_step + 1:
            raise ValueError(
                f"replay capacity {capacity} gives {self.length} slots per env for {num_envs} envs; need at least "
                f"stack + n_step + 1 = {stack + n_step + 1}. Raise agent.replay_capacity_transitions."
            )
        need = replay_bytes(capacity, num_envs, frame_shape, frame_dtype)
        free = available_memory_bytes(self.device)
        if need > headroom * free:
            raise MemoryError(
                f"a replay memory of {capacity:,} transitions of frames {self.frame_shape} needs "
                f"{need / 2**30:.2f} GiB but {self.device} has {free / 2**30:.2f} GiB free ({headroom:.0%} usable); "
                "lower agent.replay_capacity_transitions or use another device."
            )
        torch_dtype = torch.from_numpy(np.zeros(0, dtype=frame_dtype)).dtype
        shape = (self.length, num_envs)
        self.frames = torch.zeros(*shape, *self.frame_shape, dtype=torch_dtype, device=self.device)
        for name, dtype in _SCALARS.items():
            setattr(self, name, torch.zeros(shape, dtype=dtype, device=self.device))
        for name in _FLAGS:
            setattr(self, name, torch.zeros(shape, dtype=torch.bool, device=self.device))
        # maintained by add(); a view of a buffer padded (with False) to whole sampling blocks
        blocks = math.ceil(self.length * num_envs / SAMPLE_BLOCK)
        self._valid_blocks = torch.zeros(blocks, SAMPLE_BLOCK, dtype=torch.bool, device=self.device)
        self.valid = self._valid_blocks.view(-1)[: self.length * num_envs].view(shape)
        self._block_counts = torch.zeros(blocks, dtype=torch.int64, device=self.device)  # valid slots per block
        self.position = 0  # next slot to write
        self.writes = 0  # vector steps written in total
        self._older = torch.arange(1, stack, device=self.device)  # slots whose stacks a write overwrites

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the memory allocated (what :func:`replay_bytes` predicts)."""
        tensors = [
            self.frames,
            self._valid_blocks,
            self._block_counts,
            *(getattr(self, n) for n in (*_SCALARS, *_FLAGS)),
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def __len__(self) -> int:
        """Transitions stored (slots written, summed over envs)."""
        return min(self.writes, self.length) * self.num_envs

    def add(self, obs: Tensor, first: Tensor, final: Tensor, actions: Tensor, rewards: Tensor, **flags: Tensor) -> None:
        """Write one vector step: observation s_t (``(N, *obs_shape)``; only its newest frame is stored),
        its ``first``/``final`` flags, the action and raw reward, and ``terminated``, ``truncated``,
        ``life_loss`` of the transition s_t -> s_{t+1}. Tensors may live on any device."""
        t = self.position
        frame = obs[:, -1] if self.stack > 1 else obs
        self.frames[t].copy_(frame, non_blocking=True)
        self.first[t].copy_(first, non_blocking=True)
        self.final[t].copy_(final, non_blocking=True)
        self.actions[t].copy_(actions, non_blocking=True)
        self.rewards[t].copy_(rewards, non_blocking=True)
        for name in ("terminated", "truncated", "life_loss"):
            self.__dict__[name][t].copy_(flags[name], non_blocking=True)
        self._update_valid(t)
        self.position = (t + 1) % self.length
        self.writes += 1

    def _update_valid(self, t: int) -> None:
        """Slot t has no successor yet; the S-1 oldest slots lost the start of their stacks; slot t-n now
        has its n successors. Equivalent to :meth:`valid_mask_reference`, in O(N) per write. The rows
        written are t-n..t+S-1 (mod L): the blocks holding them are recounted."""
        self.valid[t] = False
        if self.stack > 1:
            self.valid[(t + self._older) % self.length] = False
        if self.writes >= self.n_step:
            ready = (t - self.n_step) % self.length
            self.valid[ready] = ~self.final[ready]
        slots = self.length * self.num_envs
        start = (t - self.n_step) % self.length * self.num_envs
        stop = start + (self.n_step + self.stack) * self.num_envs  # past the end: wraps around to slot 0
        self._count_blocks(start // SAMPLE_BLOCK, (min(stop, slots) - 1) // SAMPLE_BLOCK + 1)
        if stop > slots:
            self._count_blocks(0, (stop - slots - 1) // SAMPLE_BLOCK + 1)

    def _count_blocks(self, first: int, end: int) -> None:
        """Recount the valid slots of blocks ``first..end-1`` (slices: no index tensor, no host sync)."""
        torch.sum(self._valid_blocks[first:end], 1, out=self._block_counts[first:end])

    def end_games(self) -> None:
        """Cut every env's game in progress at the newest stored slot, before the envs restart with new
        games (a resumed run whose games could not be restored). The observation after that slot was never
        stored, and the next write is another game's first: the newest observation becomes ``final`` (it
        starts no transition) and the transition into it a truncation (it bootstraps from that observation,
        and no n-step sequence runs on into the new game)."""
        if self.writes == 0:
            return
        newest = (self.position - 1) % self.length
        self.final[newest] = True
        self.valid[newest] = False
        if self.writes > 1:
            before = (newest - 1) % self.length
            self.truncated[before] |= ~self.final[before]
        self.recount_valid()

    def recount_valid(self) -> None:
        """Recount every block, after :attr:`valid` was written other than by :meth:`add`."""
        self._count_blocks(0, self._block_counts.numel())

    def valid_mask(self) -> Tensor:
        """``(L, N)`` bool: slots a transition may be sampled from (see the module docstring)."""
        return self.valid

    def valid_mask_reference(self) -> Tensor:
        """The validity rule computed from scratch (ages), for tests of the incremental mask."""
        ages = (self.position - 1 - torch.arange(self.length, device=self.device)) % self.length
        ok_age = (ages >= self.n_step) & (ages < self.writes) & (ages <= self.length - self.stack)
        return ok_age[:, None] & ~self.final

    def sample_indices(
        self, batch_size: int, generator: torch.Generator | None = None, uniforms: Tensor | None = None
    ) -> Tensor:
        """``batch_size`` flat indices ``slot * N + env``, uniform over valid slots, drawn on the device.
        ``uniforms``: the ``(batch_size,)`` U[0, 1) draws to use instead of drawing them here."""
        counts = self._block_counts
        cumulative = torch.cumsum(counts, 0)
        total = cumulative[-1]
        u = torch.rand(batch_size, device=self.device, generator=generator) if uniforms is None else uniforms
        ranks = (u * total).long().clamp_max(total - 1)  # the rank-th valid slot, counting from 0
        block = torch.searchsorted(cumulative, ranks, right=True)
        within = ranks - (cumulative[block] - counts[block])  # its rank inside the block
        inside = torch.cumsum(self._valid_blocks[block], 1)  # (B, SAMPLE_BLOCK)
        offset = torch.searchsorted(inside, within[:, None], right=True).squeeze(1)
        return block * SAMPLE_BLOCK + offset

    def stacks(self, slots: Tensor, envs: Tensor) -> Tensor:
        """Observations at ``slots`` (``(B,)``) of ``envs``: ``(B, S, *frame)`` stacks or ``(B, *frame)``."""
        if self.stack == 1:
            return self._frames_at(slots * self.num_envs + envs)
        offsets = torch.arange(self.stack - 1, -1, -1, device=self.device)  # oldest first
        idx = (slots[:, None] - offsets[None, :]) % self.length  # (B, S)
        frames = self._frames_at(idx * self.num_envs + envs[:, None])
        # A frame is from an earlier episode if some newer slot in the stack (not itself) starts an episode.
        first = self.first[idx, envs[:, None]].flip(1)  # newest first
        started = torch.cumsum(first.int(), 1) - first.int() > 0
        keep = ~started.flip(1)
        return frames * keep.view(*keep.shape, *([1] * len(self.frame_shape))).to(frames.dtype)

    def _frames_at(self, flat_indices: Tensor) -> Tensor:
        """Frames at flat ``slot * N + env`` indices of any shape, as ``(*indices.shape, *frame)``.

        ``index_select`` on the flattened memory: on a CPU it copies whole rows (16x faster than the
        same advanced indexing ``frames[slots, envs]`` for an Atari minibatch). Compiled on a CPU, large
        frames go through :func:`take_rows` so that the gather stays a copy of rows."""
        table, index = self.frames.view(self.length * self.num_envs, -1), flat_indices.reshape(-1)
        if torch.compiler.is_compiling() and table.device.type == "cpu" and table.shape[1] >= TAKE_ROWS_MIN_ELEMENTS:
            rows = take_rows(table, index)
        else:
            rows = table.index_select(0, index)
        return rows.view(*flat_indices.shape, *self.frame_shape)

    def gather(self, indices: Tensor, terminal_on_life_loss: bool) -> ReplayBatch:
        """The minibatch at ``indices`` with ``n_step`` reward/terminal sequences and the bootstrap
        observation (n steps later, or the episode's final observation if it ends sooner)."""
        slots, envs = indices // self.num_envs, indices % self.num_envs
        steps = (slots[:, None] + torch.arange(self.n_step, device=self.device)[None, :]) % self.length
        e = envs[:, None]
        terminals = self.terminated[steps, e]
        if terminal_on_life_loss:
            terminals = terminals | self.life_loss[steps, e]
        truncations = self.truncated[steps, e]
        ended = terminals | truncations
        # Bootstrap from the observation after the first end, or n steps later.
        if self.n_step == 1:
            next_offsets = torch.ones_like(slots)
        else:
            next_offsets = torch.where(ended.any(1), ended.float().argmax(1), self.n_step - 1) + 1
        next_slots = (slots + next_offsets) % self.length
        return ReplayBatch(
            obs=self.stacks(slots, envs),
            actions=self.actions[slots, envs].long(),
            rewards=self.rewards[steps, e],
            terminals=terminals,
            truncations=truncations,
            next_obs=self.stacks(next_slots, envs),
            next_offsets=next_offsets,
            indices=indices,
        )

    def sample(
        self,
        batch_size: int,
        terminal_on_life_loss: bool,
        generator: torch.Generator | None = None,
        uniforms: Tensor | None = None,
    ) -> ReplayBatch:
        return self.gather(self.sample_indices(batch_size, generator, uniforms), terminal_on_life_loss)

    def recent_observations(self, count: int) -> Tensor:
        """Up to ``count`` stored observations from valid slots, spread over the memory (for
        data-dependent init on real observations)."""
        valid = torch.nonzero(self.valid_mask().flatten()).flatten()
        if valid.numel() == 0:
            raise RuntimeError("the replay memory holds no complete observation yet; fill it before sampling")
        pick = valid[torch.linspace(0, valid.numel() - 1, min(count, valid.numel()), device=self.device).long()]
        return self.stacks(pick // self.num_envs, pick % self.num_envs)

    def state_tensors(self) -> list[Tensor]:
        """The storage tensors (written in place by :meth:`add`; never reallocated)."""
        return [getattr(self, name) for name in ("frames", "valid", "_block_counts", *_SCALARS, *_FLAGS)]

    def state_dict(self) -> dict:
        """Tensors and plain counters, for ``wn_rl.checkpoint`` (``torch.load(weights_only=True)``). The
        block counts are left out: derived from ``valid``, recounted on load."""
        state = {name: getattr(self, name) for name in ("frames", "valid", *_SCALARS, *_FLAGS)}
        state.update(position=self.position, writes=self.writes, length=self.length, num_envs=self.num_envs)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["length"] != self.length or state["num_envs"] != self.num_envs:
            raise ValueError(
                f"saved replay has {state['length']} slots x {state['num_envs']} envs, this one "
                f"{self.length} x {self.num_envs}; the capacity or env.num_envs changed since the checkpoint."
            )
        for name in ("frames", "valid", *_SCALARS, *_FLAGS):
            getattr(self, name).copy_(state[name])
        self.recount_valid()
        self.position, self.writes = int(state["position"]), int(state["writes"])
