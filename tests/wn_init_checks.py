"""Checks shared by the SB3 init tests: every pre-activation of a network after data-dependent init
(section 3 of the paper) has mean ~0 and std ~init_scale on the init batch."""

from __future__ import annotations

import torch

import wn_rl


def preactivations(net: torch.nn.Module, run) -> list[tuple[str, torch.Tensor, float]]:
    """(name, output, init_scale) of every pre-activation: a WN layer's output, or its mean-only BN's."""
    found, handles = [], []
    blocks = {
        id(m[0]): m
        for m in net.modules()
        if isinstance(m, torch.nn.Sequential) and len(m) == 2 and isinstance(m[1], wn_rl.MeanOnlyBatchNorm)
    }
    for name, module in net.named_modules():
        if isinstance(module, wn_rl.WNLayer):
            target = blocks[id(module)][1] if id(module) in blocks else module

            def hook(_m, _i, out, name=name, scale=module.init_scale):
                found.append((name, out.detach(), scale))

            handles.append(target.register_forward_hook(hook))
    was_training = net.training
    net.eval()
    with torch.no_grad():
        run()
    net.train(was_training)
    for handle in handles:
        handle.remove()
    return found


def assert_normalized(found, dead: dict[str, list[int]]) -> None:
    assert found
    for name, out, scale in found:
        t = out.movedim(-1 if out.dim() == 2 else 1, 0).reshape(out.shape[-1 if out.dim() == 2 else 1], -1)
        keep = [i for i in range(t.shape[0]) if i not in dead.get(name, [])]
        mean, std = t[keep].mean(dim=1), t[keep].std(dim=1, unbiased=False)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=2e-4 * scale + 1e-5, rtol=0, msg=name)
        torch.testing.assert_close(std, torch.full_like(std, scale), rtol=2e-3, atol=1e-6, msg=name)
