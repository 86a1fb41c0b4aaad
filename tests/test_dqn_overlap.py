"""Updates overlapped with the env step (agents/dqn/overlap.py): a run whose updates run in a worker
thread is bit-identical to the same run with the updates inline, in eager and compiled mode; the
updates really run in the worker; the worker's errors reach the loop; the setting's rules. Acting inside
the compiled update (``run.acting``) gives the same actions and run as a separate forward."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from agents.dqn.config import load_dqn_config
from agents.dqn.learner import NonFiniteError
from agents.dqn.overlap import resolve_acting, resolve_overlap
from agents.dqn.runner import Trainer
from wn_rl.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cartpole(tmp_path: Path, name: str, **overrides: object) -> Trainer:
    settings = {
        "agent.learning_starts_agent_steps": 200,
        "agent.epsilon_decay_agent_steps": 400,  # greedy actions soon: acting reads the (copied) weights
        "agent.epsilon_end": 0.05,
        "agent.agent_steps_per_update": 2,  # two updates per vector step of 4 envs
        "agent.batch_size": 32,
        "agent.target_update_every_updates": 50,
        "run.total_agent_steps": 1200,
        "run.log_every_agent_steps": 400,
        "eval.every_agent_steps": 0,
        "run.checkpoint_every_agent_steps": 0,
        "run.runs_dir": str(tmp_path),
        "run.name": name,
        "run.progress_bar": "false",
        "run.device": "cpu",
        "network.ddi_batch_size": 64,
        **overrides,
    }
    config = load_dqn_config(str(ROOT / "configs" / "dqn" / "cartpole.yaml"), [f"{k}={v}" for k, v in settings.items()])
    return Trainer(config, tmp_path / name)


@pytest.mark.parametrize("update_mode", ["eager", pytest.param("compiled", marks=pytest.mark.compiled_functional_call)])
def test_threaded_updates_give_the_same_run_as_inline_updates(tmp_path, update_mode):
    runs = {}
    for overlap in ("thread", "inline"):
        settings = {"run.overlap_updates": overlap, "agent.update_mode": update_mode, "run.acting": "separate"}
        trainer = _cartpole(tmp_path, overlap, **settings)
        assert trainer.update_runner.mode == overlap
        threads = set()
        sample_and_update = trainer.learner.sample_and_update

        def recorded(*args, _inner=sample_and_update, _threads=threads, **kwargs):
            _threads.add(threading.current_thread().name)
            return _inner(*args, **kwargs)

        trainer.learner.sample_and_update = recorded
        trainer.run()
        runs[overlap] = trainer, threads
    (threaded, worker_threads), (inline, inline_threads) = runs["thread"], runs["inline"]
    assert inline_threads == {threading.current_thread().name}
    assert any(name.startswith("dqn-updates") for name in worker_threads)  # not only the first (compiling) call
    assert threaded.learner.updates == inline.learner.updates == (1200 - 200) // 2
    for (name, a), b in zip(
        threaded.learner.q_network.named_parameters(), inline.learner.q_network.parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    for name in ("frames", "actions", "rewards", "terminated"):
        assert torch.equal(getattr(threaded.replay, name), getattr(inline.replay, name)), name
    assert threaded.tracker.episodes == inline.tracker.episodes > 0
    for a, b in zip(threaded.learner.optimizer.state.values(), inline.learner.optimizer.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_inline_updates_run_while_the_envs_step(tmp_path):
    """Inline, a step's updates run between sending the actions and receiving the step (Atari's emulators
    step in ale-py's threads meanwhile), after the actions are read back."""
    trainer = _cartpole(tmp_path, "order", **{"run.overlap_updates": "inline", "run.total_agent_steps": 400})
    events = []
    env, learner = trainer.env, trainer.learner

    def recorded(inner, name):
        def call(*args, **kwargs):
            events.append(name)
            return inner(*args, **kwargs)

        return call

    for owner, name in ((env, "send"), (env, "recv"), (learner, "sample_and_update")):
        setattr(owner, name, recorded(getattr(owner, name), name))
    trainer.run()
    steps = " ".join(events).replace(" recv", " recv|").split("|")
    with_updates = [s.split() for s in steps if "sample_and_update" in s]
    assert len(with_updates) == (400 - 200) // 4  # the vector steps (4 envs) past the learning start
    assert all(s == ["send", "sample_and_update", "sample_and_update", "recv"] for s in with_updates)


@pytest.mark.compiled_functional_call
def test_actions_chosen_in_the_compiled_update_give_the_same_run(tmp_path):
    """run.acting=in_update (the step's first compiled update also picks the actions, with the weights
    from before it) against acting with a separate eager forward: the same actions, the same run."""
    runs = {}
    for acting in ("in_update", "separate"):
        trainer = _cartpole(tmp_path, acting, **{"agent.update_mode": "compiled", "run.acting": acting})
        assert trainer.act_in_update == (acting == "in_update")
        calls = []
        act_sample_and_update = trainer.learner.act_sample_and_update

        def recorded(*args, _inner=act_sample_and_update, _calls=calls, **kwargs):
            _calls.append(1)
            return _inner(*args, **kwargs)

        trainer.learner.act_sample_and_update = recorded
        trainer.run()
        runs[acting] = trainer, len(calls)
    (fused, fused_calls), (separate, separate_calls) = runs["in_update"], runs["separate"]
    steps_with_updates = fused.learner.updates // 2  # two updates per vector step; the first one acts
    assert separate_calls == 0 and fused_calls > 0.9 * steps_with_updates  # but where every env explores
    assert torch.equal(fused.replay.actions, separate.replay.actions)
    assert fused.learner.updates == separate.learner.updates
    for (name, a), b in zip(
        fused.learner.q_network.named_parameters(), separate.learner.q_network.parameters(), strict=True
    ):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name


@pytest.mark.compiled_functional_call
def test_acting_setting_rules(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    compiled = _cartpole(tmp_path, "c", **{"agent.update_mode": "compiled"}).learner
    eager = _cartpole(tmp_path, "e", **{"agent.update_mode": "eager"}).learner
    assert resolve_acting("auto", cpu, "inline", compiled) and resolve_acting("in_update", cuda, "inline", compiled)
    assert not resolve_acting("auto", cuda, "inline", compiled)  # a GPU reads the actions back first
    assert not resolve_acting("auto", cpu, "thread", compiled)  # the main thread acts beside the worker
    assert not resolve_acting("in_update", cpu, "inline", eager)
    assert not resolve_acting("separate", cpu, "inline", compiled)
    with pytest.raises(ValueError, match="auto, in_update or separate"):
        resolve_acting("fused", cpu, "inline", compiled)
    with pytest.raises(RuntimeError, match="update_mode=compiled"):
        eager.act_sample_and_update(None, torch.zeros(1, 4), (torch.zeros(1), torch.zeros(1, dtype=torch.bool)), None)
    with pytest.raises(ConfigError, match=r"run\.acting"):
        _cartpole(tmp_path, "x", **{"run.acting": "inside"})


def test_a_non_finite_update_in_the_worker_stops_the_loop(tmp_path):
    trainer = _cartpole(tmp_path, "bad", **{"run.overlap_updates": "thread", "agent.lr": 1e30})
    with pytest.raises(NonFiniteError, match="non-finite value"):
        trainer.run()
    assert trainer.update_runner._pool is None  # the worker thread was stopped
    assert sorted(p.name for p in (tmp_path / "bad" / "checkpoints").iterdir()) == []  # nothing bad was saved


def test_overlap_setting_rules_and_errors(tmp_path, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert resolve_overlap("auto", cpu, "atari") == "thread"
    assert resolve_overlap("auto", cpu, "minatar") == resolve_overlap("auto", cpu, "gym") == "inline"
    assert resolve_overlap("auto", cuda, "atari") == "inline"  # the GPU overlaps by queueing
    assert resolve_overlap("inline", cpu, "atari") == "inline"
    assert resolve_overlap("thread", cpu, "gym") == "thread"
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert resolve_overlap("auto", cpu, "atari") == "inline"
    assert resolve_overlap("thread", cpu) == "thread"
    with pytest.raises(ValueError, match="auto, thread or inline"):
        resolve_overlap("yes", cpu)
    with pytest.raises(ConfigError, match=r"run\.overlap_updates"):
        _cartpole(tmp_path, "x", **{"run.overlap_updates": "on"})
