"""Warnings from the scripts read as one line each (``wn_rl.cli.brief_warnings``)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_SCRIPTS = (
    "train_dqn",
    "train_sb3",
    "study",
    "evaluate",
    "plot_curves",
    "train_vae",
    "train_cifar",
    "train_draw",
    "compare_parameterizations",
)
WARN = (
    "import warnings\n"
    "from wn_rl.cli import brief_warnings\n"
    "brief_warnings()\n"
    "def save():\n"
    "    warnings.warn('checkpoints will not hold the games state', stacklevel=2)\n"
    "save()\n"
    "warnings.warn('a future change', FutureWarning)\n"
)


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_a_warning_is_one_line_naming_its_category_unless_a_user_warning():
    result = _python("-c", WARN)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "warning: checkpoints will not hold the games state",
        "warning: a future change (FutureWarning)",
    ]


def test_warning_filters_still_apply():
    result = _python("-W", "error", "-c", WARN)
    assert result.returncode == 1 and "UserWarning: checkpoints will not hold" in result.stderr


@pytest.mark.parametrize("name", USER_SCRIPTS)
def test_every_user_script_turns_brief_warnings_on_first_in_its_main_block(name):
    tree = ast.parse((ROOT / "scripts" / f"{name}.py").read_text())
    main_blocks = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert len(main_blocks) == 1
    first = main_blocks[0].body[0]
    assert ast.unparse(first) == "brief_warnings()"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"wn_rl_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_dqn_overrides_may_sit_on_both_sides_of_a_flag(monkeypatch, capsys):
    """``run.seed=1 --force agent.lrr=1`` reads both overrides (the misspelt one is the config's error,
    not argparse's ``unrecognized arguments``); nothing is built past the config."""
    monkeypatch.chdir(ROOT)
    train_dqn = _load_script("train_dqn")
    assert train_dqn.main(["--config", "configs/dqn/cartpole.yaml", "run.seed=1", "--force", "agent.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'lr'" in err and "unrecognized" not in err


def test_train_sb3_overrides_may_sit_on_both_sides_of_a_flag(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    train_sb3 = _load_script("train_sb3")
    argv = ["--config", "configs/sb3/dqn_cartpole_wn.yaml", "seed=1", "--force", "total_timestep=1"]
    assert train_sb3.main(argv) == 2
    err = capsys.readouterr().err
    assert "did you mean 'total_timesteps'" in err and "unrecognized" not in err


def test_paper_script_overrides_may_sit_on_both_sides_of_a_flag(monkeypatch):
    from wn_rl.models.cifar_experiment import CifarConfig
    from wn_rl.models.cli import parse_training_command

    monkeypatch.chdir(ROOT)
    argv = ["epochs=2", "--force", "decay_start=1", "--download"]
    config, force = parse_training_command(CifarConfig, "configs/paper/cifar10.yaml", "", argv)
    assert (config.epochs, config.decay_start, config.download, force) == (2, 1, True, True)
