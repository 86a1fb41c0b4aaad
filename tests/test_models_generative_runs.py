"""The generative experiment (wn_rl.models.generative_experiment) around the models: its config checks, the
test bound on a fixed binarization, ``train_vae.py`` and ``train_draw.py`` end to end, and resuming: a full disk
stops the script cleanly and the rerun resumes; SIGINT then a rerun is bit-identical to a straight run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from generative_helpers import binary_images as _binary_images  # tests/generative_helpers.py

from wn_rl.config import ConfigError, load_config
from wn_rl.models.generative_experiment import GenerativeConfig, evaluate_bound

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


REPO = Path(__file__).resolve().parents[1]


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
    # one point per epoch (sorted: TensorBoard reads a run's event files in name order, and a process's writers are
    # numbered without padding, so its 10th file sorts before its 9th)
    assert sorted(_tb_steps(tmp_path / "extended" / "runs", "test/elbo_bound")) == [1, 2, 3]

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
