"""What every training run sets up the same way, whatever its task: device and dtype, the output
directory, the model (checkpoint, bundled weights or random init; NF4 for QLoRA), the tokenizer
path, the PEFT transform and the optimizer with its schedule.

The train recipe composes these with a task (``recipes.tasks``) and the loop (``recipes.loop``);
generate / eval / export reuse the model pieces through ``recipes.loading``.
"""

from __future__ import annotations

import functools
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from purefine import checkpoint, data, fsutil, hardware, hub, lora, models, nf4, optim, schedules, train
from purefine.config import TrainConfig
from purefine.errors import ConfigError

# Presets that ship pretrained weights inside the package (the demo base model).
BUNDLED_DIR = Path(data.ASSETS_DIR)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def bundled_checkpoint(model: str) -> Path | None:
    """The bundled pretrained checkpoint of a preset (``llama-tiny``), or None."""
    path = BUNDLED_DIR / model
    return path if (path / "config.json").exists() else None


@functools.lru_cache(maxsize=8)
def model_dir(path_or_id: str) -> Path:
    """--checkpoint-dir as a local directory: the directory, or a hub id downloaded to the HF cache."""
    return hub.resolve_model_dir(path_or_id)


def checkpoint_source(cfg: TrainConfig) -> Path | None:
    """The checkpoint a run starts from: --checkpoint-dir (a directory or a hub id), else the preset's
    bundled weights; None for ``--init random``. A preset without weights under ``--init auto`` is
    an error: training random weights by accident is worse than stopping."""
    if cfg.init == "random":
        return None
    if cfg.checkpoint_dir is not None:
        return model_dir(cfg.checkpoint_dir)
    bundled = bundled_checkpoint(cfg.model)
    if bundled is None:
        flag = "--init checkpoint" if cfg.init == "checkpoint" else "--model"
        raise ConfigError(f"{flag} {cfg.model}: the preset ships no weights; pass --checkpoint-dir (a local HF "
                          "directory or a hub id such as meta-llama/Llama-2-7b-hf), or --init random to train a "
                          "seeded random init")
    return bundled


def base_model_name(cfg: TrainConfig) -> str | None:
    """What an adapter names as its base (``base_model_name_or_path``): the hub id or the absolute
    checkpoint directory, the bundled weights' path, or None for a random init (no base to load)."""
    if cfg.init == "random":
        return None
    if cfg.checkpoint_dir is not None:
        local = Path(cfg.checkpoint_dir)
        return str(local.resolve()) if local.is_dir() else cfg.checkpoint_dir
    return str(checkpoint_source(cfg).resolve())


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; an unavailable cuda is a ConfigError naming --device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def check_compile(cfg: TrainConfig, device: torch.device) -> None:
    """``--compile`` on a CPU where torch dispatches AVX2 kernels (no AVX-512) is refused: inductor's AVX2
    code gave NaN losses and gradients for a two-layer LoRA loss that runs finite eagerly (torch 2.13,
    tests/test_precision.py), and compiling did not pay on CPU where it worked (docs/performance.md)."""
    if cfg.compile and device.type == "cpu" and hardware.torch_cpu_capability() == "AVX2":
        raise ConfigError(f"--compile: not on this CPU (torch {torch.__version__} dispatches AVX2 kernels): torch.compile's "
                          "AVX2 code gave NaN gradients for LoRA losses that are finite eagerly; run without --compile")


@dataclass(frozen=True)
class Precision:
    """How a run computes and stores: ``compute`` the activations' dtype, ``frozen`` the storage of the
    weights that do not train (trained tensors are float32 masters), ``why`` the header's reason."""

    compute: torch.dtype
    frozen: torch.dtype
    why: str

    @property
    def step_dtype(self) -> torch.dtype | None:
        """What ``train.make_step(compute_dtype=)`` takes: None when everything is float32 already."""
        return None if self.compute == self.frozen == torch.float32 else self.compute


def precision(cfg: TrainConfig, device: torch.device | str | None = None) -> Precision:
    """The run's dtypes from ``--dtype`` and the hardware (``hardware.native_bf16``):

    - ``fp32``: fp32 throughout.
    - ``auto``: bf16 where the device computes it natively (CUDA with bf16, a CPU with AMX or
      AVX512-BF16); elsewhere fp32, QLoRA keeping its frozen (non-NF4) weights in bf16.
    - ``bf16``: bf16 where native or with ``--force-dtype``; elsewhere fp32 compute over frozen
      weights stored in bf16 (upcast per layer), since emulated bf16 matmuls run 8-200x slower.
    """
    device = torch.device(device) if device is not None else pick_device(cfg.device)
    fp32, bf16 = torch.float32, torch.bfloat16
    if cfg.dtype == "fp32":
        return Precision(fp32, fp32, "--dtype fp32")
    where = hardware.bf16_support(device)
    if hardware.native_bf16(device):
        return Precision(bf16, bf16, f"{'--dtype bf16' if cfg.dtype == 'bf16' else 'auto'}: {where}")
    if cfg.dtype == "bf16" and cfg.force_dtype:
        return Precision(bf16, bf16, f"--dtype bf16 --force-dtype ({where})")
    if cfg.dtype == "bf16":
        return Precision(fp32, bf16, f"--dtype bf16 on {where}: fp32 compute over bf16-stored frozen weights "
                                     "(--force-dtype computes in bf16)")
    if cfg.peft == "qlora":
        return Precision(fp32, bf16, f"auto: {where}: fp32 compute, frozen weights stored in bf16")
    return Precision(fp32, fp32, f"auto: {where}")


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """The activations' dtype of ``cfg`` on its device (``precision(cfg).compute``)."""
    return precision(cfg).compute


# What a run writes; their presence marks a directory as holding an earlier run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "memory.json", "debug_stats.jsonl",
             "adapter", "model", "merged", "checkpoints", "tensorboard", "profile")


def default_output_dir(cfg: TrainConfig) -> str:
    """A new directory per run: ``outputs/<model>-<task>-<peft>-<YYYYmmdd-HHMMSS>`` (numbered if taken)."""
    model = Path(cfg.checkpoint_dir).name if cfg.checkpoint_dir else cfg.model
    base = f"outputs/{model}-{cfg.task}-{cfg.peft}-{datetime.now():%Y%m%d-%H%M%S}"
    name, n = base, 1
    while Path(name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def claim_output_dir(cfg: TrainConfig) -> Path:
    """The run's output directory, created and proven writable. One that holds an earlier run is
    refused unless ``--resume`` continues it or ``--overwrite`` replaces it (its run files removed)."""
    out = Path(cfg.output_dir)
    found = [n for n in RUN_FILES if (out / n).exists()]
    if found and cfg.resume is None:
        if not cfg.overwrite:
            raise ConfigError(f"--output-dir {out}: holds an earlier run ({', '.join(found[:4])}); pass --overwrite "
                              "to replace it, --resume latest to continue it, or another --output-dir")
        for name in found:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return prepare_output_dir(str(out))


def same_on_every_rank(value: Any) -> Any:
    """``value`` as rank 0 has it, on every process (a broadcast under torchrun; itself on one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def prepare_output_dir(path: str) -> Path:
    """Create ``path`` and prove it is writable, or raise a ConfigError naming it."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fsutil.atomic_write(out / ".write-test", b"ok")
        (out / ".write-test").unlink()
    except OSError as e:
        raise ConfigError(f"--output-dir {path}: cannot write there ({e.strerror or e})") from None
    return out


def load_model(cfg: TrainConfig, device: torch.device, layout: Any = None) -> tuple[Any, dict]:
    """(model config, params): from --checkpoint-dir, the bundled weights, or a random init of --model;
    NF4 for QLoRA. Under a mesh (``layout``) each rank reads only its own slices of the checkpoint."""
    frozen_dtype = precision(cfg, device).frozen if cfg.peft != "none" else torch.float32  # full FT: fp32 masters
    source = checkpoint_source(cfg)
    model_cfg = checkpoint.read_config(source)[0] if source is not None else models.preset(cfg.model)
    if cfg.lora.quantize_embeddings and getattr(layout, "world_size", 1) > 1:
        raise ConfigError("--lora.quantize-embeddings: one process only (NF4 embeddings and heads are not sharded "
                          "under torchrun); drop the flag or run without torchrun")
    quantize = models.quantize_pattern(model_cfg, embeddings=cfg.lora.quantize_embeddings) if cfg.peft == "qlora" else None
    if source is not None:
        sliced = layout is not None and cfg.peft != "dora"  # DoRA's magnitude is set from whole weights
        reader = layout.checkpoint_reader(model_cfg, dtype=frozen_dtype, quantize=quantize) if sliced else None
        return checkpoint.load_hf(source, dtype=frozen_dtype, quantize=quantize, device=device, reader=reader)
    hook = nf4.quantize_hook(quantize) if quantize is not None else None
    return model_cfg, models.init(model_cfg, seed=cfg.seed, dtype=frozen_dtype, device=device, hook=hook)


def tokenizer_files(path: Path) -> dict[str, Path]:
    """{file name: source} of the tokenizer files to copy next to a saved model."""
    path = Path(path)
    if path.is_file():
        return {"tokenizer.model" if path.suffix == ".model" else path.name: path}
    return {n: path / n for n in TOKENIZER_FILES if (path / n).exists()}


def has_tokenizer(path: Path | str | None) -> bool:
    """Whether ``path`` is a directory holding a tokenizer.model or tokenizer.json."""
    return path is not None and any((Path(path) / n).is_file() for n in TOKENIZER_FILES[:2])


def tokenizer_path(cfg: TrainConfig, default: Path = data.DEMO_TOKENIZER) -> Path:
    """--tokenizer, else the checkpoint's (or the bundled weights') tokenizer files, else ``default``
    (the bundled demo tokenizer) for a random init. A checkpoint without a tokenizer is an error:
    another tokenizer's ids would mean nothing to its embeddings."""
    if cfg.tokenizer is not None:
        return Path(cfg.tokenizer)
    source = checkpoint_source(cfg)
    if source is None:
        return default
    if not has_tokenizer(source):
        raise ConfigError(f"--checkpoint-dir {cfg.checkpoint_dir or source}: no tokenizer.model or tokenizer.json "
                          "beside the weights; pass --tokenizer PATH (the tokenizer the model was trained with)")
    return source


def apply_peft(cfg: TrainConfig, model_cfg: Any, params: dict, *, full: str | None = None,
               full_name: str = "tensors trained in full") -> tuple[dict, Any]:
    """(params with adapters, trainable filter) for --peft; --lora.targets names are the family's.

    ``full``: a regex of tensors trained in full beside the adapters (a classifier's head, peft's
    ``modules_to_save``); adapters are never put on them.
    """
    if cfg.peft == "none":
        return params, train.all_floating
    where = models.lora_targets(model_cfg, cfg.lora.targets)
    if full is not None:
        keep = [p for p in lora.select_targets(params, where) if not re.fullmatch(full, p)]
        if not keep:
            raise ConfigError(f"--lora.targets {list(cfg.lora.targets)}: selects only {full_name}, which is "
                              f"trained in full ({full}); name other layers")
        where = "|".join(map(re.escape, keep))
    params = lora.apply(params, rank=cfg.lora.rank, alpha=cfg.lora.alpha, where=where, dropout=cfg.lora.dropout,
                        seed=cfg.seed, rslora=cfg.lora.rslora, dora=cfg.peft == "dora")
    return params, lora.trainable_with(full)


def make_optimizer(o: Any, total_steps: int) -> tuple[optim.Optimizer, Any]:
    """(optimizer, schedule) from the optim config; no weight decay on norms and biases."""
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    if o.schedule == "cosine":
        schedule = schedules.warmup_cosine(o.lr, warmup=warmup, total=total_steps)
    elif o.schedule == "linear":
        schedule = schedules.warmup_linear(o.lr, warmup=warmup, total=total_steps)
    else:
        schedule = schedules.constant(o.lr, warmup=warmup)

    def build(weight_decay: float) -> optim.Optimizer:
        if o.name == "sgd":
            return optim.sgd(schedule, momentum=o.b1 if o.b1 != 0.9 else 0.0, weight_decay=weight_decay)
        return optim.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=weight_decay)

    if o.weight_decay == 0:
        return build(0.0), schedule
    decayed = optim.masked(build(o.weight_decay), optim.decays)
    plain = optim.masked(build(0.0), lambda p: not optim.decays(p))
    return optim.parallel(decayed, plain), schedule


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (a dict of tensors, or of such dicts: preference pairs) moved to ``device``."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch
