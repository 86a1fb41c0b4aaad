"""The parameterization switch and its builders."""

import numpy as np
import pytest
import torch
from torch import nn

import wn_rl
from wn_rl import MeanOnlyBatchNorm, Parameterization, WNConv2d, WNLinear


def test_the_paper_five_and_layer_norm_are_registered():
    names = set(wn_rl.PARAMETERIZATIONS)
    assert {"normal", "batch_norm", "weight_norm", "weight_norm+mean_only_bn", "mean_only_bn", "layer_norm"} <= names


@pytest.mark.parametrize(
    "name,weight_type,norm_type",
    [
        ("normal", nn.Linear, None),
        ("batch_norm", nn.Linear, nn.BatchNorm1d),
        ("weight_norm", WNLinear, None),
        ("weight_norm+mean_only_bn", WNLinear, MeanOnlyBatchNorm),
        ("mean_only_bn", nn.Linear, MeanOnlyBatchNorm),
        ("layer_norm", nn.Linear, nn.LayerNorm),
    ],
)
def test_linear_builder_layout(name, weight_type, norm_type):
    block = Parameterization.get(name).linear(4, 3, init_scale=0.2)
    layer = block[0] if norm_type else block
    assert type(layer) is weight_type and layer.init_scale == 0.2
    if norm_type:
        assert type(block[1]) is norm_type and layer.bias is None
    assert block(torch.randn(5, 4)).shape == (5, 3)


def test_conv_builders_and_exp_scale():
    p = Parameterization.get("weight_norm", scale="exp")
    conv = p.conv2d(3, 4, 3, stride=2)
    assert isinstance(conv, WNConv2d) and conv.scale == "exp" and conv.stride == (2, 2)
    assert isinstance(Parameterization.get("layer_norm").conv2d(3, 4, 3)[1], nn.GroupNorm)
    assert isinstance(Parameterization.get("batch_norm").conv2d(3, 4, 3)[1], nn.BatchNorm2d)
    assert str(p) == "weight_norm(scale=exp)"


def test_mlp_overrides_and_unnormalised_head():
    net = wn_rl.mlp([4, 8, 8, 2], "weight_norm+mean_only_bn", init_scales=[1, 1, 0.01], overrides={-1: "weight_norm"})
    assert isinstance(net[0][1], MeanOnlyBatchNorm) and isinstance(net[-1], WNLinear)
    assert net[-1].init_scale == 0.01 and net[-1].bias is not None
    assert Parameterization.get("weight_norm+mean_only_bn").without_norm().name == "weight_norm"
    assert Parameterization.get("mean_only_bn").without_norm().name == "normal"
    scales = [
        layer.init_scale
        for layer in wn_rl.mlp([4, 8, 2], init_scales=np.float32(0.5)).modules()
        if hasattr(layer, "init_scale")
    ]
    assert scales == [0.5, 0.5]  # a numpy scalar (e.g. from a config array) is one scale for all layers


def test_unknown_names_and_bad_sizes_are_explained():
    with pytest.raises(ValueError, match="weight_norm\\+mean_only_bn"):
        Parameterization.get("weightnorm")
    with pytest.raises(ValueError, match="init_scales"):
        wn_rl.mlp([4, 8, 2], init_scales=[1.0])
    with pytest.raises(ValueError, match="out of range"):
        wn_rl.mlp([4, 8, 2], overrides={5: "normal"})


def test_more_parameterizations_can_be_registered():
    custom = wn_rl.register_parameterization(
        Parameterization("wn_layer_norm_test", weight_norm=True, norm="layer_norm")
    )
    block = Parameterization.get("wn_layer_norm_test").linear(3, 2)
    assert isinstance(block[0], WNLinear) and isinstance(block[1], nn.LayerNorm)
    with pytest.raises(ValueError, match="already registered"):
        wn_rl.register_parameterization(custom)
