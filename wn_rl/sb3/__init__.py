"""Weight-normalized policies, features extractors and callbacks for stable-baselines3.

Pass the policy classes to SB3 exactly as SB3's own::

    DQN(WnCnnPolicy, env)
    PPO(WnActorCriticCnnPolicy, env, policy_kwargs=dict(parameterization="weight_norm+mean_only_bn"))
    SAC(WnSACMultiInputPolicy, goal_env, replay_buffer_class=HerReplayBuffer)   # Dict observations
    TQC(WnTQCPolicy, env); MaskablePPO(WnMaskableActorCriticPolicy, env_with_action_masks)  # sb3-contrib
    TRPO(WnActorCriticPolicy, env)  # sb3-contrib: PPO's policies

and add :class:`DataDependentInitCallback` (section 3 of the paper) and :class:`WnStatsCallback`
to ``learn`` (and :class:`NonFiniteGuardCallback`, which keeps NaN/inf steps out of the model). A policy that
starts training without the init warns once (:class:`UninitializedPolicyWarning`). The ablation's start,
torch's default init of every online network with the targets synced, is :func:`torch_default_init_policy`.
"""

from wn_rl.sb3.callbacks import DataDependentInitCallback, WnStatsCallback
from wn_rl.sb3.common import UninitializedPolicyWarning
from wn_rl.sb3.continuous import (
    WnContinuousCritic,
    WnSACActor,
    WnSACCnnPolicy,
    WnSACMultiInputPolicy,
    WnSACPolicy,
    WnTD3Actor,
    WnTD3CnnPolicy,
    WnTD3MultiInputPolicy,
    WnTD3Policy,
    WnTQCActor,
    WnTQCCnnPolicy,
    WnTQCCritic,
    WnTQCMultiInputPolicy,
    WnTQCPolicy,
)
from wn_rl.sb3.dqn import (
    WnCnnPolicy,
    WnDQNPolicy,
    WnMlpPolicy,
    WnMultiInputPolicy,
    WnQNetwork,
    WnQRDQNCnnPolicy,
    WnQRDQNMlpPolicy,
    WnQRDQNMultiInputPolicy,
    WnQRDQNPolicy,
    WnQuantileNetwork,
)
from wn_rl.sb3.guard import NonFiniteGuardCallback
from wn_rl.sb3.init import initialize_policy, online_networks, sync_target_networks, torch_default_init_policy
from wn_rl.sb3.on_policy import (
    WnActorCriticCnnPolicy,
    WnActorCriticPolicy,
    WnMaskableActorCriticCnnPolicy,
    WnMaskableActorCriticPolicy,
    WnMaskableMultiInputActorCriticPolicy,
    WnMultiInputActorCriticPolicy,
)
from wn_rl.sb3.recurrent import (
    WNLSTM,
    WnRecurrentActorCriticCnnPolicy,
    WnRecurrentActorCriticPolicy,
    WnRecurrentMultiInputActorCriticPolicy,
)
from wn_rl.sb3.torch_layers import WnCombinedExtractor, WnMlpExtractor, WnNatureCNN

__all__ = [
    "WNLSTM",
    "DataDependentInitCallback",
    "NonFiniteGuardCallback",
    "UninitializedPolicyWarning",
    "WnStatsCallback",
    "initialize_policy",
    "online_networks",
    "sync_target_networks",
    "torch_default_init_policy",
    "WnActorCriticCnnPolicy",
    "WnActorCriticPolicy",
    "WnCnnPolicy",
    "WnCombinedExtractor",
    "WnContinuousCritic",
    "WnDQNPolicy",
    "WnMaskableActorCriticCnnPolicy",
    "WnMaskableActorCriticPolicy",
    "WnMaskableMultiInputActorCriticPolicy",
    "WnMlpExtractor",
    "WnMlpPolicy",
    "WnMultiInputActorCriticPolicy",
    "WnMultiInputPolicy",
    "WnNatureCNN",
    "WnQNetwork",
    "WnQRDQNCnnPolicy",
    "WnQRDQNMlpPolicy",
    "WnQRDQNMultiInputPolicy",
    "WnQRDQNPolicy",
    "WnQuantileNetwork",
    "WnRecurrentActorCriticCnnPolicy",
    "WnRecurrentActorCriticPolicy",
    "WnRecurrentMultiInputActorCriticPolicy",
    "WnSACActor",
    "WnSACCnnPolicy",
    "WnSACMultiInputPolicy",
    "WnSACPolicy",
    "WnTD3Actor",
    "WnTD3CnnPolicy",
    "WnTD3MultiInputPolicy",
    "WnTD3Policy",
    "WnTQCActor",
    "WnTQCCnnPolicy",
    "WnTQCCritic",
    "WnTQCMultiInputPolicy",
    "WnTQCPolicy",
]
