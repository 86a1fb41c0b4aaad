"""``scripts/bench_wn_overhead.py``: its whole-step form (gradients by ``torch.func``, Adam as tensor math,
one graph) takes the same training step as the module form (autograd, ``torch.optim.Adam``), for plain
layers, wn_rl's weight norm and PyTorch's own, so the GPU ratios it measures compare equal work."""

import argparse
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_wn_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("wn_rl_script_bench_wn_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 8, 4, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 3),
    )  # fmt: skip


def steps_taken(
    bench, variant: str, compile_whole: bool, n: int = 3
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Parameters at the start, after ``n`` module steps and after ``n`` whole steps. In float64: Adam's
    normalised update turns rounding noise in a near-zero gradient (or a ReLU input that rounds to the
    other side of 0) into a full-size step, which float32's noise did to a few weights."""
    torch.manual_seed(0)
    base = small_cnn().double()
    inputs = torch.rand(6, 4, 14, 14, dtype=torch.float64)
    targets = torch.randn(6, 3, dtype=torch.float64)
    module_model, whole_model = bench.make_variant(base, variant), bench.make_variant(base, variant)
    start = [p.detach().clone() for p in module_model.parameters()]
    module_step = bench.make_step(module_model, inputs, targets, False, argparse.Namespace(compile=False))
    whole_args = argparse.Namespace(compile=compile_whole, compile_mode="default")
    whole_step = bench.make_whole_step(whole_model, inputs, targets, False, whole_args)
    for _ in range(n):
        module_step()
        whole_step()
    return start, list(module_model.parameters()), list(whole_model.parameters())


@pytest.mark.parametrize(
    "compiled", [False, pytest.param(True, marks=pytest.mark.compiled_functional_call)], ids=["eager", "compiled"]
)
@pytest.mark.parametrize("variant", ["plain", "wn_rl", "torch_wn"])
def test_the_whole_step_is_the_module_step(bench, variant, compiled):
    start, module_params, whole_params = steps_taken(bench, variant, compile_whole=compiled)
    assert len(start) == len(module_params) == len(whole_params)
    for first, a, b in zip(start, module_params, whole_params, strict=True):
        assert not torch.equal(a, first)  # the steps moved every parameter ...
        # ... and both forms the same way (the whole step's bias corrections are float32, as torch.optim's
        # step tensor, while torch.optim computes them in Python floats: ~1e-9 apart after three steps)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)


def test_the_benchmark_reports_how_far_the_whole_step_is_from_the_module_step(bench):
    """``agrees_with_module_step``, which the GPU runs print beside their timings: zero for a correct
    whole step, and most weights off by a step for a step that went wrong (here: one step too many)."""
    torch.manual_seed(0)
    inputs, targets = torch.rand(6, 4, 14, 14, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    model = bench.make_variant(small_cnn().double(), "wn_rl")
    start = copy.deepcopy(model)
    step = bench.make_whole_step(model, inputs, targets, False, argparse.Namespace(compile=False))
    for _ in range(3):
        step()
    right = bench.agrees_with_module_step(copy.deepcopy(start), model, inputs, targets, False, 3)
    assert right["max_abs_diff"] < 1e-8 and right["share_off_by_a_tenth_step"] == 0
    step()
    wrong = bench.agrees_with_module_step(copy.deepcopy(start), model, inputs, targets, False, 3)
    assert wrong["max_abs_diff"] > 5e-5 and wrong["share_off_by_a_tenth_step"] > 0.5


def test_paired_ratios_cancel_drift_between_repetitions(bench):
    # the machine slows down 8x over the run; within each repetition wn_rl costs 4% more than plain
    plain = [0.01 * 2 ** (i / 10) for i in range(30)]
    wn = [1.04 * t for t in plain]
    paired = bench.paired_ratio(wn, plain)
    assert paired == pytest.approx({"median": 1.04, "ci95_low": 1.04, "ci95_high": 1.04})
    # noise within repetitions widens the interval around the median
    noisy = [t * (1.0 + (0.1 if i % 2 else -0.05)) for i, t in enumerate(wn)]
    paired = bench.paired_ratio(noisy, plain)
    assert paired["ci95_low"] < paired["median"] < paired["ci95_high"]
    assert paired["ci95_low"] >= 1.04 * 0.95 and paired["ci95_high"] <= 1.04 * 1.1


def test_per_layer_parts_time_every_weight_layer_and_the_adam_step(bench, capsys):
    torch.manual_seed(0)
    args = argparse.Namespace(reps=2, steps=1, warmup=1, clock="wall")
    rows = bench.bench_parts("small", small_cnn(), torch.randint(0, 256, (4, 4, 14, 14), dtype=torch.uint8), args)
    assert [row["part"] for row in rows] == [
        "0 Conv2d(8, 4, 4, 4)",
        "2 Conv2d(8, 8, 3, 3)",
        "5 Linear(32, 128)",
        "7 Linear(3, 32)",
        "Adam step",
    ]
    for row in rows:
        assert set(row["median_us"]) == set(bench.VARIANTS) and all(t > 0 for t in row["median_us"].values())
    assert "5 Linear(32, 128)" in capsys.readouterr().out
