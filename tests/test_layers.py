"""The WN layers: eq. (2)-(4), the norm axis, exp scale, mean-only BN (eq. 7-8), the LSTM cell,
``cached``, pickling, deep copies and ``torch.compile``."""

import copy
import importlib
import pickle

import pytest
import torch
from torch import nn

import wn_rl
from wn_rl import (
    MeanOnlyBatchNorm,
    WNConv1d,
    WNConv2d,
    WNConv3d,
    WNConvTranspose1d,
    WNConvTranspose2d,
    WNConvTranspose3d,
    WNLinear,
    WNLSTMCell,
    cached,
)

torch.set_num_threads(2)


def _layers(dtype=torch.float32, scale="linear"):
    return [
        (WNLinear(5, 3, dtype=dtype, scale=scale), torch.randn(4, 5, dtype=dtype)),
        (WNConv1d(2, 3, 3, dtype=dtype, scale=scale), torch.randn(4, 2, 7, dtype=dtype)),
        (WNConv2d(2, 3, 3, padding=1, dtype=dtype, scale=scale), torch.randn(4, 2, 5, 5, dtype=dtype)),
        (WNConvTranspose2d(2, 3, 3, stride=2, dtype=dtype, scale=scale), torch.randn(4, 2, 4, 4, dtype=dtype)),
        # big enough for the CPU's output-scaling form (wn_rl.layers._WNLinearFn)
        (WNLinear(512, 128, dtype=dtype, scale=scale), torch.randn(4, 512, dtype=dtype)),
        (WNConv3d(2, 3, 3, padding=1, dtype=dtype, scale=scale), torch.randn(2, 2, 4, 4, 3, dtype=dtype)),
        (WNConvTranspose1d(2, 3, 3, stride=2, dtype=dtype, scale=scale), torch.randn(4, 2, 5, dtype=dtype)),
        (WNConvTranspose3d(2, 3, 2, stride=2, dtype=dtype, scale=scale), torch.randn(2, 2, 3, 2, 3, dtype=dtype)),
    ]


LAYER_CASES = range(8)


def _unit_slices(layer, w):
    """w reshaped as (units, fan_in) whichever axis holds the output units."""
    return w.movedim(layer.norm_dim, 0).reshape(w.shape[layer.norm_dim], -1)


@pytest.mark.parametrize("index", LAYER_CASES)
def test_fresh_layers_follow_section_3(index):
    torch.manual_seed(0)
    layer, _ = _layers()[index]
    assert set(dict(layer.named_parameters())) == {"v", "g", "bias"}
    assert torch.all(layer.g == 1) and torch.all(layer.bias == 0)
    assert abs(layer.v.std().item() - 0.05) < 0.03
    assert not bool(layer.initialized)


@pytest.mark.parametrize("index", LAYER_CASES)
def test_weight_norm_equals_g(index):
    torch.manual_seed(0)
    layer, _ = _layers()[index]
    with torch.no_grad():
        layer.g.uniform_(0.5, 2.0)
    norms = _unit_slices(layer, layer.weight).norm(dim=1)
    torch.testing.assert_close(norms, layer.g.detach())


def test_transposed_conv_normalises_per_output_channel():
    layer = WNConvTranspose2d(4, 6, 3)
    assert layer.v.shape == (4, 6, 3, 3) and layer.g.shape == (6,)
    w = layer.weight.detach()
    per_output = w.transpose(0, 1).reshape(6, -1).norm(dim=1)
    torch.testing.assert_close(per_output, torch.ones(6))
    per_input = w.reshape(4, -1).norm(dim=1)
    assert not torch.allclose(per_input, torch.ones(4))


def test_transposed_conv_with_groups_is_refused():
    with pytest.raises(ValueError, match="groups"):
        WNConvTranspose2d(4, 6, 3, groups=2)


@pytest.mark.parametrize("index", LAYER_CASES)
def test_gradients_match_equation_3_in_float64(index):
    torch.manual_seed(0)
    layer, x = _layers(torch.float64)[index]
    with torch.no_grad():
        layer.g.uniform_(0.5, 2.0)
    out = layer(x)
    target = torch.randn_like(out)
    loss = ((out - target) ** 2).sum()
    grad_g, grad_v = torch.autograd.grad(loss, [layer.g, layer.v])

    w = layer.weight.detach().requires_grad_(True)
    plain_out = _plain_forward(layer, x, w)
    (grad_w,) = torch.autograd.grad(((plain_out - target) ** 2).sum(), [w])

    v = _unit_slices(layer, layer.v.detach())
    gw = _unit_slices(layer, grad_w)
    g = layer.g.detach()
    v_norm = v.norm(dim=1)
    expected_g = (gw * v).sum(1) / v_norm  # eq. (3), first half
    expected_v = (g / v_norm)[:, None] * gw - (g * expected_g / v_norm**2)[:, None] * v  # eq. (3)
    torch.testing.assert_close(grad_g, expected_g)
    torch.testing.assert_close(_unit_slices(layer, grad_v), expected_v)
    # eq. (4): grad_v is orthogonal to w
    w_rows = _unit_slices(layer, layer.weight.detach())
    cos = (_unit_slices(layer, grad_v) * w_rows).sum(1) / (w_rows.norm(dim=1) * grad_v.norm() + 1e-30)
    assert cos.abs().max().item() < 1e-10


def _plain_forward(layer, x, w):
    if isinstance(layer, WNLinear):
        return nn.functional.linear(x, w, layer.bias)
    if isinstance(layer, WNConv1d):
        return nn.functional.conv1d(x, w, layer.bias, layer.stride, layer.padding)
    if isinstance(layer, WNConv2d):
        return nn.functional.conv2d(x, w, layer.bias, layer.stride, layer.padding)
    if isinstance(layer, WNConv3d):
        return nn.functional.conv3d(x, w, layer.bias, layer.stride, layer.padding)
    transposed = getattr(nn.functional, f"conv_transpose{len(layer.kernel_size)}d")
    return transposed(x, w, layer.bias, layer.stride, layer.padding)


def test_plain_sgd_never_shrinks_v_norm():
    torch.manual_seed(0)
    net = nn.Sequential(WNLinear(10, 32), nn.Tanh(), WNLinear(32, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.0)
    x, y = torch.randn(64, 10), torch.randn(64, 1)
    previous = [m.v_norm().detach().clone() for m in net if isinstance(m, WNLinear)]
    initial = previous
    for _ in range(50):
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()
        current = [m.v_norm().detach().clone() for m in net if isinstance(m, WNLinear)]
        for before, after in zip(previous, current, strict=True):
            assert torch.all(after >= before * (1 - 1e-5))
        previous = current
    assert all(torch.all(c > 1.001 * i) for c, i in zip(current, initial, strict=True))  # it really grew


def test_exp_scale_parameterises_log_g():
    layer = WNLinear(4, 3, scale="exp")
    assert "s" in dict(layer.named_parameters()) and "g" not in dict(layer.named_parameters())
    with torch.no_grad():
        layer.s.copy_(torch.tensor([0.0, 1.0, -1.0]))
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.tensor([0.0, 1.0, -1.0]).exp())
    layer.weight.sum().backward()
    assert layer.s.grad is not None and layer.v.grad is not None


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="scale") as linear_error:
        WNLinear(3, 2, scale="log")
    with pytest.raises(ValueError, match="scale") as cell_error:
        WNLSTMCell(3, 2, scale="log")
    assert str(cell_error.value) == str(linear_error.value)  # one message for every WN layer
    with pytest.raises(ValueError, match="init_scale"):
        WNLinear(3, 2, init_scale=0.0)
    with pytest.raises(ValueError):
        WNConv2d(3, 4, 3, groups=2)  # torch's own check: in_channels must divide by groups


def test_conv_arguments_match_torch():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9)
    layer = WNConv2d(4, 6, (3, 5), stride=(2, 1), padding=2, dilation=2, groups=2, padding_mode="reflect")
    plain = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=2, dilation=2, groups=2, padding_mode="reflect")
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
        plain.bias.copy_(layer.bias)
    torch.testing.assert_close(layer(x), plain(x))


def test_mean_only_batch_norm_train_and_eval():
    torch.manual_seed(0)
    bn = MeanOnlyBatchNorm(3, momentum=0.1)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(8, 3, 4, 4) + torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    y = bn(x)
    mu = x.mean(dim=(0, 2, 3))
    torch.testing.assert_close(y, x - mu.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1))  # eq. (7)
    torch.testing.assert_close(bn.running_mean, 0.1 * mu)
    bn.eval()
    torch.testing.assert_close(bn(x), x - bn.running_mean.view(1, 3, 1, 1) + bn.bias.view(1, 3, 1, 1))


def test_mean_only_batch_norm_centres_the_gradient():
    bn = MeanOnlyBatchNorm(4)
    t = torch.randn(16, 4, requires_grad=True)
    upstream = torch.randn(16, 4)
    bn(t).backward(upstream)
    torch.testing.assert_close(t.grad, upstream - upstream.mean(0, keepdim=True))  # eq. (8)


def test_mean_only_batch_norm_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\(N, 3"):
        MeanOnlyBatchNorm(3)(torch.randn(2, 4))


def _lstm_scale_names(scale):
    return ("g_ih", "g_hh") if scale == "linear" else ("s_ih", "s_hh")


@pytest.mark.parametrize("scale", ["linear", "exp"])
def test_lstm_cell_starts_from_torch_init_and_matches_it(scale):
    torch.manual_seed(0)
    cell = WNLSTMCell(5, 7, scale=scale)
    torch.manual_seed(0)
    plain = nn.LSTMCell(5, 7)
    torch.testing.assert_close(cell.weight_ih, plain.weight_ih)
    torch.testing.assert_close(cell.weight_hh, plain.weight_hh)
    for name, w in zip(_lstm_scale_names(scale), (plain.weight_ih, plain.weight_hh), strict=True):
        norm = w.norm(dim=1)
        torch.testing.assert_close(getattr(cell, name), norm if scale == "linear" else norm.log())  # s = log ||w||
    x, h = torch.randn(3, 5), (torch.randn(3, 7), torch.randn(3, 7))
    for a, b in zip(cell(x, h), plain(x, h), strict=True):
        torch.testing.assert_close(a, b)
    unbatched = cell(x[0])
    torch.testing.assert_close(unbatched[0], cell(x[:1])[0][0])
    names = set(dict(cell.named_parameters()))
    assert names == {"v_ih", "v_hh", "bias_ih", "bias_hh", *_lstm_scale_names(scale)}
    assert cell.scale == scale and f"scale={scale!r}" in repr(cell)


def test_lstm_cell_exp_scale_gradients_follow_equation_3_in_float64():
    """With g = exp(s), grad_s = g grad_g = g (grad_w . v) / ||v|| per row (eq. 3 and the chain rule)."""
    torch.manual_seed(0)
    cell = WNLSTMCell(4, 3, scale="exp", dtype=torch.float64)
    with torch.no_grad():
        cell.s_ih.uniform_(-1.0, 1.0)
        cell.s_hh.uniform_(-1.0, 1.0)
    torch.testing.assert_close(cell.weight_ih.norm(dim=1), cell.s_ih.detach().exp())
    x = torch.randn(5, 4, dtype=torch.float64)
    hx = (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))
    target = torch.randn(5, 3, dtype=torch.float64)
    loss = ((cell(x, hx)[0] - target) ** 2).sum()
    grads = torch.autograd.grad(loss, [cell.s_ih, cell.s_hh, cell.v_ih, cell.v_hh])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)

    w_ih, w_hh = (w.detach().requires_grad_(True) for w in cell.compute_weights())
    plain_h, _ = torch._VF.lstm_cell(x, hx, w_ih, w_hh, cell.bias_ih, cell.bias_hh)
    grad_w = torch.autograd.grad(((plain_h - target) ** 2).sum(), [w_ih, w_hh])
    for grad_s, gw, v, s in zip(grads[:2], grad_w, (cell.v_ih, cell.v_hh), (cell.s_ih, cell.s_hh), strict=True):
        v = v.detach()
        torch.testing.assert_close(grad_s, s.detach().exp() * (gw * v).sum(1) / v.norm(dim=1))


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


@pytest.mark.parametrize("index", LAYER_CASES)
def test_pickle_deepcopy_and_state_dict_round_trip(index):
    torch.manual_seed(0)
    layer, x = _layers()[index]
    with torch.no_grad():
        layer.g.uniform_(0.5, 2)
    expected = layer(x)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(clone(x), expected)
    torch.manual_seed(1)
    fresh, _ = _layers()[index]
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), expected)
    with cached(layer):
        layer(x)
        copy.deepcopy(layer)  # the cached non-leaf tensor must not travel


@pytest.mark.parametrize("scale", ["linear", "exp"])
def test_lstm_cell_pickle_deepcopy_and_state_dict_round_trip(scale):
    torch.manual_seed(0)
    cell = WNLSTMCell(3, 4, scale=scale)
    with torch.no_grad():
        for name in _lstm_scale_names(scale):
            getattr(cell, name).add_(0.3 * torch.randn(16))
    x, hx = torch.randn(2, 3), (torch.randn(2, 4), torch.randn(2, 4))
    expected = cell(x, hx)
    for clone in (pickle.loads(pickle.dumps(cell)), copy.deepcopy(cell)):
        assert clone.scale == scale
        for a, b in zip(clone(x, hx), expected, strict=True):
            torch.testing.assert_close(a, b)
    torch.manual_seed(1)
    fresh = WNLSTMCell(3, 4, scale=scale)
    fresh.load_state_dict(cell.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh(x, hx), expected, strict=True))
    with cached(cell):
        cell(x, hx)
        clone = copy.deepcopy(cell)  # the cached non-leaf weights must not travel
    assert clone._cached_weights is None
    other = "exp" if scale == "linear" else "linear"
    with pytest.raises(RuntimeError, match="Missing key"):  # a scale mismatch is refused, not misread
        WNLSTMCell(3, 4, scale=other).load_state_dict(cell.state_dict())


# every name that moved out of wn_rl.layers, by its new module: the old path must still resolve each, since
# pickles and saved models name classes by module path (models pickled before name wn_rl.layers.WNConv2d)
MOVED_FROM_LAYERS = {
    "wn_rl.conv": [
        "WNConv1d",
        "WNConv2d",
        "WNConv3d",
        "WNConvTranspose1d",
        "WNConvTranspose2d",
        "WNConvTranspose3d",
        "_CONV_HYPERPARAMETERS",
        "_CONV_TRANSPOSE",
        "_WNConvNd",
        "_WNConvTransposeNd",
    ],
    "wn_rl.mean_only_batch_norm": ["MeanOnlyBatchNorm", "_MeanOnlyBatchNormFn"],
    "wn_rl.recurrent_cells": ["WNGRUCell", "WNLSTMCell", "WNRNNCell", "WNRNNCellBase"],
}
# (class, its arguments, an input shape) for every module class that moved out of wn_rl.layers
MOVED_LAYER_CASES = [
    (WNConv1d, (2, 3, 3), (4, 2, 7)),
    (WNConv2d, (2, 3, 3), (4, 2, 5, 5)),
    (WNConv3d, (2, 3, 3), (2, 2, 4, 4, 3)),
    (WNConvTranspose1d, (2, 3, 3), (4, 2, 5)),
    (WNConvTranspose2d, (2, 3, 3), (4, 2, 4, 4)),
    (WNConvTranspose3d, (2, 3, 2), (2, 2, 3, 2, 3)),
    (MeanOnlyBatchNorm, (3,), (4, 3, 5)),
]


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, names in MOVED_FROM_LAYERS.items() for n in names])
def test_names_moved_out_of_wn_rl_layers_still_resolve_there(module, name):
    moved = getattr(importlib.import_module(module), name)
    assert getattr(importlib.import_module("wn_rl.layers"), name) is moved
    if isinstance(moved, type):
        assert moved.__module__ == module  # it does live in its new home


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
@pytest.mark.parametrize(("cls", "args", "shape"), MOVED_LAYER_CASES, ids=[c[0].__name__ for c in MOVED_LAYER_CASES])
def test_layers_pickled_when_they_lived_in_wn_rl_layers_still_load(monkeypatch, protocol, cls, args, shape):
    """A model pickled before the convolutions and mean-only BN left wn_rl.layers names them there (protocol 2
    as the text ``wn_rl.layers\\nWNConv2d``, protocol 4 as two short strings); it loads to the same module."""
    torch.manual_seed(0)
    layer = cls(*args)
    with torch.no_grad():
        for tensor in [*layer.parameters(), *layer.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(0.3 * torch.randn_like(tensor))
    new_module = cls.__module__
    monkeypatch.setattr(cls, "__module__", "wn_rl.layers")  # what an old pickle names
    data = pickle.dumps(layer, protocol=protocol)
    monkeypatch.undo()
    assert b"wn_rl.layers" in data and new_module.encode() not in data
    old = pickle.loads(data)
    assert type(old) is cls
    assert old.state_dict().keys() == layer.state_dict().keys()
    assert all(torch.equal(old.state_dict()[k], v) for k, v in layer.state_dict().items())
    x = torch.randn(shape)
    assert torch.equal(old(x), layer(x))


def test_lstm_cell_pickled_before_the_scale_option_loads_as_linear():
    cell = WNLSTMCell(3, 4)
    state = cell.__getstate__()
    del state["scale"]  # what a cell pickled by an older wn_rl carries
    old = WNLSTMCell.__new__(WNLSTMCell)
    old.__setstate__(state)
    assert old.scale == "linear"
    torch.testing.assert_close(old(torch.ones(1, 3))[0], cell(torch.ones(1, 3))[0])


def test_exp_scale_lstm_cell_in_wn_stats_and_data_dependent_init():
    """wn_stats reports g = exp(s) for an exp-scale cell; data-dependent init leaves it alone (section 3)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"cell": WNLSTMCell(3, 4, scale="exp"), "head": WNLinear(4, 2, scale="exp")})
    stats = wn_rl.wn_stats(model)
    assert abs(stats["wn/cell.hh/g_mean"] - model["cell"].s_hh.exp().mean().item()) < 1e-6
    v_norm = model["cell"].v_ih.norm(dim=1)
    assert abs(stats["wn/cell.ih/grad_scale_max"] - (model["cell"].s_ih.exp() / v_norm).max().item()) < 1e-6
    before = {k: v.clone() for k, v in model["cell"].state_dict().items()}
    wn_rl.data_dependent_init(model, torch.randn(16, 3), forward=lambda m, b: m["head"](m["cell"](b)[0]))
    assert all(torch.equal(v, before[k]) for k, v in model["cell"].state_dict().items())
    assert bool(model["head"].initialized)


def test_weight_norm_is_fp32_under_reduced_precision():
    layer = WNLinear(64, 8).to(torch.bfloat16)
    with torch.no_grad():
        layer.v.mul_(1e-3)
    assert torch.isfinite(layer.weight).all()
    torch.testing.assert_close(layer.weight.float().norm(dim=1), torch.ones(8), atol=1e-2, rtol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = WNLinear(8, 4)(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16


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


def test_mean_only_batch_norm_supports_double_backward():
    """Gradient penalties differentiate the gradient; eq. (7) is linear, so its second derivative is 0."""
    bn = MeanOnlyBatchNorm(3, dtype=torch.float64)
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    bias = bn.bias
    assert torch.autograd.gradgradcheck(lambda x, b: torch.func.functional_call(bn, {"bias": b}, (x,)) ** 2, (x, bias))


def test_mean_only_batch_norm_refuses_a_cumulative_average_clearly():
    with pytest.raises(ValueError, match=r"momentum=None must be a number in \[0, 1\].*not supported"):
        MeanOnlyBatchNorm(4, momentum=None)
