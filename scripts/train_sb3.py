"""Train an SB3 / sb3-contrib algorithm with a weight-normalized (or SB3's own) policy.

    python scripts/train_sb3.py --config configs/sb3/dqn_cartpole_wn.yaml [key=value ...]
    python scripts/train_sb3.py --resume runs/sb3/RUN_DIR [total_timesteps=...]

Overrides are YAML values, nested with dots: ``total_timesteps=20000 eval.freq=5000
policy_kwargs.parameterization=normal``. ``--resume`` continues the newest complete model of a run
directory (its checkpoints or final model) with the step counter continued, using the run's
``config.yaml`` unless ``--config`` is given; a changed config is refused (except total_timesteps and the
logging, checkpoint and evaluation intervals) unless ``--force``. Watch with ``tensorboard --logdir runs/sb3``.

Exit codes: 0 done; 2 bad config or input; 1 a model could not be written, or a NaN/inf stopped the run
(the message names the step, the tensor or the environment, and the last good checkpoint; the bad step
was not applied and nothing after it was saved); 130 after SIGINT and 143 after SIGTERM, with the model
saved first (a second Ctrl-C quits at once; earlier files stay intact); 75 (EX_TEMPFAIL) when another process
is training the same run directory (it holds ``RUN_DIR/.trainer.lock``): nothing was allocated or written,
and a study reports the run as skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from wn_rl.checkpoint import CheckpointError
from wn_rl.cli import brief_warnings
from wn_rl.config import ConfigError, config_to_dict
from wn_rl.run_lock import train_holding_lock
from wn_rl.sb3.config import SB3Config, load_sb3_config, load_sb3_run_config
from wn_rl.sb3.guard import EnvNonFiniteError, NonFiniteTrainingError
from wn_rl.sb3.runner import SB3Run, run_dir_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (e.g. configs/sb3/dqn_cartpole_wn.yaml)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run directory from its newest model")
    parser.add_argument("--force", action="store_true", help="resume even if the config changed")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (nested keys with dots)")
    args = parser.parse_intermixed_args(argv)
    if not args.config and not args.resume:
        parser.error("give --config CONFIG.yaml or --resume RUN_DIR")
    try:
        if args.resume:
            run_dir = Path(args.resume)
            if not run_dir.is_dir():  # a mistyped path: refused before the run's lock would create it
                raise ConfigError(f"--resume {run_dir}: the directory does not exist")
            if args.config:
                config = load_sb3_config(args.config, args.overrides)
            else:
                config = load_sb3_run_config(run_dir, args.overrides)
        else:
            config = load_sb3_config(args.config, args.overrides)
            run_dir = run_dir_for(config)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip(), flush=True)  # the log's first lines
    # the lock before the envs and the model: a run in use is refused before they are built
    return train_holding_lock(run_dir, "start a separate run (run_name=...)", lambda: _train(config, run_dir, args))


def _train(config: SB3Config, run_dir: Path, args: argparse.Namespace) -> int:
    """Build the run and train it (the run's lock held); the exit code."""
    try:
        run = SB3Run(config, run_dir, resume=bool(args.resume), force=args.force)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir.parent})", flush=True)
    try:
        summary = run.train()
    except ConfigError as exc:  # the algorithm rejected the policy or a hyperparameter, before training
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteTrainingError, EnvNonFiniteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # no stop signal recorded: this Ctrl-C came before the loop's handlers were installed, so it was the first
        when = "again" if run.stop.stop_signal is not None else "during start-up"
        print(f"interrupted {when}: quit without saving; the previous files are intact", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=1, allow_nan=False))
    if summary["interrupted"] is not None:
        print(f"stopped by a signal; resume with: python scripts/train_sb3.py --resume {run_dir}", file=sys.stderr)
        return 128 + summary["interrupted"]
    return 0


if __name__ == "__main__":
    brief_warnings()
    sys.exit(main())
