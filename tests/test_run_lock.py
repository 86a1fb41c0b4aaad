"""One trainer per run (wn_rl.run_lock), and what a rerun of a run leaves alone: a second trainer on a run
directory is refused with exit code 75 before it allocates or writes anything; a finished paper-model run rerun
keeps its final checkpoint; a first Ctrl-C during start-up is not called the second; the temporaries of killed
writes of the run files are removed. Tiny CartPole and VAE runs on CPU."""

from __future__ import annotations

import errno
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from generative_helpers import binary_images  # tests/generative_helpers.py

from agents.dqn.config import load_dqn_config
from agents.dqn.runner import Trainer
from wn_rl import checkpoint, run_lock
from wn_rl.config import load_config
from wn_rl.models.generative_experiment import GenerativeConfig, train_generative
from wn_rl.run_lock import EX_TEMPFAIL, LOCK_NAME, RunInUseError, hold_run_lock

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
DQN_CARTPOLE = str(ROOT / "configs" / "dqn" / "cartpole.yaml")
SB3_CARTPOLE = str(ROOT / "configs" / "sb3" / "dqn_cartpole_wn.yaml")
ME = f"pid {os.getpid()} on host {socket.gethostname()}"


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "scripts" / name), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"wn_rl_script_{name}_lock", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dqn_overrides(tmp_path: Path) -> list[str]:
    return [
        "run.total_agent_steps=200",
        "agent.learning_starts_agent_steps=100",
        "agent.replay_capacity_transitions=1000",
        "eval.every_agent_steps=0",
        "run.log_every_agent_steps=100",
        f"run.runs_dir={tmp_path}",
        "run.name=run",
        "run.progress_bar=false",
        "run.device=cpu",
    ]


# ----- (A) the lock ---------------------------------------------------------------------------------------
def test_a_second_hold_of_a_run_is_refused_naming_the_holder_and_the_way_out(tmp_path):
    run_dir = tmp_path / "runs" / "run"  # created by the lock
    other_run = "start a separate run (run.name=...)"
    with hold_run_lock(run_dir):
        assert (run_dir / LOCK_NAME).read_text().split() == [socket.gethostname(), str(os.getpid())]
        with pytest.raises(RunInUseError) as refused, hold_run_lock(run_dir, other_run):  # a second file description
            pytest.fail("two holds of one run")
    message = str(refused.value)
    assert refused.value.exit_code == EX_TEMPFAIL == 75
    assert f"{run_dir} is being trained by another process ({ME}, holding {run_dir / LOCK_NAME})" in message
    assert "would overwrite each other's checkpoints and TensorBoard logs" in message
    assert "Wait for the other one to finish" in message and "stop it" in message
    assert message.endswith("or start a separate run (run.name=...).")
    with hold_run_lock(run_dir):  # released when the context ended
        (run_dir / "config.yaml").write_text("{}\n")  # the run wrote something: its lock file stays with it
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME, "config.yaml"]


def test_a_lock_that_made_the_run_directory_takes_it_away_if_nothing_was_written(tmp_path):
    """A run refused by a check made after the lock (SB3 rejects a policy while building the env) leaves nothing
    behind; a directory that was there before the lock keeps its lock file."""
    run_dir = tmp_path / "runs" / "run"
    with hold_run_lock(run_dir):
        assert run_dir.is_dir()
    assert not run_dir.exists() and (tmp_path / "runs").is_dir()
    run_dir.mkdir()
    with hold_run_lock(run_dir):
        pass
    assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME]


def test_a_lock_taken_on_a_file_deleted_meanwhile_is_taken_again_on_the_new_one(tmp_path, monkeypatch):
    """The releasing process deletes the lock file it made; one that opened it just before gets its flock on the
    deleted file. It must notice (the name leads to another file, or none) and lock the file the name leads to, or
    a third process could lock a new file of the same name beside it and both would train."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock_path = run_dir / LOCK_NAME
    real_flock, calls = run_lock.fcntl.flock, []

    def flock_after_a_release(fd, operation):
        calls.append(fd)
        if len(calls) == 1:  # between this process's open and its flock, the file is deleted and made anew
            lock_path.unlink()
            lock_path.write_text("")
        return real_flock(fd, operation)

    monkeypatch.setattr(run_lock.fcntl, "flock", flock_after_a_release)
    with hold_run_lock(run_dir) as held:
        assert len(calls) == 2  # the first lock was on the deleted file: taken again
        assert os.fstat(held._fd).st_ino == os.stat(lock_path).st_ino
        monkeypatch.setattr(run_lock.fcntl, "flock", real_flock)
        with pytest.raises(RunInUseError):
            hold_run_lock(run_dir).acquire()  # the name's file is the one held


def test_the_lock_is_released_when_training_raises(tmp_path):
    with pytest.raises(ValueError, match="boom"), hold_run_lock(tmp_path):
        raise ValueError("boom")
    with hold_run_lock(tmp_path):
        pass


@pytest.mark.parametrize("cause", ["no fcntl", "ENOLCK", "EOPNOTSUPP"])
def test_where_flock_is_not_supported_it_warns_once_and_runs_unlocked(tmp_path, monkeypatch, cause):
    monkeypatch.setattr(run_lock, "_warned", False)
    if cause == "no fcntl":
        monkeypatch.setattr(run_lock, "fcntl", None)
    else:

        def flock(fd, operation):
            raise OSError(getattr(errno, cause), os.strerror(getattr(errno, cause)))

        monkeypatch.setattr(run_lock.fcntl, "flock", flock)
    with pytest.warns(UserWarning, match="runs are not locked here"), hold_run_lock(tmp_path / "a"):
        pass
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with hold_run_lock(tmp_path / "b"), hold_run_lock(tmp_path / "b"):  # unlocked: both go on, silently
            pass


def test_train_dqn_on_a_run_in_use_exits_75_before_allocating_or_writing(tmp_path):
    """A rerun of the command in a second terminal (or a restarted study driver beside an orphaned trainer)
    trained the run twice at once, the two overwriting each other's checkpoints and TensorBoard logs."""
    run_dir = tmp_path / "run"
    with hold_run_lock(run_dir):
        started = time.perf_counter()
        done = _script("train_dqn.py", "--config", DQN_CARTPOLE, *_dqn_overrides(tmp_path))
        seconds = time.perf_counter() - started
        assert done.returncode == 75, done.stderr[-3000:]
        assert f"error: {run_dir} is being trained by another process ({ME}" in done.stderr
        assert "Traceback" not in done.stderr and "run directory:" not in done.stdout  # no Trainer was built
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME], "the refused trainer wrote to the run"
        assert (run_dir / LOCK_NAME).read_text().split()[1] == str(os.getpid())
    assert seconds < 60
    trained = _script("train_dqn.py", "--config", DQN_CARTPOLE, *_dqn_overrides(tmp_path))  # released: it trains
    assert trained.returncode == 0, trained.stderr[-3000:]


def test_train_sb3_on_a_run_in_use_exits_75_before_allocating_or_writing(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [f"runs_dir={tmp_path}", "run_name=run", "progress_bar=false", "total_timesteps=100"]
    with hold_run_lock(run_dir):
        done = _script("train_sb3.py", "--config", SB3_CARTPOLE, *overrides)
        assert done.returncode == 75, done.stderr[-3000:]
        assert f"error: {run_dir} is being trained by another process ({ME}" in done.stderr
        assert "start a separate run (run_name=...)" in done.stderr and "Traceback" not in done.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]


def _tiny_vae(tmp_path: Path, **overrides) -> GenerativeConfig:
    data = {
        "epochs": 2,
        "batch_size": 10,
        "init_batch_size": 10,
        "polyak_epochs": 1.0,
        "device": "cpu",
        "log_dir": str(tmp_path / "runs"),
        "checkpoint_dir": str(tmp_path / "ck"),
        "conv_vae": {"widths": [4, 8, 8], "blocks_per_stage": 1, "dense": 16, "z_dim": 4, "iaf_hidden": [16]},
    }
    data["conv_vae"]["context_dim"] = 4
    return load_config(GenerativeConfig, data={**data, **overrides})


def _vae_data() -> tuple[torch.Tensor, torch.Tensor]:
    images = binary_images(50, 8, seed=0)
    return images[:40], images[40:]


def _run_folder(config: GenerativeConfig) -> Path:
    (folder,) = [p for p in Path(config.checkpoint_dir).iterdir() if p.is_dir()]
    return folder


def test_a_paper_run_holds_its_folder_while_it_trains_and_a_second_one_is_refused(tmp_path, monkeypatch):
    from wn_rl.models import generative_experiment

    config, data = _tiny_vae(tmp_path), _vae_data()
    refusals = []
    real_epochs = generative_experiment._epochs

    def epochs_while_locked(state, *args):
        try:  # a new run: the folder it claimed is locked before its config.yaml is written
            hold_run_lock(state.run.folder).acquire()
        except RunInUseError as exc:
            refusals.append(exc)
        return real_epochs(state, *args)

    with monkeypatch.context() as patch:
        patch.setattr(generative_experiment, "_epochs", epochs_while_locked)
        result = train_generative(config, data=data, quiet=True)
    assert len(refusals) == 1
    folder = _run_folder(config)
    with hold_run_lock(folder):
        before = {p: p.stat().st_mtime_ns for p in [*folder.iterdir(), Path(result.checkpoint)]}
        with pytest.raises(RunInUseError, match=r"start a separate run \(another seed or checkpoint_dir\)"):
            train_generative(config, data=data, quiet=True)  # a resume: refused before it loads or removes anything
        assert {p: p.stat().st_mtime_ns for p in before} == before
    assert train_generative(config, data=data, quiet=True).checkpoint == result.checkpoint  # released


# ----- (B) a finished paper run rerun keeps its final checkpoint ------------------------------------------
def test_rerunning_a_finished_paper_run_keeps_its_final_checkpoint(tmp_path):
    """It trained nothing but rewrote the final (new provenance, new hash): a kill between the payload's rename and
    the marker's write left the finished model unloadable, and a full disk failed the rerun."""
    config, data = _tiny_vae(tmp_path), _vae_data()
    final = Path(train_generative(config, data=data, quiet=True).checkpoint)
    marker = final.with_name(final.name + ".complete.json")
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in (final, marker)]
    rerun = train_generative(config, data=data, quiet=True)
    assert rerun.checkpoint == str(final)
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in (final, marker)] == before
    with final.open("ab") as f:  # a damaged final is written again
        f.write(b"damage")
    assert train_generative(config, data=data, quiet=True).checkpoint == str(final)
    checkpoint.verify_checkpoint(final)


def test_a_final_checkpoint_older_than_the_run_is_written_again_on_the_rerun(tmp_path, monkeypatch):
    """A run extended from 2 to 3 epochs and killed after its last epoch checkpoint, before its final save: the
    rerun trains nothing, but the final it finds is the 2-epoch one, so it is replaced."""
    from wn_rl.models.resume import ResumableRun

    data = _vae_data()
    final = Path(train_generative(_tiny_vae(tmp_path), data=data, quiet=True).checkpoint)
    config = _tiny_vae(tmp_path, epochs=3)

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ResumableRun, "save_final", killed)
        with pytest.raises(KeyboardInterrupt):
            train_generative(config, data=data, quiet=True)
    assert len(checkpoint.load_checkpoint(final)["curves"]["test_bound"]) == 2
    rerun = train_generative(config, data=data, quiet=True)
    assert rerun.checkpoint == str(final) and len(rerun.test_bound) == 3
    assert checkpoint.load_checkpoint(final)["curves"]["test_bound"] == rerun.test_bound


# ----- (C) a first Ctrl-C during start-up -----------------------------------------------------------------
@pytest.mark.parametrize("second", [False, True])
def test_train_dqn_says_whether_a_ctrl_c_was_the_first_or_the_second(tmp_path, monkeypatch, capsys, second):
    def interrupted(self, *args, **kwargs):
        if second:  # the loop's handler recorded the first one
            self.stop_signal = signal.SIGINT
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "advance" if second else "start", interrupted)
    train_dqn = _load_script("train_dqn")
    assert train_dqn.main(["--config", DQN_CARTPOLE, *_dqn_overrides(tmp_path)]) == 130
    err = capsys.readouterr().err
    when = "again" if second else "during start-up"
    assert f"interrupted {when}: quit without a new checkpoint; none was written yet, so it starts over" in err
    assert ("again" in err) == second


@pytest.mark.parametrize("second", [False, True])
def test_train_sb3_says_whether_a_ctrl_c_was_the_first_or_the_second(tmp_path, monkeypatch, capsys, second):
    from wn_rl.sb3.runner import SB3Run

    def interrupted(self, *args, **kwargs):
        if second:
            self.stop.stop_signal = signal.SIGINT
        raise KeyboardInterrupt

    monkeypatch.setattr(SB3Run, "_learn" if second else "_build", interrupted)
    train_sb3 = _load_script("train_sb3")
    overrides = [f"runs_dir={tmp_path}", "run_name=run", "progress_bar=false", "total_timesteps=100"]
    assert train_sb3.main(["--config", SB3_CARTPOLE, *overrides]) == 130
    err = capsys.readouterr().err
    when = "again" if second else "during start-up"
    assert f"interrupted {when}: quit without saving; the previous files are intact" in err
    assert ("again" in err) == second


# ----- (D) temporaries of the run files left by killed writes ---------------------------------------------
RUN_FILES = ("config.yaml", "provenance.json", "env.json", "results.json", "results.csv")


def test_a_dqn_run_removes_the_temporaries_of_its_run_files(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    left = [run_dir / f".{name}.tmp-4242" for name in RUN_FILES]
    for path in left:
        path.write_bytes(b"half written")
    Trainer(load_dqn_config(DQN_CARTPOLE, _dqn_overrides(tmp_path)), run_dir).run()
    assert not [p.name for p in left if p.exists()]
    assert "removed 5 incomplete file(s) left by an interrupted write" in capsys.readouterr().out


def test_a_resumed_paper_run_removes_the_temporaries_of_its_run_files_and_final(tmp_path, capsys):
    config, data = _tiny_vae(tmp_path), _vae_data()
    final = Path(train_generative(config, data=data, quiet=True).checkpoint)
    folder = _run_folder(config)
    left = [folder / ".config.yaml.tmp-4242", folder / ".provenance.json.tmp-4242"]
    left += [final.with_name(f".{final.name}.tmp-4242"), final.with_name(f".{final.name}.complete.json.tmp-4242")]
    other = final.with_name(".other_run.pt.tmp-4242")  # another run's write in progress: not this run's to remove
    for path in [*left, other]:
        path.write_bytes(b"half written")
    train_generative(config, data=data, quiet=True)
    assert not [p.name for p in left if p.exists()] and other.exists()
    assert "removed 4 incomplete file(s) left by an interrupted write" in capsys.readouterr().out


def test_the_paper_scripts_exit_75_on_a_run_in_use(tmp_path, capsys):
    """train_vae.py, train_draw.py and train_cifar.py end through exit_on_error: a run in use is 75 (a study reports
    it as skipped), not the 2 of a bad config."""
    from wn_rl.models.cli import exit_on_error

    with pytest.raises(SystemExit) as ended, exit_on_error():
        raise RunInUseError(tmp_path, "pid 1 on host h", "start a separate run")
    assert ended.value.code == EX_TEMPFAIL
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} is being trained by another process")
