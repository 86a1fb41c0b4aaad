"""sb3-contrib's TRPO (Schulman et al. 2015) with wn_rl.sb3's actor-critic policies: the Fisher-vector products of
TRPO's conjugate-gradient step (a double backward through every parameterization, our custom autograd Functions
included) against finite differences in float64, learning after data-dependent init, frozen norm statistics
refreshed from every rollout, save/load round trips, the configs and ``train_sb3.py`` end to end."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import stable_baselines3.common.policies as sb3_policies
import torch
from sb3_contrib import TRPO
from sb3_contrib_helpers import DICT, IMAGE, RandomObservations, plain_layers  # tests/sb3_contrib_helpers.py
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import StateDependentNoiseDistribution, kl_divergence
from test_sb3_train import run_script  # scripts/train_sb3.py as a subprocess

import wn_rl
from wn_rl import layers, mean_only_batch_norm
from wn_rl.config import ConfigError
from wn_rl.sb3 import (
    DataDependentInitCallback,
    WnActorCriticCnnPolicy,
    WnActorCriticPolicy,
    WnMultiInputActorCriticPolicy,
    WnStatsCallback,
)
from wn_rl.sb3.config import load_sb3_config, resolve_policy
from wn_rl.sb3.guard import NonFiniteGuardCallback, NonFiniteTrainingError
from wn_rl.sb3.init import initialize_policy
from wn_rl.sb3.on_policy import running_norms

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sb3"
NORMED = ("batch_norm", "mean_only_bn", "weight_norm+mean_only_bn")  # the parameterizations with running statistics
N_OBS = 64
# The second hidden layer of WIDE has 2**16 weights and more input features than the batch has rows: on the CPU
# in float64 a WN layer then runs as layers._WNLinearFn (see layers._scale_outputs), whose backward is our own.
WIDE = [256, 256]
SMALL = [16, 16]
DISTRIBUTIONS = {  # env id, TRPO kwargs
    "categorical": ("CartPole-v1", {}),
    "gaussian": ("Pendulum-v1", {}),
    "gsde": ("Pendulum-v1", dict(use_sde=True)),
}


# -- the Fisher-vector product of TRPO's conjugate-gradient step -------------------------------------------------


def _float64_model(monkeypatch, distribution: str, parameterization: str, net_arch: list[int], freeze: bool) -> TRPO:
    """A TRPO model whose WN policy is initialised from random observations, then cast to float64 (SB3 casts
    observations to float32: kept float64 here)."""
    monkeypatch.setattr(sb3_policies, "preprocess_obs", lambda obs, space, normalize_images=True: obs)
    env_id, kwargs = DISTRIBUTIONS[distribution]
    policy_kwargs = dict(parameterization=parameterization, net_arch=net_arch, freeze_norm_statistics=freeze)
    model = TRPO(WnActorCriticPolicy, env_id, n_steps=N_OBS, seed=0, policy_kwargs=policy_kwargs, **kwargs)
    space = model.observation_space
    initialize_policy(model.policy, torch.as_tensor(np.stack([space.sample() for _ in range(256)])))
    model.policy.double()
    model.policy.set_training_mode(True)  # as TRPO.train
    return model


def _kl_gradient(policy: WnActorCriticPolicy, obs: torch.Tensor, old, params: list[torch.Tensor]) -> torch.Tensor:
    """d KL(pi_theta || pi_old) / d theta, flattened: a first derivative only (the reference trusts first
    derivatives, which tests/test_layers_math.py and tests/test_layers_fast_paths.py check against the
    materialised weight; second ones are in question)."""
    kl = kl_divergence(policy.get_distribution(obs), old).mean()
    return torch.cat([grad.reshape(-1) for grad in torch.autograd.grad(kl, params)])


def _finite_difference(policy, obs, old, params, vector: torch.Tensor, step: float = 1e-5) -> torch.Tensor:
    """H v from central differences of the KL gradient along v, Richardson-extrapolated (error O(step**4))."""
    start = [p.detach().clone() for p in params]

    def gradient_at(h: float) -> torch.Tensor:
        with torch.no_grad():
            for p, p0, dp in zip(params, start, vector.split([p.numel() for p in params]), strict=True):
                p.copy_(p0 + h * dp.view_as(p))
        return _kl_gradient(policy, obs, old, params)

    def central(h: float) -> torch.Tensor:
        return (gradient_at(h) - gradient_at(-h)) / (2 * h)

    try:
        return (4 * central(step / 2) - central(step)) / 3
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)


def _hold_gsde_features(monkeypatch, policy: WnActorCriticPolicy, obs: torch.Tensor) -> None:
    """gSDE's std is a function of the policy's latent features, which SB3 detaches (``learn_features=False``):
    TRPO's product is the Hessian with them held constant, so the finite differences hold them at their
    current value too (moving them would add the columns the detach leaves out)."""
    if not isinstance(policy.action_dist, StateDependentNoiseDistribution):
        return
    with torch.no_grad():
        latent = policy.mlp_extractor.forward_actor(policy.extract_features(obs))
    proba_distribution = policy.action_dist.proba_distribution
    held = lambda mean_actions, log_std, latent_sde: proba_distribution(mean_actions, log_std, latent)  # noqa: E731
    monkeypatch.setattr(policy.action_dist, "proba_distribution", held)


def trpo_fisher_vector_product(model: TRPO, monkeypatch, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(TRPO's Hessian-vector product of the KL divergence, its finite-difference reference) for a random vector,
    at the policy that collected the batch, as ``TRPO.train`` computes it (its own ``_compute_actor_grad`` and
    ``hessian_vector_product``; the damping taken off)."""
    generator = torch.Generator().manual_seed(seed)
    space, policy = model.observation_space, model.policy
    space.seed(seed)
    obs = torch.as_tensor(np.stack([space.sample() for _ in range(N_OBS)]), dtype=torch.float64)
    with torch.no_grad():
        old = copy.copy(policy.get_distribution(obs))
        actions = old.distribution.sample()
        old_log_prob = old.log_prob(actions)
    distribution = policy.get_distribution(obs)
    advantages = torch.randn(N_OBS, generator=generator, dtype=torch.float64)
    objective = (advantages * torch.exp(distribution.log_prob(actions) - old_log_prob)).mean()
    kl = kl_divergence(distribution, old).mean()
    params, _, grad_kl, _ = model._compute_actor_grad(kl, objective)
    vector = torch.randn(grad_kl.numel(), generator=generator, dtype=torch.float64)
    product = model.hessian_vector_product(params, grad_kl, vector, retain_graph=False) - model.cg_damping * vector
    _hold_gsde_features(monkeypatch, policy, obs)
    return product.detach(), _finite_difference(policy, obs, old, params, vector)


def _count_calls(monkeypatch, function: type[torch.autograd.Function]) -> list[int]:
    """A counter of ``function.apply`` calls from now on, so a test knows it ran through that Function."""
    calls = [0]
    apply = function.apply

    def counted(*args):
        calls[0] += 1
        return apply(*args)

    monkeypatch.setattr(function, "apply", counted)
    return calls


HVP_CASES = [
    (parameterization, width, distribution, True)
    for parameterization in wn_rl.PARAMETERIZATIONS
    for width in ("small", "wide")
    for distribution in DISTRIBUTIONS
] + [(parameterization, width, "categorical", False) for parameterization in NORMED for width in ("small", "wide")]


@pytest.mark.parametrize(
    ("parameterization", "width", "distribution", "freeze"),
    HVP_CASES,
    ids=["-".join([p, w, d] + ([] if f else ["batch_statistics"])) for p, w, d, f in HVP_CASES],
)
def test_trpo_fisher_vector_product_matches_finite_differences(
    parameterization, width, distribution, freeze, monkeypatch
):
    """TRPO differentiates the KL gradient once more (``create_graph=True``); every parameterization must give the
    second derivative autograd promises, through our custom Functions too (``freeze=False``: the norm layers on
    batch statistics, so the product goes through the batch mean of mean-only batch norm's Function)."""
    model = _float64_model(monkeypatch, distribution, parameterization, WIDE if width == "wide" else SMALL, freeze)
    custom_linear = _count_calls(monkeypatch, layers._WNLinearFn)
    custom_mean = _count_calls(monkeypatch, mean_only_batch_norm._MeanOnlyBatchNormFn)
    product, reference = trpo_fisher_vector_product(model, monkeypatch)
    p = wn_rl.Parameterization.get(parameterization)
    assert (custom_linear[0] > 0) is (width == "wide" and p.weight_norm)  # the wide WN layer ran as _WNLinearFn
    assert (custom_mean[0] > 0) is (p.norm == "mean_only_bn" and not freeze)  # batch means: _MeanOnlyBatchNormFn
    assert reference.abs().max() > 1e-3  # a product worth comparing
    error = float((product - reference).abs().max() / reference.abs().max())
    assert error < 1e-8, f"max |TRPO - finite differences| / max |finite differences| = {error:.2e}"


# -- learning, frozen statistics, save / load --------------------------------------------------------------------

LEARN_CASES = {  # policy, env, policy_kwargs, TRPO kwargs
    "mlp-categorical": (WnActorCriticPolicy, lambda: "CartPole-v1", dict(net_arch=[16]), {}),
    "mlp-gsde": (
        WnActorCriticPolicy,
        lambda: "Pendulum-v1",
        dict(net_arch=[16]),
        dict(use_sde=True, sde_sample_freq=4),
    ),
    "cnn": (
        WnActorCriticCnnPolicy,
        lambda: RandomObservations(IMAGE),
        dict(net_arch=[16], features_extractor_kwargs=dict(features_dim=16)),
        {},
    ),
    "multi-input": (
        WnMultiInputActorCriticPolicy,
        lambda: RandomObservations(DICT),
        dict(net_arch=[16], features_extractor_kwargs=dict(cnn_output_dim=16)),
        {},
    ),
}


class _AfterInit(BaseCallback):
    """The policy's parameters and buffers at training start, after :class:`DataDependentInitCallback` (listed
    before it)."""

    def _on_training_start(self) -> None:
        policy = self.model.policy
        self.params = {k: v.detach().clone() for k, v in policy.named_parameters()}
        self.buffers = {k: v.clone() for k, v in policy.named_buffers()}

    def _on_step(self) -> bool:
        return True


@pytest.mark.parametrize("case", list(LEARN_CASES))
def test_trpo_learns_with_each_wn_policy_after_data_dependent_init(case):
    policy, make_env, policy_kwargs, kwargs = LEARN_CASES[case]
    model = TRPO(policy, make_env(), n_steps=64, batch_size=32, seed=0, policy_kwargs=policy_kwargs, **kwargs)
    ddi, after_init, stats = DataDependentInitCallback(n_samples=64), _AfterInit(), WnStatsCallback(log_freq=64)
    model.learn(256, callback=[ddi, after_init, stats])
    assert model.num_timesteps == 256 and model._n_updates == 4
    assert ddi.done and not ddi.skipped and wn_rl.is_initialized(model.policy)
    assert not plain_layers(model.policy) and any(isinstance(m, wn_rl.WNLayer) for m in model.policy.modules())
    assert stats.last_stats and all(np.isfinite(v) for v in stats.last_stats.values())
    moved = {k for k, v in model.policy.named_parameters() if not torch.equal(v, after_init.params[k])}
    assert any(k.startswith("action_net.") for k in moved), "no line search was accepted: the actor never moved"
    assert any(k.startswith("value_net.") for k in moved)  # the critic's own updates
    action, _ = model.predict(model.env.reset(), deterministic=True)
    assert model.action_space.contains(action[0])


@pytest.mark.parametrize("parameterization", NORMED)
def test_trpo_refreshes_frozen_norm_statistics_from_every_rollout(parameterization):
    """TRPO trains through ``get_distribution`` and ``predict_values``, never ``evaluate_actions``: the frozen
    statistics are refreshed from the observations it reads there, in the actor's and the critic's norm layers
    alike (they stayed those of the data-dependent init)."""
    policy_kwargs = dict(parameterization=parameterization, net_arch=dict(pi=[16], vf=[16]), norm_refresh_samples=64)
    model = TRPO(WnActorCriticPolicy, "CartPole-v1", n_steps=128, batch_size=32, seed=0, policy_kwargs=policy_kwargs)
    norms = running_norms(model.policy)
    at_rollouts: list[list[torch.Tensor]] = []

    class RolloutStart(BaseCallback):
        def _on_rollout_start(self) -> None:
            at_rollouts.append([m.running_mean.clone() for m in norms])

        def _on_step(self) -> bool:
            return True

    model.learn(384, callback=[DataDependentInitCallback(n_samples=64), RolloutStart()])
    assert len(norms) == 2 and len(at_rollouts) == 3  # one norm layer per MLP
    for before, after in itertools.pairwise(at_rollouts):
        assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(not m.training for m in norms)  # frozen even while TRPO trains
    assert model.policy._norm_batch_samples == 64  # the last training phase's sample, refreshed when acting resumes
    pending = [m.running_mean.clone() for m in norms]
    model.policy.set_training_mode(False)
    assert model.policy._norm_batch_samples == 0
    assert all(not torch.equal(a, m.running_mean) for a, m in zip(pending, norms, strict=True))


def test_trpo_model_and_policy_save_load_round_trip_every_tensor_exactly(tmp_path):
    kwargs = dict(parameterization="weight_norm+mean_only_bn", net_arch=[16, 16])
    model = TRPO(
        WnActorCriticPolicy, "Pendulum-v1", n_steps=64, batch_size=32, use_sde=True, seed=0, policy_kwargs=kwargs
    )
    after_init = _AfterInit()
    model.learn(128, callback=[DataDependentInitCallback(n_samples=64), after_init])
    state = model.policy.state_dict()  # refreshes the statistics the last training phase left pending
    means = [k for k in state if k.endswith("running_mean")]
    assert means and all(not torch.equal(state[k], after_init.buffers[k]) for k in means)  # the last rollout's
    model.save(tmp_path / "model.zip")
    model.policy.save(tmp_path / "policy.pt")
    loaded = TRPO.load(tmp_path / "model.zip", env=model.env, device="cpu")
    loaded_policy = WnActorCriticPolicy.load(tmp_path / "policy.pt", device="cpu")
    assert type(loaded.policy) is WnActorCriticPolicy and loaded.use_sde
    for other in (loaded.policy.state_dict(), loaded_policy.state_dict()):
        assert other.keys() == state.keys()
        for key, tensor in state.items():
            assert other[key].dtype == tensor.dtype and torch.equal(other[key], tensor), key
    obs = model.env.reset()
    expected, _ = model.predict(obs, deterministic=True)
    for other in (loaded, loaded_policy):
        np.testing.assert_array_equal(other.predict(obs, deterministic=True)[0], expected)
    ddi = DataDependentInitCallback(n_samples=64)
    loaded.learn(64, callback=ddi, reset_num_timesteps=False)
    assert ddi.skipped and ddi.reports == {}


# -- the NaN guard: TRPO moves its actor without an optimizer ---------------------------------------------------


def _nan_gradient(module: torch.nn.Module, inputs, output: torch.Tensor) -> None:
    """A forward hook: the output unchanged, its gradient NaN (only where autograd records: in ``train``)."""
    if output.requires_grad:
        output.register_hook(lambda grad: grad * float("nan"))


class _BeforeUpdate(BaseCallback):
    """The policy's parameters before each update; with ``nan_advantages`` one advantage of the rollout made NaN
    (as a critic whose values overflow would make it), the returns left finite so the critic's update stays sound."""

    def __init__(self, nan_advantages: bool = False) -> None:
        super().__init__()
        self.nan_advantages = nan_advantages
        self.params: dict[str, torch.Tensor] = {}

    def _on_rollout_end(self) -> None:
        self.params = {k: v.detach().clone() for k, v in self.model.policy.named_parameters()}
        if self.nan_advantages:
            self.model.rollout_buffer.advantages[0] = np.nan

    def _on_step(self) -> bool:
        return True


def _tiny_trpo() -> TRPO:
    kwargs = dict(n_steps=64, batch_size=32, n_critic_updates=2, seed=0)
    return TRPO(WnActorCriticPolicy, "CartPole-v1", policy_kwargs=dict(net_arch=[16]), **kwargs)


@pytest.fixture(params=[True, False], ids=["validated", "unvalidated"])
def distribution_checks(request):
    """torch.distributions' argument checks on (the default) and off (as under ``python -O``)."""
    default = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(request.param)
    yield request.param
    torch.distributions.Distribution.set_default_validate_args(default)


@pytest.mark.parametrize("fault", ["nan_advantages", "nan_actor_gradient", "negative_curvature"])
def test_guard_stops_trpo_when_its_actor_update_is_not_finite_and_the_actor_stays_finite(
    fault, distribution_checks, tmp_path
):
    """TRPO's actor step is a line search writing ``param.data``, out of the optimizer guard's reach. A NaN
    objective (``nan_advantages``), a NaN search direction under a finite objective (``nan_actor_gradient``) or a
    NaN step size from finite gradients (``negative_curvature``: s^T H s < 0) makes every trial NaN: unguarded,
    TRPO then fails in a torch.distributions argument check with the NaN left in the actor or, with the checks off,
    rejects every trial (comparisons with NaN are false) and goes on, never learning. The guard stops the run at
    the first trial with its own error and puts the actor back."""
    model = _tiny_trpo()
    if fault == "nan_actor_gradient":
        model.policy.action_net.register_forward_hook(_nan_gradient)
    if fault == "negative_curvature":
        model.cg_damping = -1e3  # H - 1000 I: s^T H s < 0, so TRPO's step size sqrt(2 target_kl / s^T H s) is NaN
    checkpoint = tmp_path / "model_0_steps.zip"
    before, guard = _BeforeUpdate(nan_advantages=fault == "nan_advantages"), NonFiniteGuardCallback(lambda: checkpoint)
    with pytest.raises(NonFiniteTrainingError) as info, np.errstate(invalid="ignore"):
        model.learn(256, callback=[DataDependentInitCallback(n_samples=64), before, guard])
    message = str(info.value)
    assert "at TRPO update 1;" in message and info.value.step == 1
    if fault == "negative_curvature":  # the gradients were finite: the step was not
        assert "in the line-search step (search direction x step size) of policy.mlp_extractor" in message
    else:
        assert "in the gradients of TRPO's actor (" in message and "policy.action_net.v" in message
    assert info.value.tensor.startswith("policy.mlp_extractor.policy_net.0.")
    assert f"environment step 64; last good checkpoint: {checkpoint}" in message
    assert model.num_timesteps == 64 and model._n_updates == 0  # stopped inside the first update
    for name, param in model.policy.named_parameters():
        if "value" not in name:  # TRPO's actor: put back as it was before the update, finite
            assert torch.equal(param, before.params[name]), name
    assert all(not param._backward_hooks for param in model.policy.parameters())  # nothing left on the policy
    assert not model.policy.action_net._forward_pre_hooks
    with pytest.raises(NonFiniteTrainingError, match="at TRPO update 1;"):  # a checkpoint would not be written
        guard.check()


def test_guard_leaves_a_healthy_trpo_run_alone_and_guards_its_critic_as_before():
    model, after_init = _tiny_trpo(), _AfterInit()
    model.learn(128, callback=[DataDependentInitCallback(n_samples=64), after_init, NonFiniteGuardCallback()])
    assert model._n_updates == 2
    assert not torch.equal(model.policy.action_net.v, after_init.params["action_net.v"])  # the actor learned
    assert all(not param._backward_hooks for param in model.policy.parameters())
    model.policy.value_net.register_forward_hook(_nan_gradient)
    with pytest.raises(NonFiniteTrainingError) as info:
        model.learn(128, callback=NonFiniteGuardCallback(), reset_num_timesteps=False)
    message = str(info.value)
    assert "in the gradient of policy.optimizer: " in message and "policy.optimizer: policy.value_net.v" in message
    assert "TRPO" not in message and "policy.action_net" not in message
    assert all(torch.isfinite(param).all() for param in model.policy.parameters())


# -- configs and train_sb3.py ------------------------------------------------------------------------------------


def test_trpo_configs_are_the_zoos_pendulum_with_our_policy_and_sb3_contribs():
    wn, normal = (load_sb3_config(CONFIGS / f"trpo_pendulum_{kind}.yaml") for kind in ("wn", "normal"))
    assert resolve_policy(wn.algo, wn.policy) is WnActorCriticPolicy
    assert resolve_policy(normal.algo, normal.policy) == "MlpPolicy"
    assert {k: v for k, v in vars(wn).items() if k not in ("policy", "policy_kwargs")} == {
        k: v for k, v in vars(normal).items() if k not in ("policy", "policy_kwargs")
    }
    zoo = dict(n_steps=1024, gamma=0.9, n_critic_updates=15, use_sde=True, sde_sample_freq=4)  # hyperparams/trpo.yml
    assert wn.algo == "trpo" and wn.hyperparameters == zoo and wn.n_envs == 2 and wn.total_timesteps == 100_000
    with pytest.raises(ConfigError, match=r"hyperparameters\.learning_starts is not an argument of TRPO"):
        load_sb3_config(CONFIGS / "trpo_pendulum_wn.yaml", ["hyperparameters.learning_starts=1000"])


@pytest.mark.parametrize(
    "policy", ["WnRecurrentActorCriticPolicy", "WnMaskableActorCriticPolicy", "WnSACPolicy", "WnMlpPolicy"]
)
def test_trpo_config_takes_the_actor_critic_policies_and_names_them_for_others(policy):
    for name in ("WnActorCriticPolicy", "WnActorCriticCnnPolicy", "WnMultiInputActorCriticPolicy"):
        assert resolve_policy("trpo", name).__name__ == name
    with pytest.raises(ConfigError, match=rf"policy='{policy}' is not a policy of TRPO .*'WnActorCriticPolicy'"):
        load_sb3_config(CONFIGS / "trpo_pendulum_wn.yaml", [f"policy={policy}"])


def test_train_sb3_trains_evaluates_checkpoints_and_resumes_trpo(tmp_path):
    common = [f"runs_dir={tmp_path}", "run_name=trpo", "progress_bar=false", "torch_threads=1", "verbose=0"]
    tiny = ["hyperparameters.n_steps=64", "hyperparameters.n_critic_updates=2", "policy_kwargs.net_arch=[16]"]
    first = run_script(
        "--config",
        "configs/sb3/trpo_pendulum_wn.yaml",
        "total_timesteps=256",  # two updates of 2 envs x 64 steps
        "init.n_samples=64",
        "checkpoint_freq=128",
        "eval.freq=128",
        "eval.episodes=1",
        "wn_stats_freq=64",
        *tiny,
        *common,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "trpo"
    summary = json.loads(first.stdout[first.stdout.rindex("\n{\n") :])
    assert first.stdout.startswith("algo: trpo\n") and summary["num_timesteps"] == 256
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("model_*.zip")) == [
        "model_128_steps.zip",
        "model_256_steps.zip",
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(run_dir / "tb_1")).Reload().Tags()["scalars"]
    assert "train/kl_divergence_loss" in scalars and any(t.startswith("ddi/policy/") for t in scalars)
    assert any(t.startswith("wn/policy/") for t in scalars)

    second = run_script("--resume", str(run_dir), "total_timesteps=384", *common)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = json.loads(second.stdout[second.stdout.rindex("\n{\n") :])
    assert resumed["start_timesteps"] == 256 and resumed["num_timesteps"] == 384
    assert resumed["resumed_from"].endswith("final_model.zip")
    model = TRPO.load(run_dir / "final_model.zip")
    assert isinstance(model.policy, WnActorCriticPolicy) and wn_rl.is_initialized(model.policy)
    assert model.num_timesteps == 384 and model.use_sde and model.n_critic_updates == 2
    with np.load(run_dir / "eval" / "evaluations.npz") as data:
        assert data["timesteps"].tolist() == [128, 256, 384]  # the evaluations continued
