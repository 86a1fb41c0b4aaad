"""Studies: every shipped study config plans, bad configs fail early, a tiny CartPole study runs
(locally and on a local Ray instance), resumes by skipping complete runs, refuses runs made with other
settings, and writes its report from complete runs only."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from wn_rl.analysis.backends import acquire_run_lock
from wn_rl.analysis.study import RunSpec, StudyConfig, analyze_study, expand_grid, load_study_config, plan_runs
from wn_rl.checkpoint import save_checkpoint
from wn_rl.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "configs" / "studies").glob("*.yaml"))
TINY = "overrides=[run.total_agent_steps=1200, eval.every_agent_steps=600, eval.games=2, run.log_every_agent_steps=300]"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"wn_rl_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study_script = _load_script("study")


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_study_config_plans(path: Path) -> None:
    study = load_study_config(path)
    specs = plan_runs(study)
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) == len(expand_grid(study.grid))
    assert all(s.run_dir == study.study_dir / s.name for s in specs)


def test_grid_expands_in_written_order() -> None:
    points = expand_grid({"a": (1, 2), "b": ("x", "y", "z")})
    assert len(points) == 6 and points[0] == {"a": 1, "b": "x"} and points[1] == {"a": 1, "b": "y"}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["max_paralel=2"], "did you mean 'max_parallel'"),
        (["grid={run.seed: []}"], "non-empty list"),
        (["grid={run.seed: [0, 0]}"], "without repeats"),
        (["max_parallel=0"], "at least 1"),
        (["grid={agent.lr: [-1.0]}"], "lr--1: .*agent.lr=-1.0 is invalid"),
        (["grid={agent.lrr: [0.1]}"], "did you mean 'lr'"),
        (["train_script=nowhere/train.py"], "repository root"),
    ],
)
def test_bad_study_configs_fail_before_any_run(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        plan_runs(load_study_config(REPO / "configs/studies/smoke_cartpole.yaml", overrides))


def test_empty_grid_is_an_error() -> None:
    with pytest.raises(ConfigError, match="at least one key"):
        StudyConfig(name="x", base_config="configs/dqn/cartpole.yaml", grid={})


def test_tiny_study_runs_resumes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["configs/studies/smoke_cartpole.yaml", f"runs_dir={tmp_path}", TINY, "--jobs", "2"]
    assert study_script.main(args) == 0
    out = capsys.readouterr().out
    assert "4 runs, 0 complete, 4 to run" in out and out.count(": ok in") == 4
    study_dir = tmp_path / "smoke_cartpole"
    with (study_dir / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["group"] for r in rows} == {"normal", "weight_norm"}
    assert all(int(r["agent_steps"]) >= 1200 and int(r["evaluations"]) == 2 for r in rows)
    assert all(float(r["final_eval"]) > 0 for r in rows)  # CartPole returns are positive
    summary = (study_dir / "summary.md").read_text()
    assert "4 of 4 runs have data" in summary and summary.count("| CartPole-v1 |") == 2 + 4
    assert (study_dir / "curves.png").stat().st_size > 10_000
    assert (study_dir / "logs" / "parameterization-normal__seed-0.log").is_file()
    # running the same command again runs nothing
    assert study_script.main(args) == 0
    out = capsys.readouterr().out
    assert "4 complete, 0 to run" in out and ": ok in" not in out
    # a larger budget makes every run incomplete, to be continued from its checkpoint
    longer = TINY.replace("total_agent_steps=1200", "total_agent_steps=2400")
    assert study_script.main([args[0], args[1], longer, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "0 complete, 4 to run" in out and out.count("at 1,200 of 2,400 steps") == 4


def test_failed_runs_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    failing = tmp_path / "fail.py"
    failing.write_text("import sys\nprint('boom')\nsys.exit(3)\n")
    args = ["configs/studies/smoke_cartpole.yaml", f"runs_dir={tmp_path}", f"train_script={failing}", TINY]
    assert study_script.main([*args, "grid={run.seed: [0]}"]) == 1
    captured = capsys.readouterr()
    assert "FAILED (exit 3" in captured.out and "boom" in captured.err


def test_tiny_study_on_local_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install -e '.[study]' to test --backend ray")
    os.environ.setdefault("RAY_ACCEPT_EXPERIMENTAL_DEPS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        grid = "grid={network.parameterization: [normal, weight_norm], run.seed: [0]}"
        args = ["configs/studies/smoke_cartpole.yaml", f"runs_dir={tmp_path}", TINY, grid, "--backend", "ray"]
        assert study_script.main(args) == 0
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert "2 runs, 0 complete, 2 to run" in out and out.count(": ok in") == 2
    with (tmp_path / "smoke_cartpole" / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2


def test_set_adds_a_run_override_after_the_study_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = ["configs/studies/minatar_lr_robustness.yaml", f"runs_dir={tmp_path}"]  # not the checkout's runs/
    args = [*study, "--set", "run.total_agent_steps=99000", "--dry-run"]
    assert study_script.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("run.total_agent_steps=99000") == 40 and "of 99,000 steps" in out


@pytest.mark.parametrize(
    ("run_override", "match"),
    [
        ("run.seed=3", r"run\.seed is a grid key .*'grid=\{run\.seed: \[3\]\}'"),
        ("network.parameterization=weightnorm", r"network\.parameterization is a grid key"),
        ("run.runs_dir=elsewhere", r"run\.runs_dir is set by the study .*runs_dir="),
        ("run.name=mine", r"run\.name is set by the study"),
        ("run.torch_threads=4", r"run\.torch_threads is set by the study .*torch_threads=4"),
        ("run.progress_bar=true", r"run\.progress_bar is set by the study"),
    ],
)
def test_set_of_a_key_the_study_sets_per_run_is_an_error(
    run_override: str, match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The grid's and the study's own per-run overrides come after --set's: instead of losing silently,
    such a --set is refused with where to change the key."""
    assert study_script.main(["configs/studies/smoke_cartpole.yaml", "--set", run_override, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(match, err), err


def test_study_overrides_may_follow_a_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["configs/studies/smoke_cartpole.yaml", f"runs_dir={tmp_path}", "--dry-run", "name=other", "--jobs", "1"]
    assert study_script.main(args) == 0
    assert "study other: 4 runs" in capsys.readouterr().out


def test_run_lock_keeps_two_drivers_off_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = tmp_path / "run" / "study.lock"
    assert acquire_run_lock(lock) is None
    assert acquire_run_lock(lock) == f"{socket.gethostname()} {os.getpid()}"  # held by a live process
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()} {dead.pid}")
    assert acquire_run_lock(lock) is None  # a dead holder's lock is taken over
    # a study whose only run is locked by a live driver skips it instead of running it twice
    run_lock = tmp_path / "smoke_cartpole" / "parameterization-normal__seed-0" / "study.lock"
    run_lock.parent.mkdir(parents=True)
    run_lock.write_text(f"{socket.gethostname()} {os.getpid()}")
    args = [
        "configs/studies/smoke_cartpole.yaml",
        f"runs_dir={tmp_path}",
        TINY,
        "grid={network.parameterization: [normal], run.seed: [0]}",
    ]
    study_script.main(args)
    out = capsys.readouterr().out
    assert "is already being run by" in out and run_lock.exists()
    assert not (run_lock.parent / "config.yaml").exists()


def test_a_run_whose_trainer_is_alive_elsewhere_is_skipped_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A driver killed between starting a trainer and naming it in study.lock leaves a lock naming only its dead
    pid, and the trainer training on. The restarted driver takes the lock over, but the trainer it starts finds
    the run's .trainer.lock held and exits 75: the run is reported skipped (its reason in one line), not failed,
    and nothing is written to it."""
    from wn_rl.run_lock import hold_run_lock

    run_dir = tmp_path / "smoke_cartpole" / "parameterization-normal__seed-0"
    args = [
        "configs/studies/smoke_cartpole.yaml",
        f"runs_dir={tmp_path}",
        TINY,
        "grid={network.parameterization: [normal], run.seed: [0]}",
    ]
    with hold_run_lock(run_dir):  # the orphaned trainer
        study_script.main(args)  # 1: no run of the study has results yet to analyse
    lines = [line for line in capsys.readouterr().out.splitlines() if "parameterization-normal__seed-0:" in line]
    assert len(lines) == 1 and f"skipped: {run_dir} is being trained by another process" in lines[0]
    assert not (run_dir / "config.yaml").exists()


def test_ctrl_c_starts_no_further_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the first run presses Ctrl-C on the driver (as a terminal does for the whole process group): the
    # runs still queued must not start afterwards, and the driver says how to continue
    ran = tmp_path / "ran.txt"
    script = tmp_path / "train.py"
    script.write_text(
        "import os, signal, sys, time\n"
        f"with open({str(ran)!r}, 'a') as f:\n"
        "    f.write(sys.argv[-3] + '\\n')\n"
        "os.kill(os.getppid(), signal.SIGINT)\n"
        "time.sleep(1)\n"
    )
    args = ["configs/studies/smoke_cartpole.yaml", f"runs_dir={tmp_path}", f"train_script={script}", TINY]
    # Ctrl-C as in a terminal: a suite started in the background (nohup pytest &) inherits SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert study_script.main([*args, "--jobs", "1"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(ran.read_text().splitlines()) == 1
    assert "run the same command again" in capsys.readouterr().err


def test_grid_values_reach_the_runs_exactly(tmp_path: Path) -> None:
    grid = "grid={agent.lr: [null, 0.001], agent.gamma: [0.9999995]}"
    study = load_study_config(REPO / "configs/studies/smoke_cartpole.yaml", [grid, f"runs_dir={tmp_path}"])
    specs = plan_runs(study)
    assert [s.name.split("__", 2)[-1] for s in specs[:2]] == ["lr-None__gamma-1", "lr-0.001__gamma-1"]
    assert "agent.lr=null" in specs[0].overrides and "agent.gamma=0.9999995" in specs[0].overrides
    same = "grid={agent.gamma: [0.9999995, 0.9999996]}"
    with pytest.raises(ConfigError, match=r"share the run directory .*gamma-1"):
        plan_runs(load_study_config(REPO / "configs/studies/smoke_cartpole.yaml", [same]))


def test_a_run_that_outlived_its_killed_driver_keeps_its_lock(tmp_path: Path) -> None:
    lock = tmp_path / "run" / "study.lock"
    lock.parent.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(f"{socket.gethostname()} {dead.pid} {os.getpid()}")  # driver dead, its run still training
    assert acquire_run_lock(lock) == f"{socket.gethostname()} {dead.pid} {os.getpid()}"
    lock.write_text(f"{socket.gethostname()} {dead.pid} {dead.pid}")  # both gone: taken over
    assert acquire_run_lock(lock) is None


def test_sigterm_on_the_driver_stops_the_running_runs_and_starts_no_further_one(tmp_path: Path) -> None:
    # a job scheduler (or `kill`) stops the driver alone: it passes SIGTERM on to the run, which saves and
    # exits, starts none of the queued runs, and its lock names the training process while that runs
    ran = tmp_path / "ran.txt"
    script = tmp_path / "train.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "def stop(signum, frame):\n"
        f"    open({str(ran)!r}, 'a').write('checkpointed on SIGTERM\\n')\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "arg = dict(a.split('=', 1) for a in sys.argv if a.startswith('run.'))\n"
        "lock = os.path.join(arg['run.runs_dir'], arg['run.name'], 'study.lock')\n"
        f"open({str(ran)!r}, 'a').write(open(lock).read().split()[-1] + '\\n')\n"
        "os.kill(os.getppid(), signal.SIGTERM)\n"
        "time.sleep(60)\n"
    )
    args = ["configs/studies/smoke_cartpole.yaml", f"runs_dir={tmp_path}", f"train_script={script}", TINY]
    driver = subprocess.run(
        [sys.executable, "scripts/study.py", *args, "--jobs", "1"], capture_output=True, text=True, timeout=120
    )
    assert driver.returncode == 143, driver.stderr
    lines = ran.read_text().splitlines()
    assert len(lines) == 2 and lines[1] == "checkpointed on SIGTERM"
    assert lines[0].isdigit() and int(lines[0]) != os.getpid()  # the training process's pid
    assert "SIGTERM: no further run was started" in driver.stderr


def _trained_run(spec: RunSpec, base_config: str, agent_step: int | None = None, evals: dict | None = None) -> None:
    """A run directory as scripts/train_dqn.py leaves it, without the training: the resolved config.yaml,
    the newest checkpoint (at the run's budget unless ``agent_step`` says otherwise; the runner writes
    one when it stops) and evaluation returns in TensorBoard."""
    from agents.dqn.config import config_dict, load_dqn_config

    step = spec.total_agent_steps if agent_step is None else agent_step
    (spec.run_dir / "checkpoints").mkdir(parents=True)
    (spec.run_dir / "config.yaml").write_text(yaml.safe_dump(config_dict(load_dqn_config(base_config, spec.overrides))))
    save_checkpoint(spec.run_dir / "checkpoints" / f"checkpoint_{step:012d}.pt", {}, metadata={"agent_step": step})
    writer = SummaryWriter(str(spec.run_dir / "tb"))
    for eval_step, value in (evals or {}).items():
        writer.add_scalar("eval/return_mean", value, eval_step)
    writer.close()


def test_runs_made_with_other_settings_are_refused_until_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = "grid={network.parameterization: [normal], run.seed: [0, 1]}"
    args = ["configs/studies/smoke_cartpole.yaml", f"runs_dir={tmp_path}", TINY, grid]
    study = load_study_config(args[0], args[1:])
    finished, stopped = plan_runs(study)
    _trained_run(finished, study.base_config)
    _trained_run(stopped, study.base_config, agent_step=600)
    assert study_script.main([*args, "--dry-run"]) == 0
    assert "1 complete, 1 to run" in capsys.readouterr().out
    # what a resume may change (logging) is no change, and a larger budget extends the runs
    relaxed = TINY.replace("log_every_agent_steps=300", "log_every_agent_steps=200").replace("=1200", "=2400")
    assert study_script.main([args[0], args[1], relaxed, grid, "--dry-run"]) == 0
    assert "0 complete, 2 to run" in capsys.readouterr().out
    new_settings = ["--set", "eval.games=3", "--set", "agent.lr=0.0005"]
    changed = [*args, *new_settings]
    for mode in ([], ["--dry-run"], ["--analyze-only"]):
        assert study_script.main([*changed, *mode]) == 2
        err = capsys.readouterr().err
        assert str(finished.run_dir) in err and str(stopped.run_dir) in err
        assert "eval.games: 2 -> 3" in err and "agent.lr: 0.001 -> 0.0005" in err
        assert "runs_dir=" in err and "--replace-changed" in err
    assert (finished.run_dir / "checkpoints" / "checkpoint_000000001200.pt").is_file()  # nothing was deleted
    smaller = TINY.replace("=1200", "=1100")  # a finished run went past a smaller budget: a change
    assert study_script.main([args[0], args[1], smaller, grid, "--dry-run"]) == 2
    assert "run.total_agent_steps: 1200 -> 1100" in capsys.readouterr().err
    # a run that a live driver holds is never deleted
    lock = finished.run_dir / "study.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")
    assert study_script.main([*changed, "--replace-changed"]) == 2
    assert "is being run by" in capsys.readouterr().err and (finished.run_dir / "config.yaml").is_file()
    lock.unlink()
    # --replace-changed deletes both runs and trains them again with the new settings
    ran = tmp_path / "ran.txt"
    script = tmp_path / "train.py"
    script.write_text(
        "import os, sys\n"
        "arg = dict(a.split('=', 1) for a in sys.argv if '=' in a)\n"
        "run_dir = os.path.join(arg['run.runs_dir'], arg['run.name'])\n"
        # the driver rewrites study.lock atomically with the run's pid once it has started: its temporary may show
        "names = sorted(n for n in os.listdir(run_dir) if not n.startswith('.study.lock.tmp'))\n"
        f"open({str(ran)!r}, 'a').write(arg['run.name'] + ' ' + ' '.join(names) + '\\n')\n"
        "open(os.path.join(run_dir, 'config.yaml'), 'w').write('run: {seed: 0}\\n')\n"
    )
    assert study_script.main([*args, f"train_script={script}", *new_settings, "--replace-changed"]) == 0
    out = capsys.readouterr().out
    assert out.count("replaced (deleted, to be trained again)") == 2 and "0 complete, 2 to run" in out
    assert sorted(ran.read_text().splitlines()) == sorted(f"{s.name} study.lock" for s in (finished, stopped))


def test_incomplete_runs_are_left_out_of_the_aggregates(tmp_path: Path) -> None:
    grid = "grid={network.parameterization: [normal, weight_norm], run.seed: [0, 1, 2]}"
    study = load_study_config(REPO / "configs/studies/smoke_cartpole.yaml", [f"runs_dir={tmp_path}", TINY, grid])
    normal_0, normal_1, _, wn_0, wn_1, _ = plan_runs(study)
    _trained_run(normal_0, study.base_config, evals={600: 5.0, 1200: 10.0})
    _trained_run(normal_1, study.base_config, evals={600: 5.0, 1200: 20.0})
    _trained_run(wn_0, study.base_config, evals={600: 5.0, 1200: 30.0})
    _trained_run(wn_1, study.base_config, agent_step=600, evals={600: 1000.0})  # crashed, killed or running
    paths = analyze_study(study)
    with paths["aggregate_csv"].open() as f:
        rows = {r["group"]: r for r in csv.DictReader(f)}
    assert rows["normal"]["final eval (mean ± std)"] == "15 ± 7.1" and rows["normal"]["runs"] == "2"
    assert rows["weight_norm"]["final eval (mean ± std)"] == "30" and rows["weight_norm"]["runs"] == "1"
    assert (rows["weight_norm"]["complete"], rows["weight_norm"]["incomplete"]) == ("1", "1")
    with paths["curves_csv"].open() as f:
        wn_eval = [r for r in csv.DictReader(f) if r["group"] == "weight_norm" and r["tag"] == "eval/return_mean"]
    assert [(r["agent_step"], r["mean"], r["runs"]) for r in wn_eval] == [("600", "5", "1"), ("1200", "30", "1")]
    summary = paths["summary"].read_text()
    left_out = summary.split("## Runs left out of the aggregates", 1)[1].split("\n## ", 1)[0]
    assert "--include-incomplete" in summary and left_out.count("| not started |") == 2
    row = f"| {wn_1.name} | CartPole-v1 | weight_norm | 1 | 600 of 1,200 agent steps"
    stopped = ": short of its budget (crashed, killed, interrupted or still running)"
    assert f"{row}{stopped}; running the study again continues it |" in left_out
    (wn_1.run_dir / "study.lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # a driver runs it
    left_out = analyze_study(study)["summary"].read_text().split("## Runs left out of the aggregates", 1)[1]
    assert row + ", running: study.lock present" in left_out
    with paths["runs_csv"].open() as f:
        assert len(list(csv.DictReader(f))) == 4  # every run that has data, complete or not
    included = analyze_study(study, include_incomplete=True)
    with included["aggregate_csv"].open() as f:
        rows = {r["group"]: r for r in csv.DictReader(f)}
    assert rows["weight_norm"]["final eval (mean ± std)"] == "515 ± 6.9e+02" and rows["weight_norm"]["runs"] == "2"
