"""The loop layer of ``scripts/train_sb3.py``: build env and model (or load one to resume), attach the
callbacks, train, save. See :mod:`wn_rl.sb3.config` for the config and the run-directory layout."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import time
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
import yaml
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
from stable_baselines3.common.logger import TensorBoardOutputFormat
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv
from tensorboard.compat.proto.event_pb2 import Event, SessionLog

from wn_rl.analysis.runs import sb3_saved_models
from wn_rl.checkpoint import atomic_write_bytes, file_sha256, name_write_errors, remove_temporaries
from wn_rl.config import ConfigError, config_diff, config_to_dict, flatten_config
from wn_rl.sb3.callbacks import DataDependentInitCallback, WnStatsCallback
from wn_rl.sb3.config import ALGORITHMS, SB3Config, build_hyperparameters, build_policy_kwargs, resolve_policy
from wn_rl.sb3.envs import make_env
from wn_rl.sb3.guard import NonFiniteGuardCallback
from wn_rl.sb3.init import has_init_flags
from wn_rl.signals import StopOnSignals

__all__ = ["SAFE_TO_CHANGE", "AtomicCheckpointCallback", "SB3Run", "latest_model", "run_dir_for"]

SAFE_TO_CHANGE = (
    "total_timesteps",
    "log_interval",
    "checkpoint_freq",
    "wn_stats_freq",
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


def _zip_ok(path: Path) -> str | None:
    """``None`` when ``path`` is a complete zip whose members pass their CRC checks, else the problem."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, zlib.error) as exc:
        return f"not a readable zip ({exc})"
    return None if bad is None else f"member {bad} fails its CRC check"


def latest_model(run_dir: Path) -> Path | None:
    """The newest complete model of a run: the checkpoint with the most steps, or ``final_model.zip``
    when its recorded step count (``final_steps.json``) is at least as large. A truncated or corrupted
    zip is skipped with a warning that names it, falling back to the previous one."""
    for _, path in sb3_saved_models(run_dir):
        problem = _zip_ok(path)
        if problem is None:
            return path
        warnings.warn(f"skipping damaged model {path}: {problem}; falling back to the previous one", stacklevel=2)
    return None


def replay_buffer_path(model_path: Path) -> Path:
    """Where the replay buffer saved with ``model_path`` lives (``model_N_steps.zip`` ->
    ``replay_buffer_N_steps.pkl``, ``final_model.zip`` -> ``final_replay_buffer.pkl``)."""
    if model_path.name == "final_model.zip":
        return model_path.with_name("final_replay_buffer.pkl")
    return model_path.with_name(model_path.name.replace("model_", "replay_buffer_", 1).replace(".zip", ".pkl"))


def save_replay_buffer_atomically(model: BaseAlgorithm, path: Path) -> str:
    """The replay buffer of an off-policy model, written atomically like the model; returns the file's SHA-256."""
    buffer = io.BytesIO()
    model.save_replay_buffer(buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return hashlib.sha256(buffer.getbuffer()).hexdigest()


def final_buffer_belongs(run_dir: Path) -> bool:
    """Whether ``final_replay_buffer.pkl`` was saved with ``final_model.zip``. The final save writes the buffer,
    the model, then ``final_steps.json`` with the buffer's SHA-256 (``null`` when no buffer was saved), each
    atomically: a save that a full disk or a kill stopped half way leaves the previous model and steps file
    beside a newer buffer (or a stale one beside a newer model), which this tells apart. Runs from before the
    hash was recorded load their buffer as before."""
    try:
        recorded = json.loads((run_dir / "final_steps.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or "replay_buffer_sha256" not in recorded:
        return True  # written before the hash was recorded
    expected = recorded["replay_buffer_sha256"]
    return expected is not None and file_sha256(run_dir / "final_replay_buffer.pkl") == expected


def save_model_atomically(model: BaseAlgorithm, path: Path) -> None:
    """``model.save`` into memory, then one atomic write (temp file, fsync, rename): a kill leaves the
    previous file intact, never a truncated zip."""
    buffer = io.BytesIO()
    model.save(buffer)
    atomic_write_bytes(path, buffer.getvalue())


class AtomicCheckpointCallback(BaseCallback):
    """Save ``model_<steps>_steps.zip`` every ``save_freq`` environment steps, atomically, plus the
    replay buffer (``replay_buffer_<steps>_steps.pkl``, written first) when asked. With a ``guard``, a
    model that had a non-finite gradient step is never saved: the guard's error is raised instead."""

    def __init__(
        self,
        save_freq: int,
        save_dir: Path,
        save_replay_buffer: bool = False,
        verbose: int = 0,
        guard: NonFiniteGuardCallback | None = None,
    ) -> None:
        super().__init__(verbose)
        self.save_freq = save_freq
        self.save_dir = Path(save_dir)
        self.save_replay_buffer = save_replay_buffer
        self.guard = guard
        self.last_path: Path | None = None
        self._last_saved = 0

    def _init_callback(self) -> None:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        self._last_saved = self.model.num_timesteps  # a resumed model's count (the callback's is still 0 here)

    def _on_step(self) -> bool:
        if self.num_timesteps - self._last_saved >= self.save_freq:
            self.save()
        return True

    def save(self) -> Path:
        if self.guard is not None:
            self.guard.check()
        steps = self.num_timesteps
        path = self.save_dir / f"model_{steps}_steps.zip"
        if self.save_replay_buffer and isinstance(self.model, OffPolicyAlgorithm):
            save_replay_buffer_atomically(self.model, replay_buffer_path(path))  # before the model: never newer
        save_model_atomically(self.model, path)
        self._last_saved = steps
        self.last_path = path
        if self.verbose:
            print(f"checkpoint: {path}")
        return path


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
        self.resume_from = latest_model(self.run_dir) if resume else None
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
        saved = self.run_dir / "config.yaml"
        if not saved.is_file():
            return
        old = yaml.safe_load(saved.read_text())
        diff = {k: v for k, v in config_diff(old, config_to_dict(self.config)).items() if k not in SAFE_TO_CHANGE}
        if diff and not force:
            lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(
                f"{self.run_dir} holds a run with a different config:\n{lines}\n"
                "Resume with the saved config, start a new run (run_name=...), or pass --force to resume anyway."
            )

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.run_dir / "config.yaml", yaml.safe_dump(config_to_dict(self.config)).encode())
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
            model = algo_class.load(
                self.resume_from, env=env, device=config.device, tensorboard_log=str(self.run_dir), **kwargs
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
            return algo_class(
                policy,
                env,
                policy_kwargs=policy_kwargs,
                seed=config.seed,
                device=config.device,
                verbose=config.verbose,
                tensorboard_log=str(self.run_dir),
                **kwargs,
            )
        except (TypeError, ValueError, AssertionError) as exc:  # SB3 checks some arguments with assert
            raise ConfigError(
                f"{algo_class.__name__} with policy={config.policy} and env_id={config.env_id} rejects this config "
                f"(check policy_kwargs and hyperparameters): {exc}"
            ) from exc

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
        if config.init.enabled and wn_policy:
            callbacks.append(DataDependentInitCallback(config.init.n_samples, verbose=config.verbose))
        if config.wn_stats_freq and wn_policy:
            callbacks.append(WnStatsCallback(config.wn_stats_freq))
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

    def train(self) -> dict[str, Any]:
        """Train to ``total_timesteps`` (counting the resumed model's steps); returns a summary."""
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
        if remaining > 0:
            learn_kwargs = {"log_interval": config.log_interval} if config.log_interval else {}
            started = time.perf_counter()
            try:
                model.learn(
                    remaining,
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
        else:
            seconds = 0.0
        buffer_sha256 = None  # recorded, so a resume can tell a buffer from an unfinished later save (above)
        if config.save_replay_buffer and isinstance(model, OffPolicyAlgorithm):
            buffer_sha256 = save_replay_buffer_atomically(model, replay_buffer_path(self.run_dir / "final_model.zip"))
        save_model_atomically(model, self.run_dir / "final_model.zip")
        steps = {"num_timesteps": model.num_timesteps, "replay_buffer_sha256": buffer_sha256}
        atomic_write_bytes(self.run_dir / "final_steps.json", json.dumps(steps).encode())
        env.close()
        return {
            "run_dir": str(self.run_dir),
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "start_timesteps": start_steps,
            "num_timesteps": model.num_timesteps,
            "seconds": round(seconds, 2),
            "steps_per_second": round((model.num_timesteps - start_steps) / seconds, 1) if seconds else None,
            "interrupted": self.stop.stop_signal,
        }
