"""Time one training step (forward, backward, Adam step) with plain layers, wn_rl's weight norm and
PyTorch's own ``torch.nn.utils.parametrizations.weight_norm``, interleaved in one process.

Networks: the Nature-CNN Q-network (4x84x84 uint8 input, batch 32 and 64), a network shaped like
the paper's Table 1 CIFAR-10 net (96/192 channels, 32x32 input, batch 100) and, as ``lstm32`` (not run by
default), a recurrent Q-head: an LSTM of 256 units over 32-step sequences of 64 features, batch 32 (wn_rl's
``WNLSTM``, the same fused kernel run with computed weights, against ``nn.LSTM``). Prints the median time
per step of each variant and its ratio to plain; targets: wn_rl at most 1.05x plain on a CPU and 1.03x
on a GPU (compiled), and no slower than PyTorch's own.

    python scripts/bench_wn_overhead.py                       # CPU, eager
    python scripts/bench_wn_overhead.py --device cuda --compile --out results.json
    python scripts/bench_wn_overhead.py --threads 1 --clock cpu    # a shared CPU: time the process's CPU use
    python scripts/bench_wn_overhead.py --cases nature32 --per-layer   # and where the extra time goes

``--step whole`` compiles the whole step (forward, backward and Adam, written as tensor math: the DQN
learner's ``agents.dqn.fused`` code) into one graph instead of compiling the forward alone; with
``--compile-mode reduce-overhead`` on a GPU that graph is replayed as one CUDA graph, so no host work is
left between the kernels and the ratio measures what weight norm adds on the device:

    python scripts/bench_wn_overhead.py --device cuda --step whole --compile-mode reduce-overhead

``--clock cpu`` times each step by the process's CPU time (``time.process_time``) instead of wall time:
on a machine shared with other jobs that removes the time spent waiting for a core, the largest source
of noise there (cache and memory-bandwidth contention remain).

Besides the ratio of medians, each ratio is also given paired: every repetition times all variants back to
back (in a shuffled order), so the per-repetition ratio cancels what drifts between repetitions (other
jobs, clock speed). The median of those ratios comes with a 95% bootstrap interval
(``wn_rl.analysis.stats.stratified_bootstrap_ci``), which says whether a run has settled a target:
``wn_rl 1.041x [1.022, 1.058]`` has not shown 1.05x; an upper bound below it would.
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
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.func import functional_call, grad
from torch.nn.utils import parametrizations

import wn_rl
from agents.dqn.config import AgentConfig
from agents.dqn.fused import STATE_KEYS, bias_corrections, optimizer_math
from agents.dqn.learner import parameter_gap
from wn_rl.analysis.stats import stratified_bootstrap_ci

VARIANTS = ("plain", "wn_rl", "torch_wn")
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


class LastStep(nn.Module):
    """An ``nn.LSTM`` (batch first) that returns its output at the last step."""

    def __init__(self, lstm: nn.Module) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0][:, -1]


def lstm_q_head(n_actions: int = 6) -> nn.Module:
    return nn.Sequential(LastStep(nn.LSTM(64, 256, batch_first=True)), nn.Linear(256, n_actions))


def torch_weight_norm(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            parametrizations.weight_norm(module, "weight", dim=0)
        elif isinstance(module, nn.LSTM):  # per row of each weight, as wn_rl's cells
            for name, _ in list(module.named_parameters()):
                if name.startswith("weight_"):
                    parametrizations.weight_norm(module, name, dim=0)
    return model


def make_variant(base: nn.Module, variant: str) -> nn.Module:
    model = copy.deepcopy(base)
    if variant == "wn_rl":
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


def make_whole_step(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, uint8: bool, args: argparse.Namespace
) -> Callable[[], None]:
    """The same step as one function of tensors: gradients by ``torch.func.grad`` over
    ``functional_call``, Adam as tensor math (``agents.dqn.fused.optimizer_math``, torch.optim's formulas),
    every new value written in place; compiled whole with ``--compile`` (one CUDA graph with
    ``--compile-mode reduce-overhead``)."""
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]  # same storage: in-place writes update the model
    buffers = dict(model.named_buffers())
    keys = STATE_KEYS[ADAM.optimizer]
    state = {k: [torch.zeros_like(p) for p in params] for k in keys}
    count = torch.zeros((), device=inputs.device)  # float32, as torch.optim keeps `step`

    def loss_fn(by_name: dict[str, torch.Tensor]) -> torch.Tensor:
        outputs = functional_call(model, (by_name, buffers), (_batch(inputs, uint8),))
        return nn.functional.smooth_l1_loss(outputs, targets)

    def whole(params: list[torch.Tensor], count: torch.Tensor, state: dict[str, list[torch.Tensor]]) -> None:
        grads = grad(loss_fn)(dict(zip(names, params, strict=True)))
        new_count = count + 1
        scalars = bias_corrections(ADAM, new_count)
        for i, (name, p) in enumerate(zip(names, params, strict=True)):
            new_p, new_state = optimizer_math(ADAM, p, grads[name], {k: state[k][i] for k in keys}, scalars)
            p.copy_(new_p)
            for k in keys:
                state[k][i].copy_(new_state[k])
        count.copy_(new_count)

    if not args.compile:
        return lambda: whole(params, count, state)
    if inputs.is_cuda and args.compile_mode == "reduce-overhead":
        # what the graph reads and writes in place is used where it lives, not copied in on every replay
        for t in [*params, count, *(t for ts in state.values() for t in ts), inputs, targets]:
            torch._dynamo.mark_static_address(t)
    compiled = torch.compile(whole, mode=args.compile_mode, fullgraph=True, dynamic=False)
    return lambda: compiled(params, count, state)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_case(
    name: str, base: nn.Module, inputs: torch.Tensor, n_out: int, args: argparse.Namespace
) -> dict[str, object]:
    device = inputs.device
    targets = torch.randn(inputs.shape[0], n_out, device=device)
    uint8 = inputs.dtype == torch.uint8
    steps, agreement = {}, {}
    skips = counters["inductor"]["cudagraph_skips"]
    # dropout draws other masks in the check's module steps than in the whole steps before it: nothing to compare
    checkable = args.step == "whole" and not any(isinstance(m, nn.Dropout) for m in base.modules())
    if args.step == "whole" and not checkable:
        print(f"{name}: the whole step's agreement with the module step is not checked (the network has dropout)")
    for variant in VARIANTS:
        model = make_variant(base, variant).to(device)
        reference = copy.deepcopy(model) if checkable else None
        steps[variant] = (make_whole_step if args.step == "whole" else make_step)(model, inputs, targets, uint8, args)
        for _ in range(args.warmup):
            steps[variant]()
        if reference is not None:
            agreement[variant] = agrees_with_module_step(reference, model, inputs, targets, uint8, args.warmup)
    synchronize(device)
    for variant, check in agreement.items():
        print(
            f"{name} {variant}: after {args.warmup} steps the whole step's parameters differ from the module "
            f"step's by at most {check['max_abs_diff']:.1e}; {check['share_off_by_a_tenth_step']:.2%} of them "
            f"by more than a tenth of a step ({ADAM.lr / 10:g})",
            flush=True,
        )
    if device.type == "cuda" and counters["inductor"]["cudagraph_skips"] != skips:  # say so, time anyway
        print(f"{name}: inductor skipped a CUDA graph (its reason is on stderr, as a perf hint)", flush=True)
    graphs = counters["stats"]["unique_graphs"]
    queued: dict[str, list[float]] = {}
    times = time_interleaved(steps, args, device, queued)
    if counters["stats"]["unique_graphs"] != graphs:  # warm-up too short: compile time inside the timed steps
        print(f"{name}: {counters['stats']['unique_graphs'] - graphs} graph(s) compiled while timing", flush=True)
    medians = {v: statistics.median(t) for v, t in times.items()}
    return {
        "case": name,
        "median_ms": {v: 1000 * m for v, m in medians.items()},
        "ratio_to_plain": {v: medians[v] / medians["plain"] for v in VARIANTS},
        "wn_rl_vs_torch_wn": medians["wn_rl"] / medians["torch_wn"],
        "paired_ratio_to_plain": {v: paired_ratio(times[v], times["plain"]) for v in VARIANTS if v != "plain"},
        "paired_wn_rl_vs_torch_wn": paired_ratio(times["wn_rl"], times["torch_wn"]),
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips,
        "graphs_compiled_while_timing": counters["stats"]["unique_graphs"] - graphs,
        # the share of a step's time the host took to queue it: near 1, the steps are host-bound and the ratios
        # measure Python and launch overhead more than the device's work
        "host_queue_share": {v: statistics.median(q) / medians[v] for v, q in queued.items()},
        "whole_vs_module_step": agreement,
    }


def time_interleaved(
    fns: dict[str, Callable[[], None]],
    args: argparse.Namespace,
    device: torch.device,
    queued: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function: ``args.reps`` repetitions, each timing ``args.steps`` calls of every
    function back to back in a shuffled order. ``queued`` (when given) gets the seconds per call until the last
    call returned, before the device finished: the host's share of the time."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for _ in range(args.reps):
        random.shuffle(order)
        for key in order:
            synchronize(device)
            start = clock()
            for _ in range(args.steps):
                fns[key]()
            if queued is not None:
                queued.setdefault(key, []).append((clock() - start) / args.steps)
            synchronize(device)
            times[key].append((clock() - start) / args.steps)
    return times


def bench_parts(name: str, base: nn.Module, inputs: torch.Tensor, args: argparse.Namespace) -> list[dict[str, object]]:
    """Where a step's time goes (``--per-layer``): each weight layer's forward and backward alone, on the
    input it gets in the network and a fixed output gradient, and the Adam step alone, per variant."""
    device = inputs.device
    models = {v: make_variant(base, v).to(device) for v in VARIANTS}
    parts: dict[str, dict[str, Callable[[], None]]] = {}
    x = _batch(inputs, inputs.dtype == torch.uint8)
    with torch.no_grad():
        for index, layer in enumerate(models["plain"]):
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                label = f"{index} {type(layer).__name__}{tuple(layer.weight.shape)}"
                layer_input = x.detach().requires_grad_(index > 0)  # the batch itself needs no gradient
                out_grad = torch.randn_like(layer(layer_input))
                parts[label] = {v: _forward_backward(m[index], layer_input, out_grad) for v, m in models.items()}
            x = layer(x)
    parts["Adam step"] = {v: _adam_step(m) for v, m in models.items()}
    rows = []
    for label, fns in parts.items():
        for fn in fns.values():
            for _ in range(args.warmup):
                fn()
        medians = {v: 1e6 * statistics.median(t) for v, t in time_interleaved(fns, args, device).items()}
        rows.append({"case": name, "part": label, "median_us": medians})
        extra = " | ".join(f"{v} {medians[v] - medians['plain']:+7.1f}" for v in VARIANTS if v != "plain")
        print(f"{name:9s} {label:28s} plain {medians['plain']:8.1f} us | extra: {extra} us", flush=True)
    return rows


def _forward_backward(layer: nn.Module, layer_input: torch.Tensor, out_grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        layer.zero_grad(set_to_none=True)
        layer_input.grad = None
        layer(layer_input).backward(out_grad)

    return run


def _adam_step(model: nn.Module) -> Callable[[], None]:
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.Adam(params, lr=ADAM.lr, fused=params[0].is_cuda)
    return optimizer.step


def paired_ratio(times: list[float], reference: list[float]) -> dict[str, float]:
    """Median of the per-repetition ratios ``times[i] / reference[i]`` and its 95% bootstrap interval.

    Both were timed in the same repetition, back to back, so what drifts between repetitions (other jobs
    on the machine, clock speed) largely cancels in each ratio."""
    ratios = np.asarray(times) / np.asarray(reference)
    median, low, high = stratified_bootstrap_ci(ratios, statistic=np.median)
    return {"median": median, "ci95_low": low, "ci95_high": high}


def agrees_with_module_step(
    start: nn.Module, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, uint8: bool, n: int
) -> dict[str, float]:
    """How far ``model``, after ``n`` whole steps from ``start``, is from ``n`` eager module steps (autograd,
    torch.optim.Adam) from ``start``. A correct graph is off by rounding, which Adam's normalised update
    can turn into a step's size for a few near-zero gradients; a miscompiled one by a step for many."""
    step = make_step(start, inputs, targets, uint8, argparse.Namespace(compile=False))
    for _ in range(n):
        step()
    gap = parameter_gap(start, model, ADAM.lr / 10)
    return {"max_abs_diff": gap["max_abs_diff"], "share_off_by_a_tenth_step": gap["share_off"]}


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
    parser.add_argument("--combo-kernels", action="store_true", help="inductor: fuse independent small kernels")
    parser.add_argument("--matmul-precision", default="highest", help="torch.set_float32_matmul_precision")
    parser.add_argument("--threads", type=int, default=0, help="intra-op CPU threads (0: torch's default)")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions per variant")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed per repetition")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--cases", default="nature32,nature64,cifar100", help="comma-separated cases")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time or process CPU time")
    parser.add_argument(
        "--per-layer",
        action="store_true",
        help="also time each weight layer's forward+backward and the Adam step alone (eager), per variant",
    )
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.step == "whole" or args.compile_mode != "default":
        args.compile = True
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
        "lstm32": (lstm_q_head, lambda: torch.randn(32, 32, 64), 6),
    }
    unknown = set(args.cases.split(",")) - set(cases)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {sorted(cases)}")
    meta = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "clock": args.clock,
        "compile": args.compile_mode if args.compile else None,
        "step": args.step,
        "combo_kernels": args.combo_kernels,
        "matmul_precision": args.matmul_precision,
        "reps": args.reps,
        "steps": args.steps,
    }
    print(json.dumps(meta), flush=True)
    results = []
    for name in args.cases.split(","):
        build, make_inputs, n_out = cases[name]
        result = bench_case(name, build(), make_inputs().to(device), n_out, args)
        results.append(result)
        ms, ratio = result["median_ms"], result["ratio_to_plain"]
        print(
            f"{name:9s} plain {ms['plain']:8.2f} ms | wn_rl {ms['wn_rl']:8.2f} ms ({ratio['wn_rl']:.3f}x) | "
            f"torch_wn {ms['torch_wn']:8.2f} ms ({ratio['torch_wn']:.3f}x) | wn_rl/torch_wn "
            f"{result['wn_rl_vs_torch_wn']:.3f}",
            flush=True,
        )
        paired = {**result["paired_ratio_to_plain"], "wn_rl/torch_wn": result["paired_wn_rl_vs_torch_wn"]}
        cells = (f"{k} {r['median']:.3f} [{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]" for k, r in paired.items())
        print(f"{name:9s} paired, median [95% CI]: " + " | ".join(cells), flush=True)
        shares = " | ".join(f"{k} {v:.2f}" for k, v in result["host_queue_share"].items())
        print(f"{name:9s} host's share of a step (near 1: host-bound): {shares}", flush=True)
        if args.per_layer:
            result["parts"] = bench_parts(name, build(), make_inputs().to(device), args)
        if args.out:  # after every case: a run stopped at a time limit keeps the cases it finished
            tmp = Path(f"{args.out}.tmp")
            tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
            os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
