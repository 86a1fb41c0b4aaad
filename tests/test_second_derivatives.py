"""Second derivatives through the WN layers: :func:`wn_rl.exact_second_derivatives` (PyTorch's fused
``torch._weight_norm`` kernel has a wrong derivative of its backward with respect to ``v``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import wn_rl
from wn_rl import WNConv1d, WNConv2d, WNConvTranspose2d, WNLinear, WNLSTMCell

LAYERS = {
    "linear": (lambda scale: WNLinear(5, 4, scale=scale), (3, 5)),
    "conv1d": (lambda scale: WNConv1d(2, 3, 3, scale=scale), (2, 2, 6)),
    "conv2d": (lambda scale: WNConv2d(2, 3, 3, scale=scale), (2, 2, 5, 5)),
    "conv_transpose2d": (lambda scale: WNConvTranspose2d(2, 3, 3, scale=scale), (2, 2, 3, 3)),
    "lstm_cell": (lambda scale: WNLSTMCell(3, 2, scale=scale), (4, 3)),
}


def _as_function(module: nn.Module, x: torch.Tensor):
    names = [name for name, p in module.named_parameters() if not name.startswith("bias")]

    def f(*params):
        out = functional_call(module, dict(zip(names, params, strict=True)), (x,))
        return torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out

    return f, tuple(module.get_parameter(name).detach().clone().requires_grad_() for name in names)


@pytest.mark.parametrize("scale", ["linear", "exp"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_second_derivatives_of_every_layer_are_exact_inside_the_block(kind, scale):
    torch.manual_seed(0)
    build, shape = LAYERS[kind]
    module = build(scale).double()
    f, params = _as_function(module, torch.randn(shape, dtype=torch.float64))
    with wn_rl.exact_second_derivatives():
        assert torch.autograd.gradgradcheck(f, params)


def _hessian_vector_product(model, params, x, direction):
    loss = (functional_call(model, params, (x,)) ** 2).sum()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    dot = sum((g * d).sum() for g, d in zip(grads, direction, strict=True))
    return torch.autograd.grad(dot, list(params.values()))


def test_a_hessian_vector_product_in_parameter_space_equals_finite_differences_of_the_gradient():
    """Away from a stationary point, where the fused kernel's error shows (a meta-gradient's setting)."""
    torch.manual_seed(0)
    model = nn.Sequential(WNLinear(6, 8), nn.Tanh(), WNLinear(8, 3)).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    params = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    direction = [torch.randn_like(p) for p in params.values()]
    with wn_rl.exact_second_derivatives():
        hvp = _hessian_vector_product(model, params, x, direction)

    def gradient_at(step: float):
        moved = {
            k: (p + step * d).detach().requires_grad_() for (k, p), d in zip(params.items(), direction, strict=True)
        }
        loss = (functional_call(model, moved, (x,)) ** 2).sum()
        return torch.autograd.grad(loss, list(moved.values()))

    eps = 1e-6  # central differences: the error shrinks as eps**2 (9e-5, 9e-7, 9e-9 of the largest entry at 1e-4..1e-6)
    reference = [(a - b) / (2 * eps) for a, b in zip(gradient_at(eps), gradient_at(-eps), strict=True)]
    for got, want in zip(hvp, reference, strict=True):
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_outputs_and_first_derivatives_are_the_fused_kernels_and_the_block_nests_and_unwinds():
    torch.manual_seed(0)
    layer = WNLinear(5, 4).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    fused = layer(x)
    (grad_fused,) = torch.autograd.grad(fused.sum(), layer.v)
    with wn_rl.exact_second_derivatives(), wn_rl.exact_second_derivatives():
        plain = layer(x)
        (grad_plain,) = torch.autograd.grad(plain.sum(), layer.v)
    torch.testing.assert_close(plain, fused)
    torch.testing.assert_close(grad_plain, grad_fused)
    with pytest.raises(RuntimeError, match="inside"), wn_rl.exact_second_derivatives():
        raise RuntimeError("inside")
    assert wn_rl.layers._exact_second_derivatives_depth == 0
