"""wn_rl: weight normalization (Salimans & Kingma 2016) as a first-class tool for reinforcement learning.

The core: weight-normalized layers, conversion to and from plain layers, data-dependent
initialization, mean-only batch normalization, the paper's parameterizations as one switch, and
per-layer statistics for monitoring.
"""

from wn_rl.conv import (
    WNConv1d,
    WNConv2d,
    WNConv3d,
    WNConvTranspose1d,
    WNConvTranspose2d,
    WNConvTranspose3d,
)
from wn_rl.convert import remove_weight_norm, weight_norm
from wn_rl.default_init import torch_default_init
from wn_rl.dormant import dormant_units
from wn_rl.init import InitReport, LayerInit, add_init_flags, data_dependent_init, is_initialized
from wn_rl.layers import WNLayer, WNLinear, cached, exact_second_derivatives
from wn_rl.mean_only_batch_norm import MeanOnlyBatchNorm
from wn_rl.parameterization import PARAMETERIZATIONS, Parameterization, mlp, register_parameterization
from wn_rl.recurrent import WNGRU, WNLSTM, WNRNN, WNRNNBase
from wn_rl.recurrent_cells import WNGRUCell, WNLSTMCell, WNRNNCell, WNRNNCellBase
from wn_rl.stats import wn_histograms, wn_stats

__version__ = "0.1.0"

__all__ = [
    "PARAMETERIZATIONS",
    "InitReport",
    "LayerInit",
    "MeanOnlyBatchNorm",
    "Parameterization",
    "WNConv1d",
    "WNConv2d",
    "WNConv3d",
    "WNConvTranspose1d",
    "WNConvTranspose2d",
    "WNConvTranspose3d",
    "WNGRU",
    "WNGRUCell",
    "WNLSTM",
    "WNLSTMCell",
    "WNLayer",
    "WNLinear",
    "WNRNN",
    "WNRNNBase",
    "WNRNNCell",
    "WNRNNCellBase",
    "add_init_flags",
    "cached",
    "data_dependent_init",
    "dormant_units",
    "exact_second_derivatives",
    "is_initialized",
    "mlp",
    "register_parameterization",
    "remove_weight_norm",
    "torch_default_init",
    "weight_norm",
    "wn_histograms",
    "wn_stats",
]
