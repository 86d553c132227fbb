"""Frozen config dataclasses from YAML / dicts, with errors that name the file and key.

- ``from_dict(cls, d, source)``: build a (nested) frozen dataclass from a plain dict, checking
  every key and value type; unknown keys and wrong types are ConfigErrors naming ``source`` and
  the dotted key.
- ``to_dict(obj)``: the inverse, JSON/YAML-ready.
- ``load_yaml(path)``: a YAML mapping, or a ConfigError naming the file.
- ``merge(obj, d, source)``: ``obj`` with the keys of ``d`` overridden (nested).
"""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from purefine.errors import ConfigError

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def short_repr(value: Any) -> str:
    """``repr(value)`` bounded in size and depth (YAML aliases can make a huge shared structure)."""
    return _REPR.repr(value)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML file holding a mapping (empty file = {})."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, found {type(data).__name__}")
    return data


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain dicts, lists and scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """``value`` checked (and lightly converted) against the annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{source}: {key}: expected {_type_name(tp)}, found {short_repr(value)}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key, source)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, source, prefix=f"{key}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        if origin is tuple and len(args) > 1 and args[1] is not Ellipsis:
            if len(items) != len(args):
                raise bad
            items = [_convert(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value))]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        if len(args) == 2:
            return {_convert(args[0], k, f"{key} key", source): _convert(args[1], v, f"{key}[{k!r}]", source)
                    for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    return value


def _unknown_keys(d: Any, fields: set[str], source: str, prefix: str) -> list[str]:
    """The keys of ``d`` that are not ``fields``, sorted; a non-mapping or a non-string key is an error."""
    if not isinstance(d, dict):
        where = f"{prefix[:-1]}: " if prefix else ""
        raise ConfigError(f"{source}: {where}expected a mapping of config keys, found {type(d).__name__} {short_repr(d)}")
    odd = [k for k in d if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"{source}: key {short_repr(odd[0])} under {prefix[:-1] or 'the top level'!r}: "
                          "expected a string (a config field name)")
    return sorted(set(d) - fields)


def from_dict(cls: type, d: dict, source: str = "config", *, prefix: str = "") -> Any:
    """Build ``cls`` from ``d``; unknown keys and wrong types are ConfigErrors naming ``source``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = _unknown_keys(d, fields, source, prefix)
    if unknown:
        raise ConfigError(f"{source}: unknown key {(prefix + unknown[0])!r} (expected one of: {', '.join(sorted(fields))})")
    kwargs = {k: _convert(hints[k], v, f"{prefix}{k}", source) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: {prefix or cls.__name__}: {e}") from None


def merge(obj: Any, d: dict, source: str = "config", *, prefix: str = "") -> Any:
    """``obj`` (a dataclass) with the keys of ``d`` overridden, nested dataclasses merged key by key."""
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    unknown = _unknown_keys(d, fields, source, prefix)
    if unknown:
        raise ConfigError(f"{source}: unknown key {(prefix + unknown[0])!r} (expected one of: {', '.join(sorted(fields))})")
    changes = {}
    for k, v in d.items():
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):
            changes[k] = merge(current, v, source, prefix=f"{prefix}{k}.")
        else:
            changes[k] = _convert(hints[k], v, f"{prefix}{k}", source)
    return dataclasses.replace(obj, **changes)
