"""The train CLI's config: frozen dataclasses whose field docstrings are the ``--help`` text.

A YAML preset under ``configs/`` (``--config NAME`` or a path) supplies the defaults and every
flag overrides it; ``python scripts/configs.py ls | cp | validate`` lists, copies and checks
presets (what ``tune ls``, ``tune cp`` and ``tune validate`` do).

    cfg = parse_train_args(["--config", "llama2-7b-qlora", "--max-steps", "10"])
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from purefine import configio, models
from purefine.data import DataConfig
from purefine.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class LoraConfig:
    """The adapter for --peft lora / qlora / dora."""

    rank: int = 8
    """Adapter rank r."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / rank) * B A (alpha / sqrt(rank) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training."""
    targets: tuple[str, ...] = ("default",)
    """Modules to adapt: default (the family's: q_proj v_proj for Llama/Mistral/Qwen2, c_attn for GPT-2, query value for BERT), all-linear, module names (q_proj k_proj ... lm_head, c_attn c_proj c_fc, query key value dense), or one regex over weight paths."""
    rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(rank)."""


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer and its learning-rate schedule."""

    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer."""
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not applied to norms and biases)."""
    b1: float = 0.9
    """AdamW beta1 (SGD momentum when name=sgd)."""
    b2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    clip_norm: float | None = 1.0
    """Clip gradients to this global norm (None: no clipping)."""


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel layout under torchrun (product = number of processes)."""

    dp_replicate: int = 1
    """Data-parallel replicas (parameters replicated, gradients all-reduced)."""
    dp_shard: int = -1
    """FSDP-style shards (-1: every process not used by the other dimensions)."""
    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline-parallel stages."""
    microbatches: int = 0
    """Pipeline micro-batches per step (0: the number of stages)."""


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tune a model with LoRA, QLoRA, DoRA or fully. With no flags: the bundled demo."""

    config: str | None = None
    """A YAML preset (a name under configs/ or a path) whose values become the defaults."""
    model: str = "llama-tiny"
    """Model preset (see `python scripts/info.py --list`); ignored with --checkpoint-dir."""
    checkpoint_dir: str | None = None
    """An HF model directory (config.json + safetensors) to start from."""
    init: Literal["auto", "random", "checkpoint"] = "auto"
    """Where weights come from: auto = the checkpoint if given, else random init of the preset."""
    tokenizer: str | None = None
    """Tokenizer file or directory (default: the checkpoint's, else the bundled demo tokenizer)."""
    peft: Literal["none", "lora", "qlora", "dora"] = "lora"
    """Fine-tuning method: none = full fine-tuning."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    task: Literal["causal_lm", "classify", "mlm"] = "causal_lm"
    """Training objective: causal_lm, classify (sequence classification of a BERT, labels from --data.label-column), mlm (BERT masked-LM)."""
    num_labels: int | None = None
    """Classes for --task classify (None: as many as the training data's label column holds)."""
    max_steps: int | None = 120
    """Optimizer steps (None: run --epochs over the data)."""
    epochs: int = 1
    """Passes over the data when --max-steps is None."""
    batch_size: int = 8
    """Sequences per micro-batch (per data-parallel rank)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_seq_len: int = 256
    """Longest sequence after tokenization (longer samples are truncated)."""
    seed: int = 0
    """Seed for init, adapters, data order and dropout."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute dtype: bf16 keeps frozen weights in bf16 and fp32 master copies of trained ones; auto = bf16 for QLoRA, else fp32."""
    remat: bool | None = None
    """Activation checkpointing per block: less memory, ~1/3 more compute (default: on for QLoRA, off otherwise)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    output_dir: str = "outputs/demo"
    """Where the adapter, merged model, resolved config, metrics and loss curve go."""
    save_merged: bool = False
    """Also write the merged model (LoRA folded in, NF4 dequantized) as an HF checkpoint."""
    log_every: int = 10
    """Print a metrics line every N steps."""
    eval_every: int = 0
    """Held-out loss every N steps (0: only at the start and the end)."""
    eval_batches: int = 8
    """Batches of the held-out split per evaluation."""
    save_every: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Resumable checkpoints to keep."""
    resume: str | None = None
    """Resume from 'latest' (in --output-dir) or a checkpoint path."""
    stop_after: int | None = None
    """Stop after this many steps of this invocation (the schedule still follows --max-steps): for time-limited jobs; continue with --resume latest."""
    save_on_interrupt: bool = False
    """On Ctrl-C, save a resumable checkpoint before exiting."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a non-finite loss or gradient: stop with a diagnostic, or skip the step."""
    tensorboard: bool = False
    """Log to TensorBoard (needs the logging extra)."""
    wandb: bool = False
    """Log to Weights & Biases (needs the logging extra)."""
    progress: bool = True
    """Show a progress bar (needs tqdm)."""
    plot: bool = True
    """Write loss.png at the end (needs matplotlib)."""
    profile: bool = False
    """Trace a few steps with torch.profiler and print the top ops."""
    debug_stats: int = 0
    """Every N steps, print per-layer activation and gradient norms with NaN/inf counts (also to debug_stats.jsonl); 0: off."""
    memory_report: bool = False
    """Measure the first steps' peak memory and print it split into weights, adapters, optimizer state, activations, gradients and temporaries (memory.json)."""


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (``llama2-7b-qlora``) or a YAML path -> the file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"--config: {path}: config file not found")
        return path
    candidate = CONFIGS_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = ", ".join(list_presets()) or "none"
        raise ConfigError(f"--config: unknown preset {name_or_path!r} (known: {known})")
    return candidate


def list_presets() -> list[str]:
    """Names of the YAML presets under configs/."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")) if CONFIGS_DIR.is_dir() else []


def load_preset(name_or_path: str) -> TrainConfig:
    """The TrainConfig a YAML preset describes (its keys over the built-in defaults)."""
    path = resolve_preset(name_or_path)
    return configio.merge(TrainConfig(), configio.load_yaml(path) | {"config": str(name_or_path)}, str(path))


def _config_flag(args: Sequence[str]) -> str | None:
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def parse_train_args(args: Sequence[str] | None = None) -> TrainConfig:
    """The TrainConfig of a command line: the --config preset's values, then the flags."""
    from purefine.recipes.cli import parse

    args = list(sys.argv[1:] if args is None else args)
    name = _config_flag(args)
    default = load_preset(name) if name else TrainConfig()
    return validate(parse(TrainConfig, args, default=default))


def _positive(value: float | None, flag: str, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{flag}: must be {'>= 0' if allow_zero else '> 0'}, found {value}")


INT64_MAX = 2**63 - 1


def _check_numbers(obj: object, prefix: str = "--") -> None:
    """Every float field finite and every int field within int64 (NaN, inf or 10**100 break a run late)."""
    for f in dataclasses.fields(obj):
        value, flag = getattr(obj, f.name), prefix + f.name.replace("_", "-")
        if dataclasses.is_dataclass(value):
            _check_numbers(value, flag + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag}: must be a finite number, found {value}")
        elif isinstance(value, int) and not isinstance(value, bool) and not -INT64_MAX <= value <= INT64_MAX:
            raise ConfigError(f"{flag}: must fit in a signed 64-bit integer, found {value}")


def _check_more_ranges(cfg: TrainConfig) -> None:
    """Ranges torch.optim and datasets would refuse late (betas, eps, micro-batches, sample and process counts)."""
    for flag, value in (("--optim.b1", cfg.optim.b1), ("--optim.b2", cfg.optim.b2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{flag}: must be in [0, 1), found {value}")
    _positive(cfg.optim.eps, "--optim.eps", allow_zero=True)
    _positive(cfg.parallel.microbatches, "--parallel.microbatches", allow_zero=True)
    _positive(cfg.data.max_samples, "--data.max-samples")
    _positive(cfg.data.num_proc, "--data.num-proc")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check ranges and cross-field rules; a ConfigError names the flag."""
    _check_numbers(cfg)
    if cfg.seed < 0:
        raise ConfigError(f"--seed: must be >= 0, found {cfg.seed}")
    for flag, value in (("--batch-size", cfg.batch_size), ("--grad-accum", cfg.grad_accum),
                        ("--max-seq-len", cfg.max_seq_len), ("--epochs", cfg.epochs), ("--max-steps", cfg.max_steps),
                        ("--lora.rank", cfg.lora.rank), ("--optim.lr", cfg.optim.lr), ("--log-every", cfg.log_every),
                        ("--keep-last", cfg.keep_last), ("--stop-after", cfg.stop_after)):
        _positive(value, flag)
    for flag, value in (("--lora.alpha", cfg.lora.alpha), ("--optim.warmup-steps", cfg.optim.warmup_steps),
                        ("--optim.weight-decay", cfg.optim.weight_decay), ("--eval-every", cfg.eval_every),
                        ("--save-every", cfg.save_every), ("--eval-batches", cfg.eval_batches),
                        ("--optim.clip-norm", cfg.optim.clip_norm)):
        _positive(value, flag, allow_zero=True)
    defaults = DataConfig()
    for name, flag in (("max_seq_len", "--max-seq-len"), ("seed", "--seed")):
        inner, outer = getattr(cfg.data, name), getattr(cfg, name)
        if inner != getattr(defaults, name) and inner != outer:
            raise ConfigError(f"--data.{name.replace('_', '-')} ({inner}) disagrees with {flag} ({outer}); "
                              f"set {flag} only: the trainer passes it to the data pipeline")
    if cfg.task in ("classify", "mlm") and cfg.peft == "qlora":
        raise ConfigError("--peft qlora: not supported with --task classify / mlm; use lora, dora or none")
    if cfg.num_labels is not None and cfg.num_labels < 2:
        raise ConfigError(f"--num-labels: a classifier needs at least 2 classes, found {cfg.num_labels}")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"--lora.dropout: must be in [0, 1), found {cfg.lora.dropout}")
    if cfg.checkpoint_dir is None:
        if cfg.init == "checkpoint":
            raise ConfigError("--init checkpoint: needs --checkpoint-dir")
        models.preset(cfg.model)
    if not cfg.lora.targets:
        raise ConfigError("--lora.targets: give at least one projection name or regex")
    for t in cfg.lora.targets:
        try:
            re.compile(t)
        except re.error as e:
            raise ConfigError(f"--lora.targets: {t!r} is not a valid regex ({e})") from None
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device):
        raise ConfigError(f"--device: expected auto, cpu, cuda, cuda:N or mps, found {cfg.device!r}")
    for flag, value in (("--parallel.dp-replicate", cfg.parallel.dp_replicate), ("--parallel.tp", cfg.parallel.tp),
                        ("--parallel.pp", cfg.parallel.pp)):
        _positive(value, flag)
    if cfg.parallel.dp_shard == 0 or cfg.parallel.dp_shard < -1:
        raise ConfigError(f"--parallel.dp-shard: must be -1 (auto) or >= 1, found {cfg.parallel.dp_shard}")
    _check_more_ranges(cfg)
    return cfg


def uses_remat(cfg: TrainConfig) -> bool:
    """Whether blocks are checkpointed: --remat, or by default for QLoRA (memory is its point)."""
    return cfg.remat if cfg.remat is not None else cfg.peft == "qlora"


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what the run writes to its output directory)."""
    import yaml

    return yaml.safe_dump(configio.to_dict(cfg), sort_keys=False)


def replace(cfg: TrainConfig, **changes: object) -> TrainConfig:
    """``dataclasses.replace`` that validates the result."""
    return validate(dataclasses.replace(cfg, **changes))
