"""Training the paper's generative models: the convolutional VAE (section 5.2, MNIST), the ResNet VAE
with IAF (section 5.2, CIFAR-10) and DRAW (section 5.3, MNIST).

The loop maximises the ELBO with Adamax (VAE, lr 0.002) or Adam (DRAW, lr 3e-4), keeps a Polyak
average of the parameters over about ``polyak_epochs`` epochs (section 5.2: ~10) and evaluates the
test-set bound with the averaged parameters. TensorBoard: train and test ELBO (nats per image),
bits per dimension, per-layer KL, time per step, WN statistics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from wn_rl.config import check
from wn_rl.data.cifar10 import load_cifar10
from wn_rl.data.mnist import load_mnist
from wn_rl.data.preprocessing import binarize, to_unit_interval
from wn_rl.init import data_dependent_init
from wn_rl.models.cifar_vae import ResNetVAE
from wn_rl.models.draw import DRAW
from wn_rl.models.resume import EpochProgress, LoopState, ResumableRun
from wn_rl.models.training import PolyakAverage, open_writer, resolve_device
from wn_rl.models.vae import POSTERIORS, ConvVAE
from wn_rl.parameterization import PARAMETERIZATIONS
from wn_rl.stats import wn_stats

__all__ = [
    "SAFE_TO_CHANGE",
    "ConvVAESettings",
    "DRAWSettings",
    "GenerativeConfig",
    "GenerativeResult",
    "ResNetVAESettings",
    "build_generative_model",
    "free_bits_kl",
    "train_generative",
]

MODELS = ("conv_vae", "resnet_vae", "draw")
DATASETS = ("mnist", "cifar10")
SAFE_TO_CHANGE = frozenset({"epochs", "checkpoint_every_epochs", "log_dir", "data_dir", "download", "device"})
"""Config keys a resumed run may change: the epoch budget (nothing else depends on it), where files live
and how often it checkpoints."""


@dataclass(frozen=True)
class ConvVAESettings:
    """Section 5.2's MNIST VAE."""

    widths: tuple[int, ...] = (16, 32, 32)
    "feature maps of the three ResNet sequences"
    blocks_per_stage: int = 2
    "ResNet blocks per sequence"
    dense: int = 450
    "units of the dense layer"
    z_dim: int = 32
    "latent dimensions"
    posterior: str = "iaf"
    "diagonal or iaf"
    iaf_steps: int = 2
    "IAF steps"
    iaf_hidden: tuple[int, ...] = (320, 320)
    "MADE hidden widths of each IAF step"
    context_dim: int = 64
    "IAF context size"


@dataclass(frozen=True)
class ResNetVAESettings:
    """The CIFAR-10 ResNet VAE with IAF (Kingma et al. 2016)."""

    hidden: int = 160
    "ResNet feature maps"
    z_channels: int = 32
    "latent channels per stochastic layer"
    context: int = 32
    "IAF context channels"
    stages: tuple[int, ...] = (4, 4)
    "stochastic layers per stage (each stage after the first halves the resolution)"
    iaf_steps: int = 1
    "IAF steps per stochastic layer (0: diagonal posteriors)"
    free_bits: float = 0.0
    "training objective only: each layer's batch-mean KL counts as at least free_bits nats per latent unit"


@dataclass(frozen=True)
class DRAWSettings:
    """DRAW with attention (jbornschein/draw's MNIST settings, used by section 5.3)."""

    steps: int = 64
    "T, glimpses per image"
    read_n: int = 2
    "read attention window N x N"
    write_n: int = 5
    "write attention window N x N"
    enc_hidden: int = 256
    "encoder LSTM units"
    dec_hidden: int = 256
    "decoder LSTM units"
    z_dim: int = 100
    "latent dimensions per step"


@dataclass(frozen=True)
class GenerativeConfig:
    """One generative-model run; the model's own sizes are in the section named like ``model``."""

    model: str = "conv_vae"
    "conv_vae (MNIST, section 5.2), resnet_vae (CIFAR-10, section 5.2) or draw (MNIST, section 5.3)"
    dataset: str = "mnist"
    "mnist or cifar10"
    parameterization: str = "weight_norm"
    "the paper compares normal and weight_norm; every registered name works"
    optimizer: str = "adamax"
    "adamax (VAE, section 5.2) or adam (DRAW)"
    lr: float = 0.002
    "learning rate (section 5.2: Adamax 0.002; DRAW: 3e-4)"
    beta1: float = 0.9
    "first-moment decay"
    beta2: float = 0.999
    "second-moment decay"
    epochs: int = 300
    "passes over the training set"
    batch_size: int = 100
    "minibatch size"
    polyak_epochs: float = 10.0
    "Polyak (EMA) averaging horizon in epochs; 0 disables (section 5.2: ~10)"
    grad_clip: float = 0.0
    "clip the gradient norm to this value; 0 disables"
    data_dependent_init: bool = True
    "run section 3's init before training (DRAW keeps its usual init: see configs/paper/draw_mnist.yaml)"
    init_batch_size: int = 256
    "examples for data-dependent init"
    binarize: str = "dynamic"
    "MNIST only: dynamic (resample Bernoulli pixels every batch) or threshold (> 0.5)"
    eval_samples: int = 1
    "conv_vae only: importance samples for the test bound (1: the ELBO)"
    train_subset: int = 0
    "use only the first N training images (0: all)"
    test_subset: int = 0
    "use only the first N test images (0: all)"
    data_dir: str = "data/mnist"
    "directory holding the dataset files"
    download: bool = False
    "download and checksum-verify the official files into data_dir if missing"
    seed: int = 1
    "seed of the initial weights, the minibatch order and the latent noise"
    device: str = "auto"
    "auto, cpu, cuda, ..."
    log_dir: str = "runs/paper"
    "TensorBoard root; empty string disables"
    checkpoint_dir: str = "checkpoints/paper"
    "final (Polyak-averaged) model and curves; empty string disables"
    checkpoint_every_epochs: int = 1
    "write a resumable checkpoint to checkpoint_dir/<run name>/ every N epochs (and at the end)"
    conv_vae: ConvVAESettings = field(default_factory=ConvVAESettings)
    "sizes of the conv VAE"
    resnet_vae: ResNetVAESettings = field(default_factory=ResNetVAESettings)
    "sizes of the ResNet VAE"
    draw: DRAWSettings = field(default_factory=DRAWSettings)
    "sizes of DRAW"

    def __post_init__(self) -> None:
        check(self.model in MODELS, "model", self.model, f"one of {MODELS}")
        check(self.dataset in DATASETS, "dataset", self.dataset, f"one of {DATASETS}")
        check(
            self.parameterization in PARAMETERIZATIONS,
            "parameterization",
            self.parameterization,
            f"one of {sorted(PARAMETERIZATIONS)}",
        )
        check(self.optimizer in ("adam", "adamax"), "optimizer", self.optimizer, "adam or adamax")
        check(self.lr > 0, "lr", self.lr, "a positive learning rate")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", (self.beta1, self.beta2), "values in [0, 1)")
        check(self.epochs >= 1 and self.batch_size >= 1, "epochs/batch_size", (self.epochs, self.batch_size), ">= 1")
        check(
            self.polyak_epochs >= 0 and self.grad_clip >= 0,
            "polyak_epochs/grad_clip",
            (self.polyak_epochs, self.grad_clip),
            "non-negative numbers",
        )
        check(self.checkpoint_every_epochs >= 1, "checkpoint_every_epochs", self.checkpoint_every_epochs, ">= 1")
        check(self.init_batch_size >= 2, "init_batch_size", self.init_batch_size, "at least 2")
        check(self.binarize in ("dynamic", "threshold"), "binarize", self.binarize, "dynamic or threshold")
        check(self.eval_samples >= 1, "eval_samples", self.eval_samples, "at least 1")
        check(
            self.conv_vae.posterior in POSTERIORS, "conv_vae.posterior", self.conv_vae.posterior, f"one of {POSTERIORS}"
        )
        check(self.resnet_vae.free_bits >= 0, "resnet_vae.free_bits", self.resnet_vae.free_bits, ">= 0")
        expected = "cifar10" if self.model == "resnet_vae" else "mnist"
        check(
            self.dataset == expected,
            "dataset",
            self.dataset,
            f"{expected} for model={self.model} (Bernoulli models need binary MNIST, the discretized logistic "
            "needs 8-bit images)",
        )


@dataclass
class GenerativeResult:
    """Per-epoch curves (nats per image; bits per dimension for convenience)."""

    train_elbo: list[float] = field(default_factory=list)
    test_bound: list[float] = field(default_factory=list)
    test_bits_per_dim: list[float] = field(default_factory=list)
    seconds_per_step: list[float] = field(default_factory=list)
    checkpoint: str | None = None


def free_bits_kl(kl: Tensor, minimum: Tensor | float) -> Tensor:
    """Free bits (Kingma et al. 2016, eq. 15): sum over layers of max(batch-mean KL_l, minimum_l).

    ``kl`` is ``(N, layers)``; the result is a scalar to add to the negative log-likelihood.
    """
    return torch.maximum(kl.mean(dim=0), torch.as_tensor(minimum, dtype=kl.dtype, device=kl.device)).sum()


def build_generative_model(config: GenerativeConfig, image_shape: tuple[int, int, int]) -> nn.Module:
    """The model named by ``config.model`` for images of ``image_shape`` = (C, H, W)."""
    channels, height, width = image_shape
    if config.model == "conv_vae":
        s = config.conv_vae
        return ConvVAE(
            config.parameterization,
            image_size=height,
            in_channels=channels,
            widths=s.widths,
            blocks_per_stage=s.blocks_per_stage,
            dense=s.dense,
            z_dim=s.z_dim,
            posterior=s.posterior,
            iaf_steps=s.iaf_steps,
            iaf_hidden=s.iaf_hidden,
            context_dim=s.context_dim,
        )
    if config.model == "resnet_vae":
        s = config.resnet_vae
        return ResNetVAE(
            config.parameterization,
            image_size=height,
            in_channels=channels,
            hidden=s.hidden,
            z_channels=s.z_channels,
            context=s.context,
            stages=s.stages,
            iaf_steps=s.iaf_steps,
        )
    s = config.draw
    return DRAW(
        config.parameterization,
        image_size=(height, width),
        steps=s.steps,
        read_n=s.read_n,
        write_n=s.write_n,
        enc_hidden=s.enc_hidden,
        dec_hidden=s.dec_hidden,
        z_dim=s.z_dim,
    )


def load_generative_data(config: GenerativeConfig) -> tuple[Tensor, Tensor]:
    """``(train, test)`` images as float tensors: MNIST intensities in [0, 1] (binarized per batch
    later), CIFAR-10 levels mapped to [-1, 1] as ``2 k / 255 - 1``."""
    if config.dataset == "mnist":
        train = load_mnist(config.data_dir, "train", download=config.download).images
        test = load_mnist(config.data_dir, "test").images
        scale = to_unit_interval
    else:
        train = load_cifar10(config.data_dir, "train", download=config.download).images
        test = load_cifar10(config.data_dir, "test").images
        scale = lambda x: x.float() * (2.0 / 255.0) - 1.0  # noqa: E731
    train, test = scale(torch.from_numpy(train)), scale(torch.from_numpy(test))
    if config.train_subset:
        train = train[: config.train_subset]
    if config.test_subset:
        test = test[: config.test_subset]
    return train, test


def _objective(model: nn.Module, x: Tensor, config: GenerativeConfig) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(loss, elbo, kl_per_layer)`` for one minibatch; the loss is the negative ELBO per image
    (with free bits for the ResNet VAE when set)."""
    if isinstance(model, (ResNetVAE, DRAW)):
        log_px_z, kl = model.elbo_terms(x)
        elbo = log_px_z - kl.sum(dim=1)
        if isinstance(model, ResNetVAE) and config.resnet_vae.free_bits > 0:
            units = kl.new_tensor(model.latent_units)
            return -(log_px_z.mean() - free_bits_kl(kl, config.resnet_vae.free_bits * units)), elbo, kl
        return -elbo.mean(), elbo, kl
    elbo = model.elbo(x)
    return -elbo.mean(), elbo, None


@torch.no_grad()
def evaluate_bound(model: nn.Module, images: Tensor, config: GenerativeConfig, generator: torch.Generator) -> float:
    """Mean test bound in nats per image (ELBO, or the importance-weighted bound for ``eval_samples`` > 1)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images = _prepare(images, config, generator, train=False)  # the whole set at once: one fixed binarization
    total = 0.0
    for start in range(0, len(images), config.batch_size):
        x = images[start : start + config.batch_size].to(device)
        if isinstance(model, ConvVAE) and config.eval_samples > 1:
            total += float(model.importance_weighted_bound(x, config.eval_samples).sum())
        else:
            total += float(model.elbo(x).sum())
    model.train(was_training)
    return total / max(len(images), 1)


def _prepare(x: Tensor, config: GenerativeConfig, generator: torch.Generator, train: bool) -> Tensor:
    if config.dataset != "mnist":
        return x
    if train:
        return binarize(x, config.binarize, generator)
    return binarize(x, config.binarize, torch.Generator().manual_seed(12345))  # a fixed binarization of the test set


def _step(model, optimizer, x: Tensor, config: GenerativeConfig) -> tuple[float, Tensor | None]:
    loss, elbo, kl = _objective(model, x, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return float(elbo.detach().mean()), None if kl is None else kl.detach().mean(dim=0)


def _train_epoch(model, optimizer, train: Tensor, config: GenerativeConfig, state: LoopState, progress):
    """The minibatches of one pass over ``train`` from ``progress`` on: ``(mean train ELBO, mean KL per
    layer or None, seconds per step)``, or ``None`` when a signal stopped it after a minibatch."""
    device = next(model.parameters()).device
    model.train()
    sums = progress.sums
    if not sums:
        sums.update(elbo=0.0, kl=None)
    start = time.perf_counter()
    for step, idx in progress.batches(config.batch_size):
        x = _prepare(train[idx], config, state.generator, True).to(device)
        elbo, kl = _step(model, optimizer, x, config)
        if not math.isfinite(elbo):
            return elbo, None, float("nan")
        sums["elbo"] += elbo
        # a resumed run's sums come from a checkpoint loaded on the CPU: the per-layer KL sum joins the device's
        sums["kl"] = kl if sums["kl"] is None else sums["kl"].to(kl.device) + kl
        if state.polyak is not None:
            state.polyak.update(model)
        progress.step = step + 1
        if state.run.stop_signal is not None and progress.step < state.steps_per_epoch:
            progress.seconds += time.perf_counter() - start
            return None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    steps = progress.step
    seconds = (progress.seconds + time.perf_counter() - start) / steps
    return sums["elbo"] / steps, None if sums["kl"] is None else sums["kl"] / steps, seconds


def train_generative(
    config: GenerativeConfig, *, data: tuple[Tensor, Tensor] | None = None, quiet: bool = False, force: bool = False
):
    """Train ``config.model``; returns a :class:`GenerativeResult` with the per-epoch curves.

    With ``checkpoint_dir`` set, a checkpoint every ``checkpoint_every_epochs`` epochs lets a rerun of the
    same config continue exactly where the newest one stopped (:mod:`wn_rl.models.resume`); SIGINT/SIGTERM
    finish the minibatch, checkpoint and raise :class:`~wn_rl.models.resume.TrainingInterrupted`. ``force``
    resumes even if the config differs from the saved one in keys outside ``SAFE_TO_CHANGE``.
    """
    device = resolve_device(config.device)
    # the run folder's lock (wn_rl.run_lock) is held from its resume or claim until the final checkpoint
    with ResumableRun(config, f"{config.model}_{config.dataset}", SAFE_TO_CHANGE, force=force) as run:
        torch.manual_seed(config.seed)
        train, test = data if data is not None else load_generative_data(config)
        run.begin()
        if len(train) < config.batch_size:
            raise ValueError(f"{len(train)} training images are fewer than batch_size={config.batch_size}")
        model = build_generative_model(config, tuple(train.shape[1:])).to(device)
        generator = torch.Generator().manual_seed(config.seed)
        if config.data_dependent_init and run.state is None:
            init_idx = torch.randperm(len(train), generator=generator)[: config.init_batch_size]
            data_dependent_init(model, _prepare(train[init_idx], config, generator, True).to(device))
        optimizer_cls = torch.optim.Adamax if config.optimizer == "adamax" else torch.optim.Adam
        optimizer = optimizer_cls(model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2))
        steps_per_epoch = max(1, len(train) // config.batch_size)
        polyak = None
        if config.polyak_epochs > 0:
            polyak = PolyakAverage(model, PolyakAverage.decay_for(steps_per_epoch, config.polyak_epochs))
        state = LoopState(config, run, model, optimizer, generator, GenerativeResult(), steps_per_epoch, polyak)
        start, progress = run.restore(state.restore) if run.state is not None else (0, None)
        for group in optimizer.param_groups:  # a resume forced past the config check uses the new values
            group["lr"], group["betas"] = config.lr, (config.beta1, config.beta2)
        writer = open_writer(config.log_dir, run.name, config, run.purge_step) if config.log_dir else None
        try:
            with run.stop_on_signals():
                _epochs(state, train, test, writer, start, progress, quiet)
        finally:
            if writer is not None:
                writer.close()
        run.save_final(polyak.model if polyak else model, state.result)
    return state.result


def _epochs(state: LoopState, train: Tensor, test: Tensor, writer, start: int, progress, quiet: bool) -> None:
    config, run, result, name = state.config, state.run, state.result, state.run.name
    dims = math.prod(train.shape[1:])
    for epoch in range(start + 1, config.epochs + 1):
        progress = progress or EpochProgress.start(len(train), state.generator)
        epoch_stats = _train_epoch(state.model, state.optimizer, train, config, state, progress)
        if epoch_stats is None:  # stopped by a signal inside the epoch (the ELBO so far is finite)
            raise run.interrupt(state.save(epoch - 1, progress))
        progress = None
        elbo, kl, seconds_per_step = epoch_stats
        if not math.isfinite(elbo):
            raise FloatingPointError(f"{name}: the ELBO became {elbo} in epoch {epoch}; lower lr or set grad_clip")
        eval_model = state.polyak.model if state.polyak is not None else state.model
        test_bound = evaluate_bound(eval_model, test, config, state.generator)
        result.train_elbo.append(elbo)
        result.test_bound.append(test_bound)
        result.test_bits_per_dim.append(-test_bound / (dims * math.log(2)))
        result.seconds_per_step.append(seconds_per_step)
        if writer is not None:
            _log_epoch(writer, state.model, result, kl, epoch)
        if not quiet:
            print(
                f"[{name}] epoch {epoch}/{config.epochs} train ELBO {result.train_elbo[-1]:.2f} test bound "
                f"{test_bound:.2f} nats ({result.test_bits_per_dim[-1]:.4f} bits/dim) "
                f"{seconds_per_step * 1e3:.1f} ms/step",
                flush=True,
            )
        path = None
        if epoch % config.checkpoint_every_epochs == 0 or run.stop_signal is not None:
            path = state.save(epoch)
        if run.stop_signal is not None:
            raise run.interrupt(path)
    state.save(max(start, config.epochs))


def _log_epoch(writer, model: nn.Module, result: GenerativeResult, kl: Tensor | None, epoch: int) -> None:
    writer.add_scalar("train/elbo", result.train_elbo[-1], epoch)
    writer.add_scalar("test/elbo_bound", result.test_bound[-1], epoch)
    writer.add_scalar("test/bits_per_dim", result.test_bits_per_dim[-1], epoch)
    writer.add_scalar("perf/seconds_per_step", result.seconds_per_step[-1], epoch)
    if kl is not None:
        for i, value in enumerate(kl.tolist()):
            writer.add_scalar(f"kl/layer_{i}", value, epoch)
    for tag, value in wn_stats(model).items():
        writer.add_scalar(tag, value, epoch)
