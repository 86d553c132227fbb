"""Inspect a checkpoint, a training run or a preset: config, parameter count, dtypes and size,
without loading weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from purefine import checkpoint, fsutil, models
from purefine.errors import ConfigError
from purefine.logging import format_bytes


@dataclass(frozen=True)
class InspectConfig:
    """What to inspect: an HF checkpoint directory, a training run or a preset name (one of them)."""

    checkpoint_dir: str | None = None
    """An HF model directory (config.json + safetensors)."""
    run_dir: str | None = None
    """A training output directory: its config, outcome and saved outputs."""
    model: str | None = None
    """A preset name (see --list)."""
    list: bool = False
    """List the model presets and exit."""
    json: bool = False
    """Print the summary as one JSON object."""


def _human(n: float) -> str:
    """A parameter count as people write it: 6.7B, 134.1M, 1.0K."""
    for suffix in ("", "K", "M", "B", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.1f}{suffix}" if suffix else f"{n:.0f}"
        n /= 1000
    return str(n)


def run_summary(run_dir: str) -> dict:
    """What a training run was and what it left: its config, summary.json's outcome, its outputs."""
    from purefine.config import load_preset

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run-dir {run_dir}: no config.yaml; expected the --output-dir of a training run")
    cfg = load_preset(str(run / "config.yaml"))
    summary = fsutil.read_json_object(run / "summary.json", ConfigError, what="summary.json") \
        if (run / "summary.json").is_file() else {}
    outputs = [n for n in ("adapter", "model", "merged", "checkpoints", "loss.png") if (run / n).exists()]
    return {"run": str(run), "model": cfg.checkpoint_dir or cfg.model, "task": cfg.task, "peft": cfg.peft,
            "steps": summary.get("steps"), "eval_loss_start": summary.get("eval_loss_start"),
            "eval_loss_end": summary.get("eval_loss_end"), "tokens_per_s": summary.get("tokens_per_s"),
            "outputs": outputs, "finished": bool(summary)}


def summary(cfg: InspectConfig) -> dict:
    """The summary dict that ``main`` prints."""
    if cfg.list:
        return {"presets": {name: c.num_params for name, c in models.presets().items()}}
    if sum(x is not None for x in (cfg.checkpoint_dir, cfg.run_dir, cfg.model)) != 1:
        raise ConfigError("info: give exactly one of --checkpoint-dir, --run-dir or --model")
    if cfg.run_dir is not None:
        return run_summary(cfg.run_dir)
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
    elif "run" in info:
        for key, value in info.items():
            print(f"{key}: {value}")
    else:
        print(f"model_type: {info['model_type']}")
        for key, value in info["config"].items():
            print(f"  {key}: {value}")
        print(f"parameters: {info['num_params']:,} ({_human(info['num_params'])})")
        if "bytes" in info:
            print(f"dtypes: {info['dtypes']}")
            print(f"size: {format_bytes(info['bytes'])} in {len(info['files'])} file(s)")
    return info
