"""Frozen config dataclasses from YAML / dicts, with errors that name the file and key.

- ``from_dict(cls, d, source)``: build a (nested) frozen dataclass from a plain dict, checking
  every key and value type with ``schema`` (the one type checker); unknown keys and wrong types are
  ConfigErrors naming ``source`` and the dotted key.
- ``to_dict(obj)``: the inverse, JSON/YAML-ready.
- ``load_yaml(path)``: a YAML mapping, or a ConfigError naming the file.
- ``merge(obj, d, source)``: ``obj`` with the keys of ``d`` overridden (nested).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from purefine import schema
from purefine.errors import ConfigError
from purefine.schema import short_repr  # noqa: F401  (re-exported for callers of configio)


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


def from_dict(cls: type, d: dict, source: str = "config", *, prefix: str = "") -> Any:
    """Build ``cls`` from ``d`` (YAML values: floats may be written as strings); see ``schema.from_dict``."""
    return schema.from_dict(cls, d, source, prefix=prefix, lenient=True)


def merge(obj: Any, d: dict, source: str = "config", *, prefix: str = "") -> Any:
    """``obj`` with the keys of ``d`` overridden, nested dataclasses merged key by key (``schema.merge``)."""
    return schema.merge(obj, d, source, prefix=prefix, lenient=True)
