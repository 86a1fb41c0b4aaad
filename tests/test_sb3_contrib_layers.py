"""The layers of wn_rl.sb3's policies for sb3-contrib's TQC (Truncated Quantile Critics) and MaskablePPO (invalid
action masking): against sb3-contrib's own policies, the one parameterization switch, per-part init_scale, and
the errors for observation spaces that do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib.ppo_mask import CnnPolicy as MaskableCnnPolicy
from sb3_contrib.ppo_mask import MlpPolicy as MaskableMlpPolicy
from sb3_contrib.ppo_mask import MultiInputPolicy as MaskableMultiInputPolicy
from sb3_contrib.tqc import CnnPolicy as TQCCnnPolicy
from sb3_contrib.tqc import MlpPolicy as TQCMlpPolicy
from sb3_contrib.tqc import MultiInputPolicy as TQCMultiInputPolicy
from sb3_contrib.tqc.policies import TQCPolicy
from sb3_contrib_helpers import (  # tests/sb3_contrib_helpers.py
    CONTINUOUS,
    DICT,
    DISCRETE,
    IMAGE,
    LR,
    VECTOR,
    plain_layers,
)

import wn_rl
from wn_rl.sb3 import (
    WnMaskableActorCriticCnnPolicy,
    WnMaskableActorCriticPolicy,
    WnMaskableMultiInputActorCriticPolicy,
    WnTQCCnnPolicy,
    WnTQCCritic,
    WnTQCMultiInputPolicy,
    WnTQCPolicy,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# -- layers: sb3-contrib's defaults, the parameterization switch, init_scale ---------------------------------

REFERENCES = {  # ours, sb3-contrib's, observation space, action space
    "tqc-mlp": (WnTQCPolicy, TQCMlpPolicy, VECTOR, CONTINUOUS),
    "tqc-cnn": (WnTQCCnnPolicy, TQCCnnPolicy, IMAGE, CONTINUOUS),
    "tqc-multi-input": (WnTQCMultiInputPolicy, TQCMultiInputPolicy, DICT, CONTINUOUS),
    "maskable-mlp": (WnMaskableActorCriticPolicy, MaskableMlpPolicy, VECTOR, DISCRETE),
    "maskable-cnn": (WnMaskableActorCriticCnnPolicy, MaskableCnnPolicy, IMAGE, DISCRETE),
    "maskable-multi-input": (WnMaskableMultiInputActorCriticPolicy, MaskableMultiInputPolicy, DICT, DISCRETE),
}


def batch_of(space: spaces.Space, n: int) -> np.ndarray | dict[str, np.ndarray]:
    space.seed(0)
    samples = [space.sample() for _ in range(n)]
    if isinstance(space, spaces.Dict):
        return {key: np.stack([sample[key] for sample in samples]) for key in space.spaces}
    return np.stack(samples)


def _outputs(policy, obs, actions, masks) -> list[torch.Tensor]:
    if isinstance(policy, TQCPolicy):
        mean, log_std, _ = policy.actor.get_action_dist_params(obs)
        return [mean, log_std, policy.critic(obs, actions), policy.critic_target(obs, actions)]
    values, log_prob, entropy = policy.evaluate_actions(obs, actions, action_masks=masks)
    return [values, log_prob, entropy, policy.get_distribution(obs, masks).distribution.probs]


@pytest.mark.parametrize("case", list(REFERENCES))
def test_normal_parameterization_is_sb3_contribs_policy_and_weight_norm_has_no_plain_layer(case):
    ours_class, reference_class, observation_space, action_space = REFERENCES[case]
    torch.manual_seed(0)
    ours = ours_class(observation_space, action_space, LR, parameterization="normal")
    reference = reference_class(observation_space, action_space, LR)
    assert ours.net_arch == reference.net_arch
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("initialized")}
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    reference.load_state_dict(state)
    obs, _ = ours.obs_to_tensor(batch_of(observation_space, 5))
    actions = torch.rand(5, 2) * 2 - 1 if action_space is CONTINUOUS else torch.tensor([0, 1, 2, 3, 1])
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=bool)
    with torch.no_grad():
        for got, expected in zip(
            _outputs(ours, obs, actions, masks), _outputs(reference, obs, actions, masks), strict=True
        ):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    wn = ours_class(observation_space, action_space, LR)
    assert not plain_layers(wn) and any(isinstance(m, wn_rl.WNLayer) for m in wn.modules())


def _tqc(parameterization: str, **kwargs) -> WnTQCPolicy:
    kwargs = dict(net_arch=[8, 8], n_quantiles=3, parameterization=parameterization, **kwargs)
    return WnTQCPolicy(VECTOR, CONTINUOUS, LR, **kwargs)


def _maskable(parameterization: str, **kwargs) -> WnMaskableActorCriticPolicy:
    return WnMaskableActorCriticPolicy(
        VECTOR, DISCRETE, LR, net_arch=[8, 8], parameterization=parameterization, **kwargs
    )


NORM_TYPES = {
    "batch_norm": torch.nn.BatchNorm1d,
    "mean_only_bn": wn_rl.MeanOnlyBatchNorm,
    "layer_norm": torch.nn.LayerNorm,
}


@pytest.mark.parametrize("parameterization", sorted(wn_rl.PARAMETERIZATIONS))
def test_one_switch_sets_every_layer_and_heads_never_get_a_norm(parameterization):
    p = wn_rl.Parameterization.get(parameterization)
    tqc, maskable = _tqc(parameterization), _maskable(parameterization)
    # TQC: actor 2 hidden + mu + log_std; critic and its target: 2 critics x (2 hidden + quantile head)
    # MaskablePPO: policy and value MLPs 2 + 2, action and value heads
    for policy, n_layers, n_hidden, heads in (
        (tqc, 4 + 6 + 6, 2 + 4 + 4, [tqc.actor.mu, tqc.actor.log_std, tqc.critic.qf0[-1], tqc.critic.qf1[-1]]),
        (maskable, 6, 4, [maskable.action_net, maskable.value_net]),
    ):
        layers = [m for m in policy.modules() if isinstance(m, wn_rl.WNLinear | torch.nn.Linear)]
        assert len(layers) == n_layers
        assert all(isinstance(m, wn_rl.WNLinear) == p.weight_norm for m in layers)
        assert all(hasattr(m, "initialized") for m in layers)
        norms = [m for m in policy.modules() if isinstance(m, tuple(NORM_TYPES.values()))]
        assert len(norms) == (n_hidden if p.norm else 0)
        assert all(isinstance(norm, NORM_TYPES[p.norm]) for norm in norms)
        assert all(isinstance(head, wn_rl.WNLinear | torch.nn.Linear) for head in heads)  # a layer, no norm after
    assert [tqc.actor.mu.init_scale, tqc.actor.log_std.init_scale, tqc.critic.qf0[-1].init_scale] == [0.01, 0.01, 1.0]
    assert [maskable.action_net.init_scale, maskable.value_net.init_scale] == [0.01, 1.0]
    assert isinstance(tqc.critic, WnTQCCritic) and tqc.critic.qf0[-1].out_features == 3


def test_init_scale_per_part_and_its_errors():
    tqc = _tqc("weight_norm", init_scale=dict(q=0.5, hidden=2.0, action=0.2, log_std=0.1))
    for q_net in (*tqc.critic.q_networks, *tqc.critic_target.q_networks):
        assert [m.init_scale for m in q_net if isinstance(m, wn_rl.WNLinear)] == [2.0, 2.0, 0.5]
    assert [tqc.actor.mu.init_scale, tqc.actor.log_std.init_scale] == [0.2, 0.1]
    assert {m.init_scale for m in tqc.actor.latent_pi if isinstance(m, wn_rl.WNLinear)} == {2.0}
    maskable = _maskable("weight_norm", init_scale=dict(action=0.1, value=2.0))
    assert [maskable.action_net.init_scale, maskable.value_net.init_scale] == [0.1, 2.0]
    with pytest.raises(
        ValueError, match=r"unknown part\(s\) \['value'\].*'features', 'hidden', 'action', 'log_std', 'q'"
    ):
        _tqc("weight_norm", init_scale=dict(value=1.0))
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['q'\].*'features', 'hidden', 'action', 'value'"):
        _maskable("weight_norm", init_scale=dict(q=1.0))
    with pytest.raises(ValueError, match=r"ortho_init=True is not supported by WnMaskableActorCriticPolicy"):
        _maskable("weight_norm", ortho_init=True)


FAMILIES = [  # multi-input, vector and image policy of each family, and its action space
    (WnTQCMultiInputPolicy, WnTQCPolicy, WnTQCCnnPolicy, CONTINUOUS),
    (WnMaskableMultiInputActorCriticPolicy, WnMaskableActorCriticPolicy, WnMaskableActorCriticCnnPolicy, DISCRETE),
]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family[1].__name__)
def test_each_policy_names_the_policy_that_fits_the_observation_space(family):
    multi, vector, image, action_space = (family[0].__name__, family[1].__name__, family[2].__name__, family[3])
    with pytest.raises(ValueError, match=rf"{multi} needs Dict observations.*Use {vector} for vector"):
        family[0](VECTOR, action_space, LR)
    with pytest.raises(ValueError, match=rf"{multi} needs Dict observations.*Use {image} for image"):
        family[0](IMAGE, action_space, LR)
    with pytest.raises(ValueError, match=rf"{vector} flattens one array.*use {multi}"):
        family[1](DICT, action_space, LR)
    with pytest.raises(ValueError, match=rf"{image} needs image observations.*Use {multi} for Dict"):
        family[2](DICT, action_space, LR)
    with pytest.raises(ValueError, match=rf"{image} needs image observations.*Use {vector} for vector"):
        family[2](VECTOR, action_space, LR)
