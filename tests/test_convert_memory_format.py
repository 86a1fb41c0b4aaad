"""Channels-last models (``model.to(memory_format=torch.channels_last)``) through ``weight_norm``, training,
``torch.compile`` and ``remove_weight_norm``: v, the effective weight and the folded weight keep the user's
memory format, which is what decides the convolution kernels a GPU runs, and the function stays the same."""

import copy

import pytest
import torch
from torch import nn

from wn_rl import remove_weight_norm, weight_norm
from wn_rl.layers import WNLayer

CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _channels_last(tensor: torch.Tensor) -> bool:
    """In the channels-last format of its rank, and not also contiguous (so the check can fail)."""
    return tensor.is_contiguous(memory_format=CHANNELS_LAST[tensor.dim()]) and not tensor.is_contiguous()


def _model_2d() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, bias=False),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2, stride=2),  # v is [in, out, kh, kw]: the norm is over dim 1
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 2),
    )


def _model_3d() -> nn.Module:
    return nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose3d(4, 2, 2, stride=2))


CASES = {
    "2d": (_model_2d, (4, 3, 8, 8), torch.channels_last),
    "3d": (_model_3d, (2, 3, 4, 4, 4), torch.channels_last_3d),
}


def _plain_and_input(case: str, memory_format: torch.memory_format, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    build, shape, _ = CASES[case]
    torch.manual_seed(seed)
    model = build().double().to(memory_format=memory_format)
    return model, torch.randn(shape, dtype=torch.float64).to(memory_format=memory_format)


def _wn_convs(model: nn.Module) -> list[WNLayer]:
    return [m for m in model.modules() if isinstance(m, WNLayer) and m.v.dim() > 2]


def _output_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_()
    out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    return (out, *torch.autograd.grad((out * weights).sum(), [x, *model.parameters()]))


@pytest.mark.parametrize("case", list(CASES))
def test_conversion_keeps_v_and_the_effective_weight_channels_last(case):
    memory_format = CASES[case][2]
    plain, x = _plain_and_input(case, memory_format)
    expected = _output_and_grads(plain, x)
    converted = weight_norm(copy.deepcopy(plain))
    for layer in _wn_convs(converted):
        assert _channels_last(layer.v) and _channels_last(layer.weight), type(layer).__name__
    got = _output_and_grads(converted, x)
    torch.testing.assert_close(got[:2], expected[:2])  # the output and the input's gradient
    reference = weight_norm(copy.deepcopy(plain).to(memory_format=torch.contiguous_format))
    torch.testing.assert_close(got, _output_and_grads(reference, x))  # every gradient, whatever the format
    converted(x).sum().backward()
    assert all(_channels_last(layer.v.grad) for layer in _wn_convs(converted))  # so does the optimizer's state


@pytest.mark.parametrize("case", list(CASES))
def test_folding_keeps_the_weight_channels_last(case):
    memory_format = CASES[case][2]
    plain, x = _plain_and_input(case, memory_format)
    expected = plain(x)
    folded = remove_weight_norm(weight_norm(copy.deepcopy(plain)))
    convs = [m for m in folded.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert convs and all(_channels_last(m.weight) for m in convs)
    torch.testing.assert_close(folded(x), expected)


@pytest.mark.parametrize("case", list(CASES))
def test_a_converted_model_moves_to_channels_last(case):
    memory_format = CASES[case][2]
    plain, x = _plain_and_input(case, torch.contiguous_format)
    converted = weight_norm(plain)
    expected = converted(x)
    converted.to(memory_format=memory_format)
    for layer in _wn_convs(converted):
        assert _channels_last(layer.v) and _channels_last(layer.weight), type(layer).__name__
    torch.testing.assert_close(converted(x.to(memory_format=memory_format)), expected)


def test_a_channels_last_model_compiles_to_the_eager_function():
    plain, x = _plain_and_input("2d", torch.channels_last)
    converted = weight_norm(plain.float())
    x = x.float()
    expected = _output_and_grads(converted, x)
    got = _output_and_grads(torch.compile(converted), x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch vmaps _weight_norm in a loop
def test_an_ensemble_of_channels_last_models_runs_under_vmap():
    """Stacked parameters (``torch.func.stack_module_state``) of channels-last WN convolutions, as an ensemble
    of Q-networks runs them: ``torch.vmap`` refuses queries of the memory format, so the layers must not ask."""
    models = [weight_norm(_plain_and_input("2d", torch.channels_last, seed)[0]) for seed in range(3)]
    x = _plain_and_input("2d", torch.channels_last)[1]
    params, buffers = torch.func.stack_module_state(models)
    template = copy.deepcopy(models[0]).to("meta")
    out = torch.func.vmap(lambda p, b: torch.func.functional_call(template, (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(out, torch.stack([model(x) for model in models]))
