"""Train the CIFAR-10 network of Table 1 in all five parameterizations from identical initial
parameters; write the training-error curves (Figure 1) as a PNG and the test errors (Table 2).

    python scripts/compare_parameterizations.py --download cifar.epochs=10 cifar.decay_start=5
"""

from pathlib import Path

from wn_rl.models.cli import parse_config
from wn_rl.models.comparison import CompareConfig, run_comparison

if __name__ == "__main__":
    config = parse_config(
        CompareConfig, "configs/paper/compare_parameterizations.yaml", __doc__, download_key="cifar.download"
    )
    run_comparison(config)
    print(Path(config.out_dir, "table2.md").read_text())
