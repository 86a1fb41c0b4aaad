"""What the WN recurrent stacks and cells refuse or warn about, against what nn.LSTM, nn.GRU and nn.RNN do: the
constructor's dropout / bias / batch_first checks and its one-layer dropout warning, an input whose dtype is not
the weights', a projected cell's input and state sizes; and nn.RNNBase's ``mode`` and ``all_weights``."""

import copy
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from wn_rl import WNGRU, WNLSTM, WNRNN, WNLSTMCell, remove_weight_norm, weight_norm

PAIRS = [(nn.LSTM, WNLSTM), (nn.GRU, WNGRU), (nn.RNN, WNRNN)]
PAIR_IDS = ["lstm", "gru", "rnn"]
ONE_LAYER_DROPOUT = "dropout option adds dropout after all but last recurrent layer"


def _error(build):
    """The exception ``build()`` raises (None if it builds)."""
    try:
        build()
    except Exception as error:  # compared with torch's, whatever it is
        return error
    return None


@pytest.mark.parametrize(("plain_cls", "wn_cls"), PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize(
    "options",
    [
        {"num_layers": 2, "dropout": True},
        {"num_layers": 2, "dropout": "0.5"},
        {"num_layers": 2, "dropout": 1.5},
        {"num_layers": 2, "dropout": -0.1},
        {"num_layers": 2, "dropout": None},  # TypeError: torch stores float(dropout) before it checks it
        {"num_layers": 2, "dropout": "half"},  # ValueError, from float() too
        {"num_layers": 2, "dropout": torch.tensor(0.5)},
        {"bias": 0},
        {"bias": None},
        {"batch_first": None},
        {"batch_first": 1},
    ],
    ids=str,
)
def test_the_constructor_refuses_what_torch_refuses_with_its_message(one_torch_thread, plain_cls, wn_cls, options):
    """Same exception type, torch's message in ours (which also names the class and the value), and refused
    before a weight is drawn."""
    expected = _error(lambda: plain_cls(3, 4, **options))
    assert expected is not None
    rng = torch.get_rng_state()
    with pytest.raises(type(expected), match=f"{wn_cls.__name__}: .*{re.escape(str(expected))}"):
        wn_cls(3, 4, **options)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(("plain_cls", "wn_cls"), PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dropout", [0, 1, 0.5, np.float32(0.25)], ids=repr)
def test_the_constructor_takes_the_dropouts_torch_takes(one_torch_thread, plain_cls, wn_cls, dropout):
    plain, stack = plain_cls(3, 4, 2, dropout=dropout), wn_cls(3, 4, 2, dropout=dropout)
    assert type(stack.dropout) is float and stack.dropout == plain.dropout


@pytest.mark.parametrize("wn_cls", [WNLSTM, WNGRU, WNRNN])
def test_dropout_with_one_layer_warns_as_torch_does_at_the_callers_line(one_torch_thread, wn_cls):
    with pytest.warns(UserWarning, match=rf"{ONE_LAYER_DROPOUT}.*got dropout=0\.5 and num_layers=1") as record:
        wn_cls(3, 4, dropout=0.5)
    assert [w.filename for w in record] == [__file__]  # the warning names the line that built the stack
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wn_cls(3, 4, 2, dropout=0.5)
        wn_cls(3, 4, 1, dropout=0.0)


def _packed(x):
    return pack_padded_sequence(x, torch.tensor([6, 4, 2]))


@pytest.mark.parametrize(("plain_cls", "wn_cls"), PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("wrap", [lambda x: x, _packed], ids=["padded", "packed"])
def test_an_input_of_another_dtype_than_the_weights_is_refused_as_torch_refuses_it(
    one_torch_thread, plain_cls, wn_cls, wrap
):
    plain = plain_cls(5, 4)
    stack = weight_norm(copy.deepcopy(plain))
    x = wrap(torch.randn(6, 3, 5, dtype=torch.float64))
    message = (
        r"RNN input dtype \(torch.float64\) does not match weight dtype \(torch.float32\). Convert input: "
        r"input.to\(torch.float32\), or convert model: model.to\(torch.float64\)"
    )
    if wrap is not _packed:  # torch 2.13 leaves a packed one to its kernel ("mat1 and mat2 must have the same dtype")
        with pytest.raises(ValueError, match=message):
            plain(x)
    with pytest.raises(ValueError, match=message):
        stack(x)


@pytest.mark.parametrize(("plain_cls", "wn_cls"), PAIRS, ids=PAIR_IDS)
def test_under_autocast_an_input_of_another_dtype_runs_as_in_torch(one_torch_thread, plain_cls, wn_cls):
    """torch skips the dtype check under autocast, which casts input and weights for the kernel; so do these."""
    plain = plain_cls(5, 4)
    stack = weight_norm(copy.deepcopy(plain))
    x = torch.randn(6, 3, 5, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = plain(x)[0], stack(x)[0]
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)


def _state(batch, h, c):
    return (torch.randn((*batch, h)), torch.randn((*batch, c)))


@pytest.mark.parametrize(
    ("input_shape", "hx", "error", "message"),
    [
        ((3, 4), None, RuntimeError, r"input has inconsistent input_size: got 4 expected 5"),
        ((4,), None, RuntimeError, r"input has inconsistent input_size: got 4 expected 5"),
        ((3, 5), _state((3,), 6, 6), RuntimeError, r"hx\[0\] has shape \(3, 6\), expected \(3, 2\)"),
        ((3, 5), _state((3,), 2, 2), RuntimeError, r"hx\[1\] has shape \(3, 2\), expected \(3, 6\)"),
        ((3, 5), _state((2,), 2, 6), RuntimeError, r"hx\[0\] has shape \(2, 2\), expected \(3, 2\)"),
        ((5,), _state((1,), 2, 6), RuntimeError, r"hx\[0\] has shape \(1, 2\), expected \(2,\)"),
        ((3, 5), torch.randn(3, 2), ValueError, r"expects hx = \(h, c\), two tensors, got Tensor"),
        ((3, 5), _state((3,), 2, 6)[:1], ValueError, r"expects hx = \(h, c\), two tensors, got 1 items"),
    ],
)
def test_a_projected_cell_checks_input_and_state_sizes(one_torch_thread, input_shape, hx, error, message):
    cell = WNLSTMCell(5, 6, proj_size=2)
    with pytest.raises(error, match=rf"WNLSTMCell\(proj_size=2\).*{message}"):
        cell(torch.randn(input_shape), hx)


@pytest.mark.parametrize("batch", [(3,), ()], ids=["batched", "unbatched"])
def test_a_projected_cell_takes_the_sizes_it_should(one_torch_thread, batch):
    h, c = WNLSTMCell(5, 6, proj_size=2)(torch.randn((*batch, 5)), _state(batch, 2, 6))
    assert h.shape == (*batch, 2) and c.shape == (*batch, 6)


@pytest.mark.parametrize(
    "plain",
    [nn.LSTM(3, 4, 2, bidirectional=True, proj_size=2), nn.GRU(3, 4, bias=False), nn.RNN(3, 4, nonlinearity="relu")],
    ids=["lstm_proj", "gru", "rnn_relu"],
)
def test_mode_and_all_weights_are_the_torch_modules(one_torch_thread, plain):
    stack = weight_norm(copy.deepcopy(plain))
    assert stack.mode == plain.mode
    assert len(stack.all_weights) == len(plain.all_weights)
    for got, expected in zip(stack.all_weights, plain.all_weights, strict=True):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b)


def test_converting_a_one_layer_stack_with_dropout_does_not_repeat_torch_s_warning():
    """torch warned when the user built the nn.LSTM; its WN replacement and the folded-back nn.LSTM are built
    from the same options and say nothing more."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = nn.LSTM(3, 4, dropout=0.5)
        assert len(caught) == 1
        remove_weight_norm(weight_norm(plain))
    assert len(caught) == 1
