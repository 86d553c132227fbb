"""The model families and their presets, looked up by HF ``model_type`` or preset name.

A family is a module that defines ``Config`` (with ``model_type``, ``from_hf``, ``to_hf``),
``PRESETS``, ``param_shapes``, ``init``, ``hidden_states``, ``output_weight``, ``forward`` and
``new_cache``; it may define its own ``loss_fn``. Adding a family is one new file and one line here.
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType
from typing import Any

from purefine.errors import ConfigError

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


def config_from_hf(d: dict, source: str = "config.json") -> Any:
    """The config of an HF ``config.json`` dict, by its ``model_type``."""
    model_type = d.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"{source}: model_type: expected one of {sorted(FAMILIES)}, found {model_type!r}")
    return family(model_type).Config.from_hf(d, source)
