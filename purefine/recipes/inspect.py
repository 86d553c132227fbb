"""Inspect a checkpoint or a preset: config, parameter count, dtypes and size, without loading weights."""

from __future__ import annotations

import json
from dataclasses import dataclass

from purefine import checkpoint, models
from purefine.errors import ConfigError


@dataclass(frozen=True)
class InspectConfig:
    """What to inspect: an HF checkpoint directory or a preset name (one of the two)."""

    checkpoint_dir: str | None = None
    """An HF model directory (config.json + safetensors)."""
    model: str | None = None
    """A preset name (see --list)."""
    list: bool = False
    """List the model presets and exit."""
    json: bool = False
    """Print the summary as one JSON object."""


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return str(n)


def summary(cfg: InspectConfig) -> dict:
    """The summary dict that ``main`` prints."""
    if cfg.list:
        return {"presets": {name: c.num_params for name, c in models.presets().items()}}
    if (cfg.checkpoint_dir is None) == (cfg.model is None):
        raise ConfigError("inspect: give exactly one of --checkpoint-dir or --model")
    if cfg.checkpoint_dir is not None:
        return checkpoint.inspect(cfg.checkpoint_dir)
    c = models.preset(cfg.model)
    return {"preset": cfg.model, "model_type": c.model_type, "config": c.to_hf(), "num_params": c.num_params}


def main(cfg: InspectConfig) -> dict:
    """Print the summary (a table, or JSON with --json) and return it."""
    info = summary(cfg)
    if cfg.json:
        print(json.dumps(info, indent=2, default=str))
    elif "presets" in info:
        for name, n in sorted(info["presets"].items(), key=lambda kv: kv[1]):
            print(f"{name:<20} {_human(n)} parameters")
    else:
        print(f"model_type: {info['model_type']}")
        for key, value in info["config"].items():
            print(f"  {key}: {value}")
        print(f"parameters: {info['num_params']:,} ({_human(info['num_params'])})")
        if "bytes" in info:
            print(f"dtypes: {info['dtypes']}")
            print(f"size: {_human(info['bytes'], 'B')} in {len(info['files'])} file(s)")
    return info
