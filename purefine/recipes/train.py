"""The train recipe: ``main(cfg)`` composes model, data, PEFT transform, optimizer and the pure
step into a run, and writes what users need.

Outputs in ``cfg.output_dir``: ``adapter/`` (HF PEFT format) for LoRA / QLoRA / DoRA, or
``model/`` (an HF checkpoint) for full fine-tuning; ``merged/`` with ``--save-merged``;
``config.yaml`` (the resolved config); ``metrics.jsonl``; ``loss.png``; ``summary.json``;
``checkpoints/step-N/`` resumable states with ``--save-every``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from purefine import checkpoint, data, debug, fsutil, lora, models, optim, schedules, shard, train, tree
from purefine.config import TrainConfig, to_yaml, uses_remat, validate
from purefine.recipes import resume
from purefine.errors import ConfigError
from purefine.logging import MetricsLogger, limit_heap_fragmentation, peak_memory_bytes

# Presets that ship pretrained weights inside the package (the demo base model).
BUNDLED_DIR = Path(data.ASSETS_DIR)


def bundled_checkpoint(model: str) -> Path | None:
    """The bundled pretrained checkpoint of a preset (``llama-tiny``), or None."""
    path = BUNDLED_DIR / model
    return path if (path / "config.json").exists() else None


def checkpoint_source(cfg: TrainConfig) -> Path | None:
    """The checkpoint a run starts from: --checkpoint-dir, else the preset's bundled weights
    (``--init auto``), else None (random init)."""
    if cfg.init == "random":
        return None
    if cfg.checkpoint_dir is not None:
        return Path(cfg.checkpoint_dir)
    return bundled_checkpoint(cfg.model) if cfg.init == "auto" else None


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """The compute dtype: bf16 for ``--dtype bf16``, and for QLoRA under ``auto`` (as the paper)."""
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and cfg.peft == "qlora"):
        return torch.bfloat16
    return torch.float32


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


def load_model(cfg: TrainConfig, device: torch.device, layout: shard.Layout | None = None) -> tuple[Any, dict]:
    """(model config, params): from --checkpoint-dir, or a random init of --model; NF4 for QLoRA.
    Under a mesh (``layout``) each rank reads only its own slices of the checkpoint."""
    dtype = compute_dtype(cfg)
    frozen_dtype = dtype if cfg.peft != "none" else torch.float32  # full FT keeps fp32 masters
    source = checkpoint_source(cfg)
    if source is not None:
        model_cfg = checkpoint.read_config(source)[0]
    else:
        model_cfg = models.preset(cfg.model) if cfg.checkpoint_dir is None else checkpoint.read_config(cfg.checkpoint_dir)[0]
    quantize = models.quantize_pattern(model_cfg) if cfg.peft == "qlora" else None
    if source is not None:
        sliced = layout is not None and cfg.peft != "dora"  # DoRA's magnitude is set from whole weights
        reader = layout.checkpoint_reader(model_cfg, dtype=frozen_dtype, quantize=quantize) if sliced else None
        return checkpoint.load_hf(source, dtype=frozen_dtype, quantize=quantize, device=device, reader=reader)
    hook = None
    if quantize is not None:
        from purefine import nf4

        hook = nf4.quantize_hook(quantize)
    return model_cfg, models.init(model_cfg, seed=cfg.seed, dtype=frozen_dtype, device=device, hook=hook)


def tokenizer_path(cfg: TrainConfig) -> Path:
    """--tokenizer, else the checkpoint's tokenizer files, else the bundled demo tokenizer."""
    if cfg.tokenizer is not None:
        return Path(cfg.tokenizer)
    for ck in (cfg.checkpoint_dir, bundled_checkpoint(cfg.model)):
        if ck is not None and ((Path(ck) / "tokenizer.model").exists() or (Path(ck) / "tokenizer.json").exists()):
            return Path(ck)
    return data.DEMO_TOKENIZER


def apply_peft(cfg: TrainConfig, params: dict, model_cfg: Any) -> tuple[dict, Any]:
    """(params with adapters, trainable filter) for --peft; --lora.targets names are the family's."""
    if cfg.peft == "none":
        return params, train.all_floating
    where = models.lora_targets(model_cfg, cfg.lora.targets)
    params = lora.apply(params, rank=cfg.lora.rank, alpha=cfg.lora.alpha, where=where, dropout=cfg.lora.dropout,
                        seed=cfg.seed, rslora=cfg.lora.rslora, dora=cfg.peft == "dora")
    return params, lora.trainable


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


def count_steps(cfg: TrainConfig, dataset: Any, world_size: int) -> int:
    """Optimizer steps of the run: --max-steps, else --epochs passes over the data."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    state, n = data.SamplerState(seed=cfg.seed), 0
    while True:
        rows, state = data.sampler.plan_rows(dataset.lengths, state, rows=cfg.batch_size * world_size,
                                             seq_len=cfg.max_seq_len, packing=cfg.data.packing,
                                             shuffle=cfg.data.shuffle, loop=False)
        if not rows:
            break
        n += 1
    return max(1, math.ceil(n * cfg.epochs / cfg.grad_accum))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def evaluate_loss(model_cfg: Any, params: dict, dataset: Any, cfg: TrainConfig, device: torch.device,
                  dtype: torch.dtype, layout: shard.Layout | None = None) -> float | None:
    """Mean token loss over the first ``--eval-batches`` batches of the held-out set (every rank
    evaluates the same batches)."""
    if dataset is None or cfg.eval_batches == 0:
        return None
    loss_fn = layout.loss_fn(model_cfg) if layout is not None else models.loss_fn(model_cfg)
    total, count = 0.0, 0
    compute_params = train.cast_params(params, dtype)
    with torch.no_grad():
        it = data.batches(dataset, batch_size=cfg.batch_size, seq_len=cfg.max_seq_len, packing=cfg.data.packing,
                          shuffle=False, loop=False)
        for i, (batch, _) in enumerate(it):
            if i == cfg.eval_batches:
                break
            loss_sum, n = loss_fn(compute_params, to_device(batch, device))
            total, count = total + float(loss_sum), count + int(n)
    return total / count if count else None


def save_outputs(out: Path, cfg: TrainConfig, model_cfg: Any, params: dict, tok_path: Path) -> dict[str, str]:
    """Write the adapter (or the full model), the merged model if asked, and the tokenizer files."""
    tok_files = tokenizer_files(tok_path)
    written = {}
    if cfg.peft == "none":
        written["model"] = str(checkpoint.save_hf(out / "model", model_cfg, params, extra_files=tok_files))
    else:
        base = cfg.checkpoint_dir or cfg.model
        written["adapter"] = str(checkpoint.save_peft(out / "adapter", model_cfg, params, base_model=base))
    if cfg.save_merged and cfg.peft != "none":
        merged = lora.merge(params)
        dtype = torch.bfloat16 if cfg.peft == "qlora" else None
        written["merged"] = str(checkpoint.save_hf(out / "merged", model_cfg, merged, dtype=dtype, extra_files=tok_files))
    return written


def tokenizer_files(path: Path) -> dict[str, Path]:
    """{file name: source} of the tokenizer files to copy next to a saved model."""
    path = Path(path)
    if path.is_file():
        return {"tokenizer.model" if path.suffix == ".model" else path.name: path}
    names = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    return {n: path / n for n in names if (path / n).exists()}


def main(cfg: TrainConfig) -> dict:
    """Run the fine-tune described by ``cfg``; returns a summary (losses, throughput, outputs)."""
    cfg = validate(cfg)
    limit_heap_fragmentation()
    if cfg.task != "causal_lm":  # an encoder objective (classify, mlm): its own recipe
        from purefine.recipes import classify
        return classify.main(cfg)
    layout = shard.layout(cfg.parallel, pick_device(cfg.device))  # torchrun: process group and mesh
    out = prepare_output_dir(cfg.output_dir) if layout.is_main else Path(cfg.output_dir)
    if layout.is_main:
        fsutil.atomic_write(out / "config.yaml", to_yaml(cfg))
    device, dtype = layout.device, compute_dtype(cfg)
    torch.manual_seed(cfg.seed)
    model_cfg, params = load_model(cfg, device, layout)
    tok_path = tokenizer_path(cfg)
    tokenizer = data.load_tokenizer(tok_path, model_vocab_size=model_cfg.vocab_size)
    data_cfg = dataclasses.replace(cfg.data, max_seq_len=cfg.max_seq_len, seed=cfg.seed)
    with layout.main_first():  # rank 0 fills the tokenization cache, the others read it
        train_set, eval_set = data.build(data_cfg, tokenizer), data.build_eval(data_cfg, tokenizer)
    params, trainable = apply_peft(cfg, params, model_cfg)
    params = layout.shard_params(model_cfg, params)
    total_steps = count_steps(cfg, train_set, world_size=layout.dp_size)
    opt, schedule = make_optimizer(cfg.optim, total_steps)
    step_fn = layout.make_step(model_cfg, opt, trainable=trainable, remat=uses_remat(cfg),
                               clip_norm=cfg.optim.clip_norm or None, compute_dtype=dtype if dtype != torch.float32 else None,
                               skip_nonfinite=cfg.nan_policy == "skip")
    state = train.init(params, opt, trainable=trainable, seed=cfg.seed, copy=False)
    n_trainable = sum(x.numel() for _, x in tree.filtered(params, trainable))
    del params
    summary = run_loop(cfg, model_cfg, state, step_fn, schedule, train_set, eval_set, total_steps, out, device, dtype,
                       n_trainable, layout, trainable)
    full_params = layout.full_params_for_save(summary.pop("state").params)  # every rank takes part
    if not layout.is_main:
        return summary
    summary["outputs"] = save_outputs(out, cfg, model_cfg, full_params, tok_path)
    fsutil.atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    print(f"saved {', '.join(f'{k}: {v}' for k, v in summary['outputs'].items())}")
    return summary


def run_loop(cfg: TrainConfig, model_cfg: Any, state: train.TrainState, step_fn: Any, schedule: Any,
             train_set: Any, eval_set: Any, total_steps: int, out: Path, device: torch.device,
             dtype: torch.dtype, n_trainable: int, layout: shard.Layout | None = None, trainable: Any = None) -> dict:
    """Step until ``total_steps`` (or ``--stop-after`` steps of this invocation), logging every step
    on the main rank, saving resumable checkpoints as asked; returns the summary with the final state."""
    layout = layout or shard.layout()
    state, resumed = resume.maybe_resume(cfg, out, state, trainable, layout)
    sampler = data.SamplerState.from_dict(state.data_position) if resumed else data.SamplerState(seed=cfg.seed)
    stream = data.batches(train_set, batch_size=cfg.batch_size, seq_len=cfg.max_seq_len, packing=cfg.data.packing,
                          sampler_state=sampler, shuffle=cfg.data.shuffle, rank=layout.dp_rank, world_size=layout.dp_size)
    stop = min(total_steps, state.step + cfg.stop_after) if cfg.stop_after else total_steps
    losses: list[float] = []
    logger_cls = MetricsLogger if layout.is_main else _SilentLogger
    with logger_cls(out, every=cfg.log_every, total_steps=total_steps, tensorboard=cfg.tensorboard,
                    wandb=cfg.wandb, progress=cfg.progress, plot=cfg.plot, config=_loggable(cfg)) as logger:
        logger.write(f"model {getattr(model_cfg, 'model_type', '?')} | {cfg.peft} | trainable {n_trainable:,} params | "
                     f"{len(train_set)} samples | {total_steps} steps | {dtype} on {device}"
                     + (f" | resumed from {resumed} at step {state.step}" if resumed else ""))
        hooks = debug.TrainHooks(cfg, out, model_cfg, trainable, dtype, device, world_size=layout.world_size,
                                 is_main=layout.is_main, write=logger.write)  # --profile, --debug-stats, --memory-report
        first_eval = None if resumed else evaluate_loss(model_cfg, state.params, eval_set, cfg, device, dtype, layout)
        if first_eval is not None:
            logger.write(f"eval_loss at start {first_eval:.4f}")
        try:
            while state.step < stop:
                micro = []
                for _ in range(cfg.grad_accum):
                    batch, sampler = next(stream)
                    micro.append(to_device(batch, device))
                t0 = time.perf_counter()
                lr = schedule(state.step)
                state, metrics = hooks.step(step_fn, state, micro)
                resume.check_finite(metrics, state.step, out)
                seconds = time.perf_counter() - t0
                state = state.replace(data_position=sampler.to_dict())
                metrics |= {"lr": lr, "tokens_per_s": metrics["tokens"] / seconds, "seconds": seconds,
                            "peak_memory": peak_memory_bytes(device)}
                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total_steps:
                    metrics["eval_loss"] = evaluate_loss(model_cfg, state.params, eval_set, cfg, device, dtype, layout)
                losses.append(metrics["loss"])
                logger.log(state.step, {k: v for k, v in metrics.items() if k != "nonfinite_grads"})
                hooks.after_step(state, micro)
                if cfg.save_every and (state.step % cfg.save_every == 0 or state.step == stop):
                    resume.save(out, state, trainable, layout, cfg.keep_last)
        except KeyboardInterrupt:
            if cfg.save_on_interrupt:
                path = resume.save(out, state, trainable, layout, cfg.keep_last)
                logger.write(f"interrupted at step {state.step}: saved {path} (resume with --resume latest)")
            raise
        hooks.close()
        eval_loss = evaluate_loss(model_cfg, state.params, eval_set, cfg, device, dtype, layout)
        if eval_loss is not None and logger.history:
            logger.history[-1]["eval_loss"] = eval_loss
            logger.write(f"eval_loss at end {eval_loss:.4f}")
    k = max(1, min(5, len(losses)))
    return {"steps": state.step, "losses": losses, "first_loss": sum(losses[:k]) / k if losses else None,
            "last_loss": sum(losses[-k:]) / k if losses else None, "eval_loss_start": first_eval,
            "eval_loss_end": eval_loss, "peak_memory": peak_memory_bytes(device), "trainable_params": n_trainable,
            "resumed_from": str(resumed) if resumed else None, "state": state}


class _SilentLogger:
    """The logger of the ranks other than the main one: keeps the history, writes nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.history: list[dict] = []

    def __enter__(self) -> _SilentLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def write(self, line: str) -> None:
        return None

    def log(self, step: int, metrics: dict) -> None:
        self.history.append({"step": step, **metrics})


def _loggable(cfg: TrainConfig) -> dict:
    from purefine.configio import to_dict

    return to_dict(cfg)

