"""Typed, frozen configuration of a native DQN run (loaded strictly from YAML by ``wn_rl.config``).

Units are in every count's name: *agent steps* are transitions summed over the parallel envs (one
vector-env step with N envs is N agent steps), *frames* are emulator frames (4 per Atari agent step),
*updates* are gradient steps. Defaults follow the paper (section 5.4) and deep_q_rl's Nature settings:
Adamax with beta1 = 0.5, minibatch 64, lr 3e-4 for weight norm and 1e-4 otherwise, replay 1M
transitions, target update every 10k updates, learning starts after 50k agent steps of random acting,
then epsilon 1 -> 0.1 over 1M agent steps, one update every 4 agent steps, gamma 0.99.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from wn_rl.config import ConfigError, check, config_to_dict, load_config, read_run_config
from wn_rl.dormant import TAU_EXPECTED, is_tau
from wn_rl.parameterization import PARAMETERIZATIONS

__all__ = [
    "AgentConfig",
    "DQNConfig",
    "EnvConfig",
    "EvalConfig",
    "NetworkConfig",
    "RunConfig",
    "load_dqn_config",
    "load_run_config",
    "with_older_defaults",
]


@dataclass(frozen=True)
class EnvConfig:
    """Which environment, and how it is preprocessed."""

    suite: Literal["atari", "minatar", "gym"] = "atari"
    "atari: ale-py's C++ AtariVectorEnv; minatar: MinAtar through gymnasium; gym: any gymnasium id."
    name: str = "breakout"
    "Atari ROM (snake_case: breakout, space_invaders), MinAtar game (breakout, seaquest, ...), or gym id."
    num_envs: int = 8
    "parallel environments stepped together (each vector step is num_envs agent steps)."
    protocol: Literal["nature", "machado"] = "nature"
    "Atari preset. nature: no sticky actions, life loss terminal in training, minimal action set. "
    "machado (Machado et al. 2018): sticky actions 0.25, no life-loss signal, full action set."
    repeat_action_probability: float | None = None
    "sticky actions; None takes the preset's (nature 0, machado 0.25, MinAtar 0.1)."
    full_action_space: bool | None = None
    "Atari: all 18 actions; None takes the preset's (nature false, machado true)."
    terminal_on_life_loss: bool | None = None
    "Atari: a life loss cuts the TD bootstrap (the game goes on); None takes the preset's."
    fire_reset: bool | None = None
    "Atari: press FIRE at the start of every game (ale-py's default, and SB3's Atari wrappers after every "
    "life loss). None takes the preset's: false in both, as in the Nature DQN's and deep_q_rl's code, where "
    "the agent learns to launch the ball itself."
    noop_max: int = 30
    "Atari: up to this many no-op actions at the start of each game."
    max_episode_frames: int = 108_000
    "Atari: training play-time limit in frames (108k = 30 minutes); the game is truncated there."
    max_episode_steps: int | None = None
    "MinAtar / gym: truncate episodes after this many agent steps (None: the env's own limit)."


@dataclass(frozen=True)
class NetworkConfig:
    """The Q-network, built through the core's Parameterization builders."""

    parameterization: str = "weight_norm"
    "normal, batch_norm, weight_norm, weight_norm+mean_only_bn, mean_only_bn or layer_norm."
    architecture: Literal["auto", "nature_cnn", "minatar_cnn", "mlp"] = "auto"
    "auto: nature_cnn for Atari, minatar_cnn for MinAtar, mlp for vector observations."
    hidden_sizes: tuple[int, ...] = (64, 64)
    "mlp hidden widths."
    init: Literal["data_dependent", "torch_default"] = "data_dependent"
    "data_dependent: section 3 on the first replay fill, so every parameterization starts from the same "
    "function. torch_default: torch's init of a fresh nn.Linear / nn.Conv2d, as g = ||w||, v = w in WN layers "
    "(wn_rl.default_init; same run.seed, same start under every parameterization): WN as a pure reparameterization."
    hidden_init_scale: float = 1.0
    "std of every hidden layer's pre-activations after data-dependent init (section 3's init_scale)."
    head_init_scale: float = 1.0
    "std of the Q head's outputs after data-dependent init."
    ddi_batch_size: int = 256
    "observations from the first replay fill used for data-dependent init (section 3)."


@dataclass(frozen=True)
class AgentConfig:
    """Learner and exploration."""

    optimizer: Literal["adamax", "adam", "rmsprop"] = "adamax"
    "the paper uses Adamax."
    lr: float | None = None
    "learning rate; None: 3e-4 with weight norm, 1e-4 otherwise (the paper's best)."
    beta1: float = 0.5
    "Adamax/Adam beta1 (the paper's momentum 0.5); with rmsprop, its momentum (torch's RMSprop: alpha 0.95, "
    "not centered, optimizer_eps outside the square root; not the Nature DQN's centered RMSProp)."
    beta2: float = 0.999
    "Adamax/Adam beta2."
    optimizer_eps: float = 1e-8
    "optimizer epsilon."
    batch_size: int = 64
    "minibatch size (transitions per update)."
    gamma: float = 0.99
    "discount."
    n_step: int = 1
    "n-step returns (1: the Nature DQN)."
    double_dqn: bool = False
    "double DQN targets (van Hasselt et al. 2016)."
    huber_delta: float = 1.0
    "Huber loss threshold (the Nature DQN's error clipping)."
    clip_rewards: bool = True
    "clip rewards to [-1, 1] in the learner; logged returns stay real game scores."
    max_grad_norm: float | None = None
    "clip the gradient norm (None: no clipping, as in the Nature DQN)."
    replay_capacity_transitions: int = 1_000_000
    "replay memory size in transitions (agent steps)."
    learning_starts_agent_steps: int = 50_000
    "agent steps of random-ish acting before the first update."
    agent_steps_per_update: float = 4.0
    "one update every this many agent steps (0.5 = two updates per agent step)."
    target_update_every_updates: int = 10_000
    "copy the online network to the target network every this many updates."
    update_mode: Literal["auto", "eager", "compiled", "cudagraph"] = "auto"
    "eager: autograd + torch.optim; compiled: the whole update as one torch.compile graph; cudagraph: "
    "that graph replayed as a CUDA graph. auto: cudagraph on CUDA; on a CPU compiled for runs of at least "
    "50k updates (compiling takes minutes), else eager (docs/benchmarks.md); eager on torch < 2.5, where "
    "compiled and cudagraph are refused."
    epsilon_start: float = 1.0
    "exploration at agent step 0."
    epsilon_end: float = 0.1
    "exploration after the decay."
    epsilon_decay_agent_steps: int = 1_000_000
    "agent steps of linear decay from epsilon_start to epsilon_end."
    epsilon_decay_after_learning_starts: bool = True
    "true: epsilon stays at epsilon_start (uniformly random acting) until learning starts and decays from "
    "there, as in deep_q_rl (the paper's code), the Nature DQN's code and MinAtar's reference DQN. false: "
    "the decay starts at agent step 0 (SB3, CleanRL)."


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation as in the paper's protocol."""

    every_agent_steps: int = 250_000
    "evaluate after every epoch of this many agent steps, at most run.total_agent_steps (0: never; a run ends "
    "without a final evaluation)."
    games: int = 30
    "complete games per evaluation (a fixed quota per env, so short games are not favoured)."
    epsilon: float = 0.05
    "exploration during evaluation."
    num_envs: int = 8
    "parallel evaluation envs."
    max_episode_frames: int = 18_000
    "Atari evaluation play-time limit in frames (18k = 5 minutes, the Nature protocol). The paper used none "
    "(its Enduro note under Figure 6); 108_000, the training cap of 30 minutes, comes closest."
    max_episode_steps: int | None = None
    "MinAtar / gym evaluation limit in agent steps (None: the env's own)."


@dataclass(frozen=True)
class RunConfig:
    """Budget, seed, device, logging and checkpoints."""

    total_agent_steps: int = 50_000_000
    "training length in agent steps (200 epochs x 250k in the paper)."
    seed: int = 0
    "seeds torch, numpy, the envs and the run directory name."
    device: str = "auto"
    "auto (cuda when available), cpu, cuda or cuda:N."
    runs_dir: str = "runs/dqn"
    "parent of the run directories."
    name: str | None = None
    "run directory name; None derives it from config name, game, parameterization and seed."
    log_every_agent_steps: int = 10_000
    "TensorBoard scalars every this many agent steps."
    wn_stats_every_agent_steps: int = 50_000
    "WN statistics (g, ||v||, g/||v||) and dormant-unit fractions every this many agent steps."
    dormant_tau: float = 0.0
    "tau of the dormant-unit statistics (Sokar et al. 2023): a unit is dormant when its normalised score is <= tau; "
    "0 counts units never active."
    checkpoint_every_agent_steps: int = 1_000_000
    "checkpoint every this many agent steps (0: only at the end)."
    keep_checkpoints: int = 2
    "checkpoints kept on disk (the newest)."
    save_replay: bool = False
    "also checkpoint the replay memory (needed for a bit-identical resume; large files)."
    progress_bar: bool = True
    "show a tqdm bar with steps, SPS and recent return."
    torch_threads: int | None = None
    "torch CPU threads (None: torch's default)."
    overlap_updates: Literal["auto", "thread", "inline"] = "auto"
    "how a step's updates run beside the env step (bit-identical results either way). thread: in a worker "
    "thread while the main thread acts and steps the envs (CPU); inline: in the loop (a GPU still overlaps, "
    "its kernels run while the emulators step). auto: thread for Atari on a CPU with 2+ cores, else inline."
    acting: Literal["auto", "in_update", "separate"] = "auto"
    "where the actions are chosen. in_update: a step's first compiled update also computes them, with the "
    "weights from before it (one C++ call instead of an eager forward; needs agent.update_mode compiled and "
    "inline updates, else separate); separate: an eager forward of the online network. The same math, not "
    "bit-identical (other kernels). auto: in_update on a CPU."


@dataclass(frozen=True)
class DQNConfig:
    """A whole DQN run. Cross-field checks run here, before any env or tensor exists."""

    env: EnvConfig = field(default_factory=EnvConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        _check_env(self.env)
        _check_network(self.network)
        _check_agent(self.agent)
        _check_eval(self.eval)
        _check_run(self.run)
        a, r = self.agent, self.run
        check(
            a.batch_size <= a.replay_capacity_transitions,
            "agent.batch_size",
            a.batch_size,
            f"at most agent.replay_capacity_transitions={a.replay_capacity_transitions}",
        )
        check(
            a.learning_starts_agent_steps < r.total_agent_steps,
            "agent.learning_starts_agent_steps",
            a.learning_starts_agent_steps,
            f"less than run.total_agent_steps={r.total_agent_steps} (otherwise no update ever happens)",
        )
        every = self.eval.every_agent_steps
        check(  # the runner evaluates only when a step crosses a multiple of it: there is no final evaluation
            every <= r.total_agent_steps,
            "eval.every_agent_steps",
            every,
            f"at most run.total_agent_steps={r.total_agent_steps}, otherwise no evaluation ever runs "
            "(the runner has no final one); lower it, or set it to 0 to disable evaluation",
        )
        per_env = a.replay_capacity_transitions // self.env.num_envs
        check(
            per_env >= a.n_step + 8,
            "agent.replay_capacity_transitions",
            a.replay_capacity_transitions,
            f"at least {(a.n_step + 8) * self.env.num_envs} (n_step + 8 per env x {self.env.num_envs} envs)",
        )
        min_start = max(a.batch_size, self.network.ddi_batch_size // 4, self.env.num_envs * (a.n_step + 4))
        check(
            a.learning_starts_agent_steps >= min_start,
            "agent.learning_starts_agent_steps",
            a.learning_starts_agent_steps,
            f"at least {min_start} so the first minibatch and the data-dependent init batch come from real data",
        )
        if a.lr is None:
            lr = 3e-4 if PARAMETERIZATIONS[self.network.parameterization].weight_norm else 1e-4
            object.__setattr__(self, "agent", replace(a, lr=lr))

    @property
    def frames_per_agent_step(self) -> int:
        return 4 if self.env.suite == "atari" else 1


def _check_env(e: EnvConfig) -> None:
    check(e.num_envs >= 1, "env.num_envs", e.num_envs, "at least 1")
    check(bool(e.name), "env.name", e.name, "a game or environment name")
    p = e.repeat_action_probability
    check(p is None or 0.0 <= p < 1.0, "env.repeat_action_probability", p, "a probability in [0, 1)")
    check(0 <= e.noop_max <= 1000, "env.noop_max", e.noop_max, "between 0 and 1000")
    check(e.max_episode_frames > 0, "env.max_episode_frames", e.max_episode_frames, "a positive frame count")
    s = e.max_episode_steps
    check(s is None or s > 0, "env.max_episode_steps", s, "a positive step count or null")


def _check_network(n: NetworkConfig) -> None:
    check(
        n.parameterization in PARAMETERIZATIONS,
        "network.parameterization",
        n.parameterization,
        f"one of {sorted(PARAMETERIZATIONS)}",
    )
    widths_ok = len(n.hidden_sizes) > 0 and all(h > 0 for h in n.hidden_sizes)
    check(widths_ok, "network.hidden_sizes", n.hidden_sizes, "one or more positive widths, e.g. [64, 64]")
    for key in ("hidden_init_scale", "head_init_scale"):
        scale = getattr(n, key)
        check(_positive(scale), f"network.{key}", scale, "a positive number")
        check(
            n.init == "data_dependent" or scale == 1.0,
            f"network.{key}",
            scale,
            "1.0 with network.init=torch_default (it sets a std in data-dependent init only)",
        )
    check(n.ddi_batch_size >= 2, "network.ddi_batch_size", n.ddi_batch_size, "at least 2")


def _check_agent(a: AgentConfig) -> None:
    check(a.lr is None or _positive(a.lr), "agent.lr", a.lr, "a positive learning rate or null")
    check(0.0 <= a.beta1 < 1.0, "agent.beta1", a.beta1, "in [0, 1)")
    check(0.0 <= a.beta2 < 1.0, "agent.beta2", a.beta2, "in [0, 1)")
    check(_positive(a.optimizer_eps), "agent.optimizer_eps", a.optimizer_eps, "a positive number")
    check(a.batch_size >= 1, "agent.batch_size", a.batch_size, "at least 1")
    check(0.0 <= a.gamma <= 1.0, "agent.gamma", a.gamma, "a discount in [0, 1]")
    check(1 <= a.n_step <= 100, "agent.n_step", a.n_step, "between 1 and 100")
    check(_positive(a.huber_delta), "agent.huber_delta", a.huber_delta, "a positive number")
    g = a.max_grad_norm
    check(g is None or _positive(g), "agent.max_grad_norm", g, "a positive number or null")
    cap = a.replay_capacity_transitions
    check(cap >= 1, "agent.replay_capacity_transitions", cap, "at least 1")
    check(
        a.learning_starts_agent_steps >= 0, "agent.learning_starts_agent_steps", a.learning_starts_agent_steps, ">= 0"
    )
    check(_positive(a.agent_steps_per_update), "agent.agent_steps_per_update", a.agent_steps_per_update, "> 0")
    t = a.target_update_every_updates
    check(t >= 1, "agent.target_update_every_updates", t, "at least 1")
    for key in ("epsilon_start", "epsilon_end"):
        value = getattr(a, key)
        check(0.0 <= value <= 1.0, f"agent.{key}", value, "a probability in [0, 1]")
    d = a.epsilon_decay_agent_steps
    check(d >= 0, "agent.epsilon_decay_agent_steps", d, ">= 0")


def _check_eval(v: EvalConfig) -> None:
    check(v.every_agent_steps >= 0, "eval.every_agent_steps", v.every_agent_steps, ">= 0 (0 disables evaluation)")
    check(v.games >= 1, "eval.games", v.games, "at least 1")
    check(0.0 <= v.epsilon <= 1.0, "eval.epsilon", v.epsilon, "a probability in [0, 1]")
    check(v.num_envs >= 1, "eval.num_envs", v.num_envs, "at least 1")
    check(v.max_episode_frames > 0, "eval.max_episode_frames", v.max_episode_frames, "a positive frame count")
    s = v.max_episode_steps
    check(s is None or s > 0, "eval.max_episode_steps", s, "a positive step count or null")


def _check_run(r: RunConfig) -> None:
    check(r.total_agent_steps >= 1, "run.total_agent_steps", r.total_agent_steps, "at least 1")
    seed_ok = 0 <= r.seed < 2**30  # the envs are seeded with run.seed + agent step; ALE takes 32-bit signed seeds
    check(seed_ok, "run.seed", r.seed, "an integer in [0, 2**30) (gymnasium refuses negative seeds, ALE large ones)")
    ok_device = r.device in ("auto", "cpu", "cuda", "mps") or r.device.startswith("cuda:")
    check(ok_device, "run.device", r.device, "auto, cpu, cuda, cuda:N or mps")
    for key in ("log_every_agent_steps", "wn_stats_every_agent_steps"):
        check(getattr(r, key) >= 1, f"run.{key}", getattr(r, key), "at least 1")
    tau = r.dormant_tau
    check(is_tau(tau), "run.dormant_tau", tau, TAU_EXPECTED)
    c = r.checkpoint_every_agent_steps
    check(c >= 0, "run.checkpoint_every_agent_steps", c, ">= 0 (0: only at the end)")
    check(r.keep_checkpoints >= 1, "run.keep_checkpoints", r.keep_checkpoints, "at least 1")
    t = r.torch_threads
    check(t is None or t >= 1, "run.torch_threads", t, "a positive thread count or null")
    bad_name = r.name is not None and (not r.name or "/" in r.name or r.name.startswith("."))
    check(not bad_name, "run.name", r.name, "a directory name without '/' (or null to derive it)")


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def load_dqn_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> DQNConfig:
    """Load a :class:`DQNConfig` from YAML plus ``section.key=value`` overrides; every error is a
    ``ConfigError`` naming the file, the key and the value."""
    try:
        return load_config(DQNConfig, path, list(overrides))
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive: surface as a config error
        raise ConfigError(f"{path}: {exc}") from None


def config_dict(config: DQNConfig) -> dict:
    """Plain-data view of a config (for YAML, checkpoints and TensorBoard)."""
    return config_to_dict(config)


def with_older_defaults(saved: dict) -> dict:
    """A run's stored config (its ``config.yaml``) with every key added since it was written filled in
    with the value that does what the code did before the key existed, so that comparing it with a config
    of today (a resume, a study) finds the differences in behaviour and only those."""
    saved = {section: dict(values) for section, values in saved.items()}
    env, network, agent, run = (saved.setdefault(section, {}) for section in ("env", "network", "agent", "run"))
    # ale-py presses FIRE at every game start unless told not to; only Atari has it
    env.setdefault("fire_reset", True if env.get("suite", "atari") == "atari" else None)
    network.setdefault("init", "data_dependent")
    network.setdefault("hidden_init_scale", 1.0)
    agent.setdefault("epsilon_decay_after_learning_starts", False)  # the decay counted from agent step 0
    run.setdefault("dormant_tau", 0.0)  # units never active
    return saved


def load_run_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DQNConfig:
    """The config a run directory was made with (its ``config.yaml``; keys added since read as
    :func:`with_older_defaults` says, so a resume behaves as the run did), plus ``section.key=value``
    overrides."""
    saved = read_run_config(run_dir, "scripts/train_dqn.py")  # missing, empty or damaged: a ConfigError naming it
    path = Path(run_dir) / "config.yaml"
    return load_config(DQNConfig, path, list(overrides), data=with_older_defaults(saved))
