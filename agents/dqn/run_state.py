"""What a DQN checkpoint holds besides the networks, the optimizer and the replay memory, so that a
resumed run continues exactly where it stopped: the global RNG states, the loop's carried state (the
current observation, the episode-boundary flags, the running returns) and the state of every game
(:mod:`agents.dqn.env_state`). All of it is tensors and plain data, for ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch

from agents.dqn.envs import VecEnv

__all__ = [
    "games_for_config",
    "games_state",
    "loop_state",
    "restore_tracker",
    "rng_state",
    "seed_everything",
    "set_rng_state",
]


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global generators' states (Python and numpy as JSON strings, torch as tensors)."""
    state = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate())}
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in np_state["state"].items()}
    state["numpy"] = json.dumps(np_state)
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the states from :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = json.loads(state["numpy"])
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loop_state(obs: torch.Tensor, first: torch.Tensor, final: torch.Tensor, tracker: Any) -> dict[str, Any]:
    """What the loop carries from one vector step to the next, and the episodes in progress."""
    return {
        "obs": obs.cpu(),
        "first": first.clone(),
        "final": final.clone(),
        "episode_returns": torch.from_numpy(tracker.returns.copy()),
        "episode_lengths": torch.from_numpy(tracker.lengths.copy()),
        "recent_returns": list(tracker.recent),
        "finished_episodes": [list(episode) for episode in tracker.finished],  # not yet logged
    }


def restore_tracker(tracker: Any, loop: dict[str, Any], *, games_continue: bool = True) -> None:
    """Put the episodes of :func:`loop_state` back into a fresh tracker: those finished and not yet logged and the
    recent returns always, those in progress only where their games continue (fresh games start from zero)."""
    if games_continue:
        tracker.returns[:] = loop["episode_returns"].numpy()
        tracker.lengths[:] = loop["episode_lengths"].numpy()
    tracker.recent.extend(loop.get("recent_returns", []))
    tracker.finished = [(float(r), int(n)) for r, n in loop.get("finished_episodes", [])]


def games_state(env: VecEnv, eval_env: VecEnv | None) -> dict[str, Any]:
    """The training games and, once built, the evaluation games; raises ``EnvStateError`` when either
    env cannot capture its state."""
    games = {"games": env.env_state()}
    if eval_env is not None:
        games["eval_games"] = eval_env.env_state()
    return games


def games_for_config(loop: dict | None, saved: dict, now: dict) -> dict | None:
    """``loop`` without the saved games whose env settings changed since (a resume forced past the config
    check): restoring them would bring back the old settings (time limit, sticky actions...)."""
    if loop is None or "games" not in loop:
        return loop
    loop = dict(loop)
    eval_keys = ("num_envs", "max_episode_steps", "max_episode_frames")
    if any(saved["eval"].get(k) != now["eval"].get(k) for k in eval_keys):
        loop.pop("eval_games", None)  # evaluation builds a fresh env
    if saved["env"] != now["env"]:
        changed = sorted(k for k in now["env"] if saved["env"].get(k) != now["env"][k])
        loop.pop("games")
        loop["games_missing"] = f"env settings changed since the checkpoint: {', '.join(changed)}"
    return loop
