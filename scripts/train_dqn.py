"""Train the native DQN: ``python scripts/train_dqn.py --config configs/dqn/smoke.yaml [key=value ...]``.

Overrides use the config's sections, e.g. ``run.total_agent_steps=100000 agent.lr=1e-4``. Running the
same command again resumes the run from its newest complete checkpoint; ``--resume RUN_DIR`` resumes a
given run directory (one without a run, e.g. a mistyped path, is refused). Watch it with
``tensorboard --logdir runs/dqn``.

Exit codes: 0 done; 2 bad config or input (nothing was allocated); 1 a checkpoint or log could not be
written or read (a full disk: the message names the file; the previous checkpoint is intact and the same
command resumes from it once there is space), or a NaN/inf stopped the run (the message names the step,
the tensor and the last good checkpoint); 130 after SIGINT (Ctrl-C) and 143 after SIGTERM, with a
checkpoint written first (a second Ctrl-C quits at once; the previous checkpoint stays intact); 75
(EX_TEMPFAIL) when another process is training the same run directory (it holds ``RUN_DIR/.trainer.lock``):
nothing was allocated or written, and a study reports the run as skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from agents.dqn.config import DQNConfig, load_dqn_config, load_run_config
from agents.dqn.learner import NonFiniteError
from agents.dqn.nonfinite import EnvNonFiniteError
from agents.dqn.run_dir import run_dir_for
from agents.dqn.runner import Trainer
from wn_rl.checkpoint import CheckpointError, complete_checkpoints
from wn_rl.cli import brief_warnings
from wn_rl.config import ConfigError, config_to_dict
from wn_rl.run_lock import train_holding_lock


def _check_holds_a_run(run_dir: Path) -> None:
    """Refuse ``--resume RUN_DIR`` where ``RUN_DIR`` holds no run (no ``config.yaml`` and no complete checkpoint):
    a mistyped directory would otherwise start a new run there from step 0. A run stopped before its first
    checkpoint has its ``config.yaml`` and trains again from step 0, as rerunning its command does."""
    if (run_dir / "config.yaml").is_file() or complete_checkpoints(run_dir / "checkpoints"):
        return
    what = "does not exist" if not run_dir.exists() else "holds no config.yaml and no complete checkpoint"
    raise ConfigError(
        f"--resume {run_dir}: no run here ({run_dir} {what}). Check the path (runs are under run.runs_dir, "
        "runs/dqn by default), or start a new run with --config CONFIG.yaml (run.name=... names its directory)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (e.g. configs/dqn/smoke.yaml)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="resume this run directory (uses its config.yaml)")
    parser.add_argument("--force", action="store_true", help="resume even if the config changed")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(argv)  # key=value overrides on both sides of a flag
    if not args.config and not args.resume:
        parser.error("give --config CONFIG.yaml or --resume RUN_DIR")
    try:
        if args.resume:
            run_dir = Path(args.resume)
            _check_holds_a_run(run_dir)
            if args.config:
                config = load_dqn_config(args.config, args.overrides)
            else:
                config = load_run_config(run_dir, args.overrides)
        else:
            config = load_dqn_config(args.config, args.overrides)
            run_dir = run_dir_for(config, Path(args.config).stem)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip(), flush=True)  # the log's first lines
    # the lock before the replay memory and envs: a run in use is refused before they are built
    return train_holding_lock(
        run_dir, "start a separate run (run.name=...)", lambda: _train(config, run_dir, args.force)
    )


def _train(config: DQNConfig, run_dir: Path, force: bool) -> int:
    """Build the trainer and run it (the run's lock held); the exit code."""
    try:
        trainer = Trainer(config, run_dir, force=force)
    except (ConfigError, ValueError, MemoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir.parent})", flush=True)
    try:
        summary = trainer.run()
    except (CheckpointError, NonFiniteError, EnvNonFiniteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. runs_dir not writable: the message names the path
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        previous = trainer.last_checkpoint
        kept = f"the previous one is intact: {previous}" if previous else "none was written yet, so it starts over"
        # no stop signal recorded: this Ctrl-C came before the loop's handlers were installed, so it was the first
        when = "again" if trainer.stop_signal is not None else "during start-up"
        print(f"interrupted {when}: quit without a new checkpoint; {kept}", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=1, allow_nan=False))  # strict JSON, for tools that read it
    if summary["interrupted"] is not None:
        print(f"stopped by a signal; resume with: python scripts/train_dqn.py --resume {run_dir}", file=sys.stderr)
        return 128 + summary["interrupted"]
    return 0


if __name__ == "__main__":
    brief_warnings()
    sys.exit(main())
