"""Weight-normalized layers (Salimans & Kingma 2016, section 2): the shared machinery (:class:`WNLayer`, the
reparameterization's helpers) and :class:`WNLinear`; :func:`cached` is in :mod:`wn_rl.caching`.

Every WN layer replaces one weight tensor ``w`` by the reparameterization (eq. 2)

    w = g * v / ||v||          (``scale="linear"``)
    w = exp(s) * v / ||v||     (``scale="exp"``, the log-scale variant of section 2)

with one scalar ``g`` (or ``s``) per output unit: per row of a linear layer, per output channel of a
convolution (``v``'s dim 0), and per output channel of a transposed convolution (``v``'s dim 1, since
its weight is laid out ``[in, out, ...]``). The effective weight is computed once per forward pass
with PyTorch's fused ``torch._weight_norm`` kernel, in fp32 whatever the parameters' dtype.

The layers are plain ``nn.Module`` subclasses (not subclasses of ``nn.Linear``/``nn.Conv2d``) so that
code written for plain layers cannot write to ``.weight`` and silently change nothing: ``.weight`` is a
read-only property returning the effective weight.

The convolutions are in :mod:`wn_rl.conv`, mean-only batch norm (section 4) in :mod:`wn_rl.mean_only_batch_norm`
and the recurrent cells in :mod:`wn_rl.recurrent_cells`; their names still resolve here (see ``__getattr__``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import numbers
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wn_rl.caching import _CachedWeights, _reuse, cached

__all__ = [
    "SCALES",
    "WNLayer",
    "WNLinear",
    "cached",
    "exact_second_derivatives",
    "mark_initializable",
    # moved to wn_rl.conv and wn_rl.mean_only_batch_norm: resolved by __getattr__ below, since wn_rl.conv
    # imports this module
    "MeanOnlyBatchNorm",  # noqa: F822
    "WNConv1d",  # noqa: F822
    "WNConv2d",  # noqa: F822
    "WNConv3d",  # noqa: F822
    "WNConvTranspose1d",  # noqa: F822
    "WNConvTranspose2d",  # noqa: F822
    "WNConvTranspose3d",  # noqa: F822
]

SCALES = ("linear", "exp")
V_INIT_STD = 0.05  # section 3: v ~ N(0, 0.05)


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(
            f"scale={scale!r} is not supported; expected one of {SCALES}: 'linear' learns g directly, "
            "'exp' learns s with g = exp(s) (section 2 of the paper)."
        )


def _scale_name(scale: str) -> str:
    """Name of the parameter that holds the per-unit scale: ``g`` itself, or ``s`` with g = exp(s)."""
    return "g" if scale == "linear" else "s"


def _g_from_parameter(parameter: Tensor, scale: str) -> Tensor:
    """The scale g that the stored parameter (``g`` or ``s``) stands for."""
    return parameter if scale == "linear" else parameter.exp()


def _parameter_from_g(g: Tensor, scale: str) -> Tensor:
    """The value to store for a wanted scale g: g itself, or s = log g. For g = 0 (a zero row, w = 0) s is the
    finite value whose exp rounds to exactly 0 in g's dtype, not log 0 = -inf: outputs stay exactly the same,
    and NaN/inf guards, which check every parameter, do not take the unit for a diverged one."""
    if scale == "linear":
        return g
    info = torch.finfo(g.dtype)
    # under the smallest subnormal, smallest_normal * eps, as a sum of logs: the product itself is 0 where
    # denormals are flushed (a library built with -ffast-math, such as torch 2.4's compiled CPU kernels, sets
    # that for the whole process), and log(0) raised
    below_smallest = math.log(info.smallest_normal) + math.log(info.eps) - 1.0
    return torch.where(g > 0, g.log(), torch.full_like(g, below_smallest))


def _unit_norms(w: Tensor, dim: int = 0) -> Tensor:
    """||w|| per output unit: the Euclidean norm of each slice ``w.select(dim, i)``."""
    moved = w.movedim(dim, 0)
    return torch.linalg.vector_norm(moved.reshape(moved.shape[0], -1), dim=1)


def _direction_and_norm(w: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """(v, ||w||) per output unit (the slices ``w.select(dim, i)``), so that ``||w|| v / ||v|| == w``: v = w,
    except that a zero slice gets v = 1 (with ||w|| = 0 it still gives w = 0, where v = 0 would give 0/0)."""
    norm = _unit_norms(w, dim)
    v = w.clone()
    v.movedim(dim, 0)[norm == 0] = 1.0
    return v, norm


def _check_init_scale(init_scale: float) -> float:
    value = float(init_scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"init_scale={init_scale!r} must be a positive finite number: it is the standard deviation "
            "the pre-activation gets after data-dependent init (1.0 for hidden layers, e.g. 0.01 for a "
            "policy's action head)."
        )
    return value


def is_count(value: Any, least: int = 1) -> bool:
    """Whether ``value`` is an integer (any integral type, not a bool) of at least ``least``: a layer width, a
    size, a number of layers. The one test behind every such check of the WN layers, builders and policies."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= least


def _check_units(owner: str, units: int, argument: str) -> None:
    """Refuse a WN layer without output units (before anything is allocated): w = g v / ||v|| has one norm per
    unit, and torch's fused kernel takes none at all as a division by zero that kills the process (SIGFPE)."""
    if units < 1:
        raise ValueError(
            f"{owner}: {argument}={units} gives a weight-normalized layer with no output units; expected at least "
            f"1 (weight norm divides each unit's weight by its norm). Give {argument} >= 1 (in an SB3 policy, every "
            "net_arch width >= 1), or leave the layer out."
        )


def mark_initializable(module: nn.Module, init_scale: float = 1.0) -> nn.Module:
    """Give a plain layer what data-dependent init reads and writes: ``init_scale`` and the
    persistent ``initialized`` flag (a bool buffer, so it travels in the ``state_dict``)."""
    module.init_scale = _check_init_scale(init_scale)
    if "initialized" not in module._buffers:
        device = next((p.device for p in module.parameters(recurse=False)), None)  # beside the weight
        module.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
    return module


# Compiled on torch < 2.10 the fused kernel's backward has no fake (Meta) kernel, and Inductor hands it
# the channels-last weights of its convolutions, which it refuses ("saved_v must be contiguous"); 2.10
# registered both (pytorch#167667).
_FUSED_WEIGHT_NORM_COMPILES = torch.__version__ >= (2, 10)
# Compiled on torch < 2.11 an autograd.Function runs as one that Dynamo generates without setup_context,
# which torch.func transforms refuse; 2.11 added it.
_FUNCTION_COMPILES_UNDER_FUNC = torch.__version__ >= (2, 11)


_exact_second_derivatives_depth = 0  # open exact_second_derivatives() blocks (process-wide)


# a channels-last v's dims in the order its memory holds them (the channels, dim 1, last), and back
_CHANNELS_LAST = {4: ((0, 2, 3, 1), (0, 3, 1, 2)), 5: ((0, 2, 3, 4, 1), (0, 4, 1, 2, 3))}


def _fused_weight_norm(v: Tensor, g: Tensor, dim: int) -> Tensor:
    """``torch._weight_norm`` with w in v's memory format. The kernel copies a v that is not contiguous and
    returns a contiguous w, so a model put in channels-last would hand its convolutions contiguous weights (and
    cuDNN and oneDNN pick their kernels from the input's and the weight's format). A channels-last v goes in as
    the contiguous permutation of itself (the norm is over the same entries) and w comes back permuted to v's
    format: no copy either way. Channels-last is recognised as a contiguous permutation, not asked for with
    ``is_contiguous(memory_format=...)``, which ``torch.vmap`` refuses (an ensemble of stacked models)."""
    layout = _CHANNELS_LAST.get(v.dim())
    if layout is None or v.is_contiguous():
        return torch._weight_norm(v, g, dim)
    order, inverse = layout
    permuted = v.permute(order)
    if not permuted.is_contiguous():
        return torch._weight_norm(v, g, dim)
    return torch._weight_norm(permuted, g.permute(order), order.index(dim)).permute(inverse)


def _weight_norm(v: Tensor, g: Tensor, dim: int) -> Tensor:
    if not _exact_second_derivatives_depth and (_FUSED_WEIGHT_NORM_COMPILES or not torch.compiler.is_compiling()):
        return _fused_weight_norm(v, g, dim)
    # the fused kernel's own formula (its decomposition's), in ops the compiler differentiates and whose
    # second derivatives autograd gets right (see exact_second_derivatives)
    norm = torch.linalg.vector_norm(v, dim=[d for d in range(v.dim()) if d != dim], keepdim=True)
    return v * (g / norm)


@contextlib.contextmanager
def exact_second_derivatives() -> Iterator[None]:
    """Inside this block the WN layers compute ``w = g v / ||v||`` from plain tensor ops instead of PyTorch's
    fused ``torch._weight_norm`` kernel, so second derivatives with respect to ``v`` are right.

    The fused kernel's first derivatives are right, but its derivative of the backward with respect to ``v``
    is not (``torch.autograd.gradgradcheck`` fails on ``torch._weight_norm`` for linear and conv shapes,
    torch 2.4-2.13; PyTorch's own ``parametrizations.weight_norm`` uses the same kernel). That matters for
    parameter-space second derivatives taken where the gradient reaching the weight is not zero:
    meta-gradients (MAML, meta-learned discounts), Hessian-vector products for curvature or sharpness,
    Newton-type steps. TRPO's Fisher-vector products are taken where the KL's gradient is zero, and
    gradient penalties differentiate the input gradient, so neither is affected. Run the forward passes
    whose graph is differentiated twice inside the block; the plain ops cost a few more passes over each
    weight. Nestable; process-wide (not per thread)."""
    global _exact_second_derivatives_depth
    _exact_second_derivatives_depth += 1
    try:
        yield
    finally:
        _exact_second_derivatives_depth -= 1


def _fp32_weight_norm(v: Tensor, g: Tensor, dim: int) -> Tensor:
    """``g * v / ||v||`` with the norm taken over every dim but ``dim``; fused kernel, fp32 norms."""
    if v.dtype in (torch.float16, torch.bfloat16):
        return _weight_norm(v.float(), g.float(), dim).to(v.dtype)
    return _weight_norm(v, g, dim)


try:  # torch >= 2.4 takes the device type; older releases had a CPU-specific query
    torch.is_autocast_enabled("cpu")
    _cpu_autocast_enabled = functools.partial(torch.is_autocast_enabled, "cpu")
except TypeError:  # pragma: no cover - depends on the torch version
    _cpu_autocast_enabled = torch.is_autocast_cpu_enabled

OUTPUT_SCALING_MIN_WEIGHTS = 2**16  # below this, the extra small ops cost more than the saved passes


def _scale_outputs(input: Tensor, v: Tensor) -> bool:
    """Whether a linear layer should scale its outputs instead of materialising w (:class:`_WNLinearFn`).

    Only for a tensor on the CPU (anything else goes to ``F.linear``, whose TypeError names it), in fp32/fp64
    without autocast, for a weight of at least
    ``OUTPUT_SCALING_MIN_WEIGHTS`` entries and fewer input rows than input features: there the step is
    bound by memory passes over the weight, and this form makes about half as many. On a GPU such a
    step is bound by kernel launches instead, and the fused ``torch._weight_norm`` kernel wins.

    Not while ``torch.compile`` traces on torch < 2.11, whose compiled ``autograd.Function`` fails under
    ``torch.func.grad`` (the compiled DQN update's gradient); there ``w`` is materialised.
    """
    return (
        isinstance(input, Tensor)
        and input.device.type == "cpu"
        and (_FUNCTION_COMPILES_UNDER_FUNC or not torch.compiler.is_compiling())
        and v.dtype in (torch.float32, torch.float64)
        and input.dtype == v.dtype
        and v.numel() >= OUTPUT_SCALING_MIN_WEIGHTS
        and input.numel() < v.shape[1] * v.shape[1]
        and not _cpu_autocast_enabled()
    )


def _needs_input_grad(ctx: Any) -> tuple[bool, bool, bool, bool]:
    """``ctx.needs_input_grad`` of :class:`_WNLinearFn` (x, v, g, bias), but all True (bias's where there
    is one) while ``torch.compile`` traces. There Dynamo answered False for v, g and bias when
    ``torch.func.grad`` differentiated them through ``functional_call`` and x came from an earlier layer
    (torch 2.13), so the compiled DQN update (``agents.dqn.fused``) got zero gradients for them and never
    trained the hidden fc layer of the MinAtar network. The compiled graph drops unused gradients anyway.
    """
    if torch.compiler.is_compiling():
        return True, True, True, ctx.has_bias
    return ctx.needs_input_grad


class _WNLinearFn(torch.autograd.Function):
    """y = (x v^T) * g / ||v|| + b: the WN linear layer (eq. 2) without materialising w.

    Same function as ``F.linear(x, g v / ||v||, b)``. The backward is eq. (3) written for the outputs:
    with z = x v^T and per-row s = g / ||v||, grad_s = sum_rows(grad_y * z), grad_g = grad_s / ||v||,
    grad_v = (grad_y * s)^T x - (grad_s s / ||v||^2) v, grad_x = (grad_y * s) v. Over a large weight this
    reads v twice less and never writes w or grad_w (see :func:`_scale_outputs` for when it is used).
    Returns ``(y, z, ||v||)``: z and ||v|| are saved for the backward and are differentiable outputs
    too, so the backward is itself differentiable (double backward, e.g. gradient penalties, works).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, v: Tensor, g: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        norm = torch.linalg.vector_norm(v, dim=1)
        z = x.matmul(v.t())
        s = g / norm
        y = z * s if bias is None else torch.addcmul(bias, z, s)
        return y, z, norm

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, v, g, bias = inputs
        _y, z, norm = output
        ctx.set_materialize_grads(False)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, v, g, z, norm)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor | None, grad_z: Tensor | None, grad_norm: Tensor | None) -> tuple:
        x, v, g, z, norm = ctx.saved_tensors
        out_features, in_features = v.shape
        s = g / norm
        grad_z_total = torch.zeros_like(z) if grad_y is None else grad_y * s
        if grad_z is not None:
            grad_z_total = grad_z_total + grad_z
        grad_s = torch.zeros_like(norm) if grad_y is None else (grad_y * z).reshape(-1, out_features).sum(0)
        grad_norm_total = -grad_s * s / norm  # ds/d||v|| = -g / ||v||^2
        if grad_norm is not None:
            grad_norm_total = grad_norm_total + grad_norm
        grad_z_total = grad_z_total.reshape(-1, out_features)
        grad_x = grad_v = grad_g = grad_bias = None
        needs_input_grad = _needs_input_grad(ctx)
        if needs_input_grad[0]:
            grad_x = grad_z_total.matmul(v).reshape(x.shape)
        if needs_input_grad[1]:  # d||v||/dv = v / ||v||
            grad_v = grad_z_total.t().matmul(x.reshape(-1, in_features))
            radial = (grad_norm_total / norm)[:, None]
            # in place unless a double backward records this graph (grad mode is on only then)
            grad_v = torch.addcmul(grad_v, v, radial) if torch.is_grad_enabled() else grad_v.addcmul_(v, radial)
        if needs_input_grad[2]:
            grad_g = grad_s / norm
        if needs_input_grad[3] and grad_y is not None:
            grad_bias = grad_y.reshape(-1, out_features).sum(0)
        return grad_x, grad_v, grad_g, grad_bias


class WNLayer(_CachedWeights):
    """Shared machinery of the weight-normalized layers: parameters ``v``, ``g`` (or ``s``) and
    ``bias``, the ``initialized`` flag, the ``.weight`` property and the per-forward cache.

    Subclasses set ``norm_dim`` (the axis of ``v`` that indexes output units) and call
    :meth:`_setup_wn` from ``__init__``.
    """

    norm_dim: int = 0
    _cached_scale: Tensor | None = None  # g / ||v||, for no-grad forwards of a big WNLinear in `cached`

    def _setup_wn(
        self,
        weight_shape: tuple[int, ...],
        bias_size: int | None,
        *,
        init_scale: float,
        scale: str,
        factory: dict[str, Any],
    ) -> None:
        _check_scale(scale)
        units = weight_shape[self.norm_dim]
        _check_units(type(self).__name__, units, "out_features" if hasattr(self, "out_features") else "out_channels")
        self.scale = scale
        self.init_scale = _check_init_scale(init_scale)
        self.v = nn.Parameter(torch.empty(weight_shape, **factory))
        self.register_parameter(_scale_name(scale), nn.Parameter(torch.empty(units, **factory)))
        if bias_size is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(torch.empty(bias_size, **factory))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=factory["device"]))
        g_shape = [1] * len(weight_shape)
        g_shape[self.norm_dim] = units
        self._g_shape = tuple(g_shape)
        self._cache_depth = 0
        self._cached_weight: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Section 3: v ~ N(0, 0.05), g = 1 (s = 0), b = 0; clears the ``initialized`` flag."""
        with torch.no_grad():
            nn.init.normal_(self.v, 0.0, V_INIT_STD)
            if self.scale == "linear":
                self.g.fill_(1.0)
            else:
                self.s.zero_()
            if self.bias is not None:
                self.bias.zero_()
            self.initialized.fill_(False)

    @property
    def _scale_parameter(self) -> nn.Parameter:
        return getattr(self, _scale_name(self.scale))

    def _weight_parameters(self) -> tuple[tuple[Tensor, ...]]:
        return ((self.v, self._scale_parameter),)

    @property
    def g_value(self) -> Tensor:
        """The per-unit scale g (``exp(s)`` for ``scale="exp"``), shape ``(units,)``."""
        return _g_from_parameter(self._scale_parameter, self.scale)

    def v_norm(self) -> Tensor:
        """||v|| per output unit, shape ``(units,)``, in float32 at least (float64 stays float64)."""
        return _unit_norms(self.v.to(torch.promote_types(self.v.dtype, torch.float32)), self.norm_dim)

    def compute_weight(self) -> Tensor:
        """The effective weight w = g v / ||v|| (eq. 2), computed now."""
        return _fp32_weight_norm(self.v, self.g_value.view(self._g_shape), self.norm_dim)

    @property
    def weight(self) -> Tensor:
        """The effective weight; inside :func:`cached` it is computed once and reused."""
        if self._cache_depth:
            return _reuse(self, "_cached_weight", self._weight_parameters, self.compute_weight)
        return self.compute_weight()

    @torch.no_grad()
    def rescale_(self, factor: Tensor) -> None:
        """Multiply the effective weight of each output unit by ``factor`` (in place, g or s only)."""
        factor = factor.to(self.v.dtype)
        if self.scale == "linear":
            self.g.mul_(factor)
        else:
            self.s.add_(factor.log())


class WNLinear(WNLayer):
    """Weight-normalized ``nn.Linear``: y = x w^T + b with w = g v / ||v|| per output row (eq. 2).

    Args mirror ``nn.Linear``; keyword-only ``init_scale`` is the pre-activation std that
    data-dependent init targets (section 3), ``scale`` is ``"linear"`` (learn g) or ``"exp"`` (learn s,
    g = exp(s)).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        init_scale: float = 1.0,
        scale: str = "linear",
    ) -> None:
        super().__init__()
        nn.Linear(in_features, out_features, bias=False, device="meta")  # torch's own argument checks
        self.in_features = in_features
        self.out_features = out_features
        self._setup_wn(
            (out_features, in_features),
            out_features if bias else None,
            init_scale=init_scale,
            scale=scale,
            factory={"device": device, "dtype": dtype},
        )

    # the output-scaling form multiplies by v itself: a subclass that computes its weight otherwise (a masked
    # weight, say) must go through its own compute_weight. Set per class, not looked up per forward.
    _plain_weight = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._plain_weight = cls.compute_weight is WNLayer.compute_weight

    def forward(self, input: Tensor) -> Tensor:
        if not self._plain_weight or not _scale_outputs(input, self.v):
            return F.linear(input, self.weight, self.bias)
        if not self._cache_depth:
            return _WNLinearFn.apply(input, self.v, self.g_value, self.bias)[0]
        if torch.is_grad_enabled():  # a time loop with gradients: one shared w, as `cached` promises
            return F.linear(input, self.weight, self.bias)
        # acting: keep only g / ||v|| and never materialise w
        scale = _reuse(self, "_cached_scale", self._weight_parameters, self._output_scale)
        z = input.matmul(self.v.t())
        return z * scale if self.bias is None else torch.addcmul(self.bias, z, scale)

    def _output_scale(self) -> Tensor:
        return self.g_value / self.v_norm().to(self.v.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scale={self.scale!r}, init_scale={self.init_scale}"
        )


# Names that moved out of this module, by their new home. Pickle looks a class up by the module path it was
# saved with, so models pickled before the moves name e.g. ``wn_rl.layers.WNConv2d``.
_MOVED = {
    **dict.fromkeys(
        (
            "WNConv1d",
            "WNConv2d",
            "WNConv3d",
            "WNConvTranspose1d",
            "WNConvTranspose2d",
            "WNConvTranspose3d",
            "_CONV_HYPERPARAMETERS",
            "_CONV_TRANSPOSE",
            "_WNConvNd",
            "_WNConvTransposeNd",
        ),
        "wn_rl.conv",
    ),
    **dict.fromkeys(("MeanOnlyBatchNorm", "_MeanOnlyBatchNormFn"), "wn_rl.mean_only_batch_norm"),
    **dict.fromkeys(("WNGRUCell", "WNLSTMCell", "WNRNNCell", "WNRNNCellBase"), "wn_rl.recurrent_cells"),
}


def __getattr__(name: str) -> Any:
    """A name that moved out (see ``_MOVED``) from its new home, so that ``wn_rl.layers.WNConv2d`` or
    ``wn_rl.layers.WNLSTMCell`` still resolves, for imports and for models pickled before (pickle looks classes
    up by module path). Looked up lazily: :mod:`wn_rl.conv` and :mod:`wn_rl.recurrent_cells` import this module."""
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MOVED})
