"""Score a saved DQN agent: ``python scripts/evaluate.py RUN_DIR [--games 30] [--video agent.gif]``.

Loads the run's ``config.yaml`` and its newest complete checkpoint, plays complete games with the
run's evaluation settings (epsilon 0.05, the play-time limit) and prints the scores as JSON.
``--video`` writes a GIF (or an MP4 when imageio with ffmpeg is installed) of env 0 playing: the
network's own 84x84 grayscale input for Atari, the channels for MinAtar.

Exit codes: 0 done; 2 bad input or no loadable checkpoint; 1 the video could not be written (a full disk:
the message names the file, and no partial video is left).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from agents.dqn.config import load_run_config
from agents.dqn.envs import make_env
from agents.dqn.evaluation import evaluate, load_q_network, select_actions
from wn_rl.checkpoint import CheckpointError, atomic_write_bytes, load_latest_checkpoint
from wn_rl.cli import brief_warnings
from wn_rl.config import ConfigError, resolve_device


def _frame_image(obs: np.ndarray, suite: str) -> np.ndarray:
    """One uint8 image for env 0's observation."""
    if suite == "atari":
        return obs[0, -1]
    if suite == "minatar":
        channels = obs[0].astype(np.int64)
        return (channels * np.arange(1, channels.shape[0] + 1)[:, None, None]).max(0).astype(np.uint8) * (
            255 // channels.shape[0]
        )
    raise ValueError("--video needs image observations (Atari or MinAtar)")


def record_video(q_network, env, epsilon: float, path: Path, max_steps: int, device) -> int:
    """Play env 0 until its first game ends (or ``max_steps``) and write the frames to ``path``; a write that
    fails (a full disk) raises :class:`CheckpointError` naming ``path``."""
    obs = env.reset(seed=12345)
    frames = [_frame_image(obs, env.spec.suite)]
    q_network.eval()
    for _ in range(max_steps):
        actions = select_actions(q_network, torch.from_numpy(obs).to(device), epsilon, env.spec.n_actions)
        step = env.step(actions.cpu().numpy())
        obs = step.obs
        frames.append(_frame_image(obs, env.spec.suite))
        if step.terminated[0] or step.truncated[0]:
            break
    if path.suffix.lower() == ".mp4":
        try:
            import imageio.v2 as imageio
        except ImportError:
            raise SystemExit("writing MP4 needs `pip install imageio imageio-ffmpeg`; or use a .gif path") from None
        try:
            imageio.mimwrite(path, frames, fps=15)
        except OSError as exc:  # a full disk: no truncated video is left to look valid
            path.unlink(missing_ok=True)
            raise CheckpointError(f"could not write {path}: {exc.strerror or exc} (errno {exc.errno})") from exc
        except ValueError as exc:  # imageio found no writer for the format
            path.unlink(missing_ok=True)
            hint = "`pip install imageio-ffmpeg`, or use a .gif"
            raise CheckpointError(f"could not write {path}: {exc}; {hint}") from exc
    else:
        try:
            from PIL import Image
        except ImportError:
            raise SystemExit("writing a GIF needs Pillow: `pip install pillow` (or the plot extra)") from None

        scale = 4 if env.spec.suite == "atari" else 24
        images = [Image.fromarray(f).resize((f.shape[1] * scale // 2, f.shape[0] * scale // 2)) for f in frames]
        gif = io.BytesIO()
        images[0].save(gif, format="GIF", save_all=True, append_images=images[1:], duration=66, loop=0)
        atomic_write_bytes(path, gif.getvalue())  # a full disk: CheckpointError naming the path, no partial file
    return len(frames)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory written by scripts/train_dqn.py")
    parser.add_argument("--games", type=int, default=None, help="complete games (default: the run's eval.games)")
    parser.add_argument("--epsilon", type=float, default=None, help="exploration (default: the run's eval.epsilon)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--video", type=Path, default=None, help="write a .gif or .mp4 of env 0 playing")
    parser.add_argument("--video-steps", type=int, default=5000, help="at most this many agent steps in the video")
    args = parser.parse_args(argv)
    if args.games is not None and args.games < 1:
        parser.error(f"--games {args.games}: give at least 1 complete game (or leave it out for the run's eval.games)")
    if args.epsilon is not None and not 0.0 <= args.epsilon <= 1.0:
        parser.error(f"--epsilon {args.epsilon}: expected a probability in [0, 1] (the paper evaluates at 0.05)")
    if args.video_steps < 1:
        parser.error(f"--video-steps {args.video_steps}: expected at least 1 agent step")
    if args.video is not None and args.video.suffix.lower() not in (".gif", ".mp4"):
        parser.error(f"--video {args.video}: expected a .gif or .mp4 file name (the format follows the extension)")
    if args.video is not None and (missing := _missing_video_writer(args.video)):
        parser.error(f"--video {args.video}: {missing}")  # before any game is played
    if args.video is not None and (unwritable := _unwritable_folder(args.video)):
        parser.error(f"--video {args.video}: {unwritable}")  # the video is written after every game
    return args


def _unwritable_folder(path: Path) -> str | None:
    """Why ``path`` cannot be written (its folder missing, not a folder or read-only; ``path`` a folder), or None."""
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        return f"its folder {folder} {what}; create it first or give a path in one"
    if path.is_dir():
        return f"{path} is a folder; give a file name, e.g. {path / 'agent.gif'}"
    if not os.access(folder, os.W_OK):
        return f"its folder {folder} is not writable; give a path in a folder you can write to"
    return None


def _missing_video_writer(path: Path) -> str | None:
    """What writing ``path`` needs and is not installed (``None``: all there). MP4 needs imageio with its ffmpeg
    plugin: imageio alone fails at the write ("could not find a backend"), after every evaluation game."""
    needs = ("imageio", "imageio_ffmpeg") if path.suffix.lower() == ".mp4" else ("PIL",)
    if all(importlib.util.find_spec(name) is not None for name in needs):
        return None
    if path.suffix.lower() == ".mp4":
        return "writing MP4 needs `pip install imageio imageio-ffmpeg`; or use a .gif path"
    return "writing a GIF needs Pillow: `pip install pillow` (or the plot extra)"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        print(f"error: {run_dir} has no config.yaml; pass a directory written by scripts/train_dqn.py", file=sys.stderr)
        return 2
    try:
        config = load_run_config(run_dir)  # the env settings the agent was trained with; an empty one is no run
        device = resolve_device(args.device, "--device")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.video is not None and config.env.suite not in ("atari", "minatar"):
        print(
            f"error: --video needs image observations (Atari or MinAtar), not env.suite={config.env.suite!r}; "
            "leave out --video",
            file=sys.stderr,
        )
        return 2
    try:
        # mapped on the CPU: only the Q-network is read and moved to the device (load_state_dict copies it), never
        # the replay memory that a run with run.save_replay=true checkpoints (GBs for Atari)
        found = load_latest_checkpoint(run_dir / "checkpoints", mmap=True)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if found is None:
        print(f"error: {run_dir / 'checkpoints'} holds no complete checkpoint", file=sys.stderr)
        return 2
    path, state = found
    try:  # before the envs are built: a checkpoint that does not fit config.yaml, or an env that cannot be built
        q_network = load_q_network(config, state["learner"]["q_network"], path, run_dir, device)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    v, e = config.eval, config.env
    limit = v.max_episode_frames if e.suite == "atari" else v.max_episode_steps
    env = make_env(e, evaluation=True, num_envs=v.num_envs, eval_limit=limit)
    epsilon = v.epsilon if args.epsilon is None else args.epsilon
    games = v.games if args.games is None else args.games
    result = evaluate(q_network, env, games, epsilon, seed=2**20, device=device)
    result.update(checkpoint=str(path), agent_step=state["counters"]["agent_step"], epsilon=epsilon)
    if args.video is not None:
        video_env = make_env(e, evaluation=True, num_envs=1, eval_limit=limit)
        result["video"] = str(args.video)
        try:
            result["video_frames"] = record_video(q_network, video_env, epsilon, args.video, args.video_steps, device)
        except CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            env.close()
            return 1
        finally:
            video_env.close()
    env.close()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    brief_warnings()
    sys.exit(main())
