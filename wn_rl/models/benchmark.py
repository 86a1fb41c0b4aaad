"""Time per training step of the Table 1 network in several parameterizations, side by side.

Section 5.1 reports batch norm ~16% slower per step than the normal parameterization and weight norm
not noticeably slower. :func:`time_training_steps` measures one Adam step (forward, cross-entropy,
backward, update) at a given batch size, interleaving the parameterizations round by round so that
drifting machine load affects them alike, and reports the median per parameterization.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from wn_rl.init import data_dependent_init
from wn_rl.models.cifar import cifar_network

__all__ = ["format_step_times", "time_training_steps"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training_steps(
    parameterizations: Sequence[str],
    *,
    device: torch.device,
    batch_size: int = 100,
    steps: int = 10,
    warmup: int = 2,
    widths: tuple[int, int] = (96, 192),
    seed: int = 0,
) -> dict[str, list[float]]:
    """Seconds per training step, ``steps`` measurements per parameterization, interleaved."""
    if steps < 1 or warmup < 0 or batch_size < 2:
        raise ValueError(f"need steps >= 1, warmup >= 0 and batch_size >= 2; got {steps}, {warmup}, {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    runs = {}
    for name in parameterizations:
        torch.manual_seed(seed)
        model = cifar_network(name, widths=widths).to(device)
        data_dependent_init(model, x)
        runs[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {name: [] for name in parameterizations}
    for round_index in range(warmup + steps):
        for name, (model, optimizer) in runs.items():
            _sync(device)
            start = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def format_step_times(times: dict[str, list[float]], baseline: str = "normal") -> str:
    """A markdown table: median and min ms per step and the ratio of medians to ``baseline``."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians.get(baseline)
    lines = [f"| parameterization | median ms/step | min ms/step | median / {baseline} |", "| --- | --- | --- | --- |"]
    for name, values in times.items():
        ratio = "-" if base is None else f"{medians[name] / base:.3f}"
        lines.append(f"| {name} | {1e3 * medians[name]:.1f} | {1e3 * min(values):.1f} | {ratio} |")
    return "\n".join(lines)
