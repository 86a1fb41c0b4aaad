"""Small CPU convolutions as GEMMs in compiled graphs (agents/dqn/compile_backend.py): the im2col forward
and weight/bias gradients equal ATen's (float64, several shapes, strides, paddings, dilations); the
size and case gate; and a compiled step with the pass equal to eager, rewritten or left alone."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters
from torch.func import functional_call, grad_and_value

from agents.dqn.compile_backend import (
    SmallConvolutionsAsMatmuls,
    conv2d_as_matmul,
    conv2d_backward_as_matmuls,
    inductor_options,
    should_rewrite_convolution,
    should_rewrite_convolution_backward,
)
from agents.dqn.config import AgentConfig
from agents.dqn.learner import Learner
from agents.dqn.networks import QNetwork, _minatar_body
from agents.dqn.replay import ReplayBatch
from wn_rl.parameterization import Parameterization

aten = torch.ops.aten

# (batch, in channels, height, width, out channels, kernel, stride, padding, dilation)
CASES = [
    (32, 4, 10, 10, 16, (3, 3), [1, 1], [0, 0], [1, 1]),  # the MinAtar network's convolution
    (3, 2, 9, 7, 5, (3, 3), [1, 1], [1, 1], [1, 1]),
    (2, 3, 12, 11, 4, (4, 3), [2, 3], [1, 0], [1, 1]),
    (2, 3, 13, 13, 6, (3, 2), [1, 2], [2, 1], [2, 3]),
    (2, 4, 20, 20, 3, (8, 8), [4, 4], [0, 0], [1, 1]),  # a Nature-CNN-like first layer, scaled down
]


def _example(case: tuple, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w, out_channels, kernel, *_ = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    weight = torch.randn(out_channels, c, *kernel, generator=g, dtype=dtype)
    bias = torch.randn(out_channels, generator=g, dtype=dtype)
    return x, weight, bias


@pytest.mark.parametrize("case", CASES)
def test_forward_equals_aten(case: tuple) -> None:
    x, weight, bias = _example(case)
    stride, padding, dilation = case[6:]
    expected = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation)
    torch.testing.assert_close(conv2d_as_matmul(x, weight, bias, stride, padding, dilation), expected)
    expected = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation)
    torch.testing.assert_close(conv2d_as_matmul(x, weight, None, stride, padding, dilation), expected)


@pytest.mark.parametrize("case", CASES)
def test_weight_and_bias_gradients_equal_aten(case: tuple) -> None:
    x, weight, bias = _example(case)
    stride, padding, dilation = case[6:]
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation)
    grad_output = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    args = (grad_output, x, weight, [weight.shape[0]], stride, padding, dilation, False, [0, 0], 1)
    _, grad_weight, grad_bias = aten.convolution_backward(*args, [False, True, True])
    ours = conv2d_backward_as_matmuls(grad_output, x, weight, stride, padding, dilation, [False, True, True])
    assert ours[0] is None
    torch.testing.assert_close(ours[1], grad_weight)
    torch.testing.assert_close(ours[2], grad_bias)
    only_weight = conv2d_backward_as_matmuls(grad_output, x, weight, stride, padding, dilation, [False, True, False])
    assert only_weight[2] is None
    torch.testing.assert_close(only_weight[1], grad_weight)


def test_gate_rewrites_only_small_plain_cpu_convolutions() -> None:
    one = [1, 1]
    zero = [0, 0]
    x, weight = torch.empty(32, 4, 10, 10), torch.empty(16, 4, 3, 3)
    assert should_rewrite_convolution(x, weight, one, zero, one, False, 1)
    assert should_rewrite_convolution_backward(x, weight, one, zero, one, False, 1, [False, True, True])
    assert not should_rewrite_convolution_backward(x, weight, one, zero, one, False, 1, [True, True, True])
    assert not should_rewrite_convolution(x, weight, one, zero, one, True, 1)  # transposed
    assert not should_rewrite_convolution(x, torch.empty(16, 2, 3, 3), one, zero, one, False, 2)  # grouped
    assert not should_rewrite_convolution(x.double(), weight.double(), one, zero, one, False, 1)
    assert not should_rewrite_convolution(torch.empty(32, 4, 10), torch.empty(16, 4, 3), [1], [0], [1], False, 1)
    # the Nature CNN's three convolutions on 84x84 frames (batch 32) keep oneDNN
    nature = [
        ((32, 4, 84, 84), (32, 4, 8, 8), [4, 4]),
        ((32, 32, 20, 20), (64, 32, 4, 4), [2, 2]),
        ((32, 64, 9, 9), (64, 64, 3, 3), [1, 1]),
    ]
    for x_shape, w_shape, stride in nature:
        assert not should_rewrite_convolution(torch.empty(x_shape), torch.empty(w_shape), stride, zero, one, False, 1)


def _compiled_step_matches_eager(conv_net: torch.nn.Module, x: torch.Tensor, input_grad: bool) -> int:
    """Compile gradients of a small loss with the pass; check them against eager; return the number of
    pattern replacements inductor made."""
    params = {k: v.detach() for k, v in conv_net.named_parameters()}

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return (functional_call(conv_net, params, (x,)).relu() ** 2).mean()

    def step(params: dict[str, torch.Tensor], x: torch.Tensor) -> tuple:
        return grad_and_value(loss, argnums=(0, 1) if input_grad else 0)(params, x)

    options = inductor_options({"post_grad_custom_pre_pass": SmallConvolutionsAsMatmuls(), "fx_graph_cache": False})
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, **options)
    got, expected = compiled(params, x), step(params, x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    return counters["inductor"]["pattern_matcher_count"]


@pytest.mark.compiled_functional_call
def test_compiled_step_with_pass_equals_eager(one_torch_thread: None) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4, 10, 10)
    first_layer = torch.nn.Conv2d(4, 16, 3)
    assert _compiled_step_matches_eager(first_layer, x, input_grad=False) == 2  # forward and backward
    two_layers = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    # both forwards and the first layer's backward; the second layer's backward needs the input's
    # gradient and keeps ATen's, as does the first layer's when the input's gradient is asked for
    torch._dynamo.reset()
    assert _compiled_step_matches_eager(two_layers, x, input_grad=False) == 3
    torch._dynamo.reset()
    assert _compiled_step_matches_eager(two_layers, x, input_grad=True) == 2


@pytest.mark.compiled_functional_call
def test_compiled_minatar_update_equals_eager(one_torch_thread: None) -> None:
    """FusedUpdate (compiled, with the rewrite) on the MinAtar network against the eager update (with
    weight norm: tests/test_dqn_fused.py)."""
    torch.manual_seed(0)
    p = Parameterization.get("normal")
    q = QNetwork(_minatar_body(p, 4, 10, 10), p.without_norm().linear(128, 3), 1.0, 3)
    # a large eps makes Adam's step proportional to the gradient: with the default, gradient entries near
    # zero (float rounding differs between the graphs, with or without the rewrite) step by +-lr
    config = AgentConfig(optimizer="adam", lr=1e-3, max_grad_norm=10.0, optimizer_eps=1.0)
    eager = Learner(copy.deepcopy(q), replace(config, update_mode="eager"), terminal_on_life_loss=False)
    compiled = Learner(copy.deepcopy(q), replace(config, update_mode="compiled"), terminal_on_life_loss=False)
    g = torch.Generator().manual_seed(0)
    b = 16
    batch = ReplayBatch(
        obs=(torch.rand(b, 4, 10, 10, generator=g) < 0.3).float(),
        actions=torch.randint(0, 3, (b,), generator=g),
        rewards=torch.randn(b, 1, generator=g),
        terminals=torch.rand(b, 1, generator=g) < 0.2,
        truncations=torch.zeros(b, 1, dtype=torch.bool),
        next_obs=(torch.rand(b, 4, 10, 10, generator=g) < 0.3).float(),
        next_offsets=torch.ones(b, dtype=torch.long),
        indices=torch.arange(b),
    )
    counters.clear()
    for _ in range(3):
        eager.update(batch)
        compiled.update(batch)
    assert counters["inductor"]["pattern_matcher_count"] >= 3  # online and target forward, weight gradient
    for (name, a), c in zip(eager.q_network.named_parameters(), compiled.q_network.parameters(), strict=True):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5, msg=name)
