"""The model families and their presets, looked up by HF ``model_type`` or preset name.

Adding a family is one new file (its ``Family`` record, see ``family.py``) and one line in ``FAMILIES``.
"""

from __future__ import annotations

import difflib
import reprlib
from typing import Any

from purefine.errors import ConfigError, PurefineError
from purefine.models import bert, gemma2, gpt2, llama, mistral, phi3, qwen2, qwen3
from purefine.models.family import Family
from purefine.schema import check_fields

FAMILIES: dict[str, Family] = {
    t: fam for fam in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gemma2.FAMILY, phi3.FAMILY,
                       gpt2.FAMILY, bert.FAMILY)
    for t in fam.model_types
}


def family(cfg_or_type: Any) -> Family:
    """The ``Family`` of a config (or of an HF ``model_type`` string)."""
    model_type = cfg_or_type if isinstance(cfg_or_type, str) else getattr(cfg_or_type, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type: expected one of {sorted(FAMILIES)}, found {model_type!r}")
    return FAMILIES[model_type]


def presets() -> dict[str, Any]:
    """Every named config of every family."""
    out: dict[str, Any] = {}
    for fam in FAMILIES.values():
        out.update(fam.presets)
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
    """The config of an HF ``config.json`` dict, by its ``model_type``. Values of the wrong type
    (strings for sizes, NaN, ints past int64, malformed sub-objects) are ConfigErrors naming ``source``."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, found {type(d).__name__}")
    model_type = d.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ConfigError(f"{source}: model_type: expected one of {sorted(FAMILIES)}, found {reprlib.repr(model_type)}")
    try:
        cfg = FAMILIES[model_type].config.from_hf(d, source)
    except PurefineError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:200]
        raise ConfigError(f"{source}: not a valid {model_type} config ({type(e).__name__}: {what})") from None
    return check_fields(cfg, source)
