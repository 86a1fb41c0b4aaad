"""The paper's supervised and generative models as benchmark modules (sections 5.1-5.3), each built
through :class:`wn_rl.Parameterization` so one value switches among its parameterizations.

- :mod:`wn_rl.models.cifar`: the CIFAR-10 classifier of Table 1 and its schedule (section 5.1).
- :mod:`wn_rl.models.vae`: the convolutional VAE for MNIST with a diagonal or IAF posterior (5.2).
- :mod:`wn_rl.models.iaf`: inverse autoregressive flow with masked weight-normalized layers.
- :mod:`wn_rl.models.cifar_vae`: the ResNet VAE with stochastic layers and IAF for CIFAR-10 (5.2).
- :mod:`wn_rl.models.draw`: DRAW with attention and weight-normalized LSTMs (5.3).
- :mod:`wn_rl.models.distributions`: the log-densities they use.
- :mod:`wn_rl.models.cifar_experiment`, :mod:`wn_rl.models.generative_experiment`: training loops.
"""

from wn_rl.models.cifar import GaussianNoise, cifar_network, cifar_schedule
from wn_rl.models.cifar_vae import ResNetVAE
from wn_rl.models.draw import DRAW
from wn_rl.models.iaf import IAF, MADE, ConvARNet, IAFStep, MaskedWNConv2d, MaskedWNLinear
from wn_rl.models.vae import ConvVAE, ResidualBlock

__all__ = [
    "DRAW",
    "IAF",
    "MADE",
    "ConvARNet",
    "ConvVAE",
    "GaussianNoise",
    "IAFStep",
    "MaskedWNConv2d",
    "MaskedWNLinear",
    "ResNetVAE",
    "ResidualBlock",
    "cifar_network",
    "cifar_schedule",
]
