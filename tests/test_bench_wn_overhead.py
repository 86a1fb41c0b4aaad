"""``scripts/bench_wn_overhead.py``: its whole-step form (gradients by ``torch.func``, Adam as tensor math,
one graph) takes the same training step as the module form (autograd, ``torch.optim.Adam``), for plain
layers, wn_rl's weight norm and PyTorch's own, so the GPU ratios it measures compare equal work."""

import argparse
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
    bench, variant: str, compile_whole: bool, n: int = 3, kept: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters after ``n`` module steps and after ``n`` whole steps (``kept``: with the effective
    weights kept between steps) from the same start."""
    torch.manual_seed(0)
    base = small_cnn()
    inputs = torch.randint(0, 256, (6, 4, 14, 14), dtype=torch.uint8)
    targets = torch.randn(6, 3)
    module_model, whole_model = bench.make_variant(base, variant), bench.make_variant(base, variant)
    module_step = bench.make_step(module_model, inputs, targets, True, argparse.Namespace(compile=False))
    whole_args = argparse.Namespace(compile=compile_whole, compile_mode="default")
    make_whole = bench.make_kept_whole_step if kept else bench.make_whole_step
    whole_step = make_whole(whole_model, inputs, targets, True, whole_args)
    for _ in range(n):
        module_step()
        whole_step()
    return list(module_model.parameters()), list(whole_model.parameters())


@pytest.mark.parametrize("variant", ["plain", "wn_rl", "torch_wn"])
def test_the_whole_step_is_the_module_step(bench, variant):
    before = [p.detach().clone() for p in bench.make_variant(small_cnn(), variant).parameters()]
    module_params, whole_params = steps_taken(bench, variant, compile_whole=False)
    assert len(module_params) == len(whole_params) == len(before)
    for start, a, b in zip(before, module_params, whole_params, strict=True):
        assert not torch.equal(a, start)  # the steps moved every parameter ...
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)  # ... and both forms the same way


@pytest.mark.parametrize("kept", [False, True], ids=["weights_from_v_g", "weights_kept"])
def test_the_compiled_whole_step_is_the_module_step(bench, kept):
    module_params, whole_params = steps_taken(bench, "wn_rl", compile_whole=True, kept=kept)
    for a, b in zip(module_params, whole_params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_kept_weights_move_g_v_b_as_autograd_through_the_wn_layers_does(bench):
    """The experimental kept-weights step (eq. 3 applied to the folded network's gradients, w rewritten
    after each step) moves g, v and b as autograd through the WN layers does."""
    before = [p.detach().clone() for p in bench.make_variant(small_cnn(), "wn_rl").parameters()]
    module_params, kept_params = steps_taken(bench, "wn_rl", compile_whole=False, kept=True)
    for start, a, b in zip(before, module_params, kept_params, strict=True):
        assert not torch.equal(a, start)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
