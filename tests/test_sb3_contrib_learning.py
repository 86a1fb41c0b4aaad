"""wn_rl.sb3's TQC and MaskablePPO policies learning with the real algorithms on small envs (tiny budgets) after
data-dependent init, save/load round trips, the shipped configs and the runner (train, checkpoint, resume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sb3_contrib import TQC, MaskablePPO
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from sb3_contrib_helpers import DICT, IMAGE, RandomObservations, plain_layers  # tests/sb3_contrib_helpers.py

import wn_rl
from wn_rl.config import ConfigError
from wn_rl.sb3 import (
    DataDependentInitCallback,
    WnMaskableActorCriticCnnPolicy,
    WnMaskableActorCriticPolicy,
    WnMaskableMultiInputActorCriticPolicy,
    WnStatsCallback,
    WnTQCCnnPolicy,
    WnTQCMultiInputPolicy,
    WnTQCPolicy,
)
from wn_rl.sb3.config import ALGORITHMS, load_sb3_config, resolve_policy
from wn_rl.sb3.runner import SB3Run

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# -- learning, save / load -----------------------------------------------------------------------------------

SMALL = dict(net_arch=[16], features_extractor_kwargs=dict(features_dim=16))
OFF_POLICY = dict(learning_starts=64, buffer_size=256, batch_size=16, train_freq=4)
CASES = {  # algorithm, policy, env, hyperparameters, policy_kwargs
    "tqc-mlp": (TQC, WnTQCPolicy, lambda: "Pendulum-v1", OFF_POLICY, dict(net_arch=[16], n_quantiles=5)),
    "tqc-cnn": (TQC, WnTQCCnnPolicy, lambda: RandomObservations(IMAGE, continuous=True), OFF_POLICY, SMALL),
    "tqc-multi-input": (
        TQC,
        WnTQCMultiInputPolicy,
        lambda: RandomObservations(DICT, continuous=True),
        OFF_POLICY,
        dict(net_arch=[16], features_extractor_kwargs=dict(cnn_output_dim=16), n_quantiles=5),
    ),
    "maskable-mlp": (
        MaskablePPO,
        WnMaskableActorCriticPolicy,
        lambda: InvalidActionEnvDiscrete(dim=10, n_invalid_actions=8),
        dict(n_steps=64, batch_size=32, n_epochs=2),
        dict(net_arch=[16]),
    ),
    "maskable-cnn": (
        MaskablePPO,
        WnMaskableActorCriticCnnPolicy,
        lambda: RandomObservations(IMAGE),
        dict(n_steps=64, batch_size=32, n_epochs=1),
        SMALL,
    ),
    "maskable-multi-input": (
        MaskablePPO,
        WnMaskableMultiInputActorCriticPolicy,
        lambda: RandomObservations(DICT),
        dict(n_steps=64, batch_size=32, n_epochs=1),
        dict(net_arch=[16], features_extractor_kwargs=dict(cnn_output_dim=16)),
    ),
}


def masks_of(model) -> np.ndarray | None:
    return np.stack(model.env.env_method("action_masks")) if isinstance(model, MaskablePPO) else None


@pytest.mark.parametrize("case", list(CASES))
def test_policy_learns_with_its_algorithm_after_data_dependent_init(case):
    algo, policy, make, hyper, policy_kwargs = CASES[case]
    model = algo(policy, make(), policy_kwargs=dict(policy_kwargs), seed=0, **hyper)
    ddi, stats = DataDependentInitCallback(n_samples=64), WnStatsCallback(log_freq=64)
    model.learn(128, callback=[ddi, stats])
    assert model.num_timesteps >= 128 and ddi.done and not ddi.skipped
    assert all(report.layers for report in ddi.reports.values()) and wn_rl.is_initialized(model.policy)
    assert not plain_layers(model.policy) and any(isinstance(m, wn_rl.WNLayer) for m in model.policy.modules())
    assert stats.last_stats and all(np.isfinite(v) for v in stats.last_stats.values())
    assert model._n_updates > 0
    obs = model.env.reset()
    masks = masks_of(model)
    action, _ = model.predict(obs, deterministic=True, **({} if masks is None else {"action_masks": masks}))
    assert model.action_space.contains(action[0])
    if masks is not None:
        assert masks[0, int(action[0])]


@pytest.mark.parametrize("algo", [TQC, MaskablePPO], ids=["tqc", "maskable_ppo"])
def test_model_and_policy_save_load_round_trip_and_no_reinit(algo, tmp_path):
    kwargs = dict(parameterization="weight_norm+mean_only_bn", net_arch=[16, 16])
    if algo is TQC:
        model = TQC(WnTQCPolicy, "Pendulum-v1", seed=0, policy_kwargs=dict(kwargs, n_quantiles=5), **OFF_POLICY)
    else:
        env = InvalidActionEnvDiscrete(dim=10, n_invalid_actions=8)
        model = MaskablePPO(WnMaskableActorCriticPolicy, env, n_steps=64, batch_size=32, seed=0, policy_kwargs=kwargs)
    model.learn(128, callback=DataDependentInitCallback(n_samples=64))
    state = model.policy.state_dict()
    assert any(k.endswith("running_mean") and not torch.all(v == 0) for k, v in state.items())
    model.save(tmp_path / "model.zip")
    loaded = algo.load(tmp_path / "model.zip", env=model.env, device="cpu")
    model.policy.save(tmp_path / "policy.pt")
    loaded_policy = type(model.policy).load(tmp_path / "policy.pt", device="cpu")
    assert type(loaded.policy) is type(model.policy) and loaded_policy.parameterization == model.policy.parameterization
    for other in (loaded.policy.state_dict(), loaded_policy.state_dict()):
        assert other.keys() == state.keys()
        for key, tensor in state.items():
            assert torch.equal(other[key], tensor), key
    obs, masks = model.env.reset(), masks_of(model)
    extra = {} if masks is None else {"action_masks": masks}
    expected, _ = model.predict(obs, deterministic=True, **extra)
    for other in (loaded, loaded_policy):
        np.testing.assert_array_equal(other.predict(obs, deterministic=True, **extra)[0], expected)
    ddi = DataDependentInitCallback(n_samples=64)
    loaded.learn(64, callback=ddi, reset_num_timesteps=False)
    assert ddi.skipped and ddi.reports == {}


# -- configs and the runner ----------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sb3"


@pytest.mark.parametrize("name", ["tqc_pendulum", "maskable_ppo_invalid_actions"])
def test_shipped_configs_resolve_to_our_policy_and_sb3_contribs(name):
    wn, normal = load_sb3_config(f"{CONFIGS}/{name}_wn.yaml"), load_sb3_config(f"{CONFIGS}/{name}_normal.yaml")
    algo = ALGORITHMS[wn.algo]
    assert wn.algo == normal.algo and algo in (TQC, MaskablePPO)
    assert resolve_policy(wn.algo, wn.policy) is (WnTQCPolicy if algo is TQC else WnMaskableActorCriticPolicy)
    assert resolve_policy(normal.algo, normal.policy) == "MlpPolicy"
    assert {k: v for k, v in vars(wn).items() if k not in ("policy", "policy_kwargs")} == {
        k: v for k, v in vars(normal).items() if k not in ("policy", "policy_kwargs")
    }
    if algo is TQC:
        assert wn.hyperparameters["learning_starts"] >= wn.init.n_samples
    with pytest.raises(ConfigError, match=r"init\.n_samples=256 needs hyperparameters\.learning_starts >= 256"):
        load_sb3_config(f"{CONFIGS}/tqc_pendulum_wn.yaml", ["hyperparameters.learning_starts=100"])
    with pytest.raises(ConfigError, match=r"hyperparameters\.learning_starts is not an argument of MaskablePPO"):
        load_sb3_config(f"{CONFIGS}/maskable_ppo_invalid_actions_wn.yaml", ["hyperparameters.learning_starts=1"])


@pytest.mark.parametrize(
    ("algo", "policy", "fits"),
    [
        ("tqc", "WnSACPolicy", "WnTQCPolicy"),  # sac -> tqc keeping the policy: it crashed at the first update
        ("sac", "WnTQCPolicy", "WnSACPolicy"),
        ("maskable_ppo", "WnActorCriticPolicy", "WnMaskableActorCriticPolicy"),
        ("ppo", "WnMaskableActorCriticPolicy", "WnActorCriticPolicy"),
        ("ppo", "WnRecurrentActorCriticPolicy", "WnActorCriticPolicy"),  # a subclass of PPO's, with another call
        ("recurrent_ppo", "WnActorCriticPolicy", "WnRecurrentActorCriticPolicy"),
        ("td3", "WnSACPolicy", "WnTD3Policy"),
    ],
)
def test_a_policy_of_another_algorithm_is_a_config_error_naming_the_ones_that_fit(algo, policy, fits):
    with pytest.raises(ConfigError, match=rf"policy='{policy}' is not a policy of {ALGORITHMS[algo].__name__}.*{fits}"):
        load_sb3_config(f"{CONFIGS}/tqc_pendulum_wn.yaml", [f"algo={algo}", f"policy={policy}", "hyperparameters={}"])
    for name in ("WnTQCPolicy", "WnTQCCnnPolicy", "WnMaskableMultiInputActorCriticPolicy", "WnSACPolicy"):
        owner = "tqc" if "TQC" in name else "maskable_ppo" if "Maskable" in name else "sac"
        assert resolve_policy(owner, name).__name__ == name


def _run(tmp_path, name: str, *overrides: str) -> tuple[SB3Run, dict]:
    common = [f"runs_dir={tmp_path}", f"run_name={name}", "progress_bar=false", "verbose=0", "torch_threads=1"]
    config = load_sb3_config(f"{CONFIGS}/{name}_wn.yaml", [*common, *overrides])
    resume = (tmp_path / name / "config.yaml").is_file()
    run = SB3Run(config, tmp_path / name, resume=resume)
    return run, run.train()


def test_runner_trains_checkpoints_and_resumes_tqc_with_its_replay_buffer(tmp_path):
    tiny = [
        "hyperparameters.learning_starts=64",
        "hyperparameters.batch_size=16",
        "policy_kwargs.net_arch=[16]",
        "policy_kwargs.n_quantiles=5",
        "init.n_samples=64",
        "checkpoint_freq=100",
        "save_replay_buffer=true",
        "eval.freq=0",
        "wn_stats_freq=50",
    ]
    _, first = _run(tmp_path, "tqc_pendulum", *tiny, "total_timesteps=200")
    run_dir = tmp_path / "tqc_pendulum"
    assert first["num_timesteps"] == 200 and (run_dir / "checkpoints" / "replay_buffer_200_steps.pkl").is_file()
    _, resumed = _run(tmp_path, "tqc_pendulum", *tiny, "total_timesteps=250")
    assert resumed["start_timesteps"] == 200 and resumed["num_timesteps"] == 250
    assert resumed["resumed_from"].endswith("final_model.zip")
    model = TQC.load(run_dir / "final_model.zip")
    model.load_replay_buffer(run_dir / "final_replay_buffer.pkl")
    assert isinstance(model.policy, WnTQCPolicy) and wn_rl.is_initialized(model.policy)
    assert model.num_timesteps == 250 and model.replay_buffer.size() == 250  # the first run's transitions kept


def test_runner_trains_evaluates_with_masks_and_resumes_maskable_ppo(tmp_path):
    tiny = [
        "n_envs=2",
        "hyperparameters.n_steps=64",
        "hyperparameters.n_epochs=1",
        "policy_kwargs.net_arch=[16]",
        "init.n_samples=64",
        "checkpoint_freq=128",
        "eval.freq=128",
        "eval.episodes=2",
    ]
    _, first = _run(tmp_path, "maskable_ppo_invalid_actions", *tiny, "total_timesteps=128")
    run_dir = tmp_path / "maskable_ppo_invalid_actions"
    assert first["num_timesteps"] == 128 and (run_dir / "checkpoints" / "model_128_steps.zip").is_file()
    with np.load(run_dir / "eval" / "evaluations.npz") as data:
        # Two valid actions of ten at each step, one rewarded: a policy acting with masks scores about half of
        # the 100 steps even untrained; without them its greedy action is valid about a fifth of the time.
        assert data["results"].mean() >= 30
    _, resumed = _run(tmp_path, "maskable_ppo_invalid_actions", *tiny, "total_timesteps=256")
    assert resumed["start_timesteps"] == 128 and resumed["num_timesteps"] == 256
    model = MaskablePPO.load(run_dir / "final_model.zip")
    assert isinstance(model.policy, WnMaskableActorCriticPolicy) and model.num_timesteps == 256
    with np.load(run_dir / "eval" / "evaluations.npz") as data:
        assert data["timesteps"].tolist() == [128, 256]  # the evaluations continued
