"""Our DQN against stable-baselines3's DQN, side by side in one invocation.

``throughput``: steps per second of the whole training loop (acting, env, replay, updates) on the same
game and settings, interleaved in chunks (ours, SB3, ours, SB3, ...) after a warm-up, so both see the
same machine load; prints SPS for both and the ratio. Atari uses a 100k replay for both (SB3 stores
stacked frames, so a 1M buffer does not fit beside ours on a small machine).

``returns``: MinAtar Breakout with SB3's DQN settings for the same network (conv 16@3x3 + fc 128,
normal parameterization, Adam, Huber, max grad norm 10), both trained for the same number of agent
steps in this invocation; prints the mean return of the last 100 training episodes of each.

    python scripts/bench_dqn_sb3.py throughput --game atari:breakout --steps 2000
    python scripts/bench_dqn_sb3.py throughput --game minatar:breakout --steps 5000
    python scripts/bench_dqn_sb3.py returns --steps 150000 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from agents.dqn.config import load_dqn_config
from agents.dqn.envs import MINATAR_GAMES
from agents.dqn.runner import Trainer
from wn_rl.parameterization import Parameterization
from wn_rl.provenance import provenance


def _settings(suite: str, num_envs: int, steps: int, learning_starts: int, replay: int) -> dict:
    """Shared settings: Atari = Nature ratio (one update per 4 agent steps, batch 32); MinAtar =
    one update per agent step, batch 32, target sync every 1000 updates."""
    if suite == "atari":
        return {
            "batch": 32,
            "steps_per_update": 4,
            "target": 1000,
            "lr": 1e-4,
            "replay": replay,
            "learning_starts": learning_starts,
            "num_envs": num_envs,
            "decay": steps,
        }
    return {
        "batch": 32,
        "steps_per_update": 1,
        "target": 1000,
        "lr": 2.5e-4,
        "replay": replay,
        "learning_starts": learning_starts,
        "num_envs": num_envs,
        "decay": 100_000,
    }


def build_ours(suite: str, game: str, s: dict, total: int, seed: int, runs_dir: str, parameterization: str) -> Trainer:
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
    ]
    if suite == "minatar":
        overrides.append("env.repeat_action_probability=0.1")
    return Trainer(load_dqn_config(None, overrides), f"{runs_dir}/ours-{suite}-{game}-{parameterization}-{seed}")


class MinAtarFeatures(nn.Module):
    """SB3 features extractor: the same MinAtar body our Q-network uses (normal parameterization)."""

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 128) -> None:
        from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

        BaseFeaturesExtractor.__init__(self, observation_space, features_dim)  # type: ignore[arg-type]
        c, h, w = observation_space.shape
        p = Parameterization.get("normal")
        self.net = nn.Sequential(
            p.conv2d(c, 16, 3), nn.ReLU(), nn.Flatten(), p.linear(16 * (h - 2) * (w - 2), 128), nn.ReLU()
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


def _sb3_features_class() -> type:
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    return type(
        "MinAtarExtractor",
        (BaseFeaturesExtractor,),
        {"__init__": MinAtarFeatures.__init__, "forward": MinAtarFeatures.forward},
    )


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


def build_sb3(suite: str, game: str, s: dict, total: int, seed: int):
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
        policy, kwargs, extra = "MlpPolicy", {"features_extractor_class": _sb3_features_class(), "net_arch": []}, {}
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
        device="auto",
        **extra,
    )


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput(args: argparse.Namespace) -> dict:
    suite, game = args.game.split(":")
    s = _settings(suite, args.num_envs, args.warmup + args.steps * args.rounds, args.learning_starts, args.replay)
    total = args.warmup + args.steps * args.rounds + 10 * args.num_envs
    with tempfile.TemporaryDirectory() as runs_dir:
        ours = {p: build_ours(suite, game, s, total, 0, runs_dir, p) for p in args.parameterizations}
        sb3 = build_sb3(suite, game, s, total, 0)
        for trainer in ours.values():
            trainer.start()
            trainer.advance(args.warmup)
        sb3.learn(args.warmup)
        times = {name: 0.0 for name in [*ours, "sb3"]}
        steps = {name: 0 for name in times}
        for _ in range(args.rounds):
            for name, trainer in ours.items():
                target, before = trainer.agent_step + args.steps, trainer.agent_step
                times[name] += _timed(lambda t=trainer, target=target: t.advance(target))
                steps[name] += trainer.agent_step - before
            before = sb3.num_timesteps
            times["sb3"] += _timed(lambda: sb3.learn(args.steps, reset_num_timesteps=False))
            steps["sb3"] += sb3.num_timesteps - before
        updates = {name: t.learner.updates for name, t in ours.items()}
        for trainer in ours.values():
            trainer.finish()
    sps = {name: steps[name] / times[name] for name in times}
    ratios = {f"ours_{name}/sb3": sps[name] / sps["sb3"] for name in ours}
    return {
        "game": args.game,
        "settings": s,
        "sps": sps,
        "ratio": ratios,
        "steps": steps,
        "updates_ours": updates,
        "sb3_updates": sb3._n_updates,
    }


def _returns_ours(seed: int, steps: int, runs_dir: str) -> dict:
    torch.set_num_threads(1)
    trainer = build_ours(
        "minatar", "breakout", _settings("minatar", 1, steps, 5000, 100_000), steps, seed, runs_dir, "normal"
    )
    seconds = _timed(trainer.run)
    return {
        "last100_return": float(np.mean(trainer.tracker.recent)),
        "sps": steps / seconds,
        "episodes": trainer.tracker.episodes,
    }


def _returns_sb3(seed: int, steps: int) -> dict:
    torch.set_num_threads(1)
    model = build_sb3("minatar", "breakout", _settings("minatar", 1, steps, 5000, 100_000), steps, seed)
    seconds = _timed(lambda: model.learn(steps))
    return {"last100_return": float(np.mean([e["r"] for e in model.ep_info_buffer])), "sps": steps / seconds}


def returns(args: argparse.Namespace) -> dict:
    """Both trained at the same time in two processes (one torch thread each) on the same machine."""
    from concurrent.futures import ProcessPoolExecutor

    out = {
        "game": "minatar:breakout",
        "steps": args.steps,
        "settings": _settings("minatar", 1, args.steps, 5000, 100_000),
        "seeds": {},
    }
    with tempfile.TemporaryDirectory() as runs_dir, ProcessPoolExecutor(max_workers=2) as pool:
        for seed in args.seeds:
            ours = pool.submit(_returns_ours, seed, args.steps, runs_dir)
            sb3 = pool.submit(_returns_sb3, seed, args.steps)
            out["seeds"][seed] = {"ours": ours.result(), "sb3": sb3.result()}
            print(json.dumps({seed: out["seeds"][seed]}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("throughput", help="SPS of ours and SB3's DQN, interleaved")
    t.add_argument("--game", default="atari:breakout", help="atari:<rom> or minatar:<game>")
    t.add_argument("--num-envs", type=int, default=4)
    t.add_argument("--steps", type=int, default=1000, help="agent steps per timed chunk")
    t.add_argument("--rounds", type=int, default=3, help="interleaved chunks per implementation")
    t.add_argument("--warmup", type=int, default=2000, help="agent steps before timing (learning starts inside)")
    t.add_argument("--learning-starts", type=int, default=1000)
    t.add_argument("--replay", type=int, default=100_000, help="replay capacity for both (transitions)")
    t.add_argument("--parameterizations", nargs="+", default=["normal", "weight_norm"])
    t.add_argument("--threads", type=int, default=None, help="torch threads for both")
    r = sub.add_parser("returns", help="MinAtar Breakout return after N agent steps, ours vs SB3")
    r.add_argument("--steps", type=int, default=150_000)
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = throughput(args) if args.mode == "throughput" else returns(args)
    result["torch_threads"] = torch.get_num_threads()
    result["provenance"] = {k: provenance()[k] for k in ("git", "versions", "hardware", "time_utc")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
