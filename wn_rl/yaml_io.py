"""Strict YAML for configs: :func:`load_yaml` reads YAML 1.1 (PyYAML) the way the config values are meant, and
:func:`dump_yaml` writes configs that read back as written. See :mod:`wn_rl.config` for what is refused or read
as meant (``1e-3`` a number, ``010`` and ``1:30`` errors, a key given twice an error naming both lines)."""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["LEADING_ZERO", "RefusedValue", "YamlLoader", "dump_yaml", "load_yaml"]


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-3`` and ``3E5`` are numbers, not strings.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-3``), so ``lr: 1e-3`` in a file or
    ``hyperparameters.learning_rate=1e-3`` on the command line would arrive as the string ``'1e-3'``
    wherever no typed field converts it (e.g. SB3 hyperparameters passed straight to the algorithm).
    A key given twice in one mapping is refused: PyYAML would keep the last and drop the first silently.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        _refuse_duplicate_keys(self, node)
        return super().construct_mapping(node, deep=deep)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class RefusedValue(yaml.constructor.ConstructorError):
    """YAML that PyYAML reads otherwise than it seems to say (a number in a YAML 1.1 form, a key given twice);
    ``problem`` says what to write instead."""


def _mark(mark: yaml.Mark, other: yaml.Mark) -> str:
    """``line N`` of ``mark`` (with the column where ``other`` is on the same line)."""
    return f"line {mark.line + 1}" + (f", column {mark.column + 1}" if mark.line == other.line else "")


def _refuse_duplicate_keys(loader: YamlLoader, node: yaml.MappingNode) -> None:
    """Refuse a mapping that gives a scalar key twice (``agent:`` ... ``agent:``): YAML keeps only the last,
    so every setting under the first would be lost without a word. Keys merged in with ``<<`` may be
    overridden, as YAML intends."""
    first: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        try:
            earlier = first.setdefault(key, key_node)
        except TypeError:  # unhashable: PyYAML's own error names it
            continue
        if earlier is not key_node:
            a, b = earlier.start_mark, key_node.start_mark
            problem = (
                f"key {key!r} is given twice in the same mapping, at {_mark(a, b)} and {_mark(b, a)}; YAML keeps only "
                f"the last, so the first would be dropped silently: merge the two into one {key!r} entry, or delete one"
            )
            raise RefusedValue(None, None, problem, key_node.start_mark)


LEADING_ZERO = re.compile(r"[-+]?0[0-9_]+")


def _construct_int(loader: YamlLoader, node: yaml.ScalarNode) -> int:
    """YAML 1.1 integers, except the forms that read as another number: ``010`` (octal, 8) and
    ``1:30`` (base 60, 90). Hexadecimal ``0x10`` and binary ``0b10`` say what they mean and stay."""
    value = loader.construct_yaml_int(node)
    text = node.value
    if LEADING_ZERO.fullmatch(text):
        decimal = int(text.replace("_", ""), 10)
        problem = (
            f"{text} is an integer with a leading zero, which YAML 1.1 reads as octal ({value}); write {decimal} "
            f"without the leading zero, or quote it ('{text}') for a string"
        )
    elif ":" in text:
        problem = _base_60(text, value)
    else:
        return value
    raise RefusedValue(None, None, problem, node.start_mark)


def _construct_float(loader: YamlLoader, node: yaml.ScalarNode) -> float:
    """YAML 1.1 floats and YAML 1.2's ``1e-3``, except base 60: ``1:30.5`` (90.5), refused as ``1:30`` is."""
    value = loader.construct_yaml_float(node)
    if ":" in node.value:
        raise RefusedValue(None, None, _base_60(node.value, value), node.start_mark)
    return value


def _base_60(text: str, value: float) -> str:
    return (
        f"{text} is read by YAML 1.1 as a base-60 number ({value}); write the number itself, or quote it "
        f"('{text}') for a string"
    )


YamlLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
YamlLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def load_yaml(text: str) -> Any:
    """Parse YAML text with :class:`YamlLoader` (safe; YAML 1.2 floats)."""
    return yaml.load(text, Loader=YamlLoader)


class _YamlDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting every string that :class:`YamlLoader` would read as another value.

    It resolves plain scalars with the loader's own resolvers, so a string such as ``'1e5'`` (a string to
    YAML 1.1, which ``yaml.safe_dump`` writes bare, but a float to :class:`YamlLoader`) is written quoted."""


_YamlDumper.yaml_implicit_resolvers = {first: list(rs) for first, rs in YamlLoader.yaml_implicit_resolvers.items()}


def dump_yaml(data: Any) -> str:
    """``data`` as YAML text (as ``yaml.safe_dump``) that :func:`load_yaml` reads back equal: run directories'
    ``config.yaml`` must load again on resume."""
    return yaml.dump(data, Dumper=_YamlDumper)
