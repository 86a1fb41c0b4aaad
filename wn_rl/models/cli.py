"""The command line shared by the paper-model scripts: ``--config FILE [--download] [--force] [key=value ...]``,
and their exit on a known error (:func:`exit_on_error`): a bad config or a missing dataset (2), a checkpoint
or log that cannot be written (1), each as one ``error:`` line instead of a traceback."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import yaml

from wn_rl.analysis.curves import MissingExtraError
from wn_rl.checkpoint import CheckpointError
from wn_rl.config import ConfigError, config_to_dict, load_config
from wn_rl.data.download import DatasetError
from wn_rl.run_lock import RunInUseError

__all__ = ["exit_on_error", "parse_config", "parse_training_command"]

T = TypeVar("T")
_EXAMPLE = "epochs=5 parameterization=normal"


def parse_config(
    cls: type[T],
    default_config: str,
    description: str,
    argv: Sequence[str] | None = None,
    *,
    download_key: str = "download",
    example: str = _EXAMPLE,
) -> T:
    """Parse the command line into the frozen config ``cls`` (YAML file, then ``key=value`` overrides)
    and print it, so every run's log starts with its full configuration. ``--download`` sets
    ``download_key`` (a dotted key for nested configs) to true; ``example`` shows overrides in ``--help``.
    A bad config exits with code 2 and an ``error:`` line."""
    return _parse(cls, default_config, description, argv, download_key, example, force_flag=False)[0]


def parse_training_command(
    cls: type[T], default_config: str, description: str, argv: Sequence[str] | None = None
) -> tuple[T, bool]:
    """:func:`parse_config` plus ``--force`` (resume even if the config changed); returns ``(config, force)``."""
    return _parse(cls, default_config, description, argv, "download", _EXAMPLE, True)


def _parse(cls, default_config, description, argv, download_key: str, example: str, force_flag: bool) -> tuple:
    repository_copy = Path(__file__).resolve().parents[2] / default_config
    if not Path(default_config).is_file() and repository_copy.is_file():  # a script run from another folder
        default_config = str(repository_copy)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument(
        "--download", action="store_true", help="download and checksum-verify the dataset into data_dir if missing"
    )
    if force_flag:
        parser.add_argument(
            "--force", action="store_true", help="resume the unfinished run even if its saved config differs"
        )
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    args = parser.parse_intermixed_args(argv)  # key=value overrides on both sides of a flag
    overrides = [*args.overrides, *([f"{download_key}=true"] if args.download else [])]
    with exit_on_error():
        config = load_config(cls, args.config, overrides)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip(), flush=True)
    return config, bool(getattr(args, "force", False))


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """End the script with ``error: <message>`` instead of a traceback: exit code 2 for bad input (a config
    error, a dataset that is missing, corrupt or could not be downloaded, an optional package not installed;
    the message says where and how to fix it), 1 for a checkpoint or TensorBoard log that cannot be written
    or read (a full disk; the previous checkpoint is intact and rerunning the same command resumes from it
    once there is space), 75 when another process trains the run (:class:`~wn_rl.run_lock.RunInUseError`)."""
    try:
        yield
    except RunInUseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except (ConfigError, DatasetError, MissingExtraError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
