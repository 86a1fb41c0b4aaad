"""The loop layer of ``scripts/train_sb3.py``: build env and model (or load one to resume), attach the
callbacks, train, save. See :mod:`wn_rl.sb3.config` for the config and the run-directory layout."""

from __future__ import annotations

import importlib.util
import io
import json
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
from stable_baselines3.common.logger import TensorBoardOutputFormat
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv
from tensorboard.compat.proto.event_pb2 import Event, SessionLog

from wn_rl.checkpoint import atomic_write_bytes, name_write_errors, remove_temporaries
from wn_rl.config import ConfigError, config_diff, config_to_dict, dump_yaml, flatten_config, read_run_config
from wn_rl.sb3.callbacks import DataDependentInitCallback, WnStatsCallback
from wn_rl.sb3.checkpoints import (
    AtomicCheckpointCallback,
    final_buffer_belongs,
    latest_model,
    latest_saved_model,
    replay_buffer_path,
    save_model_atomically,
    save_replay_buffer_atomically,
)
from wn_rl.sb3.common import WnPolicyOptions
from wn_rl.sb3.config import ALGORITHMS, SB3Config, build_hyperparameters, build_policy_kwargs, resolve_policy
from wn_rl.sb3.envs import make_env
from wn_rl.sb3.guard import NonFiniteGuardCallback
from wn_rl.sb3.init import has_init_flags, torch_default_init_policy
from wn_rl.signals import StopOnSignals

# AtomicCheckpointCallback and latest_model live in wn_rl.sb3.checkpoints; they stay importable from here, their
# first home (wn_rl.analysis.runs cites wn_rl.sb3.runner.latest_model).
__all__ = ["SAFE_TO_CHANGE", "AtomicCheckpointCallback", "SB3Run", "latest_model", "run_dir_for"]

SAFE_TO_CHANGE = (
    "total_timesteps",
    "log_interval",
    "checkpoint_freq",
    "wn_stats_freq",
    "dormant",
    "dormant_tau",
    "eval.freq",
    "progress_bar",
    "verbose",
    "device",
    "torch_threads",
    "runs_dir",
)

TB_LOG_NAME = "tb"


def run_dir_for(config: SB3Config) -> Path:
    """``runs_dir/run_name``, or ``runs_dir/<env>__<algo>__<policy>__<seed>__<unix time>`` by default."""
    default = f"{config.env_id.replace('/', '-')}__{config.algo}__{config.policy}__{config.seed}__{int(time.time())}"
    return Path(config.runs_dir) / (config.run_name or default)


class ResumableEvalCallback(EvalCallback):
    """SB3's ``EvalCallback`` for runs that can be killed and resumed, writing into ``eval_dir``:

    - ``evaluations.npz`` and ``best_model.zip`` are written atomically (temp file, fsync, rename), so a kill
      or a full disk leaves the previous file, never a truncated one;
    - a resumed run continues the evaluations it finds there instead of overwriting them with its own,
      and keeps the best mean return so far, so a worse model does not replace ``best_model.zip``.
      Evaluations recorded after the resumed model's step (the run was killed after them, before its next
      checkpoint) are dropped: the resumed run evaluates those steps again."""

    def __init__(self, eval_env: Any, eval_dir: Path, **kwargs: Any) -> None:
        super().__init__(eval_env, log_path=str(eval_dir), best_model_save_path=None, **kwargs)
        self.eval_dir = Path(eval_dir)
        self.evaluations_path = self.eval_dir / "evaluations.npz"

    def _init_callback(self) -> None:
        super()._init_callback()  # makes eval_dir (SB3: the folder of log_path)
        # a resumed run evaluates at the steps a run without a break does (SB3 counts eval_freq in calls)
        self.n_calls = self.model.num_timesteps // self.model.n_envs
        if self.evaluations_path.is_file():
            self._continue(self.model.num_timesteps)

    def _continue(self, num_timesteps: int) -> None:
        try:
            with np.load(self.evaluations_path) as data:
                history = {key: data[key].tolist() for key in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            warnings.warn(f"{self.evaluations_path} is unreadable ({exc}); evaluations start afresh", stacklevel=2)
            return
        if history["results"]:
            self.best_mean_reward = max(float(np.mean(r)) for r in history["results"])
        keep = [i for i, t in enumerate(history["timesteps"]) if t <= num_timesteps]
        self.evaluations_timesteps = [history["timesteps"][i] for i in keep]
        self.evaluations_results = [history["results"][i] for i in keep]
        self.evaluations_length = [history["ep_lengths"][i] for i in keep]
        if "successes" in history:
            self.evaluations_successes = [history["successes"][i] for i in keep]

    def _on_step(self) -> bool:
        best = self.best_mean_reward
        # SB3 writes the evaluations with np.savez(self.log_path, ...), which takes a file object: into memory,
        # then one atomic write (a full disk: CheckpointError naming the file, the previous one intact)
        self.log_path = io.BytesIO()  # type: ignore[assignment]
        continue_training = super()._on_step()
        if self.log_path.tell():
            atomic_write_bytes(self.evaluations_path, self.log_path.getvalue())
        if self.best_mean_reward > best:
            save_model_atomically(self.model, self.eval_dir / "best_model.zip")
        return continue_training


class ResumableMaskableEvalCallback(ResumableEvalCallback, MaskableEvalCallback):
    """:class:`ResumableEvalCallback` for MaskablePPO: the evaluation episodes act with the eval env's action
    masks, as training does (SB3's ``evaluate_policy`` would let the policy pick invalid actions)."""


class _StopOnSignal(BaseCallback):
    """SIGINT/SIGTERM end ``learn`` after the current step (the final model is then saved atomically); a second
    SIGINT raises ``KeyboardInterrupt`` at once (:class:`wn_rl.signals.StopOnSignals`, as the native loops)."""

    def __init__(self) -> None:
        super().__init__()
        self.stop_signal: int | None = None
        self._handlers = StopOnSignals(self, "the current step")

    def _on_training_start(self) -> None:
        self._handlers.__enter__()

    def _on_training_end(self) -> None:
        self._handlers.__exit__(None, None, None)

    def _on_step(self) -> bool:
        return self.stop_signal is None


class _HyperparameterText(BaseCallback):
    """Write the config as a text table to TensorBoard at training start (CleanRL's habit)."""

    def __init__(self, config: SB3Config) -> None:
        super().__init__()
        self.config = config

    def _on_training_start(self) -> None:
        rows = flatten_config(config_to_dict(self.config))
        table = "|key|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in rows.items())
        self.logger.record("hyperparameters", table, exclude=("stdout", "log", "json", "csv"))

    def _on_step(self) -> bool:
        return True


class _TensorBoardLog(BaseCallback):
    """At training start, over SB3's TensorBoard writers: a failed write (a full disk) becomes a
    :class:`~wn_rl.checkpoint.CheckpointError` naming the event file (:func:`wn_rl.checkpoint.name_write_errors`),
    and a resumed run purges what a killed earlier process logged after the resumed model's step (TensorBoard
    drops events from the purge step on, as the native DQN's ``SummaryWriter(purge_step=...)`` does)."""

    def __init__(self, resumed: bool) -> None:
        super().__init__()
        self.resumed = resumed

    def _on_training_start(self) -> None:
        for output in self.logger.output_formats:
            if isinstance(output, TensorBoardOutputFormat):
                name_write_errors(output.writer)
                if self.resumed:  # what was logged at the model's own step came before it was saved and stays
                    restart = SessionLog(status=SessionLog.START)
                    output.writer.file_writer.add_event(Event(step=self.model.num_timesteps + 1, session_log=restart))

    def _on_step(self) -> bool:
        return True


class SB3Run:
    """One training run: ``SB3Run(config, run_dir).train()``; ``resume=True`` continues the newest
    complete model in ``run_dir`` with its step counter (and replay buffer, if one was saved)."""

    def __init__(self, config: SB3Config, run_dir: Path, *, resume: bool = False, force: bool = False) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.stop = _StopOnSignal()
        self.guard = NonFiniteGuardCallback(self._last_good_model)
        self.checkpoints: AtomicCheckpointCallback | None = None
        if resume:
            self._check_resume_config(force)
        elif (self.run_dir / "config.yaml").is_file():
            raise ConfigError(
                f"{self.run_dir} already holds a run: a new one there would mix its checkpoints with the old ones "
                f"(and --resume could pick an old one). Continue it with --resume {self.run_dir}, or start a new "
                "run with another run_name."
            )
        latest = latest_saved_model(self.run_dir) if resume else None
        self.resume_from, self.resume_steps = (latest[1], latest[0]) if latest else (None, None)
        # a run stopped before it saved any model: it trains again from step 0 in its own directory, dropping
        # what it logged and evaluated before (as the native DQN's rerun of a run without a checkpoint)
        self.restart = resume and self.resume_from is None
        if self.restart and not (self.run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {self.run_dir}: no run here (no config.yaml, checkpoint or final model)")
        if self.restart:
            print(f"{self.run_dir} stopped before it saved a model: training it again from step 0", flush=True)
        if config.progress_bar and (
            importlib.util.find_spec("rich") is None or importlib.util.find_spec("tqdm") is None
        ):
            raise ConfigError(
                "progress_bar=true needs tqdm and rich (pip install -e '.[sb3]'); or set progress_bar=false"
            )

    def _last_good_model(self) -> Path | None:
        """The newest model saved by this run, or the one it resumed from."""
        if self.checkpoints is not None and self.checkpoints.last_path is not None:
            return self.checkpoints.last_path
        return self.resume_from

    def _check_resume_config(self, force: bool) -> None:
        """Refuse to resume with a config that differs from the run's ``config.yaml`` in any key outside
        :data:`SAFE_TO_CHANGE`, unless ``force``."""
        if not (self.run_dir / "config.yaml").is_file():
            return
        old = read_run_config(self.run_dir, "scripts/train_sb3.py")  # empty or damaged: a ConfigError naming it
        diff = {k: v for k, v in config_diff(old, config_to_dict(self.config)).items() if k not in SAFE_TO_CHANGE}
        if diff and not force:
            lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(
                f"{self.run_dir} holds a run with a different config:\n{lines}\n"
                "Resume with the saved config, start a new run (run_name=...), or pass --force to resume anyway."
            )

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.run_dir / "config.yaml", dump_yaml(config_to_dict(self.config)).encode())
        try:
            from wn_rl.provenance import provenance
        except ImportError:  # provenance is optional: older checkouts lack it
            return
        atomic_write_bytes(self.run_dir / "provenance.json", json.dumps(provenance(), indent=1, default=str).encode())

    def _make_env(self, n_envs: int, seed: int, subprocess: bool = False) -> VecEnv:
        config = self.config
        return make_env(
            config.env_id,
            n_envs,
            seed,
            env_kwargs=config.env_kwargs,
            atari_wrapper_kwargs=config.atari_wrapper_kwargs,
            frame_stack=config.frame_stack,
            subprocess=subprocess,
        )

    def _make_model(self, env: VecEnv) -> BaseAlgorithm:
        config = self.config
        algo_class = ALGORITHMS[config.algo]
        kwargs = build_hyperparameters(config)
        if config.action_noise_std > 0:
            n = env.action_space.shape[-1]
            kwargs["action_noise"] = NormalActionNoise(np.zeros(n), config.action_noise_std * np.ones(n))
        if self.resume_from is not None:
            # the run directory, not the one saved in the model (a run that was moved or copied, a relative
            # runs_dir resumed from another working directory): SB3 would log, and purge, there
            # verbose is safe to change on resume (SAFE_TO_CHANGE), and load would keep the saved model's
            model = algo_class.load(
                self.resume_from,
                env=env,
                device=config.device,
                tensorboard_log=str(self.run_dir),
                verbose=config.verbose,
                **kwargs,
            )
            buffer_path = replay_buffer_path(self.resume_from)
            if buffer_path.is_file() and isinstance(model, OffPolicyAlgorithm):
                if self.resume_from.name == "final_model.zip" and not final_buffer_belongs(self.run_dir):
                    warnings.warn(
                        f"{buffer_path} was not saved with {self.resume_from} (a later final save stopped half way, "
                        "or ran without save_replay_buffer): resuming with an empty replay buffer",
                        stacklevel=2,
                    )
                    return model
                with warnings.catch_warnings():  # HER's: a resumed run starts new episodes, so truncating is right
                    warnings.filterwarnings("ignore", "The last trajectory in the replay buffer will be truncated")
                    model.load_replay_buffer(buffer_path)
            return model
        policy, policy_kwargs = resolve_policy(config.algo, config.policy), build_policy_kwargs(config)
        try:
            model = algo_class(
                policy,
                env,
                policy_kwargs=policy_kwargs,
                seed=config.seed,
                device=config.device,
                verbose=config.verbose,
                tensorboard_log=str(self.run_dir),
                **kwargs,
            )
        # SB3 checks some arguments with assert; a list or mapping of the wrong length or keys (optimizer_kwargs,
        # net_arch) fails in the policy or torch with an IndexError or KeyError
        except (TypeError, ValueError, AssertionError, IndexError, KeyError) as exc:
            raise ConfigError(
                f"{algo_class.__name__} with policy={config.policy} and env_id={config.env_id} rejects this config "
                f"(check policy_kwargs {sorted(config.policy_kwargs)} and hyperparameters "
                f"{sorted(config.hyperparameters)}): {type(exc).__name__}: {exc}"
            ) from exc
        if config.init.enabled and config.init.method == "torch_default":  # a resumed model keeps its weights
            torch_default_init_policy(model.policy, generator=th.Generator().manual_seed(config.seed))
        return model

    def _build(self) -> tuple[VecEnv, BaseAlgorithm]:
        """The env and the model; an env, policy or hyperparameter that gym or the algorithm rejects is a
        :class:`ConfigError`, raised before the run directory is written."""
        config = self.config
        try:
            env = self._make_env(config.n_envs, config.seed, subprocess=config.subprocess_envs)
        except (gym.error.Error, TypeError, ValueError) as exc:
            raise ConfigError(f"env_id={config.env_id!r} with env_kwargs={config.env_kwargs}: {exc}") from exc
        try:
            return env, self._make_model(env)
        except ConfigError:
            env.close()
            raise

    def _callbacks(self, model: BaseAlgorithm) -> list[BaseCallback]:
        config = self.config
        callbacks: list[BaseCallback] = [
            self.stop,
            self.guard,
            _TensorBoardLog(self.resume_from is not None or self.restart),
            _HyperparameterText(config),
        ]
        wn_policy = has_init_flags(model.policy)
        if config.init.data_dependent and wn_policy:
            callbacks.append(DataDependentInitCallback(config.init.n_samples, verbose=config.verbose))
        if config.wn_stats_freq and wn_policy:
            callbacks.append(
                WnStatsCallback(config.wn_stats_freq, dormant=config.dormant, dormant_tau=config.dormant_tau)
            )
        if config.checkpoint_freq:
            self.checkpoints = AtomicCheckpointCallback(
                config.checkpoint_freq,
                self.run_dir / "checkpoints",
                config.save_replay_buffer,
                verbose=config.verbose,
                guard=self.guard,
            )
            callbacks.append(self.checkpoints)
        if config.eval.freq:
            eval_env = self._make_env(1, config.seed + 10_000)
            eval_class = ResumableMaskableEvalCallback if isinstance(model, MaskablePPO) else ResumableEvalCallback
            callbacks.append(
                eval_class(
                    model._wrap_env(eval_env, verbose=0),
                    self.run_dir / "eval",
                    n_eval_episodes=config.eval.episodes,
                    eval_freq=max(config.eval.freq // config.n_envs, 1),
                    deterministic=config.eval.deterministic,
                    verbose=config.verbose,
                )
            )
        return callbacks

    def _complete_at(self) -> int | None:
        """The step count of the resumed run when its final save completed (``final_steps.json`` written after
        ``final_model.zip``) at or past ``total_timesteps``, else ``None``. A run stopped at its budget before the
        final save resumes from a checkpoint instead, and is loaded to write the final model it lacks."""
        if self.resume_from is None or self.resume_from.name != "final_model.zip":
            return None
        steps = self.resume_steps  # final_steps.json's count, read when the model was found
        return steps if steps is not None and steps >= self.config.total_timesteps else None

    def _say_complete(self, steps: int, unchanged: bool) -> None:
        note = " (the run directory is left unchanged)" if unchanged else ""
        print(
            f"resumed from {self.resume_from} at step {steps:,}; the run is complete (total_timesteps="
            f"{self.config.total_timesteps:,}): nothing to train; raise total_timesteps to continue{note}",
            flush=True,
        )

    def _learn(self, model: BaseAlgorithm, steps: int) -> float:
        """``model.learn`` for ``steps`` more environment steps with the run's callbacks; the seconds it took."""
        config = self.config
        learn_kwargs = {"log_interval": config.log_interval} if config.log_interval else {}
        started = time.perf_counter()
        if not config.init.data_dependent and isinstance(model.policy, WnPolicyOptions):
            # no data-dependent init on purpose: told to this policy, not to the process's warning filters (threads)
            model.policy.allow_fresh_init()
        try:
            model.learn(
                steps,
                callback=CallbackList(self._callbacks(model)),
                tb_log_name=TB_LOG_NAME,
                reset_num_timesteps=self.resume_from is None and not self.restart,  # a restart: its own log
                progress_bar=config.progress_bar,
                **learn_kwargs,
            )
        finally:
            self.stop._on_training_end()  # restore the signal handlers when learn raised
        seconds = time.perf_counter() - started
        self.guard.check()  # never save a model after a non-finite step
        return seconds

    def _save_final(self, model: BaseAlgorithm) -> None:
        """The replay buffer (if asked), ``final_model.zip``, then ``final_steps.json``, each atomically."""
        buffer_sha256 = None  # recorded, so a resume can tell a buffer from an unfinished later save
        if self.config.save_replay_buffer and isinstance(model, OffPolicyAlgorithm):
            buffer_sha256 = save_replay_buffer_atomically(model, replay_buffer_path(self.run_dir / "final_model.zip"))
        save_model_atomically(model, self.run_dir / "final_model.zip")
        steps = {"num_timesteps": model.num_timesteps, "replay_buffer_sha256": buffer_sha256}
        atomic_write_bytes(self.run_dir / "final_steps.json", json.dumps(steps).encode())

    def _summary(self, start_steps: int, num_timesteps: int, seconds: float) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "start_timesteps": start_steps,
            "num_timesteps": num_timesteps,
            "seconds": round(seconds, 2),
            "steps_per_second": round((num_timesteps - start_steps) / seconds, 1) if seconds else None,
            "interrupted": self.stop.stop_signal,
        }

    def train(self) -> dict[str, Any]:
        """Train to ``total_timesteps`` (counting the resumed model's steps); returns a summary. Resuming a run
        whose final model is complete at that budget reads nothing but the step count and writes nothing: no
        model, config, provenance or TensorBoard file changes (a lower total_timesteps is not recorded)."""
        complete_at = self._complete_at()
        if complete_at is not None:
            self._say_complete(complete_at, unchanged=True)
            return self._summary(complete_at, complete_at, 0.0)
        config = self.config
        if config.torch_threads:
            th.set_num_threads(config.torch_threads)
        env, model = self._build()
        # after the model loaded (a resume that fails keeps the run's config.yaml): a resume records the
        # budget it trains to and any key it changed, as the native DQN's runner does
        self._write_run_files()
        for directory in (self.run_dir, self.run_dir / "checkpoints", self.run_dir / "eval"):
            remove_temporaries(directory)  # left by a process killed while writing
        start_steps = model.num_timesteps
        remaining = config.total_timesteps - start_steps
        seconds = self._learn(model, remaining) if remaining > 0 else 0.0
        if remaining <= 0:  # a checkpoint at the budget without the final save: written now
            self._say_complete(start_steps, unchanged=False)
        self._save_final(model)
        env.close()
        return self._summary(start_steps, model.num_timesteps, seconds)
