"""torch_default_init: torch's own init of fresh layers, plain or weight-normalized, so a plain network and
its WN twin built from one seed compute the same function (WN as a pure reparameterization)."""

import pytest
import torch
from torch import nn

import wn_rl
from wn_rl import Parameterization, mlp, torch_default_init

LAYERS = {
    "linear": lambda: nn.Linear(7, 5),
    "conv2d": lambda: nn.Conv2d(3, 4, 3),
    "conv1d_groups": lambda: nn.Conv1d(4, 6, 2, groups=2),
    "conv_transpose2d_groups": lambda: nn.ConvTranspose2d(4, 6, 3, groups=2),
    "linear_no_bias": lambda: nn.Linear(7, 5, bias=False),
}
WN_LAYERS = {k: v for k, v in LAYERS.items() if k != "conv_transpose2d_groups"}  # unsupported under WN
WN_LAYERS["conv_transpose2d"] = lambda: nn.ConvTranspose2d(4, 6, 3)  # one g per output channel: dim 1


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_plain_layers_get_exactly_torchs_own_init(make):
    torch.manual_seed(3)
    reference = make()
    layer = make()
    torch.manual_seed(3)
    assert torch_default_init(layer) == [type(layer).__name__]
    assert torch.equal(layer.weight, reference.weight)
    assert layer.bias is None or torch.equal(layer.bias, reference.bias)


def test_torchs_init_bit_for_bit_at_every_fan_in():
    """The bound is computed as torch computes it: written another way it differs in the last bit for about
    half of the fan-ins (36 and 128 among them, the MinAtar network's conv and head)."""
    for fan_in in [*range(1, 400), 1024, 3136]:
        torch.manual_seed(fan_in)
        reference = nn.Linear(fan_in, 2)
        layer = nn.Linear(fan_in, 2)
        torch.manual_seed(fan_in)
        torch_default_init(layer)
        assert torch.equal(layer.weight, reference.weight) and torch.equal(layer.bias, reference.bias), fan_in


@pytest.mark.parametrize("scale", ["linear", "exp"])
@pytest.mark.parametrize("make", WN_LAYERS.values(), ids=WN_LAYERS.keys())
def test_wn_layers_get_torchs_weight_as_g_times_direction(make, scale):
    torch.manual_seed(3)
    reference = make()
    layer = wn_rl.weight_norm(make(), scale=scale)
    torch.manual_seed(3)
    torch_default_init(layer)
    torch.testing.assert_close(layer.weight, reference.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.g_value, layer.v_norm(), rtol=1e-6, atol=0)  # v = w, so g = ||v||
    assert layer.bias is None or torch.equal(layer.bias, reference.bias)


def test_a_channels_last_wn_conv_keeps_its_memory_format():
    layer = wn_rl.weight_norm(nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last))
    torch_default_init(layer, generator=torch.Generator().manual_seed(0))
    assert layer.v.is_contiguous(memory_format=torch.channels_last) and not layer.v.is_contiguous()
    plain = nn.Conv2d(3, 8, 3)
    torch_default_init(plain, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer.weight, plain.weight, rtol=1e-6, atol=1e-7)


def _built(name, init_seed):
    p = Parameterization.get(name)
    torch.manual_seed(123)  # the construction draws differ between parameterizations; the init's do not
    net = nn.Sequential(p.conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), mlp([6 * 4 * 4, 16, 3], p))
    torch_default_init(net, generator=torch.Generator().manual_seed(init_seed))
    return net.eval()


def test_normal_and_weight_norm_start_from_one_function_for_one_seed():
    x = torch.randn(5, 2, 6, 6)
    normal, wn = _built("normal", 9), _built("weight_norm", 9)
    torch.testing.assert_close(wn(x), normal(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_built("normal", 10)(x), normal(x))  # another seed, another start


def test_flags_stay_unset_and_data_dependent_init_may_follow():
    net = mlp([4, 8, 2], Parameterization.get("weight_norm"))
    torch_default_init(net)
    assert not wn_rl.is_initialized(net)
    wn_rl.data_dependent_init(net, torch.randn(64, 4))
    assert wn_rl.is_initialized(net)


def test_norm_layers_and_recurrent_cells_keep_their_parameters():
    torch.manual_seed(0)
    net = nn.ModuleDict({"norm": nn.LayerNorm(4), "cell": wn_rl.WNLSTMCell(4, 3), "fc": nn.Linear(4, 4)})
    with torch.no_grad():
        net["norm"].weight.fill_(2.0)
    before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    assert torch_default_init(net) == ["fc"]
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_model_without_linear_or_conv_layers_or_with_an_unmaterialised_lazy_one_is_an_error():
    with pytest.raises(ValueError, match=r"LayerNorm has no nn\.Linear, nn\.Conv\*"):
        torch_default_init(nn.LayerNorm(3))
    lazy = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2))
    before = lazy[0].weight.clone()
    with pytest.raises(ValueError, match=r"^1 is a lazy layer .* run one forward pass .* model is unchanged"):
        torch_default_init(lazy)
    assert torch.equal(lazy[0].weight, before)
    lazy(torch.randn(2, 3))
    assert torch_default_init(lazy) == ["0", "1"]
