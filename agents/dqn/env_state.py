"""The state of a Python environment as plain data, so that a resumed run continues the same games.

A checkpoint holds only tensors and plain data (``torch.load(weights_only=True)``, see
:mod:`wn_rl.checkpoint`), so an env cannot be pickled into it. Instead :func:`capture` walks the
attributes of the env object and of every object it reaches, and encodes each value by its type:

- ``None``, ``bool``, ``int``, ``float``, ``str`` as they are; numpy scalars, arrays, lists, tuples and
  dicts as tagged dicts (dtype and shape kept, so the restored values are bit-identical);
- ``numpy.random.RandomState`` and ``numpy.random.Generator`` by their bit-generator state;
- gymnasium spaces by the state of their sampling generator only (the space itself is configuration);
- objects of known packages (gymnasium, MinAtar) by their attributes, recursively; construction-time
  configuration (env specs, functions, classes, modules) is skipped: the restoring env is built from
  the same config;
- an object reached twice (MinAtar's game and its wrapper share one ``RandomState``) as a reference to
  the first path, so the sharing survives the round trip.

Anything else (a C++ emulator handle, a Box2D world, a class from an unknown package) raises
:class:`EnvStateError` naming the attribute path and its type: such an env cannot be resumed exactly,
and the caller falls back to fresh games. :func:`restore` writes a captured state into an env built
from the same config (same classes, same wrappers), in place.
"""

from __future__ import annotations

import types
from typing import Any

import gymnasium as gym
import numpy as np
import torch

__all__ = ["KNOWN_PACKAGES", "EnvStateError", "capture", "restore"]

KNOWN_PACKAGES = ("gymnasium", "minatar")
_SCALARS = (type(None), bool, int, float, str)
_CONFIGURATION = (
    gym.envs.registration.EnvSpec,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    types.ModuleType,
    type,
)
_SKIPPED_NAMES = {"_saved_kwargs"}  # gymnasium's record of the wrapper's constructor arguments (holds the env)


class EnvStateError(TypeError):
    """An environment holds a value that cannot be represented as plain data (or restored)."""


def _walkable(value: Any) -> bool:
    return type(value).__module__.split(".")[0] in KNOWN_PACKAGES and hasattr(value, "__dict__")


def _encode_array(value: np.ndarray, path: str) -> dict[str, Any]:
    if value.dtype.kind not in "biuf":
        raise EnvStateError(f"{path} is a numpy array of dtype {value.dtype}; only bool, int and float are supported")
    array = np.array(value, copy=True)
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:
        # torch < 2.6 cannot save uint16/32/64 tensors (pytorch#137184; e.g. a RandomState's MT19937 key),
        # so they carry their bits as the signed integer of the same width; "dtype" says what they are
        array = array.view(f"i{array.dtype.itemsize}")
    try:
        tensor = torch.from_numpy(array)
    except TypeError as exc:  # e.g. a non-native byte order
        raise EnvStateError(f"{path}: numpy array of dtype {value.dtype} has no tensor equivalent ({exc})") from exc
    return {"t": "ndarray", "dtype": value.dtype.str, "v": tensor}


def _decode_array(encoded: dict[str, Any], *_: Any) -> np.ndarray:
    # a view keeps the bits of a uint16/32/64 array carried as a signed int (states saved by earlier
    # versions on torch >= 2.6 hold the unsigned tensor itself, which views as itself)
    return encoded["v"].numpy().view(np.dtype(encoded["dtype"])).copy()


def _encode(value: Any, path: str, seen: dict[int, str]) -> Any:
    """Plain data for ``value`` (found at ``path``); ``seen`` maps ids of mutable objects to their first path."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, np.generic):
        if value.dtype.kind not in "biuf":
            raise EnvStateError(f"{path} is a numpy scalar of dtype {value.dtype}; only bool, int and float work")
        return {"t": "np_scalar", "dtype": value.dtype.str, "v": value.item()}
    if isinstance(value, tuple):
        return {"t": "tuple", "v": [_encode(v, f"{path}[{i}]", seen) for i, v in enumerate(value)]}
    if id(value) in seen:
        return {"t": "ref", "path": seen[id(value)]}
    seen[id(value)] = path
    return _encode_mutable(value, path, seen)


def _encode_mutable(value: Any, path: str, seen: dict[int, str]) -> dict[str, Any]:
    if isinstance(value, np.ndarray):
        return _encode_array(value, path)
    if isinstance(value, list):
        return {"t": "list", "v": [_encode(v, f"{path}[{i}]", seen) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if not all(isinstance(k, _SCALARS) for k in value):
            raise EnvStateError(f"{path} is a dict with keys of types {sorted({type(k).__name__ for k in value})}")
        return {"t": "dict", "k": list(value), "v": [_encode(v, f"{path}[{k!r}]", seen) for k, v in value.items()]}
    if isinstance(value, np.random.RandomState):
        return {"t": "random_state", "v": _encode(value.get_state(legacy=True), f"{path}.state", {})}
    if isinstance(value, np.random.Generator):
        state = value.bit_generator.state
        return {"t": "generator", "bit_generator": state["bit_generator"], "state": state}
    if isinstance(value, gym.spaces.Space):
        return {"t": "space", "np_random": _encode(value._np_random, f"{path}._np_random", seen)}
    if _walkable(value):
        return {"t": "object", "type": _type_name(value), "attrs": _encode_attributes(value, path, seen)}
    raise EnvStateError(
        f"{path} is a {_type_name(value)}, which cannot be saved as plain data (known: numbers, strings, numpy "
        f"arrays and generators, lists, tuples, dicts, gymnasium spaces, objects of {', '.join(KNOWN_PACKAGES)})"
    )


def _encode_attributes(obj: Any, path: str, seen: dict[int, str]) -> dict[str, Any]:
    return {
        name: _encode(value, f"{path}.{name}", seen)
        for name, value in vars(obj).items()
        if name not in _SKIPPED_NAMES and not isinstance(value, _CONFIGURATION)
    }


def _type_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def capture(env: Any, path: str = "env") -> dict[str, Any]:
    """The state of ``env`` (an object of a known package) as plain data; raises :class:`EnvStateError`."""
    if not _walkable(env):
        known = ", ".join(KNOWN_PACKAGES)
        raise EnvStateError(f"{path} is a {_type_name(env)}, not an env of a known package ({known})")
    return _encode(env, path, {})


def _generator(encoded: dict[str, Any], path: str) -> np.random.Generator:
    bit_generator = getattr(np.random, encoded["bit_generator"], None)
    if bit_generator is None:
        raise EnvStateError(f"{path}: unknown numpy bit generator {encoded['bit_generator']!r}")
    bits = bit_generator()
    bits.state = encoded["state"]
    return np.random.Generator(bits)


def _item(live: Any, key: Any) -> Any:
    """The live counterpart of a container element (objects inside lists are restored in place too)."""
    if isinstance(live, dict):
        return live.get(key)
    if isinstance(live, list | tuple) and isinstance(key, int) and key < len(live):
        return live[key]
    return None


def _decode(encoded: Any, live: Any, path: str, restored: dict[str, Any]) -> Any:
    """The value for ``path`` from its encoding; objects are restored in place into ``live``."""
    if not isinstance(encoded, dict):
        return encoded
    tag = encoded["t"]
    if tag == "np_scalar":
        return np.dtype(encoded["dtype"]).type(encoded["v"])
    if tag == "tuple":
        return tuple(_decode(v, _item(live, i), f"{path}[{i}]", restored) for i, v in enumerate(encoded["v"]))
    if tag == "ref":
        if encoded["path"] not in restored:
            raise EnvStateError(f"{path} refers to {encoded['path']}, which was not restored before it")
        return restored[encoded["path"]]
    if tag not in _DECODERS:
        raise EnvStateError(f"{path}: unknown state tag {tag!r} (written by a newer wn_rl?)")
    value = _DECODERS[tag](encoded, live, path, restored)
    restored[path] = value
    return value


def _decode_object(encoded: dict[str, Any], live: Any, path: str, restored: dict[str, Any]) -> Any:
    if live is None or _type_name(live) != encoded["type"]:
        raise EnvStateError(
            f"{path} was a {encoded['type']} when saved, now it is a {_type_name(live)}: the env was built "
            "differently (another env id, wrapper or library version)"
        )
    for name, value in encoded["attrs"].items():
        setattr(live, name, _decode(value, getattr(live, name, None), f"{path}.{name}", restored))
    return live


def _decode_space(encoded: dict[str, Any], live: Any, path: str, restored: dict[str, Any]) -> Any:
    if not isinstance(live, gym.spaces.Space):
        raise EnvStateError(f"{path} was a gymnasium space when saved, now it is a {_type_name(live)}")
    live._np_random = _decode(encoded["np_random"], None, f"{path}._np_random", restored)
    return live


def _decode_random_state(encoded: dict[str, Any], live: Any, path: str, restored: dict[str, Any]) -> Any:
    random_state = np.random.RandomState()
    random_state.set_state(_decode(encoded["v"], None, f"{path}.state", {}))
    return random_state


def _decode_list(encoded: dict[str, Any], live: Any, path: str, restored: dict[str, Any]) -> Any:
    return [_decode(v, _item(live, i), f"{path}[{i}]", restored) for i, v in enumerate(encoded["v"])]


def _decode_dict(encoded: dict[str, Any], live: Any, path: str, restored: dict[str, Any]) -> Any:
    items = zip(encoded["k"], encoded["v"], strict=True)
    return {k: _decode(v, _item(live, k), f"{path}[{k!r}]", restored) for k, v in items}


_DECODERS = {
    "ndarray": _decode_array,
    "list": _decode_list,
    "dict": _decode_dict,
    "random_state": _decode_random_state,
    "generator": lambda encoded, live, path, restored: _generator(encoded, path),
    "space": _decode_space,
    "object": _decode_object,
}


def restore(env: Any, state: dict[str, Any], path: str = "env") -> None:
    """Write ``state`` (from :func:`capture`) into ``env``, built from the same config, in place."""
    _decode(state, env, path, {})
