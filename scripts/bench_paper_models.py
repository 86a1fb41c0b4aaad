"""Time per training step of the paper's CIFAR-10 network (Table 1) in the five parameterizations,
measured side by side in one run (section 5.1: batch norm ~16% slower than normal, weight norm not
noticeably slower).

    python scripts/bench_paper_models.py --device cpu --steps 5
    python scripts/bench_paper_models.py --device cuda --steps 50
"""

import argparse
import os
import platform

import torch

from wn_rl.models.benchmark import format_step_times, time_training_steps
from wn_rl.models.comparison import FIVE
from wn_rl.models.training import resolve_device

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=100, help="minibatch size (paper: 100)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per parameterization")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per parameterization first")
    parser.add_argument("--widths", type=int, nargs=2, default=(96, 192), help="channels (Table 1: 96 192)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op CPU threads (0: torch's default)")
    parser.add_argument("--parameterizations", nargs="+", default=list(FIVE), help="names to time")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"torch {torch.__version__}, device {device} ({name}), threads {torch.get_num_threads()}, "
        f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, interleaved; "
        f"load average before {os.getloadavg()[0]:.2f}"
    )
    times = time_training_steps(
        args.parameterizations,
        device=device,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        widths=tuple(args.widths),
    )
    print(format_step_times(times))
    print(f"load average after {os.getloadavg()[0]:.2f} (on {os.cpu_count()} cores)")
