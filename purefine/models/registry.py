"""The model families and their presets, looked up by HF ``model_type`` or preset name.

A family is a module that defines ``Config`` (with ``model_type``, ``from_hf``, ``to_hf``),
``PRESETS``, ``param_shapes``, ``init``, ``hidden_states``, ``output_weight``, ``forward`` and
``new_cache``; it may define its own ``loss_fn``. Adding a family is one new file and one line here.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import reprlib
import types
import typing
from types import ModuleType
from typing import Any

from purefine.errors import ConfigError, PurefineError

FAMILIES: dict[str, str] = {
    "llama": "purefine.models.llama",
    "mistral": "purefine.models.mistral",
    "qwen2": "purefine.models.qwen2",
    "gpt2": "purefine.models.gpt2",
    "bert": "purefine.models.bert",
}


def family(cfg_or_type: Any) -> ModuleType:
    """The module of a config's family (or of an HF ``model_type`` string)."""
    model_type = cfg_or_type if isinstance(cfg_or_type, str) else getattr(cfg_or_type, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type: expected one of {sorted(FAMILIES)}, found {model_type!r}")
    return importlib.import_module(FAMILIES[model_type])


def presets() -> dict[str, Any]:
    """Every named config of every family."""
    out: dict[str, Any] = {}
    for model_type in FAMILIES:
        out.update(family(model_type).PRESETS)
    return out


def preset(name: str) -> Any:
    """The config named ``name`` (``llama2-7b``, ``llama-tiny``, ...)."""
    table = presets()
    if name not in table:
        close = difflib.get_close_matches(name, table, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"model preset: unknown name {name!r}{hint}; known: {', '.join(sorted(table))}")
    return table[name]


def _fits(tp: Any, value: Any) -> bool:
    """``value`` is of the annotated type (ints within int64, floats finite, containers checked)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin in (list, tuple) or tp in (list, tuple):
        inner = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_fits(inner, v) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return not isinstance(tp, type) or isinstance(value, tp)


def check_field_types(cfg: Any, source: str) -> Any:
    """``cfg`` if every field holds a value of its annotated type, else a ConfigError naming the key."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _fits(hints[f.name], value):
            raise ConfigError(f"{source}: {f.name}: expected {hints[f.name]}, found {reprlib.repr(value)}")
    return cfg


def config_from_hf(d: dict, source: str = "config.json") -> Any:
    """The config of an HF ``config.json`` dict, by its ``model_type``. Values of the wrong type
    (strings for sizes, NaN, ints past int64, malformed sub-objects) are ConfigErrors naming ``source``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, found {type(d).__name__}")
    model_type = d.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ConfigError(f"{source}: model_type: expected one of {sorted(FAMILIES)}, found {reprlib.repr(model_type)}")
    try:
        cfg = family(model_type).Config.from_hf(d, source)
    except PurefineError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:200]
        raise ConfigError(f"{source}: not a valid {model_type} config ({type(e).__name__}: {what})") from None
    return check_field_types(cfg, source)
