"""Bad input to the tools around training fails at once, with the file, the key and the fix, and exit 2:
SB3 hyperparameters out of range (at config load, before any env or model is built), a checkpoint that does
not fit its run's config.yaml and an unwritable --video folder (before any env is built or game played), an
empty or damaged config.yaml in a run directory (a bad run is left out of the analysis, not the whole figure),
an empty config file (never a run of every default), an --out figure path matplotlib cannot write, and a study
whose grid names an env that does not exist (caught by --dry-run)."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agents.dqn.config import load_dqn_config, load_run_config
from agents.dqn.dormant import run_dormant_report
from agents.dqn.run_dir import check_resume_config
from agents.dqn.runner import Trainer
from wn_rl.analysis.runs import load_run
from wn_rl.analysis.study import load_study_config, plan_runs
from wn_rl.checkpoint import CheckpointError
from wn_rl.config import ConfigError, read_yaml
from wn_rl.sb3.config import ALGORITHMS, build_hyperparameters, load_sb3_config, load_sb3_run_config
from wn_rl.sb3.runner import SB3Run

REPO = Path(__file__).resolve().parents[1]
SB3_CARTPOLE = REPO / "configs" / "sb3" / "dqn_cartpole_wn.yaml"
SB3_PPO = REPO / "configs" / "sb3" / "ppo_pong_wn.yaml"
SB3_SAC = REPO / "configs" / "sb3" / "sac_pendulum_wn.yaml"
STUDY = REPO / "configs" / "studies" / "smoke_cartpole.yaml"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"wn_rl_script_bad_input_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory) -> Path:
    """A finished native DQN run of CartPole (600 agent steps, one checkpoint)."""
    runs = tmp_path_factory.mktemp("runs")
    overrides = [
        f"run.runs_dir={runs}",
        "run.total_agent_steps=600",
        "eval.every_agent_steps=0",
        "run.progress_bar=false",
        "run.device=cpu",
        "run.torch_threads=1",
        "agent.learning_starts_agent_steps=100",
    ]
    Trainer(load_dqn_config(REPO / "configs" / "dqn" / "cartpole.yaml", overrides), runs / "r").run()
    return runs / "r"


def _copy(run: Path, tmp_path: Path, config_text: str | None = None) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    if config_text is not None:
        (copy / "config.yaml").write_text(config_text)
    return copy


def _other_parameterization(run: Path, tmp_path: Path) -> Path:
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["network"]["parameterization"] == "weight_norm"
    config["network"]["parameterization"] = "batch_norm"
    return _copy(run, tmp_path, yaml.safe_dump(config))


def _no_envs(*args, **kwargs):
    raise AssertionError("an env was built for the games before the checkpoint was matched to the config")


# ----- A: SB3 hyperparameters are range-checked when the config loads ----------------------------------------


@pytest.mark.parametrize(
    ("path", "override", "message"),
    [
        (SB3_CARTPOLE, "hyperparameters.batch_size=0", "batch_size=0 is invalid: expected an integer >= 1"),
        (SB3_CARTPOLE, "hyperparameters.gamma=2", r"gamma=2 is invalid: expected a number in \[0, 1\]"),
        (SB3_CARTPOLE, "hyperparameters.exploration_fraction=-3", r"exploration_fraction=-3 is invalid"),
        (SB3_CARTPOLE, "hyperparameters.exploration_final_eps=1.5", r"exploration_final_eps=1.5 is invalid"),
        (SB3_CARTPOLE, "hyperparameters.tau=-0.1", r"tau=-0.1 is invalid"),
        (SB3_CARTPOLE, "hyperparameters.train_freq=0", r"train_freq=0 is invalid: expected an integer >= 1"),
        (SB3_CARTPOLE, "hyperparameters.train_freq=[2, epoch]", r"train_freq=\[2, 'epoch'\] is invalid"),
        (SB3_CARTPOLE, "hyperparameters.gradient_steps=-2", r"gradient_steps=-2 is invalid: .*or -1"),
        (SB3_CARTPOLE, "hyperparameters.learning_starts=-1", r"learning_starts=-1 is invalid"),
        (SB3_CARTPOLE, "hyperparameters.buffer_size=0", r"buffer_size=0 is invalid"),
        (SB3_CARTPOLE, "hyperparameters.target_update_interval=0", r"target_update_interval=0 is invalid"),
        (SB3_CARTPOLE, "hyperparameters.learning_rate=-1e-3", r"learning_rate=-0.001 is invalid"),
        (SB3_CARTPOLE, "hyperparameters.learning_rate=.inf", r"learning_rate=inf is invalid"),
        (SB3_CARTPOLE, "hyperparameters.learning_rate=lin_0", r"learning_rate='lin_0' is invalid"),
        (SB3_CARTPOLE, "hyperparameters.batch_size=true", r"batch_size=True is invalid"),
        (SB3_CARTPOLE, "policy_kwargs.optimizer_kwargs.betas=[0.9]", r"betas=\[0.9\] is invalid: expected two"),
        (SB3_CARTPOLE, "policy_kwargs.optimizer_kwargs.betas=[0.9, 1.0]", r"betas=\[0.9, 1.0\] is invalid"),
        (SB3_PPO, "hyperparameters.n_steps=0", r"n_steps=0 is invalid"),
        (SB3_PPO, "hyperparameters.n_epochs=0", r"n_epochs=0 is invalid"),
        (SB3_PPO, "hyperparameters.gae_lambda=1.5", r"gae_lambda=1.5 is invalid"),
        (SB3_PPO, "hyperparameters.ent_coef=-0.01", r"ent_coef=-0.01 is invalid: expected a number >= 0"),
        (SB3_PPO, "hyperparameters.ent_coef=auto", r"ent_coef='auto' is invalid: expected a number >= 0"),
        (SB3_PPO, "hyperparameters.vf_coef=-1", r"vf_coef=-1 is invalid"),
        (SB3_PPO, "hyperparameters.clip_range=0", r"clip_range=0 is invalid"),
        (SB3_SAC, "hyperparameters.ent_coef=auto_x", r"ent_coef='auto_x' is invalid: .*'auto_<initial value>'"),
        (SB3_SAC, "hyperparameters.ent_coef=auto_-1", r"ent_coef='auto_-1' is invalid"),
    ],
)
def test_sb3_hyperparameters_out_of_range_fail_when_the_config_loads(path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_sb3_config(path, [override])


@pytest.mark.parametrize(
    ("path", "override", "key", "built"),
    [
        (SB3_CARTPOLE, "hyperparameters.gradient_steps=-1", "gradient_steps", -1),  # as many as env steps
        (SB3_CARTPOLE, "hyperparameters.gradient_steps=0", "gradient_steps", 0),
        (SB3_CARTPOLE, "hyperparameters.train_freq=[1, episode]", "train_freq", (1, "episode")),
        (SB3_CARTPOLE, "hyperparameters.buffer_size=1e5", "buffer_size", 100_000),  # the float 1e5, as an integer
        (SB3_CARTPOLE, "hyperparameters.learning_starts=0", "learning_starts", 0),
        (SB3_SAC, "hyperparameters.ent_coef=auto", "ent_coef", "auto"),
        (SB3_SAC, "hyperparameters.ent_coef=auto_0.1", "ent_coef", "auto_0.1"),
        (SB3_SAC, "hyperparameters.ent_coef=0.2", "ent_coef", 0.2),
        (SB3_PPO, "hyperparameters.clip_range_vf=null", "clip_range_vf", None),  # PPO's default: no clipping
        (SB3_PPO, "hyperparameters.ent_coef=0", "ent_coef", 0),
    ],
)
def test_sb3_values_the_algorithms_accept_still_load(path, override, key, built):
    config = load_sb3_config(path, [override, "init.enabled=false"])  # learning_starts=0: no init batch
    assert build_hyperparameters(config).get(key) == built
    if key == "buffer_size":
        assert isinstance(build_hyperparameters(config)[key], int)


def test_train_sb3_with_a_bad_hyperparameter_exits_2_before_anything_is_built(tmp_path):
    args = [f"runs_dir={tmp_path}", "run_name=r", "progress_bar=false", "hyperparameters.train_freq=0"]
    script = REPO / "scripts" / "train_sb3.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--config", str(SB3_CARTPOLE), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hyperparameters.train_freq=0 is invalid" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("error", [IndexError, KeyError])
def test_an_index_or_key_error_of_the_algorithm_is_a_config_error_naming_the_keys(
    tmp_path, monkeypatch, one_torch_thread, error
):
    class Rejecting(ALGORITHMS["dqn"]):
        def __init__(self, *args, **kwargs):
            raise error("tuple index out of range")

    config = load_sb3_config(SB3_CARTPOLE, [f"runs_dir={tmp_path}", "run_name=r", "progress_bar=false"])
    monkeypatch.setitem(ALGORITHMS, "dqn", Rejecting)  # as a policy or torch would fail inside SB3's constructor
    with pytest.raises(ConfigError, match=rf"rejects this config \(check policy_kwargs .* {error.__name__}"):
        SB3Run(config, tmp_path / "r")._build()
    assert not (tmp_path / "r").exists()


# ----- B: a checkpoint that does not fit config.yaml; an unwritable --video -----------------------------------


def test_evaluate_with_a_checkpoint_that_does_not_fit_the_config_exits_2_before_the_envs(
    cartpole_run, tmp_path, monkeypatch, capsys, one_torch_thread
):
    copy = _other_parameterization(cartpole_run, tmp_path)
    evaluate = _load_script("evaluate")
    monkeypatch.setattr(evaluate, "make_env", _no_envs)
    assert evaluate.main([str(copy), "--games", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this run's config" in err and str(copy / "config.yaml") in err
    assert str(copy / "checkpoints") in err and "Traceback" not in err


def test_dormant_units_with_a_checkpoint_that_does_not_fit_the_config_is_a_checkpoint_error(
    cartpole_run, tmp_path, monkeypatch, one_torch_thread
):
    copy = _other_parameterization(cartpole_run, tmp_path)
    monkeypatch.setattr("agents.dqn.dormant.make_env", _no_envs)
    with pytest.raises(CheckpointError, match=r"does not fit this run's config \(.*config\.yaml\)"):
        run_dormant_report(copy, num_envs=1, steps=2)
    dormant_units = _load_script("dormant_units")
    assert dormant_units.main([str(copy), "--envs", "1", "--steps", "2", "--device", "cpu"]) == 2


def test_evaluate_and_dormant_units_still_measure_a_run_that_fits(cartpole_run, capsys, one_torch_thread):
    assert _load_script("evaluate").main([str(cartpole_run), "--games", "1", "--device", "cpu"]) == 0
    report = run_dormant_report(cartpole_run, num_envs=1, steps=4)
    assert report["agent_step"] == 600 and report["states"] == 4


def test_evaluate_checks_the_video_folder_before_any_game(cartpole_run, tmp_path, monkeypatch, capsys):
    evaluate = _load_script("evaluate")
    monkeypatch.setattr(evaluate, "make_env", _no_envs)
    with pytest.raises(SystemExit) as stop:
        evaluate.main([str(cartpole_run), "--video", str(tmp_path / "nodir" / "a.gif")])
    assert stop.value.code == 2
    assert f"its folder {tmp_path / 'nodir'} does not exist" in capsys.readouterr().err


# ----- C: an empty or damaged config.yaml in a run directory --------------------------------------------------


def test_resuming_a_run_with_an_empty_config_yaml_names_the_file(cartpole_run, tmp_path):
    copy = _copy(cartpole_run, tmp_path, "")
    config = load_run_config(cartpole_run)
    with pytest.raises(ConfigError, match=r"config\.yaml is empty: .* is not a complete run directory"):
        check_resume_config(copy, config, force=False)
    with pytest.raises(ConfigError, match=r"is empty"):
        check_resume_config(copy, config, force=True)  # --force cannot compare with nothing either


def test_resuming_an_sb3_run_with_an_empty_config_yaml_names_the_file(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("# nothing\n")
    config = load_sb3_config(SB3_CARTPOLE, [f"runs_dir={tmp_path}", "run_name=r", "progress_bar=false"])
    with pytest.raises(ConfigError, match=r"config\.yaml is empty: .* not a complete run directory of .*train_sb3"):
        SB3Run(config, tmp_path / "r", resume=True)
    with pytest.raises(ConfigError, match=r"config\.yaml is empty: .* not a complete run directory of .*train_sb3"):
        load_sb3_run_config(tmp_path / "r")  # train_sb3.py --resume RUN


@pytest.mark.parametrize("text", ["", "env: [\n"])
def test_evaluate_refuses_an_empty_or_damaged_config_yaml(cartpole_run, tmp_path, monkeypatch, capsys, text):
    copy = _copy(cartpole_run, tmp_path, text)
    evaluate = _load_script("evaluate")
    monkeypatch.setattr(evaluate, "make_env", _no_envs)
    assert evaluate.main([str(copy), "--games", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(copy / "config.yaml") in err and ("is empty" in err or "not valid YAML" in err)


def test_plot_curves_leaves_out_a_run_whose_config_yaml_is_damaged(cartpole_run, tmp_path, capsys):
    good = _copy(cartpole_run, tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(cartpole_run, bad)
    (bad / "config.yaml").write_text("env: [\n")
    empty = tmp_path / "empty"
    shutil.copytree(cartpole_run, empty)
    (empty / "config.yaml").write_text("")
    plot_curves = _load_script("plot_curves")
    out = tmp_path / "fig" / "a.png"
    assert plot_curves.main([str(good), str(bad), str(empty), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"left out (cannot be read): {bad}: " in captured.out and f"{empty}: " in captured.out
    table = out.with_suffix(".md").read_text()
    assert "## Runs that could not be read" in table and str(bad) in table and out.is_file()
    assert plot_curves.main([str(bad), str(empty), "--out", str(out)]) == 2
    assert "none of the 2 runs can be read" in capsys.readouterr().err

    from wn_rl.analysis.runs import load_runs  # one bad run leaves out itself

    runs, unreadable = load_runs([good, bad, empty])
    assert [r.run_dir for r in runs] == [good]
    assert [d for d, _ in unreadable] == [bad, empty]
    assert "not valid YAML" in unreadable[0][1] and "is empty" in unreadable[1][1]
    with pytest.raises(ConfigError, match="is empty"):
        load_run(empty)


# ----- D: an empty config file is an error, for every loader --------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_an_empty_config_file_is_an_error_naming_it_for_every_loader(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    for load in (read_yaml, load_dqn_config, load_sb3_config, load_study_config):
        with pytest.raises(ConfigError, match=r"empty\.yaml' is empty .*expected a mapping .*configs/dqn/smoke\.yaml"):
            load(path)


# ----- E: plot_curves.py --out that matplotlib cannot write ---------------------------------------------------


def test_plot_curves_checks_the_figure_path_before_reading_any_run(tmp_path, capsys):
    plot_curves = _load_script("plot_curves")
    missing_runs = str(tmp_path / "no_runs_here")  # were the runs read first, this would be the error
    assert plot_curves.main([missing_runs, "--out", str(tmp_path / "a.txt")]) == 2
    err = capsys.readouterr().err
    assert "cannot write a .txt figure" in err and "png" in err and "Traceback" not in err
    (tmp_path / "file").write_text("x")
    assert plot_curves.main([missing_runs, "--out", str(tmp_path / "file" / "a.png")]) == 2
    assert f"its folder {tmp_path / 'file'} cannot be created" in capsys.readouterr().err
    (tmp_path / "d.png").mkdir()
    assert plot_curves.main([missing_runs, "--out", str(tmp_path / "d.png")]) == 2
    assert f"{tmp_path / 'd.png'} is a folder" in capsys.readouterr().err


# ----- F: a study checks its env names when it plans --------------------------------------------------------


def test_a_study_with_an_unknown_env_name_fails_when_planned_and_in_dry_run(tmp_path, capsys):
    overrides = ["grid={env.name: [CartPoleX-v1]}", f"runs_dir={tmp_path}", f"out_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"study 'smoke_cartpole', run .*CartPoleX-v1.* not a registered gymnasium"):
        plan_runs(load_study_config(STUDY, overrides))
    study = _load_script("study")
    assert study.main([str(STUDY), *overrides, "--dry-run"]) == 2
    assert "env.name='CartPoleX-v1'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing launched
    assert len(plan_runs(load_study_config(STUDY, [f"runs_dir={tmp_path}"]))) == 4  # a real env still plans
