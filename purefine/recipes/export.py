"""The export recipe (scripts/export.py): a trained model as a checkpoint other tools load.

    python scripts/export.py --run-dir outputs/demo --output-dir exports/demo                 # merged, bf16
    python scripts/export.py --checkpoint-dir ckpt --adapter-dir out/adapter --quantize \\
        --output-dir exports/merged --dtype fp32                                          # from QLoRA
    python scripts/export.py --run-dir outputs/demo --format peft --output-dir exports/adapter

``--format hf``: LoRA / DoRA merged into the base (an NF4 base dequantized first, so the export
computes what the QLoRA model computed), written as an HF directory ``transformers`` loads
(safetensors, config.json, the tokenizer files copied). Each weight is merged in fp32 and cast
to ``--dtype`` one at a time as it is written, so no second full-precision copy of the model is
ever held. ``--format peft``: the adapter alone, as PEFT writes it. Both are written to a
temporary directory renamed into place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from purefine import checkpoint, lora
from purefine.errors import ConfigError
from purefine.recipes import setup
from purefine.recipes.loading import LoadedModel, ModelSource, check_source, load_model, pick_device


@dataclass(frozen=True)
class ExportConfig(ModelSource):
    """Merge an adapter into its base and write an HF checkpoint, or write the adapter alone in PEFT format."""

    output_dir: str | None = None
    """Where to write the export (required)."""
    format: Literal["hf", "peft"] = "hf"
    """hf = merged full model (transformers); peft = the adapter alone (peft.PeftModel)."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Dtype of the merged weights (--format hf); auto = the dtype the model's weights were stored in (a full fine-tune's fp32, a bf16 base's bf16)."""
    base_model: str | None = None
    """base_model_name_or_path written in the adapter's config (default: the base checkpoint or preset)."""
    overwrite: bool = False
    """Replace --output-dir if it exists and is not empty."""
    max_shard_size_gb: float = 5.0
    """Largest safetensors shard (--format hf); bigger models are sharded with an index."""
    device: str = "cpu"
    """Where to load and merge (cpu, cuda, cuda:N or auto)."""


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
NAMES = {"bfloat16": "bf16", "float32": "fp32", "float16": "bf16"}


def stored_dtype(path: Path) -> str:
    """bf16 or fp32: the floating dtype most of a checkpoint's parameters are stored in (from headers)."""
    dtypes = checkpoint.inspect(path)["dtypes"]
    floating = {k: n for k, n in dtypes.items() if k in NAMES}
    return NAMES[max(floating, key=floating.get)] if floating else "fp32"


def auto_dtype(cfg: ExportConfig) -> str:
    """The dtype ``--dtype auto`` writes: the stored dtype of what is exported (a run's model/, else
    its base checkpoint; --checkpoint-dir), or a random-init run's frozen weights' dtype."""
    if cfg.run_dir is None:
        return stored_dtype(setup.model_dir(cfg.checkpoint_dir))
    from purefine.config import load_preset

    run = Path(cfg.run_dir)
    if (run / "model").is_dir():
        return stored_dtype(run / "model")
    train_cfg = load_preset(str(run / "config.yaml"))
    source = setup.checkpoint_source(train_cfg)
    if source is not None:
        return stored_dtype(source)
    return "bf16" if setup.compute_dtype(train_cfg) == torch.bfloat16 else "fp32"


def check(cfg: ExportConfig) -> Path:
    """The model source, and --output-dir given and empty (or --overwrite); returns --output-dir."""
    check_source(cfg)
    if cfg.output_dir is None:
        raise ConfigError("--output-dir: required (where to write the export)")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"--output-dir {out}: exists and is not empty; pass --overwrite to replace it")
    if cfg.max_shard_size_gb <= 0:
        raise ConfigError(f"--max-shard-size-gb: expected a positive number, found {cfg.max_shard_size_gb}")
    for flag, value in (("--run-dir", cfg.run_dir), ("--checkpoint-dir", cfg.checkpoint_dir),
                        ("--adapter-dir", cfg.adapter_dir)):
        if value is not None and Path(value).resolve() == out.resolve():
            raise ConfigError(f"--output-dir {out}: is the same directory as {flag}; write the export elsewhere")
    return out


def tokenizer_files(loaded: LoadedModel) -> dict[str, Path]:
    """{file name: source} of the model's tokenizer files, to copy beside the export."""
    return setup.tokenizer_files(loaded.tokenizer_path) if loaded.tokenizer_path is not None else {}


def export_hf(out: Path, loaded: LoadedModel, dtype: torch.dtype, max_shard_bytes: int) -> Path:
    """Write the merged model: every LoRA / DoRA / NF4 leaf densified in fp32 and cast to ``dtype``
    as its shard is written (``save_hf`` materializes leaf kinds one tensor at a time)."""
    return checkpoint.save_hf(out, loaded.cfg, loaded.params, dtype=dtype, max_shard_bytes=max_shard_bytes,
                              extra_files=tokenizer_files(loaded))


def export_peft(out: Path, loaded: LoadedModel, base_model: str | None) -> Path:
    """Write the LoRA / DoRA adapter of the model in PEFT's format."""
    if not lora.adapters(loaded.params):
        raise ConfigError("--format peft: the model has no adapter (a full fine-tune or a base without "
                          "--adapter-dir); export it with --format hf")
    return checkpoint.save_peft(out, loaded.cfg, loaded.params, base_model=base_model or loaded.base_model)


def main(cfg: ExportConfig) -> Path:
    """Export the model ``cfg`` describes; prints and returns the output directory."""
    out = check(cfg)
    device = pick_device(cfg.device)
    loaded = load_model(cfg, device=device, dtype=torch.float32)
    if cfg.format == "peft":
        path = export_peft(out, loaded, cfg.base_model)
        n = len(lora.adapters(loaded.params))
        print(f"exported the adapter ({n} LoRA weights, PEFT format) to {path}")
        return path
    n = len(lora.adapters(loaded.params))
    dtype = auto_dtype(cfg) if cfg.dtype == "auto" else cfg.dtype
    path = export_hf(out, loaded, DTYPES[dtype], int(cfg.max_shard_size_gb * (1 << 30)))
    what = f"{n} adapted weights merged" if n else "no adapter"
    print(f"exported the model ({what}, {dtype}) to {path}")
    return path
