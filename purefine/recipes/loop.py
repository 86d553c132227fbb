"""The one training loop every task runs: step, accumulate, log, evaluate, save, resume, guard.

    summary = run(cfg, task, layout, state, step_fn, schedule, total_steps, out, ...)

- Steps until ``total_steps`` (or ``--stop-after`` steps of this invocation), ``--grad-accum``
  micro-batches per step, from the task's stream at this data-parallel rank.
- Logs every step on the main rank (stdout every ``--log-every``, metrics.jsonl, TensorBoard /
  W&B, the progress bar, loss.png); ``--profile``, ``--debug-stats`` and ``--memory-report`` hooks.
- Evaluates the held-out set at the start, every ``--eval-every`` steps and at the end: the mean
  loss and the task's own metrics (``eval_accuracy``, ...), over the first ``--eval-batches`` global
  batches split across the data-parallel ranks.
- Saves resumable checkpoints every ``--save-every`` steps (and on Ctrl-C with
  ``--save-on-interrupt``); ``--resume`` continues the same step, RNG and data position.
- Stops on a non-finite loss or gradient (naming the step, leaves and last good checkpoint) unless
  ``--nan-policy skip``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from purefine import data, debug, train
from purefine.config import TrainConfig
from purefine.configio import to_dict
from purefine.logging import MetricsLogger, peak_memory_bytes
from purefine.recipes import resume
from purefine.recipes.setup import to_device
from purefine.recipes.tasks.base import Task


def count_steps(cfg: TrainConfig, task: Task, world_size: int) -> tuple[int, str]:
    """(optimizer steps of the run, what decided them): --max-steps, else --epochs (default one)
    passes over the training data."""
    if cfg.max_steps is not None:
        return cfg.max_steps, "--max-steps"
    epochs = cfg.epochs or 1
    state, n = data.SamplerState(seed=cfg.seed), 0
    while True:
        rows, state = data.plan_rows(task.train_set.lengths, state, rows=cfg.batch_size * world_size,
                                     seq_len=cfg.max_seq_len, packing=task.packing, shuffle=cfg.data.shuffle, loop=False)
        if not rows:
            break
        n += 1
    return max(1, -(-n * epochs // cfg.grad_accum)), f"{epochs} epoch{'s' * (epochs != 1)}"


def batch_tokens(batch: Any) -> int:
    """Positions the model computes on in a batch (B x T per ``tokens`` tensor; preference pairs count both)."""
    if isinstance(batch, dict) and "tokens" not in batch:
        return sum(batch_tokens(v) for v in batch.values() if isinstance(v, dict))
    return int(batch["tokens"].numel())


def evaluate(task: Task, loss_fn: Any, params: Any, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
             layout: Any) -> dict[str, float] | None:
    """{"loss": mean, metric: mean, ...} over the first ``--eval-batches`` global held-out batches,
    each data-parallel rank taking its rows and the sums added over ranks; None without held-out
    data. With several held-out sets (``task.eval_set`` a mapping, e.g. one per mixed source) the
    overall means come with ``"<metric>/<name>"`` per set."""
    if task.eval_set is None or cfg.eval_batches == 0:
        return None
    sets = task.eval_set if isinstance(task.eval_set, Mapping) else {"": task.eval_set}
    compute = train.cast_params(params, dtype)  # also wraps frozen bf16-stored weights under fp32 compute
    results, overall = {}, {}
    for name, dataset in sets.items():
        sums = _eval_sums(task, dataset, loss_fn, compute, cfg, device, layout)
        overall = {k: overall.get(k, 0.0) + v for k, v in sums.items()}
        if name and sums["count"]:
            results |= {f"{k}/{name}": v / sums["count"] for k, v in sums.items() if k != "count"}
    if not overall.get("count"):
        return None
    return {k: v / overall["count"] for k, v in overall.items() if k != "count"} | results


def _eval_sums(task: Task, dataset: Any, loss_fn: Any, params: Any, cfg: TrainConfig, device: torch.device,
               layout: Any) -> dict[str, float]:
    """{"loss": sum, "count": n, metric: sum} of one held-out set over every data-parallel rank."""
    sums: dict[str, float] = {"loss": 0.0, "count": 0.0}
    stream = task.stream(dataset, data.SamplerState(seed=cfg.seed), shuffle=False, loop=False,
                         rank=layout.dp_rank, world_size=layout.dp_size)
    with torch.no_grad():
        for i, (batch, _) in enumerate(stream):
            if i == cfg.eval_batches:
                break
            out = loss_fn(params, to_device(batch, device))
            sums["loss"] += float(out[0])
            sums["count"] += float(out[1])
            for k, v in (out[2] if len(out) > 2 else {}).items():
                sums[k] = sums.get(k, 0.0) + float(v)
    names = sorted(sums)
    total = layout.sum_over_dp(torch.tensor([sums[k] for k in names], dtype=torch.float64))
    return dict(zip(names, total.tolist()))


def _eval_line(when: str, result: dict[str, float] | None) -> str | None:
    if result is None:
        return None
    return " | ".join(f"eval_{k} {when} {v:.4f}" if k == "loss" else f"eval_{k} {v:.3f}" for k, v in result.items())


def trained_tokens(batch: Any) -> int:
    """Positions that carry a label in a batch (every (B, T) ``labels`` tensor, pairs included)."""
    if isinstance(batch, dict) and "labels" not in batch:
        return sum(trained_tokens(v) for v in batch.values() if isinstance(v, dict))
    labels = batch.get("labels")
    return int((labels != -100).sum()) if labels is not None and labels.dim() == 2 else 0


@dataclass
class Run:
    """What one run's loop holds besides its state: the task, the step, the sinks, the running totals."""

    cfg: TrainConfig
    task: Task
    layout: Any
    step_fn: Any
    schedule: Any
    total_steps: int
    device: torch.device
    dtype: torch.dtype
    logger: Any
    hooks: Any
    checkpoints: Any
    eval_loss: Any
    out: Path
    losses: list[float] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=lambda: {"tokens": 0, "trained": 0, "seconds": 0.0})

    def evaluate(self, params: Any) -> dict[str, float] | None:
        return evaluate(self.task, self.eval_loss, params, self.cfg, self.device, self.dtype, self.layout)

    def step(self, state: train.TrainState, stream: Any) -> train.TrainState:
        """One optimizer step over --grad-accum micro-batches: logged, evaluated and saved as asked."""
        cfg, micro, sampler = self.cfg, [], None
        for _ in range(cfg.grad_accum):
            batch, sampler = next(stream)
            micro.append(to_device(batch, self.device))
        t0, lr = time.perf_counter(), self.schedule(state.step)
        state, metrics = self.hooks.step(self.step_fn, state, micro)
        resume.check_finite(metrics, state.step, self.out)
        seconds = time.perf_counter() - t0
        state = state.replace(data_position=sampler.to_dict())
        tokens, trained = sum(map(batch_tokens, micro)), sum(map(trained_tokens, micro))
        self.totals = {"tokens": self.totals["tokens"] + tokens, "trained": self.totals["trained"] + trained,
                       "seconds": self.totals["seconds"] + seconds}
        metrics |= {"lr": lr, "tokens": tokens, "tokens_per_s": tokens / seconds, "trained_tokens_per_s": trained / seconds,
                    "seconds": seconds, "peak_memory": peak_memory_bytes(self.device)}
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < self.total_steps:
            metrics |= {f"eval_{k}": v for k, v in (self.evaluate(state.params) or {}).items()}
        if cfg.compile and not self.losses:
            self.logger.write(f"compile: the first step took {seconds:.1f} s (tracing and compiling the loss; "
                              "later steps reuse it, a new sequence length compiles once more)")
        self.losses.append(metrics["loss"])
        self.logger.log(state.step, {k: v for k, v in metrics.items() if k != "nonfinite_grads"})
        self.hooks.after_step(state, micro)
        return state

    def summary(self, state: train.TrainState, start: dict | None, end: dict | None, resumed: Path | None,
                n_trainable: int) -> dict:
        """summary.json's dict (the final state under ``state``)."""
        losses, k, seconds = self.losses, max(1, min(5, len(self.losses))), max(self.totals["seconds"], 1e-9)
        out = {"task": self.task.name, "steps": state.step, "losses": losses,
               "first_loss": sum(losses[:k]) / k if losses else None, "last_loss": sum(losses[-k:]) / k if losses else None,
               "peak_memory": peak_memory_bytes(self.device), "trainable_params": n_trainable,
               "resumed_from": str(resumed) if resumed else None, "train_seconds": self.totals["seconds"],
               "tokens_per_s": self.totals["tokens"] / seconds, "trained_tokens_per_s": self.totals["trained"] / seconds,
               **self.task.facts}
        for when, result in (("start", start), ("end", end)):
            keys = set(result or {}) | set(end or {}) | {"loss"}
            out |= {f"eval_{k}_{when}": (result or {}).get(k) for k in sorted(keys)}
        return out | {"state": state}


def header(cfg: TrainConfig, task: Task, n_trainable: int, total_steps: int, decided_by: str, dtype: torch.dtype,
           device: torch.device, resumed: Path | None, step: int, why: str = "") -> str:
    """The run's first line: model, method, trainable parameters, data, length and why, dtype and why, device."""
    what = f" ({task.header})" if task.header else ""
    reason = f" ({why})" if why else ""
    return (f"model {task.model_cfg.model_type}{what} | {cfg.peft} | trainable {n_trainable:,} params | "
            f"{data.describe(task.train_set)} | {total_steps} steps ({decided_by}) | {dtype}{reason} on {device}"
            f" | remat {'on' if cfg.remat else 'off'}" + (f" | resumed from {resumed} at step {step}" if resumed else ""))


def run(cfg: TrainConfig, task: Task, layout: Any, state: train.TrainState, step_fn: Any, schedule: Any,
        total_steps: int, out: Path, device: torch.device, dtype: torch.dtype, trainable: Any,
        decided_by: str = "--max-steps", dtype_why: str = "") -> dict:
    """Step to the end (see the module doc); returns the summary, with the final state under ``state``.

    Throughput: ``tokens_per_s`` counts every position the model computes on (B x T of each
    micro-batch, padding included), ``trained_tokens_per_s`` those that carry a label; the
    benchmark (``scripts/bench.py``) counts the same way. Ctrl-C at any point after the first step
    saves a checkpoint with ``--save-on-interrupt`` and exits (the loss curve is not drawn)."""
    state, resumed = resume.maybe_resume(cfg, out, state, trainable, layout)
    sampler = data.SamplerState.from_dict(state.data_position) if resumed else data.SamplerState(seed=cfg.seed)
    stream = task.stream(task.train_set, sampler, shuffle=cfg.data.shuffle, loop=True, rank=layout.dp_rank,
                         world_size=layout.dp_size)
    stop = min(total_steps, state.step + cfg.stop_after) if cfg.stop_after else total_steps
    n_trainable = sum(x.numel() for _, x in train.trainable_leaves(state.params, trainable).items())
    logger_cls = MetricsLogger if layout.is_main else _SilentLogger
    with logger_cls(out, every=cfg.log_every, total_steps=total_steps, tensorboard=cfg.tensorboard,
                    wandb=cfg.wandb, progress=cfg.progress, plot=cfg.plot, config=to_dict(cfg),
                    resume_step=state.step if resumed else None) as logger:
        logger.write(header(cfg, task, n_trainable, total_steps, decided_by, dtype, device, resumed, state.step,
                            dtype_why))
        hooks = debug.TrainHooks(cfg, out, task.model_cfg, trainable, dtype, device, world_size=layout.world_size,
                                 is_main=layout.is_main, write=logger.write)  # --profile, --debug-stats, --memory-report
        r = Run(cfg, task, layout, step_fn, schedule, total_steps, device, dtype, logger, hooks,
                resume.Checkpoints(cfg, out, trainable, layout), layout.loss_fn(task.model_cfg, loss=task.loss), out)
        try:
            start = None if resumed else r.evaluate(state.params)
            if (line := _eval_line("at start", start)) is not None:
                logger.write(line)
            while state.step < stop:
                state = r.step(state, stream)
                if cfg.save_every and (state.step % cfg.save_every == 0 or state.step == stop):
                    r.checkpoints.save(state)
            hooks.close()
            r.checkpoints.wait()  # a background save (--async-save) is committed before the run ends
            end = r.evaluate(state.params)
        except KeyboardInterrupt:
            if cfg.save_on_interrupt and state.step > 0:
                path = r.checkpoints.save(state, wait=True)
                logger.write(f"interrupted at step {state.step}: saved {path} (resume with --resume latest)")
            raise
        if end is not None and logger.history:
            logger.history[-1] |= {f"eval_{k}": v for k, v in end.items()}
        if (line := _eval_line("at end", end)) is not None:
            logger.write(line)
    return r.summary(state, start, end, resumed, n_trainable)


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
