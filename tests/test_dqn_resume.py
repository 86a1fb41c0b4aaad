"""Exact resume of the native DQN (issue #5, promise 2): the games' state as plain data, N steps straight
equal to N/2 + kill + resume + N/2 bit for bit, and a randomized SIGKILL soak through the script.
Tiny CartPole/MinAtar runs on CPU, one thread."""

from __future__ import annotations

import copy
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.dqn.config import EnvConfig, load_dqn_config
from agents.dqn.env_state import EnvStateError, capture, restore
from agents.dqn.envs import make_env
from agents.dqn.runner import Trainer
from wn_rl.checkpoint import MARKER_SUFFIX, CheckpointError, complete_checkpoints, load_checkpoint, read_marker

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "gym": ROOT / "configs" / "dqn" / "cartpole.yaml",
    "minatar": ROOT / "configs" / "dqn" / "minatar_breakout.yaml",
}


def _through_a_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "config",
    [EnvConfig(suite="gym", name="CartPole-v1", num_envs=3, max_episode_steps=40)]
    + [EnvConfig(suite="minatar", name=game, num_envs=3) for game in ("asterix", "freeway", "seaquest")],
    ids=lambda c: c.name,
)
def test_saved_games_continue_identically_in_a_new_env(config):
    played = make_env(config)
    played.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(120):
        played.step(rng.integers(0, played.spec.n_actions, 3))
    state = _through_a_checkpoint(played.env_state())
    restored, fresh = make_env(config), make_env(config)
    restored.load_env_state(state)
    fresh.reset(seed=3)
    same_as_fresh = True
    for _ in range(300):
        actions = rng.integers(0, played.spec.n_actions, 3)
        a, b, c = played.step(actions), restored.step(actions), fresh.step(actions)
        for field in ("obs", "rewards", "terminated", "truncated", "episode_start"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
        same_as_fresh &= np.array_equal(a.obs, c.obs)
    assert not same_as_fresh  # the check can fail: a fresh env plays other games


def test_state_round_trip_keeps_types_values_and_shared_objects():
    env = gym.make("CartPole-v1")
    env.reset(seed=0)
    for _ in range(3):
        env.step(0)
    game = env.unwrapped
    game.extra = [np.int64(3), (1.5, None, "s"), {"a": np.arange(3, dtype=np.float32), 7: np.bool_(True)}]
    game.shared = game.np_random  # one generator reachable twice, as MinAtar's game and wrapper share one
    game.legacy = np.random.RandomState(5)
    state = _through_a_checkpoint(capture(env))
    fresh = gym.make("CartPole-v1")
    restore(fresh, state)
    new = fresh.unwrapped
    assert type(new.extra[0]) is np.int64 and new.extra[0] == 3 and new.extra[1] == (1.5, None, "s")
    assert new.extra[2]["a"].dtype == np.float32 and np.array_equal(new.extra[2]["a"], [0, 1, 2])
    assert type(new.extra[2][7]) is np.bool_
    assert new.shared is new.np_random and new.np_random.random() == game.np_random.random()
    assert new.legacy.randint(10**9) == game.legacy.randint(10**9)
    assert np.array_equal(new.state, game.state) and fresh.get_wrapper_attr("_elapsed_steps") == 3


def test_unsigned_arrays_are_saved_as_signed_bits_and_old_unsigned_tensors_still_restore():
    """uint16/32/64 arrays (a RandomState's key) travel as the signed tensor of their width, which every
    supported torch saves (torch < 2.6 cannot save unsigned ones); states written before, which hold the
    unsigned tensor itself (on torch >= 2.6), restore the same."""
    game = gym.make("CartPole-v1").unwrapped
    game.legacy = np.random.RandomState(5)
    game.wide = np.array([2**64 - 1, 0, 2**63], dtype=np.uint64)
    state = _through_a_checkpoint(capture(game))
    key = state["attrs"]["legacy"]["v"]["v"][1]
    assert key["dtype"] == "<u4" and key["v"].dtype == torch.int32
    old = copy.deepcopy(state)
    for encoded in (old["attrs"]["legacy"]["v"]["v"][1], old["attrs"]["wide"]):
        encoded["v"] = torch.from_numpy(encoded["v"].numpy().view(encoded["dtype"]))  # as written before
    if torch.__version__ >= (2, 6):
        old = _through_a_checkpoint(old)
    expected = np.random.RandomState(5).randint(10**9, size=5)
    for saved in (state, old):
        fresh = gym.make("CartPole-v1").unwrapped
        restore(fresh, saved)
        assert np.array_equal(fresh.legacy.randint(10**9, size=5), expected)
        assert fresh.wide.dtype == np.uint64 and fresh.wide.tolist() == game.wide.tolist()


def test_a_value_that_is_not_plain_data_fails_loudly_naming_its_path():
    env = make_env(EnvConfig(suite="gym", name="CartPole-v1", num_envs=2))
    env.reset(seed=0)
    env.env.envs[1].unwrapped.emulator = threading.Lock()
    with pytest.raises(EnvStateError, match=r"envs\[1\]\.env\.env\.env\.emulator is a _thread\.lock"):
        env.env_state()


def _config(suite: str, tmp_path: Path, name: str, **extra: Any):
    base = {
        "run.total_agent_steps": 400,
        "agent.learning_starts_agent_steps": 100,
        "agent.replay_capacity_transitions": 1000,
        "agent.batch_size": 16,
        "agent.agent_steps_per_update": 2,
        "agent.target_update_every_updates": 40,
        "eval.every_agent_steps": 200,
        "eval.games": 2,
        "eval.num_envs": 2,
        "eval.max_episode_steps": 60,
        "run.log_every_agent_steps": 100,
        "run.checkpoint_every_agent_steps": 200,
        "run.save_replay": "true",
        "run.runs_dir": str(tmp_path),
        "run.name": name,
        "run.progress_bar": "false",
        "run.device": "cpu",
        "run.torch_threads": 1,
    }
    if suite == "minatar":
        base["network.ddi_batch_size"] = 32
    base.update(extra)
    return load_dqn_config(str(CONFIGS[suite]), [f"{k}={v}" for k, v in base.items()])


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two checkpoints differ: tensors by ``torch.equal``, plain data by ``==``. The sampling
    generators of observation/action spaces are skipped: gymnasium seeds them from OS entropy and never
    draws from them here."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and torch.equal(a, b) else [path]
    if isinstance(a, dict):
        if a.get("t") == "space":
            return []
        if set(a) != set(b):
            return [f"{path} keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list | tuple):
        if len(a) != len(b):
            return [f"{path} length"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    same = a == b or (isinstance(a, float) and np.isnan(a) and np.isnan(b))
    return [] if same else [f"{path}: {a!r} != {b!r}"]


def _final_state(run_dir: Path) -> dict[str, Any]:
    state = load_checkpoint(complete_checkpoints(run_dir / "checkpoints")[-1])
    state.pop("config")  # holds the run name
    return state


@pytest.mark.parametrize(
    ("suite", "update_mode"),
    [
        ("gym", "eager"),
        ("minatar", "eager"),
        pytest.param("gym", "compiled", marks=pytest.mark.compiled_functional_call),
    ],
)
def test_resume_after_a_kill_is_bit_identical_to_a_straight_run(tmp_path, suite, update_mode):
    mode = {"agent.update_mode": update_mode}
    Trainer(_config(suite, tmp_path, "straight", **mode), tmp_path / "straight").run()
    killed = Trainer(_config(suite, tmp_path, "killed", **mode), tmp_path / "killed")
    killed.start()
    killed.advance(300)  # checkpoint at 200 (after an evaluation), then 100 steps that die with the process
    killed.env.close()
    assert [p.name for p in complete_checkpoints(tmp_path / "killed" / "checkpoints")] == ["checkpoint_000000000200.pt"]
    resumed = Trainer(_config(suite, tmp_path, "killed", **mode), tmp_path / "killed")
    with pytest.warns(UserWarning, match="at agent step 200; the games continue"):
        summary = resumed.run()
    assert summary["agent_steps"] == 400 and summary["updates"] > 100
    assert resumed.learner.update_mode == update_mode
    straight, resumed_state = _final_state(tmp_path / "straight"), _final_state(tmp_path / "killed")
    assert _differences(straight, resumed_state) == []


def test_games_that_cannot_be_saved_warn_and_resume_with_fresh_games(tmp_path):
    config = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0})
    trainer = Trainer(config, tmp_path / "run")
    trainer.env.env.envs[0].unwrapped.emulator = threading.Lock()
    with pytest.warns(UserWarning, match=r"will not hold the games' state \(envs\[0\]\..*emulator is a _thread\.lock"):
        trainer.start()
        trainer.advance(200)
    trainer.env.close()
    with pytest.warns(
        UserWarning, match=r"fresh games \(the checkpoint holds no game state: envs\[0\]\..*_thread\.lock"
    ):
        summary = Trainer(config, tmp_path / "run").run()
    assert summary["agent_steps"] == 400


def test_fresh_games_after_a_resume_still_log_the_episodes_finished_before_it(tmp_path):
    """Where the games cannot continue (Atari always), the episodes that had finished but were not yet logged were
    dropped with the games in progress; only those in progress start again."""
    config = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0, "run.log_every_agent_steps": 400})
    trainer = Trainer(config, tmp_path / "run")
    trainer.env.env.envs[0].unwrapped.emulator = threading.Lock()  # the games cannot be saved
    with pytest.warns(UserWarning, match="will not hold the games' state"):
        trainer.start()
        trainer.advance(200)
    trainer.env.close()
    saved = load_checkpoint(complete_checkpoints(tmp_path / "run" / "checkpoints")[-1])["loop"]
    assert saved["finished_episodes"]  # CartPole episodes ended since the last log (none yet at 400 steps apart)
    resumed = Trainer(config, tmp_path / "run")
    assert resumed.resume()
    assert "no game state" in resumed._continue_games()
    assert resumed.tracker.finished == [(float(r), int(n)) for r, n in saved["finished_episodes"]]
    assert resumed.tracker.returns.sum() == 0 and resumed.tracker.lengths.sum() == 0  # fresh games
    resumed.env.close()


def test_a_forced_resume_with_changed_env_settings_starts_fresh_games(tmp_path):
    config = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0, "run.total_agent_steps": 200})
    Trainer(config, tmp_path / "run").run()
    changed = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0, "env.max_episode_steps": 50})
    trainer = Trainer(changed, tmp_path / "run", force=True)
    with pytest.warns(
        UserWarning, match=r"fresh games \(.*env settings changed since the checkpoint: max_episode_steps"
    ):
        trainer.run()
    assert trainer.env.env.envs[0]._max_episode_steps == 50  # the new setting holds


def _soak_command(tmp_path: Path) -> list[str]:
    overrides = {
        "run.total_agent_steps": 800,
        "agent.learning_starts_agent_steps": 200,
        "agent.replay_capacity_transitions": 2000,
        "eval.every_agent_steps": 0,
        "run.log_every_agent_steps": 200,
        "run.checkpoint_every_agent_steps": 40,  # often: many kills land inside a checkpoint write
        "run.keep_checkpoints": 3,
        "run.save_replay": "true",
        "run.runs_dir": str(tmp_path),
        "run.name": "soak",
        "run.progress_bar": "false",
        "run.device": "cpu",
    }
    script = [sys.executable, str(ROOT / "scripts" / "train_dqn.py"), "--config", str(CONFIGS["gym"])]
    return script + [f"{k}={v}" for k, v in overrides.items()]


def _interrupted_writes(checkpoints: Path) -> list[str]:
    """Files a killed writer leaves: temporary files, and checkpoints whose completion marker is missing."""
    names = os.listdir(checkpoints) if checkpoints.is_dir() else []
    unmarked = [n for n in names if n.endswith(".pt") and not n.startswith(".") and n + ".complete.json" not in names]
    return [n for n in names if ".tmp-" in n] + unmarked


def _kill_at_random(command: list[str], checkpoints: Path, rng: random.Random, inside_write: bool) -> bool:
    """Start the command, wait until it trains, and SIGKILL it at a random moment or, with ``inside_write``,
    while it writes a checkpoint (frozen with SIGSTOP the moment a temporary file appears). Returns whether
    the kill interrupted a write."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = set(checkpoints.glob("*.complete.json"))
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline and not set(checkpoints.glob("*.complete.json")) - before:
        time.sleep(0.01)  # until this process trains and has written a checkpoint
    if inside_write:
        tag = f".tmp-{proc.pid}"
        while proc.poll() is None and time.time() < deadline and not any(tag in n for n in os.listdir(checkpoints)):
            time.sleep(0.0002)
        proc.send_signal(signal.SIGSTOP)
    else:
        time.sleep(rng.uniform(0.0, 0.5))
    interrupted = proc.poll() is None and bool(_interrupted_writes(checkpoints))  # older leftovers were cleaned
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode in (-signal.SIGKILL, 0), err[-2000:]
    return interrupted


def test_sigkill_at_random_moments_then_rerunning_the_command_completes_identically(tmp_path):
    command, run_dir = _soak_command(tmp_path), tmp_path / "soak"
    checkpoints = run_dir / "checkpoints"
    interrupted_writes = 0
    for seed, inside_write in [(0, False), (1, True), (2, True)]:
        interrupted_writes += _kill_at_random(command, checkpoints, random.Random(seed), inside_write)
        for path in complete_checkpoints(checkpoints):  # every visible checkpoint is loadable and consistent
            state = load_checkpoint(path)
            step = state["counters"]["agent_step"]
            assert path.name == f"checkpoint_{step:012d}.pt" and read_marker(path)["metadata"]["agent_step"] == step
            assert (
                state["counters"]["updates"] == state["learner"]["updates"] == read_marker(path)["metadata"]["updates"]
            )
            assert state["replay"]["writes"] == step // 4  # one write per vector step of 4 envs
            owed = max(step - 200, 0) / 2  # updates owed after learning_starts, one per 2 agent steps
            assert state["counters"]["updates"] + state["counters"]["update_credit"] == owed
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr and interrupted_writes >= 1
    assert _interrupted_writes(checkpoints) == []  # what the killed writers left was cleaned up on start
    config = load_dqn_config(str(run_dir / "config.yaml"), [f"run.runs_dir={tmp_path}", "run.name=straight"])
    Trainer(config, tmp_path / "straight").run()
    assert _differences(_final_state(tmp_path / "straight"), _final_state(run_dir)) == []


def _scalar_steps(run_dir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_curves_continue_without_duplicate_steps_after_a_kill(tmp_path):
    config = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0})
    killed = Trainer(config, tmp_path / "run")
    killed.start()
    killed.advance(300)  # logs 100..300, checkpoint at 200; the steps after it die with the process
    killed.writer.flush()  # what reached the event file before the kill
    killed.env.close()
    Trainer(config, tmp_path / "run").run()
    steps = _scalar_steps(tmp_path / "run")
    assert steps["train/epsilon"] == [100, 200, 300, 400]
    assert all(s == sorted(set(s)) for s in steps.values()), steps


def test_a_forced_resume_the_checkpoint_cannot_follow_fails_clearly_and_keeps_the_run_config(tmp_path):
    config = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0, "run.total_agent_steps": 200})
    Trainer(config, tmp_path / "run").run()
    saved = (tmp_path / "run" / "config.yaml").read_text()
    changed = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0, "network.hidden_sizes": "[32]"})
    trainer = Trainer(changed, tmp_path / "run", force=True)
    with pytest.raises(CheckpointError, match=r"checkpoint_000000000200\.pt does not fit this run's config"):
        trainer.run()
    trainer.env.close()
    assert (tmp_path / "run" / "config.yaml").read_text() == saved  # the unchanged command still resumes
    assert Trainer(config, tmp_path / "run").run()["agent_steps"] == 200


def test_tensorboard_curves_restart_cleanly_after_a_kill_before_the_first_checkpoint(tmp_path):
    config = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0})
    killed = Trainer(config, tmp_path / "run")
    killed.start()
    killed.advance(150)  # logs at 100, dies before the first checkpoint (200): the rerun starts afresh
    killed.writer.flush()
    killed.env.close()
    Trainer(config, tmp_path / "run").run()
    assert _scalar_steps(tmp_path / "run")["train/epsilon"] == [100, 200, 300, 400]


def test_rerunning_a_finished_run_leaves_its_checkpoint_untouched(tmp_path):
    """Rewriting checkpoint_N.pt in place would leave it unverifiable if killed before its new marker."""
    config = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0, "run.total_agent_steps": 200})
    Trainer(config, tmp_path / "run").run()
    (checkpoint,) = complete_checkpoints(tmp_path / "run" / "checkpoints")
    marker = checkpoint.with_name(checkpoint.name + MARKER_SUFFIX)
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (checkpoint, marker)]
    summary = Trainer(config, tmp_path / "run").run()
    assert summary["agent_steps"] == 200 and summary["checkpoint"] == str(checkpoint)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (checkpoint, marker)] == before


def test_summary_of_a_run_without_evaluations_is_strict_json(tmp_path):
    """train_dqn.py prints the summary as JSON; with no evaluation epoch best_epoch_mean was NaN, which JSON
    has not (json.dumps wrote it anyway, and strict readers such as jq refuse it)."""
    config = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0, "run.total_agent_steps": 200})
    assert Trainer(config, tmp_path / "run").run()["best_epoch_mean"] is None
    script = [sys.executable, str(ROOT / "scripts" / "train_dqn.py"), "--resume", str(tmp_path / "run")]
    proc = subprocess.run(script, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = proc.stdout[proc.stdout.rindex("\n{\n") :]  # the summary, after the config printed at start
    summary = json.loads(printed, parse_constant=lambda name: pytest.fail(f"{name} in the printed JSON"))
    assert summary["best_epoch_mean"] is None and summary["agent_steps"] == 200
    assert proc.stdout.startswith("env:\n") and "total_agent_steps: 200" in proc.stdout  # the config, first


def test_rerunning_a_finished_run_says_it_is_complete_not_that_updates_wait(tmp_path):
    """Without the replay saved, a resume warns that updates wait for a refill; a finished run trains no step."""
    config = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0, "run.total_agent_steps": 200})
    Trainer(config, tmp_path / "run").run()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = Trainer(config, tmp_path / "run").run()
    messages = [str(w.message) for w in caught if "resumed from" in str(w.message)]
    assert summary["agent_steps"] == 200 and len(messages) == 1
    assert "at agent step 200; the run is complete (run.total_agent_steps=200)" in messages[0]
    assert "updates wait" not in messages[0] and "fresh games" not in messages[0]


def _loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files ``torch.load`` reads (each a full pass over a checkpoint)."""
    loaded, real_load = [], torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        loaded.append(Path(f).name)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return loaded


def test_a_resume_reads_its_checkpoint_once_to_hash_and_once_to_load_and_skips_a_damaged_one(
    tmp_path, monkeypatch, hashed_bytes
):
    """With the replay memory saved a checkpoint is GBs: verifying it (SHA-256) and loading it are one pass
    each. A newest checkpoint truncated, or corrupted in place with its size kept, is skipped with a
    warning for the previous one, hashed once too."""
    config = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0, "run.total_agent_steps": 400})
    Trainer(config, tmp_path / "run").run()
    older, newest = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert newest.stat().st_size > 20_000  # the replay memory is in it
    longer = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0, "run.total_agent_steps": 600})
    hashed, loaded = hashed_bytes, _loads(monkeypatch)

    def resume() -> Path:
        hashed.clear()
        loaded.clear()
        trainer = Trainer(longer, tmp_path / "run")
        assert trainer.resume()
        trainer.env.close()
        return trainer.resumed_from

    assert resume() == newest
    assert sum(hashed) == newest.stat().st_size and loaded == [newest.name]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash tells
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint.*checkpoint_000000000400\.pt.*SHA-256"):
        assert resume() == older
    assert sum(hashed) == newest.stat().st_size + older.stat().st_size and loaded == [older.name]
    newest.write_bytes(bytes(data[:-100]))  # truncated: its size tells, no hashing needed
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint.*checkpoint_000000000400\.pt.*truncated"):
        assert resume() == older
    assert sum(hashed) == older.stat().st_size and loaded == [older.name]


def test_a_resume_maps_the_checkpoint_on_the_cpu(tmp_path, torch_loads):
    """Loaded straight onto a GPU, the checkpoint's RNG states landed there, and torch.set_rng_state takes CPU
    bytes only: every CUDA resume failed. The replay memory also sat on the device twice. It is mapped on the
    CPU now and copied into the live replay memory."""
    config = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0, "run.total_agent_steps": 200})
    Trainer(config, tmp_path / "run").run()
    torch_loads.clear()
    longer = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0})
    trainer = Trainer(longer, tmp_path / "run")
    assert trainer.resume()
    ((kwargs, payload),) = torch_loads
    assert torch.device(kwargs["map_location"]) == torch.device("cpu") and kwargs.get("mmap") is True
    assert payload["rng"]["torch"].device.type == "cpu" and "replay" in payload
    assert torch.equal(trainer.replay.frames, payload["replay"]["frames"])


def test_a_signal_during_the_final_save_lets_the_save_finish(tmp_path, monkeypatch):
    """The final checkpoint was written after the loop's signal handlers were gone: Ctrl-C there raised
    KeyboardInterrupt in the middle of the write, SIGTERM killed the process without a word."""
    config = _config("gym", tmp_path, "run", **{"eval.every_agent_steps": 0, "run.total_agent_steps": 200})
    trainer = Trainer(config, tmp_path / "run")
    real_save = trainer.save

    def save_with_a_signal():
        if trainer.agent_step == 200:
            signal.raise_signal(signal.SIGINT)
        return real_save()

    monkeypatch.setattr(trainer, "save", save_with_a_signal)
    try:
        summary = trainer.run()
    except KeyboardInterrupt:
        pytest.fail("the signal interrupted the final save")
    assert summary["interrupted"] == signal.SIGINT and summary["agent_steps"] == 200
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "checkpoint_000000000200.pt"
