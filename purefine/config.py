"""The train CLI's config: frozen dataclasses whose field docstrings are the ``--help`` text.

A YAML preset shipped in ``purefine/configs/`` (``--config NAME`` or a path) supplies the defaults and every
flag overrides it; ``python scripts/configs.py ls | cp | validate`` lists, copies and checks
presets (what ``tune ls``, ``tune cp`` and ``tune validate`` do).

    cfg = parse_train_args(["--config", "llama2-7b-qlora", "--max-steps", "10"])
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from purefine import configio
from purefine.data import DataConfig
from purefine.errors import ConfigError
from purefine.rules import problems, validate  # noqa: F401  (the rules of a TrainConfig, re-exported)

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # package data: installed with purefine


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
    quantize_embeddings: bool = False
    """QLoRA: also store the input embedding and the output head in NF4 (frozen), as torchtune does for a LoRA'd output projection; a Llama-2-7B saves ~0.36 GiB. Off by default, as in peft / bitsandbytes, which keep them in 16 bits."""


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
    pp_schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"
    """Pipeline schedule (torch.distributed.pipelining): gpipe (all forwards, then all backwards), 1f1b (one forward, one backward: less activation memory), interleaved (1F1B over several stages per rank: smaller bubble)."""
    pp_stages_per_rank: int = 2
    """Pipeline stages each rank runs under --parallel.pp-schedule interleaved (gpipe and 1f1b run one)."""


@dataclass(frozen=True)
class DpoConfig:
    """Preference tuning for --task dpo (formulas as TRL's DPOTrainer / CPOTrainer / ORPOTrainer)."""

    loss: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"] = "sigmoid"
    """sigmoid (DPO), ipo, hinge (SLiC), simpo (reference-free, length-normalized), orpo (odds ratio + NLL, reference-free)."""
    beta: float = 0.1
    """beta: the deviation from the reference (sigmoid, hinge), IPO's tau, SimPO's and ORPO's reward scale."""
    label_smoothing: float = 0.0
    """Probability that a preference is flipped, in [0, 0.5): conservative DPO (sigmoid and simpo only)."""
    gamma: float = 0.5
    """SimPO's target reward margin (TRL's simpo_gamma; the margin in mean log-prob is gamma / beta)."""
    precompute_ref: bool | None = None
    """Reference log-probs computed in one pass before training and kept with the data (default: on for full fine-tuning, where it is the only way; off for LoRA / QLoRA / DoRA, whose reference is the model with adapters off)."""


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation for --task distill: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""

    alpha: float = 0.5
    """Weight of the KL to the teacher's token distributions (1 = pure distillation, 0 = plain cross-entropy)."""
    temperature: float = 1.0
    """Softmax temperature T of both models' logits in the KL term (the KL is scaled by T^2)."""
    quantize_teacher: bool = False
    """Keep the teacher's projections in NF4 (it always runs without gradients in the compute dtype)."""


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tune a model with LoRA, QLoRA, DoRA or fully. With no flags: the bundled demo."""

    config: str | None = None
    """A YAML preset (a name from `purefine ls`, or a path) whose values become the defaults."""
    model: str = "llama-tiny"
    """Model preset (see `python scripts/info.py --list`); ignored with --checkpoint-dir."""
    checkpoint_dir: str | None = None
    """An HF model directory (config.json + safetensors) to start from."""
    init: Literal["auto", "random", "checkpoint"] = "auto"
    """Where weights come from: auto = --checkpoint-dir, else the preset's bundled weights (an error if it ships none); random = a seeded random init of --model."""
    tokenizer: str | None = None
    """Tokenizer file or directory (default: the checkpoint's; the bundled demo tokenizer for a random or bundled tiny model)."""
    peft: Literal["none", "lora", "qlora", "dora"] = "lora"
    """Fine-tuning method: none = full fine-tuning."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    task: Literal["causal_lm", "classify", "mlm", "dpo", "distill"] = "causal_lm"
    """Training objective: causal_lm, classify (sequence classification of a BERT, labels from --data.label-column), mlm (BERT masked-LM), dpo (preference pairs, see --dpo.*), distill (match --teacher, see --distill.*)."""
    dpo: DpoConfig = field(default_factory=DpoConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher: str | None = None
    """--task distill: the teacher, an HF model directory or a training output directory (its vocabulary must be the student's)."""
    num_labels: int | None = None
    """Classes for --task classify (None: as many as the training data's label column holds)."""
    max_steps: int | None = None
    """Optimizer steps; give this or --epochs (neither: one epoch)."""
    epochs: int | None = None
    """Passes over the training data; give this or --max-steps (neither: one epoch)."""
    batch_size: int = 8
    """Sequences per micro-batch (per data-parallel rank)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_seq_len: int = 256
    """Longest sequence after tokenization (longer samples are truncated)."""
    seed: int = 0
    """Seed for init, adapters, data order and dropout."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute dtype (trained tensors always keep fp32 masters): auto = bf16 where the hardware computes it natively (CUDA; a CPU with AMX or AVX512-BF16), else fp32 (QLoRA keeps frozen weights in bf16 there); bf16 on a CPU without native bf16 computes in fp32 over bf16-stored weights unless --force-dtype."""
    force_dtype: bool = False
    """With --dtype bf16: compute in bf16 even on a CPU without native bf16 (its bf16 matmuls run 8-200x slower than fp32)."""
    remat: bool = False
    """Activation checkpointing per block: less memory, ~1/3 more compute (the QLoRA presets turn it on)."""
    compile: bool = False
    """torch.compile the loss (inductor on CPU and CUDA); the first steps pay the compile time, printed."""
    allocator: Literal["auto", "fast", "reuse", "lean"] = "auto"
    """CPU memory policy: auto = reuse for full fine-tuning (--peft none), else fast; fast = glibc's default (allocations above its dynamic threshold, at most 32 MiB, are mapped fresh each time); reuse = everything below 1 GiB from the heap, kept for the next step (full fine-tuning ~10% faster, peak RSS ~5% higher); lean = allocations of 1 MiB and more are mapped and unmapped each time, so memory returns to the OS at once (peak RSS ~25-35% lower, steps ~25-45% slower: docs/performance.md)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    output_dir: str | None = None
    """Where the adapter, merged model, resolved config, metrics and loss curve go (default: a new outputs/<model>-<task>-<peft>-<time>)."""
    overwrite: bool = False
    """Replace the outputs of an earlier run in --output-dir (to continue a run, use --resume instead)."""
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
    async_save: bool = False
    """Write resumable checkpoints in the background (a CPU copy is staged first): training goes on while they are written; each appears once complete."""
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
    """Names of the YAML presets shipped in purefine/configs/."""
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


def parse_train_args(args: Sequence[str] | None = None, *, prog: str | None = None) -> TrainConfig:
    """The TrainConfig of a command line: the --config preset's values, then the flags."""
    from purefine.recipes.cli import parse

    args = list(sys.argv[1:] if args is None else args)
    name = _config_flag(args)
    default = load_preset(name) if name else TrainConfig()
    given = {a.split("=")[0] for a in args}
    for flag, other in (("--max-steps", "epochs"), ("--epochs", "max_steps")):  # the flag decides over the preset
        if flag in given and "--" + other.replace("_", "-") not in given:
            default = dataclasses.replace(default, **{other: None})
    return validate(parse(TrainConfig, args, default=default, prog=prog))


def uses_remat(cfg: TrainConfig) -> bool:
    """Whether blocks are checkpointed (``--remat``)."""
    return cfg.remat


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what the run writes to its output directory)."""
    import yaml

    return yaml.safe_dump(configio.to_dict(cfg), sort_keys=False)


def replace(cfg: TrainConfig, **changes: object) -> TrainConfig:
    """``dataclasses.replace`` that validates the result."""
    return validate(dataclasses.replace(cfg, **changes))
