"""weight_norm / remove_weight_norm on models as researchers write them: tied weights, hooks, the deprecated
torch weight/spectral norm, odd convolutions, dtypes, the meta device and wrappers."""

import copy
import warnings

import pytest
import torch
from torch import nn

from wn_rl import WNConv2d, WNLinear, data_dependent_init, remove_weight_norm, weight_norm


class TiedHead(nn.Module):
    """A language-model-style head tied to its embedding, as in a world model's token decoder."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.embedding(tokens))))


def test_a_layer_tied_to_another_module_is_left_plain_and_stays_tied():
    model = TiedHead()
    tokens = torch.randint(0, 10, (5,))
    expected = model(tokens)
    with pytest.warns(UserWarning, match=r"\['head \(Linear\)'\] unchanged: they share a parameter"):
        converted = weight_norm(model)
    assert type(converted.head) is nn.Linear and converted.head.weight is converted.embedding.weight
    assert type(converted.body) is WNLinear
    torch.testing.assert_close(converted(tokens), expected)


def test_two_layers_sharing_a_weight_are_both_left_plain():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 2))
    model[2].weight = model[0].weight  # tied weights, separate biases
    with pytest.warns(UserWarning, match=r"\['0 \(Linear\)', '2 \(Linear\)'\] unchanged"):
        weight_norm(model)
    assert [type(m) for m in model] == [nn.Linear, nn.Tanh, nn.Linear, WNLinear]
    assert model[0].weight is model[2].weight


def test_wn_layers_sharing_v_and_g_are_not_folded_apart():
    first, second = WNLinear(4, 4), WNLinear(4, 4)
    second.v, second.g = first.v, first.g
    model = nn.Sequential(first, nn.Tanh(), second, WNLinear(4, 2))
    with pytest.warns(UserWarning, match=r"\['0 \(WNLinear\)', '2 \(WNLinear\)'\] unchanged.*share a parameter"):
        remove_weight_norm(model)
    assert model[0].v is model[2].v and type(model[3]) is nn.Linear


@pytest.mark.parametrize("deprecated", [torch.nn.utils.weight_norm, torch.nn.utils.spectral_norm])
def test_layers_under_the_deprecated_torch_hooks_are_left_plain(deprecated):
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with warnings.catch_warnings():  # torch.nn.utils.weight_norm warns that it is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        deprecated(model[0])
    model.eval()
    x = torch.randn(3, 4)
    expected = model(x)
    with pytest.warns(UserWarning, match=r"\['0 \(Linear\)'\] unchanged: they carry a hook of the deprecated"):
        weight_norm(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is WNLinear
    torch.testing.assert_close(model(x), expected)


def test_pruned_layers_are_left_plain_and_keep_their_mask():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    x = torch.randn(3, 4)
    expected = model(x)
    with pytest.warns(UserWarning, match=r"\['0 \(Linear\)'\] unchanged: .*torch.nn.utils.prune"):
        weight_norm(model)  # its pruning hook, carried over, would look for weight_orig and weight_mask
    assert type(model[0]) is nn.Linear and type(model[2]) is WNLinear
    torch.testing.assert_close(model(x), expected)


def test_a_pruned_wn_layer_is_not_folded():
    model = nn.Sequential(WNLinear(4, 4), nn.Tanh(), WNLinear(4, 2))
    torch.nn.utils.prune.l1_unstructured(model[0], "v", amount=0.5)
    x = torch.randn(3, 4)
    expected = model(x)
    with pytest.warns(UserWarning, match=r"\['0 \(WNLinear\)'\] unchanged: .*prune"):
        remove_weight_norm(model)
    assert type(model[0]) is WNLinear and type(model[2]) is nn.Linear
    torch.testing.assert_close(model(x), expected)


def test_user_hooks_move_to_the_converted_and_the_folded_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    seen = []
    handle = model[0].register_forward_hook(lambda layer, inputs, output: seen.append(type(layer).__name__))
    model[0].register_forward_pre_hook(lambda layer, inputs: (inputs[0] * 2,))
    x = torch.randn(3, 4)
    expected = model(x)
    weight_norm(model)
    torch.testing.assert_close(model(x), expected)  # the pre-hook still doubles the input
    remove_weight_norm(model)
    torch.testing.assert_close(model(x), expected)
    assert seen == ["Linear", "WNLinear", "Linear"]
    handle.remove()  # the user's handle still reaches the hook
    model(x)
    assert len(seen) == 3


def _odd_convolutions() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, padding_mode="circular"),
        nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=2),
        nn.Conv2d(8, 8, 3, groups=8, bias=False),  # depthwise
        nn.Conv2d(8, 6, 1, padding="valid", padding_mode="reflect"),
        nn.ConvTranspose2d(6, 3, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.LazyLinear(2),
    )


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_a_round_trip_gives_back_the_original_model_and_loads_its_state_dict(memory_format):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64).to(memory_format=memory_format)
    model = _odd_convolutions().double()
    model(x)  # materialises the lazy layer
    model = model.to(memory_format=memory_format)
    expected, state = model(x), copy.deepcopy(model.state_dict())
    names = [name for name, _ in model.named_parameters()]
    folded = remove_weight_norm(weight_norm(model))
    assert [name for name, _ in folded.named_parameters()] == names  # the order an optimizer's state follows
    assert list(folded.state_dict()) == list(state)  # no `initialized` flag the original lacked
    folded.load_state_dict(state)
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-12)


def test_folding_keeps_the_flag_of_an_initialised_model():
    model = weight_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)))
    data_dependent_init(model, torch.randn(16, 3, 8, 8))
    folded = remove_weight_norm(model)
    assert bool(folded[0].initialized) and bool(folded[2].initialized)  # a second init would change nothing


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_models_convert_in_their_dtype(dtype):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)
    x = torch.randn(3, 4, dtype=dtype)
    expected = model(x)
    weight_norm(model)
    assert {p.dtype for p in model.parameters()} == {dtype}
    torch.testing.assert_close(model(x), expected, rtol=1e-2, atol=1e-2)


def test_a_model_on_the_meta_device_converts_and_materialises():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    weight_norm(model)
    assert isinstance(model[0], WNConv2d) and model[0].v.is_meta
    model.to_empty(device="cpu")
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 2)
    assert remove_weight_norm(model)[0].weight.device.type == "cpu"


def test_layers_inside_wrappers_are_converted_in_place():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    expected = model(x)
    compiled = torch.compile(model, backend="eager")
    assert weight_norm(compiled) is compiled and type(model[0]) is WNLinear
    torch.testing.assert_close(compiled(x), expected)
    parallel = nn.DataParallel(model)
    remove_weight_norm(parallel)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(parallel(x), expected)


def test_a_converted_model_runs_under_functional_call_and_exports_folded():
    model = weight_norm(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    x = torch.randn(3, 4)
    params = dict(model.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)
    assert set(grads) == {"0.v", "0.g", "0.bias", "2.v", "2.g", "2.bias"}
    folded = remove_weight_norm(model)
    exported = torch.export.export(folded, (x,))
    torch.testing.assert_close(exported.module()(x), folded(x))
