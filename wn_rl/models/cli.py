"""The command line shared by the paper-model scripts: ``--config FILE [--download] [--force] [key=value ...]``,
and their exit on a checkpoint or log that cannot be written (:func:`exit_on_write_error`)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import yaml

from wn_rl.checkpoint import CheckpointError
from wn_rl.config import config_to_dict, load_config

__all__ = ["exit_on_write_error", "parse_config", "parse_training_command"]

T = TypeVar("T")


def parse_config(
    cls: type[T],
    default_config: str,
    description: str,
    argv: Sequence[str] | None = None,
    *,
    download_key: str = "download",
) -> T:
    """Parse the command line into the frozen config ``cls`` (YAML file, then ``key=value`` overrides)
    and print it, so every run's log starts with its full configuration. ``--download`` sets
    ``download_key`` (a dotted key for nested configs) to true."""
    return _parse(cls, default_config, description, argv, download_key, force_flag=False)[0]


def parse_training_command(
    cls: type[T], default_config: str, description: str, argv: Sequence[str] | None = None
) -> tuple[T, bool]:
    """:func:`parse_config` plus ``--force`` (resume even if the config changed); returns ``(config, force)``."""
    return _parse(cls, default_config, description, argv, "download", force_flag=True)


def _parse(cls, default_config, description, argv, download_key: str, force_flag: bool) -> tuple:
    repository_copy = Path(__file__).resolve().parents[2] / default_config
    if not Path(default_config).is_file() and repository_copy.is_file():  # a script run from another folder
        default_config = str(repository_copy)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument(
        "--download", action="store_true", help="download and checksum-verify the dataset into data_dir if missing"
    )
    if force_flag:
        parser.add_argument(
            "--force", action="store_true", help="resume the unfinished run even if its saved config differs"
        )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 parameterization=normal")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *([f"{download_key}=true"] if args.download else [])]
    config = load_config(cls, args.config, overrides)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip(), flush=True)
    return config, bool(getattr(args, "force", False))


@contextlib.contextmanager
def exit_on_write_error() -> Iterator[None]:
    """A checkpoint or TensorBoard log that cannot be written or read (a full disk) ends the script with
    ``error: <message naming the path>`` and exit code 1 instead of a traceback; the previous checkpoint
    is intact and rerunning the same command resumes from it once there is space."""
    try:
        yield
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
