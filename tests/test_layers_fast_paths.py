"""How a WN layer's effective weight is computed fast: ``cached`` (once per time loop, recomputed for
training), the CPU's output scaling for big linear layers (``wn_rl.layers._WNLinearFn``: outputs, gradients,
double backward, ``torch.func``) and ``torch.compile``."""

import pytest
import torch
from layer_helpers import layers_and_inputs as _layers  # tests/layer_helpers.py
from layer_helpers import lstm_scale_names as _lstm_scale_names
from torch import nn

import wn_rl
from wn_rl import WNConv2d, WNLinear, WNLSTMCell, cached

torch.set_num_threads(2)


@pytest.mark.parametrize("scale", ["linear", "exp"])
def test_cached_computes_the_weight_once_and_keeps_gradients(scale):
    torch.manual_seed(0)
    cell = WNLSTMCell(3, 4, scale=scale)
    layer = WNLinear(4, 2, scale=scale)
    model = nn.ModuleDict({"cell": cell, "out": layer})
    calls = {"n": 0}
    original = torch._weight_norm

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    x = torch.randn(6, 2, 3)
    torch._weight_norm = counting
    try:
        with cached(model):
            h = c = torch.zeros(2, 4)
            total = 0
            for t in range(6):
                h, c = cell(x[t], (h, c))
                total = total + layer(h).sum()
    finally:
        torch._weight_norm = original
    assert calls["n"] == 3  # weight_ih, weight_hh, out: once each for six steps
    total.backward()
    uncached_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    h = c = torch.zeros(2, 4)
    total = 0
    for t in range(6):
        h, c = cell(x[t], (h, c))
        total = total + layer(h).sum()
    total.backward()
    for a, p in zip(uncached_grads, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)
    assert cell._cached_weights is None and layer._cached_weight is None
    assert all(getattr(cell, name).grad.abs().sum() > 0 for name in _lstm_scale_names(scale))
    model.zero_grad()
    with cached(model):  # weights cached while acting without gradients are recomputed for training
        with torch.no_grad():
            cell(x[0])
        cell(x[0])[0].sum().backward()
    assert all(getattr(cell, name).grad is not None for name in _lstm_scale_names(scale))


def test_cached_no_grad_forward_of_a_big_linear_keeps_only_the_scale():
    torch.manual_seed(0)
    layer = WNLinear(512, 128)
    with torch.no_grad():
        layer.g.uniform_(0.5, 1.5)
    x = torch.randn(3, 512)
    expected = layer(x)
    with cached(layer), torch.no_grad():
        first, second = layer(x), layer(x)
        assert layer._cached_weight is None and layer._cached_scale is not None
    torch.testing.assert_close(first, expected.detach())
    torch.testing.assert_close(second, expected.detach())
    assert layer._cached_scale is None  # cleared on exit


@pytest.mark.parametrize("in_features", [8, 512])  # the small layer caches its weight, the big one its output scale
@pytest.mark.parametrize("optimizer", ["Adam", "SGD"])
def test_a_fused_optimizer_step_inside_cached_is_seen(in_features, optimizer):
    """A fused optimizer writes the parameters without bumping their in-place version: the cache still
    recomputes after its step (every torch.optim step counts)."""
    torch.manual_seed(0)
    layer = WNLinear(in_features, 4)
    opt = getattr(torch.optim, optimizer)(layer.parameters(), lr=0.1, fused=True)
    x = torch.randn(2, in_features)
    with cached(layer):
        with torch.no_grad():
            before = layer(x)  # acting: cached
        for p in layer.parameters():  # gradients from elsewhere (a functional or compiled update): no backward
            p.grad = torch.randn_like(p)  # through the cached weight, which would have released it
        versions = [p._version for p in layer.parameters()]
        opt.step()
        assert [p._version for p in layer.parameters()] == versions  # what made the cache go stale
        with torch.no_grad():
            after = layer(x)
    torch.testing.assert_close(after, layer(x).detach())
    assert not torch.allclose(after, before)


def test_cached_no_grad_forward_of_a_big_float64_linear_stays_float64():
    """The kept scale g/||v|| is computed in float64 for a float64 layer (it was rounded through float32: 4e-7)."""
    torch.manual_seed(0)
    layer = WNLinear(512, 256, dtype=torch.float64)
    x = torch.randn(4, 512, dtype=torch.float64)
    expected = x @ layer.compute_weight().T + layer.bias
    with cached(layer), torch.no_grad():
        out = layer(x)
        assert layer._cached_scale is not None and layer._cached_scale.dtype == torch.float64
    torch.testing.assert_close(out, expected.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("index", range(4))
def test_cached_weight_computed_without_grad_is_not_reused_for_training(index):
    """Acting under no_grad and then training inside one `cached` block must still reach g and v."""
    torch.manual_seed(0)
    layer, x = _layers()[index]
    with cached(layer):
        with torch.no_grad():
            layer(x)
        layer(x).sum().backward()
    assert layer.v.grad is not None and layer.g.grad is not None
    cell = WNLSTMCell(3, 4)
    with cached(cell):
        with torch.inference_mode():
            cell(torch.randn(2, 3))
        cell(torch.randn(2, 3))[0].sum().backward()
    assert all(p.grad is not None for p in cell.parameters())


def test_compile_matches_eager():
    torch.manual_seed(0)
    net = nn.Sequential(WNConv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), WNLinear(4 * 6 * 6, 3, scale="exp"))
    x = torch.randn(5, 2, 8, 8)
    wn_rl.data_dependent_init(net, x)
    eager_out = net(x)
    eager_out.sum().backward()
    eager_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    compiled = torch.compile(net)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    for a, p in zip(eager_grads, net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-5)


def _linear_paths(layer, x):
    """Outputs and gradients of ``layer`` through its forward and through F.linear on its materialised w."""
    out = layer(x)
    target = torch.randn_like(out)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad(((out - target) ** 2).sum(), params)
    reference = nn.functional.linear(x, layer.compute_weight(), layer.bias)
    reference_grads = torch.autograd.grad(((reference - target) ** 2).sum(), params)
    return (out, *grads), (reference, *reference_grads)


@pytest.mark.parametrize("scale", ["linear", "exp"])
@pytest.mark.parametrize("bias", [True, False])
def test_output_scaling_equals_the_effective_weight(scale, bias):
    torch.manual_seed(0)
    layer = WNLinear(512, 128, bias=bias, scale=scale, dtype=torch.float64)
    with torch.no_grad():
        (layer.g if scale == "linear" else layer.s).uniform_(0.5, 1.5)
    x = torch.randn(3, 2, 512, dtype=torch.float64, requires_grad=True)  # any leading dims
    assert wn_rl.layers._scale_outputs(x, layer.v)
    fast, reference = _linear_paths(layer, x)
    for a, b in zip(fast, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_output_scaling_is_used_only_where_it_saves_memory_passes():
    big = WNLinear(512, 128)
    assert wn_rl.layers._scale_outputs(torch.randn(32, 512), big.v)
    assert not wn_rl.layers._scale_outputs(torch.randn(600, 512), big.v)  # more rows than features
    assert not wn_rl.layers._scale_outputs(torch.randn(32, 64), WNLinear(64, 32).v)  # a small weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not wn_rl.layers._scale_outputs(torch.randn(32, 512), big.v)
    calls = []
    original = wn_rl.layers._WNLinearFn.apply
    wn_rl.layers._WNLinearFn.apply = lambda *a: calls.append(1) or original(*a)
    try:
        big(torch.randn(4, 512))
        with cached(big):  # a time loop reuses one materialised weight instead
            big(torch.randn(4, 512))
            big(torch.randn(4, 512))
    finally:
        wn_rl.layers._WNLinearFn.apply = original
    assert len(calls) == 1


def test_output_scaling_supports_double_backward():
    """A gradient penalty (the gradient of ||dy/dx||^2) agrees with the materialised-weight form."""
    torch.manual_seed(0)
    layer = WNLinear(512, 128, dtype=torch.float64)
    with torch.no_grad():
        layer.g.uniform_(0.5, 1.5)
    x = torch.randn(4, 512, dtype=torch.float64, requires_grad=True)

    def penalty_grads(forward):
        (grad_x,) = torch.autograd.grad(torch.tanh(forward(x)).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), [layer.v, layer.g, layer.bias])

    fast = penalty_grads(layer)
    reference = penalty_grads(lambda x: nn.functional.linear(x, layer.compute_weight(), layer.bias))
    for a, b in zip(fast, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_output_scaling_under_torch_func_and_compile():
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    layer = WNLinear(512, 128)
    x = torch.randn(8, 512)
    params = {k: p.detach() for k, p in layer.named_parameters()}
    grads = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)
    torch.testing.assert_close(vmap(layer)(x.view(2, 4, 512)), layer(x).view(2, 4, 128))
    layer.zero_grad()
    out = torch.compile(layer)(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, layer(x), rtol=1e-4, atol=1e-5)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-4)


@pytest.mark.compiled_functional_call
@pytest.mark.parametrize("bias", [True, False])
def test_output_scaling_under_compiled_torch_func_grad(bias):
    """``torch.func.grad`` inside ``torch.compile``, as the compiled DQN update takes it, with an input that
    carries a gradient (a layer before this one): Dynamo's ``needs_input_grad`` said False for v, g and
    bias there, and their gradients came back zero."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 512), WNLinear(512, 128, bias=bias))
    x = torch.randn(8, 16)
    params = {k: p.detach() for k, p in net.named_parameters()}

    def loss(params):
        return functional_call(net, params, (x,)).square().sum()

    expected = grad(loss)(params)
    compiled = torch.compile(grad(loss), backend="eager", fullgraph=True)(params)  # Dynamo alone: seconds
    for name, value in expected.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-5, atol=1e-5 * float(value.abs().max()))
