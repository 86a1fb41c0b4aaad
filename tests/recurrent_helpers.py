"""Helpers shared by the recurrent layer tests (tests/test_recurrent_*.py): random states, and outputs
compared tensor by tensor whatever their nesting (an LSTM's (h, c), a PackedSequence)."""

import torch
from torch import nn

F64 = torch.float64


def state(plain_cls, shape, dtype=F64, proj_size=0):
    """A random h (or an LSTM's (h, c)) of ``shape``; h has ``proj_size`` features where that is set."""
    h = torch.randn((*shape[:-1], proj_size or shape[-1]), dtype=dtype)
    return (h, torch.randn(shape, dtype=dtype)) if plain_cls in (nn.LSTM, nn.LSTMCell) else h


def parts(out):
    """Every tensor of an RNN's or cell's output, flattened into one list."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for part in out for t in parts(part.data if hasattr(part, "batch_sizes") else part)]


def assert_same(got, expected, **tolerance):
    got, expected = parts(got), parts(expected)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


def padded(batch_first, steps=6, batch=4, features=5):
    shape = (batch, steps, features) if batch_first else (steps, batch, features)
    return torch.randn(shape, dtype=F64)
