"""Load a trained model for generation, evaluation or export: the flags the three scripts share.

A model comes from one of two places:

- ``--run-dir``: a training output (``scripts/train.py --output-dir``). Its ``config.yaml`` says
  how the base was made (a checkpoint, or a seeded random init of a preset; NF4 for QLoRA), so the
  base is rebuilt exactly as training saw it, then ``adapter/`` (PEFT) is applied; a full
  fine-tune's ``model/`` is loaded as is. The tokenizer and chat template are the run's.
- ``--checkpoint-dir`` (an HF directory) with an optional ``--adapter-dir`` (a PEFT LoRA / DoRA
  adapter) and ``--quantize`` (the base's projections in NF4, as QLoRA trained against them).

``load_model(source, device=..., dtype=...) -> LoadedModel`` (config, params with LoRA / NF4 leaves
as they are, tokenizer path, base model name, template).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from purefine import checkpoint, models
from purefine.errors import CheckpointError, ConfigError
from purefine.recipes import setup
from purefine.recipes.setup import pick_device  # noqa: F401  (the scripts' --device, as training's)

DType = Literal["auto", "fp32", "bf16"]
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from (give --run-dir, or --checkpoint-dir with an optional --adapter-dir)."""

    run_dir: str | None = None
    """A training output directory (config.yaml with adapter/ or model/): base, adapter and tokenizer as trained."""
    checkpoint_dir: str | None = None
    """An HF model directory (config.json + safetensors): the base model."""
    adapter_dir: str | None = None
    """A PEFT LoRA / DoRA adapter directory (adapter_config.json + adapter_model.safetensors) to apply to the base."""
    quantize: bool = False
    """Store the base's attention and MLP projections in NF4 (the QLoRA base the adapter was trained on)."""
    tokenizer: str | None = None
    """Tokenizer file or directory (default: the run's, else the checkpoint's or adapter's tokenizer files)."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: ``params`` may hold LoRA and NF4 leaves (``lora.merge`` / ``dense`` fold them)."""

    cfg: Any
    params: dict
    tokenizer_path: Path | None
    base_model: str
    """The base's name for ``adapter_config.json`` (a checkpoint directory or a preset name)."""
    template: str | None = None
    """The chat template the run trained with (None outside a run directory)."""


def compute_dtype(name: DType, device: torch.device, quantized: bool) -> torch.dtype:
    """The activation dtype: ``auto`` = bf16 on CUDA or for an NF4 base (as QLoRA trains), else fp32."""
    if name == "auto":
        return torch.bfloat16 if quantized or device.type == "cuda" else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


def check_source(source: ModelSource) -> None:
    """Exactly one of --run-dir / --checkpoint-dir; --adapter-dir and --quantize go with --checkpoint-dir."""
    if source.run_dir is not None:
        for flag, value in (("--checkpoint-dir", source.checkpoint_dir), ("--adapter-dir", source.adapter_dir)):
            if value is not None:
                raise ConfigError(f"{flag}: not allowed with --run-dir "
                                  "(the run's config.yaml names its base and adapter)")
        if source.quantize:
            raise ConfigError("--quantize: not allowed with --run-dir "
                              "(the run's --peft decides whether the base is NF4)")
    elif source.checkpoint_dir is None:
        raise ConfigError("no model given: pass --run-dir (a training output) "
                          "or --checkpoint-dir (an HF model directory)")


def has_tokenizer(path: Path) -> bool:
    """Whether a directory holds a tokenizer.model or tokenizer.json."""
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


def _first_tokenizer(*dirs: Path | None) -> Path | None:
    return next((d for d in dirs if d is not None and has_tokenizer(d)), None)


def load_run(run_dir: Path, *, device: torch.device) -> LoadedModel:
    """A training output: the base rebuilt from config.yaml (as ``setup.load_model`` made it), then the adapter."""
    from purefine.config import load_preset

    config_file = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise CheckpointError(f"--run-dir {run_dir}: directory not found")
    if not config_file.is_file():
        raise CheckpointError(f"--run-dir {run_dir}: no config.yaml; expected the output directory of scripts/train.py")
    train_cfg = load_preset(str(config_file))
    template = train_cfg.data.template
    if (run_dir / "model").is_dir():
        cfg, params = checkpoint.load_hf(run_dir / "model", device=device)
        tok = _first_tokenizer(run_dir / "model") or setup.tokenizer_path(train_cfg)
        return LoadedModel(cfg, params, Path(tok), str(run_dir / "model"), template)
    if not (run_dir / "adapter").is_dir():
        raise CheckpointError(f"--run-dir {run_dir}: neither adapter/ nor model/ found; did the run finish?")
    if train_cfg.checkpoint_dir is not None and not Path(train_cfg.checkpoint_dir).is_dir():
        raise CheckpointError(f"{config_file}: checkpoint_dir {train_cfg.checkpoint_dir!r} not found "
                              "(relative paths are read from the current directory)")
    cfg, params = setup.load_model(train_cfg, device)
    params = checkpoint.load_peft(run_dir / "adapter", params)
    source = setup.checkpoint_source(train_cfg)  # --checkpoint-dir, a preset's bundled weights, or None
    base = str(source) if source is not None else train_cfg.model
    return LoadedModel(cfg, params, Path(setup.tokenizer_path(train_cfg)), base, template)


def load_checkpoint(source: ModelSource, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """--checkpoint-dir (NF4 with --quantize) plus the optional --adapter-dir."""
    ckpt = Path(source.checkpoint_dir)
    adapter = Path(source.adapter_dir) if source.adapter_dir is not None else None
    if adapter is not None and not adapter.is_dir():
        raise CheckpointError(f"--adapter-dir {adapter}: directory not found")
    base_dtype = torch.bfloat16 if source.quantize else dtype  # QLoRA quantizes the bf16 weights
    quantize = models.quantize_pattern(checkpoint.read_config(ckpt)[0]) if source.quantize else None
    cfg, params = checkpoint.load_hf(ckpt, dtype=base_dtype, quantize=quantize, device=device)
    if adapter is not None:
        params = checkpoint.load_peft(adapter, params)
    return LoadedModel(cfg, params, _first_tokenizer(ckpt, adapter), str(ckpt))


def load_model(source: ModelSource, *, device: torch.device, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The model ``source`` describes, on ``device``; a checkpoint's floating weights are read in ``dtype``.

    ``--tokenizer`` overrides the tokenizer path found with the model.
    """
    check_source(source)
    if source.run_dir is not None:
        loaded = load_run(Path(source.run_dir), device=device)
    else:
        loaded = load_checkpoint(source, device=device, dtype=dtype)
    if source.tokenizer is not None:
        loaded = LoadedModel(loaded.cfg, loaded.params, Path(source.tokenizer), loaded.base_model, loaded.template)
    return loaded


def require_tokenizer(loaded: LoadedModel) -> Any:
    """The loaded model's tokenizer (``data.load_tokenizer``), or a TokenizerError saying to pass --tokenizer."""
    from purefine import data
    from purefine.errors import TokenizerError

    if loaded.tokenizer_path is None:
        raise TokenizerError(f"{loaded.base_model}: no tokenizer.model or tokenizer.json beside the model; "
                             "pass --tokenizer PATH")
    return data.load_tokenizer(loaded.tokenizer_path, model_vocab_size=loaded.cfg.vocab_size)
