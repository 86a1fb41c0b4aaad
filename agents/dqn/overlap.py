"""The updates of one loop step, run while the envs step (``run.overlap_updates``).

The loop's order is: draw the random numbers of acting and of the updates this step owes, store the
previous step's transition, run the updates (sampling from the transitions stored so far), act on s_t
with the weights theta_t (from before these updates), step the envs; transition t is stored at the
start of the next step. The updates never read the transition being generated and the
action never depends on them, so they can run while the envs step without changing anything:

- ``inline`` (``auto`` on a GPU, and for MinAtar and gym envs): the loop's thread acts, sends the
  actions to the envs (:meth:`agents.dqn.envs.VecEnv.send`), runs the updates and then receives the
  step. Atari's emulators step in ale-py's C++ threads meanwhile: on a CPU while the host computes the
  updates, on a GPU while it queues their kernels (the actions are read back before they are queued)
  and the GPU runs them. MinAtar and gym envs step in ``recv``, after the updates.
- ``thread`` (``auto`` for Atari on a CPU with at least 2 cores): the updates run in a worker thread
  while the main thread acts and steps the envs. The main thread acts with a copy of the online
  network's weights taken after the previous updates finished (``actor``; the worker writes the online
  weights in place), so it sees exactly theta_t. The compiled update's C++ releases the GIL; Python's
  switch interval is shortened while the loop runs so the worker's few lines of Python do not wait
  5 ms for the main thread.

Both give bit-identical runs (``tests/test_dqn_overlap.py``): the same random draws in the same order,
the same weights for every action, the same minibatches.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from agents.dqn.learner import Learner
from agents.dqn.replay import ReplayMemory

__all__ = ["SWITCH_INTERVAL", "UpdateRunner", "resolve_acting", "resolve_overlap"]

SWITCH_INTERVAL = 1e-4  # seconds; Python's default 5 ms would serialise the worker behind the main thread


def resolve_overlap(setting: str, device: torch.device, suite: str = "atari") -> str:
    """``run.overlap_updates`` (``auto``, ``thread`` or ``inline``) -> ``thread`` or ``inline``. ``auto``: a
    worker thread for Atari on a CPU with at least 2 cores (the emulators' ~1 ms per vector step is worth
    hiding: 1.12x vs 1.03x SB3 on the 2-core CPU), inline elsewhere: for MinAtar and gym envs the env
    step is ~0.1 ms and the thread's hand-offs and weight copy cost as much (docs/benchmarks.md); a GPU
    overlaps by queueing."""
    if setting not in ("auto", "thread", "inline"):
        raise ValueError(f"run.overlap_updates must be auto, thread or inline, not {setting!r}")
    if setting == "auto":
        worth_it = device.type == "cpu" and suite == "atari" and (os.cpu_count() or 1) >= 2
        return "thread" if worth_it else "inline"
    return setting


def resolve_acting(setting: str, device: torch.device, overlap: str, learner: Learner) -> bool:
    """``run.acting`` (``auto``, ``in_update`` or ``separate``) -> whether a step's first update also picks
    the actions. Only compiled updates (not CUDA graphs) that run inline can; elsewhere the answer is
    ``separate``. ``auto``: on a CPU, where the eager acting forward of a small network costs more than its
    share of the compiled update (MinAtar: ~0.15-0.45 ms of a ~2 ms step); on a GPU the actions are read
    back before the update's kernels are queued, which lets the emulators step while they run."""
    if setting not in ("auto", "in_update", "separate"):
        raise ValueError(f"run.acting must be auto, in_update or separate, not {setting!r}")
    possible = learner.acts_in_update and overlap == "inline"
    if setting == "auto":
        return possible and device.type == "cpu"
    return possible and setting == "in_update"


class UpdateRunner:
    """Runs a loop step's updates (:meth:`start` ... :meth:`finish`) and provides the network to act with.

    ``thread``: :meth:`start` hands the updates to a worker thread and returns; :meth:`finish` waits
    for them (re-raising what they raised, e.g. :class:`agents.dqn.learner.NonFiniteError`). ``inline``:
    :meth:`start` only records them and :meth:`run_inline` runs them where the loop calls it.
    """

    def __init__(self, learner: Learner, replay: ReplayMemory, batch_size: int, mode: str) -> None:
        if mode not in ("thread", "inline"):
            raise ValueError(f"UpdateRunner mode must be 'thread' or 'inline', not {mode!r}")
        self.learner = learner
        self.replay = replay
        self.batch_size = batch_size
        self.mode = mode
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self._pending: list[Tensor] = []
        self._store: Callable[[], None] | None = None
        if mode == "thread":
            self.actor = copy.deepcopy(learner.q_network)
            for p in self.actor.parameters():
                p.requires_grad_(False)
            self._actor_tensors = [*self.actor.parameters(), *self.actor.buffers()]
            self._stale = True
        else:
            self.actor = learner.q_network

    @property
    def threaded(self) -> bool:
        return self.mode == "thread"

    def mark_changed(self) -> None:
        """The online weights changed outside the updates (data-dependent init, a checkpoint load)."""
        if self.threaded:
            self._stale = True

    def acting_network(self) -> nn.Module:
        """The network to act with: the online network, or (threaded) its copy, refreshed if it changed."""
        if self.threaded and self._stale:
            online = [*self.learner.q_network.parameters(), *self.learner.q_network.buffers()]
            with torch.no_grad():
                torch._foreach_copy_(self._actor_tensors, online)
            self.actor.train(self.learner.q_network.training)
            self._stale = False
        return self.actor

    def draw_uniforms(self, count: int) -> list[Tensor]:
        """The sampling draws of ``count`` updates, from the global generator, in the loop's thread (so the
        random stream is the same whether the updates run inline or in the worker)."""
        return [torch.rand(self.batch_size, device=self.replay.device) for _ in range(count)]

    def start(self, uniforms: list[Tensor], store: Callable[[], None] | None = None) -> None:
        """Begin the updates of this step (one per entry of ``uniforms``), after ``store`` (the previous
        step's replay write, deferred so that it too runs beside the env step)."""
        if not uniforms:
            if store is not None:
                store()
            return
        if self.threaded and self.learner.compiled_if_needed:
            self.acting_network()  # theta_t, copied before the worker starts writing theta_{t+1}
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="dqn-updates")
            self._future = self._pool.submit(self._run, uniforms, store)
        else:  # inline, or the first compiled call (compilation stays in the loop's thread)
            self._pending, self._store = uniforms, store

    def run_inline(self) -> None:
        """Run the updates :meth:`start` kept for the loop's thread now (no-op when there are none)."""
        pending, store = self._take_pending()
        if pending:
            self._run(pending, store)
            self.mark_changed()

    def run_inline_acting(self, obs: Tensor, draws: tuple[Tensor, Tensor]) -> Tensor | None:
        """Run the first pending update, which also picks the actions for ``obs`` (with the weights from
        before it; :meth:`agents.dqn.learner.Learner.act_sample_and_update`); the others stay for
        :meth:`run_inline`. Returns the actions, or ``None`` (nothing done) when no updates are pending."""
        pending, store = self._take_pending()
        if not pending:
            return None
        if store is not None:
            store()
        actions = self.learner.act_sample_and_update(self.replay, obs, draws, pending[0])
        self._pending = pending[1:]  # the step's other updates: run_inline, while the envs step
        return actions

    def _take_pending(self) -> tuple[list[Tensor], Callable[[], None] | None]:
        """The updates (and replay write) :meth:`start` kept for the loop's thread; forgets them here."""
        pending, store, self._pending, self._store = self._pending, self._store, [], None
        return pending, store

    def finish(self) -> None:
        """Wait for the worker's updates (re-raising their exception); inline: run any not yet run."""
        if self._future is not None:
            future, self._future = self._future, None
            self.mark_changed()  # the actor copies theta_{t+1} before the next action
            future.result()
        self.run_inline()

    def _run(self, uniforms: list[Tensor], store: Callable[[], None] | None = None) -> None:
        if store is not None:
            store()
        for u in uniforms:
            self.learner.sample_and_update(self.replay, self.batch_size, uniforms=u)

    def close(self) -> None:
        """Wait for running updates (without raising) and stop the worker thread."""
        self._drop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    @contextmanager
    def running(self) -> Iterator[None]:
        """Around the loop: the short switch interval while a worker may run; waits for it on the way out."""
        previous = sys.getswitchinterval()
        if self.threaded:
            sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            yield
        finally:
            self._drop()  # after an exception inside a step: the worker finishes first
            sys.setswitchinterval(previous)

    def _drop(self) -> None:
        """Wait for the worker's updates without raising; forget updates not yet run inline."""
        if self._future is not None:
            self._future.exception()
            self._future = None
        self._take_pending()
