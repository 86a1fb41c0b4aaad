"""A study config's mistakes are errors when it loads, before any run is planned or started: a fixed
override that the grid, the study or a later override would override silently, and a report key
(group_by, task_key, sweep_key) that no DQN config has or a sweep that cannot be drawn."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from wn_rl.analysis.study import load_study_config, plan_runs, with_run_overrides
from wn_rl.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "studies" / "smoke_cartpole.yaml"
STUDIES = sorted((REPO / "configs" / "studies").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def _study_file(tmp_path: Path, **changes: object) -> Path:
    """smoke_cartpole.yaml with ``changes`` to its top-level keys, written to ``tmp_path``."""
    data = {**yaml.safe_load(SMOKE.read_text()), **changes}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_pass_the_load_checks(path: Path) -> None:
    study = load_study_config(path)
    assert study.group_by and study.task_key


def test_an_override_of_a_grid_key_is_an_error_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    path = _study_file(tmp_path, overrides=["run.total_agent_steps=2000", "run.seed=3"])
    with pytest.raises(ConfigError) as info:
        load_study_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: overrides: 'run.seed=3' sets run.seed, a grid key (values [0, 1])")
    assert "remove 'run.seed=3' from overrides, or run.seed from grid" in message


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("run={seed: 3}", r"'run=\{seed: 3\}' sets run\.seed, a grid key"),  # a mapping over a grid key
        ("network.parameterization=weight_norm", r"sets network\.parameterization, a grid key"),
        ("run.torch_threads=4", r"run\.torch_threads is set by the study .*torch_threads=4"),
        ("run.runs_dir=elsewhere", r"run\.runs_dir is set by the study .*runs_dir="),
        ("run.name=mine", r"run\.name is set by the study"),
        ("run.progress_bar=true", r"run\.progress_bar is set by the study .*remove it from overrides"),
    ],
)
def test_an_override_the_study_would_override_is_an_error(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_study_config(SMOKE, [f'overrides=["{override}"]'])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["eval.games=2", "eval.games=3"], r"'eval\.games=2' and then 'eval\.games=3': both set eval\.games"),
        (["eval={games: 2}", "eval.games=3"], r"both set eval\.games"),
        (["eval.games=2", "eval={games: 3, every_agent_steps: 10}"], r"both set eval\.games"),
    ],
)
def test_an_override_set_twice_is_an_error(tmp_path: Path, overrides: list[str], match: str) -> None:
    """The later of two overrides of a key won silently."""
    with pytest.raises(ConfigError, match=f"{match}, and the later one wins silently; keep one"):
        load_study_config(_study_file(tmp_path, overrides=overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["eval={games: 2}", "eval.every_agent_steps=600"],
        ["eval.games=2", "eval={every_agent_steps: 600}"],  # a mapping merges: it dropped eval.games before
        ["eval={games: 2}", "eval={every_agent_steps: 600}"],
    ],
)
def test_overrides_of_different_keys_of_one_section_stay_allowed(tmp_path: Path, overrides: list[str]) -> None:
    study = load_study_config(_study_file(tmp_path, overrides=overrides))
    config = plan_runs(study)[0].config
    assert (config["eval"]["games"], config["eval"]["every_agent_steps"]) == (2, 600)


def test_a_set_mapping_beside_a_grid_key_is_allowed_and_one_over_it_refused() -> None:
    """``--set`` is checked by the keys its value sets, as the study's own overrides are: a mapping over the
    section of a grid key is refused only where it names that key."""
    study = with_run_overrides(load_study_config(SMOKE), ["network={hidden_sizes: [32]}"])
    configs = [run.config["network"] for run in plan_runs(study)]
    assert [c["hidden_sizes"] for c in configs] == [[32]] * 4
    assert {c["parameterization"] for c in configs} == {"normal", "weight_norm"}
    with pytest.raises(ConfigError, match=r"--set run=\{seed: 3\}: run\.seed is a grid key"):
        with_run_overrides(load_study_config(SMOKE), ["run={seed: 3}"])


def test_a_set_mapping_keeps_what_earlier_overrides_set(tmp_path: Path) -> None:
    """``--set agent={...}`` merges into the agent section: it replaced it, dropping the study's ``agent.gamma``."""
    study = load_study_config(_study_file(tmp_path, overrides=["agent.gamma=0.95"]))
    merged = plan_runs(with_run_overrides(study, ["agent={epsilon_end: 0.2}"]))[0].config["agent"]
    assert merged["gamma"] == 0.95 and merged["epsilon_end"] == 0.2
    both = plan_runs(with_run_overrides(study, ["eval.games=2", "eval={every_agent_steps: 10}"]))[0].config["eval"]
    assert (both["games"], both["every_agent_steps"]) == (2, 10)
    allowed = with_run_overrides(study, ["agent.lr=0.001", "agent={lr: 0.002, epsilon_end: 0.1}"])
    assert plan_runs(allowed)[0].config["agent"]["lr"] == 0.002  # setting a key again is what --set is for


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("group_by=[network.parametrization]", r"group_by: 'network\.parametrization' .*'network\.parameterization'"),
        ("group_by=[network.parameterization, run.sed]", r"group_by: 'run\.sed' .*did you mean 'run\.seed'"),
        ("task_key=env.nme", r"task_key: 'env\.nme' .*did you mean 'env\.name'"),
        ("sweep_key=agent.lrr", r"sweep_key: 'agent\.lrr' .*did you mean 'agent\.lr'"),
    ],
)
def test_a_misspelt_report_key_fails_before_any_run(
    tmp_path: Path, override: str, match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It put every run under '?' in the report written at the end of the study."""
    script = tmp_path / "train.py"
    script.write_text("import sys\nsys.exit(0)\n")
    runs_dir = tmp_path / "runs"
    args = [str(SMOKE), f"runs_dir={runs_dir}", f"train_script={script}", override]
    assert _study_script().main(args) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not runs_dir.exists()


def test_common_names_are_report_keys() -> None:
    study = load_study_config(
        SMOKE, ["group_by=[seed]", "task_key=task", "sweep_key=lr", "grid={agent.lr: [1e-3, 1e-4]}"]
    )
    assert study.sweep_key == "lr"


def test_a_sweep_key_outside_the_grid_is_an_error() -> None:
    with pytest.raises(
        ConfigError, match=r"sweep_key: 'agent\.lr' is not a grid key, .*\['network\.parameterization', 'run\.seed'\]"
    ):
        load_study_config(SMOKE, ["sweep_key=agent.lr"])


def test_sweep_values_that_do_not_sort_are_an_error() -> None:
    """plot_sweep sorts the swept values: a null among learning rates raised TypeError once the study was done."""
    with pytest.raises(ConfigError, match=r"grid values of agent\.lr, \[None, 0\.001\], cannot be ordered"):
        load_study_config(SMOKE, ["sweep_key=agent.lr", "grid={agent.lr: [null, 0.001]}"])
    strings = load_study_config(SMOKE, ["sweep_key=network.parameterization"])  # a categorical axis: drawn
    assert strings.sweep_key == "network.parameterization"


def _study_script():
    spec = importlib.util.spec_from_file_location("wn_rl_script_study_config", REPO / "scripts" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
