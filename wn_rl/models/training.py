"""Shared machinery of the paper-model training runs: devices, run names, TensorBoard, checkpoints,
minibatch order, Polyak averaging and identical initial parameters across parameterizations.

The experiment loops (:mod:`wn_rl.models.cifar_experiment`, :mod:`wn_rl.models.vae_experiment`,
:mod:`wn_rl.models.draw_experiment`) are thin layers over these helpers and the models.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from wn_rl import checkpoint
from wn_rl.config import config_to_dict, flatten_config, resolve_device
from wn_rl.init import initializable_layers
from wn_rl.layers import WNLayer

__all__ = [
    "PolyakAverage",
    "copy_directions",
    "minibatches",
    "open_writer",
    "resolve_device",
    "run_name",
    "save_checkpoint",
]


def run_name(experiment: str, parameterization: str, seed: int) -> str:
    """``{experiment}__{parameterization}__{seed}__{unix time}`` (CleanRL's convention)."""
    return f"{experiment}__{parameterization}__{seed}__{int(time.time())}"


def open_writer(log_dir: str | Path, name: str, config: Any, purge_step: int | None = None):
    """A TensorBoard ``SummaryWriter`` in ``log_dir/name`` with the config written as a text table; a
    failed write (a full disk) raises :class:`~wn_rl.checkpoint.CheckpointError` naming the event file.

    A resumed run passes ``purge_step`` (the first epoch it logs again): TensorBoard then drops what an
    earlier process logged from that step on, and the table (logged at the start) is not written twice."""
    writer = checkpoint.summary_writer(Path(log_dir) / name, purge_step)  # write failures name the file
    if purge_step:
        return writer
    rows = "\n".join(f"|{k}|{v}|" for k, v in flatten_config(config_to_dict(config)).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")
    return writer


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` with the project's crash-safe checkpoint writer (temporary file, fsync, rename,
    completion marker; see :mod:`wn_rl.checkpoint`), creating the directory first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return checkpoint.save_checkpoint(path, payload)


def minibatches(n: int, batch_size: int, generator: torch.Generator, *, drop_last: bool = True) -> Iterator[Tensor]:
    """Indices of one epoch in a random order, ``batch_size`` at a time (the last partial batch dropped
    unless ``drop_last=False``)."""
    order = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def copy_directions(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the weight directions of ``source``, layer by layer in module order.

    Section 5.1: "the network parameters are initialized using the scheme of section 3 such that all
    cases have identical parameters starting out". Draw one network, copy its weights into every
    parameterization (``v`` of a WN layer, ``weight`` of a plain one; biases zeroed), then run
    data-dependent init on the same batch: w = g v / ||v|| with g = 1 / std(v.x / ||v||) equals
    v / std(v.x), the plain layer's rescaled weight, so every parameterization starts from one function.
    """
    sources = list(initializable_layers(source).values())
    targets = list(initializable_layers(target).values())
    if len(sources) != len(targets):
        raise ValueError(f"source has {len(sources)} initializable layers but target has {len(targets)}")
    for i, (src, dst) in enumerate(zip(sources, targets, strict=True)):
        weight = src.weight.detach()
        if isinstance(dst, WNLayer):
            if dst.v.shape != weight.shape:
                raise ValueError(f"layer {i}: weight shapes differ, {tuple(weight.shape)} vs {tuple(dst.v.shape)}")
            dst.v.copy_(weight)
            if dst.scale == "linear":
                dst.g.copy_(dst.v_norm())
            else:
                dst.s.copy_(dst.v_norm().log())
        else:
            if dst.weight.shape != weight.shape:
                raise ValueError(f"layer {i}: weight shapes differ, {tuple(weight.shape)} vs {tuple(dst.weight.shape)}")
            dst.weight.copy_(weight)
        if dst.bias is not None:
            dst.bias.zero_()
        dst.initialized.fill_(False)


class PolyakAverage:
    """An exponential moving average of a model's parameters (Polyak averaging, section 5.2).

    After the t-th update the average is ``sum_i decay**(t-i) * model_i / sum_i decay**(t-i)`` over the models
    after updates 1..t: an exponential moving average without the initial weights' share (bias-corrected, as
    Adam's moments are), so it is the plain mean of the updates so far until about ``1 / (1 - decay)`` of them,
    then ``average <- decay * average + (1 - decay) * model``. (Uncorrected, the random initial weights kept a share
    of decay**t: 37 % after 10 epochs at the VAE's 10-epoch horizon, which dominated early test bounds.) Buffers
    (batch-norm statistics, ``initialized`` flags) are copied. ``decay = 1 - 1 / (steps_per_epoch * epochs)``
    averages over about ``epochs`` epochs, as the paper's VAE did with ~10.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"Polyak decay={decay!r} must lie in [0, 1)")
        self.decay = decay
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.updates = 0
        "updates averaged so far (saved with the average: a resume continues the same weights)"

    @staticmethod
    def decay_for(steps_per_epoch: int, epochs: float) -> float:
        """The decay that averages over about ``epochs`` epochs of ``steps_per_epoch`` updates."""
        return 1.0 - 1.0 / max(1.0, steps_per_epoch * epochs)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d, t = self.decay, self.updates
        step_decay = d * (1.0 - d ** (t - 1)) / (1.0 - d**t)  # 0 at the first update, -> decay
        for average, current in zip(self.model.parameters(), model.parameters(), strict=True):
            average.lerp_(current.detach(), 1.0 - step_decay)
        for average, current in zip(self.model.buffers(), model.buffers(), strict=True):
            average.copy_(current)
