"""An LSTM's ``proj_size`` (h = W_hr (o * tanh(c)), weight-normalized per projected unit): the checks on it,
gradients through the fused kernel against the unfused formula, nn.LSTM's names, and the projected cell."""

import copy

import pytest
import torch
from recurrent_helpers import F64  # tests/recurrent_helpers.py
from recurrent_helpers import assert_same as _assert_same
from recurrent_helpers import padded as _padded
from recurrent_helpers import parts as _parts
from recurrent_helpers import state as _state
from torch import nn

import wn_rl
from wn_rl import WNGRU, WNLSTM, WNLSTMCell, remove_weight_norm, weight_norm


@pytest.mark.parametrize("proj_size", [4, 5, -1, 2.0, True])
@pytest.mark.parametrize("build", [WNLSTM, WNLSTMCell], ids=["stack", "cell"])
def test_a_bad_proj_size_is_refused_before_anything_is_built(build, proj_size):
    """As nn.LSTM refuses proj_size >= hidden_size or < 0 (ValueError), and before a weight is drawn."""
    rng = torch.get_rng_state()
    with pytest.raises(
        ValueError, match=rf"proj_size={proj_size!r} must be an integer with 0 <= proj_size < hidden_size=4"
    ):
        build(3, 4, proj_size=proj_size)
    assert torch.equal(torch.get_rng_state(), rng)
    if proj_size in (4, 5, -1):
        with pytest.raises(ValueError, match="proj_size"):
            nn.LSTM(3, 4, proj_size=proj_size)


def _unfused_weights(stack):
    """Every effective weight of ``stack`` under nn.LSTM's names, built by hand from v and g (eq. 2):
    w = g v / ||v|| per row, with g = exp(s) for exp scale; the biases as they are."""
    weights = {}
    for layer in range(stack.num_layers):
        for reverse in range(stack.num_directions):
            cell, suffix = stack.cell(layer, bool(reverse)), f"_l{layer}{'_reverse' if reverse else ''}"
            for part in cell.parts:
                v = getattr(cell, f"v_{part}")
                g = getattr(cell, f"g_{part}") if cell.scale == "linear" else getattr(cell, f"s_{part}").exp()
                weights[f"weight_{part}{suffix}"] = g[:, None] * v / v.norm(dim=1, keepdim=True)
            if cell.bias_ih is not None:
                weights.update({f"bias_{part}{suffix}": getattr(cell, f"bias_{part}") for part in ("ih", "hh")})
    return weights


@pytest.mark.parametrize("scale", ["linear", "exp"])
@pytest.mark.parametrize("bias", [True, False])
def test_projected_stack_gradients_equal_the_unfused_formula_in_float64(scale, bias):
    """Gradients of v and g (s) through the fused kernel, the projection's included, equal those of nn.LSTM
    run on weights built by hand from v and g."""
    torch.manual_seed(0)
    stack = WNLSTM(5, 7, 2, bias=bias, bidirectional=True, proj_size=3, dtype=F64, scale=scale)
    with torch.no_grad():
        for cell in stack.cells:
            for p in cell.scale_parameters():
                p.add_(0.3 * torch.randn_like(p))
    plain = nn.LSTM(5, 7, 2, bias=bias, bidirectional=True, proj_size=3, dtype=F64)
    x, hx = _padded(False), _state(nn.LSTM, (4, 4, 7), proj_size=3)

    def loss(out):
        return sum((t * torch.linspace(-1, 2, t.numel(), dtype=F64).view_as(t)).sum() for t in _parts(out))

    params = dict(stack.named_parameters())
    got = torch.autograd.grad(loss(stack(x, hx)), list(params.values()))
    reference = torch.func.functional_call(plain, _unfused_weights(stack), (x, hx))
    _assert_same(stack(x, hx), reference)
    expected = torch.autograd.grad(loss(reference), list(params.values()))
    for name, a, b in zip(params, got, expected, strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert {name.rsplit(".", 1)[1] for name in params} >= {"v_hr", f"{'g' if scale == 'linear' else 's'}_hr"}
    assert all(a.abs().sum() > 0 for name, a in zip(params, got, strict=True) if "_hr" in name)


def test_projected_stack_reads_like_nn_lstm_with_one_g_per_projected_unit():
    torch.manual_seed(0)
    stack = WNLSTM(3, 6, 2, bidirectional=True, proj_size=2)
    with torch.no_grad():
        stack.cell(1, True).g_hr.mul_(torch.tensor([0.5, 3.0]))
    assert stack.proj_size == 2 and stack.cell(1).input_size == 4  # layer 1 reads both directions' projections
    for layer, reverse in [(0, False), (0, True), (1, False), (1, True)]:
        weight = getattr(stack, f"weight_hr_l{layer}{'_reverse' if reverse else ''}")
        assert weight.shape == (2, 6)
        torch.testing.assert_close(weight.norm(dim=1), stack.cell(layer, reverse).g_hr)
    assert {"cells.0.v_hr", "cells.0.g_hr", "cells.3.v_hr", "cells.3.g_hr"} <= set(stack.state_dict())
    assert "proj_size=2" in repr(stack) and "proj_size=2" in repr(stack.cells[0])
    stack.flatten_parameters()
    assert {"wn/cells.3.hr/g_mean", "wn/cells.0.ih/g_mean"} <= set(wn_rl.wn_stats(stack))
    assert not hasattr(WNLSTM(3, 6), "weight_hr_l0") and WNLSTM(3, 6).proj_size == WNGRU(3, 6).proj_size == 0


@pytest.mark.parametrize("scale", ["linear", "exp"])
def test_a_projected_cell_is_one_step_of_nn_lstm_and_folds_only_in_a_stack(scale):
    """torch has no projected LSTM cell: WNLSTMCell(proj_size=P) is one layer and step of nn.LSTM(proj_size=P),
    so remove_weight_norm leaves it (named) on its own."""
    torch.manual_seed(0)
    plain = nn.LSTM(5, 7, proj_size=3, dtype=F64)
    cell = weight_norm(copy.deepcopy(plain), scale=scale).cells[0]
    x, (h, c) = torch.randn(4, 5, dtype=F64), _state(nn.LSTMCell, (4, 7), proj_size=3)
    _, expected = plain(x[None], (h[None], c[None]))
    _assert_same(cell(x, (h, c)), [s[0] for s in expected])
    _assert_same(cell(x[0], [h[0], c[0]]), [s[0, 0] for s in expected])  # unbatched, (h, c) as a list
    _assert_same(cell(x), [s[0] for s in plain(x[None])[1]])  # zero state: h of 3 features, c of 7
    model = nn.ModuleDict({"cell": cell, "lstm": WNLSTM(3, 4, proj_size=2)})
    with pytest.warns(UserWarning, match=r"\['cell \(WNLSTMCell\)'\] unchanged: they are LSTM cells with proj_size"):
        remove_weight_norm(model)
    assert model["cell"] is cell and type(model["lstm"]) is nn.LSTM and model["lstm"].proj_size == 2
