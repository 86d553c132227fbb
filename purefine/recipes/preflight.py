"""What a run would check before loading any weight, all at once: ``purefine validate``.

``preflight(cfg)`` lists the problems of a config that are about the world rather than its values:
the checkpoint directory (or hub id shape), the weights a preset needs, the tokenizer, the data
sources and their template, the teacher, the output directory. ``check_file(path)`` adds the YAML's
own problems (unknown keys with the closest field, wrong types) and the value rules of
``config.problems``. Nothing is downloaded or loaded: checks are on paths and names only.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

from purefine import configio, data, hub, schema
from purefine.config import TrainConfig, problems, resolve_preset
from purefine.errors import PurefineError
from purefine.recipes import setup

# The bundled data sets: the demo instructions, and the classify / preference tasks' own sets.
BUILTINS = (data.BUILTIN_DEMO, "builtin:classify", "builtin:preference")


def _model_problems(cfg: TrainConfig) -> list[str]:
    if cfg.checkpoint_dir is not None:
        path = Path(cfg.checkpoint_dir)
        if path.is_dir():
            if not (path / "config.json").is_file():
                return [f"--checkpoint-dir {path}: no config.json (expected an HF model directory)"]
            if cfg.tokenizer is None and not setup.has_tokenizer(path):
                return [f"--checkpoint-dir {path}: no tokenizer.model or tokenizer.json; pass --tokenizer PATH"]
            return []
        if not hub.is_repo_id(cfg.checkpoint_dir):
            return [f"--checkpoint-dir {cfg.checkpoint_dir}: no such directory, and not a hub id of the form org/name"]
        return []
    if cfg.init != "random" and setup.bundled_checkpoint(cfg.model) is None:
        return [f"--model {cfg.model}: the preset ships no weights; give --checkpoint-dir, or --init random"]
    return []


def _source_problems(source: str, flag: str) -> list[str]:
    if source.startswith("builtin:"):
        return [] if source in BUILTINS else [f"{flag} {source}: unknown builtin data (known: {', '.join(BUILTINS)})"]
    if data.sources.looks_like_path(source) and not Path(source).exists():
        return [f"{flag} {source}: no such file or directory"]
    if not data.sources.looks_like_path(source) and not hub.is_repo_id(source) and "/" in source:
        return [f"{flag} {source}: not a local path, and not a hub dataset id"]
    return []


def _data_problems(cfg: TrainConfig) -> list[str]:
    out = _source_problems(cfg.data.source, "--data.source")
    if cfg.data.eval_source is not None:
        out += _source_problems(cfg.data.eval_source, "--data.eval-source")
    if cfg.task in ("causal_lm", "dpo", "distill") and cfg.data.template != "tokenizer":
        try:
            data.get_template(cfg.data.template)
        except PurefineError as e:
            out.append(f"--data.template: {e}")
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).exists():
        out.append(f"--tokenizer {cfg.tokenizer}: no such file or directory")
    teacher = getattr(cfg, "teacher", None)
    if cfg.task == "distill" and teacher is not None and not Path(teacher).is_dir() and not hub.is_repo_id(teacher):
        out.append(f"--teacher {teacher}: no such directory, and not a hub id of the form org/name")
    return out


def _output_problems(cfg: TrainConfig) -> list[str]:
    if cfg.output_dir is None:
        return []
    out = Path(cfg.output_dir)
    found = [n for n in setup.RUN_FILES if (out / n).exists()]
    if found and cfg.resume is None and not cfg.overwrite:
        return [f"--output-dir {out}: holds an earlier run ({', '.join(found[:4])}); pass --overwrite or --resume latest"]
    parent = next((p for p in (out, *out.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return [f"--output-dir {out}: cannot be created or written ({parent} is not a writable directory)"]
    return []


def preflight(cfg: TrainConfig) -> list[str]:
    """The problems a run of ``cfg`` would meet before its first step (see the module doc)."""
    return [*_model_problems(cfg), *_data_problems(cfg), *_output_problems(cfg)]


def _valid_part(cls: type, d: dict, source: str) -> dict:
    """The keys of ``d`` that are fields of ``cls`` with values of the right type (nested alike)."""
    out = {}
    for key, value in d.items():
        if not schema.dict_problems(cls, {key: value}, source):
            out[key] = value
        elif isinstance(value, dict) and key in {f.name for f in dataclasses.fields(cls)}:
            inner = typing.get_type_hints(cls)[key]
            if dataclasses.is_dataclass(inner):
                out[key] = _valid_part(inner, value, source)
    return out


def check_file(path_or_name: str) -> tuple[TrainConfig, list[str]]:
    """(the config its valid keys make, every problem found) of a YAML preset or file: unknown keys
    and wrong types first, then the value rules and the preflight checks of what remains."""
    path = resolve_preset(path_or_name)
    raw: Any = configio.load_yaml(path)
    found = schema.dict_problems(TrainConfig, raw, str(path))
    cfg = configio.merge(TrainConfig(), _valid_part(TrainConfig, raw, str(path)) if found else raw, str(path))
    return cfg, [*found, *problems(cfg), *preflight(cfg)]
