"""Section 5.1's comparison: the Table 1 network trained in the five parameterizations from identical
initial parameters; the training-error curves (the paper's Figure 1) and the test errors (Table 2)."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from wn_rl.analysis.curves import pyplot
from wn_rl.checkpoint import atomic_write_bytes
from wn_rl.config import check, config_to_dict
from wn_rl.models.cifar import cifar_network
from wn_rl.models.cifar_experiment import CifarConfig, CifarResult, prepare_cifar, train_cifar
from wn_rl.models.training import resolve_device
from wn_rl.parameterization import PARAMETERIZATIONS

__all__ = ["PAPER_TEST_ERROR", "CompareConfig", "plot_training_error", "run_comparison", "table2_markdown"]

FIVE = ("normal", "batch_norm", "weight_norm", "weight_norm+mean_only_bn", "mean_only_bn")
PAPER_TEST_ERROR = {
    "normal": 0.0843,
    "batch_norm": 0.0805,
    "weight_norm": 0.0846,
    "weight_norm+mean_only_bn": 0.0731,
    "mean_only_bn": 0.0852,
}
"Table 2 of the paper (CIFAR-10 test error after 200 epochs, no data augmentation)."


def _paper_learning_rates() -> dict[str, float]:
    # Figure 1: 0.003 for WN, BN and mean-only BN, 0.0003 for the normal parameterization.
    return {name: (0.0003 if name == "normal" else 0.003) for name in FIVE}


@dataclass(frozen=True)
class CompareConfig:
    """The comparison run: one CIFAR config, the parameterizations and a learning rate for each."""

    cifar: CifarConfig = field(default_factory=CifarConfig)
    "the shared run settings (epochs, data, device, ...); its parameterization and lr are replaced per run"
    parameterizations: tuple[str, ...] = FIVE
    "which parameterizations to train, in this order"
    learning_rates: dict = field(default_factory=_paper_learning_rates)
    "Adam learning rate per parameterization (paper: the best of {3e-4, 1e-3, 3e-3, 1e-2})"
    out_dir: str = "results/compare_parameterizations"
    "where figure1.png, table2.md and results.json are written"

    def __post_init__(self) -> None:
        unknown = [p for p in self.parameterizations if p not in PARAMETERIZATIONS]
        check(
            not unknown and len(self.parameterizations) > 0,
            "parameterizations",
            self.parameterizations,
            f"a non-empty list of {sorted(PARAMETERIZATIONS)}",
        )
        missing = [p for p in self.parameterizations if p not in self.learning_rates]
        check(not missing, "learning_rates", self.learning_rates, f"a learning rate for each of {missing}")
        unknown = [k for k in self.learning_rates if k not in PARAMETERIZATIONS]
        check(not unknown, "learning_rates", unknown, f"keys among {sorted(PARAMETERIZATIONS)}")
        bad = {
            k: v
            for k, v in self.learning_rates.items()
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf
        }
        check(not bad, "learning_rates", bad, "positive numbers")


def run_comparison(config: CompareConfig, *, quiet: bool = False) -> dict[str, CifarResult]:
    """Train every parameterization from the same initial weights, on the same data order, and
    write the figure, the table and the raw curves to ``config.out_dir``."""
    pyplot()  # without matplotlib, say so now rather than after hours of training
    device = resolve_device(config.cifar.device)
    data = prepare_cifar(config.cifar, device)
    torch.manual_seed(config.cifar.seed)
    reference = cifar_network("normal", widths=tuple(config.cifar.widths))
    results: dict[str, CifarResult] = {}
    for name in config.parameterizations:
        run_config = replace(config.cifar, parameterization=name, lr=float(config.learning_rates[name]))
        results[name] = train_cifar(run_config, data=data, reference=reference, experiment="compare", quiet=quiet)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # each file is replaced atomically: an interrupted write never leaves a truncated table or JSON
    plot_training_error(results, out / "figure1.png")
    atomic_write_bytes(out / "table2.md", table2_markdown(results, config).encode())
    raw = {"config": config_to_dict(config), "results": {k: v.__dict__ for k, v in results.items()}}
    atomic_write_bytes(out / "results.json", json.dumps(raw, indent=2).encode())
    return results


def table2_markdown(results: dict[str, CifarResult], config: CompareConfig) -> str:
    """Table 2 as markdown: our final test error next to the paper's (which is after 200 epochs)."""
    epochs = f"{config.cifar.epochs} epoch" + ("s" if config.cifar.epochs != 1 else "")
    lines = [
        f"| parameterization | lr | test error after {epochs} | paper (200 epochs) | ms per step |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        paper = PAPER_TEST_ERROR.get(name)
        step_ms = 1e3 * sum(result.seconds_per_step) / max(len(result.seconds_per_step), 1)
        lines.append(
            f"| {name} | {config.learning_rates[name]:g} | {100 * result.final_test_error:.2f}% | "
            f"{'-' if paper is None else f'{100 * paper:.2f}%'} | {step_ms:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_training_error(results: dict[str, CifarResult], path: str | Path) -> Path:
    """Training error per epoch for each parameterization (the paper's Figure 1), saved as a PNG."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        epochs = range(1, len(result.train_error) + 1)
        ax.plot(epochs, result.train_error, label=name)
    ax.set_xlabel("training epochs")
    ax.set_ylabel("training error")
    ax.set_title("CIFAR-10, Table 1 network (cf. Figure 1)")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
    return Path(path)
