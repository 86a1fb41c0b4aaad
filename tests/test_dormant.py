"""wn_rl.dormant: Sokar et al.'s dormant-unit score on hand-computed cases (float64), dead layers, tau, conv
channels, the model's modes, hooks and state left as they were, and the errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wn_rl
from wn_rl.dormant import DormantStats, dormant_scalars, dormant_units, is_tau, total_fraction


def test_scores_match_a_hand_computed_layer_in_float64():
    # relu(x): E|h| per unit = (2, 0, 1, 0.25); the layer mean is 3.25 / 4 = 0.8125
    x = torch.tensor([[1.0, -1.0, 2.0, 0.5], [3.0, -2.0, 0.0, 0.0]], dtype=torch.float64)
    stats = dormant_units(nn.Sequential(nn.ReLU()), x)
    s = stats["0"]
    assert s.scores.dtype == torch.float64
    expected = torch.tensor([2.0, 0.0, 1.0, 0.25], dtype=torch.float64) / 0.8125
    torch.testing.assert_close(s.scores, expected, rtol=0, atol=1e-15)
    assert (s.units, s.dormant, s.fraction) == (4, 1, 0.25)  # tau 0: only the unit never active
    assert dormant_units(nn.Sequential(nn.ReLU()), x, tau=0.31)["0"].dormant == 2  # 0.25 / 0.8125 = 0.3077
    assert dormant_units(nn.Sequential(nn.ReLU()), x, tau=0.3)["0"].dormant == 1


def test_a_layer_never_active_is_all_dormant_without_nan():
    linear = nn.Linear(3, 5)
    nn.init.zeros_(linear.weight)
    nn.init.constant_(linear.bias, -1.0)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), linear, nn.ReLU())
    x = torch.randn(16, 3)
    stats = dormant_units(model, x)
    assert stats["3"].fraction == 1.0 and stats["3"].dormant == 5
    assert torch.equal(stats["3"].scores, torch.zeros(5))
    scalars = dormant_scalars(model, x)
    assert scalars["dormant/3/fraction"] == 1.0
    assert scalars["dormant/total_fraction"] == pytest.approx((stats["1"].dormant + 5) / 8)


def test_dormant_counts_grow_with_tau_and_live_scores_average_one():
    torch.manual_seed(0)
    model = wn_rl.mlp([6, 32, 32], wn_rl.Parameterization.get("normal"), activate_last=True)
    x = torch.randn(64, 6)
    counts = [sum(s.dormant for s in dormant_units(model, x, tau=tau).values()) for tau in (0, 0.1, 0.5, 1, 2, 1e9)]
    assert counts == sorted(counts) and counts[-1] == 64 and counts[3] < 64
    for s in dormant_units(model, x).values():
        assert s.scores.mean().item() == pytest.approx(1.0)


def test_conv_units_are_channels_averaged_over_positions():
    conv = nn.Conv2d(1, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0, 2.0]).view(3, 1, 1, 1))
    x = torch.rand(4, 1, 5, 5, dtype=torch.float64) + 0.1  # positive: channel 1 never passes the ReLU
    model = nn.Sequential(conv.double(), nn.ReLU())
    s = dormant_units(model, x)["1"]
    assert s.units == 3 and s.dormant == 1
    torch.testing.assert_close(s.scores, torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))
    sparse = torch.zeros(4, 1, 5, 5)
    sparse[2, 0, 3, 1] = 1.0  # one position of one input: active, so not dormant at tau 0
    assert dormant_units(nn.Sequential(conv.float(), nn.ReLU()), sparse)["1"].dormant == 1


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.seen_training: list[bool] = []

    def forward(self, x):
        self.seen_training.append(self.net[1].training or self.net[3].training)
        return self.net(x)


def test_the_pass_runs_in_eval_mode_and_leaves_modes_state_and_hooks_as_they_were():
    model = _Mixed()
    model.train()
    model.net[1].eval()  # a frozen norm layer in a training model stays so
    model.net[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    dormant_units(model, torch.randn(8, 4))
    assert model.seen_training == [False]
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    def failing(net, batch):
        net(batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        dormant_units(model, torch.randn(8, 4), forward=failing)
    assert [m.training for m in model.modules()] == modes
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="returned"):  # a hook that fails: a layer whose output is no unit tensor
        dormant_units(nn.Sequential(nn.Flatten(0)), torch.randn(3, 2), layers=["0"])
    assert [m.training for m in model.modules()] == modes


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return F.relu(self.fc(x))


def test_errors_say_the_cause_and_the_fix():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(ValueError, match=r"F\.relu.*layers="):
        dormant_units(_Functional(), torch.randn(4, 3))
    with pytest.raises(ValueError, match="at least 2"):
        dormant_units(model, torch.randn(1, 3))
    for tau in (-0.1, math.nan, math.inf, True, "0.1"):  # one check everywhere: wn_rl.dormant.is_tau
        with pytest.raises(ValueError, match=r"tau=.*: expected a finite threshold >= 0"):
            dormant_units(model, torch.randn(4, 3), tau=tau)
    assert all(is_tau(t) for t in (0, 0.1, np.float32(0.05), np.float64(1.0)))
    with pytest.raises(ValueError, match=r"no module named \['body'\].*\['1'\]"):
        dormant_units(model, torch.randn(4, 3), layers=["body"])
    shared = nn.ReLU()
    with pytest.raises(ValueError, match="its own activation module"):
        dormant_units(nn.Sequential(nn.Linear(3, 4), shared, nn.Linear(4, 2), shared), torch.randn(4, 3))


def test_layers_picks_modules_by_name_and_functional_models_can_name_theirs():
    stats = dormant_units(_Functional(), torch.randn(8, 3), layers=["fc"])  # pre-activations: named on purpose
    assert list(stats) == ["fc"] and stats["fc"].units == 4
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh())
    assert list(dormant_units(model, torch.randn(8, 3))) == ["1", "3"]
    assert list(dormant_units(model, torch.randn(8, 3), layers=["3"])) == ["3"]
    assert wn_rl.dormant_units is dormant_units


def test_total_fraction_counts_every_unit_once():
    stats = {
        "a": DormantStats(units=4, dormant=1, tau=0.0, scores=torch.zeros(4)),
        "b": DormantStats(units=12, dormant=12, tau=0.0, scores=torch.zeros(12)),
    }
    assert total_fraction(stats) == 13 / 16


class _NanToZero(nn.Module):
    def forward(self, x):
        return x.nan_to_num(0.0, 0.0, 0.0)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_layer_with_non_finite_activations_is_nan_not_all_dormant(bad):
    """A diverging network's layer was reported as entirely dormant (its NaN or inf layer mean made every score 0
    or NaN): it is now NaN, counted in ``non_finite``, and the other layers are measured as before."""
    x = torch.tensor([[1.0, -1.0, 2.0], [3.0, -2.0, 0.5]])
    x[0, 2] = bad
    model = nn.Sequential(nn.ReLU(), _NanToZero(), nn.Tanh())
    stats = dormant_units(model, x)
    relu, tanh = stats["0"], stats["2"]
    assert (relu.units, relu.dormant, relu.non_finite) == (3, 0, 1)
    assert torch.isnan(relu.scores).all() and math.isnan(relu.fraction)
    assert (tanh.non_finite, tanh.dormant, tanh.fraction) == (0, 1, 1 / 3)  # unit 1 never active after the ReLU
    assert math.isnan(total_fraction(stats))
    scalars = dormant_scalars(model, x)
    assert math.isnan(scalars["dormant/0/fraction"]) and math.isnan(scalars["dormant/total_fraction"])
    assert scalars["dormant/2/fraction"] == 1 / 3


class _TwoDevices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.ReLU(), nn.Tanh()

    def forward(self, x):
        return self.second(self.first(x).to("cuda").double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device beside the CPU")
def test_layers_on_different_devices_are_combined_on_the_cpu():
    """``torch.cat`` of the per-layer scores failed when the layers sat on different devices."""
    x = torch.tensor([[1.0, -1.0, 2.0, 0.5], [3.0, -2.0, 0.0, 0.0]])
    stats = dormant_units(_TwoDevices(), x)
    assert [s.scores.device.type for s in stats.values()] == ["cpu", "cpu"]
    assert stats["first"].scores.dtype == torch.float64  # one dtype for all, as before
    assert (stats["first"].dormant, stats["second"].dormant) == (1, 1)
    torch.testing.assert_close(stats["first"].scores, torch.tensor([2.0, 0.0, 1.0, 0.25], dtype=torch.float64) / 0.8125)
