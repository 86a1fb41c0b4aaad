"""A weight-normalized recurrent actor-critic policy for sb3-contrib's ``RecurrentPPO``.

The paper's point is that weight normalization, unlike batch normalization, works in recurrent
networks (sections 1 and 5.3): it adds no dependence between examples or time steps. The LSTMs
here are :class:`wn_rl.WNLSTM`, stacks of :class:`wn_rl.WNLSTMCell` whose effective weights are computed
once per call and run by PyTorch's fused LSTM kernel; where sb3-contrib calls the LSTM once per step (a
sequence with an episode start), :func:`wn_rl.cached` keeps them for the whole sequence.
"""

from __future__ import annotations

from typing import Any

import torch as th
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from wn_rl.layers import cached
from wn_rl.recurrent import WNLSTM
from wn_rl.sb3.on_policy import WnActorCriticPolicy
from wn_rl.sb3.torch_layers import WnCombinedExtractor, WnNatureCNN

__all__ = [
    "WNLSTM",
    "WnRecurrentActorCriticCnnPolicy",
    "WnRecurrentActorCriticPolicy",
    "WnRecurrentMultiInputActorCriticPolicy",
]


class WnRecurrentActorCriticPolicy(WnActorCriticPolicy, RecurrentActorCriticPolicy):
    """sb3-contrib's ``RecurrentActorCriticPolicy`` (``RecurrentPPO``) with weight-normalized LSTMs.

    The actor and critic LSTMs are :class:`WNLSTM` (drop-ins for ``nn.LSTM``, matching its
    states ``(num_layers, n_envs, hidden)`` and RecurrentPPO's episode-start resets) in the weight-norm
    parameterizations, sb3-contrib's ``nn.LSTM`` in the others (``normal`` is then sb3-contrib's policy
    with this initialization; no norm layer fits a recurrent cell, section 5.3); the features
    extractor, MLPs and heads are built as in :class:`wn_rl.sb3.WnActorCriticPolicy`, whose
    initialization rules (no orthogonal init; data-dependent init of every non-recurrent layer by
    :class:`wn_rl.sb3.DataDependentInitCallback`) and frozen norm statistics apply unchanged.

    Args: those of :class:`wn_rl.sb3.WnActorCriticPolicy` plus sb3-contrib's ``lstm_hidden_size``,
    ``n_lstm_layers``, ``shared_lstm``, ``enable_critic_lstm`` and ``lstm_kwargs`` (``bias``, ``dropout``).
    """

    vector_policy = "WnRecurrentActorCriticPolicy"
    image_policy = "WnRecurrentActorCriticCnnPolicy"
    multi_input_policy = "WnRecurrentMultiInputActorCriticPolicy"
    refresh_from_distributions = False  # its norm layers follow the LSTMs; RecurrentPPO trains by evaluate_actions

    def __init__(
        self, observation_space: spaces.Space, action_space: spaces.Space, lr_schedule: Schedule, **kwargs: Any
    ) -> None:
        lstm_kwargs = kwargs.get("lstm_kwargs") or {}
        if lstm_kwargs.get("bidirectional") or lstm_kwargs.get("proj_size"):
            raise ValueError(
                f"{type(self).__name__} takes neither bidirectional=True nor proj_size>0 in lstm_kwargs (got "
                f"{lstm_kwargs}): a recurrent policy runs forward in time and its heads take hidden_size features. "
                "Drop these lstm_kwargs."
            )
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)
        layers, hidden = self.lstm_actor.num_layers, self.lstm_actor.hidden_size
        if self.parameterization.weight_norm:  # otherwise sb3-contrib's nn.LSTM: "normal" means no WN at all
            lstm = self.parameterization.lstm
            self.lstm_actor = lstm(self.features_dim, hidden, layers, **self.lstm_kwargs)
            if self.lstm_critic is not None:
                self.lstm_critic = lstm(self.features_dim, hidden, layers, **self.lstm_kwargs)
        if self.critic is not None:  # no critic LSTM: SB3's linear map from features to the LSTM width
            self.critic = self.parameterization.linear(self.features_dim, hidden, init_scale=self.init_scales["hidden"])
        self.to(self.device)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)
        self.train(self.training)

    def _valid_rows(self, obs: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> th.Tensor | None:
        """The rows of a RecurrentPPO minibatch that are data. sb3-contrib pads each of its sequences at the end
        to the longest one's length with rows of zeros (observation, action and episode start alike) and masks
        them out of the losses; the mask does not reach the policy, so the rows found here are those that, with
        every later row of their sequence, look like padding. A real row that looks so is dropped too: the norm
        statistics lose one sample, never gain a padded one."""
        names = ("actions", "lstm_states", "episode_starts")
        given = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
        if not all(name in given for name in names):
            return None
        sequences = given["lstm_states"].pi[0].shape[1]
        observations = list(obs.values()) if isinstance(obs, dict) else [obs]
        zero = given["episode_starts"].flatten() == 0
        for tensor in (*observations, given["actions"]):
            zero = zero & (tensor.reshape(tensor.shape[0], -1) == 0).all(dim=1)
        if zero.numel() % sequences:
            return None
        tail = zero.view(sequences, -1).flip(1).int().cumprod(1).flip(1).bool()  # padding to the sequence's end
        return ~tail.flatten()

    @staticmethod
    def _process_sequence(
        features: th.Tensor, lstm_states: tuple[th.Tensor, th.Tensor], episode_starts: th.Tensor, lstm: nn.Module
    ) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:
        """sb3-contrib's sequence loop inside :func:`wn_rl.cached`: where a sequence holds an episode start
        it calls the LSTM once per step, and each call would recompute the effective weights."""
        with cached(lstm):
            return RecurrentActorCriticPolicy._process_sequence(features, lstm_states, episode_starts, lstm)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        """Adds the LSTM options, which sb3-contrib 2.9 leaves out (its ``policy.load`` rebuilds a
        256-unit LSTM whatever was saved)."""
        data = super()._get_constructor_parameters()
        data.update(
            lstm_hidden_size=self.lstm_actor.hidden_size,
            n_lstm_layers=self.lstm_actor.num_layers,
            shared_lstm=self.shared_lstm,
            enable_critic_lstm=self.enable_critic_lstm,
            lstm_kwargs=self.lstm_kwargs,
        )
        return data


class WnRecurrentActorCriticCnnPolicy(WnRecurrentActorCriticPolicy):
    """:class:`WnRecurrentActorCriticPolicy` with :class:`wn_rl.sb3.WnNatureCNN` as features extractor."""

    default_features_extractor = WnNatureCNN


class WnRecurrentMultiInputActorCriticPolicy(WnRecurrentActorCriticPolicy):
    """:class:`WnRecurrentActorCriticPolicy` with :class:`wn_rl.sb3.WnCombinedExtractor` for Dict observations
    (sb3-contrib's ``MultiInputLstmPolicy``)."""

    default_features_extractor = WnCombinedExtractor
