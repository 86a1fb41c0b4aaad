"""Bad input to the WN core and the SB3 policies is refused with a clear error: layers without units (which torch's
fused weight-norm kernel takes as a division by zero that kills the process), empty batches in mean-only batch
norm, NumPy or None batches, an SB3 algorithm passed where its policy is expected, and bad recurrent cell sizes."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from stable_baselines3 import DQN, PPO
from torch import nn

import wn_rl
from wn_rl.sb3 import (
    WnActorCriticPolicy,
    WnDQNPolicy,
    WnMlpExtractor,
    initialize_policy,
    online_networks,
    sync_target_networks,
    torch_default_init_policy,
)
from wn_rl.sb3.init import network_passes, policy_is_initialized

ZERO_UNITS = {
    "linear": lambda: wn_rl.WNLinear(4, 0),
    "linear_exp": lambda: wn_rl.WNLinear(4, 0, scale="exp"),
    "conv1d": lambda: wn_rl.WNConv1d(3, 0, 3),
    "conv2d": lambda: wn_rl.WNConv2d(3, 0, 3),
    "conv_transpose2d": lambda: wn_rl.WNConvTranspose2d(3, 0, 3),
}


@pytest.mark.parametrize("build", ZERO_UNITS.values(), ids=ZERO_UNITS)
def test_a_wn_layer_without_output_units_is_refused_at_construction(build):
    with pytest.raises(ValueError, match=r"(out_features|out_channels)=0 .*no output units.*at least 1"):
        build()


@pytest.mark.parametrize("plain", [nn.Linear(3, 0), nn.Conv2d(3, 0, 3), nn.ConvTranspose2d(3, 0, 3)])
def test_weight_norm_refuses_a_layer_without_output_units(plain):
    with pytest.raises(ValueError, match=r"cannot weight-normalize \[.*\]: a layer without output units"):
        wn_rl.weight_norm(plain)


def test_weight_norm_refuses_a_zero_width_layer_naming_it_and_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 0))
    with pytest.raises(ValueError, match=r"cannot weight-normalize \['2 \(Linear\)'\]"):
        wn_rl.weight_norm(model)
    assert type(model[0]) is nn.Linear  # not half-converted


def test_a_wn_layer_without_input_features_works_as_torch_s():
    torch.manual_seed(0)
    layer = wn_rl.WNLinear(0, 3)
    assert torch.equal(layer(torch.zeros(2, 0)), layer.bias.expand(2, 3))


def test_mlp_refuses_a_layer_of_zero_width():
    with pytest.raises(ValueError, match=r"sizes=\[4, 0, 2\] must give every layer's width"):
        wn_rl.mlp([4, 0, 2])
    with pytest.raises(ValueError, match="positive integer"):
        wn_rl.mlp([4, 8, 2.0], "normal")


def test_zero_width_layers_and_policies_end_in_a_value_error_not_a_crash():
    """The reported reproductions, in a child process: before the fix each killed its process with SIGFPE."""
    script = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("ignore")
        import torch, wn_rl
        from stable_baselines3 import PPO
        from wn_rl.sb3 import WnActorCriticPolicy
        cases = [
            lambda: wn_rl.WNLinear(4, 0).weight,
            lambda: wn_rl.mlp([4, 0, 2])(torch.zeros(2, 4)),
            lambda: wn_rl.WNConv2d(3, 0, 3)(torch.zeros(1, 3, 8, 8)),
            lambda: wn_rl.WNLSTMCell(4, 0)(torch.zeros(2, 4)),
            lambda: wn_rl.WNGRUCell(4, 0)(torch.zeros(2, 4)),
            lambda: PPO(WnActorCriticPolicy, "CartPole-v1", n_steps=64, policy_kwargs=dict(net_arch=[0])).learn(64),
        ]
        for case in cases:
            try:
                case()
            except ValueError:
                print("refused")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"rc={done.returncode}\n{done.stderr[-2000:]}"
    assert done.stdout.split() == ["refused"] * 6


@pytest.mark.parametrize(
    "net_arch", [[0], [8, 0], [-1], dict(pi=[8], vf=[0]), [True], [8.0], 64], ids=lambda a: repr(a).replace(" ", "")
)
def test_the_wn_mlp_extractor_refuses_a_net_arch_width_that_is_not_a_positive_integer(net_arch):
    with pytest.raises(ValueError, match=r"net_arch=.* must list the hidden layers' widths as positive integers"):
        WnMlpExtractor(4, net_arch, nn.ReLU)


def test_the_wn_mlp_extractor_takes_numpy_integer_widths():
    extractor = WnMlpExtractor(4, [np.int64(8)], nn.ReLU)
    assert extractor.latent_dim_pi == extractor.latent_dim_vf == 8


@pytest.mark.parametrize("parameterization", ["weight_norm", "normal"])
def test_sb3_policies_refuse_a_zero_width_net_arch_at_construction(parameterization, one_torch_thread):
    kwargs = dict(net_arch=[0], parameterization=parameterization)
    with pytest.raises(ValueError, match=r"net_arch=\[0\]"):
        PPO(WnActorCriticPolicy, "CartPole-v1", policy_kwargs=kwargs)
    with pytest.raises(ValueError, match=r"net_arch=\[8, 0\]"):
        DQN(WnDQNPolicy, "CartPole-v1", policy_kwargs={**kwargs, "net_arch": [8, 0]})


CELL_CLASSES = [wn_rl.WNLSTMCell, wn_rl.WNGRUCell, wn_rl.WNRNNCell]


@pytest.mark.parametrize("cell_cls", CELL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("hidden_size", [0, -1, 2.0])
def test_a_wn_cell_refuses_a_hidden_size_below_one_naming_it(cell_cls, hidden_size):
    with pytest.raises(
        ValueError, match=rf"{cell_cls.__name__}: hidden_size={hidden_size!r} must be a positive integer"
    ):
        cell_cls(4, hidden_size)


@pytest.mark.parametrize("cell_cls", CELL_CLASSES, ids=lambda c: c.__name__)
def test_a_wn_cell_refuses_a_negative_input_size_and_takes_zero_as_torch_does(cell_cls):
    with pytest.raises(ValueError, match=r"input_size=-1 must be a non-negative integer"):
        cell_cls(-1, 4)
    plain = {wn_rl.WNLSTMCell: nn.LSTMCell, wn_rl.WNGRUCell: nn.GRUCell, wn_rl.WNRNNCell: nn.RNNCell}[cell_cls](0, 4)
    out, expected = cell_cls(0, 4)(torch.zeros(2, 0)), plain(torch.zeros(2, 0))
    assert [t.shape for t in torch.utils._pytree.tree_leaves(out)] == [
        t.shape for t in torch.utils._pytree.tree_leaves(expected)
    ]


def test_weight_norm_refuses_a_torch_cell_without_hidden_units():
    with pytest.raises(ValueError, match=r"cannot weight-normalize .*GRUCell.*: a layer without output units"):
        wn_rl.weight_norm(nn.GRUCell(3, 0))


@pytest.mark.parametrize("shape", [(0, 4), (0, 4, 5), (2, 4, 0)])
def test_mean_only_batch_norm_leaves_its_running_mean_on_an_empty_training_batch(shape):
    norm = wn_rl.MeanOnlyBatchNorm(4).train()
    reference = nn.BatchNorm1d(4).train()
    x = torch.ones(shape, requires_grad=True)
    out = norm(x)
    reference(torch.ones(shape))
    out.sum().backward()
    assert out.shape == shape
    assert torch.equal(norm.running_mean, torch.zeros(4))
    assert torch.equal(reference.running_mean, torch.zeros(4))  # what nn.BatchNorm does in this torch
    assert torch.equal(norm.bias.grad, torch.zeros(4))


def test_data_dependent_init_refuses_an_empty_batch_before_a_mean_only_batch_norm():
    model = nn.Sequential(wn_rl.WNLinear(4, 3), wn_rl.MeanOnlyBatchNorm(3))
    with pytest.raises(ValueError, match=r"at least 2 examples.*got 0"):
        wn_rl.data_dependent_init(model, torch.ones(0, 4))
    assert torch.equal(model[1].running_mean, torch.zeros(3))


@pytest.mark.parametrize("in_features", [4, 512], ids=["small", "output_scaling_size"])
def test_a_wn_linear_layer_given_a_numpy_array_raises_torch_s_type_error(in_features):
    with pytest.raises(TypeError, match=r"must be Tensor, not numpy\.ndarray"):
        wn_rl.WNLinear(in_features, in_features)(np.zeros((2, in_features), np.float32))


@pytest.mark.parametrize(
    ("batch", "found"),
    [(np.zeros((8, 4), np.float32), "numpy.ndarray"), (None, "None"), ([np.zeros((8, 4))], "a list holding no tensor")],
    ids=["numpy", "none", "list_of_numpy"],
)
def test_data_dependent_init_refuses_a_batch_without_tensors_and_says_how_to_convert(batch, found):
    model = wn_rl.mlp([4, 3, 2])
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(TypeError, match=rf"takes the batch as a torch.Tensor.*got {found}.*torch.as_tensor"):
        wn_rl.data_dependent_init(model, batch)
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())


def test_data_dependent_init_takes_any_batch_with_a_forward_of_its_own():
    model = wn_rl.mlp([4, 3, 2])
    obs = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    report = wn_rl.data_dependent_init(model, obs, forward=lambda m, b: m(torch.as_tensor(b)))
    assert [layer.units for layer in report.layers] == [3, 2]


@pytest.fixture(scope="module")
def dqn():
    return DQN(WnDQNPolicy, "CartPole-v1", policy_kwargs=dict(net_arch=[8]))


@pytest.mark.parametrize(
    "call",
    [
        lambda model: initialize_policy(model, torch.zeros(8, 4)),
        online_networks,
        sync_target_networks,
        torch_default_init_policy,
        policy_is_initialized,
        network_passes,
    ],
    ids=[
        "initialize_policy",
        "online_networks",
        "sync_target_networks",
        "torch_default_init_policy",
        "policy_is_initialized",
        "network_passes",
    ],
)
def test_sb3_init_functions_given_the_algorithm_say_pass_model_policy(dqn, call):
    with pytest.raises(TypeError, match=r"got a DQN algorithm.*pass model\.policy"):
        call(dqn)


def test_initialize_policy_given_none_names_the_supported_policies():
    with pytest.raises(TypeError, match="NoneType is not supported: expected a policy of"):
        initialize_policy(None, torch.zeros(8, 4))


def test_initialize_policy_refuses_numpy_observations_and_says_how_to_convert(dqn):
    with pytest.raises(TypeError, match=r"initialize_policy takes the batch as a torch.Tensor.*torch.as_tensor"):
        initialize_policy(dqn.policy, np.zeros((8, 4), np.float32))
    assert list(initialize_policy(dqn.policy, torch.randn(8, 4))) == ["q_net"]


def test_dormant_units_refuses_a_batch_without_tensors_and_says_how_to_convert():
    model = wn_rl.mlp([4, 8, 2])
    with pytest.raises(TypeError, match=r"dormant_units takes the batch as a torch.Tensor.*torch.as_tensor"):
        wn_rl.dormant_units(model, np.zeros((16, 4), np.float32))
    assert wn_rl.dormant_units(model, np.zeros((16, 4), np.float32), forward=lambda m, b: m(torch.as_tensor(b)))
