"""``cached`` around whole training loops: several backward passes (truncated backpropagation through time,
gradient accumulation), optimizer steps, exceptions and compiled models inside one block."""

import contextlib

import pytest
import torch
from torch import nn

from wn_rl import WNLinear, WNLSTMCell, cached, weight_norm


def _mlp():
    torch.manual_seed(0)
    return weight_norm(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))


def test_gradients_accumulate_over_several_backward_passes_in_one_block():
    model, x = _mlp(), torch.randn(5, 4)
    model(x).sum().backward()
    model(2 * x).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with cached(model):
        model(x).sum().backward()
        model(2 * x).sum().backward()  # the first backward freed the cached weight's graph
    for p, grad in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, grad)


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam])
def test_an_optimizer_step_inside_the_block_is_seen_by_the_next_forward(optimizer_class):
    model, x = _mlp(), torch.randn(5, 4)
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    with cached(model):
        model(x).sum().backward()
        optimizer.step()
        with torch.no_grad():
            inside = model(x)
    torch.testing.assert_close(inside, model(x).detach())


def _train_truncated(use_cache: bool) -> list[torch.Tensor]:
    """Three chunks of truncated backpropagation through time, one SGD step each."""
    torch.manual_seed(0)
    cell, head = WNLSTMCell(3, 6), WNLinear(6, 1)
    model = nn.ModuleList([cell, head])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sequence = torch.randn(12, 2, 3)
    state = None
    with cached(model) if use_cache else contextlib.nullcontext():
        for chunk in sequence.split(4):
            for x in chunk:
                state = cell(x, state)
            head(state[0]).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            state = tuple(s.detach() for s in state)
    return [p.detach() for p in model.parameters()]


def test_truncated_backpropagation_through_time_with_a_cached_cell():
    for cached_param, param in zip(_train_truncated(True), _train_truncated(False), strict=True):
        torch.testing.assert_close(cached_param, param)


def test_an_exception_inside_nested_blocks_releases_the_cache():
    model, x = _mlp(), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="boom"), cached(model):
        with cached(model):
            model(x)
        raise RuntimeError("boom")
    assert model[0]._cache_depth == 0 and model[0]._cached_weight is None


def test_a_compiled_model_trains_inside_a_block():
    model, x = _mlp(), torch.randn(5, 4)
    compiled = torch.compile(model, backend="eager")
    with cached(model):
        compiled(x).sum().backward()
        compiled(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (2 * model(x).sum()).backward()
    for p, grad in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, grad)


def _swap_in_fresh_parameters(how: str, layer: nn.Module, source: nn.Module) -> None:
    if how == "assign":
        layer.load_state_dict(source.state_dict(), assign=True)
    elif how == "setattr":
        layer.v, layer.g = source.v, source.g
    else:
        layer.v.data = source.v.detach().clone()


@pytest.mark.parametrize("how", ["assign", "setattr", "data"])
@pytest.mark.parametrize("grad", [False, True])
def test_parameters_replaced_inside_the_block_are_seen_by_the_next_forward(how, grad):
    torch.manual_seed(0)
    layer, source, x = WNLinear(4, 3), WNLinear(4, 3), torch.randn(5, 4)
    # source's parameters have the same in-place versions as layer's: only identity or storage tells them apart
    with cached(layer), torch.set_grad_enabled(grad):
        layer(x)
        _swap_in_fresh_parameters(how, layer, source)
        inside = layer(x)
    torch.testing.assert_close(inside, layer(x))


def test_a_cell_whose_parameters_are_inference_tensors_is_not_cached():
    with torch.inference_mode():
        cell, x = WNLSTMCell(3, 4), torch.randn(2, 3)
        with cached(cell):
            cell(x)
            cell.g_ih.mul_(2.0)  # inference tensors count no in-place version
            inside = cell(x)[0]
        torch.testing.assert_close(inside, cell(x)[0])


def test_a_torch_func_transform_of_a_layer_inside_the_block_gets_its_gradient():
    layer, x = WNLinear(4, 3), torch.randn(5, 4)
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def loss(params):
        return torch.func.functional_call(layer, params, (x,)).pow(2).sum()

    with cached(layer):
        with torch.no_grad():
            layer(x)
        inside = torch.func.grad(loss)(params)  # its wrapped parameters have no storage to key a cache by
    for name, grad in torch.func.grad(loss)(params).items():
        torch.testing.assert_close(inside[name], grad)
