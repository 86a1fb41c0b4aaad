"""torch's default initialization for every linear and convolutional layer, plain or weight-normalized.

The alternative to data-dependent init (section 3) that isolates the reparameterization: a WN layer
takes the weight torch gives a fresh ``nn.Linear`` / ``nn.Conv*`` / ``nn.ConvTranspose*``,

    w ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))   (``kaiming_uniform_(w, a=sqrt(5))``), b from the same range,

written as v = w, g = ||w|| per output unit (the converter's start, eq. 2 unchanged), so that with the same
generator a plain network and its WN twin compute the same function: they differ only in how gradient
steps move the weights (section 2.1). A layer's fresh WN state (v ~ N(0, 0.05), g = 1) is the start the
paper pairs with data-dependent init, not this one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wn_rl.init import check_settable, initializable_layers
from wn_rl.layers import WNLayer, _direction_and_norm, _parameter_from_g

__all__ = ["torch_default_init"]


def _fan_in(weight_shape: torch.Size) -> int:
    """torch's fan-in of a weight: dim 1 times the kernel (``in_features``; ``in_channels / groups`` of a
    conv; ``out_channels / groups`` of a transposed conv, whose weight is stored input-major)."""
    return weight_shape[1] * math.prod(weight_shape[2:])


def _draw_weight(shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
    """torch's own weight init, ``kaiming_uniform_(w, a=sqrt(5))``, drawn on the CPU in float32 (the same
    numbers on every device; from the global generator the numbers a fresh CPU layer would get)."""
    return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5), generator=generator)


def _draw_bias(shape: torch.Size, fan_in: int, generator: torch.Generator | None) -> torch.Tensor:
    """torch's own bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), on the CPU in float32."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return nn.init.uniform_(torch.empty(shape), -bound, bound, generator=generator)


@torch.no_grad()
def torch_default_init(model: nn.Module, *, generator: torch.Generator | None = None) -> list[str]:
    """Give every linear and convolutional layer of ``model`` torch's default initialization, in place
    and in module order: per layer the weight, then the bias, each U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Plain layers get the weight itself; WN layers (:class:`wn_rl.WNLayer`) get v = w and g = ||w|| per
    output unit (s = log ||w|| for ``scale="exp"``), so the effective weight is exactly w. The draws come
    from ``generator`` (a CPU ``torch.Generator``; ``None``: torch's global generator) on the CPU and are
    copied to each parameter's device, dtype and memory format. With one generator seed a ``normal`` and a
    ``weight_norm`` network of one architecture therefore start from the same function. (A layer without a
    bias draws none, as in torch; the normalizing parameterizations drop the bias before their norm layers,
    so their draws part from ``normal``'s after the first layer.) Normalization layers, recurrent cells and
    everything else keep what they have. The ``initialized`` flags are not touched:
    this is not data-dependent init, and :func:`wn_rl.data_dependent_init` may still be run afterwards.

    Returns the names of the layers initialised; an error if there are none."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator is on {generator.device}; pass a CPU torch.Generator (the draws are made on the CPU "
            "and copied to each layer's device)"
        )
    layers = _layers(model)
    for module, weight in layers.values():
        w = _draw_weight(weight.shape, generator)
        bias = None if module.bias is None else _draw_bias(module.bias.shape, _fan_in(weight.shape), generator)
        if isinstance(module, WNLayer):
            v, norm = _direction_and_norm(w, module.norm_dim)
            weight.copy_(v)
            module._scale_parameter.copy_(_parameter_from_g(norm, module.scale))
        else:
            weight.copy_(w)
        if bias is not None:
            module.bias.copy_(bias)
    return list(layers)


def _layers(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Parameter]]:
    """The layers :func:`torch_default_init` initialises, by name, each with the parameter holding its weight
    (a WN layer's v); checked before any is changed."""
    candidates = initializable_layers(model)  # the layers data-dependent init sets
    check_settable(model, candidates, "torch_default_init")
    layers = {}
    for name, module in candidates.items():
        label = name or type(module).__name__
        weight = module.v if isinstance(module, WNLayer) else module.weight
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{label} is a lazy layer whose shape is not known yet: run one forward pass on a batch first, "
                "then torch_default_init (the model is unchanged)"
            )
        layers[label] = (module, weight)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear, nn.Conv*, nn.ConvTranspose* or WN layer to initialise"
        )
    return layers
