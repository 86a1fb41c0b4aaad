"""The paper-model scripts' command line (``wn_rl.models.cli``): bad input is one ``error:`` line and exit
code 2, never a traceback; ``--help`` keeps the docstring's example commands on their own lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "scripts" / name), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    ("script", "override", "named"),
    [
        ("train_cifar.py", "epoch=5", "unknown key 'epoch'; did you mean 'epochs'?"),
        ("train_vae.py", "lr=fast", "lr"),
        ("compare_parameterizations.py", "epochs=5", "unknown key 'epochs'"),
    ],
)
def test_a_bad_override_is_one_error_line_and_exit_code_2(tmp_path, script, override, named):
    done = _script(script, override, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: ") and named in done.stderr


def test_a_config_for_the_other_script_is_one_error_line_and_exit_code_2(tmp_path):
    done = _script("train_draw.py", "--config", str(REPO / "configs/paper/vae_mnist.yaml"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "train_vae.py" in done.stderr


@pytest.mark.parametrize("script", ["train_cifar.py", "train_vae.py", "train_draw.py"])
def test_a_missing_dataset_leaves_no_run_folder_behind(tmp_path, script):
    done = _script(script, f"data_dir={tmp_path / 'no_data'}", f"checkpoint_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "--download" in done.stderr, done.stderr[-3000:]
    assert not list((tmp_path / "runs").rglob("*")), "a run folder was created for a run that never started"


def test_help_keeps_the_example_commands_on_their_own_lines():
    for script, example in [
        ("train_cifar.py", "python scripts/train_cifar.py --config configs/paper/cifar10.yaml parameterization="),
        ("compare_parameterizations.py", "python scripts/compare_parameterizations.py --download cifar.epochs=10"),
    ]:
        done = _script(script, "--help")
        assert done.returncode == 0
        assert any(line.strip().startswith(example) for line in done.stdout.splitlines()), done.stdout
    overrides = _script("compare_parameterizations.py", "--help").stdout
    assert "cifar.epochs=10" in overrides.split("positional arguments:")[1]  # its keys are nested
