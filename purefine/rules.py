"""The rules a train config must keep beyond its types: ranges, cross-field rules, the task's options.

``problems(cfg)`` lists every rule broken, one message per group of rules, each naming the flag;
``validate(cfg)`` raises the first (``purefine validate`` prints them all). Types are checked before
(tyro for flags, ``schema`` for YAML); the world (paths, templates, output directory) after, by
``recipes.preflight``. ``cfg`` is a ``config.TrainConfig``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from purefine import models
from purefine.data import DataConfig
from purefine.errors import ConfigError

TrainConfig = Any  # config.TrainConfig (config imports this module, so the type is not imported here)


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


def _check_counts(cfg: TrainConfig) -> None:
    """Sizes, counts and rates in range."""
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


def _check_run(cfg: TrainConfig) -> None:
    """Cross-field rules of the run: length, resume, task and method, labels."""
    defaults = DataConfig()
    for name, flag in (("max_seq_len", "--max-seq-len"), ("seed", "--seed")):
        inner, outer = getattr(cfg.data, name), getattr(cfg, name)
        if inner != getattr(defaults, name) and inner != outer:
            raise ConfigError(f"--data.{name.replace('_', '-')} ({inner}) disagrees with {flag} ({outer}); "
                              f"set {flag} only: the trainer passes it to the data pipeline")
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise ConfigError(f"--max-steps {cfg.max_steps} and --epochs {cfg.epochs}: give one of them (it decides the "
                          "length of the run)")
    if cfg.resume is not None and cfg.output_dir is None:
        raise ConfigError(f"--resume {cfg.resume}: give the --output-dir of the run to continue")
    if cfg.lora.quantize_embeddings and cfg.peft != "qlora":
        raise ConfigError(f"--lora.quantize-embeddings: only with --peft qlora (found --peft {cfg.peft})")
    if cfg.task in ("classify", "mlm") and cfg.peft == "qlora":
        raise ConfigError("--peft qlora: not supported with --task classify / mlm; use lora, dora or none")
    if cfg.num_labels is not None and cfg.num_labels < 2:
        raise ConfigError(f"--num-labels: a classifier needs at least 2 classes, found {cfg.num_labels}")


def _check_model(cfg: TrainConfig) -> None:
    """The model source and the adapter's targets."""
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


def _check_devices(cfg: TrainConfig) -> None:
    """--device and the --parallel.* sizes."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device):
        raise ConfigError(f"--device: expected auto, cpu, cuda, cuda:N or mps, found {cfg.device!r}")
    for flag, value in (("--parallel.dp-replicate", cfg.parallel.dp_replicate), ("--parallel.tp", cfg.parallel.tp),
                        ("--parallel.pp", cfg.parallel.pp)):
        _positive(value, flag)
    if cfg.parallel.dp_shard == 0 or cfg.parallel.dp_shard < -1:
        raise ConfigError(f"--parallel.dp-shard: must be -1 (auto) or >= 1, found {cfg.parallel.dp_shard}")
    if cfg.compile and cfg.parallel.pp > 1:
        raise ConfigError("--compile: not with --parallel.pp (pipeline stages run eagerly)")
    if cfg.force_dtype and cfg.dtype != "bf16":
        raise ConfigError(f"--force-dtype: only with --dtype bf16 (it forces bf16 compute), found --dtype {cfg.dtype}")


def problems(cfg: TrainConfig) -> list[str]:
    """Every rule ``cfg`` breaks (ranges and cross-field rules), one message per group of rules,
    each naming the flag. ``configs validate`` prints them all; ``validate`` stops at the first."""
    checks = (_check_numbers, _check_counts, _check_run, _check_model, _check_devices, _check_more_ranges,
              _check_dpo_distill)
    out = []
    for check in checks:
        try:
            check(cfg)
        except ConfigError as e:
            out.append(str(e))
    return out


def validate(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` if it breaks no rule (see ``problems``), else a ConfigError naming the first flag."""
    found = problems(cfg)
    if found:
        more = f" (and {len(found) - 1} more problem{'s' * (len(found) > 2)})" if len(found) > 1 else ""
        raise ConfigError(found[0] + more)
    return cfg


def _check_dpo_distill(cfg: TrainConfig) -> None:
    """The ranges of --dpo.* / --distill.* and the --teacher rule (the tasks check the rest when built)."""
    d, k = cfg.dpo, cfg.distill
    for flag, value in (("--dpo.beta", d.beta), ("--distill.temperature", k.temperature)):
        _positive(value, flag)
    _positive(d.gamma, "--dpo.gamma", allow_zero=True)
    if not 0.0 <= d.label_smoothing < 0.5:
        raise ConfigError(f"--dpo.label-smoothing: must be in [0, 0.5), found {d.label_smoothing}")
    if not 0.0 <= k.alpha <= 1.0:
        raise ConfigError(f"--distill.alpha: must be in [0, 1], found {k.alpha}")
    if (cfg.task == "distill") != (cfg.teacher is not None):
        raise ConfigError("--teacher: required with --task distill" if cfg.task == "distill"
                          else f"--teacher: only used with --task distill (the task is {cfg.task})")
