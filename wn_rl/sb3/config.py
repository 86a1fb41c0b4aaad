"""Config and runner behind ``scripts/train_sb3.py``: one YAML file names the algorithm, the env, the
policy (ours or SB3's), its kwargs, the hyperparameters and the budget; the runner builds the env
and the model, adds data-dependent init, WN statistics, evaluation and atomic checkpoints, trains
with TensorBoard logging and SB3's progress bar, saves the final model, and resumes a run with its
step counter continued.

Run directory layout: ``config.yaml`` (the full config), ``provenance.json`` (commit, versions,
hardware), ``tb_1/`` (TensorBoard), ``checkpoints/model_<steps>_steps.zip`` (+ replay buffer),
``eval/`` (evaluations and ``best_model.zip``), ``final_model.zip``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch as th
from sb3_contrib import QRDQN, TQC, TRPO, MaskablePPO, RecurrentPPO
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3, HerReplayBuffer
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer
from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike
from stable_baselines3.common.torch_layers import CombinedExtractor, NatureCNN
from stable_baselines3.common.utils import LinearSchedule
from torch import nn

import wn_rl.sb3 as wn_sb3
from wn_rl.config import ConfigError, check, load_config, read_run_config, resolve_device
from wn_rl.dormant import TAU_EXPECTED, is_tau
from wn_rl.sb3.envs import check_env_id

__all__ = [
    "ALGORITHMS",
    "EvalConfig",
    "InitConfig",
    "SB3Config",
    "build_hyperparameters",
    "build_policy_kwargs",
    "load_sb3_config",
    "load_sb3_run_config",
    "resolve_policy",
]

ALGORITHMS: dict[str, type[BaseAlgorithm]] = {
    "a2c": A2C,
    "dqn": DQN,
    "maskable_ppo": MaskablePPO,
    "ppo": PPO,
    "qrdqn": QRDQN,
    "recurrent_ppo": RecurrentPPO,
    "sac": SAC,
    "td3": TD3,
    "tqc": TQC,
    "trpo": TRPO,
}
_ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}
_OPTIMIZERS = {
    "adam": th.optim.Adam,
    "adamax": th.optim.Adamax,
    "adamw": th.optim.AdamW,
    "rmsprop": th.optim.RMSprop,
    "rmsprop_tf_like": RMSpropTFLike,
    "sgd": th.optim.SGD,
}
_EXTRACTORS = {
    "WnNatureCNN": wn_sb3.WnNatureCNN,
    "NatureCNN": NatureCNN,
    "WnCombinedExtractor": wn_sb3.WnCombinedExtractor,
    "CombinedExtractor": CombinedExtractor,
}
_REPLAY_BUFFERS = {
    "ReplayBuffer": ReplayBuffer,
    "DictReplayBuffer": DictReplayBuffer,
    "HerReplayBuffer": HerReplayBuffer,
}
_SCHEDULED = ("learning_rate", "clip_range", "clip_range_vf")
_LINEAR = re.compile(r"^lin_([0-9.eE+-]+)$")
_AUTO_ENT_COEF = re.compile(r"^auto(?:_(.+))?$")
# the ranges of the common hyperparameters (SB3 takes batch_size=0 or gamma=2 without a word, and
# train_freq=0 fails only once learn() runs): checked when the config loads, before anything is built
_COUNTS = {  # integers: the smallest value
    "batch_size": 1,
    "n_steps": 1,
    "buffer_size": 1,
    "n_epochs": 1,
    "target_update_interval": 1,
    "policy_delay": 1,
    "learning_starts": 0,
    "gradient_steps": -1,  # -1: as many gradient steps as the rollout's env steps; 0: none
}
_FRACTIONS = ("gamma", "gae_lambda", "exploration_fraction", "exploration_initial_eps", "exploration_final_eps", "tau")
_NON_NEGATIVE = ("ent_coef", "vf_coef")  # ent_coef of SAC and TQC may also be "auto" / "auto_<initial value>"
_POSITIVE = ("learning_rate", "clip_range", "clip_range_vf", "max_grad_norm", "target_kl")


@dataclass(frozen=True)
class InitConfig:
    enabled: bool = True
    "initialise the policy before it acts or learns, by `method`; false: keep the policy's own init (for a WN policy "
    "the fresh v ~ N(0, 0.05), g = 1)"
    method: Literal["data_dependent", "torch_default"] = "data_dependent"
    "data_dependent: the paper's init (section 3) from real observations (wn_rl policies only). torch_default: torch's "
    "init of a fresh nn.Linear / nn.Conv2d in every online network (WN layers as g = ||w||, v = w), drawn from `seed`, "
    "targets synced: the ablation that isolates the reparameterization (any policy; init_scale has no effect)"
    n_samples: int = 256
    "observations in the data-dependent init batch (off-policy algorithms need learning_starts >= n_samples)"

    def __post_init__(self) -> None:
        check(self.n_samples >= 2, "init.n_samples", self.n_samples, "an integer >= 2")
        check(
            self.enabled or self.method == "data_dependent",
            "init.method",
            self.method,
            "data_dependent with init.enabled=false (a disabled init keeps the policy's own); set init.enabled=true",
        )

    @property
    def data_dependent(self) -> bool:
        """Whether the paper's data-dependent init runs."""
        return self.enabled and self.method == "data_dependent"


@dataclass(frozen=True)
class EvalConfig:
    freq: int = 0
    "environment steps (summed over envs) between evaluations; 0 disables evaluation"
    episodes: int = 10
    "episodes per evaluation (full games on Atari: the Monitor sits below the AtariWrapper)"
    deterministic: bool = True
    "greedy / mean actions during evaluation"

    def __post_init__(self) -> None:
        check(self.freq >= 0, "eval.freq", self.freq, "a number of steps >= 0")
        check(self.episodes >= 1, "eval.episodes", self.episodes, "at least 1 episode")


@dataclass(frozen=True)
class SB3Config:
    algo: Literal["a2c", "dqn", "maskable_ppo", "ppo", "qrdqn", "recurrent_ppo", "sac", "td3", "tqc", "trpo"]
    "the SB3 / sb3-contrib algorithm"
    env_id: str
    "gymnasium id; Atari as <Game>NoFrameskip-v4 (AtariWrapper + frame stack), e.g. BreakoutNoFrameskip-v4"
    policy: str
    "a wn_rl.sb3 policy class name (e.g. WnCnnPolicy) or the algorithm's SB3 alias (e.g. CnnPolicy)"
    total_timesteps: int
    "environment steps, summed over envs (Atari: agent steps, 4 frames each)"
    n_envs: int = 1
    "parallel environments"
    seed: int = 0
    "seed of the algorithm, the envs (seed, seed+1, ...) and the eval env (seed + 10000)"
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    "policy constructor kwargs; activation_fn, optimizer_class, features_extractor_class by name"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    "algorithm kwargs; 'lin_<x>' for linear learning_rate / clip_range schedules; replay_buffer_class by name"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    "kwargs for gym.make"
    atari_wrapper_kwargs: dict[str, Any] = field(default_factory=dict)
    "kwargs for SB3's AtariWrapper (e.g. terminal_on_life_loss)"
    frame_stack: int = 4
    "frames stacked for Atari"
    subprocess_envs: bool = False
    "SubprocVecEnv instead of DummyVecEnv"
    action_noise_std: float = 0.0
    "std of Gaussian action noise (TD3/SAC/TQC), as a fraction of the action range; 0 = none"
    init: InitConfig = field(default_factory=InitConfig)
    "data-dependent initialization"
    wn_stats_freq: int = 10_000
    "environment steps between WN statistics in TensorBoard; 0 disables"
    dormant: bool = False
    "also log the dormant-unit fractions (Sokar et al. 2023) with the WN statistics (wn_rl policies; a forward pass)"
    dormant_tau: float = 0.0
    "tau of the dormant units: a unit is dormant when its normalised mean activation is <= tau (0: never active)"
    eval: EvalConfig = field(default_factory=EvalConfig)
    "periodic evaluation on a separate env"
    checkpoint_freq: int = 0
    "environment steps between atomic checkpoints; 0 disables"
    save_replay_buffer: bool = False
    "store the replay buffer with each checkpoint (off-policy), so resuming continues it"
    runs_dir: str = "runs/sb3"
    "parent of the run directories"
    run_name: str = ""
    "run directory name; default <env>__<algo>__<policy>__<seed>__<unix time>"
    device: str = "auto"
    "torch device: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; checked to exist when loaded"
    torch_threads: int = 0
    "torch.set_num_threads; 0 keeps torch's default (1 is often faster for small nets on a busy CPU)"
    progress_bar: bool = True
    "SB3's progress bar (needs tqdm and rich)"
    log_interval: int = 0
    "SB3's log_interval (episodes off-policy, iterations on-policy); 0 keeps the algorithm's default"
    verbose: int = 1
    "SB3 verbosity"

    def __post_init__(self) -> None:
        check(self.total_timesteps > 0, "total_timesteps", self.total_timesteps, "a positive number of steps")
        check(self.n_envs >= 1, "n_envs", self.n_envs, "at least 1 environment")
        check(self.frame_stack >= 1, "frame_stack", self.frame_stack, "at least 1 frame")
        check(self.action_noise_std >= 0, "action_noise_std", self.action_noise_std, "a std >= 0")
        noisy = ("sac", "td3", "tqc")  # the off-policy algorithms with continuous actions
        expected = f"0 for algo={self.algo} (Gaussian action noise is for {', '.join(noisy)}: continuous actions)"
        check(self.action_noise_std == 0 or self.algo in noisy, "action_noise_std", self.action_noise_std, expected)
        check(self.wn_stats_freq >= 0, "wn_stats_freq", self.wn_stats_freq, "a number of steps >= 0")
        tau = self.dormant_tau
        check(is_tau(tau), "dormant_tau", tau, TAU_EXPECTED)
        logged = "false, or wn_stats_freq > 0 (the dormant units are logged with the WN statistics)"
        check(not self.dormant or self.wn_stats_freq > 0, "dormant", self.dormant, logged)
        check(self.checkpoint_freq >= 0, "checkpoint_freq", self.checkpoint_freq, "a number of steps >= 0")
        check(self.torch_threads >= 0, "torch_threads", self.torch_threads, "a thread count >= 0")
        check(self.log_interval >= 0, "log_interval", self.log_interval, "an interval >= 0")
        resolve_device(self.device, "device")  # SB3 would fall back to the CPU for a missing cuda
        try:
            check_env_id(self.env_id)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        policy = resolve_policy(self.algo, self.policy)
        _check_hyperparameters(self.algo, self.hyperparameters)
        _check_optimizer_kwargs(self.policy_kwargs)
        if self.init.data_dependent and isinstance(policy, type):
            _check_init_batch(self.algo, self.hyperparameters, self.init.n_samples)


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _policy_base(algo: str) -> type:
    """The policy class that every policy of ``algo`` subclasses (its ``MlpPolicy``: ``SACPolicy``, ...)."""
    aliases = list(ALGORITHMS[algo].policy_aliases.values())
    return next(base for base in aliases if all(issubclass(alias, base) for alias in aliases))


def _fits(policy: type, algo: str) -> bool:
    """Whether ``algo`` runs ``policy``: a subclass of its base, and of no narrower base of another algorithm
    (RecurrentPPO's subclasses PPO's, and is called with LSTM states)."""
    base = _policy_base(algo)
    narrower = {_policy_base(other) for other in ALGORITHMS} - {base}
    return issubclass(policy, base) and not any(issubclass(policy, n) for n in narrower if issubclass(n, base))


def resolve_policy(algo: str, policy: str) -> type | str:
    """A wn_rl.sb3 policy class by name, or the algorithm's SB3 alias (returned as the string). A wn_rl.sb3
    policy of another algorithm (``WnSACPolicy`` for ``tqc``) is a :class:`ConfigError`: the run would
    otherwise crash at its first update, or at its first rollout."""
    aliases = sorted(ALGORITHMS[algo].policy_aliases)
    ours = sorted(n for n in wn_sb3.__all__ if n.endswith("Policy"))
    if policy in aliases:
        return policy
    if policy in ours:
        cls = getattr(wn_sb3, policy)
        if not _fits(cls, algo):
            fitting = [name for name in ours if _fits(getattr(wn_sb3, name), algo)]
            raise ConfigError(
                f"policy={policy!r} is not a policy of {ALGORITHMS[algo].__name__} (algo={algo!r}): use one of "
                f"{fitting} (or {aliases}), or set algo to the algorithm the policy is for."
            )
        return cls
    raise ConfigError(
        f"policy={policy!r} is neither a wn_rl.sb3 policy ({ours}) nor one of {algo}'s SB3 policies ({aliases})."
        + _did_you_mean(policy, ours + aliases)
    )


def _check_hyperparameters(algo: str, hyperparameters: dict[str, Any]) -> None:
    parameters = inspect.signature(ALGORITHMS[algo].__init__).parameters
    allowed = sorted(
        set(parameters)
        - {
            "self",
            "policy",
            "env",
            "policy_kwargs",
            "seed",
            "device",
            "verbose",
            "tensorboard_log",
            "_init_setup_model",
            "action_noise",
        }
    )
    for key in hyperparameters:
        if key not in allowed:
            raise ConfigError(
                f"hyperparameters.{key} is not an argument of {ALGORITHMS[algo].__name__}.{_did_you_mean(key, allowed)}"
                f" Valid keys: {allowed}"
            )
    buffer = hyperparameters.get("replay_buffer_class")
    if buffer is not None and (not isinstance(buffer, str) or buffer not in _REPLAY_BUFFERS):
        raise ConfigError(
            f"hyperparameters.replay_buffer_class={buffer!r} is not one of {sorted(_REPLAY_BUFFERS)} (HerReplayBuffer "
            "needs a goal-conditioned env and a multi-input policy, e.g. WnSACMultiInputPolicy)."
            + _did_you_mean(str(buffer), sorted(_REPLAY_BUFFERS))
        )
    defaults = {name: parameter.default for name, parameter in parameters.items()}
    for key, value in hyperparameters.items():
        if value is None and defaults[key] is None:
            continue  # the algorithm's own default: off (clip_range_vf, target_kl, QR-DQN's max_grad_norm)
        expected = _expected_range(key, value, defaults[key])
        if expected is not None:
            raise ConfigError(f"hyperparameters.{key}={value!r} is invalid: expected {expected}")


def _expected_range(key: str, value: Any, default: Any) -> str | None:
    """What ``hyperparameters.key`` must be when ``value`` is out of its range (None: in range, or a key
    without a known range, left to the algorithm)."""
    if key in _COUNTS:
        low = _COUNTS[key]
        count = _count(value)
        if count is not None and count >= low:
            return None
        return "an integer >= 0, or -1 (as many gradient steps as env steps)" if low == -1 else f"an integer >= {low}"
    if key == "train_freq":
        form = isinstance(value, (list, tuple)) and len(value) == 2 and value[1] in ("step", "episode")
        count = _count(value[0] if form else value)
        ok = count is not None and count >= 1
        return None if ok else "an integer >= 1 (env steps between updates), or [n, step] / [n, episode] with n >= 1"
    if key in _FRACTIONS:
        return None if _number(value) is not None and 0 <= value <= 1 else "a number in [0, 1]"
    if key in _NON_NEGATIVE and isinstance(value, str) and isinstance(default, str):  # SAC, TQC: learned
        match = _AUTO_ENT_COEF.match(value)
        ok = match is not None and (match.group(1) is None or _positive(_to_float(match.group(1))))
        return None if ok else "a number >= 0, 'auto' (learned, from 1.0) or 'auto_<initial value>' (e.g. auto_0.1)"
    if key in _NON_NEGATIVE:
        return None if _number(value) is not None and value >= 0 else "a number >= 0"
    if key in _POSITIVE:
        match = _LINEAR.match(value) if key in _SCHEDULED and isinstance(value, str) else None
        if _positive(_number(value)) or (match is not None and _positive(_to_float(match.group(1)))):
            return None
        if key in _SCHEDULED:
            return "a number or 'lin_<start>' for a linear decay to 0 (e.g. lin_2.5e-4), finite and > 0"
        return "a finite number > 0"
    return None


def _number(value: Any) -> float | None:
    """``value`` when it is a finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _count(value: Any) -> int | None:
    """``value`` as an integer when it is one (``1e5`` reads as the float 100000.0), else None."""
    number = _number(value)
    return int(number) if number is not None and float(number).is_integer() else None


def _to_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _check_optimizer_kwargs(policy_kwargs: dict[str, Any]) -> None:
    """``policy_kwargs.optimizer_kwargs``: a mapping, whose ``betas`` (Adam's) are two numbers in [0, 1)."""
    kwargs = policy_kwargs.get("optimizer_kwargs")
    where = "policy_kwargs.optimizer_kwargs"
    check(kwargs is None or isinstance(kwargs, dict), where, kwargs, "a mapping of optimizer arguments")
    if kwargs is None or "betas" not in kwargs:
        return
    betas = kwargs["betas"]
    pair = isinstance(betas, (list, tuple)) and len(betas) == 2
    ok = pair and all(_number(beta) is not None and 0 <= beta < 1 for beta in betas)
    check(ok, f"{where}.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.999] (the decay rates beta1, beta2)")


def _check_init_batch(algo: str, hyperparameters: dict[str, Any], n_samples: int) -> None:
    """Off-policy data-dependent init samples the replay buffer when the random warm-up ends: it needs
    ``learning_starts >= init.n_samples`` (the same rule :class:`wn_rl.sb3.DataDependentInitCallback` enforces
    at training start, checked here so that the run fails before anything is written)."""
    parameters = inspect.signature(ALGORITHMS[algo].__init__).parameters
    if "learning_starts" not in parameters:
        return
    learning_starts = hyperparameters.get("learning_starts", parameters["learning_starts"].default)
    if isinstance(learning_starts, (int, float)) and learning_starts < n_samples:
        raise ConfigError(
            f"init.n_samples={n_samples} needs hyperparameters.learning_starts >= {n_samples} (got {learning_starts}): "
            "data-dependent init uses the replay buffer before the policy's first action. Raise learning_starts, "
            "lower init.n_samples, or set init.enabled=false."
        )


def load_sb3_config(path: str | Path | None, overrides: list[str] = ()) -> SB3Config:
    """Load and validate a config (every error a :class:`wn_rl.config.ConfigError` naming file and key)."""
    return load_config(SB3Config, path, list(overrides))


def load_sb3_run_config(run_dir: str | Path, overrides: list[str] = ()) -> SB3Config:
    """The config a run directory was made with (its ``config.yaml``), plus overrides; a path that is not a
    run directory is a :class:`ConfigError` saying so."""
    if not Path(run_dir).exists():
        raise ConfigError(f"--resume {run_dir}: the directory does not exist")
    read_run_config(run_dir, "scripts/train_sb3.py")  # missing, empty or damaged: not a complete run
    return load_sb3_config(Path(run_dir) / "config.yaml", overrides)


def _by_name(table: dict[str, Any], value: Any, key: str) -> Any:
    if not isinstance(value, str):
        return value
    if value not in table:
        raise ConfigError(f"policy_kwargs.{key}={value!r} is not one of {sorted(table)}")
    return table[value]


def build_policy_kwargs(config: SB3Config) -> dict[str, Any]:
    """``policy_kwargs`` with class names (activation, optimizer, features extractor) resolved."""
    kwargs = dict(config.policy_kwargs)
    for key, table in (
        ("activation_fn", _ACTIVATIONS),
        ("optimizer_class", _OPTIMIZERS),
        ("features_extractor_class", _EXTRACTORS),
    ):
        if key in kwargs:
            kwargs[key] = _by_name(table, kwargs[key], key)
    if "optimizer_kwargs" in kwargs and "betas" in kwargs["optimizer_kwargs"]:
        kwargs["optimizer_kwargs"] = {**kwargs["optimizer_kwargs"], "betas": tuple(kwargs["optimizer_kwargs"]["betas"])}
    return kwargs


def build_hyperparameters(config: SB3Config) -> dict[str, Any]:
    """Algorithm kwargs with ``lin_<x>`` schedules, list ``train_freq``, integer counts written as floats and
    ``replay_buffer_class`` by name converted."""
    kwargs = dict(config.hyperparameters)
    if kwargs.get("replay_buffer_class") is not None:  # None (null): SB3 picks the buffer for the space
        kwargs["replay_buffer_class"] = _REPLAY_BUFFERS[kwargs["replay_buffer_class"]]
    for key in _SCHEDULED:
        match = _LINEAR.match(str(kwargs.get(key, "")))
        if match:
            kwargs[key] = LinearSchedule(float(match.group(1)), 0.0, 1.0)
    for key in _COUNTS:  # 1e5 in YAML is the float 100000.0: SB3 sizes buffers and loops with integers
        if isinstance(kwargs.get(key), float):
            kwargs[key] = int(kwargs[key])
    if isinstance(kwargs.get("train_freq"), (list, tuple)):
        kwargs["train_freq"] = (_count(kwargs["train_freq"][0]), kwargs["train_freq"][1])
    elif isinstance(kwargs.get("train_freq"), float):
        kwargs["train_freq"] = int(kwargs["train_freq"])
    return kwargs
