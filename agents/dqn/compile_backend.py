"""Small CPU convolutions as matrix products inside the compiled DQN update (inductor only).

On a CPU, inductor calls oneDNN (``mkldnn_convolution``) for every ``aten.convolution`` and ATen's
``convolution_backward`` for its gradients. For the MinAtar network's single 16@3x3 convolution on
10x10 inputs (1.2M multiply-adds) that costs ~180 us per call, mostly fixed overhead. Written as
im2col, ``y = W @ cols(x)`` with ``cols(x)`` the (C*KH*KW, N*OH*OW) matrix of input patches, the same
convolution is one gather kernel (fused by inductor) and one small GEMM; its gradients are
``dW = dY @ cols(x)^T``, ``db = sum(dY)`` (``dY`` as a (C_out, N*OH*OW) matrix). The input's gradient
(not needed for a network's first layer) is left to ATen: computed through im2col it measured slower.

:class:`SmallConvolutionsAsMatmuls` is an inductor post-grad graph pass (``post_grad_custom_pre_pass``)
that rewrites only convolutions that are 2-D, ungrouped, not transposed, on the CPU and small
(:data:`MAX_MULTIPLY_ADDS`); every other convolution keeps inductor's own lowering. Eager code and
the network modules are untouched: the rewrite exists only in the compiled graph.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern

try:  # torch >= 2.6: a pass class whose uuid() keys inductor's cache
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # torch 2.4-2.5: inductor takes any callable as a pass (but see inductor_options)
    CustomGraphPass = object

aten = torch.ops.aten

# Largest convolution (N * OH * OW * C_out * C_in * KH * KW multiply-adds) rewritten. Measured on the
# 2-core CPU (1 thread, a compiled step of weight and bias gradients, time with / without the rewrite):
# 1.2M (MinAtar) 0.42, 4.7M 0.53, 9.4M 0.77, 48M 1.63, 58M and 85M (Nature CNN's) 1.47 and 1.40.
MAX_MULTIPLY_ADDS = 10_000_000

__all__ = [
    "MAX_MULTIPLY_ADDS",
    "SmallConvolutionsAsMatmuls",
    "conv2d_as_matmul",
    "conv2d_backward_as_matmuls",
    "inductor_options",
    "should_rewrite_convolution",
    "should_rewrite_convolution_backward",
]


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _columns(x: Tensor, kernel: tuple[int, int], stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    """im2col, transposed: the (C * KH * KW, N * OH * OW) matrix of input patches, rows in the weight's
    order. Laid out so that the gather's innermost loop runs along an image row (vectorized loads)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    oh = _output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _output_size(w, kw, stride[1], padding[1], dilation[1])
    if padding[0] or padding[1]:
        x = torch.nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    taps = []
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilation[0], j * dilation[1]
            rows = slice(top, top + stride[0] * (oh - 1) + 1, stride[0])
            cols = slice(left, left + stride[1] * (ow - 1) + 1, stride[1])
            taps.append(x[:, :, rows, cols])
    patches = torch.stack(taps, dim=0)  # (KH*KW, N, C, OH, OW)
    return patches.permute(2, 0, 1, 3, 4).reshape(c * kh * kw, n * oh * ow)


def conv2d_as_matmul(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int]
) -> Tensor:
    """``aten.convolution`` (2-D, groups 1, not transposed) as ``W @ cols(x)^T + b``."""
    n, _, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    oh = _output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _output_size(w, kw, stride[1], padding[1], dilation[1])
    columns = _columns(x, (kh, kw), stride, padding, dilation)
    w2d = weight.reshape(out_channels, -1)
    y = torch.mm(w2d, columns) if bias is None else torch.addmm(bias[:, None], w2d, columns)
    return y.reshape(out_channels, n, oh, ow).permute(1, 0, 2, 3).contiguous()


def conv2d_backward_as_matmuls(
    grad_output: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    output_mask: list[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``aten.convolution_backward`` for :func:`conv2d_as_matmul`'s cases when the input's gradient is not
    needed (a network's first layer): ``(None, dW, db)``, ``None`` also where ``output_mask`` is false."""
    out_channels, in_channels, kh, kw = weight.shape
    grad_2d = grad_output.transpose(0, 1).reshape(out_channels, -1)  # (C_out, N*OH*OW)
    grad_weight = grad_bias = None
    if output_mask[1]:
        columns = _columns(x, (kh, kw), stride, padding, dilation)
        grad_weight = torch.mm(grad_2d, columns.t()).reshape(out_channels, in_channels, kh, kw)
    if output_mask[2]:
        grad_bias = grad_2d.sum(1)
    return None, grad_weight, grad_bias


def _value(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg


def _is_small_cpu_conv2d(x: Any, weight: Any, transposed: bool, groups: int) -> bool:
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor)):
        return False
    if transposed or groups != 1 or x.dim() != 4 or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    return all(isinstance(s, int) for s in (*x.shape, *weight.shape))  # dynamic shapes: left alone


def _multiply_adds(x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int]) -> int:
    n, _, h, w = x.shape
    out_channels, in_channels, kh, kw = weight.shape
    oh = _output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = _output_size(w, kw, stride[1], padding[1], dilation[1])
    return n * oh * ow * out_channels * in_channels * kh * kw


def should_rewrite_convolution(
    x: Any, weight: Any, stride: list[int], padding: list[int], dilation: list[int], transposed: bool, groups: int
) -> bool:
    """Whether a forward convolution with these (example) arguments is rewritten."""
    if not _is_small_cpu_conv2d(x, weight, transposed, groups):
        return False
    return _multiply_adds(x, weight, stride, padding, dilation) <= MAX_MULTIPLY_ADDS


def should_rewrite_convolution_backward(
    x: Any,
    weight: Any,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    groups: int,
    output_mask: list[bool],
) -> bool:
    """Whether a convolution's backward with these (example) arguments is rewritten."""
    if not should_rewrite_convolution(x, weight, stride, padding, dilation, transposed, groups):
        return False
    return not output_mask[0]  # dx through im2col measured slower than ATen's


_PATTERNS = PatternMatcherPass(pass_name="small_convolutions_as_matmuls")


def _forward_check(match: Match) -> bool:
    x, weight, _, stride, padding, dilation, transposed, _, groups = (_value(a) for a in match.args)
    return should_rewrite_convolution(x, weight, stride, padding, dilation, transposed, groups)


def _backward_check(match: Match) -> bool:
    _, x, weight, _, stride, padding, dilation, transposed, _, groups, mask = (_value(a) for a in match.args)
    return should_rewrite_convolution_backward(x, weight, stride, padding, dilation, transposed, groups, mask)


@register_graph_pattern(
    CallFunction(aten.convolution.default, *(Arg() for _ in range(9))), pass_dict=_PATTERNS, extra_check=_forward_check
)
def _replace_forward(
    match: Match, x: Any, weight: Any, bias: Any, stride: Any, padding: Any, dilation: Any, *_: Any
) -> None:
    replacement = functools.partial(conv2d_as_matmul, stride=stride, padding=padding, dilation=dilation)
    if bias is None:
        match.replace_by_example(lambda x, weight: replacement(x, weight, None), [x, weight])
    else:
        match.replace_by_example(lambda x, weight, bias: replacement(x, weight, bias), [x, weight, bias])


@register_graph_pattern(
    CallFunction(aten.convolution_backward.default, *(Arg() for _ in range(11))),
    pass_dict=_PATTERNS,
    extra_check=_backward_check,
)
def _replace_backward(
    match: Match,
    grad_output: Any,
    x: Any,
    weight: Any,
    _bias_sizes: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    *rest: Any,
) -> None:
    output_mask = list(rest[-1])

    def replacement(grad_output: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor | None, ...]:
        return conv2d_backward_as_matmuls(grad_output, x, weight, stride, padding, dilation, output_mask)

    match.replace_by_example(replacement, [grad_output, x, weight])


class SmallConvolutionsAsMatmuls(CustomGraphPass):
    """Inductor post-grad pass: small CPU convolutions and their backward as im2col GEMMs (module doc).
    Use as ``torch.compile(..., options={"post_grad_custom_pre_pass": SmallConvolutionsAsMatmuls()})``."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        _PATTERNS.apply(graph)

    def uuid(self) -> bytes:
        """Inductor's cache key: this file's contents (a change to the rewrite recompiles)."""
        return hashlib.sha256(Path(__file__).read_bytes() + str(MAX_MULTIPLY_ADDS).encode()).digest()


def inductor_options(options: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile``'s arguments for inductor with the config ``options`` (a graph pass among them).

    torch 2.4-2.5's ``torch.compile(options=...)`` refuses a value whose type is not the option's default's
    (``None`` for the graph passes); there inductor's entry point ``compile_fx`` is given as the backend,
    with the options as its config patches, which is the call ``torch.compile`` makes for inductor."""
    if CustomGraphPass is not object:
        return {"options": options}
    from torch._inductor.compile_fx import compile_fx

    return {"backend": functools.partial(compile_fx, config_patches=options)}
