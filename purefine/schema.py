"""One type checker for every config: flags and YAML presets (``configio``), HF ``config.json``
(``models``), adapter and tokenizer configs. A value is checked against its dataclass annotation;
a mismatch is a ConfigError naming the source, the dotted key, what was expected and what was found.

- ``convert(tp, value, key, source)``: ``value`` checked (and lightly converted: an int where a
  float is expected, a list where a tuple is) against the annotation ``tp``. Ints must fit in int64
  and floats must be finite: NaN, inf or 10**100 would only break a run much later.
- ``check_fields(obj, source)``: every field of a dataclass instance holds its annotated type.
- ``from_dict(cls, d, source)`` / ``merge(obj, d, source)``: build or override a (nested) frozen
  dataclass from a plain dict; unknown keys are errors with the expected ones listed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from typing import Any, Literal

from purefine.errors import ConfigError

INT64_MAX = 2**63 - 1
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def short_repr(value: Any) -> str:
    """``repr(value)`` bounded in size and depth (YAML aliases can make a huge shared structure)."""
    return _REPR.repr(value)


def type_name(tp: Any) -> str:
    """An annotation as a user reads it: ``int | None``, ``'cosine' | 'linear'``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _number(tp: type, value: Any, lenient: bool) -> Any:
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value if abs(value) <= INT64_MAX else None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if abs(value) <= INT64_MAX or isinstance(value, float) else None
    if tp is float and lenient and isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def convert(tp: Any, value: Any, key: str, source: str, *, lenient: bool = False) -> Any:
    """``value`` checked against the annotation ``tp`` (see the module doc); ``lenient`` also reads
    floats written as strings (YAML)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{source}: {key}: expected {type_name(tp)}, found {short_repr(value)}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(arg, value, key, source, lenient=lenient)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise bad
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, source, prefix=f"{key}.", lenient=lenient)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        fixed = origin is tuple and len(args) > 1 and args[1] is not Ellipsis
        if fixed and len(value) != len(args):
            raise bad
        inner = list(args) if fixed else [args[0] if args else Any] * len(value)
        items = [convert(a, v, f"{key}[{i}]", source, lenient=lenient) for i, (a, v) in enumerate(zip(inner, value))]
        return items if origin is list or tp is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        if len(args) == 2:
            return {convert(args[0], k, f"{key} key", source): convert(args[1], v, f"{key}[{k!r}]", source, lenient=lenient)
                    for k, v in value.items()}
        return dict(value)
    if tp in (int, float):
        out = _number(tp, value, lenient)
        if out is None or (tp is float and not math.isfinite(out)):
            raise bad
        return out
    if tp in (bool, str):
        if type(value) is tp:
            return value
        raise bad
    if isinstance(tp, type) and not isinstance(value, tp):
        raise bad
    return value


def check_fields(obj: Any, source: str) -> Any:
    """``obj`` (a dataclass instance) if every field holds a value of its annotated type, else a
    ConfigError naming ``source`` and the field."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        convert(hints[f.name], getattr(obj, f.name), f.name, source)
    return obj


def unknown_keys(d: Any, fields: set[str], source: str, prefix: str) -> None:
    """A ConfigError for a non-mapping, a non-string key, or a key that is not one of ``fields``
    (with the closest field names)."""
    if not isinstance(d, dict):
        where = f"{prefix[:-1]}: " if prefix else ""
        raise ConfigError(f"{source}: {where}expected a mapping of config keys, found {type(d).__name__} {short_repr(d)}")
    odd = [k for k in d if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"{source}: key {short_repr(odd[0])} under {prefix[:-1] or 'the top level'!r}: "
                          "expected a string (a config field name)")
    unknown = sorted(set(d) - fields)
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: unknown key {(prefix + unknown[0])!r}{hint}; expected one of: "
                          f"{', '.join(sorted(fields))}")


def dict_problems(cls: type, d: Any, source: str, *, prefix: str = "", lenient: bool = True) -> list[str]:
    """Every unknown key (with the closest field name) and every wrongly typed value of ``d`` against
    the dataclass ``cls``, nested dataclasses included; [] when ``from_dict`` would accept it."""
    if not isinstance(d, dict):
        return [f"{source}: {prefix[:-1] + ': ' if prefix else ''}expected a mapping of config keys, found "
                f"{type(d).__name__} {short_repr(d)}"]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    out = []
    for key, value in d.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            out.append(f"{source}: unknown key {prefix + str(key)!r}{hint}")
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            out += dict_problems(hints[key], value, source, prefix=f"{prefix}{key}.", lenient=lenient)
        else:
            try:
                convert(hints[key], value, f"{prefix}{key}", source, lenient=lenient)
            except ConfigError as e:
                out.append(str(e))
    return out


def from_dict(cls: type, d: dict, source: str = "config", *, prefix: str = "", lenient: bool = False) -> Any:
    """Build ``cls`` from ``d``; unknown keys and wrong types are ConfigErrors naming ``source``."""
    hints = typing.get_type_hints(cls)
    unknown_keys(d, {f.name for f in dataclasses.fields(cls) if f.init}, source, prefix)
    kwargs = {k: convert(hints[k], v, f"{prefix}{k}", source, lenient=lenient) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: {prefix or cls.__name__}: {e}") from None


def merge(obj: Any, d: dict, source: str = "config", *, prefix: str = "", lenient: bool = False) -> Any:
    """``obj`` (a dataclass) with the keys of ``d`` overridden, nested dataclasses merged key by key."""
    hints = typing.get_type_hints(type(obj))
    unknown_keys(d, {f.name for f in dataclasses.fields(obj)}, source, prefix)
    changes = {}
    for k, v in d.items():
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current) and isinstance(v, dict):
            changes[k] = merge(current, v, source, prefix=f"{prefix}{k}.", lenient=lenient)
        else:
            changes[k] = convert(hints[k], v, f"{prefix}{k}", source, lenient=lenient)
    return dataclasses.replace(obj, **changes)
