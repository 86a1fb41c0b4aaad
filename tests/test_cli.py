"""Warnings from the scripts read as one line each (``wn_rl.cli.brief_warnings``); the scripts parse their command
lines and refuse bad input before any work."""

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


def _stub_trainer(built: list[Path]) -> type:
    """A stand-in for the DQN ``Trainer`` that appends the run directory it would train in to ``built``."""

    class StubTrainer:
        def __init__(self, config, run_dir, force=False):
            built.append(Path(run_dir))
            self.last_checkpoint = None

        def run(self):
            return {"interrupted": None}

    return StubTrainer


def test_train_dqn_resume_of_a_directory_without_a_run_is_refused(monkeypatch, capsys, tmp_path):
    """``--resume TYPO --config X`` started a new run in TYPO from step 0; a run stopped before its first
    checkpoint (config.yaml only), or one with a checkpoint, still resumes."""
    from wn_rl.checkpoint import save_checkpoint

    monkeypatch.chdir(ROOT)
    train_dqn = _load_script("train_dqn")
    built: list[Path] = []
    monkeypatch.setattr(train_dqn, "Trainer", _stub_trainer(built))
    config = ["--config", "configs/dqn/cartpole.yaml", f"run.runs_dir={tmp_path}"]
    typo, empty = tmp_path / "cartpol", tmp_path / "empty"
    empty.mkdir()
    for run_dir, why in ((typo, "does not exist"), (empty, "holds no config.yaml and no complete checkpoint")):
        assert train_dqn.main(["--resume", str(run_dir), *config]) == 2
        err = capsys.readouterr().err
        assert f"--resume {run_dir}: no run here ({run_dir} {why})" in err
        assert "start a new run with --config CONFIG.yaml" in err
    assert not typo.exists() and not any(empty.iterdir()) and built == []
    stopped = tmp_path / "stopped"  # a run killed before its first checkpoint
    stopped.mkdir()
    (stopped / "config.yaml").write_text((ROOT / "configs" / "dqn" / "cartpole.yaml").read_text())
    checkpointed = tmp_path / "checkpointed"
    (checkpointed / "checkpoints").mkdir(parents=True)
    save_checkpoint(checkpointed / "checkpoints" / "checkpoint_000000000100.pt", {"agent_step": 100})
    for run_dir in (stopped, checkpointed):
        assert train_dqn.main(["--resume", str(run_dir), *config]) == 0
    assert train_dqn.main(["--resume", str(stopped), "run.progress_bar=false"]) == 0  # its own config.yaml
    assert built == [stopped, checkpointed, stopped]
