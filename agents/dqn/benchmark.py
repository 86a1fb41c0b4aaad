"""Our DQN against stable-baselines3's DQN on the same game and settings (for ``scripts/bench_dqn_*.py``).

Settings shared by both sides: Atari uses the Nature ratio (one update per 4 agent steps), MinAtar one
update per agent step; minibatch 32 (SB3's default; the paper's 64 on request), target sync every 1000
updates. Both use Adam, the Huber loss, max grad norm 10 and the same replay capacity (100k by default:
SB3 stores stacked frames, so a 1M buffer does not fit beside ours on a small machine). SB3 gets the
same network: ``CnnPolicy`` (the Nature CNN) on Atari, the MinAtar CNN (conv 16@3x3, fc 128,
``normal``) on MinAtar.

:func:`throughput` times whole training loops (acting, env, replay, updates) in interleaved chunks
(ours in each configuration, SB3, repeat) after a warm-up, so all see the same machine load.
:func:`profile_loop` splits one of our loops into env, acting, replay writes and learning (sampling
plus update; with ``run.acting=in_update`` the acting done inside an update counts as learning), and
times the updates alone: the bound ``agent_steps_per_update / update_seconds``.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from agents.dqn.config import load_dqn_config
from agents.dqn.envs import MINATAR_GAMES
from agents.dqn.overlap import UpdateRunner
from agents.dqn.replay import ReplayBatch
from agents.dqn.runner import Trainer
from wn_rl.parameterization import Parameterization

__all__ = [
    "Contender",
    "build_ours",
    "build_sb3",
    "profile_loop",
    "random_batch",
    "random_batch_of",
    "settings_for",
    "throughput",
]


GAME_BATCHES = {  # (frame shape, actions, density of nonzero pixels: MinAtar's planes are sparse 0/1)
    "minatar": ((4, 10, 10), 3, 0.1),
    "atari": ((4, 84, 84), 4, None),
}


def random_batch(game: str, batch_size: int, device: torch.device | str = "cpu") -> ReplayBatch:
    """A random minibatch shaped like ``game``'s (a key of :data:`GAME_BATCHES`), the same for every call:
    for comparing update paths on one batch (``scripts/bench_compiled_check.py``, the tests)."""
    shape, n_actions, density = GAME_BATCHES[game]
    return random_batch_of(shape, n_actions, batch_size, device, density)


def random_batch_of(
    shape: tuple[int, ...], n_actions: int, batch_size: int, device: torch.device | str, density: float | None
) -> ReplayBatch:
    """A random minibatch of uint8 frames of ``shape`` (0-255, or 0/1 with ``density`` of ones), the same
    for every call with the same arguments."""
    g = torch.Generator().manual_seed(0)

    def frames() -> torch.Tensor:
        if density is None:
            return torch.randint(0, 256, (batch_size, *shape), generator=g, dtype=torch.uint8)
        return (torch.rand(batch_size, *shape, generator=g) < density).to(torch.uint8)

    batch = ReplayBatch(
        obs=frames(),
        actions=torch.randint(0, n_actions, (batch_size,), generator=g),
        rewards=torch.randint(-1, 2, (batch_size, 1), generator=g).float(),
        terminals=torch.rand(batch_size, 1, generator=g) < 0.1,
        truncations=torch.zeros(batch_size, 1, dtype=torch.bool),
        next_obs=frames(),
        next_offsets=torch.ones(batch_size, dtype=torch.long),
        indices=torch.arange(batch_size),
    )
    return ReplayBatch(**{f.name: getattr(batch, f.name).to(device) for f in fields(batch)})


def settings_for(
    suite: str, num_envs: int, learning_starts: int, replay: int, decay: int, batch: int = 32
) -> dict[str, Any]:
    """The settings both implementations use (see the module docstring)."""
    atari = suite == "atari"
    return {
        "batch": batch,
        "steps_per_update": 4 if atari else 1,
        "target": 1000,
        "lr": 1e-4 if atari else 2.5e-4,
        "replay": replay,
        "learning_starts": learning_starts,
        "num_envs": num_envs,
        "decay": decay,
    }


def build_ours(
    suite: str,
    game: str,
    s: dict,
    total: int,
    seed: int,
    runs_dir: str,
    parameterization: str,
    extra: tuple[str, ...] = (),
) -> Trainer:
    """Our trainer with the shared settings; ``extra`` are further ``section.key=value`` overrides."""
    overrides = [
        f"env.suite={suite}",
        f"env.name={game}",
        f"env.num_envs={s['num_envs']}",
        f"network.parameterization={parameterization}",
        "agent.optimizer=adam",
        "agent.beta1=0.9",
        f"agent.lr={s['lr']}",
        f"agent.batch_size={s['batch']}",
        f"agent.replay_capacity_transitions={s['replay']}",
        f"agent.learning_starts_agent_steps={s['learning_starts']}",
        f"agent.agent_steps_per_update={s['steps_per_update']}",
        f"agent.target_update_every_updates={s['target']}",
        f"agent.epsilon_decay_agent_steps={s['decay']}",
        "agent.epsilon_decay_after_learning_starts=false",  # SB3's schedule: the decay counts from step 0
        "agent.max_grad_norm=10",
        f"run.total_agent_steps={total}",
        "eval.every_agent_steps=0",
        f"run.seed={seed}",
        "run.checkpoint_every_agent_steps=0",
        f"run.runs_dir={runs_dir}",
        "run.progress_bar=false",
        "run.log_every_agent_steps=10000",
        "run.wn_stats_every_agent_steps=100000",
        "network.ddi_batch_size=32",
        *(["env.repeat_action_probability=0.1"] if suite == "minatar" else []),
        *extra,
    ]
    name = "-".join([suite, game, parameterization, *(o.split("=")[-1] for o in extra), str(seed)])
    return Trainer(load_dqn_config(None, overrides), f"{runs_dir}/{name}")


def _minatar_extractor() -> type:
    """SB3 features extractor class: the same MinAtar body our Q-network uses (``normal``)."""
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class MinAtarExtractor(BaseFeaturesExtractor):
        def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 128) -> None:
            super().__init__(observation_space, features_dim)
            c, h, w = observation_space.shape
            p = Parameterization.get("normal")
            self.net = nn.Sequential(
                p.conv2d(c, 16, 3), nn.ReLU(), nn.Flatten(), p.linear(16 * (h - 2) * (w - 2), 128), nn.ReLU()
            )

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            return self.net(obs)

    return MinAtarExtractor


def _minatar_env_fn(game: str, seed: int) -> Callable[[], gym.Env]:
    import minatar.gym
    from stable_baselines3.common.monitor import Monitor

    def make() -> gym.Env:
        env_id = f"MinAtar/{MINATAR_GAMES[game]}-v1"
        if env_id not in gym.registry:
            minatar.gym.register_envs()
        env = gym.make(env_id, sticky_action_prob=0.1)
        h, w, c = env.observation_space.shape
        space = gym.spaces.Box(0.0, 1.0, (c, h, w), np.float32)
        env = gym.wrappers.TransformObservation(env, lambda o: o.transpose(2, 0, 1).astype(np.float32), space)
        env = Monitor(env)  # episode returns for SB3's ep_info_buffer
        env.reset(seed=seed)
        return env

    return make


def build_sb3(suite: str, game: str, s: dict, total: int, seed: int, device: str = "auto") -> Any:
    """SB3's DQN with the shared settings (its standard Atari wrappers + ``VecFrameStack(4)``)."""
    from stable_baselines3 import DQN
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import DummyVecEnv, VecFrameStack

    if suite == "atari":
        import ale_py

        gym.register_envs(ale_py)
        env_id = "".join(part.title() for part in game.split("_")) + "NoFrameskip-v4"
        env = VecFrameStack(make_atari_env(env_id, n_envs=s["num_envs"], seed=seed), n_stack=4)
        policy, kwargs = "CnnPolicy", {}
        extra = {"optimize_memory_usage": True, "replay_buffer_kwargs": {"handle_timeout_termination": False}}
    else:
        env = DummyVecEnv([_minatar_env_fn(game, seed + i) for i in range(s["num_envs"])])
        policy, kwargs, extra = "MlpPolicy", {"features_extractor_class": _minatar_extractor(), "net_arch": []}, {}
    return DQN(
        policy,
        env,
        learning_rate=s["lr"],
        buffer_size=s["replay"],
        learning_starts=s["learning_starts"],
        batch_size=s["batch"],
        train_freq=max(1, s["steps_per_update"] // s["num_envs"]),
        gradient_steps=max(1, s["num_envs"] // s["steps_per_update"]),
        target_update_interval=s["target"],
        exploration_fraction=min(1.0, s["decay"] / total),
        exploration_final_eps=0.1,
        max_grad_norm=10,
        policy_kwargs=kwargs,
        seed=seed,
        verbose=0,
        device=device,
        **extra,
    )


@dataclass
class Contender:
    """One side of the comparison: ``advance(n)`` runs n more agent steps, ``steps()`` counts them."""

    name: str
    advance: Callable[[int], None]
    steps: Callable[[], int]
    close: Callable[[], None]


def ours_contender(name: str, trainer: Trainer) -> Contender:
    trainer.start()
    return Contender(
        name, lambda n: trainer.advance(trainer.agent_step + n), lambda: trainer.agent_step, trainer.finish
    )


def sb3_contender(model: Any) -> Contender:
    def advance(n: int) -> None:
        model.learn(n, reset_num_timesteps=model.num_timesteps == 0)

    return Contender("sb3", advance, lambda: model.num_timesteps, model.env.close)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def throughput(
    contenders: list[Contender], warmup: int, steps: int, rounds: int, failures: dict[str, str] | None = None
) -> dict[str, float]:
    """Agent steps per second of each contender over ``rounds`` interleaved chunks of ``steps``.

    A contender that raises (a mode that fails to compile, say) is closed and dropped with its traceback
    on stderr, and the others go on: one broken configuration does not cost a whole benchmark run on a
    borrowed GPU. Its error goes into ``failures`` (by name) when given; it gets no SPS."""
    failures = {} if failures is None else failures
    live = list(contenders)

    def attempt(c: Contender, n: int) -> bool:
        try:
            c.advance(n)
            _synchronize()
            return True
        except Exception as exc:  # reported below; the other contenders go on
            traceback.print_exc()
            failures[c.name] = f"{type(exc).__name__}: {exc}"
            live.remove(c)
            with contextlib.suppress(Exception):
                c.close()
            return False

    for c in list(live):
        attempt(c, warmup)  # learning starts inside the warm-up; compilation happens here
    seconds = {c.name: 0.0 for c in live}
    done = dict.fromkeys(seconds, 0)
    for _ in range(rounds):
        for c in list(live):
            before, t0 = c.steps(), time.perf_counter()
            if attempt(c, steps):
                seconds[c.name] += time.perf_counter() - t0
                done[c.name] += c.steps() - before
    return {c.name: done[c.name] / seconds[c.name] for c in live}


class _Timed:
    """Wraps a callable, accumulating its wall time (with a device synchronisation after each call)."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        _synchronize()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def profile_loop(trainer: Trainer, steps: int) -> dict[str, float]:
    """Where ``steps`` agent steps of ``trainer`` (started and warmed up) spend their time, in ms per
    agent step, and the bound set by the updates alone (``bound_sps``). Timers synchronise the device,
    so the loop runs a little slower than unprofiled. The updates run inline here (a worker thread's
    time would overlap the others), so the parts add up to the sequential loop's step."""
    runner = trainer.update_runner
    trainer.update_runner = UpdateRunner(trainer.learner, trainer.replay, runner.batch_size, "inline")
    try:
        return _profile_parts(trainer, steps)
    finally:
        trainer.update_runner = runner
        runner.mark_changed()


def _profile_parts(trainer: Trainer, steps: int) -> dict[str, float]:
    # env: the whole env step, made sequential (sent actions are stepped in recv, after the updates), so
    # that the emulators' time is not hidden behind the updates'.
    # learn: the updates, including the first update of a step that also picks the actions (run.acting)
    env, cls, sent = trainer.env, type(trainer.env), []

    def sequential_recv() -> Any:  # the class's send and recv, back to back
        cls.send(env, sent.pop())
        return cls.recv(env)

    env.send, env.recv = sent.append, sequential_recv
    parts = {
        "env": [(env, "recv")],
        "acting": [(trainer, "_act")],
        "replay_add": [(trainer.replay, "add")],
        "learn": [(trainer.learner, "sample_and_update"), (trainer.learner, "act_sample_and_update")],
    }
    timers = {name: [_Timed(getattr(owner, attr)) for owner, attr in places] for name, places in parts.items()}
    for name, places in parts.items():
        for (owner, attr), timer in zip(places, timers[name], strict=True):
            setattr(owner, attr, timer)
    before, t0 = trainer.agent_step, time.perf_counter()
    try:
        trainer.advance(trainer.agent_step + steps)
        _synchronize()
    finally:
        for places in parts.values():
            for owner, attr in places:
                delattr(owner, attr)  # back to the class's method
        del env.send
    total, n = time.perf_counter() - t0, trainer.agent_step - before
    seconds = {name: sum(t.seconds for t in ts) for name, ts in timers.items()}
    out = {f"{name}_ms": 1e3 * value / n for name, value in seconds.items()}
    out["other_ms"] = 1e3 * (total - sum(seconds.values())) / n
    out["total_ms"] = 1e3 * total / n
    update_seconds = seconds["learn"] / max(sum(t.calls for t in timers["learn"]), 1)
    out["update_ms"] = 1e3 * update_seconds
    out["bound_sps"] = trainer.config.agent.agent_steps_per_update / update_seconds
    out["sps"] = n / total
    out["sps_vs_bound"] = out["sps"] / out["bound_sps"]
    return out
