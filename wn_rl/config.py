"""Strict YAML configs: YAML -> frozen, typed dataclass, for every script in wn_rl.

Unknown keys and wrong types fail with the file, the key and the value (with a did-you-mean); a value
that is typed right but impossible is rejected by the dataclass's own ``__post_init__`` through
:func:`check`. Command-line ``key=value`` (or ``section.key=value``) overrides are parsed as YAML
scalars, so ``lr=3e-4``, ``double_dqn=true`` and ``env_ids=[a, b]`` work as expected.

YAML 1.1 (PyYAML) reads some values as another value than they seem to say; these are refused or read
as meant: ``1e-3`` is a number (1.1: a string), ``1e5`` for an integer field is 100000 (an exact
integer, else an error), ``010`` (1.1: octal 8), ``1:30`` and ``1:30.5`` (1.1: base 60, 90 and 90.5) are
errors saying what to write, and ``yes``/``no``/``on``/``off`` are booleans for a boolean field and an error
saying to quote them where a string is expected. A key given twice in one mapping is an error naming both
lines (PyYAML would keep the last silently), and :func:`dump_yaml` writes configs that read back as written.

Example::

    @dataclass(frozen=True)
    class Train:
        lr: float = 3e-4
        "Adamax learning rate."
        total_steps: int = 1_000_000
        "agent steps (transitions summed over envs)"

        def __post_init__(self) -> None:
            check(self.lr > 0, "lr", self.lr, "a positive learning rate")

    config = load_config(Train, "configs/x.yaml", ["lr=1e-3"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from wn_rl.yaml_io import LEADING_ZERO, RefusedValue, YamlLoader, dump_yaml, load_yaml

__all__ = [
    "ConfigError",
    "check",
    "config_diff",
    "config_to_dict",
    "dump_yaml",
    "load_config",
    "flatten_config",
    "YamlLoader",
    "load_yaml",
    "parse_overrides",
    "read_run_config",
    "read_yaml",
    "resolve_device",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, override or value is wrong; the message says where, what and what was expected."""


def check(condition: bool, key: str, value: Any, expected: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` and ``value`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def _hint(value: Any) -> str:
    """How to write ``value`` as meant, when YAML 1.1 may have read it as something else ('' if not)."""
    if isinstance(value, bool):
        return " (YAML 1.1 reads unquoted yes/no/on/off as booleans: quote it, e.g. 'on', for a string)"
    if isinstance(value, str) and LEADING_ZERO.fullmatch(value):
        return f" (write it without the leading zero: {int(value.replace('_', ''), 10)})"
    return ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (lists to tuples, ints to floats)."""
    if tp is Any:
        return value
    handler = _handler(tp)
    if handler is not None:
        return handler(tp, value, where)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _handler(tp: Any) -> Callable[[Any, Any, str], Any] | None:
    """The function that checks and converts a value of type form ``tp`` (``None``: an isinstance check)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union
    if origin is typing.Literal:
        return _coerce_literal
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        return _coerce_sequence
    if origin in (dict, Mapping) or tp is dict:
        return _coerce_mapping
    if dataclasses.is_dataclass(tp):
        return _coerce_dataclass
    return _SCALARS.get(tp)


def _coerce_union(tp: Any, value: Any, where: str) -> Any:
    """The first member of the union that ``value`` converts to (``None`` where the union admits it)."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for option in (a for a in args if a is not type(None)):
        try:
            return _coerce(option, value, where)
        except ConfigError:
            pass
    raise ConfigError(f"{where}: {value!r} matches none of {[_type_name(a) for a in args]}{_hint(value)}")


def _coerce_literal(tp: Any, value: Any, where: str) -> Any:
    if value not in typing.get_args(tp):
        raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}{_hint(value)}")
    return value


def _coerce_sequence(tp: Any, value: Any, where: str) -> tuple:
    """A list or tuple as a tuple, each item checked (``tuple[int, str]``: a type per position)."""
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if typing.get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    item = args[0] if args else Any
    return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))


def _coerce_mapping(tp: Any, value: Any, where: str) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def _coerce_dataclass(tp: Any, value: Any, where: str) -> Any:
    if isinstance(value, tp):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
    return _build(tp, value, where)


def _coerce_bool(tp: Any, value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _coerce_int(tp: Any, value: Any, where: str) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}{_hint(value)}")
    return value


def _coerce_float(tp: Any, value: Any, where: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}{_hint(value)}")
    return float(value)


def _coerce_str(tp: Any, value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}{_hint(value)}")
    return value


_SCALARS: dict[type, Callable[[Any, Any, str], Any]] = {
    bool: _coerce_bool,
    int: _coerce_int,
    float: _coerce_float,
    str: _coerce_str,
}


def _build(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        section = f"{where}: " if where else ""
        raise ConfigError(f"{section}unknown key {key!r}{hint} Valid keys: {sorted(fields)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a=1", "b.c=[1, 2]"]`` -> ``{"a": 1, "b": {"c": [1, 2]}}`` (values parsed as YAML).

    A later override wins where both set the same key; a mapping value is merged into what earlier
    overrides set under its key, so ``agent.lr=5e-4 agent={beta1: 0.6}`` keeps the lr in either order."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} is not of the form key=value: a key of the config file, a nested one written "
                "with dots (e.g. agent.lr=3e-4 or env.num_envs=8 for train_dqn.py)"
            )
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except RefusedValue as exc:
            raise ConfigError(f"override {item!r}: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        if isinstance(node.get(leaf), dict) and isinstance(value, dict):
            value = _merge(node[leaf], value)
        node[leaf] = value
    return result


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path`` with errors that name the file. An empty file (or one of comments
    only) is an error: read as no keys, it would start a run with every default (the full paper budget)."""
    path = Path(path)
    empty = (
        f"config file {str(path)!r} is empty (or holds only comments): expected a mapping of keys to values, as "
        "in configs/dqn/smoke.yaml (read as no keys, it would run every default)"
    )
    return _yaml_mapping(path, empty)


def read_run_config(run_dir: str | Path, trainer: str) -> dict[str, Any]:
    """The mapping in ``run_dir/config.yaml``, the full config that ``trainer`` (e.g. ``scripts/train_dqn.py``)
    writes when a run starts. A missing, empty or damaged file is a :class:`ConfigError` naming it: such a
    directory is not a complete run, and an empty file read as no keys would stand for every default."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no config.yaml: not a run directory of {trainer}")
    empty = (
        f"{path} is empty: {run_dir} is not a complete run directory of {trainer} (it writes the run's full "
        "config there when the run starts); restore the file, or start the run again in a new directory"
    )
    return _yaml_mapping(path, empty)


def _yaml_mapping(path: Path, empty: str) -> dict[str, Any]:
    """The YAML mapping in the file ``path``; every error a :class:`ConfigError` naming it (``empty``: the
    message for a file without any value)."""
    try:
        data = load_yaml(_read_text(path))
    except RefusedValue as exc:
        raise ConfigError(f"{path}, line {exc.problem_mark.line + 1}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(empty)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got {type(data).__name__}")
    return data


def _read_text(path: Path) -> str:
    """The UTF-8 text of the config file ``path``; a missing, unreadable or non-text file is a ConfigError."""
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; expected a YAML file, e.g. configs/...")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        missing = f"config file {str(path)!r} does not exist"
        raise ConfigError(f"{missing} (expected a YAML file, e.g. configs/...)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "expected a YAML file saved as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"config file {str(path)!r} cannot be read: {exc.strerror or exc}; expected a readable YAML file"
        ) from None


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    data: Mapping[str, Any] | None = None,
) -> T:
    """Build the frozen dataclass ``cls`` from a YAML file, a mapping and ``key=value`` overrides
    (applied in that order). Every error is a :class:`ConfigError` naming the source and key."""
    merged: dict[str, Any] = {}
    source = "config"
    if path is not None:
        merged = read_yaml(path)
        source = str(path)
    if data is not None:
        merged = _merge(merged, data)
    merged = _merge(merged, parse_overrides(overrides))
    try:
        return _build(cls, merged, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config as plain data (tuples as lists), for YAML/JSON files, checkpoints and TensorBoard."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def flatten_config(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"agent": {"lr": 1e-4}}`` -> ``{"agent.lr": 1e-4}``: dotted keys, e.g. for a hyperparameter
    table; an empty mapping stays a value, so it still shows."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{dotted_key: (old, new)}`` for every key whose value differs between two config dicts."""
    diff: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diff.update(config_diff(a, b, f"{name}."))
        elif a != b:
            diff[name] = (a, b)
    return diff


def resolve_device(name: str, key: str = "device") -> torch.device:
    """A config's device value: ``"auto"`` is CUDA when available, else the CPU; an explicit ``cpu``,
    ``cuda``, ``cuda:N`` or ``mps`` is checked to exist here, before any env or model is built, with an
    error naming the config ``key`` (a missing ``cuda:N`` would otherwise fail deep in the run)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None  # torch's own message lists a dozen backends wn_rl never runs on
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{key}={name!r} is not a device: expected auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}={name!r} but MPS (Apple GPU) is not available here; use {key}=auto or cpu")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r} but no CUDA device is available here; use {key}=auto or cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        valid = "cuda:0" if count == 1 else f"cuda:0..cuda:{count - 1}"
        raise ConfigError(
            f"{key}={name!r} but this machine has {count} CUDA device(s), so the valid ones are {valid}; "
            f"use {key}=cuda:0 or auto (CUDA_VISIBLE_DEVICES renumbers the GPUs it shows from cuda:0)"
        )
    return device
