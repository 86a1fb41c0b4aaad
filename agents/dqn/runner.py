"""The training loop: envs, device, replay, updates, evaluation, logs and checkpoints.

The math lives in :mod:`agents.dqn.learner`; this module only moves data between the env (host), the
replay memory and the networks (device), and writes what happened. Per vector step there is one host
synchronisation (the chosen actions go to the emulator); training metrics accumulate on the device and
are read once per ``run.log_every_agent_steps``.

Run directory (``runs/dqn/<name>``): ``config.yaml`` (resolved), ``provenance.json``, ``env.json``
(resolved protocol), ``tb/`` (TensorBoard events), ``results.json`` / ``results.csv`` (evaluation per
epoch and the paper's statistic) and ``checkpoints/``. Running the same command again resumes from the
newest complete checkpoint (networks, optimizer, counters, RNG, the replay memory when
``run.save_replay``, and the state of every game where the env can capture it: MinAtar and gymnasium's
own envs, see :mod:`agents.dqn.env_state`). With both, a resumed run is bit-identical to one that was
never interrupted (on a CPU, one thread); Atari's emulators cannot be saved, so there the games restart.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

import wn_rl
from agents.dqn.config import DQNConfig, config_dict
from agents.dqn.envs import EnvStateError, StepResult, VecEnv, make_env, protocol_settings
from agents.dqn.evaluation import (
    best_epoch_mean,
    evaluation_epoch,
    exploration_draws,
    explores_everywhere,
    make_eval_env,
    select_actions,
    write_results,
)
from agents.dqn.learner import Learner, NonFiniteError, epsilon_at
from agents.dqn.logs import log_dormant, log_evaluation, log_hyperparameters, log_train
from agents.dqn.networks import build_q_network, has_batch_statistics
from agents.dqn.nonfinite import EnvNonFiniteError, check_env_step, with_context
from agents.dqn.overlap import UpdateRunner, resolve_acting, resolve_overlap
from agents.dqn.progress import Clock, EpisodeTracker, progress_bar
from agents.dqn.replay import ReplayMemory
from agents.dqn.run_dir import SAFE_TO_CHANGE, check_resume_config, run_dir_for, write_run_files
from agents.dqn.run_state import (
    games_for_config,
    games_state,
    loop_state,
    restore_tracker,
    rng_state,
    seed_everything,
    set_rng_state,
)
from wn_rl.checkpoint import (
    CheckpointError,
    load_latest_checkpoint,
    prune_checkpoints,
    remove_incomplete,
    remove_temporaries,
    save_checkpoint,
    summary_writer,
)
from wn_rl.config import resolve_device
from wn_rl.signals import StopOnSignals

# SAFE_TO_CHANGE and run_dir_for live in agents.dqn.run_dir, EnvNonFiniteError in agents.dqn.nonfinite; they stay
# importable from here, their first home (wn_rl.analysis.study imports SAFE_TO_CHANGE from here).
__all__ = ["SAFE_TO_CHANGE", "EnvNonFiniteError", "Trainer", "pick_device", "run_dir_for"]

CREDIT_ROUNDING = 1e-9  # update credit this close below a whole number counts as reaching it (float sums of fractions)


def pick_device(name: str) -> torch.device:
    """``run.device``: ``auto`` -> cuda when available, else cpu; an explicit device is checked to exist."""
    return resolve_device(name, "run.device")


class Trainer:
    """Builds everything for one run from a :class:`DQNConfig` and runs the loop."""

    def __init__(self, config: DQNConfig, run_dir: str | Path, *, force: bool = False) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.device = pick_device(config.run.device)
        if config.run.torch_threads is not None:
            torch.set_num_threads(config.run.torch_threads)
        check_resume_config(self.run_dir, config, force)
        seed_everything(config.run.seed)
        self.env: VecEnv = make_env(config.env)
        self.spec = self.env.spec
        self.terminal_on_life_loss = self.spec.suite == "atari" and bool(
            protocol_settings(config.env)["terminal_on_life_loss"]
        )
        a = config.agent
        q_network = build_q_network(config.network, self.spec)
        if config.network.init == "torch_default":  # its own generator: the global stream stays as it was
            wn_rl.torch_default_init(q_network, generator=torch.Generator().manual_seed(config.run.seed))
        q_network = q_network.to(self.device)
        planned_updates = int((config.run.total_agent_steps - a.learning_starts_agent_steps) / a.agent_steps_per_update)
        self.learner = Learner(q_network, a, self.terminal_on_life_loss, planned_updates)
        self.replay = ReplayMemory(  # last: a network or update mode that cannot work fails before this allocation
            a.replay_capacity_transitions,
            self.spec.num_envs,
            self.spec.frame_shape,
            self.spec.frame_dtype,
            self.spec.stack,
            a.n_step,
            self.device,
        )
        self.switch_modes = has_batch_statistics(q_network)
        overlap = resolve_overlap(config.run.overlap_updates, self.device, self.spec.suite)
        self.update_runner = UpdateRunner(self.learner, self.replay, a.batch_size, overlap)
        self.act_in_update = resolve_acting(config.run.acting, self.device, overlap, self.learner)
        self.agent_step = 0
        self.update_credit = 0.0
        self.history: list[dict[str, Any]] = []
        self.tracker = EpisodeTracker(self.spec.num_envs)
        self.eval_env: VecEnv | None = None
        self.writer: SummaryWriter | None = None
        self.resumed_from: Path | None = None
        self.last_checkpoint: Path | None = None
        self.stop_signal: int | None = None  # set by SIGINT/SIGTERM: the loop stops after the current step
        self.learn_after = 0  # agent step before which no update runs (set when resuming without replay)
        self._saved_loop: dict[str, Any] | None = None  # the loop and games of the checkpoint resumed from
        self._env_state_problem: str | None = None  # why the games cannot be checkpointed (warned once)
        # data-dependent init done or not wanted (checked once, not per step)
        self._initialized = config.network.init != "data_dependent"
        self._unstored: Any = None  # the last step's replay write, done beside the next env step

    # ----- checkpoints, resume ----------------------------------------------------------------------
    def resume(self) -> bool:
        """Load the newest complete checkpoint of this run, if any. Returns whether one was loaded."""
        # mapped on the CPU: the RNG states must be CPU bytes (torch.set_rng_state), the game states become numpy,
        # and the replay memory is copied into the one already on the device (not loaded there a second time)
        found = load_latest_checkpoint(self.run_dir / "checkpoints", map_location="cpu", mmap=True)
        if found is None:
            return False
        path, state = found
        try:
            self.learner.load_state_dict(state["learner"])
            if "replay" in state:
                self.replay.load_state_dict(state["replay"])
        except (RuntimeError, ValueError, KeyError) as exc:  # a resume forced past the config check
            raise CheckpointError(
                f"{path} does not fit this run's config ({exc}). Resume with the run's saved config "
                f"({self.run_dir / 'config.yaml'}) or start a new run (run.name=...)."
            ) from exc
        self.update_runner.mark_changed()
        counters = state["counters"]
        self.agent_step = int(counters["agent_step"])
        self.update_credit = float(counters["update_credit"])
        self.tracker.episodes = int(counters["episodes"])
        self.learn_after = int(counters.get("learn_after", 0))
        self.history = list(state["history"])
        set_rng_state(state["rng"])
        self._saved_loop = games_for_config(state.get("loop"), state["config"], config_dict(self.config))
        self.resumed_from = self.last_checkpoint = path
        return True

    def save(self) -> Path:
        """Write a checkpoint of everything needed to continue (atomic; prunes old ones). Raises
        :class:`NonFiniteError` instead when a non-finite step was seen: such a state is never saved."""
        self.learner.raise_if_nonfinite()
        path = self.run_dir / "checkpoints" / f"checkpoint_{self.agent_step:012d}.pt"
        if path == self.last_checkpoint and path.is_file():
            # Written or loaded at this very step (a finished run rerun, a stop right after a resume): the
            # state is the same, and rewriting the file in place would open a window in which a kill leaves
            # it without a matching marker, so the run's newest checkpoint would be lost.
            return path
        self._store_pending()
        payload = {
            "learner": self.learner.state_dict(),
            "counters": {
                "agent_step": self.agent_step,
                "update_credit": self.update_credit,
                "episodes": self.tracker.episodes,
                "updates": self.learner.updates,
                "learn_after": self.learn_after,
            },
            "loop": self._loop_state(),
            "history": self.history,
            "rng": rng_state(),
            "config": config_dict(self.config),
            "env": {
                "n_actions": self.spec.n_actions,
                "obs_shape": list(self.spec.obs_shape),
                "suite": self.spec.suite,
                "name": self.spec.name,
            },
        }
        if self.config.run.save_replay:
            payload["replay"] = self.replay.state_dict()
        save_checkpoint(path, payload, metadata={"agent_step": self.agent_step, "updates": self.learner.updates})
        self.last_checkpoint = path
        prune_checkpoints(self.run_dir / "checkpoints", self.config.run.keep_checkpoints, written=path)
        return path

    def _loop_state(self) -> dict[str, Any]:
        """The loop's carried state and, when the envs can capture it, the games' states."""
        loop = loop_state(self._obs, self._first, self._final, self.tracker)
        try:
            loop.update(games_state(self.env, self.eval_env))
        except EnvStateError as exc:
            loop["games_missing"] = str(exc)
            if self._env_state_problem is None:
                self._env_state_problem = str(exc)
                warnings.warn(
                    f"checkpoints will not hold the games' state ({exc}); a resumed run starts fresh games",
                    stacklevel=3,
                )
        return loop

    def _continue_games(self) -> str | None:
        """Put back the games and the loop state saved with the checkpoint resumed from; returns why
        that was impossible (the caller then starts fresh games), or ``None``."""
        loop = self._saved_loop
        if loop is None:
            return "the checkpoint holds no game state: written by an older wn_rl"
        if "games" not in loop:
            restore_tracker(self.tracker, loop, games_continue=False)  # the finished episodes are still to be logged
            return f"the checkpoint holds no game state: {loop.get('games_missing', 'not saved')}"
        try:
            self.env.load_env_state(loop["games"])
            if "eval_games" in loop:
                self.eval_env = make_eval_env(self.config)
                self.eval_env.load_env_state(loop["eval_games"])
        except EnvStateError as exc:
            if self.eval_env is not None:  # possibly half restored: evaluation builds a new one
                self.eval_env.close()
                self.eval_env = None
            restore_tracker(self.tracker, loop, games_continue=False)
            return f"the saved game state does not fit this env: {exc}"
        self._obs = loop["obs"].to(self.device, copy=True)  # not a view of the mapped checkpoint file
        self._first, self._final = loop["first"].clone(), loop["final"].clone()
        restore_tracker(self.tracker, loop)
        return None

    # ----- the loop --------------------------------------------------------------------------------
    def _epsilon(self, agent_step: int) -> float:
        """Training exploration at ``agent_step`` (``agent.epsilon_*``)."""
        a = self.config.agent
        begin = a.learning_starts_agent_steps if a.epsilon_decay_after_learning_starts else 0
        return epsilon_at(agent_step, a.epsilon_start, a.epsilon_end, a.epsilon_decay_agent_steps, begin)

    def _act(self, obs: torch.Tensor, epsilon: float, draws: tuple | None = None) -> torch.Tensor:
        q = self.update_runner.acting_network()  # the online network's weights theta_t
        if self.switch_modes and epsilon < 1.0:
            q.eval()
            actions = select_actions(q, obs, epsilon, self.spec.n_actions, draws)
            q.train()
            return actions
        return select_actions(q, obs, epsilon, self.spec.n_actions, draws)

    def _act_in_update(self, draws: tuple) -> torch.Tensor | None:
        """The actions from the step's first update (``run.acting``), or ``None`` where they are chosen
        separately: acting not in the update, no update pending here, or no forward needed (epsilon 1,
        or every env explores, a free check on a CPU)."""
        if not self.act_in_update or explores_everywhere(draws[1], self.device):
            return None
        return self.update_runner.run_inline_acting(self._obs, draws)

    def _data_dependent_init(self) -> None:
        q = self.learner.q_network
        if self._initialized or wn_rl.is_initialized(q):
            self._initialized = True
            return
        self._initialized = True
        wanted = self.config.network.ddi_batch_size
        obs = self.replay.recent_observations(wanted)
        if obs.shape[0] < wanted:
            warnings.warn(
                f"data-dependent init on {obs.shape[0]} observations, not network.ddi_batch_size={wanted}: the replay "
                f"holds only {obs.shape[0]} complete transitions at the learning start (agent step "
                f"{self.agent_step:,}; {self.spec.num_envs} envs, n_step {self.config.agent.n_step}). Raise "
                "agent.learning_starts_agent_steps for a fuller init batch.",
                stacklevel=2,
            )
        report = wn_rl.data_dependent_init(q, obs)
        self.learner.sync_target()
        self.update_runner.mark_changed()
        for tag, value in report.scalars().items():
            self.writer.add_scalar(tag, value, self.agent_step)

    def _updates_owed(self, before: int, after: int) -> int:
        """Updates owed for the agent steps ``before..after`` that lie past the learning start; takes them
        from ``update_credit``."""
        a = self.config.agent
        start = max(a.learning_starts_agent_steps, self.learn_after)
        if after <= start:
            return 0
        self.update_credit += (after - max(before, start)) / a.agent_steps_per_update
        # a float running sum of fractions (3 / 2.5 per step) ends a hair below the whole number it should reach
        owed = int(self.update_credit + CREDIT_ROUNDING)
        self.update_credit = max(self.update_credit - owed, 0.0)
        return owed

    def _store_pending(self) -> None:
        """Write the transition the loop has not stored yet (it is stored beside the next step's env step)."""
        store, self._unstored = self._unstored, None
        if store is not None:
            store()

    def start(self) -> None:
        """Resume from the newest checkpoint if any, write the run files, open TensorBoard, reset the envs."""
        # left by a process killed while writing: checkpoints, and the run files' temporaries (config.yaml, ...)
        removed = remove_incomplete(self.run_dir / "checkpoints") + remove_temporaries(self.run_dir)
        if removed:
            print(f"removed {len(removed)} incomplete file(s) left by an interrupted write", flush=True)
        resumed = self.resume()
        # after the checkpoint loaded: a resume that fails keeps the run's config.yaml
        write_run_files(self.run_dir, self.config, self.spec, self.terminal_on_life_loss)
        # TensorBoard drops what an earlier process logged after the checkpoint (the steps redone now; all of
        # it when none was written); what it logged at the checkpoint's own step came before it and stays.
        purge_step = self.agent_step + 1 if resumed else 0
        self.writer = summary_writer(self.run_dir / "tb", purge_step)  # a full disk: CheckpointError naming it
        self._compiled_check_logged = False
        why_fresh = self._continue_games() if resumed else "a new run"
        if resumed:
            self._announce_resume(why_fresh)
        else:
            log_hyperparameters(self.writer, self.config, self.spec, self.device)
        if why_fresh is not None:
            self.replay.end_games()  # a loaded replay's games in progress end here, not in the new games
            n = self.spec.num_envs
            self._obs = torch.from_numpy(self.env.reset(seed=self.config.run.seed + self.agent_step)).to(self.device)
            self._first = torch.ones(n, dtype=torch.bool)
            self._final = torch.zeros(n, dtype=torch.bool)
        self._clock = Clock(self.agent_step)

    def _announce_resume(self, why_fresh: str | None) -> None:
        """Say where a resumed run continues (a warning and a TensorBoard text: the games, the replay), or,
        when its checkpoint already reached the budget, that there is nothing to train."""
        msg = f"resumed from {self.resumed_from} at agent step {self.agent_step:,}; "
        budget = self.config.run.total_agent_steps
        if self.agent_step >= budget:
            msg += f"the run is complete (run.total_agent_steps={budget:,}): nothing to train; raise it to continue"
            warnings.warn(msg, stacklevel=3)
            return
        msg += "the games continue" if why_fresh is None else f"envs restart with fresh games ({why_fresh})"
        if self.replay.writes == 0:
            self.learn_after = self.agent_step + self.config.agent.learning_starts_agent_steps
            msg += f"; the replay memory was not saved, so updates wait until agent step {self.learn_after:,}"
        warnings.warn(msg, stacklevel=3)
        self.writer.add_text("resume", msg, self.agent_step)

    def finish(self) -> None:
        """Final checkpoint; close TensorBoard, the update worker and the envs."""
        self.update_runner.close()
        self.save()
        self.writer.close()
        self.env.close()
        if self.eval_env is not None:
            self.eval_env.close()

    def run(self) -> dict[str, Any]:
        """Train until ``run.total_agent_steps``; returns a summary (steps, SPS, the paper's statistic).

        SIGINT/SIGTERM stop the loop after the current step; the final checkpoint is written and the
        summary's ``interrupted`` holds the signal number (a second SIGINT raises ``KeyboardInterrupt`` at
        once; the atomic writes leave the previous checkpoint intact). A non-finite loss, gradient,
        parameter or environment value raises with the agent step and the last good checkpoint."""
        self.start()
        start_step, t0 = self.agent_step, time.perf_counter()
        bar = progress_bar(self.config.run, self.agent_step)
        try:
            with StopOnSignals(self, "the current step"):
                self.advance(self.config.run.total_agent_steps, bar)
        except (NonFiniteError, EnvNonFiniteError) as exc:
            last = self.last_checkpoint or "none written yet"
            raise type(exc)(
                *with_context(exc, f"Agent step {self.agent_step:,}; last good checkpoint: {last}.")
            ) from exc
        finally:
            self.update_runner.close()
            self.writer.flush()
            if bar is not None:
                bar.close()
        elapsed = time.perf_counter() - t0
        with StopOnSignals(self, "the final save"):  # a signal while it writes: the write completes first
            self.finish()
        return {
            "agent_steps": self.agent_step,
            "updates": self.learner.updates,
            "episodes": self.tracker.episodes,
            "seconds": elapsed,
            "sps": (self.agent_step - start_step) / max(elapsed, 1e-9),
            "best_epoch_mean": best_epoch_mean(self.history) if self.history else None,  # JSON has no NaN
            "run_dir": str(self.run_dir),
            "interrupted": self.stop_signal,
            "checkpoint": str(self.last_checkpoint),
        }

    def advance(self, until_agent_step: int, bar: Any = None) -> None:
        """Act, store and learn until ``until_agent_step`` (call :meth:`start` first).

        Per vector step: draw acting's random numbers and the sampling uniforms of the updates owed, store
        the previous step's transition and run the updates (:mod:`agents.dqn.overlap`: inline, or in a
        worker while the main thread acts on s_t and steps the envs); this step's transition is stored at
        the start of the next one (or when the loop ends or a checkpoint is written)."""
        n = self.spec.num_envs
        with self.update_runner.running():
            while self.agent_step < until_agent_step and self.stop_signal is None:
                before = self.agent_step
                epsilon = self._epsilon(before)
                # Every random draw of the step before the updates start: the same stream inline or threaded.
                draws = exploration_draws(n, self.spec.n_actions, epsilon, self.device)
                owed = self._updates_owed(before, before + n)
                if owed and not self._initialized:
                    self._store_pending()
                    self._data_dependent_init()
                uniforms = self.update_runner.draw_uniforms(owed)
                store, self._unstored = self._unstored, None
                self.update_runner.start(uniforms, store)
                actions = self._act_in_update(draws)
                if actions is None:
                    actions = self._act(self._obs, epsilon, draws)
                actions_host = actions.cpu()  # read back before the updates' kernels are queued behind it
                step = self._step_envs(actions_host.numpy())
                check_env_step(step.obs, step.rewards, actions_host.numpy(), self.spec.name, before)
                done = step.terminated | step.truncated
                self.tracker.step(step.rewards, done, step.episode_start)
                self.update_runner.finish()
                self._unstored = functools.partial(
                    self.replay.add,
                    self._obs,
                    self._first,
                    self._final,
                    actions_host,
                    torch.from_numpy(step.rewards),
                    terminated=torch.from_numpy(step.terminated),
                    truncated=torch.from_numpy(step.truncated),
                    life_loss=torch.from_numpy(step.life_loss),
                )
                self._obs = torch.from_numpy(step.obs).to(self.device)
                self._first, self._final = torch.from_numpy(step.episode_start), torch.from_numpy(done)
                self.agent_step += n
                self._periodic(before, epsilon, self._clock, bar)
            self._store_pending()

    def _step_envs(self, actions: np.ndarray) -> StepResult:
        """Step the envs with ``actions`` and run the step's inline updates meanwhile: they are called
        between :meth:`VecEnv.send` and :meth:`VecEnv.recv`, so Atari's emulators step in ale-py's C++
        threads while the host computes them (CPU) or queues their kernels (GPU)."""
        self.env.send(actions)
        try:
            self.update_runner.run_inline()
        except BaseException:
            self.env.recv()  # the step in flight finishes before the error goes on
            raise
        return self.env.recv()

    def _periodic(self, before: int, epsilon: float, clock: Clock, bar: Any) -> None:
        r, step = self.config.run, self.agent_step

        def crossed(every: int) -> bool:
            return every > 0 and step // every > before // every

        if bar is not None:
            bar.update(step - before)
        if crossed(r.log_every_agent_steps) or step >= r.total_agent_steps:
            sps = clock.sps(step)
            self._log_train(epsilon, sps)
            if bar is not None:
                recent = np.mean(self.tracker.recent) if self.tracker.recent else math.nan
                bar.set_postfix(sps=f"{sps:.0f}", ret=f"{recent:.1f}", eps=f"{epsilon:.2f}")
        if crossed(r.wn_stats_every_agent_steps):
            for tag, value in wn_rl.wn_stats(self.learner.q_network).items():
                self.writer.add_scalar(tag, value, step)
            log_dormant(self.writer, self.learner.q_network, self.replay, step, tau=r.dormant_tau)
        if crossed(self.config.eval.every_agent_steps):
            self._evaluate()
        if crossed(r.checkpoint_every_agent_steps) and step < r.total_agent_steps:
            self.save()

    def _log_train(self, epsilon: float, sps: float) -> None:
        step, frames = self.agent_step, self.agent_step * self.config.frames_per_agent_step
        metrics, finished = self.learner.read_metrics(), self.tracker.drain()
        log_train(self.writer, step, metrics, finished, epsilon, self.learner.updates, sps, frames)
        check = self.learner.compiled_check  # the first compiled update against the eager one
        if check is not None and not self._compiled_check_logged:
            self.writer.add_text("compiled_check", json.dumps(check), step)
            self._compiled_check_logged = True

    def _evaluate(self) -> dict[str, Any]:
        if self.eval_env is None:
            self.eval_env = make_eval_env(self.config)
        q, epoch = self.learner.q_network, len(self.history) + 1
        result = evaluation_epoch(q, self.eval_env, self.config, epoch, self.agent_step, self.device)
        self.history.append(result)
        log_evaluation(self.writer, result, self.history, self.agent_step)
        write_results(self.run_dir, self.history)
        return result
