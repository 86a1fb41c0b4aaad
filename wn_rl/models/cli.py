"""The command line shared by the paper-model scripts: ``--config FILE [--download] [key=value ...]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import yaml

from wn_rl.config import config_to_dict, load_config

__all__ = ["parse_config"]

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
    repository_copy = Path(__file__).resolve().parents[2] / default_config
    if not Path(default_config).is_file() and repository_copy.is_file():  # a script run from another folder
        default_config = str(repository_copy)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument(
        "--download", action="store_true", help="download and checksum-verify the dataset into data_dir if missing"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 parameterization=normal")
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *([f"{download_key}=true"] if args.download else [])]
    config = load_config(cls, args.config, overrides)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip(), flush=True)
    return config
