"""WN layers saved and restored: pickle, deep copies and state_dict round trips, and pickles made when the
convolutions, mean-only BN and the cells lived in ``wn_rl.layers`` or before the LSTM cell's scale option."""

import copy
import importlib
import pickle

import pytest
import torch
from layer_helpers import LAYER_CASES  # tests/layer_helpers.py
from layer_helpers import layers_and_inputs as _layers
from layer_helpers import lstm_scale_names as _lstm_scale_names

from wn_rl import (
    MeanOnlyBatchNorm,
    WNConv1d,
    WNConv2d,
    WNConv3d,
    WNConvTranspose1d,
    WNConvTranspose2d,
    WNConvTranspose3d,
    WNLSTMCell,
    cached,
)

torch.set_num_threads(2)


@pytest.mark.parametrize("index", LAYER_CASES)
def test_pickle_deepcopy_and_state_dict_round_trip(index):
    torch.manual_seed(0)
    layer, x = _layers()[index]
    with torch.no_grad():
        layer.g.uniform_(0.5, 2)
    expected = layer(x)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(clone(x), expected)
    torch.manual_seed(1)
    fresh, _ = _layers()[index]
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), expected)
    with cached(layer):
        layer(x)
        copy.deepcopy(layer)  # the cached non-leaf tensor must not travel


@pytest.mark.parametrize("scale", ["linear", "exp"])
def test_lstm_cell_pickle_deepcopy_and_state_dict_round_trip(scale):
    torch.manual_seed(0)
    cell = WNLSTMCell(3, 4, scale=scale)
    with torch.no_grad():
        for name in _lstm_scale_names(scale):
            getattr(cell, name).add_(0.3 * torch.randn(16))
    x, hx = torch.randn(2, 3), (torch.randn(2, 4), torch.randn(2, 4))
    expected = cell(x, hx)
    for clone in (pickle.loads(pickle.dumps(cell)), copy.deepcopy(cell)):
        assert clone.scale == scale
        for a, b in zip(clone(x, hx), expected, strict=True):
            torch.testing.assert_close(a, b)
    torch.manual_seed(1)
    fresh = WNLSTMCell(3, 4, scale=scale)
    fresh.load_state_dict(cell.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh(x, hx), expected, strict=True))
    with cached(cell):
        cell(x, hx)
        clone = copy.deepcopy(cell)  # the cached non-leaf weights must not travel
    assert clone._cached_weights is None
    other = "exp" if scale == "linear" else "linear"
    with pytest.raises(RuntimeError, match="Missing key"):  # a scale mismatch is refused, not misread
        WNLSTMCell(3, 4, scale=other).load_state_dict(cell.state_dict())


# every name that moved out of wn_rl.layers, by its new module: the old path must still resolve each, since
# pickles and saved models name classes by module path (models pickled before name wn_rl.layers.WNConv2d)
MOVED_FROM_LAYERS = {
    "wn_rl.conv": [
        "WNConv1d",
        "WNConv2d",
        "WNConv3d",
        "WNConvTranspose1d",
        "WNConvTranspose2d",
        "WNConvTranspose3d",
        "_CONV_HYPERPARAMETERS",
        "_CONV_TRANSPOSE",
        "_WNConvNd",
        "_WNConvTransposeNd",
    ],
    "wn_rl.mean_only_batch_norm": ["MeanOnlyBatchNorm", "_MeanOnlyBatchNormFn"],
    "wn_rl.recurrent_cells": ["WNGRUCell", "WNLSTMCell", "WNRNNCell", "WNRNNCellBase"],
}
# (class, its arguments, an input shape) for every module class that moved out of wn_rl.layers
MOVED_LAYER_CASES = [
    (WNConv1d, (2, 3, 3), (4, 2, 7)),
    (WNConv2d, (2, 3, 3), (4, 2, 5, 5)),
    (WNConv3d, (2, 3, 3), (2, 2, 4, 4, 3)),
    (WNConvTranspose1d, (2, 3, 3), (4, 2, 5)),
    (WNConvTranspose2d, (2, 3, 3), (4, 2, 4, 4)),
    (WNConvTranspose3d, (2, 3, 2), (2, 2, 3, 2, 3)),
    (MeanOnlyBatchNorm, (3,), (4, 3, 5)),
]


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, names in MOVED_FROM_LAYERS.items() for n in names])
def test_names_moved_out_of_wn_rl_layers_still_resolve_there(module, name):
    moved = getattr(importlib.import_module(module), name)
    assert getattr(importlib.import_module("wn_rl.layers"), name) is moved
    if isinstance(moved, type):
        assert moved.__module__ == module  # it does live in its new home


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
@pytest.mark.parametrize(("cls", "args", "shape"), MOVED_LAYER_CASES, ids=[c[0].__name__ for c in MOVED_LAYER_CASES])
def test_layers_pickled_when_they_lived_in_wn_rl_layers_still_load(monkeypatch, protocol, cls, args, shape):
    """A model pickled before the convolutions and mean-only BN left wn_rl.layers names them there (protocol 2
    as the text ``wn_rl.layers\\nWNConv2d``, protocol 4 as two short strings); it loads to the same module."""
    torch.manual_seed(0)
    layer = cls(*args)
    with torch.no_grad():
        for tensor in [*layer.parameters(), *layer.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(0.3 * torch.randn_like(tensor))
    new_module = cls.__module__
    monkeypatch.setattr(cls, "__module__", "wn_rl.layers")  # what an old pickle names
    data = pickle.dumps(layer, protocol=protocol)
    monkeypatch.undo()
    assert b"wn_rl.layers" in data and new_module.encode() not in data
    old = pickle.loads(data)
    assert type(old) is cls
    assert old.state_dict().keys() == layer.state_dict().keys()
    assert all(torch.equal(old.state_dict()[k], v) for k, v in layer.state_dict().items())
    x = torch.randn(shape)
    assert torch.equal(old(x), layer(x))


def test_lstm_cell_pickled_before_the_scale_option_loads_as_linear():
    cell = WNLSTMCell(3, 4)
    state = cell.__getstate__()
    del state["scale"]  # what a cell pickled by an older wn_rl carries
    old = WNLSTMCell.__new__(WNLSTMCell)
    old.__setstate__(state)
    assert old.scale == "linear"
    torch.testing.assert_close(old(torch.ones(1, 3))[0], cell(torch.ones(1, 3))[0])
