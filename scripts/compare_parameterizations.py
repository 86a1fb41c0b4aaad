"""Train the CIFAR-10 network of Table 1 in all five parameterizations from identical initial
parameters; write the training-error curves (Figure 1) as a PNG and the test errors (Table 2).

    python scripts/compare_parameterizations.py --download cifar.epochs=10 cifar.decay_start=5

A bad config or a missing dataset exits with 2, a checkpoint or log that cannot be written (a full disk)
with 1, each with one line naming the cause.
"""

from pathlib import Path

from wn_rl.cli import brief_warnings
from wn_rl.models.cli import exit_on_error, parse_config
from wn_rl.models.comparison import CompareConfig, run_comparison

if __name__ == "__main__":
    brief_warnings()
    config = parse_config(
        CompareConfig,
        "configs/paper/compare_parameterizations.yaml",
        __doc__,
        download_key="cifar.download",
        example="cifar.epochs=10 cifar.decay_start=5",
    )
    with exit_on_error():
        run_comparison(config)
    print(Path(config.out_dir, "table2.md").read_text())
