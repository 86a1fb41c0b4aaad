"""Time one training step (forward, backward, Adam step) with plain layers, wn_rl's weight norm and
PyTorch's own ``torch.nn.utils.parametrizations.weight_norm``, interleaved in one process.

Networks: the Nature-CNN Q-network (4x84x84 uint8 input, batch 32 and 64) and a network shaped like
the paper's Table 1 CIFAR-10 net (96/192 channels, 32x32 input, batch 100). Prints the median time
per step of each variant and its ratio to plain; targets: wn_rl at most 1.05x plain on a CPU and 1.03x
on a GPU (compiled), and no slower than PyTorch's own.

    python scripts/bench_wn_overhead.py                       # CPU, eager
    python scripts/bench_wn_overhead.py --device cuda --compile --out results.json
    python scripts/bench_wn_overhead.py --threads 1 --clock cpu    # a shared CPU: time the process's CPU use

``--step whole`` compiles the whole step (forward, backward and Adam, written as tensor math: the DQN
learner's ``agents.dqn.fused`` code) into one graph instead of compiling the forward alone; with
``--compile-mode reduce-overhead`` on a GPU that graph is replayed as one CUDA graph, so no host work is
left between the kernels and the ratio measures what weight norm adds on the device:

    python scripts/bench_wn_overhead.py --device cuda --step whole --compile-mode reduce-overhead

``--clock cpu`` times each step by the process's CPU time (``time.process_time``) instead of wall time:
on a machine shared with other jobs that removes the time spent waiting for a core, the largest source
of noise there (cache and memory-bandwidth contention remain).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.func import functional_call, grad
from torch.nn.utils import parametrizations

import wn_rl
from agents.dqn.config import AgentConfig
from agents.dqn.fused import STATE_KEYS, bias_corrections, optimizer_math
from wn_rl.convert import layer_norms

VARIANTS = ("plain", "wn_rl", "torch_wn")
KEPT = "wn_rl_kept"  # experimental, --step whole --kept-weights: see make_kept_whole_step
ADAM = AgentConfig(optimizer="adam", lr=1e-4, beta1=0.9, beta2=0.999)  # torch.optim.Adam's defaults, lr 1e-4


def nature_cnn(n_actions: int = 6) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(),
        nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(3136, 512), nn.ReLU(),
        nn.Linear(512, n_actions),
    )  # fmt: skip


def cifar_table1() -> nn.Module:
    def conv(c_in: int, c_out: int, k: int, pad: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, k, padding=pad), nn.LeakyReLU(0.1)]

    return nn.Sequential(
        *conv(3, 96, 3, 1), *conv(96, 96, 3, 1), *conv(96, 96, 3, 1), nn.MaxPool2d(2), nn.Dropout(0.5),
        *conv(96, 192, 3, 1), *conv(192, 192, 3, 1), *conv(192, 192, 3, 1), nn.MaxPool2d(2), nn.Dropout(0.5),
        *conv(192, 192, 3, 0), *conv(192, 192, 1, 0), *conv(192, 192, 1, 0),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(192, 10),
    )  # fmt: skip


def torch_weight_norm(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            parametrizations.weight_norm(module, "weight", dim=0)
    return model


def make_variant(base: nn.Module, variant: str) -> nn.Module:
    model = copy.deepcopy(base)
    if variant in ("wn_rl", KEPT):
        return wn_rl.weight_norm(model)
    if variant == "torch_wn":
        return torch_weight_norm(model)
    return model


def _batch(inputs: torch.Tensor, uint8: bool) -> torch.Tensor:
    return inputs.float().div(255.0) if uint8 else inputs


def make_step(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, uint8: bool, args: argparse.Namespace
) -> Callable[[], None]:
    """One step as users write it: the module's forward (compiled with ``--compile``), autograd's
    backward, ``torch.optim.Adam`` (fused on CUDA)."""
    forward = torch.compile(model, mode=args.compile_mode, dynamic=False) if args.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=ADAM.lr, fused=inputs.is_cuda)

    def step() -> None:
        loss = nn.functional.smooth_l1_loss(forward(_batch(inputs, uint8)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _adam_state(params: list[torch.Tensor]) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
    """Adam's moments for ``params`` (zeros, torch.optim's names) and the step count."""
    state = {k: [torch.zeros_like(p) for p in params] for k in STATE_KEYS[ADAM.optimizer]}
    return state, torch.zeros((), device=params[0].device)


def _adam_in_place(
    names: list[str], params: list[torch.Tensor], grads: dict[str, torch.Tensor], state: dict, count: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One Adam step (``agents.dqn.fused.optimizer_math``, torch.optim's formulas) written in place into
    ``params``, ``state`` and ``count``; returns the new parameters by name."""
    new_count = count + 1
    scalars = bias_corrections(ADAM, new_count)
    new = {}
    for i, (name, p) in enumerate(zip(names, params, strict=True)):
        new[name], new_state = optimizer_math(ADAM, p, grads[name], {k: s[i] for k, s in state.items()}, scalars)
        p.copy_(new[name])
        for k, s in state.items():
            s[i].copy_(new_state[k])
    count.copy_(new_count)
    return new


def _as_step(whole: Callable[..., None], tensors: tuple, static: list[torch.Tensor], args: argparse.Namespace):
    """``whole(*tensors)`` as a step; compiled as one graph with ``--compile``. For CUDA graphs the
    ``static`` tensors (what the graph reads and writes in place) are used where they live, not copied
    in on every replay."""
    if not args.compile:
        return lambda: whole(*tensors)
    if static[0].is_cuda and args.compile_mode == "reduce-overhead":
        for t in static:
            torch._dynamo.mark_static_address(t)
    compiled = torch.compile(whole, mode=args.compile_mode, fullgraph=True, dynamic=False)
    return lambda: compiled(*tensors)


def make_whole_step(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, uint8: bool, args: argparse.Namespace
) -> Callable[[], None]:
    """The same step as one function of tensors: gradients by ``torch.func.grad`` over
    ``functional_call``, Adam as tensor math, every new value written in place; compiled whole with
    ``--compile`` (one CUDA graph with ``--compile-mode reduce-overhead``)."""
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]  # same storage: in-place writes update the model
    buffers = dict(model.named_buffers())
    state, count = _adam_state(params)

    def loss_fn(by_name: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = functional_call(model, (by_name, buffers), (_batch(inputs, uint8),))
        return nn.functional.smooth_l1_loss(outputs, targets)

    def whole(params: list[torch.Tensor], count: torch.Tensor, state: dict[str, list[torch.Tensor]]) -> None:
        _adam_in_place(names, params, grad(loss_fn)(dict(zip(names, params, strict=True))), state, count)

    static = [*params, count, *(t for ts in state.values() for t in ts), inputs, targets]
    return _as_step(whole, (params, count, state), static, args)


def _wn_grads(
    layer: wn_rl.WNLayer, v: torch.Tensor, g: torch.Tensor, grad_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (3): ``(grad_v, grad_g)`` from the gradient of the effective weight (``g``: one per unit)."""
    shape, norm = layer._g_shape, layer_norms(v, layer.norm_dim)
    grad_g = (grad_w * v).movedim(layer.norm_dim, 0).flatten(1).sum(1) / norm
    return (g / norm).view(shape) * grad_w - (g * grad_g / norm**2).view(shape) * v, grad_g


def make_kept_whole_step(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, uint8: bool, args: argparse.Namespace
) -> Callable[[], None]:
    """Experimental: wn_rl's whole step with each effective weight w = g v/||v|| kept between steps.

    The forward and backward run on the folded network (plain layers holding the kept w), so they are
    the plain network's; the gradients for g and v follow from grad_w by eq. (3); Adam updates v, g and
    b; and the new w is written back for the next step. The norms then live in the optimizer's part of
    the graph, where inductor can fuse them with the update of v, instead of in a separate kernel per
    layer in the forward. Same arithmetic as :func:`make_whole_step` (tested), one more weight-sized
    tensor per layer. Measured beside the others to decide whether the library should offer it."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, wn_rl.WNLayer)}
    if any(m.scale != "linear" for m in layers.values()):
        raise SystemExit("--kept-weights supports scale='linear' only")
    folded = wn_rl.remove_weight_norm(copy.deepcopy(model))
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    kept = [folded.get_parameter(f"{prefix}.weight").detach() for prefix in layers]
    buffers = dict(folded.named_buffers())
    wn_names = {f"{prefix}.{p}" for prefix in layers for p in ("v", "g")}
    state, count = _adam_state(params)

    def loss_fn(by_name: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = functional_call(folded, (by_name, buffers), (_batch(inputs, uint8),))
        return nn.functional.smooth_l1_loss(outputs, targets)

    def whole(params: list[torch.Tensor], kept: list[torch.Tensor], count: torch.Tensor, state: dict) -> None:
        by_name = dict(zip(names, params, strict=True))
        plain = {n: t for n, t in by_name.items() if n not in wn_names}
        grads = grad(loss_fn)(plain | {f"{prefix}.weight": w for prefix, w in zip(layers, kept, strict=True)})
        for prefix, layer in layers.items():
            v, g = by_name[f"{prefix}.v"], by_name[f"{prefix}.g"]
            grads[f"{prefix}.v"], grads[f"{prefix}.g"] = _wn_grads(layer, v, g, grads.pop(f"{prefix}.weight"))
        new = _adam_in_place(names, params, grads, state, count)
        for (prefix, layer), w in zip(layers.items(), kept, strict=True):
            g = new[f"{prefix}.g"].view(layer._g_shape)
            w.copy_(torch._weight_norm(new[f"{prefix}.v"], g, layer.norm_dim))

    static = [*params, *kept, count, *(t for ts in state.values() for t in ts), inputs, targets]
    return _as_step(whole, (params, kept, count, state), static, args)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_case(
    name: str, base: nn.Module, inputs: torch.Tensor, n_out: int, args: argparse.Namespace
) -> dict[str, object]:
    device = inputs.device
    targets = torch.randn(inputs.shape[0], n_out, device=device)
    uint8 = inputs.dtype == torch.uint8
    variants = (*VARIANTS, KEPT) if args.kept_weights else VARIANTS
    steps = {}
    skips = counters["inductor"]["cudagraph_skips"]
    for variant in variants:
        model = make_variant(base, variant).to(device)
        make = make_kept_whole_step if variant == KEPT else make_whole_step if args.step == "whole" else make_step
        steps[variant] = make(model, inputs, targets, uint8, args)
        for _ in range(args.warmup):
            steps[variant]()
    synchronize(device)
    if device.type == "cuda" and counters["inductor"]["cudagraph_skips"] != skips:  # say so, time anyway
        print(f"{name}: inductor skipped a CUDA graph (its reason is on stderr, as a perf hint)", flush=True)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {v: [] for v in variants}
    order = list(variants)
    for _ in range(args.reps):
        random.shuffle(order)
        for variant in order:
            synchronize(device)
            start = clock()
            for _ in range(args.steps):
                steps[variant]()
            synchronize(device)
            times[variant].append((clock() - start) / args.steps)
    medians = {v: statistics.median(t) for v, t in times.items()}
    return {
        "case": name,
        "median_ms": {v: 1000 * m for v, m in medians.items()},
        "ratio_to_plain": {v: medians[v] / medians["plain"] for v in variants},
        "wn_rl_vs_torch_wn": medians["wn_rl"] / medians["torch_wn"],
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument(
        "--step",
        choices=("module", "whole"),
        default="module",
        help="module: compile the forward (autograd backward, torch.optim.Adam); whole: forward, backward and "
        "Adam as one compiled graph (implies --compile)",
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (e.g. reduce-overhead)")
    parser.add_argument(
        "--kept-weights",
        action="store_true",
        help=f"with --step whole, also time {KEPT} (experimental: effective weights kept between steps)",
    )
    parser.add_argument("--combo-kernels", action="store_true", help="inductor: fuse independent small kernels")
    parser.add_argument("--matmul-precision", default="highest", help="torch.set_float32_matmul_precision")
    parser.add_argument("--threads", type=int, default=0, help="intra-op CPU threads (0: torch's default)")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions per variant")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed per repetition")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--cases", default="nature32,nature64,cifar100", help="comma-separated cases")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time or process CPU time")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.step == "whole" or args.compile_mode != "default":
        args.compile = True
    if args.kept_weights and args.step != "whole":
        raise SystemExit("--kept-weights is a form of the whole step: add --step whole")
    if args.clock == "cpu" and args.device != "cpu":
        raise SystemExit("--clock cpu measures host CPU time, which says nothing about GPU work; use --clock wall")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    return args


def configure_torch(args: argparse.Namespace) -> None:
    # Every (case, variant) is its own compiled graph: without a higher limit dynamo silently falls
    # back to eager for the later ones and the comparison is void.
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    if args.combo_kernels:
        torch._inductor.config.combo_kernels = True
    if args.compile_mode == "reduce-overhead":
        torch._logging.set_logs(perf_hints=True)  # why inductor skips a CUDA graph, if it does
    torch.set_float32_matmul_precision(args.matmul_precision)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def main() -> None:
    args = parse_args()
    configure_torch(args)
    device = torch.device(args.device)
    cases = {
        "nature32": (nature_cnn, lambda: torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8), 6),
        "nature64": (nature_cnn, lambda: torch.randint(0, 256, (64, 4, 84, 84), dtype=torch.uint8), 6),
        "cifar100": (cifar_table1, lambda: torch.randn(100, 3, 32, 32), 10),
    }
    unknown = set(args.cases.split(",")) - set(cases)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {sorted(cases)}")
    results = []
    for name in args.cases.split(","):
        build, make_inputs, n_out = cases[name]
        result = bench_case(name, build(), make_inputs().to(device), n_out, args)
        results.append(result)
        ms, ratio = result["median_ms"], result["ratio_to_plain"]
        print(
            f"{name:9s} plain {ms['plain']:8.2f} ms | wn_rl {ms['wn_rl']:8.2f} ms ({ratio['wn_rl']:.3f}x) | "
            f"torch_wn {ms['torch_wn']:8.2f} ms ({ratio['torch_wn']:.3f}x) | wn_rl/torch_wn "
            f"{result['wn_rl_vs_torch_wn']:.3f}"
            + (f" | {KEPT} {ms[KEPT]:8.2f} ms ({ratio[KEPT]:.3f}x)" if KEPT in ms else ""),
            flush=True,
        )
    meta = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "clock": args.clock,
        "compile": args.compile_mode if args.compile else None,
        "step": args.step,
        "kept_weights": args.kept_weights,
        "combo_kernels": args.combo_kernels,
        "matmul_precision": args.matmul_precision,
        "reps": args.reps,
        "steps": args.steps,
    }
    print(json.dumps(meta))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
