"""A weight-normalized recurrent actor-critic policy for sb3-contrib's ``RecurrentPPO``.

The paper's point is that weight normalization, unlike batch normalization, works in recurrent
networks (sections 1 and 5.3): it adds no dependence between examples or time steps. The LSTMs
here are stacks of :class:`wn_rl.WNLSTMCell` run in a time loop inside :func:`wn_rl.cached`, so each
effective weight is computed once per sequence, not once per step.
"""

from __future__ import annotations

from typing import Any

import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from wn_rl.layers import WNLSTMCell, cached
from wn_rl.sb3.on_policy import WnActorCriticPolicy
from wn_rl.sb3.torch_layers import WnCombinedExtractor, WnNatureCNN

__all__ = [
    "WNLSTM",
    "WnRecurrentActorCriticCnnPolicy",
    "WnRecurrentActorCriticPolicy",
    "WnRecurrentMultiInputActorCriticPolicy",
]


class WNLSTM(nn.Module):
    """A drop-in ``nn.LSTM`` (sequence first by default) whose layers are :class:`wn_rl.WNLSTMCell`.

    Same call: ``output, (h_n, c_n) = lstm(input, (h_0, c_0))`` with ``input`` of shape
    ``(L, N, input_size)`` (``(N, L, input_size)`` with ``batch_first``, or unbatched ``(L, input_size)``)
    and states ``(num_layers, N, hidden_size)``; ``output`` holds the last layer's ``h`` at every step.
    Same attributes: ``input_size``, ``hidden_size``, ``num_layers``, ``bias``, ``batch_first``,
    ``dropout``. Bidirectional and projected LSTMs are not supported. Keyword-only ``scale``: the cells'
    ``"linear"`` g or ``"exp"`` g = exp(s) (:class:`wn_rl.WNLSTMCell`).

    Each cell starts from ``nn.LSTMCell``'s initialization (g = ||w||, v = w): the paper keeps the
    standard initialization for recurrent weights and data-dependent init leaves cells alone.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: Any = None,
        dtype: Any = None,
        *,
        scale: str = "linear",
    ) -> None:
        super().__init__()
        if bidirectional or proj_size:
            raise ValueError(
                f"WNLSTM supports neither bidirectional=True nor proj_size>0 (got {bidirectional}, {proj_size}); "
                "a recurrent policy runs forward in time, so drop these lstm_kwargs."
            )
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers!r} must be at least 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must lie in [0, 1)")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.cells = nn.ModuleList(
            WNLSTMCell(
                input_size if i == 0 else hidden_size, hidden_size, bias=bias, device=device, dtype=dtype, scale=scale
            )
            for i in range(num_layers)
        )

    def _check(self, input: th.Tensor, hx: tuple[th.Tensor, th.Tensor] | None) -> None:
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            raise ValueError(
                f"WNLSTM expects input of shape (L, N, {self.input_size}) (or unbatched (L, {self.input_size})), "
                f"got {tuple(input.shape)}"
            )
        if hx is not None:
            batch = input.shape[1] if input.dim() == 3 and not self.batch_first else input.shape[0]
            expected = (
                (self.num_layers, batch, self.hidden_size) if input.dim() == 3 else (self.num_layers, self.hidden_size)
            )
            for name, state in zip(("h_0", "c_0"), hx, strict=True):
                if tuple(state.shape) != expected:
                    raise ValueError(f"WNLSTM: {name} has shape {tuple(state.shape)}, expected {expected}")

    def forward(
        self, input: th.Tensor, hx: tuple[th.Tensor, th.Tensor] | None = None
    ) -> tuple[th.Tensor, tuple[th.Tensor, th.Tensor]]:
        self._check(input, hx)
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(1)
            hx = None if hx is None else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        elif self.batch_first:
            input = input.transpose(0, 1)
        if hx is None:
            zeros = input.new_zeros(self.num_layers, input.shape[1], self.hidden_size)
            hx = (zeros, zeros)
        sequence, h_n, c_n = input, [], []
        with cached(self):
            for layer, cell in enumerate(self.cells):
                h, c = hx[0][layer], hx[1][layer]
                outputs = []
                for x_t in sequence:
                    h, c = cell(x_t, (h, c))
                    outputs.append(h)
                sequence = th.stack(outputs)
                if self.dropout and self.training and layer < self.num_layers - 1:
                    sequence = F.dropout(sequence, self.dropout, training=True)
                h_n.append(h)
                c_n.append(c)
        states = (th.stack(h_n), th.stack(c_n))
        if unbatched:
            return sequence.squeeze(1), (states[0].squeeze(1), states[1].squeeze(1))
        return (sequence.transpose(0, 1) if self.batch_first else sequence), states

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, dropout={self.dropout}, "
            f"scale={self.cells[0].scale!r}"
        )


class WnRecurrentActorCriticPolicy(WnActorCriticPolicy, RecurrentActorCriticPolicy):
    """sb3-contrib's ``RecurrentActorCriticPolicy`` (``RecurrentPPO``) with weight-normalized LSTMs.

    The actor and critic LSTMs are :class:`WNLSTM` (``WNLSTMCell`` stacks, matching ``nn.LSTM``'s
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

    def __init__(
        self, observation_space: spaces.Space, action_space: spaces.Space, lr_schedule: Schedule, **kwargs: Any
    ) -> None:
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)
        layers, hidden = self.lstm_actor.num_layers, self.lstm_actor.hidden_size
        if self.parameterization.weight_norm:  # otherwise sb3-contrib's nn.LSTM: "normal" means no WN at all
            scale = self.parameterization.scale
            self.lstm_actor = WNLSTM(self.features_dim, hidden, num_layers=layers, scale=scale, **self.lstm_kwargs)
            if self.lstm_critic is not None:
                self.lstm_critic = WNLSTM(self.features_dim, hidden, num_layers=layers, scale=scale, **self.lstm_kwargs)
        if self.critic is not None:  # no critic LSTM: SB3's linear map from features to the LSTM width
            self.critic = self.parameterization.linear(self.features_dim, hidden, init_scale=self.init_scales["hidden"])
        self.to(self.device)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)
        self.train(self.training)

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
