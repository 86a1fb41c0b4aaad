"""The fused update (agents/dqn/fused.py) against the eager one: same step on the same batch, for every
optimizer; the non-finite guard; the compiled update of the MinAtar network; and one compiled training
run equal to the eager run.

The math tests run ``fused_update`` uncompiled (it is plain PyTorch), so they cost milliseconds; the
compiled ones (inductor, ~20-30 s each on 2 cores) cover what only the compiled graph does: the
convolutions as matrix products (agents/dqn/compile_backend.py), the big WN linear layer's
``_WNLinearFn`` under a compiled ``torch.func.grad``, and the runner's graph (sampling + update).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.torch_version import TorchVersion

from agents.dqn.benchmark import random_batch
from agents.dqn.config import AgentConfig, NetworkConfig, load_dqn_config
from agents.dqn.envs import EnvSpec
from agents.dqn.fused import fused_update
from agents.dqn.learner import Learner, NonFiniteError
from agents.dqn.networks import build_q_network
from agents.dqn.replay import ReplayBatch
from agents.dqn.runner import Trainer
from agents.dqn.update_mode import resolve_update_mode
from wn_rl import data_dependent_init, mlp
from wn_rl.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _batch(b: int = 16, n: int = 1) -> ReplayBatch:
    g = torch.Generator().manual_seed(0)
    return ReplayBatch(
        obs=torch.randn(b, 4, generator=g),
        actions=torch.randint(0, 3, (b,), generator=g),
        rewards=torch.randn(b, n, generator=g) * 3,
        terminals=torch.rand(b, n, generator=g) < 0.2,
        truncations=torch.zeros(b, n, dtype=torch.bool),
        next_obs=torch.randn(b, 4, generator=g),
        next_offsets=torch.full((b,), n),
        indices=torch.arange(b),
    )


def _uncompiled_pair(config: AgentConfig, parameterization: str) -> tuple[Learner, Learner]:
    """An eager learner and a fused one running ``fused_update`` without compiling, same start."""
    torch.manual_seed(0)
    q = mlp([4, 16, 3], parameterization)
    eager = Learner(copy.deepcopy(q), replace(config, update_mode="eager"), terminal_on_life_loss=False)
    fused = Learner(copy.deepcopy(q), replace(config, update_mode="compiled"), terminal_on_life_loss=False)
    fused._fused._update = fused_update  # the same function, run eagerly
    return eager, fused


@pytest.mark.compiled_functional_call
@pytest.mark.parametrize(
    ("optimizer", "parameterization", "max_grad_norm", "double_dqn"),
    [
        ("adamax", "weight_norm", None, False),
        ("adam", "normal", 0.1, True),  # a small max norm, so clipping is active
        ("rmsprop", "weight_norm", 10.0, False),
    ],
)
def test_fused_update_equals_eager_update(optimizer, parameterization, max_grad_norm, double_dqn):
    config = AgentConfig(
        optimizer=optimizer, lr=1e-3, max_grad_norm=max_grad_norm, double_dqn=double_dqn, target_update_every_updates=2
    )
    eager, fused = _uncompiled_pair(config, parameterization)
    batch = _batch()
    for _ in range(3):
        eager.update(batch)
        fused.update(batch)
    for (name, a), b in zip(eager.q_network.named_parameters(), fused.q_network.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    for a, b in zip(eager.target_network.parameters(), fused.target_network.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # synced after update 2 in both
    state_a, state_b = eager.optimizer.state_dict()["state"], fused.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys()  # torch.optim's format: checkpoints interchangeable
        for key, value in state_a[i].items():
            assert torch.allclose(value.float(), state_b[i][key].float(), rtol=1e-5, atol=1e-7), (i, key)
    metrics_a, metrics_b = eager.read_metrics(), fused.read_metrics()
    assert metrics_a == pytest.approx(metrics_b, rel=1e-4)


@pytest.mark.compiled_functional_call
def test_fused_guard_skips_a_nan_loss_and_an_overflowing_step():
    _, fused = _uncompiled_pair(AgentConfig(lr=1e-3), "weight_norm")
    before = {k: v.clone() for k, v in fused.q_network.state_dict().items()}
    bad = _batch()
    bad.rewards[0, 0] = float("nan")
    fused.update(bad)
    assert all(torch.equal(before[k], v) for k, v in fused.q_network.state_dict().items())
    assert all(torch.count_nonzero(t) == 0 for s in fused.optimizer.state.values() for t in s.values())
    with pytest.raises(NonFiniteError, match=r"in the loss at update 1"):
        fused.raise_if_nonfinite()

    _, fused = _uncompiled_pair(AgentConfig(lr=1e39), "normal")  # finite grads, parameters overflow
    before = {k: v.clone() for k, v in fused.q_network.state_dict().items()}
    fused.update(_batch())
    assert all(torch.equal(before[k], v) for k, v in fused.q_network.state_dict().items())
    with pytest.raises(NonFiniteError, match=r"parameters after the optimizer step \(.*\) at update 1"):
        fused.raise_if_nonfinite()


@pytest.mark.compiled_functional_call
def test_the_first_compiled_update_is_checked_against_the_eager_one():
    """A graph that computes the update wrong (here: every weight pushed 2 lr further) is reported at the
    first update, with the fix; a right one is not, and only the first update pays for the check."""
    config = AgentConfig(optimizer="adam", lr=1e-3)
    _, right = _uncompiled_pair(config, "weight_norm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all from a right graph
        right.update(_batch())
    assert right.compiled_check["share_off"] == 0 and right.compiled_check["max_abs_diff"] < 1e-6

    def wrong_update(*args):
        fused_update(*args)
        params = args[3]
        for p in params:
            p.add_(2 * config.lr)

    _, wrong = _uncompiled_pair(config, "weight_norm")
    wrong._fused._update = wrong_update
    with pytest.warns(RuntimeWarning, match=r"does not match the eager update.*agent.update_mode=eager"):
        wrong.update(_batch())
    assert wrong.compiled_check["share_off"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrong.update(_batch())  # checked once per learner


@pytest.mark.compiled_functional_call
def test_update_mode_auto_and_its_errors():
    q = mlp([4, 3], "normal")
    assert resolve_update_mode("auto", torch.device("cpu"), q) == "eager"
    assert resolve_update_mode("auto", torch.device("cpu"), q, planned_updates=10**6) == "compiled"
    assert resolve_update_mode("auto", torch.device("cpu"), q, planned_updates=1000) == "eager"
    assert resolve_update_mode("auto", torch.device("cuda"), q) == "cudagraph"
    assert resolve_update_mode("auto", torch.device("cuda"), mlp([4, 8, 3], "batch_norm")) == "eager"
    with pytest.raises(ValueError, match="batch statistics"):
        resolve_update_mode("compiled", torch.device("cpu"), mlp([4, 8, 3], "batch_norm"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_update_mode("cudagraph", torch.device("cpu"), q)


def test_a_torch_that_cannot_compile_the_update_runs_eager_or_fails_naming_the_version(monkeypatch):
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.4.1"))
    q = mlp([4, 3], "normal")
    assert resolve_update_mode("auto", torch.device("cpu"), q, planned_updates=10**6) == "eager"
    assert resolve_update_mode("auto", torch.device("cuda"), q) == "eager"
    for mode, device in (("compiled", "cpu"), ("cudagraph", "cuda")):
        with pytest.raises(ConfigError, match=rf"update_mode='{mode}' needs torch >= 2\.5.*this is torch 2\.4\.1"):
            resolve_update_mode(mode, torch.device(device), q)


def _assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, name: str, atol: float = 0.0) -> None:
    """Within 1e-5 of the tensor's largest entry, plus ``atol``: float32 rounding of a sum shows up as an
    absolute error on the scale of the sum's terms, so entries near zero cannot match to a relative tolerance."""
    error = float((actual - expected).abs().max())
    assert error <= 1e-5 * float(expected.abs().max()) + atol, (name, error, float(expected.abs().max()))


@pytest.mark.compiled_functional_call
def test_compiled_update_of_the_weight_norm_minatar_network_equals_eager(one_torch_thread):
    """The update compiled as on a CPU run (inductor, small convolutions as matrix products) for the
    MinAtar network with weight norm, against eager (``normal``: tests/test_compile_backend.py). Its
    1024 -> 128 layer computes through ``_WNLinearFn``, whose parameter gradients the compiled
    ``torch.func.grad`` once dropped (the layer never trained).

    Step 1's first moments are (1 - beta1) g in both paths, so they compare the gradients (measured:
    differences of at most 6e-7 of each tensor's largest entry). Adamax's first steps are about lr * sign(g):
    a gradient near zero whose sign differs by rounding moves its parameter by lr one way or the other.
    With ``optimizer_eps = 1`` a step is nearly lr * g instead, so the parameters' changes over three
    updates must agree as closely as the gradients, up to the rounding of each new parameter to float32
    (a few units in its last place; lr = 1e-2 keeps the changes far above that)."""
    spec = EnvSpec("minatar", "breakout", 1, (4, 10, 10), 1, np.dtype(np.uint8), 3, {})
    torch.manual_seed(0)
    q = build_q_network(NetworkConfig(parameterization="weight_norm"), spec)
    batch = random_batch("minatar", 32)  # sparse 0/1 4x10x10 planes, 3 actions
    data_dependent_init(q, batch.next_obs)
    config = AgentConfig(optimizer="adamax", lr=1e-2, optimizer_eps=1.0)
    eager = Learner(copy.deepcopy(q), replace(config, update_mode="eager"), terminal_on_life_loss=False)
    compiled = Learner(copy.deepcopy(q), replace(config, update_mode="compiled"), terminal_on_life_loss=False)
    eager.update(batch)
    compiled.update(batch)
    assert compiled.compiled_check["share_off"] == 0  # the learner's own check of its graph agrees
    metrics_a, metrics_b = eager.read_metrics(), compiled.read_metrics()
    for key in ("loss", "grad_norm"):
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-5), key
    pairs = list(zip(eager.q_network.named_parameters(), compiled.q_network.parameters(), strict=True))
    for (name, a), b in pairs:
        _assert_close_to_scale(compiled.optimizer.state[b]["exp_avg"], eager.optimizer.state[a]["exp_avg"], name)
    for _ in range(2):
        eager.update(batch)
        compiled.update(batch)
    for (name, a), b in pairs:
        a, b, start = a.detach(), b.detach(), q.get_parameter(name).detach()
        ulp = torch.finfo(torch.float32).eps * float(a.abs().max())
        _assert_close_to_scale(b - start, a - start, name, atol=4 * ulp)


def _cartpole_run(tmp_path: Path, mode: str) -> Trainer:
    overrides = {
        "agent.update_mode": mode,
        "agent.epsilon_start": 1.0,  # random acting: both runs see the same transitions
        "agent.epsilon_end": 1.0,
        "agent.learning_starts_agent_steps": 200,
        "agent.agent_steps_per_update": 8,
        "agent.batch_size": 32,
        "agent.target_update_every_updates": 10,
        "run.total_agent_steps": 360,
        "eval.every_agent_steps": 0,
        "run.checkpoint_every_agent_steps": 0,
        "run.runs_dir": str(tmp_path),
        "run.name": mode,
        "run.progress_bar": "false",
        "run.device": "cpu",
        "network.ddi_batch_size": 64,
    }
    config = load_dqn_config(
        str(ROOT / "configs" / "dqn" / "cartpole.yaml"), [f"{k}={v}" for k, v in overrides.items()]
    )
    trainer = Trainer(config, tmp_path / mode)
    trainer.run()
    return trainer


@pytest.mark.compiled_functional_call
def test_compiled_training_run_equals_the_eager_run(tmp_path):
    """The runner's compiled graph (sampling + update) against eager, over 20 updates with target syncs."""
    eager = _cartpole_run(tmp_path, "eager")
    compiled = _cartpole_run(tmp_path, "compiled")
    assert compiled.learner.update_mode == "compiled" and compiled.learner.updates == eager.learner.updates == 20
    for (name, a), b in zip(
        eager.learner.q_network.named_parameters(), compiled.learner.q_network.parameters(), strict=True
    ):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
    assert compiled.history == eager.history
    assert eager.learner.compiled_check is None  # nothing compiled, nothing checked
    assert compiled.learner.compiled_check["share_off"] == 0  # the run's check of its graph, in TensorBoard too
    acc = EventAccumulator(str(tmp_path / "compiled" / "tb"))
    acc.Reload()
    assert "compiled_check/text_summary" in acc.Tags()["tensors"]
