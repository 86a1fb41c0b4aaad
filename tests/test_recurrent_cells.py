"""Weight-normalized recurrent cells (wn_rl.recurrent_cells): the LSTM, GRU and Elman cells against torch's,
their gradients (eq. 3), and pickles made when they lived in wn_rl.layers or wn_rl.recurrent."""

import copy
import importlib
import pickle

import pytest
import torch
from recurrent_helpers import F64  # tests/recurrent_helpers.py
from recurrent_helpers import assert_same as _assert_same
from recurrent_helpers import parts as _parts
from recurrent_helpers import state as _state
from torch import nn

import wn_rl
from wn_rl import WNGRUCell, WNLSTMCell, WNRNNCell, weight_norm

CELLS = [
    (nn.LSTMCell, WNLSTMCell, {}),
    (nn.GRUCell, WNGRUCell, {}),
    (nn.RNNCell, WNRNNCell, {"nonlinearity": "tanh"}),
    (nn.RNNCell, WNRNNCell, {"nonlinearity": "relu"}),
]
CELL_IDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


@pytest.mark.parametrize(("plain_cls", "wn_cls", "kwargs"), CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("scale", ["linear", "exp"])
def test_cell_starts_from_the_torch_init_and_computes_the_torch_cell(plain_cls, wn_cls, kwargs, scale):
    torch.manual_seed(0)
    cell = wn_cls(5, 7, **kwargs, scale=scale)
    torch.manual_seed(0)
    plain = plain_cls(5, 7, **kwargs)
    torch.testing.assert_close(cell.weight_ih, plain.weight_ih)
    torch.testing.assert_close(cell.weight_hh, plain.weight_hh)
    g_ih, _ = cell.g_values
    torch.testing.assert_close(g_ih, plain.weight_ih.norm(dim=1))
    names = {"v_ih", "v_hh", "bias_ih", "bias_hh", *(f"{'g' if scale == 'linear' else 's'}_{p}" for p in ("ih", "hh"))}
    assert set(dict(cell.named_parameters())) == names
    x, hx = torch.randn(3, 5), _state(plain_cls, (3, 7), torch.float32)
    _assert_same(cell(x, hx), plain(x, hx))
    _assert_same(cell(x), plain(x))
    _assert_same(cell(x[0]), plain(x[0]))  # unbatched
    assert f"scale={scale!r}" in repr(cell)


@pytest.mark.parametrize(("plain_cls", "wn_cls", "kwargs"), CELLS, ids=CELL_IDS)
def test_cell_takes_an_unbatched_state_as_the_torch_cell_does(plain_cls, wn_cls, kwargs):
    """An unbatched input with its state; an LSTM cell's (h, c) may be a list, as nn.LSTMCell takes it
    (a list crashed with AttributeError: 'list' object has no attribute 'unsqueeze')."""
    torch.manual_seed(0)
    plain = plain_cls(5, 7, **kwargs)
    cell = weight_norm(copy.deepcopy(plain))
    x, hx = torch.randn(5), _state(plain_cls, (7,), torch.float32)
    _assert_same(cell(x, hx), plain(x, hx))
    if plain_cls is nn.LSTMCell:
        _assert_same(cell(x, list(hx)), plain(x, list(hx)))
        _assert_same(cell(x[None], list(h[None] for h in hx)), plain(x[None], list(h[None] for h in hx)))


def test_rnn_cell_refuses_an_unknown_nonlinearity():
    with pytest.raises(ValueError, match=r"nonlinearity='gelu'.*'tanh' or 'relu'"):
        WNRNNCell(3, 4, nonlinearity="gelu")


@pytest.mark.parametrize(("plain_cls", "wn_cls", "kwargs"), CELLS, ids=CELL_IDS)
def test_cell_gradients_follow_equation_3_in_float64(plain_cls, wn_cls, kwargs):
    """grad_g = grad_w . v / ||v|| and grad_v = g/||v|| (grad_w - grad_g v/||v||) per row (eq. 3)."""
    torch.manual_seed(0)
    cell = wn_cls(4, 3, **kwargs, dtype=F64)
    with torch.no_grad():
        cell.g_ih.uniform_(0.5, 2.0)
        cell.g_hh.uniform_(0.5, 2.0)
    x, hx = torch.randn(5, 4, dtype=F64), _state(plain_cls, (5, 3))
    loss = sum((t**2).sum() for t in _parts(cell(x, hx)))
    grads = torch.autograd.grad(loss, [cell.g_ih, cell.g_hh, cell.v_ih, cell.v_hh])

    plain = plain_cls(4, 3, **kwargs, dtype=F64)
    with torch.no_grad():
        plain.weight_ih.copy_(cell.weight_ih)
        plain.weight_hh.copy_(cell.weight_hh)
        plain.bias_ih.copy_(cell.bias_ih)
        plain.bias_hh.copy_(cell.bias_hh)
    grad_w = torch.autograd.grad(sum((t**2).sum() for t in _parts(plain(x, hx))), [plain.weight_ih, plain.weight_hh])
    for grad_g, grad_v, gw, v, g in zip(
        grads[:2], grads[2:], grad_w, (cell.v_ih, cell.v_hh), cell.g_values, strict=True
    ):
        v, g = v.detach(), g.detach()
        norm = v.norm(dim=1, keepdim=True)
        expected_g = (gw * v).sum(1) / norm.squeeze(1)
        torch.testing.assert_close(grad_g, expected_g)
        torch.testing.assert_close(grad_v, g[:, None] / norm * (gw - expected_g[:, None] * v / norm))


def test_cells_pickled_when_they_lived_in_wn_rl_layers_still_load(monkeypatch):
    """The cells moved from wn_rl.layers to wn_rl.recurrent; pickle looks a class up by the module path it
    was saved with, and wn_rl.layers still answers for them."""
    torch.manual_seed(0)
    cell = WNGRUCell(3, 4)
    monkeypatch.setattr(WNGRUCell, "__module__", "wn_rl.layers")  # what an old pickle names
    data = pickle.dumps(cell)
    monkeypatch.undo()
    assert b"wn_rl.layers" in data and b"wn_rl.recurrent" not in data
    old = pickle.loads(data)
    assert type(old) is WNGRUCell
    x = torch.randn(2, 3)
    torch.testing.assert_close(old(x), cell(x))
    assert wn_rl.layers.WNLSTMCell is WNLSTMCell  # and imports of the old path


@pytest.mark.parametrize(
    "name",
    [
        "WNGRUCell",
        "WNLSTMCell",
        "WNRNNCell",
        "WNRNNCellBase",
        "_CELL_TENSORS",
        "_check_proj_size",
        "_layer_weights",
        "_map_state",
    ],
)
def test_names_moved_to_wn_rl_recurrent_cells_still_resolve_from_wn_rl_recurrent(name):
    moved = getattr(importlib.import_module("wn_rl.recurrent_cells"), name)
    assert getattr(importlib.import_module("wn_rl.recurrent"), name) is moved


@pytest.mark.parametrize("old_module", ["wn_rl.layers", "wn_rl.recurrent"])
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
@pytest.mark.parametrize(("plain_cls", "wn_cls", "kwargs"), CELLS, ids=CELL_IDS)
def test_cells_pickled_under_their_old_module_paths_still_load(
    monkeypatch, old_module, protocol, plain_cls, wn_cls, kwargs
):
    """The cells lived in wn_rl.layers, then in wn_rl.recurrent, now in wn_rl.recurrent_cells; pickles made
    under either old path (protocol 2: ``module\\nname`` text, protocol 4: two short strings) load."""
    torch.manual_seed(0)
    cell = wn_cls(3, 4, **kwargs)
    monkeypatch.setattr(wn_cls, "__module__", old_module)  # what an old pickle names
    data = pickle.dumps(cell, protocol=protocol)
    monkeypatch.undo()
    assert old_module.encode() in data and b"wn_rl.recurrent_cells" not in data
    old = pickle.loads(data)
    assert type(old) is wn_cls
    assert all(torch.equal(old.state_dict()[k], v) for k, v in cell.state_dict().items())
    x, hx = torch.randn(2, 3), _state(plain_cls, (2, 4), dtype=torch.float32)
    _assert_same(old(x, hx), cell(x, hx), rtol=0, atol=0)
