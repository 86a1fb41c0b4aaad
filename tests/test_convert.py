"""weight_norm / remove_weight_norm keep outputs unchanged, in both directions."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import wn_rl
from wn_rl import WNConv1d, WNConv2d, WNConvTranspose2d, WNLinear, WNLSTMCell, remove_weight_norm, weight_norm


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 4, 3)
        self.conv2 = nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular")
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2, output_padding=0)
        self.cell = nn.LSTMCell(4, 5)
        self.head = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2, bias=False))

    def forward(self, seq, image):
        a = self.conv1(seq).mean(-1)
        h, _ = self.cell(a)
        b = self.up(self.conv2(image)).mean((1, 2, 3))
        return self.head(h) + b[:, None]


def _inputs():
    return torch.randn(3, 2, 6), torch.randn(3, 2, 5, 5)


@pytest.mark.parametrize("scale", ["linear", "exp"])
def test_conversion_preserves_outputs_and_types(scale):
    torch.manual_seed(0)
    model = Mixed()
    x = _inputs()
    expected = model(*x)
    converted = weight_norm(copy.deepcopy(model), init_scale=0.5, scale=scale)
    torch.testing.assert_close(converted(*x), expected, rtol=1e-5, atol=1e-6)
    kinds = {type(converted.conv1), type(converted.conv2), type(converted.up), type(converted.cell)}
    assert kinds == {WNConv1d, WNConv2d, WNConvTranspose2d, WNLSTMCell}
    assert isinstance(converted.head[0], WNLinear) and converted.head[0].init_scale == 0.5
    assert converted.head[2].bias is None and converted.conv2.padding_mode == "circular"
    assert converted.head[0].scale == scale and converted.cell.scale == scale
    torch.testing.assert_close(converted.head[0].g_value, model.head[0].weight.norm(dim=1))


@pytest.mark.parametrize("scale", ["linear", "exp"])
def test_folding_preserves_outputs_and_gives_plain_layers(scale):
    torch.manual_seed(0)
    model = weight_norm(Mixed(), scale=scale)
    x = _inputs()
    wn_rl.data_dependent_init(model, x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    expected = model(*x)
    folded = remove_weight_norm(model)
    assert not any(isinstance(m, (wn_rl.WNLayer, WNLSTMCell)) for m in folded.modules())
    assert type(folded.up) is nn.ConvTranspose2d and type(folded.cell) is nn.LSTMCell
    torch.testing.assert_close(folded(*x), expected, rtol=1e-5, atol=1e-6)
    assert bool(folded.head[0].initialized)  # the init flag survives folding
    again = weight_norm(folded, scale=scale)
    torch.testing.assert_close(again(*x), expected, rtol=1e-5, atol=1e-6)


def _run_cell(cell, xs, hx):
    outputs = []
    for x in xs:
        hx = cell(x, hx)
        outputs.append(hx[0])
    return torch.stack(outputs), hx[1]


def _lstm_scale_names(scale):
    return ("g_ih", "g_hh") if scale == "linear" else ("s_ih", "s_hh")


@pytest.mark.parametrize("scale", ["linear", "exp"])
def test_lstm_cell_conversion_follows_scale_and_preserves_outputs(scale):
    torch.manual_seed(0)
    plain = nn.LSTMCell(3, 5)
    xs, hx = torch.randn(6, 2, 3), (torch.randn(2, 5), torch.randn(2, 5))
    expected = _run_cell(plain, xs, hx)
    cell = weight_norm(copy.deepcopy(plain), scale=scale)
    assert isinstance(cell, WNLSTMCell) and cell.scale == scale
    assert set(dict(cell.named_parameters())) == {"v_ih", "v_hh", "bias_ih", "bias_hh", *_lstm_scale_names(scale)}
    g_ih = getattr(cell, _lstm_scale_names(scale)[0])
    norm_ih = plain.weight_ih.norm(dim=1)
    torch.testing.assert_close(g_ih, norm_ih if scale == "linear" else norm_ih.log())
    for a, b in zip(_run_cell(cell, xs, hx), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with wn_rl.cached(cell):
        h, c = _run_cell(cell, xs, hx)
    torch.testing.assert_close(h, expected[0], rtol=1e-5, atol=1e-6)
    (h.sum() + c.sum()).backward()
    assert all(getattr(cell, name).grad.abs().sum() > 0 for name in _lstm_scale_names(scale))


@pytest.mark.parametrize("scale", ["linear", "exp"])
def test_lstm_cell_folds_back_exactly(scale):
    torch.manual_seed(0)
    cell = WNLSTMCell(3, 5, scale=scale)
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.1 * torch.randn_like(p))
    xs, hx = torch.randn(6, 2, 3), (torch.randn(2, 5), torch.randn(2, 5))
    expected = _run_cell(cell, xs, hx)
    w_ih, w_hh = cell.compute_weights()
    folded = remove_weight_norm(cell)
    assert type(folded) is nn.LSTMCell
    assert torch.equal(folded.weight_ih, w_ih) and torch.equal(folded.weight_hh, w_hh)
    assert all(torch.equal(a, b) for a, b in zip(_run_cell(folded, xs, hx), expected, strict=True))
    again = weight_norm(folded, scale=scale)
    assert again.scale == scale
    for a, b in zip(_run_cell(again, xs, hx), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", ["linear", "exp"])
def test_lstm_cell_zero_rows_survive_conversion(scale):
    plain = nn.LSTMCell(3, 4)
    with torch.no_grad():
        plain.weight_hh[2] = 0.0
        plain.weight_ih[5] = 0.0
    cell = weight_norm(copy.deepcopy(plain), scale=scale)
    x, hx = torch.randn(2, 3), (torch.randn(2, 4), torch.randn(2, 4))
    assert torch.isfinite(cell.weight_hh).all() and torch.isfinite(cell.weight_ih).all()
    for a, b in zip(cell(x, hx), plain(x, hx), strict=True):
        torch.testing.assert_close(a, b)
    folded = remove_weight_norm(cell)
    assert not folded.weight_hh[2].any() and not folded.weight_ih[5].any()  # zero rows stay exactly zero
    torch.testing.assert_close(folded.weight_hh, plain.weight_hh)


def test_single_layers_are_replaced_and_zero_rows_survive():
    plain = nn.Linear(3, 2)
    with torch.no_grad():
        plain.weight[0] = 0.0
    layer = weight_norm(plain)
    assert isinstance(layer, WNLinear)
    x = torch.randn(4, 3)
    torch.testing.assert_close(layer(x), plain(x))
    assert torch.isfinite(layer.weight).all()
    assert isinstance(remove_weight_norm(layer), nn.Linear)


def test_recurrent_stacks_are_converted_without_a_warning():
    """nn.LSTM/GRU/RNN become wn_rl's time loops (tests/test_recurrent_stacks.py has their outputs); they were left
    plain with a warning."""
    model = nn.Sequential(nn.Linear(3, 3))
    model.add_module("rnn", nn.LSTM(3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weight_norm(model)
    assert isinstance(model.rnn, wn_rl.WNLSTM) and isinstance(model[0], WNLinear)


def test_a_projected_lstm_converts_and_folds_back_without_a_warning():
    """nn.LSTM(proj_size=P) becomes a WNLSTM whose projection is weight-normalized too, and folds back into
    nn.LSTM(proj_size=P); it was left plain with a warning. A frozen projection stays frozen both ways."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(8, 16, 2, proj_size=5, bidirectional=True))
    model[0].weight_hr_l0_reverse.requires_grad_(False)
    x = torch.randn(6, 3, 8)
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weight_norm(model)
    lstm = model[0]
    assert type(lstm) is wn_rl.WNLSTM and lstm.proj_size == 5 and lstm.bidirectional
    assert not lstm.cell(0, reverse=True).v_hr.requires_grad and lstm.cell(0, reverse=True).v_ih.requires_grad
    torch.testing.assert_close(model(x), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        remove_weight_norm(model)
    assert type(model[0]) is nn.LSTM and model[0].proj_size == 5 and model[0].weight_hr_l1.shape == (5, 16)
    assert [name for name, p in model[0].named_parameters() if not p.requires_grad] == ["weight_hr_l0_reverse"]
    torch.testing.assert_close(model(x), expected)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="scale"):
        weight_norm(nn.Linear(2, 2), scale="log")
    with pytest.raises(ValueError, match="groups"):
        weight_norm(nn.ConvTranspose2d(4, 4, 3, groups=2))


class Tied(nn.Module):
    """One layer used at two places (weight tying)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([self.encoder, self.encoder])

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def test_tied_layers_stay_tied():
    torch.manual_seed(0)
    model = Tied()
    x = torch.randn(3, 4)
    expected = model(x)
    converted = weight_norm(model)
    assert converted.encoder is converted.blocks[0] is converted.blocks[1]
    torch.testing.assert_close(converted(x), expected)
    folded = remove_weight_norm(converted)
    assert type(folded.encoder) is nn.Linear and folded.encoder is folded.blocks[0] is folded.blocks[1]
    torch.testing.assert_close(folded(x), expected)


@pytest.mark.parametrize("scale", ["linear", "exp"])
def test_frozen_layers_stay_frozen(scale):
    model = nn.Sequential(nn.Linear(3, 4), nn.Conv1d(4, 2, 1), nn.LSTMCell(2, 2), nn.Linear(2, 2))
    model[:3].requires_grad_(False)
    converted = weight_norm(model, scale=scale)
    assert not any(p.requires_grad for p in converted[:3].parameters())
    assert all(p.requires_grad for p in converted[3].parameters())
    folded = remove_weight_norm(converted)
    assert not any(p.requires_grad for p in folded[:3].parameters())
    assert all(p.requires_grad for p in folded[3].parameters())


def test_a_layer_that_cannot_be_converted_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (4, 1, 1)), nn.ConvTranspose2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"\['2'\].*groups != 1.*model is unchanged"):
        weight_norm(model)
    assert [type(m) for m in model] == [nn.Linear, nn.Unflatten, nn.ConvTranspose2d]


def test_an_uninitialised_lazy_layer_is_refused_and_an_initialised_one_converted():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.LazyLinear(4))
    with pytest.raises(ValueError, match=r"\['2 \(LazyLinear\)'\].*first forward pass.*model is unchanged"):
        weight_norm(model)
    assert type(model[0]) is nn.Conv2d
    x = torch.randn(2, 2, 5, 5)
    expected = model(x)  # materialises the lazy layer: it becomes an nn.Linear
    converted = weight_norm(model)
    assert isinstance(converted[2], WNLinear)
    torch.testing.assert_close(converted(x), expected)


def test_lazy_layers_weight_norm_never_converts_are_not_refused(recwarn):
    model = nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d(), nn.ReLU(), nn.Linear(4, 2))
    converted = weight_norm(model)  # batch norm has no weight to normalize, lazy or not
    assert isinstance(converted[0], WNLinear) and isinstance(converted[3], WNLinear)
    assert isinstance(converted[1], nn.LazyBatchNorm1d)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    with pytest.raises(ValueError, match=r"'1 \(LazyConv3d\)'"):  # convertible since WNConv3d exists
        weight_norm(nn.Sequential(nn.Linear(1, 1), nn.LazyConv3d(1, 1)))


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * nn.functional.linear(x, self.weight, self.bias)


def test_layers_left_plain_are_named_in_a_warning():
    model = nn.Sequential(ScaledLinear(3, 3), nn.Conv3d(1, 1, 1), nn.Linear(3, 3))
    model.add_module("attention", nn.MultiheadAttention(4, 2))
    with pytest.warns(UserWarning) as record:
        weight_norm(model)
    messages = " ".join(str(w.message) for w in record)
    assert "'0 (ScaledLinear)'" in messages and "'attention.out_proj (NonDynamicallyQuantizableLinear)'" in messages
    assert "Conv3d" not in messages
    assert type(model[0]) is ScaledLinear and isinstance(model[1], wn_rl.WNConv3d) and isinstance(model[2], WNLinear)


@pytest.mark.parametrize("scale", ["linear", "exp"])
def test_every_torch_convolution_converts_and_folds_back_exactly(scale, recwarn):
    torch.manual_seed(0)
    cases = [
        (nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=1, padding_mode="circular"), torch.randn(2, 2, 5, 6, 4)),
        (nn.Conv3d(4, 4, 3, groups=2, dilation=2, bias=False), torch.randn(2, 4, 6, 6, 6)),
        (nn.ConvTranspose1d(2, 4, 3, stride=2, output_padding=1), torch.randn(3, 2, 5)),
        (nn.ConvTranspose3d(2, 4, (2, 3, 2), stride=2, padding=(0, 1, 0)), torch.randn(2, 2, 3, 4, 3)),
    ]
    for plain, x in cases:
        plain = plain.double()
        x = x.double()
        expected = plain(x)
        converted = weight_norm(copy.deepcopy(plain), scale=scale)
        assert type(converted).__name__ == "WN" + type(plain).__name__
        torch.testing.assert_close(converted(x), expected)
        norms = converted.weight.movedim(converted.norm_dim, 0).flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, converted.g_value)  # one g per output channel, dim 1 when transposed
        folded = remove_weight_norm(converted)
        assert type(folded) is type(plain)
        torch.testing.assert_close(folded(x), expected)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    up = weight_norm(nn.ConvTranspose1d(2, 4, 3, stride=2))
    torch.testing.assert_close(up(torch.randn(1, 2, 5), output_size=[12]).shape[-1], 12)


@pytest.mark.parametrize("transposed", [False, True])
def test_data_dependent_init_of_converted_3d_convolutions(transposed):
    """Section 3 per output channel, over the batch and all three spatial axes."""
    torch.manual_seed(0)
    layer = nn.ConvTranspose3d(2, 4, 2, stride=2) if transposed else nn.Conv3d(2, 4, 3)
    x = torch.randn(16, 2, 5, 5, 4)
    converted = weight_norm(layer, init_scale=0.5)
    wn_rl.data_dependent_init(converted, x)
    with torch.no_grad():
        out = converted(x)
    torch.testing.assert_close(out.mean((0, 2, 3, 4)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((0, 2, 3, 4)), torch.full((4,), 0.5), atol=5e-3, rtol=0)


def test_a_model_with_only_convertible_layers_converts_without_warnings(recwarn):
    weight_norm(nn.Sequential(nn.Conv1d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.ConvTranspose2d(2, 2, 1), nn.Linear(2, 2)))
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


class ShiftedWNLinear(WNLinear):
    def forward(self, x):
        return super().forward(x) + 1.0


def test_folding_leaves_subclasses_of_wn_layers_with_a_warning():
    model = nn.Sequential(ShiftedWNLinear(3, 3), WNLinear(3, 2))
    x = torch.randn(4, 3)
    expected = model(x)
    with pytest.warns(UserWarning, match=r"\['0 \(ShiftedWNLinear\)'\]"):
        folded = remove_weight_norm(model)
    assert type(folded[0]) is ShiftedWNLinear and type(folded[1]) is nn.Linear
    torch.testing.assert_close(folded(x), expected)


def test_layers_with_torch_parametrizations_are_left_with_the_way_to_convert_them():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    with pytest.warns(UserWarning, match=r"\['0 \(ParametrizedLinear\)'\].*remove_parametrizations") as record:
        weight_norm(model)
    assert not any("subclass" in str(w.message) for w in record)
    assert torch.nn.utils.parametrize.is_parametrized(model[0]) and isinstance(model[1], WNLinear)


def test_exp_scale_conversion_where_denormals_are_flushed():
    """A library built with -ffast-math (torch 2.4's compiled CPU kernels) flushes denormals for the whole
    process; the exp-scale conversion then raised 'math domain error' for every model."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        plain = nn.Linear(3, 2).double()
        with torch.no_grad():
            plain.weight[0] = 0.0
        converted = weight_norm(copy.deepcopy(plain), scale="exp")
    finally:
        torch.set_flush_denormal(False)
    assert torch.isfinite(converted.s).all() and not converted.weight[0].any()
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(converted(x), plain(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_rows_convert_to_exp_scale_with_finite_parameters_and_zero_weights(dtype):
    # s = log 0 = -inf gave the same outputs, but NaN/inf guards (SB3's, the native DQN's) check every parameter
    plain = nn.Sequential(nn.Linear(4, 3), nn.Conv1d(3, 2, 1), nn.LSTMCell(2, 2)).to(dtype)
    with torch.no_grad():
        plain[0].weight[1] = 0.0
        plain[1].weight[0] = 0.0
        plain[2].weight_hh[3] = 0.0
    converted = weight_norm(copy.deepcopy(plain), scale="exp")
    assert all(torch.isfinite(p).all() for p in converted.parameters())
    assert not converted[0].weight[1].any() and not converted[1].weight[0].any()  # w = 0 exactly, as before
    x, h = torch.randn(5, 4, dtype=dtype), torch.randn(5, 3, 1, dtype=dtype)
    torch.testing.assert_close(converted[0](x), plain[0](x))
    torch.testing.assert_close(converted[1](h), plain[1](h))
    folded = remove_weight_norm(converted)
    assert not folded[0].weight[1].any() and not folded[1].weight[0].any() and not folded[2].weight_hh[3].any()


@pytest.mark.parametrize("where", ["top", "inside"])
def test_converting_a_compiled_layer_trains_the_new_parameters(where):
    """torch.compile binds its forward to the layer it wraps: swapping its _orig_mod left the compiled module
    running the old layer, so the new v and g got no gradient and changing them changed nothing."""
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    compiled = torch.compile(nn.Linear(3, 3), backend="eager")
    model = wn_rl.weight_norm(compiled if where == "top" else nn.Sequential(compiled))
    layer = compiled._orig_mod
    assert isinstance(layer, wn_rl.WNLinear)
    with torch.no_grad():
        layer.g.mul_(2)
    y = model(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    assert layer.v.grad is not None and layer.g.grad is not None
    folded = wn_rl.remove_weight_norm(model)
    plain = compiled._orig_mod
    assert type(plain) is nn.Linear
    with torch.no_grad():
        plain.weight.mul_(3)
    torch.testing.assert_close(folded(x), plain(x))


def test_mlp_overrides_take_integer_layer_indices_only():
    for key in (1.5, "-1", True):
        with pytest.raises(ValueError, match="must be an integer layer index"):
            wn_rl.mlp([3, 4, 2], "batch_norm", overrides={key: "weight_norm"})
    assert isinstance(wn_rl.mlp([3, 4, 2], "batch_norm", overrides={np.int64(-1): "normal"})[-1], nn.Linear)
