"""Cases shared by the WN layer tests (tests/test_layers_*.py): every WN layer class with an input, and the
names of a WN LSTM cell's scale parameters."""

import torch

from wn_rl import WNConv1d, WNConv2d, WNConv3d, WNConvTranspose1d, WNConvTranspose2d, WNConvTranspose3d, WNLinear


def layers_and_inputs(dtype=torch.float32, scale="linear"):
    return [
        (WNLinear(5, 3, dtype=dtype, scale=scale), torch.randn(4, 5, dtype=dtype)),
        (WNConv1d(2, 3, 3, dtype=dtype, scale=scale), torch.randn(4, 2, 7, dtype=dtype)),
        (WNConv2d(2, 3, 3, padding=1, dtype=dtype, scale=scale), torch.randn(4, 2, 5, 5, dtype=dtype)),
        (WNConvTranspose2d(2, 3, 3, stride=2, dtype=dtype, scale=scale), torch.randn(4, 2, 4, 4, dtype=dtype)),
        # big enough for the CPU's output-scaling form (wn_rl.layers._WNLinearFn)
        (WNLinear(512, 128, dtype=dtype, scale=scale), torch.randn(4, 512, dtype=dtype)),
        (WNConv3d(2, 3, 3, padding=1, dtype=dtype, scale=scale), torch.randn(2, 2, 4, 4, 3, dtype=dtype)),
        (WNConvTranspose1d(2, 3, 3, stride=2, dtype=dtype, scale=scale), torch.randn(4, 2, 5, dtype=dtype)),
        (WNConvTranspose3d(2, 3, 2, stride=2, dtype=dtype, scale=scale), torch.randn(2, 2, 3, 2, 3, dtype=dtype)),
    ]


LAYER_CASES = range(8)


def lstm_scale_names(scale):
    return ("g_ih", "g_hh") if scale == "linear" else ("s_ih", "s_hh")
