"""The generative models of sections 5.2-5.3: each trains in every parameterization; the ELBO is
finite and, averaged over many samples, a lower bound on the exact log-likelihood of models small
enough to integrate numerically; DRAW computes its weights once per sequence; the scripts run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wn_rl
from wn_rl.config import ConfigError, load_config
from wn_rl.models.cifar_vae import ResNetVAE
from wn_rl.models.comparison import FIVE
from wn_rl.models.distributions import (
    bernoulli_log_likelihood,
    discretized_logistic_log_likelihood,
    gaussian_kl_standard_normal,
    log_normal,
)
from wn_rl.models.draw import DRAW, filterbank
from wn_rl.models.generative_experiment import GenerativeConfig, evaluate_bound, free_bits_kl
from wn_rl.models.training import PolyakAverage
from wn_rl.models.vae import ConvVAE

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


REPO = Path(__file__).resolve().parents[1]


def _tiny_vae(parameterization: str, posterior: str, z_dim: int = 4) -> ConvVAE:
    return ConvVAE(
        parameterization,
        image_size=8,
        widths=(4, 8, 8),
        blocks_per_stage=1,
        dense=16,
        z_dim=z_dim,
        posterior=posterior,
        iaf_hidden=(16,),
        context_dim=4,
    )


def _tiny_draw(parameterization: str, steps: int = 3, z_dim: int = 2) -> DRAW:
    return DRAW(
        parameterization, image_size=(6, 6), steps=steps, read_n=2, write_n=3, enc_hidden=8, dec_hidden=8, z_dim=z_dim
    )


def _binary_images(n: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    templates = (torch.rand(3, 1, size, size, generator=generator) > 0.5).float()
    flips = (torch.rand(n, 1, size, size, generator=generator) < 0.05).float()
    return (templates[torch.arange(n) % 3] - flips).abs()


def _mean_elbo(model: torch.nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    torch.manual_seed(123)
    with torch.no_grad():
        return float(model.elbo(x.repeat(repeats, *([1] * (x.dim() - 1)))).mean())


def _trains(model: torch.nn.Module, x: torch.Tensor, lr: float, steps: int) -> tuple[float, float]:
    before = _mean_elbo(model, x)
    optimizer = torch.optim.Adamax(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = -model.elbo(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, _mean_elbo(model, x)


@pytest.mark.parametrize("posterior", ["diagonal", "iaf"])
@pytest.mark.parametrize("parameterization", FIVE)
def test_conv_vae_trains_in_every_parameterization(parameterization, posterior):
    torch.manual_seed(0)
    x = _binary_images(48, 8, seed=1)
    model = _tiny_vae(parameterization, posterior)
    wn_rl.data_dependent_init(model, x)
    before, after = _trains(model, x, lr=0.01, steps=15)
    assert math.isfinite(after) and after > before + 2.0, (before, after)  # nats per 8x8 image


def _quadrature_log_px(log_px_given_z, limit: float = 6.0, points: int = 101) -> torch.Tensor:
    """log p(x) = log int N(z; 0, I) p(x|z) dz for a 2-D latent, by a Riemann sum on a grid (float64).
    (On these models 161 points instead of 101 change the result by < 1e-4 nats.)"""
    grid = torch.linspace(-limit, limit, points, dtype=torch.float64)
    z = torch.cartesian_prod(grid, grid)
    log_prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(dim=1)
    return torch.logsumexp(log_px_given_z(z) + log_prior[:, None], dim=0) + 2 * math.log(float(grid[1] - grid[0]))


def _log_px_given_z(decode, x: torch.Tensor):
    def fn(z: torch.Tensor) -> torch.Tensor:
        logits = decode(z)
        return torch.stack(
            [bernoulli_log_likelihood(xi.expand_as(logits), logits).flatten(1).sum(dim=1) for xi in x], dim=1
        )

    return fn


@pytest.mark.parametrize("posterior", ["diagonal", "iaf"])
def test_vae_elbo_is_a_lower_bound_on_the_exact_log_likelihood(posterior):
    """With z in 2-D, log p(x) is computed by quadrature. Tolerances: the mean ELBO over 10,000
    posterior samples must not exceed log p(x) by more than 3 standard errors, and the
    importance-weighted estimate from the same samples must match log p(x) within 0.25 nats, which
    checks that log q (with the IAF log-determinant) and log p are normalised correctly. (After a
    few training steps the weights are heavy-tailed: 5,000-sample estimates scatter by ~0.3 nats
    around log p(x), 50,000-sample ones land within 0.08.)"""
    torch.manual_seed(0)
    data = torch.bernoulli(torch.rand(64, 1, 8, 8), generator=torch.Generator().manual_seed(2)).double()
    model = _tiny_vae("weight_norm", posterior, z_dim=2).double()
    wn_rl.data_dependent_init(model, data)
    _trains(model, data, lr=2e-3, steps=20)
    model.eval()
    x = data[:3]
    with torch.no_grad():
        log_px = _quadrature_log_px(_log_px_given_z(model.decode, x))
        log_w = model.log_weights(x, 10_000)
    elbo, standard_error = log_w.mean(dim=0), log_w.std(dim=0) / math.sqrt(10_000)
    assert torch.isfinite(log_w).all()
    assert torch.all(elbo <= log_px + 3 * standard_error), (elbo, log_px)
    importance_weighted = torch.logsumexp(log_w, dim=0) - math.log(10_000)
    torch.testing.assert_close(importance_weighted, log_px, atol=0.25, rtol=0)
    decoded, decode = [], model.decode  # the bound in chunks: never more than max_images decoded at once
    model.decode = lambda z: decoded.append(len(z)) or decode(z)
    with torch.no_grad():
        chunked = model.importance_weighted_bound(x, 10_000, max_images=3_000)
    assert max(decoded) == 3_000 and sum(decoded) == 30_000
    torch.testing.assert_close(chunked, log_px, atol=0.25, rtol=0)


@pytest.mark.parametrize("parameterization", FIVE)
def test_resnet_vae_trains_in_every_parameterization(parameterization):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (2, 3, 8, 8), generator=generator).repeat(12, 1, 1, 1)
    x = levels.float() * 2 / 255 - 1
    model = ResNetVAE(parameterization, image_size=8, hidden=8, z_channels=2, context=4, stages=(1, 1))
    wn_rl.data_dependent_init(model, x)
    before, after = _trains(model, x, lr=0.01, steps=15)
    assert math.isfinite(after) and after > before + 10.0, (before, after)
    assert model.bits_per_dim(torch.tensor([after])).item() < model.bits_per_dim(torch.tensor([before])).item()
    assert model.sample(2).shape == (2, 3, 8, 8)
    assert model.latent_units == [2 * 4 * 4, 2 * 2 * 2]


@pytest.mark.parametrize("parameterization", FIVE)
def test_draw_trains_in_every_parameterization(parameterization):
    torch.manual_seed(0)
    x = _binary_images(32, 6, seed=3)
    model = _tiny_draw(parameterization)
    before, after = _trains(model, x, lr=0.02, steps=20)
    assert math.isfinite(after) and after > before + 2.0, (before, after)
    expected = wn_rl.WNLSTMCell if parameterization.startswith("weight_norm") else torch.nn.LSTMCell
    assert isinstance(model.encoder, expected) and isinstance(model.decoder, expected)


@pytest.mark.parametrize("parameterization", ["normal", "weight_norm"])
def test_draw_elbo_is_a_lower_bound_on_the_exact_log_likelihood(parameterization):
    """T = 2 steps of a 1-D latent: log p(x) by quadrature over (z_1, z_2) through the generative
    path ``decode``; the mean ELBO over 2000 samples must not exceed it by more than 3 standard errors."""
    torch.manual_seed(0)
    data = _binary_images(64, 6, seed=4).double()
    model = _tiny_draw(parameterization, steps=2, z_dim=1).double()
    _trains(model, data, lr=0.01, steps=20)
    x = data[:3]
    with torch.no_grad():
        log_px = _quadrature_log_px(_log_px_given_z(lambda z: model.decode(z[:, :, None]), x))
        elbo = model.elbo(x.repeat(2000, 1, 1, 1)).view(2000, 3)
    mean, standard_error = elbo.mean(dim=0), elbo.std(dim=0) / math.sqrt(2000)
    assert torch.isfinite(elbo).all()
    assert torch.all(mean <= log_px + 3 * standard_error), (mean, log_px)


def test_draw_lstms_follow_the_parameterizations_exp_scale():
    model = _tiny_draw(wn_rl.Parameterization.get("weight_norm", scale="exp"))
    assert model.encoder.scale == model.decoder.scale == "exp"
    model.elbo(_binary_images(4, 6, seed=0)).sum().backward()
    assert model.encoder.s_ih.grad.abs().sum() > 0 and model.decoder.s_hh.grad.abs().sum() > 0


def test_draw_computes_effective_weights_once_per_sequence(monkeypatch):
    model = _tiny_draw("weight_norm", steps=5)
    calls = {"lstm": 0, "linear": 0}
    lstm_compute, linear_compute = wn_rl.WNLSTMCell.compute_weights, wn_rl.WNLinear.compute_weight

    def counting_lstm(self):
        calls["lstm"] += 1
        return lstm_compute(self)

    def counting_linear(self):
        calls["linear"] += 1
        return linear_compute(self)

    monkeypatch.setattr(wn_rl.WNLSTMCell, "compute_weights", counting_lstm)
    monkeypatch.setattr(wn_rl.WNLinear, "compute_weight", counting_linear)
    model.elbo(_binary_images(4, 6, seed=0)).sum().backward()
    assert calls == {"lstm": 2, "linear": 4}  # 2 cells and 4 linear layers, not 5 times as many
    assert model.encoder.g_ih.grad is not None and model.write_patch.v.grad is not None


def test_filterbank_rows_are_normalised_gaussians_on_a_grid():
    f = filterbank(torch.tensor([4.0]), torch.tensor([2.0]), torch.tensor([0.5]), n=3, size=9)
    torch.testing.assert_close(f.sum(dim=2), torch.ones(1, 3))
    assert f[0].argmax(dim=1).tolist() == [2, 4, 6]  # centres at g + (i - n/2 - 1/2) delta


def test_discretized_logistic_is_a_distribution_over_256_levels():
    levels = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1
    for mean, log_scale in [(0.0, -3.0), (0.9, -6.0), (-1.4, -1.0), (0.2, 2.0), (0.3, -9.0)]:
        log_p = discretized_logistic_log_likelihood(
            levels, torch.tensor(mean).double(), torch.tensor(log_scale).double()
        )
        assert torch.isfinite(log_p).all()
        assert abs(float(log_p.exp().sum()) - 1.0) < 1e-4
    mean = torch.zeros(256, requires_grad=True)
    discretized_logistic_log_likelihood(levels.float(), mean, torch.full((256,), -8.0)).sum().backward()
    assert torch.isfinite(mean.grad).all()


def test_gaussian_formulas_agree_with_torch_distributions():
    mean, logsd, x = torch.randn(5), torch.randn(5), torch.randn(5)
    normal = torch.distributions.Normal(mean, logsd.exp())
    torch.testing.assert_close(log_normal(x, mean, logsd), normal.log_prob(x))
    standard = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    torch.testing.assert_close(
        gaussian_kl_standard_normal(mean, logsd), torch.distributions.kl_divergence(normal, standard)
    )


def test_free_bits_and_polyak_average():
    kl = torch.tensor([[0.1, 3.0], [0.3, 5.0]])
    assert float(free_bits_kl(kl, torch.tensor([1.0, 1.0]))) == pytest.approx(1.0 + 4.0)
    model = torch.nn.Linear(2, 1)
    average = PolyakAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)
    torch.testing.assert_close(average.model.weight, start + 0.1)
    assert PolyakAverage.decay_for(600, 10) == pytest.approx(1 - 1 / 6000)


class _RecordingModel(torch.nn.Module):
    """Stands in for a VAE in ``evaluate_bound``: its "ELBO" is the image itself, so the bound is the mean
    binarized pixel sum, and it records the binarized batches it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))
        self.batches: list[torch.Tensor] = []

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x)
        return x.flatten(1).sum(dim=1)


def test_test_set_is_binarized_once_independently_of_the_batch_size():
    images = torch.full((40, 1, 8, 8), 0.5)  # 40 identical grey images: only the binarization tells them apart
    bounds, binarized = [], []
    for batch_size in (10, 20):
        model = _RecordingModel()
        config = load_config(GenerativeConfig, data={"batch_size": batch_size})
        bounds.append(evaluate_bound(model, images, config, torch.Generator()))
        binarized.append(torch.cat(model.batches))
    torch.testing.assert_close(binarized[0], binarized[1])  # the same fixed binarization for any batch size
    assert bounds[0] == pytest.approx(bounds[1])
    first, second = binarized[0][:10], binarized[0][10:20]
    assert not torch.equal(first, second), "every batch got the same Bernoulli noise"


def test_generative_config_checks_model_and_dataset():
    with pytest.raises(ConfigError, match="cifar10 for model=resnet_vae"):
        load_config(GenerativeConfig, data={"model": "resnet_vae", "dataset": "mnist"})
    with pytest.raises(ConfigError, match=r"conv_vae\.posterior"):
        load_config(GenerativeConfig, data={"conv_vae": {"posterior": "flow"}})
    with pytest.raises(ConfigError, match="did you mean 'z_dim'"):
        load_config(GenerativeConfig, data={"draw": {"zdim": 3}})


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_torch_thread in conftest.py
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _scalar_tags(run_root: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list(run_root.rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def test_train_vae_and_draw_scripts_end_to_end(tmp_path):
    from wn_rl.data.synthetic import write_cifar10, write_mnist

    write_mnist(tmp_path / "mnist", 60, 20, size=8)
    write_cifar10(tmp_path / "cifar", 40, 20)
    common = ["epochs=2", "batch_size=20", "init_batch_size=20", f"checkpoint_dir={tmp_path / 'ck'}"]
    out = _run(
        [
            str(REPO / "scripts/train_vae.py"),
            f"data_dir={tmp_path / 'mnist'}",
            f"log_dir={tmp_path / 'vae'}",
            "conv_vae.widths=[4,8,8]",
            "conv_vae.dense=16",
            "conv_vae.z_dim=4",
            "conv_vae.iaf_hidden=[16]",
            "conv_vae.context_dim=4",
            "eval_samples=5",
            *common,
        ],
        REPO,
    )
    assert "final test bound" in out
    assert {"train/elbo", "test/elbo_bound", "test/bits_per_dim", "perf/seconds_per_step"} <= _scalar_tags(
        tmp_path / "vae"
    )
    out = _run(
        [
            str(REPO / "scripts/train_vae.py"),
            "--config",
            str(REPO / "configs/paper/vae_cifar10.yaml"),
            f"data_dir={tmp_path / 'cifar'}",
            f"log_dir={tmp_path / 'rvae'}",
            "resnet_vae.hidden=8",
            "resnet_vae.z_channels=2",
            "resnet_vae.context=4",
            "resnet_vae.stages=[1,1]",
            *common,
        ],
        REPO,
    )
    assert "bits/dim" in out and "kl/layer_1" in _scalar_tags(tmp_path / "rvae")
    out = _run(
        [
            str(REPO / "scripts/train_draw.py"),
            f"data_dir={tmp_path / 'mnist'}",
            f"log_dir={tmp_path / 'draw'}",
            "draw.steps=3",
            "draw.enc_hidden=8",
            "draw.dec_hidden=8",
            "draw.z_dim=2",
            *common,
        ],
        REPO,
    )
    assert "final test bound" in out and "kl/layer_2" in _scalar_tags(tmp_path / "draw")
    assert len(list((tmp_path / "ck").glob("*.pt"))) == 3
    wrong = subprocess.run(
        [sys.executable, str(REPO / "scripts/train_draw.py"), "--config", str(REPO / "configs/paper/vae_mnist.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode != 0 and "train_vae.py" in wrong.stderr


# ----- resuming (wn_rl.models.resume) ---------------------------------------------------------------


def _tiny_generative(tmp_path: Path, name: str, model: str = "conv_vae", **overrides) -> GenerativeConfig:
    data = {
        "model": model,
        "optimizer": "adamax" if model == "conv_vae" else "adam",
        "epochs": 3,
        "batch_size": 10,
        "init_batch_size": 10,
        "polyak_epochs": 1.0,
        "data_dependent_init": model == "conv_vae",
        "device": "cpu",
        "log_dir": str(tmp_path / name / "runs"),
        "checkpoint_dir": str(tmp_path / name / "ck"),
        "conv_vae": {"widths": [4, 8, 8], "blocks_per_stage": 1, "dense": 16, "z_dim": 4, "iaf_hidden": [16]},
        "draw": {"steps": 3, "read_n": 2, "write_n": 3, "enc_hidden": 8, "dec_hidden": 8, "z_dim": 2},
    }
    data["conv_vae"]["context_dim"] = 4
    return load_config(GenerativeConfig, data={**data, **overrides})


def _sigint_at_step(monkeypatch, step: int) -> None:
    """SIGINT during minibatch number ``step`` (from 0 in this call); the loop must finish it first."""
    import signal

    from wn_rl.models import generative_experiment

    calls = iter(range(10**6))
    original = generative_experiment._step

    def step_then_signal(*args, **kwargs):
        if next(calls) == step:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(generative_experiment, "_step", step_then_signal)


def _last_epoch_checkpoint(checkpoint_dir: str) -> dict:
    from wn_rl.checkpoint import latest_checkpoint

    (folder,) = [p for p in Path(checkpoint_dir).iterdir() if p.is_dir()]
    return torch.load(latest_checkpoint(folder), weights_only=True)


def _assert_equal_tensors(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_equal_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _load(path: str) -> dict:
    return torch.load(path, weights_only=True)


def _tb_steps(log_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = [p for p in log_dir.iterdir() if p.is_dir()]
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


@pytest.mark.parametrize("full_at", ["checkpoint", "events"])
def test_a_full_disk_stops_the_script_with_exit_1_naming_the_file_and_the_rerun_resumes(
    tmp_path, monkeypatch, capsys, full_at
):
    # found on a real tmpfs (docs/full_disk.md): a full disk ended train_vae.py with tracebacks (TensorBoard's
    # writer thread and the main thread; a full event file was named nowhere)
    import errno
    import runpy
    import threading

    from tensorboard.compat.tensorflow_stub.io import gfile

    from wn_rl import checkpoint
    from wn_rl.data.synthetic import write_mnist

    write_mnist(tmp_path / "mnist", 60, 20, size=8)
    argv = [
        str(REPO / "scripts/train_vae.py"),
        *("epochs=3", "batch_size=20", "init_batch_size=20", "device=cpu", "conv_vae.widths=[4,8,8]"),
        *("conv_vae.dense=16", "conv_vae.z_dim=4", "conv_vae.iaf_hidden=[16]", "conv_vae.context_dim=4"),
        f"data_dir={tmp_path / 'mnist'}",
        f"log_dir={tmp_path / 'runs'}",
        f"checkpoint_dir={tmp_path / 'ck'}",
    ]

    def disk_full() -> bool:  # after the first epoch checkpoint
        return any((tmp_path / "ck").rglob("checkpoint_*.complete.json"))

    real_save, real_append = checkpoint.torch.save, gfile.LocalFileSystem.append

    def save(obj, f):
        if full_at == "checkpoint" and disk_full():
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    def append(self, filename, file_content, binary_mode=False):
        if full_at == "events" and disk_full():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_append(self, filename, file_content, binary_mode)

    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", argv)
        patch.setattr(checkpoint.torch, "save", save)
        patch.setattr(gfile.LocalFileSystem, "append", append)
        thread_errors = []
        patch.setattr(threading, "excepthook", thread_errors.append)
        with pytest.raises(SystemExit) as stopped:
            runpy.run_path(argv[0], run_name="__main__")
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and thread_errors == [] and "Traceback" not in err
    expected = "checkpoint_0000000006.pt" if full_at == "checkpoint" else str(tmp_path / "runs")
    assert err.startswith("error: could not write") and expected in err and "No space left on device" in err
    (folder,) = (tmp_path / "ck").iterdir()
    assert [p.name for p in checkpoint.complete_checkpoints(folder)] == ["checkpoint_0000000003.pt"]
    assert checkpoint.load_checkpoint(folder / "checkpoint_0000000003.pt")["epoch"] == 1

    monkeypatch.setattr(sys, "argv", argv)  # space freed: the same command resumes and finishes
    runpy.run_path(argv[0], run_name="__main__")
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint_0000000003.pt (epoch 1 done)" in out and "final test bound" in out
    assert _tb_steps(tmp_path / "runs", "test/elbo_bound") == [1, 2, 3]


@pytest.mark.parametrize("model", ["conv_vae", "draw"])
def test_sigint_mid_epoch_then_rerun_is_bit_identical_to_a_straight_run(tmp_path, monkeypatch, model):
    from wn_rl.models.generative_experiment import train_generative
    from wn_rl.models.resume import TrainingInterrupted

    images = _binary_images(50, 8 if model == "conv_vae" else 6, seed=0)
    data = (images[:40], images[40:])
    straight = train_generative(_tiny_generative(tmp_path, "straight", model), data=data, quiet=True)
    config = _tiny_generative(tmp_path, "resumed", model)
    with monkeypatch.context() as patch:
        _sigint_at_step(patch, 5)  # epoch 2 (4 minibatches each), its second minibatch
        with pytest.raises(TrainingInterrupted) as stopped:
            train_generative(config, data=data, quiet=True)
    assert stopped.value.code == 130 and stopped.value.checkpoint.name == "checkpoint_0000000006.pt"
    resumed = train_generative(config, data=data, quiet=True)
    for curve in ("train_elbo", "test_bound", "test_bits_per_dim"):
        assert getattr(resumed, curve) == getattr(straight, curve)
    ours = _last_epoch_checkpoint(config.checkpoint_dir)
    theirs = _last_epoch_checkpoint(str(tmp_path / "straight" / "ck"))
    for key in ("model", "polyak", "optimizer", "rng"):
        _assert_equal_tensors(ours[key], theirs[key], key)
    _assert_equal_tensors(_load(resumed.checkpoint)["model"], _load(straight.checkpoint)["model"])
    # one point per epoch (sorted: both processes here share a pid and may share a second, so TensorBoard's
    # file order, by name, is not the order they were written in)
    assert sorted(_tb_steps(tmp_path / "resumed" / "runs", "train/elbo")) == [1, 2, 3]


def test_a_longer_epoch_budget_continues_a_finished_run_other_changes_are_refused(tmp_path, monkeypatch):
    from wn_rl.models.generative_experiment import train_generative
    from wn_rl.models.resume import TrainingInterrupted

    images = _binary_images(50, 8, seed=1)
    data = (images[:40], images[40:])
    straight = train_generative(_tiny_generative(tmp_path, "straight"), data=data, quiet=True)
    short = train_generative(_tiny_generative(tmp_path, "extended", epochs=2), data=data, quiet=True)
    extended = train_generative(_tiny_generative(tmp_path, "extended"), data=data, quiet=True)  # epochs=3
    assert extended.checkpoint == short.checkpoint and extended.test_bound == straight.test_bound
    _assert_equal_tensors(_load(extended.checkpoint)["model"], _load(straight.checkpoint)["model"])
    assert _tb_steps(tmp_path / "extended" / "runs", "test/elbo_bound") == [1, 2, 3]

    config = _tiny_generative(tmp_path, "changed", log_dir="")
    with monkeypatch.context() as patch:
        _sigint_at_step(patch, 1)
        with pytest.raises(TrainingInterrupted):
            train_generative(config, data=data, quiet=True)
    changed = _tiny_generative(tmp_path, "changed", log_dir="", conv_vae={"z_dim": 2}, beta1=0.5)
    with pytest.raises(ConfigError, match=r"(?s)beta1: 0\.9 -> 0\.5.*conv_vae\.z_dim: 4 -> 2.*--force"):
        train_generative(changed, data=data, quiet=True)
    from wn_rl.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does not fit this run's config"):  # forced, but the sizes differ
        train_generative(changed, data=data, quiet=True, force=True)
