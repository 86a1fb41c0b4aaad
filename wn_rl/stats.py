"""Per-layer weight-norm statistics for monitoring (section 2.1).

For each WN layer: the scale g, the direction's norm ||v|| and the effective gradient scale g / ||v||
(eq. 4: grad_v = g/||v|| M_w grad_w). With plain SGD ||v|| only grows, so g / ||v|| falls as the
gradients get noisier: the self-stabilising effective learning rate the paper describes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wn_rl.layers import WNLayer
from wn_rl.recurrent_cells import WNRNNCellBase

__all__ = ["wn_histograms", "wn_stats"]


def _per_unit(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (g, ||v||)}`` per WN weight, each of shape ``(units,)``."""
    found: dict[str, tuple[Tensor, Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, WNLayer):
            found[name or "layer"] = (module.g_value.detach().float(), module.v_norm().detach())
        elif isinstance(module, WNRNNCellBase):
            for part, g in zip(module.parts, module.g_values, strict=True):
                v = getattr(module, f"v_{part}").detach().float()
                found[f"{name or 'cell'}.{part}"] = (g.detach().float(), torch.linalg.vector_norm(v, dim=1))
    return found


@torch.no_grad()
def wn_stats(model: nn.Module, prefix: str = "wn") -> dict[str, float]:
    """Scalar summaries per WN layer, ``{f"{prefix}/{layer}/{stat}": value}``, ready for
    ``SummaryWriter.add_scalar`` or SB3's ``logger.record``.

    Stats: ``g_mean``, ``g_min``, ``g_max``, ``v_norm_mean``, ``grad_scale_mean``, ``grad_scale_min``,
    ``grad_scale_max`` (grad_scale = g / ||v||). One host synchronisation for the whole model.
    """
    per_unit = _per_unit(model)
    if not per_unit:
        return {}
    names = ("g_mean", "g_min", "g_max", "v_norm_mean", "grad_scale_mean", "grad_scale_min", "grad_scale_max")
    rows = []
    for g, v_norm in per_unit.values():
        ratio = g / v_norm
        rows.append(torch.stack([g.mean(), g.min(), g.max(), v_norm.mean(), ratio.mean(), ratio.min(), ratio.max()]))
    values = torch.stack(rows).cpu().tolist()
    return {
        f"{prefix}/{layer}/{stat}": value
        for layer, row in zip(per_unit, values, strict=True)
        for stat, value in zip(names, row, strict=True)
    }


@torch.no_grad()
def wn_histograms(model: nn.Module, prefix: str = "wn") -> dict[str, Tensor]:
    """Per-unit g, ||v|| and g / ||v|| per WN layer as CPU tensors, for ``SummaryWriter.add_histogram``."""
    out: dict[str, Tensor] = {}
    for layer, (g, v_norm) in _per_unit(model).items():
        out[f"{prefix}/{layer}/g"] = g.cpu()
        out[f"{prefix}/{layer}/v_norm"] = v_norm.cpu()
        out[f"{prefix}/{layer}/grad_scale"] = (g / v_norm).cpu()
    return out
