"""The paper's supervised and generative models as benchmark modules (sections 5.1-5.3), each built
through :class:`wn_rl.Parameterization` so one value switches among its parameterizations.

- :mod:`wn_rl.models.cifar`: the CIFAR-10 classifier of Table 1 and its schedule.
"""

from wn_rl.models.cifar import GaussianNoise, cifar_network, cifar_schedule

__all__ = ["GaussianNoise", "cifar_network", "cifar_schedule"]
