"""Weight-normalized policies, features extractors and callbacks for stable-baselines3.

Pass the policy classes to SB3 exactly as SB3's own::

    DQN(WnCnnPolicy, env)
    PPO(WnActorCriticCnnPolicy, env, policy_kwargs=dict(parameterization="weight_norm+mean_only_bn"))

and add :class:`DataDependentInitCallback` (section 3 of the paper) and :class:`WnStatsCallback`
to ``learn`` (and :class:`NonFiniteGuardCallback`, which keeps NaN/inf steps out of the model).
"""

from wn_rl.sb3.callbacks import DataDependentInitCallback, WnStatsCallback
from wn_rl.sb3.continuous import (
    WnContinuousCritic,
    WnSACActor,
    WnSACCnnPolicy,
    WnSACPolicy,
    WnTD3Actor,
    WnTD3CnnPolicy,
    WnTD3Policy,
)
from wn_rl.sb3.dqn import (
    WnCnnPolicy,
    WnDQNPolicy,
    WnMlpPolicy,
    WnQNetwork,
    WnQRDQNCnnPolicy,
    WnQRDQNMlpPolicy,
    WnQRDQNPolicy,
    WnQuantileNetwork,
)
from wn_rl.sb3.guard import NonFiniteGuardCallback
from wn_rl.sb3.init import initialize_policy, online_networks, sync_target_networks
from wn_rl.sb3.on_policy import WnActorCriticCnnPolicy, WnActorCriticPolicy
from wn_rl.sb3.recurrent import WNLSTM, WnRecurrentActorCriticCnnPolicy, WnRecurrentActorCriticPolicy
from wn_rl.sb3.torch_layers import WnMlpExtractor, WnNatureCNN

__all__ = [
    "WNLSTM",
    "DataDependentInitCallback",
    "NonFiniteGuardCallback",
    "WnStatsCallback",
    "initialize_policy",
    "online_networks",
    "sync_target_networks",
    "WnActorCriticCnnPolicy",
    "WnActorCriticPolicy",
    "WnCnnPolicy",
    "WnContinuousCritic",
    "WnDQNPolicy",
    "WnMlpExtractor",
    "WnMlpPolicy",
    "WnNatureCNN",
    "WnQNetwork",
    "WnQRDQNCnnPolicy",
    "WnQRDQNMlpPolicy",
    "WnQRDQNPolicy",
    "WnQuantileNetwork",
    "WnRecurrentActorCriticCnnPolicy",
    "WnRecurrentActorCriticPolicy",
    "WnSACActor",
    "WnSACCnnPolicy",
    "WnSACPolicy",
    "WnTD3Actor",
    "WnTD3CnnPolicy",
    "WnTD3Policy",
]
