"""The native DQN's fast paths on a CUDA device (skipped without one; CI has none).

- ``compiled`` (Triton kernels) and ``cudagraph`` (the same graph replayed as a CUDA graph) training runs
  equal the eager run on the same device, in ``normal`` and ``weight_norm``;
- the CUDA graph is recorded, not skipped (inductor counts every "skipping cudagraphs" in
  ``counters["inductor"]["cudagraph_skips"]``: a tensor the graph writes that is not marked static, a
  CPU tensor in the graph, ... would each make it fall back to the slower compiled launch);
- the updates make no host synchronisation (``torch.cuda.set_sync_debug_mode("error")`` raises on one),
  so the host goes on to step the emulators while the GPU runs them;
- acting inside the compiled update gives the same run as a separate forward;
- a short Atari run with the defaults a GPU picks (``auto``: CUDA graphs, inline updates between the
  envs' send and recv).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from agents.dqn.config import load_dqn_config
from agents.dqn.learner import NONFINITE_CHECK_EVERY
from agents.dqn.runner import Trainer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(tmp_path: Path, name: str, config: str = "cartpole.yaml", **overrides: object) -> Trainer:
    settings = {
        "agent.epsilon_start": 1.0,  # random acting: every run sees the same transitions
        "agent.epsilon_end": 1.0,
        "agent.learning_starts_agent_steps": 200,
        "agent.agent_steps_per_update": 4,
        "agent.batch_size": 32,
        "agent.target_update_every_updates": 10,
        "run.total_agent_steps": 600,
        "eval.every_agent_steps": 0,
        "run.checkpoint_every_agent_steps": 0,
        "run.runs_dir": str(tmp_path),
        "run.name": name,
        "run.progress_bar": "false",
        "run.device": "cuda",
        "network.ddi_batch_size": 64,
        **overrides,
    }
    config = load_dqn_config(str(ROOT / "configs" / "dqn" / config), [f"{k}={v}" for k, v in settings.items()])
    trainer = Trainer(config, tmp_path / name)
    trainer.run()
    return trainer


def _assert_same_parameters(a: Trainer, b: Trainer) -> None:
    assert a.learner.updates == b.learner.updates > 0
    for (name, x), y in zip(a.learner.q_network.named_parameters(), b.learner.q_network.parameters(), strict=True):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), name


@pytest.mark.compiled_functional_call
@pytest.mark.parametrize("parameterization", ["normal", "weight_norm"])
def test_compiled_and_cuda_graph_runs_equal_the_eager_run(tmp_path, parameterization):
    p = {"network.parameterization": parameterization}
    eager = _run(tmp_path, "eager", **{"agent.update_mode": "eager"}, **p)
    skips = counters["inductor"]["cudagraph_skips"]
    for mode in ("compiled", "cudagraph"):
        fast = _run(tmp_path, mode, **{"agent.update_mode": mode}, **p)
        assert fast.learner.update_mode == mode
        _assert_same_parameters(eager, fast)
        assert fast.history == eager.history
    assert counters["inductor"]["cudagraph_skips"] == skips  # the graph was recorded, not skipped


@pytest.mark.compiled_functional_call
@pytest.mark.parametrize("mode", ["compiled", "cudagraph"])
def test_updates_make_no_host_synchronisation(tmp_path, mode):
    trainer = _run(tmp_path, mode, **{"agent.update_mode": mode})  # compiled, recorded and warmed up
    learner = trainer.learner
    while learner.updates % NONFINITE_CHECK_EVERY:  # the non-finite flag is read every 16 updates, by design
        learner.sample_and_update(trainer.replay, 32)
    start = learner.updates
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(NONFINITE_CHECK_EVERY - 1):  # sampling, update, target syncs: all on the device
            learner.sample_and_update(trainer.replay, 32)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert learner.updates == start + NONFINITE_CHECK_EVERY - 1


@pytest.mark.compiled_functional_call
def test_acting_in_the_compiled_update_gives_the_same_run(tmp_path):
    greedy = {"agent.epsilon_end": 0.05, "agent.epsilon_decay_agent_steps": 300, "agent.update_mode": "compiled"}
    fused = _run(tmp_path, "in_update", **greedy, **{"run.acting": "in_update"})
    separate = _run(tmp_path, "separate", **greedy, **{"run.acting": "separate"})
    assert fused.act_in_update and not separate.act_in_update
    assert torch.equal(fused.replay.actions, separate.replay.actions)
    _assert_same_parameters(fused, separate)


@pytest.mark.compiled_functional_call
def test_a_short_atari_run_with_the_gpu_defaults(tmp_path):
    trainer = _run(
        tmp_path,
        "atari",
        "smoke.yaml",
        **{"agent.update_mode": "auto", "run.overlap_updates": "auto", "agent.replay_capacity_transitions": 4000},
    )
    assert trainer.learner.update_mode == "cudagraph" and trainer.update_runner.mode == "inline"
    assert trainer.learner.updates == (600 - 200) // 4
    assert all(torch.isfinite(p).all() for p in trainer.learner.q_network.parameters())
