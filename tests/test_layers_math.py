"""The WN layers' math: eq. (2)-(4) for the linear and conv layers, the norm axis, exp scale, the argument
checks, mean-only BN (eq. 7-8), the LSTM cell, and fp32 norms under reduced precision."""

import pytest
import torch
from layer_helpers import LAYER_CASES  # tests/layer_helpers.py
from layer_helpers import layers_and_inputs as _layers
from layer_helpers import lstm_scale_names as _lstm_scale_names
from torch import nn

import wn_rl
from wn_rl import MeanOnlyBatchNorm, WNConv1d, WNConv2d, WNConv3d, WNConvTranspose2d, WNLinear, WNLSTMCell

torch.set_num_threads(2)


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


@pytest.mark.parametrize(
    ("wn_cls", "args"),
    [
        (wn_rl.WNConv1d, (3, 8, 3, 1, 0, 1, 1, True, "zeros")),
        (wn_rl.WNConv2d, (3, 8, 3, 1, 0, 1, 1, True, "zeros")),
        (wn_rl.WNConv3d, (3, 8, 3, 1, 0, 1, 1, True, "zeros")),
        (wn_rl.WNConvTranspose1d, (3, 8, 3, 1, 0, 0, 1, True, 1, "zeros")),
        (wn_rl.WNConvTranspose2d, (3, 8, 3, 1, 0, 0, 1, True, 1, "zeros")),
        (wn_rl.WNConvTranspose3d, (3, 8, 3, 1, 0, 0, 1, True, 1, "zeros")),
    ],
)
def test_conv_takes_every_argument_positionally_as_torch_does(wn_cls, args):
    """Same constructor arguments as the torch layer: device and dtype, last, may come positionally too."""
    layer = wn_cls(*args, "cpu", torch.float64)
    plain = wn_cls._torch_cls(*args, "cpu", torch.float64)
    assert layer.v.dtype == layer.g.dtype == torch.float64
    assert layer.v.shape == plain.weight.shape
    with pytest.raises(TypeError, match=f"{wn_cls.__name__}: too many positional arguments"):
        wn_cls(*args, "cpu", torch.float64, 1)


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


def test_mean_only_batch_norm_supports_double_backward():
    """Gradient penalties differentiate the gradient; eq. (7) is linear, so its second derivative is 0."""
    bn = MeanOnlyBatchNorm(3, dtype=torch.float64)
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    bias = bn.bias
    assert torch.autograd.gradgradcheck(lambda x, b: torch.func.functional_call(bn, {"bias": b}, (x,)) ** 2, (x, bias))


def test_mean_only_batch_norm_refuses_a_cumulative_average_clearly():
    with pytest.raises(ValueError, match=r"momentum=None must be a number in \[0, 1\].*not supported"):
        MeanOnlyBatchNorm(4, momentum=None)


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
