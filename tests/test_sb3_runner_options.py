"""SB3Run's options around training: init.enabled=false trains from the fresh init without touching the process's
warning filters (runs in threads of one process keep theirs), the dormant-unit keys reach WnStatsCallback and may
change on resume, and a resume lists the run's saved models once."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import pytest
import yaml
from stable_baselines3.common.callbacks import BaseCallback

import wn_rl.sb3.checkpoints
from wn_rl.analysis.runs import sb3_saved_models
from wn_rl.config import ConfigError, config_to_dict
from wn_rl.sb3 import UninitializedPolicyWarning, WnStatsCallback
from wn_rl.sb3.config import load_sb3_config
from wn_rl.sb3.envs import register_envs
from wn_rl.sb3.runner import SB3Run

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sb3"
SMALL = ["progress_bar=false", "verbose=0", "eval.freq=0", "checkpoint_freq=0", "policy_kwargs.net_arch=[16]"]


class _WatchFilters(BaseCallback):
    """Records whether ``warnings.filters`` is, during training, the very list it was before (same object and
    content): a ``warnings.catch_warnings`` around ``learn`` swaps in a copy for every thread of the process."""

    def __init__(self) -> None:
        super().__init__()
        self.before = warnings.filters
        self.before_content = list(warnings.filters)
        self.unchanged: list[bool] = []
        self.updates = 0

    def _on_step(self) -> bool:
        self.unchanged.append(warnings.filters is self.before and warnings.filters == self.before_content)
        return True

    def _on_training_end(self) -> None:
        self.updates = self.model._n_updates


@pytest.mark.parametrize(
    "config_name,overrides",
    [
        ("dqn_cartpole_wn.yaml", ["hyperparameters.train_freq=4", "hyperparameters.gradient_steps=1"]),
        ("sac_pendulum_wn.yaml", ["hyperparameters.train_freq=1", "hyperparameters.gradient_steps=1"]),
    ],
)
@pytest.mark.parametrize("init_enabled", [False, True])
def test_init_disabled_is_told_to_the_policy_not_to_the_warning_filters(
    tmp_path, monkeypatch, config_name, overrides, init_enabled
):
    budget = [f"runs_dir={tmp_path}", "total_timesteps=64", "init.n_samples=32", "hyperparameters.learning_starts=32"]
    config = load_sb3_config(CONFIGS / config_name, [*SMALL, *budget, *overrides, f"init.enabled={init_enabled}"])
    run = SB3Run(config, tmp_path / "run")
    callbacks = run._callbacks
    register_envs()  # imports ale_py, whose import adds a filter of its own (once per process)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = _WatchFilters()
        monkeypatch.setattr(run, "_callbacks", lambda model: [*callbacks(model), watch])
        run.train()
    assert watch.updates >= 2 and watch.unchanged and all(watch.unchanged)
    assert not [w for w in caught if issubclass(w.category, UninitializedPolicyWarning)]


def test_dormant_keys_are_checked_when_the_config_loads():
    path = CONFIGS / "dqn_cartpole_wn.yaml"
    for tau in ("-0.1", ".nan", ".inf"):
        with pytest.raises(ConfigError, match=r"dormant_tau=.* is invalid: expected a finite threshold >= 0"):
            load_sb3_config(path, [f"dormant_tau={tau}"])
    with pytest.raises(ConfigError, match=r"dormant=True is invalid: expected false, or wn_stats_freq > 0"):
        load_sb3_config(path, ["dormant=true", "wn_stats_freq=0"])
    default = load_sb3_config(path)
    assert (default.dormant, default.dormant_tau) == (False, 0.0)


def test_dormant_keys_reach_the_stats_callback(tmp_path):
    overrides = [*SMALL, f"runs_dir={tmp_path}", "dormant=true", "dormant_tau=0.25", "wn_stats_freq=100"]
    run = SB3Run(load_sb3_config(CONFIGS / "dqn_cartpole_wn.yaml", overrides), tmp_path / "run")
    env, model = run._build()
    try:
        stats = [c for c in run._callbacks(model) if isinstance(c, WnStatsCallback)]
    finally:
        env.close()
    assert [(s.log_freq, s.dormant, s.dormant_tau) for s in stats] == [(100, True, 0.25)]


def test_dormant_keys_may_change_on_resume(tmp_path):
    path = CONFIGS / "dqn_cartpole_wn.yaml"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = config_to_dict(load_sb3_config(path, [*SMALL, f"runs_dir={tmp_path}"]))
    changed = load_sb3_config(path, [*SMALL, f"runs_dir={tmp_path}", "dormant=true", "dormant_tau=0.1"])
    for old in (saved, {k: v for k, v in saved.items() if not k.startswith("dormant")}):  # and a run from before
        (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
        assert SB3Run(changed, run_dir, resume=True).resume_from is None  # no ConfigError; no model yet


def test_resuming_a_complete_run_lists_its_saved_models_once(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with zipfile.ZipFile(run_dir / "final_model.zip", "w") as archive:  # complete as a zip; never loaded here
        archive.writestr("data", "{}")
    (run_dir / "final_steps.json").write_text(json.dumps({"num_timesteps": 128}))
    listings = []

    def counted(directory):
        listings.append(directory)
        return sb3_saved_models(directory)

    monkeypatch.setattr(wn_rl.sb3.checkpoints, "sb3_saved_models", counted)
    monkeypatch.setattr("wn_rl.sb3.runner.sb3_saved_models", counted, raising=False)
    config = load_sb3_config(CONFIGS / "dqn_cartpole_wn.yaml", [*SMALL, f"runs_dir={tmp_path}", "total_timesteps=128"])
    summary = SB3Run(config, run_dir, resume=True).train()
    assert summary["num_timesteps"] == summary["start_timesteps"] == 128
    assert "at step 128; the run is complete" in capsys.readouterr().out
    assert len(listings) == 1
