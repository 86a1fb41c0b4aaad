"""Training the Table 1 network on CIFAR-10 with section 5.1's protocol: the loop, its config and data.

Adam with batch 100 for 200 epochs: learning rate fixed and beta1 = 0.9 for the first 100 epochs,
then beta1 = 0.5 and the learning rate decayed linearly to 0; data-dependent init on 500 training
images before the first step (for every parameterization, so they start from the same function).
TensorBoard: training error, test error, loss, learning rate, time per step, WN statistics.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wn_rl.config import check
from wn_rl.data.cifar10 import load_cifar10
from wn_rl.data.preprocessing import fit_zca, to_unit_interval
from wn_rl.init import data_dependent_init
from wn_rl.models.cifar import cifar_network, cifar_schedule
from wn_rl.models.resume import EpochProgress, LoopState, ResumableRun
from wn_rl.models.training import copy_directions, open_writer, resolve_device
from wn_rl.parameterization import PARAMETERIZATIONS
from wn_rl.stats import wn_stats

__all__ = [
    "SAFE_TO_CHANGE",
    "CifarConfig",
    "CifarData",
    "CifarResult",
    "evaluate_error",
    "prepare_cifar",
    "train_cifar",
]

SAFE_TO_CHANGE = frozenset({"checkpoint_every_epochs", "log_dir", "log_wn_stats", "data_dir", "download", "device"})
"""Config keys a resumed run may change (where files live, how often it logs and checkpoints). Not
``epochs``: with ``decay_start`` it sets the learning-rate schedule, so another budget is another run."""


@dataclass(frozen=True)
class CifarConfig:
    """Section 5.1's CIFAR-10 run (defaults are the paper's)."""

    parameterization: str = "weight_norm"
    "one of normal, batch_norm, weight_norm, weight_norm+mean_only_bn, mean_only_bn (or layer_norm)"
    lr: float = 0.003
    "Adam learning rate, picked per parameterization from {3e-4, 1e-3, 3e-3, 1e-2} (Fig. 1: 3e-3; normal 3e-4)"
    epochs: int = 200
    "training epochs (passes over the training set)"
    decay_start: int = 100
    "epoch from which beta1 = beta1_late and the learning rate decays linearly to 0 at `epochs`"
    beta1: float = 0.9
    "Adam beta1 before decay_start"
    beta1_late: float = 0.5
    "Adam beta1 from decay_start on"
    beta2: float = 0.999
    "Adam beta2"
    batch_size: int = 100
    "minibatch size"
    init_batch_size: int = 500
    "training images used by data-dependent init (section 3; the reference code used 500)"
    noise_std: float = 0.15
    "Gaussian input noise std (Table 1)"
    dropout: float = 0.5
    "dropout probability after each max pool (Table 1)"
    widths: tuple[int, ...] = (96, 192)
    "channels of the 96- and 192-map stages (Table 1); smaller for quick runs"
    zca: bool = True
    "ZCA-whiten the images (Table 1); needs more training images than 3072 features; false for quick runs"
    zca_regularization: float = 1e-5
    "added to the covariance eigenvalues before 1/sqrt (reference code: 1e-5 on [0, 1] images)"
    train_subset: int = 0
    "use only the first N training images (0: all 50,000), for short runs"
    test_subset: int = 0
    "use only the first N test images (0: all 10,000)"
    data_dir: str = "data/cifar10"
    "directory holding cifar-10-batches-py"
    download: bool = False
    "download and checksum-verify the official archive into data_dir if missing"
    seed: int = 1
    "seed of the initial weights, the init batch and the minibatch order"
    device: str = "auto"
    "auto (CUDA if available), cpu, cuda, cuda:1, ..."
    log_dir: str = "runs/paper"
    "TensorBoard root; each run writes to log_dir/<run name>; empty string disables logging"
    checkpoint_dir: str = "checkpoints/paper"
    "final model, config and curves are saved here; empty string disables"
    checkpoint_every_epochs: int = 1
    "write a resumable checkpoint to checkpoint_dir/<run name>/ every N epochs (and at the end)"
    log_wn_stats: bool = True
    "write g, ||v||, g/||v|| per layer to TensorBoard once per epoch"

    def __post_init__(self) -> None:
        check(
            self.parameterization in PARAMETERIZATIONS,
            "parameterization",
            self.parameterization,
            f"one of {sorted(PARAMETERIZATIONS)}",
        )
        check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a positive learning rate")
        check(self.epochs >= 1, "epochs", self.epochs, "at least 1")
        check(0 <= self.decay_start <= self.epochs, "decay_start", self.decay_start, f"in [0, epochs={self.epochs}]")
        for key in ("beta1", "beta1_late", "beta2"):
            check(0 <= getattr(self, key) < 1, key, getattr(self, key), "a value in [0, 1)")
        check(self.batch_size >= 2, "batch_size", self.batch_size, "at least 2")
        check(self.init_batch_size >= 2, "init_batch_size", self.init_batch_size, "at least 2")
        check(self.noise_std >= 0, "noise_std", self.noise_std, "a non-negative std")
        check(0 <= self.dropout < 1, "dropout", self.dropout, "a probability in [0, 1)")
        check(len(self.widths) == 2 and min(self.widths) >= 1, "widths", self.widths, "two positive channel counts")
        check(self.checkpoint_every_epochs >= 1, "checkpoint_every_epochs", self.checkpoint_every_epochs, ">= 1")
        check(self.zca_regularization > 0, "zca_regularization", self.zca_regularization, "a positive number")
        check(
            self.train_subset >= 0 and self.test_subset >= 0,
            "train_subset/test_subset",
            (self.train_subset, self.test_subset),
            "0 (all) or a positive count",
        )


@dataclass
class CifarData:
    """Preprocessed tensors on the training device."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


@dataclass
class CifarResult:
    """Per-epoch curves of one run."""

    parameterization: str
    train_error: list[float] = field(default_factory=list)
    test_error: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    seconds_per_step: list[float] = field(default_factory=list)
    checkpoint: str | None = None

    @property
    def final_test_error(self) -> float:
        return self.test_error[-1] if self.test_error else float("nan")


def prepare_cifar(config: CifarConfig, device: torch.device | None = None) -> CifarData:
    """Load both splits, scale to [0, 1] and ZCA-whiten with a transform fitted on the training images."""
    device = device or resolve_device(config.device)
    train = load_cifar10(config.data_dir, "train", download=config.download)
    test = load_cifar10(config.data_dir, "test", download=False)
    train_x, test_x = to_unit_interval(torch.from_numpy(train.images)), to_unit_interval(torch.from_numpy(test.images))
    train_y, test_y = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    if config.train_subset:
        train_x, train_y = train_x[: config.train_subset], train_y[: config.train_subset]
    if config.test_subset:
        test_x, test_y = test_x[: config.test_subset], test_y[: config.test_subset]
    if config.zca:
        features = train_x[0].numel()
        if len(train_x) <= features:
            warnings.warn(
                f"zca=true fitted on {len(train_x):,} training images, no more than their {features:,} features: the "
                "covariance is singular, and the directions the training images never take get a gain of "
                f"1/sqrt(zca_regularization={config.zca_regularization:g}), so test images come out on another scale "
                "(tens of times larger) than training ones. Use zca=false for short runs on a train_subset.",
                stacklevel=2,
            )
        zca = fit_zca(train_x, config.zca_regularization)
        train_x, test_x = zca(train_x), zca(test_x)
    return CifarData(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device))


@torch.no_grad()
def evaluate_error(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Classification error of ``model`` in eval mode (restores its mode afterwards)."""
    was_training = model.training
    model.eval()
    wrong = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        wrong += int((logits.argmax(dim=1) != labels[start : start + batch_size]).sum())
    model.train(was_training)
    return wrong / max(len(labels), 1)


def build_cifar_model(config: CifarConfig, device: torch.device, reference: nn.Module | None = None) -> nn.Module:
    """Table 1's network for ``config``; with ``reference`` its weight directions are copied in first."""
    model = cifar_network(
        config.parameterization, widths=tuple(config.widths), noise_std=config.noise_std, dropout=config.dropout
    )
    if reference is not None:
        copy_directions(reference, model)
    return model.to(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_epoch(model, optimizer, data: CifarData, config: CifarConfig, epoch: int, progress, run) -> dict | None:
    """The minibatches of ``epoch`` from ``progress`` on; ``None`` when a signal stopped it after a
    minibatch (``progress`` then says where)."""
    steps_per_epoch = max(1, len(data.train_y) // config.batch_size)
    model.train()
    sums = progress.sums
    if not sums:
        sums.update(loss=0.0, wrong=0, seen=0)
    device = data.train_x.device
    _synchronize(device)
    start = time.perf_counter()
    for step, idx in progress.batches(config.batch_size):
        lr, beta1 = cifar_schedule(
            epoch + step / steps_per_epoch,
            lr=config.lr,
            epochs=config.epochs,
            decay_start=config.decay_start,
            beta1=config.beta1,
            beta1_late=config.beta1_late,
        )
        for group in optimizer.param_groups:
            group["lr"], group["betas"] = lr, (beta1, config.beta2)
        idx = idx.to(device)
        x, y = data.train_x[idx], data.train_y[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums["loss"] += float(loss.detach()) * len(y)
        sums["wrong"] += int((logits.detach().argmax(dim=1) != y).sum())
        sums["seen"] += len(y)
        progress.step = step + 1
        if run.stop_signal is not None and progress.step < steps_per_epoch:
            progress.seconds += time.perf_counter() - start
            return None
    _synchronize(device)
    elapsed = progress.seconds + time.perf_counter() - start
    return {
        "loss": sums["loss"] / max(sums["seen"], 1),
        "error": sums["wrong"] / max(sums["seen"], 1),
        "seconds_per_step": elapsed / max(progress.step, 1),
        "lr": lr,
        "beta1": beta1,
    }


def _initialize(model: nn.Module, data: CifarData, config: CifarConfig, generator: torch.Generator):
    """Section 3's data-dependent init on ``init_batch_size`` training images drawn with ``generator``."""
    init_idx = torch.randperm(len(data.train_y), generator=generator)[: config.init_batch_size]
    return data_dependent_init(model, data.train_x[init_idx.to(data.train_x.device)])


def train_cifar(
    config: CifarConfig,
    *,
    data: CifarData | None = None,
    reference: nn.Module | None = None,
    experiment: str = "cifar10",
    quiet: bool = False,
    force: bool = False,
) -> CifarResult:
    """Train Table 1's network with section 5.1's schedule; returns the per-epoch curves.

    With ``checkpoint_dir`` set, a checkpoint every ``checkpoint_every_epochs`` epochs lets a rerun of the
    same config continue exactly where the newest one stopped (:mod:`wn_rl.models.resume`); SIGINT/SIGTERM
    finish the minibatch, checkpoint and raise :class:`~wn_rl.models.resume.TrainingInterrupted`.

    Args:
        config: the run's config.
        data: preprocessed data (loaded from ``config.data_dir`` if omitted).
        reference: a network whose weight directions are copied in before data-dependent init, so
            several parameterizations start from identical parameters (section 5.1).
        force: resume even if the config differs from the saved one in keys outside ``SAFE_TO_CHANGE``.
    """
    device = resolve_device(config.device)
    # the run folder's lock (wn_rl.run_lock) is held from its resume or claim until the final checkpoint
    with ResumableRun(config, experiment, SAFE_TO_CHANGE, force=force) as run:
        torch.manual_seed(config.seed)
        data = data if data is not None else prepare_cifar(config, device)
        run.begin()
        if len(data.train_y) < config.batch_size:
            raise ValueError(f"{len(data.train_y)} training images are fewer than batch_size={config.batch_size}")
        model = build_cifar_model(config, device, reference)
        generator = torch.Generator().manual_seed(config.seed)
        report = None if run.state is not None else _initialize(model, data, config, generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2))
        steps_per_epoch = max(1, len(data.train_y) // config.batch_size)
        state = LoopState(
            config, run, model, optimizer, generator, CifarResult(config.parameterization), steps_per_epoch
        )
        start, progress = run.restore(state.restore) if run.state is not None else (0, None)
        writer = open_writer(config.log_dir, run.name, config, run.purge_step) if config.log_dir else None
        if writer is not None and report is not None:
            for tag, value in report.scalars().items():
                writer.add_scalar(tag, value, 0)
        try:
            with run.stop_on_signals():
                _epochs(state, data, writer, start, progress, quiet)
        finally:
            if writer is not None:
                writer.close()
        run.save_final(model, state.result)
    return state.result


def _epochs(state: LoopState, data: CifarData, writer, start: int, progress: EpochProgress | None, quiet: bool) -> None:
    config, run, result, name = state.config, state.run, state.result, state.run.name
    for epoch in range(start, config.epochs):
        progress = progress or EpochProgress.start(len(data.train_y), state.generator)
        stats = _train_epoch(state.model, state.optimizer, data, config, epoch, progress, run)
        if stats is None:  # stopped by a signal inside the epoch; a non-finite state is never saved
            if not math.isfinite(progress.sums["loss"]):
                raise FloatingPointError(f"{name}: training loss became non-finite in epoch {epoch + 1}; lower lr")
            raise run.interrupt(state.save(epoch, progress))
        progress = None
        test_error = evaluate_error(state.model, data.test_x, data.test_y)
        result.train_error.append(stats["error"])
        result.train_loss.append(stats["loss"])
        result.test_error.append(test_error)
        result.seconds_per_step.append(stats["seconds_per_step"])
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"{name}: training loss became {stats['loss']} in epoch {epoch + 1}; lower lr")
        if writer is not None:
            _log_epoch(writer, state.model, stats, test_error, epoch + 1, config.log_wn_stats)
        if not quiet:
            print(
                f"[{name}] epoch {epoch + 1}/{config.epochs} loss {stats['loss']:.4f} train error "
                f"{stats['error']:.4f} test error {test_error:.4f} {stats['seconds_per_step'] * 1e3:.1f} ms/step",
                flush=True,
            )
        path = None
        if (epoch + 1) % config.checkpoint_every_epochs == 0 or run.stop_signal is not None:
            path = state.save(epoch + 1)
        if run.stop_signal is not None:
            raise run.interrupt(path)
    state.save(max(start, config.epochs))


def _log_epoch(writer, model: nn.Module, stats: dict[str, float], test_error: float, epoch: int, wn: bool) -> None:
    writer.add_scalar("train/error", stats["error"], epoch)
    writer.add_scalar("train/loss", stats["loss"], epoch)
    writer.add_scalar("test/error", test_error, epoch)
    writer.add_scalar("schedule/lr", stats["lr"], epoch)
    writer.add_scalar("schedule/beta1", stats["beta1"], epoch)
    writer.add_scalar("perf/seconds_per_step", stats["seconds_per_step"], epoch)
    if wn:
        for tag, value in wn_stats(model).items():
            writer.add_scalar(tag, value, epoch)
