"""The learner's update as one function of tensors, for ``torch.compile`` (and CUDA graphs).

:func:`fused_update` does in one traceable function what :meth:`Learner.update` does in eager mode:
the TD loss (:func:`agents.dqn.learner.td_loss`, the same code), its gradients
(``torch.func.grad_and_value`` over ``torch.func.functional_call``), gradient clipping, the optimizer
step written as tensor math (Adamax, Adam or RMSprop, the formulas of ``torch.optim``), the non-finite
guard and the running metric sums. Every new value is computed out of place and written back with
``torch.where(ok, new, old)``: a step whose loss, gradients or new parameters hold a NaN or inf leaves
parameters, optimizer moments and step counts exactly as they were, with no host synchronisation.
Compiled, the guard costs one select fused into the optimizer's kernel instead of a clone of the
whole state.

The optimizer state stays in ``torch.optim``'s own format (``optimizer.state[p]``), so checkpoints,
``state_dict`` and a later eager update see no difference. The target-network sync is not in the
graph: the host knows the update count and copies every ``target_update_every_updates`` updates.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, grad_and_value

from agents.dqn.compile_backend import SmallConvolutionsAsMatmuls, inductor_options
from agents.dqn.config import AgentConfig
from agents.dqn.learner import td_loss
from agents.dqn.optimizer import RMSPROP_ALPHA
from agents.dqn.replay import ReplayBatch

GUARD_CHECK_EVERY = 64  # calls between checks of the ahead-of-time graph's assumptions
REALIZE_WIDTH = 16  # > inductor's unroll_reductions_threshold (8), so the reduction stays one
__all__ = ["STATE_KEYS", "FusedUpdate", "act_sample_and_update", "fused_update", "sample_and_update"]

# Optimizer state tensors per parameter, in torch.optim's names (``step`` is kept separately).
STATE_KEYS = {"adamax": ("exp_avg", "exp_inf"), "adam": ("exp_avg", "exp_avg_sq"), "rmsprop": ("square_avg",)}


def state_keys(config: AgentConfig) -> tuple[str, ...]:
    """Per-parameter optimizer tensors :func:`optimizer_math` reads and writes."""
    keys = STATE_KEYS[config.optimizer]
    if config.optimizer == "rmsprop" and config.beta1 > 0:
        keys += ("momentum_buffer",)
    return keys


def bias_corrections(config: AgentConfig, step: Tensor) -> dict[str, Tensor]:
    """The step's scalars, computed once per update (not per element): ``step_size = lr / (1 - b1^t)``
    and, for Adam, ``bc2_sqrt = sqrt(1 - b2^t)``. ``step`` is the count after this step (0-d tensor)."""
    if config.optimizer == "rmsprop":
        return {}
    out = {"step_size": config.lr / (1 - torch.pow(config.beta1, step))}
    if config.optimizer == "adam":
        out["bc2_sqrt"] = torch.sqrt(1 - torch.pow(config.beta2, step))
    return {k: computed_once(v) for k, v in out.items()}


def computed_once(scalar: Tensor) -> Tensor:
    """``scalar`` itself, as a reduction: inductor inlines pointwise scalar math into every consumer's
    loop (a ``pow`` per 8 elements of every parameter), but materializes a reduction's result once."""
    return torch.amax(scalar.expand(REALIZE_WIDTH))


def optimizer_math(
    config: AgentConfig, param: Tensor, grad: Tensor, state: dict[str, Tensor], scalars: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """One optimizer step for one tensor, out of place: ``(new_param, new_state)``; ``scalars`` from
    :func:`bias_corrections`. Same formulas as ``torch.optim`` (foreach implementation):

    - Adamax: m = lerp(m, g, 1-b1), u = max(b2 u, |g| + eps), p -= lr / (1 - b1^t) * m / u
    - Adam: m = lerp(m, g, 1-b1), v = b2 v + (1-b2) g^2, p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    - RMSprop (alpha 0.95): s = alpha s + (1-alpha) g^2, a = sqrt(s) + eps, with momentum mu:
      b = mu b + g / a, p -= lr b; without: p -= lr g / a
    """
    lr, b1, b2, eps = config.lr, config.beta1, config.beta2, config.optimizer_eps
    if config.optimizer == "rmsprop":
        square_avg = state["square_avg"] * RMSPROP_ALPHA + (1 - RMSPROP_ALPHA) * grad * grad
        avg = square_avg.sqrt() + eps
        if b1 > 0:
            buf = state["momentum_buffer"] * b1 + grad / avg
            return param - lr * buf, {"square_avg": square_avg, "momentum_buffer": buf}
        return param - lr * grad / avg, {"square_avg": square_avg}
    exp_avg = torch.lerp(state["exp_avg"], grad, 1 - b1)
    if config.optimizer == "adamax":
        exp_inf = torch.maximum(state["exp_inf"] * b2, grad.abs() + eps)
        return param - scalars["step_size"] * exp_avg / exp_inf, {"exp_avg": exp_avg, "exp_inf": exp_inf}
    exp_avg_sq = state["exp_avg_sq"] * b2 + (1 - b2) * grad * grad
    denom = exp_avg_sq.sqrt() / scalars["bc2_sqrt"] + eps
    return param - scalars["step_size"] * exp_avg / denom, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def _clip(grads: list[Tensor], grad_norms: Tensor, max_norm: float | None) -> tuple[list[Tensor], Tensor]:
    """``clip_grad_norm_``'s rule: scale by ``min(1, max_norm / (total + 1e-6))``; returns the total norm."""
    total = torch.linalg.vector_norm(grad_norms)
    if max_norm is None:
        return grads, total
    coef = computed_once(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return [g * coef for g in grads], total


def fused_update(
    loss_fn: Callable[[dict[str, Tensor], ReplayBatch], tuple[Tensor, tuple[Tensor, Tensor, Tensor]]],
    config: AgentConfig,
    names: list[str],
    params: list[Tensor],
    steps: list[Tensor],
    opt_state: dict[str, list[Tensor]],
    guard: dict[str, Tensor],
    batch: ReplayBatch,
) -> None:
    """One guarded update, written in place into ``params``, ``steps``, ``opt_state`` and ``guard``
    (``metric_sum``, ``updates``, ``bad_code``, ``bad_update``, ``bad_names``; see :class:`Learner`).
    ``loss_fn(params_by_name, batch)`` returns ``(loss, (td_error, q_taken, target))``."""
    grads_by_name, (loss, (td_error, q_taken, target)) = grad_and_value(loss_fn, has_aux=True)(
        dict(zip(names, params, strict=True)), batch
    )
    grads = [grads_by_name[n] for n in names]
    grad_norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
    grads, grad_norm = _clip(grads, grad_norms, config.max_grad_norm)
    keys = state_keys(config)
    new_step = steps[0] + 1
    scalars = bias_corrections(config, new_step)
    new_params, new_states = [], []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        new_p, new_s = optimizer_math(config, p, g, {k: opt_state[k][i] for k in keys}, scalars)
        new_params.append(new_p)
        new_states.append(new_s)
    bad_grads = ~torch.isfinite(grad_norms)
    bad_params = torch.stack([~torch.isfinite(p).all() for p in new_params])
    code = torch.where(~torch.isfinite(loss), 1, torch.where(bad_grads.any(), 2, torch.where(bad_params.any(), 3, 0)))
    ok = code == 0
    for i, p in enumerate(params):
        p.copy_(torch.where(ok, new_params[i], p))
        steps[i].copy_(torch.where(ok, new_step, steps[i]))
        for k in keys:
            opt_state[k][i].copy_(torch.where(ok, new_states[i][k], opt_state[k][i]))
    updates = guard["updates"] + 1
    first = (guard["bad_code"] == 0) & ~ok
    guard["bad_update"].copy_(torch.where(first, updates, guard["bad_update"]))
    guard["bad_code"].copy_(torch.where(first, code, guard["bad_code"]))
    mask = torch.where(code == 2, bad_grads, bad_params)
    guard["bad_names"].copy_(torch.where(first, mask, guard["bad_names"]))
    guard["updates"].copy_(updates)
    row = torch.stack([loss.detach(), td_error.abs().mean(), q_taken.mean(), grad_norm, target.mean()])
    guard["metric_sum"].add_(torch.nan_to_num(row))


def sample_and_update(
    replay: Any,
    uniforms: Tensor,
    terminal_on_life_loss: bool,
    loss_fn: Callable,
    config: AgentConfig,
    names: list[str],
    params: list[Tensor],
    steps: list[Tensor],
    opt_state: dict[str, list[Tensor]],
    guard: dict[str, Tensor],
) -> None:
    """Draw a minibatch from ``replay`` (on the device) and apply :func:`fused_update`: one graph. The
    ``uniforms`` come from outside the graph, so the random stream is the eager path's."""
    batch = replay.sample(uniforms.shape[0], terminal_on_life_loss, uniforms=uniforms)
    fused_update(loss_fn, config, names, params, steps, opt_state, guard, batch)


def act_sample_and_update(
    replay: Any,
    uniforms: Tensor,
    obs: Tensor,
    random_actions: Tensor,
    explore: Tensor,
    q_fn: Callable[[dict[str, Tensor], Tensor], Tensor],
    terminal_on_life_loss: bool,
    loss_fn: Callable,
    config: AgentConfig,
    names: list[str],
    params: list[Tensor],
    steps: list[Tensor],
    opt_state: dict[str, list[Tensor]],
    guard: dict[str, Tensor],
) -> Tensor:
    """Epsilon-greedy actions for ``obs`` with the parameters from *before* this update (what the loop's
    separate acting forward would use), then :func:`sample_and_update`; returns the actions. One call
    instead of an eager forward plus the update: on a CPU the eager forward of a small network costs
    more than the update's own arithmetic for it (``run.acting``)."""
    with torch.no_grad():
        greedy = q_fn(dict(zip(names, params, strict=True)), obs).argmax(1)
    actions = torch.where(explore, random_actions, greedy)
    sample_and_update(replay, uniforms, terminal_on_life_loss, loss_fn, config, names, params, steps, opt_state, guard)
    return actions


def compile_options(device: torch.device, mode: str) -> dict[str, Any]:
    """``torch.compile``'s arguments for :class:`FusedUpdate` on ``device`` in ``mode``."""
    if mode == "cudagraph":
        options: dict[str, Any] = {"mode": "reduce-overhead"}
    elif device.type == "cpu":
        # cpp_wrapper: C++ instead of Python between the kernels, -0.5 ms per MinAtar update; small
        # convolutions as GEMMs instead of oneDNN calls: -0.6 ms (agents.dqn.compile_backend)
        options = inductor_options({"cpp_wrapper": True, "post_grad_custom_pre_pass": SmallConvolutionsAsMatmuls()})
    else:
        options = {}
    return {**options, "fullgraph": True, "dynamic": False}


class FusedUpdate:
    """:func:`fused_update` bound to a learner's networks and optimizer state, compiled once.

    ``mode``: ``compiled`` (``torch.compile``, inductor: fused C++ on CPU, Triton on CUDA) or
    ``cudagraph`` (the same, replayed as a CUDA graph: ``mode="reduce-overhead"``). Networks whose
    forward changes buffers (batch norm) are not supported here: :class:`Learner` keeps them eager.
    """

    def __init__(self, learner: Any, mode: str) -> None:
        self.learner = learner
        self.mode = mode
        q, target = learner.q_network, learner.target_values
        self.names = [name for name, _ in q.named_parameters()]
        buffers = dict(q.named_buffers())
        config = learner.config  # the closures below must not hold the learner: ahead-of-time compilation
        # serializes them, and the learner holds this object's compiled graphs (unpicklable guards)

        def loss_fn(params: dict[str, Tensor], batch: ReplayBatch) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
            def q_values(obs: Tensor) -> Tensor:
                return functional_call(q, (params, buffers), (obs,))

            loss, td_error, q_taken, target_values = td_loss(q_values, target, batch, config)
            return loss, (td_error, q_taken, target_values)

        def q_fn(params: dict[str, Tensor], obs: Tensor) -> Tensor:
            return functional_call(q, (params, buffers), (obs,))

        self.loss_fn, self.q_fn = loss_fn, q_fn
        options = compile_options(next(q.parameters()).device, mode)
        ahead = mode == "compiled"
        self._update = torch.compile(fused_update, **options)
        self._sample_and_update = _Graph(torch.compile(sample_and_update, **options), ahead)
        self._act_sample_and_update = _Graph(torch.compile(act_sample_and_update, **options), ahead)
        self._tensors: tuple | None = None
        self._static: set[int] = set()  # ids of tensors marked static (cudagraph mode)

    @property
    def calls(self) -> int:
        """Calls of :meth:`sample_and_update` so far (the first compiles its graph)."""
        return self._sample_and_update.calls

    def refresh(self) -> None:
        """Rebuild the tensor lists (after the optimizer state was replaced, e.g. by a checkpoint load)."""
        self._tensors = None

    def _bind(self) -> tuple:
        """Parameters, step counts and optimizer tensors (created in torch.optim's format when missing)."""
        learner = self.learner
        params = [p for p in learner.q_network.parameters()]
        keys = state_keys(learner.config)
        steps = []
        for p in params:
            state = learner.optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                for k in keys:
                    state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = state["step"].to(p.device)  # a checkpoint load leaves it on the CPU
            steps.append(state["step"])
        opt_state = {k: [learner.optimizer.state[p][k] for p in params] for k in keys}
        detached = [p.detach() for p in params]  # same storage: in-place writes update the module
        if self.mode == "cudagraph":
            for t in [*detached, *steps, *(t for ts in opt_state.values() for t in ts)]:
                torch._dynamo.mark_static_address(t)
        return detached, steps, opt_state

    def _prepare(self, guard: dict[str, Tensor], replay: Any = None) -> tuple:
        """The bound tensors; for CUDA graphs every tensor the graph writes or reads in place (parameters,
        optimizer state, guard, replay storage) is marked static, so it is used where it lives, not
        copied into the graph's own buffers on every replay."""
        if self._tensors is None:
            self._tensors = self._bind()
            self._static = set()
        if self.mode == "cudagraph":
            for t in [*guard.values(), *(replay.state_tensors() if replay is not None else [])]:
                if id(t) not in self._static:
                    torch._dynamo.mark_static_address(t)
                    self._static.add(id(t))
        return self._tensors

    def _shared_args(self, guard: dict[str, Tensor], replay: Any) -> tuple:
        """The arguments after the per-call ones: the learner's settings and tensors."""
        learner = self.learner
        return (learner.terminal_on_life_loss, self.loss_fn, learner.config, self.names, *self._prepare(guard, replay))

    def update(self, batch: ReplayBatch, guard: dict[str, Tensor]) -> None:
        """The compiled update on a given batch."""
        tensors = self._prepare(guard)
        self._update(self.loss_fn, self.learner.config, self.names, *tensors, guard, batch)

    def sample_and_update(self, replay: Any, uniforms: Tensor, guard: dict[str, Tensor]) -> None:
        """The compiled sampling from ``replay`` and update, one graph (``uniforms``: the sampling draws, one
        per transition of the minibatch)."""
        self._sample_and_update(replay, uniforms, *self._shared_args(guard, replay), guard)

    def act_sample_and_update(
        self, replay: Any, uniforms: Tensor, obs: Tensor, draws: tuple[Tensor, Tensor], guard: dict[str, Tensor]
    ) -> Tensor:
        """:func:`act_sample_and_update` compiled: the actions for ``obs`` (epsilon-greedy with ``draws``
        from :func:`agents.dqn.evaluation.exploration_draws`, weights from before the update), then the
        sampling and update with ``uniforms``. Returns the actions (on the device)."""
        random_actions, explore = draws
        args = (replay, uniforms, obs, random_actions, explore, self.q_fn)
        return self._act_sample_and_update(*args, *self._shared_args(guard, replay), guard)


class _Graph:
    """A ``torch.compile``d function; with ``ahead``, traced ahead of time on its first call
    (:func:`_compile_ahead_of_time`) and its guards checked only every ``GUARD_CHECK_EVERY`` calls."""

    def __init__(self, compiled: Any, ahead: bool) -> None:
        self.compiled, self.ahead = compiled, ahead
        self.function: Any = None  # the ahead-of-time graph
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.ahead and self.function is None and self.calls == 1:
            self.function = _compile_ahead_of_time(self.compiled, args)
        check = self.function is not None and self.calls % GUARD_CHECK_EVERY == 0
        if check and not self.function.guard_check(*args):  # something the graph assumed changed
            warnings.warn("the compiled DQN update's assumptions changed; recompiling", stacklevel=3)
            self.function = None
        return (self.function or self.compiled)(*args)


def _compile_ahead_of_time(compiled: Any, args: tuple) -> Any:
    """``compiled`` traced once for ``args`` without Dynamo's per-call guard evaluation, which cost ~0.3 ms
    (~10% of a MinAtar loop step on the 2-core CPU). Its guards are checked every ``GUARD_CHECK_EVERY``
    calls instead. ``None`` where this torch has no ``aot_compile`` (the caller then uses ``compiled``)."""
    if not hasattr(compiled, "aot_compile"):
        return None
    try:
        # Without AOTAutograd's cache: with it, a MinAtar run here loaded a graph that an earlier process had
        # compiled for another replay capacity and failed a size assertion (not reproduced in a fresh cache).
        with torch._functorch.config.patch(enable_autograd_cache=False):
            function = compiled.aot_compile((args, {}))
    except Exception as exc:  # an experimental torch API: fall back to the guarded graph
        warnings.warn(
            f"ahead-of-time compilation failed ({type(exc).__name__}: {exc}); using torch.compile's "
            "guarded call instead (same graph, ~0.3 ms more per update on a CPU)",
            stacklevel=3,
        )
        return None
    function.disable_guard_check()
    return function
