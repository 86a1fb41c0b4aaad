"""The Table 1 network: layer shapes, parameter count, identical starts across parameterizations,
training in every parameterization, section 5.1's schedule and the scripts end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import wn_rl
from wn_rl.config import ConfigError, load_config
from wn_rl.models.cifar import cifar_network, cifar_schedule
from wn_rl.models.cifar_experiment import CifarConfig
from wn_rl.models.comparison import FIVE, CompareConfig
from wn_rl.models.training import copy_directions

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


REPO = Path(__file__).resolve().parents[1]


def _output_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
        for m in model
        if isinstance(m, (nn.LeakyReLU, nn.MaxPool2d, nn.Flatten)) or m is model[-1]
    ]
    model.eval()
    model(x)
    for hook in hooks:
        hook.remove()
    return shapes


@pytest.mark.parametrize("parameterization", FIVE)
def test_table1_layer_shapes(parameterization):
    shapes = _output_shapes(cifar_network(parameterization), torch.zeros(2, 3, 32, 32))
    expected = [(96, 32, 32)] * 3 + [(96, 16, 16)] + [(192, 16, 16)] * 3 + [(192, 8, 8)]
    expected += [(192, 6, 6)] * 3 + [(192,), (10,)]
    assert shapes == expected


def _table1_parameter_count(weight_norm: bool, norm: str | None) -> int:
    convs = [(3, 96, 3), (96, 96, 3), (96, 96, 3), (96, 192, 3), (192, 192, 3), (192, 192, 3)]
    convs += [(192, 192, 3), (192, 192, 1), (192, 192, 1)]
    total = sum(n_in * n_out * k * k for n_in, n_out, k in convs) + 192 * 10 + 10  # weights, dense bias
    units = sum(n_out for _, n_out, _ in convs)
    total += {None: units, "batch_norm": 2 * units, "mean_only_bn": units}[norm]  # conv bias or norm affine
    if weight_norm:
        total += units + 10  # one g per output unit, the dense head included
    return total


@pytest.mark.parametrize("parameterization", FIVE)
def test_table1_parameter_count(parameterization):
    p = wn_rl.Parameterization.get(parameterization)
    count = sum(t.numel() for t in cifar_network(parameterization).parameters())
    assert count == _table1_parameter_count(p.weight_norm, p.norm)
    if parameterization == "normal":
        assert count == 1_406_794


def test_all_parameterizations_start_from_the_same_function():
    """Section 5.1: identical initial parameters; after data-dependent init on one batch every
    parameterization computes the same function (eval mode)."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    reference = cifar_network("normal", widths=(8, 16))
    outputs = {}
    for name in FIVE:
        model = cifar_network(name, widths=(8, 16))
        copy_directions(reference, model)
        wn_rl.data_dependent_init(model, x)
        outputs[name] = model.eval()(x)
    for name in FIVE[1:]:
        torch.testing.assert_close(outputs[name], outputs["normal"], atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("parameterization", FIVE)
def test_every_parameterization_trains(parameterization):
    torch.manual_seed(0)
    templates = torch.randn(10, 3, 16, 16)
    y = torch.arange(40) % 10
    x = templates[y] + 0.5 * torch.randn(40, 3, 16, 16)
    # Without dropout and input noise the loss on the batch is deterministic; it is measured in
    # training mode (batch statistics), since a running mean lags far behind after only 20 steps.
    model = cifar_network(parameterization, widths=(8, 16), dropout=0.0, noise_std=0.0)
    wn_rl.data_dependent_init(model, x)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    before = batch_loss()
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = batch_loss()
    assert after < 0.7 * before, (before, after)


def test_schedule_of_section_5_1():
    kwargs = {"lr": 0.003, "epochs": 200, "decay_start": 100, "beta1": 0.9, "beta1_late": 0.5}
    assert cifar_schedule(0, **kwargs) == (0.003, 0.9)
    assert cifar_schedule(99.99, **kwargs) == (0.003, 0.9)
    assert cifar_schedule(100, **kwargs) == (0.003, 0.5)
    lr, beta1 = cifar_schedule(150, **kwargs)
    assert lr == pytest.approx(0.0015) and beta1 == 0.5
    assert cifar_schedule(200, **kwargs)[0] == 0.0


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="parameterization"):
        load_config(CifarConfig, data={"parameterization": "weightnorm"})
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config(CifarConfig, data={"epoch": 3})
    with pytest.raises(ConfigError, match="decay_start"):
        load_config(CifarConfig, data={"epochs": 10, "decay_start": 20})
    with pytest.raises(ConfigError, match="learning_rates"):
        load_config(CompareConfig, data={"learning_rates": {"normal": 0.001}})
    rates = dict.fromkeys(FIVE, 0.003)
    with pytest.raises(ConfigError, match=r"learning_rates=\['weightnorm'\].*keys among"):  # a typo is not ignored
        load_config(CompareConfig, data={"learning_rates": {**rates, "weightnorm": 0.01}})
    with pytest.raises(ConfigError, match="positive numbers"):  # true is not a learning rate of 1.0
        load_config(CompareConfig, data={"learning_rates": {**rates, "normal": True}})


def test_paper_configs_load():
    from wn_rl.models.generative_experiment import GenerativeConfig

    config = load_config(CifarConfig, REPO / "configs/paper/cifar10.yaml")
    assert (config.lr, config.epochs, config.batch_size, config.noise_std) == (0.003, 200, 100, 0.15)
    compare = load_config(CompareConfig, REPO / "configs/paper/compare_parameterizations.yaml")
    assert compare.parameterizations == FIVE and compare.learning_rates["normal"] == 0.0003
    for name in ("vae_mnist", "vae_cifar10", "draw_mnist"):
        assert load_config(GenerativeConfig, REPO / f"configs/paper/{name}.yaml").lr > 0
    listed = {p.name for p in (REPO / "configs/paper").glob("*.yaml")}
    assert listed == {
        "cifar10.yaml",
        "compare_parameterizations.yaml",
        "vae_mnist.yaml",
        "vae_cifar10.yaml",
        "draw_mnist.yaml",
    }


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_torch_thread in conftest.py
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_train_cifar_script_end_to_end(tmp_path):
    from wn_rl.data.synthetic import write_cifar10

    write_cifar10(tmp_path / "data", n_train=60, n_test=20)
    out = _run(
        [
            str(REPO / "scripts/train_cifar.py"),
            "--config",
            str(REPO / "configs/paper/cifar10.yaml"),
            f"data_dir={tmp_path / 'data'}",
            "epochs=2",
            "decay_start=1",
            "widths=[4,8]",
            "batch_size=20",
            "init_batch_size=40",
            "zca=false",
            f"log_dir={tmp_path / 'runs'}",
            f"checkpoint_dir={tmp_path / 'ck'}",
        ],
        tmp_path,
    )
    assert "final test error" in out
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert {"train/error", "test/error", "perf/seconds_per_step"} <= set(accumulator.Tags()["scalars"])
    checkpoint = torch.load(next((tmp_path / "ck").glob("*.pt")), weights_only=False)
    assert checkpoint["config"]["epochs"] == 2 and len(checkpoint["curves"]["test_error"]) == 2
    model = cifar_network("weight_norm", widths=(4, 8))
    model.load_state_dict(checkpoint["model"])
    assert wn_rl.is_initialized(model)


def test_missing_dataset_fails_before_training(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/train_cifar.py"),
            "--config",
            str(REPO / "configs/paper/cifar10.yaml"),
            f"data_dir={tmp_path}",
            "log_dir=",
            "checkpoint_dir=",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr  # one error line: the path it expected and how to get it
    assert done.stderr.startswith("error: CIFAR-10 not found") and str(tmp_path) in done.stderr
    assert "--download" in done.stderr


def test_compare_parameterizations_writes_figure_and_table(tmp_path):
    from wn_rl.data.synthetic import write_cifar10

    write_cifar10(tmp_path / "data", n_train=40, n_test=20)
    out = _run(
        [
            str(REPO / "scripts/compare_parameterizations.py"),
            f"cifar.data_dir={tmp_path / 'data'}",
            "cifar.epochs=1",
            "cifar.decay_start=1",
            "cifar.widths=[4,8]",
            "cifar.batch_size=20",
            "cifar.init_batch_size=40",
            "cifar.zca=false",
            "cifar.log_dir=",
            "cifar.checkpoint_dir=",
            "parameterizations=[normal, weight_norm, weight_norm+mean_only_bn]",
            f"out_dir={tmp_path / 'out'}",
        ],
        REPO,
    )
    assert "| weight_norm+mean_only_bn | 0.003 |" in out
    png = (tmp_path / "out" / "figure1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["results"]) == {"normal", "weight_norm", "weight_norm+mean_only_bn"}


def test_the_default_config_is_found_from_another_folder(tmp_path, monkeypatch, capsys):
    from wn_rl.models.cli import parse_config

    monkeypatch.chdir(tmp_path)  # e.g. python /path/to/wn_rl/scripts/train_cifar.py, run from elsewhere
    config = parse_config(CifarConfig, "configs/paper/cifar10.yaml", "", argv=["epochs=2", "decay_start=1"])
    assert config.epochs == 2 and "epochs: 2" in capsys.readouterr().out


# ----- resuming (wn_rl.models.resume) ---------------------------------------------------------------


def _tiny_cifar(tmp_path: Path, name: str, **overrides) -> CifarConfig:
    data = {
        "epochs": 4,
        "decay_start": 2,
        "widths": [4, 8],
        "batch_size": 10,
        "init_batch_size": 20,
        "device": "cpu",
        "log_dir": str(tmp_path / name / "runs"),
        "checkpoint_dir": str(tmp_path / name / "ck"),
    }
    return load_config(CifarConfig, data={**data, **overrides})


def _tiny_cifar_data():
    from wn_rl.models.cifar_experiment import CifarData

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, 16, 16, generator=generator)
    y = torch.arange(60) % 10
    return CifarData(x[:40], y[:40], x[40:], y[40:])


def _signal_at_steps(monkeypatch, steps: set[int], repeat: int = 1) -> None:
    """Deliver SIGINT ``repeat`` times to this process while the loop computes the schedule of minibatch
    number ``step`` (counted from 0 in this call): the loop must finish that minibatch first."""
    import signal

    from wn_rl.models import cifar_experiment

    calls = iter(range(10**6))
    original = cifar_experiment.cifar_schedule

    def schedule(*args, **kwargs):
        if next(calls) in steps:
            for _ in range(repeat):
                signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(cifar_experiment, "cifar_schedule", schedule)


def _final(result) -> dict:
    return torch.load(result.checkpoint, weights_only=True)


def _scalar_steps(log_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = [p for p in log_dir.iterdir() if p.is_dir()]
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigint_mid_epoch_checkpoints_and_the_rerun_is_bit_identical(tmp_path, monkeypatch):
    from wn_rl.models.cifar_experiment import train_cifar
    from wn_rl.models.resume import TrainingInterrupted

    data = _tiny_cifar_data()
    straight = train_cifar(_tiny_cifar(tmp_path, "straight"), data=data, quiet=True)
    config = _tiny_cifar(tmp_path, "resumed")
    with monkeypatch.context() as patch:
        _signal_at_steps(patch, {6})  # epoch 2 (4 minibatches each), its third minibatch
        with pytest.raises(TrainingInterrupted) as stopped:
            train_cifar(config, data=data, quiet=True)
    assert stopped.value.code == 130 and stopped.value.checkpoint.name == "checkpoint_0000000007.pt"
    resumed = train_cifar(config, data=data, quiet=True)
    assert Path(resumed.checkpoint).parent == Path(config.checkpoint_dir)
    assert Path(resumed.checkpoint).stem == stopped.value.checkpoint.parent.name  # the same run, continued
    _assert_same_state(_final(straight)["model"], _final(resumed)["model"])
    for curve in ("train_error", "train_loss", "test_error"):
        assert getattr(resumed, curve) == getattr(straight, curve)
    # one point per epoch (sorted: TensorBoard orders event files by name, see the next test)
    assert sorted(_scalar_steps(tmp_path / "resumed" / "runs", "train/loss")) == [1, 2, 3, 4]
    # the last epoch checkpoints hold the same optimizer state and generator too
    (folder,) = [p for p in Path(config.checkpoint_dir).iterdir() if p.is_dir()]
    (straight_folder,) = [p for p in (tmp_path / "straight" / "ck").iterdir() if p.is_dir()]
    ours = torch.load(folder / "checkpoint_0000000016.pt", weights_only=True)
    theirs = torch.load(straight_folder / "checkpoint_0000000016.pt", weights_only=True)
    assert torch.equal(ours["rng"]["torch"], theirs["rng"]["torch"])
    assert torch.equal(ours["rng"]["generator"], theirs["rng"]["generator"])
    for i, state in theirs["optimizer"]["state"].items():
        assert torch.equal(ours["optimizer"]["state"][i]["exp_avg_sq"], state["exp_avg_sq"])


def test_a_killed_run_resumes_from_its_newest_complete_checkpoint_without_duplicate_curves(tmp_path):
    from wn_rl.models.cifar_experiment import train_cifar

    data = _tiny_cifar_data()
    config = _tiny_cifar(tmp_path, "killed")
    finished = train_cifar(config, data=data, quiet=True)
    expected = _final(finished)
    # A kill while writing epoch 4's checkpoint: its payload without a marker, a temporary file, no final
    # checkpoint; epoch 4 was already logged to TensorBoard, so the rerun must replace those points.
    final = Path(finished.checkpoint)
    final.unlink()
    final.with_name(final.name + ".complete.json").unlink()
    folder = final.with_suffix("")
    (folder / "checkpoint_0000000016.pt.complete.json").unlink()
    (folder / ".checkpoint_0000000020.pt.tmp-12345").write_bytes(b"partial")
    time.sleep(1.1)  # TensorBoard orders event files by name (unix time, host, pid): a rerun is a new second
    resumed = train_cifar(config, data=data, quiet=True)
    assert resumed.checkpoint == finished.checkpoint
    assert not (folder / ".checkpoint_0000000020.pt.tmp-12345").exists()
    _assert_same_state(expected["model"], _final(resumed)["model"])
    assert expected["curves"]["test_error"] == resumed.test_error
    assert _scalar_steps(tmp_path / "killed" / "runs", "train/loss") == [1, 2, 3, 4]
    assert _scalar_steps(tmp_path / "killed" / "runs", "test/error") == [1, 2, 3, 4]


def test_a_changed_config_is_refused_on_resume_unless_safe_or_forced(tmp_path, monkeypatch):
    from wn_rl.models.cifar_experiment import train_cifar
    from wn_rl.models.resume import TrainingInterrupted

    data = _tiny_cifar_data()
    config = _tiny_cifar(tmp_path, "changed", epochs=2, decay_start=1, log_dir="")
    with monkeypatch.context() as patch:
        _signal_at_steps(patch, {1})
        with pytest.raises(TrainingInterrupted):
            train_cifar(config, data=data, quiet=True)
    changed = _tiny_cifar(tmp_path, "changed", epochs=2, decay_start=1, log_dir="", lr=0.001, dropout=0.25)
    with pytest.raises(
        ConfigError, match=r"(?s)different config:.*dropout: 0\.5 -> 0\.25.*lr: 0\.003 -> 0\.001.*--force"
    ):
        train_cifar(changed, data=data, quiet=True)
    safe = _tiny_cifar(tmp_path, "changed", epochs=2, decay_start=1, log_dir="", checkpoint_every_epochs=2)
    with monkeypatch.context() as patch:
        _signal_at_steps(patch, {0})  # the first minibatch after the resume (the third of epoch 1)
        with pytest.raises(TrainingInterrupted) as stopped:
            train_cifar(safe, data=data, quiet=True)
    assert stopped.value.checkpoint.name == "checkpoint_0000000003.pt"
    result = train_cifar(changed, data=data, quiet=True, force=True)
    assert len(result.test_error) == 2
    assert len([p for p in Path(config.checkpoint_dir).iterdir() if p.is_dir()]) == 1


def test_a_run_that_stopped_before_its_first_checkpoint_does_not_block_a_changed_config(tmp_path):
    """A missing dataset stops a run after its folder and config.yaml were written: nothing to resume, so the
    corrected command with other settings starts a run instead of being refused as a changed config."""
    from wn_rl.data.download import DatasetNotFoundError
    from wn_rl.models.cifar_experiment import train_cifar

    first = _tiny_cifar(tmp_path, "no_data", log_dir="", data_dir=str(tmp_path / "empty"))
    with pytest.raises(DatasetNotFoundError):
        train_cifar(first, quiet=True)
    changed = _tiny_cifar(tmp_path, "no_data", log_dir="", epochs=2, decay_start=1, lr=0.001)
    result = train_cifar(changed, data=_tiny_cifar_data(), quiet=True)
    assert len(result.test_error) == 2 and result.checkpoint is not None


def test_force_never_relabels_a_finished_run(tmp_path):
    """``--force`` with a changed config resumes an unfinished run; a finished one is left alone and a new run
    starts (``--force`` resumed it, rewrote its config.yaml and saved its old weights under the new config)."""
    from wn_rl.models.cifar_experiment import train_cifar

    data = _tiny_cifar_data()
    config = _tiny_cifar(tmp_path, "done", epochs=2, decay_start=1, log_dir="")
    finished = train_cifar(config, data=data, quiet=True)
    before = Path(finished.checkpoint).read_bytes()
    changed = _tiny_cifar(tmp_path, "done", epochs=2, decay_start=1, log_dir="", lr=0.001)
    time.sleep(1.1)
    result = train_cifar(changed, data=data, quiet=True, force=True)
    assert result.checkpoint != finished.checkpoint and Path(finished.checkpoint).read_bytes() == before
    old_config = yaml.safe_load((Path(finished.checkpoint).with_suffix("") / "config.yaml").read_text())
    assert old_config["lr"] == config.lr


def test_runs_started_in_one_second_get_folders_of_their_own(tmp_path, monkeypatch):
    """A parallel sweep of another key (one experiment, parameterization and seed) got one folder per second."""
    from wn_rl.models import training
    from wn_rl.models.cifar_experiment import train_cifar

    monkeypatch.setattr(training.time, "time", lambda: 1_795_565_000.0)
    data = _tiny_cifar_data()
    first = train_cifar(_tiny_cifar(tmp_path, "sweep", epochs=2, decay_start=1, log_dir=""), data=data, quiet=True)
    second_config = _tiny_cifar(tmp_path, "sweep", epochs=2, decay_start=1, log_dir="", lr=0.001)
    second = train_cifar(second_config, data=data, quiet=True)  # the first is finished: a new run
    assert Path(first.checkpoint).name.endswith("__1795565000.pt")
    assert Path(second.checkpoint).name.endswith("__1795565001.pt")
    folder = Path(second.checkpoint).with_suffix("")
    assert yaml.safe_load((folder / "config.yaml").read_text())["lr"] == 0.001
    assert "git" in json.loads((folder / "provenance.json").read_text())
    assert "git" in _final(second)["provenance"]  # the final checkpoint says which code made it


def test_a_second_ctrl_c_quits_at_once(tmp_path, monkeypatch):
    from wn_rl.models.cifar_experiment import train_cifar

    config = _tiny_cifar(tmp_path, "twice", log_dir="")
    _signal_at_steps(monkeypatch, {5}, repeat=2)
    with pytest.raises(KeyboardInterrupt):
        train_cifar(config, data=_tiny_cifar_data(), quiet=True)
    (folder,) = [p for p in Path(config.checkpoint_dir).iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.glob("*.pt")) == ["checkpoint_0000000004.pt"]  # epoch 1's only


def test_sigterm_checkpoints_and_exits_143_then_the_same_command_finishes(tmp_path):
    import signal

    from wn_rl.data.synthetic import write_cifar10

    write_cifar10(tmp_path / "data", n_train=40, n_test=20)
    command = [
        sys.executable,
        str(REPO / "scripts/train_cifar.py"),
        f"data_dir={tmp_path / 'data'}",
        "epochs=30",
        "decay_start=10",
        "widths=[2,2]",
        "batch_size=20",
        "init_batch_size=20",
        "zca=false",
        "log_dir=",
        f"checkpoint_dir={tmp_path / 'ck'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:
        if "epoch 1/30" in line:
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    assert "rerun the same command to resume" in err and "final test error" not in out
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout and "epoch 1/30" not in done.stdout
    (final,) = (tmp_path / "ck").glob("*.pt")
    assert len(torch.load(final, weights_only=True)["curves"]["test_error"]) == 30


def test_zca_fitted_on_fewer_images_than_features_warns(tmp_path):
    """A train_subset of 1,000 images: the covariance of 3,072 features is singular and the test images come out
    tens of times larger than the training ones; the run warns and says to use zca=false."""
    from wn_rl.data.synthetic import write_cifar10
    from wn_rl.models.cifar_experiment import CifarConfig, prepare_cifar

    write_cifar10(tmp_path, n_train=50, n_test=10)
    with pytest.warns(UserWarning, match=r"zca=true fitted on 50 training images, no more than their 3,072 features"):
        prepare_cifar(CifarConfig(data_dir=str(tmp_path), device="cpu"))
