"""Data-dependent initialization (section 3) in every parameterization, on deep MLPs and CNNs."""

import warnings

import pytest
import torch
from torch import nn

import wn_rl
from wn_rl import MeanOnlyBatchNorm, Parameterization, WNLinear, data_dependent_init, is_initialized

PAPER = ["normal", "batch_norm", "weight_norm", "weight_norm+mean_only_bn", "mean_only_bn"]
ALL = [*PAPER, "layer_norm"]


def deep_mlp(parameterization, init_scales=(1.0, 1.0, 1.0, 1.0, 0.1)):
    return wn_rl.mlp([12, 32, 32, 32, 32, 5], parameterization, nn.ReLU, init_scales=list(init_scales))


def deep_cnn(parameterization):
    p = Parameterization.get(parameterization)
    return nn.Sequential(
        p.conv2d(3, 8, 3, padding=1), nn.ReLU(),
        p.conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        p.conv2d(16, 16, 3, padding=1, init_scale=0.5), nn.ReLU(),
        p.conv_transpose2d(16, 8, 2, stride=2), nn.ReLU(),
        p.conv2d(8, 8, 1), nn.ReLU(),
        nn.Flatten(), p.without_norm().linear(8 * 8 * 8, 4, init_scale=0.1),
    )  # fmt: skip


def pre_activations(model, x):
    """Outputs of every block that feeds an activation or ends the network (the pre-activations)."""
    blocks = [m for m in model if not isinstance(m, (nn.ReLU, nn.Flatten))]
    outputs = []
    handles = [b.register_forward_hook(lambda m, i, o: outputs.append(o.detach())) for b in blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outputs, [(b[0] if isinstance(b, nn.Sequential) else b).init_scale for b in blocks]


def unit_stats(t):
    channel = 1 if t.dim() > 2 else -1
    t = t.movedim(channel, 0).reshape(t.shape[channel], -1)
    return t.mean(1), t.std(1, unbiased=False)


@pytest.mark.parametrize("parameterization", ALL)
@pytest.mark.parametrize("builder,shape", [(deep_mlp, (256, 12)), (deep_cnn, (128, 3, 8, 8))])
def test_pre_activations_are_normalised_after_init(parameterization, builder, shape):
    torch.manual_seed(0)
    model = builder(parameterization)
    x = torch.randn(shape) * 3 + 1
    report = data_dependent_init(model, x)
    assert is_initialized(model) and len(report.layers) == len(wn_rl.init.initializable_layers(model))
    for mode in ("eval", "train"):
        getattr(model, mode)()
        outputs, scales = pre_activations(model, x)
        for out, scale in zip(outputs, scales, strict=True):
            mean, std = unit_stats(out)
            assert mean.abs().max() < 1e-4 * max(1.0, scale) + 1e-5, (mode, mean.abs().max())
            torch.testing.assert_close(std, torch.full_like(std, scale), rtol=1e-3, atol=1e-6)


def test_parameterizations_from_one_seed_compute_one_function():
    x = torch.randn(200, 12)
    outputs = {}
    for parameterization in PAPER:
        torch.manual_seed(3)
        model = deep_mlp(parameterization)
        data_dependent_init(model, x)
        model.eval()
        outputs[parameterization] = model(x).detach()
    for parameterization in PAPER[1:]:
        torch.testing.assert_close(outputs[parameterization], outputs["normal"], rtol=1e-3, atol=1e-4)
    torch.manual_seed(3)
    cnn_normal = deep_cnn("normal")
    torch.manual_seed(3)
    cnn_wn = deep_cnn("weight_norm")
    images = torch.randn(64, 3, 8, 8)
    data_dependent_init(cnn_normal, images)
    data_dependent_init(cnn_wn, images)
    torch.testing.assert_close(cnn_wn(images), cnn_normal(images), rtol=1e-4, atol=1e-5)


def test_init_runs_once_and_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = deep_mlp("weight_norm+mean_only_bn")
    x = torch.randn(64, 12)
    data_dependent_init(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="already initialised"):
        report = data_dependent_init(model, torch.randn(64, 12) * 5)
    assert report.skipped
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = deep_mlp("weight_norm+mean_only_bn")
    assert not is_initialized(fresh)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert is_initialized(fresh)
    with pytest.warns(UserWarning, match="already initialised"):
        data_dependent_init(fresh, x * 7)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    forced = data_dependent_init(fresh, x * 7, force=True)
    assert not forced.skipped and not torch.equal(fresh[0][0].g, state["0.0.g"])


def test_dead_units_stay_finite_and_unchanged():
    torch.manual_seed(0)
    layer = WNLinear(4, 3)
    with torch.no_grad():
        layer.v[0, 1:] = 0.0  # unit 0 only sees feature 0, which is constant below
        layer.bias.copy_(torch.tensor([0.3, 0.0, 0.0]))
    x = torch.randn(32, 4)
    x[:, 0] = 2.0
    g_before, b_before = layer.g[0].item(), layer.bias[0].item()
    report = data_dependent_init(layer, x)
    assert report.dead_units == {"": [0]}
    assert layer.g[0].item() == g_before and layer.bias[0].item() == b_before
    assert torch.isfinite(layer.g).all() and torch.isfinite(layer.bias).all()
    _, std = unit_stats(layer(x).detach())
    torch.testing.assert_close(std[1:], torch.ones(2), rtol=1e-4, atol=1e-6)


def test_mean_only_bn_gets_the_init_batch_mean():
    torch.manual_seed(0)
    model = Parameterization.get("weight_norm+mean_only_bn").linear(6, 4, init_scale=2.0)
    layer, bn = model[0], model[1]
    assert isinstance(bn, MeanOnlyBatchNorm) and layer.bias is None
    x = torch.randn(100, 6) + 3
    g_before = layer.g.detach().clone()
    report = data_dependent_init(model, x)
    assert report.layers[0].paired_norm == "1"
    raw = layer(x).detach()
    torch.testing.assert_close(bn.running_mean, raw.mean(0))
    torch.testing.assert_close(raw.std(0, unbiased=False), torch.full((4,), 2.0), rtol=1e-4, atol=1e-5)
    assert torch.all(bn.bias == 0) and not torch.equal(layer.g, g_before)
    model.eval()
    eval_out = model(x).detach()
    model.train()
    torch.testing.assert_close(model(x).detach(), eval_out, rtol=1e-5, atol=1e-5)


def test_plain_models_not_built_by_us_are_initialised_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(50, 1, 8, 8) * 4
    data_dependent_init(model, x)
    _, std = unit_stats(model[0](x).detach())
    torch.testing.assert_close(std, torch.ones(4), rtol=1e-4, atol=1e-6)
    assert is_initialized(model) and "0.initialized" in model.state_dict()


def test_recurrent_cells_keep_their_init():
    cell = wn_rl.WNLSTMCell(3, 4)
    head = WNLinear(4, 2)
    before = {k: v.clone() for k, v in cell.state_dict().items()}

    def forward(model, batch):
        h, _ = model["cell"](batch)
        return model["head"](h)

    data_dependent_init(nn.ModuleDict({"cell": cell, "head": head}), torch.randn(16, 3), forward=forward)
    assert all(torch.equal(v, before[k]) for k, v in cell.state_dict().items())
    assert bool(head.initialized)


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="at least 2 examples"):
        data_dependent_init(WNLinear(3, 2), torch.randn(1, 3))
    with pytest.raises(ValueError, match="no layer"):
        data_dependent_init(nn.Sequential(nn.ReLU()), torch.randn(4, 3))
    with pytest.raises(FloatingPointError, match="non-finite"):
        data_dependent_init(WNLinear(3, 2), torch.full((4, 3), float("nan")))


def test_layers_never_reached_are_reported():
    model = nn.ModuleDict({"used": WNLinear(3, 2), "unused": WNLinear(3, 2)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = data_dependent_init(model, torch.randn(8, 3), forward=lambda m, b: m["used"](b))
    assert report.not_reached == ["unused"] and any("never reached" in str(w.message) for w in caught)


def test_unbatched_input_is_explained():
    """A single observation (no batch dim) has no per-unit spread: refused, nothing changed."""
    for model, observation in (
        (nn.Sequential(WNLinear(4, 3), nn.ReLU(), WNLinear(3, 2)), torch.randn(4)),
        (nn.Sequential(wn_rl.WNConv2d(4, 8, 3), nn.ReLU()), torch.randn(4, 6, 6)),
    ):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="unbatched"):
            data_dependent_init(model, observation)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("parameterization", [p for p in ALL if p != "batch_norm"])
def test_float64_models_are_initialised_in_float64(parameterization):
    """The statistics are taken in the model's precision (at least fp32), not rounded to fp32."""
    torch.manual_seed(0)
    model = deep_mlp(parameterization).double().eval()
    x = torch.randn(256, 12, dtype=torch.float64) * 3 + 1
    data_dependent_init(model, x)
    outputs, scales = pre_activations(model, x)
    for out, scale in zip(outputs, scales, strict=True):
        mean, std = unit_stats(out)
        assert mean.abs().max() < 1e-12, mean.abs().max()
        torch.testing.assert_close(std, torch.full_like(std, scale), rtol=1e-12, atol=0)


class _FailsAfterTheFirstLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.norm, self.second = WNLinear(4, 8), MeanOnlyBatchNorm(8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.norm(self.first(x))
        if h.shape[0] > 1:
            raise RuntimeError("a bug further down the model")
        return self.second(h)


def test_a_failing_pass_leaves_the_model_as_it_was():
    """The first layer (and its batch norm) were initialised before the error: that is undone, in place."""
    torch.manual_seed(0)
    model = _FailsAfterTheFirstLayer()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    g = model.first.g
    with pytest.raises(RuntimeError, match="further down"):
        data_dependent_init(model, torch.randn(16, 4) * 3 + 1)
    after = model.state_dict()
    assert set(after) == set(before) | {"second.initialized"}  # the plain layer got its (unset) flag
    assert all(torch.equal(after[k], t) for k, t in before.items())
    assert not bool(after["second.initialized"]) and model.first.g is g  # restored in place


class _ReenablesGradients(nn.Module):
    """As SB3's ContinuousCritic does for a features extractor of its own."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(4, 8), WNLinear(8, 2)

    def forward(self, x):
        with torch.enable_grad():
            h = torch.relu(self.inner(x))
        return self.head(h)


def test_a_forward_that_reenables_gradients_is_initialised():
    model = _ReenablesGradients()
    report = data_dependent_init(model, torch.randn(64, 4))
    assert len(report.layers) == 2 and is_initialized(model)


def test_a_fresh_plain_model_loads_an_initialised_ones_state_after_add_init_flags():
    def build():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))

    model = build()
    model[3].init_scale = 0.1
    data_dependent_init(model, torch.randn(32, 3, 8, 8))
    saved = model.state_dict()
    with pytest.raises(RuntimeError, match="initialized"):
        build().load_state_dict(saved)  # the plain layers got their flags from the init
    fresh = wn_rl.add_init_flags(build())
    assert not is_initialized(fresh)
    fresh.load_state_dict(saved)
    assert is_initialized(fresh)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key
    flagged = build()
    flagged[3].init_scale = 0.1
    assert wn_rl.add_init_flags(flagged)[3].init_scale == 0.1


def _hooked_weight_norm(layer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated API, still in use
        return torch.nn.utils.weight_norm(layer)


UNSETTABLE = {
    "torch parametrizations": lambda: torch.nn.utils.parametrizations.weight_norm(nn.Linear(8, 4)),
    "a deprecated weight-norm hook": lambda: _hooked_weight_norm(nn.Linear(8, 4)),
    "a spectral-norm hook": lambda: torch.nn.utils.spectral_norm(nn.Linear(8, 4)),
}


@pytest.mark.parametrize("make", UNSETTABLE.values(), ids=UNSETTABLE.keys())
@pytest.mark.parametrize("init", ["data_dependent", "torch_default"])
def test_a_layer_whose_weight_is_recomputed_is_refused_with_the_model_unchanged(make, init):
    """Such a weight is rebuilt before every forward: an in-place write would be lost, leaving a layer reported
    initialised with its bias moved and its scale not."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), make())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot set \['2'\]: their weight is .* The model is unchanged"):
        if init == "data_dependent":
            data_dependent_init(model, torch.randn(64, 8))
        else:
            wn_rl.torch_default_init(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_tied_weights_are_refused_before_anything_changes():
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight  # setting b's scale would change a's function
    model = nn.Sequential(a, nn.Tanh(), b)
    with pytest.raises(ValueError, match=r"cannot set \['0', '2'\]: they share a parameter"):
        data_dependent_init(model, torch.randn(64, 6))
    assert "initialized" not in a._buffers
    with pytest.raises(ValueError, match=r"torch_default_init cannot set \['0', '2'\]"):
        wn_rl.torch_default_init(model)
    shared = nn.Linear(6, 6)  # one module used twice shares nothing: it is set once, on its first use
    report = data_dependent_init(nn.Sequential(shared, nn.Tanh(), shared), torch.randn(64, 6))
    assert [layer.name for layer in report.layers] == ["0"]


def test_a_batch_norm_without_running_statistics_pairs_with_its_layer():
    model = nn.Sequential(WNLinear(4, 5, bias=False), nn.BatchNorm1d(5, track_running_stats=False), nn.ReLU())
    x = torch.randn(128, 4) * 3 + 1
    report = data_dependent_init(model, x)
    assert report.layers[0].paired_norm == "1"
    with torch.no_grad():
        out = model[1](model[0](x))
    torch.testing.assert_close(out.mean(0), torch.zeros(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(0, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)


def test_a_layer_norm_unit_without_variance_keeps_its_affine_and_is_listed():
    """A degenerate init batch (near-identical observations, as an RL env can give at its start) leaves a layer
    norm's output constant: its affine is kept (dividing by a zero std made it ~1e12) and its units are listed."""
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(0.5, 1.5, 6))
    weight, bias = model[1].weight.clone(), model[1].bias.clone()
    x = torch.randn(1, 4).repeat(32, 1)
    report = data_dependent_init(model, x)
    assert torch.equal(model[1].weight, weight) and torch.equal(model[1].bias, bias)
    assert report.layers[0].dead_units == list(range(6))


def test_a_layer_norm_after_an_initialised_layer_in_a_full_pass_is_reported():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.LayerNorm(6))
    report = data_dependent_init(model, torch.randn(64, 4))
    assert [(layer.name, layer.kind) for layer in report.layers] == [("0", "Linear"), ("2", "LayerNorm")]
    with torch.no_grad():
        out = model(torch.randn(64, 4))
    assert out.std(0).mean() > 0.5


def test_the_init_flag_is_made_on_the_layers_device():
    layer = Parameterization.get("normal").linear(3, 4, device="meta")
    assert layer.weight.device.type == "meta" and layer.initialized.device.type == "meta"
