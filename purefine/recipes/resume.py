"""Resumable runs for the train recipe: where checkpoints go, resuming, periodic and final saves,
and the NaN guard's message.

Checkpoints live in ``<output-dir>/checkpoints/step-<N>/`` (see ``purefine.checkpoint.state``):
trainable leaves, optimizer state, RNG and data position as one ``torch.distributed.checkpoint``
checkpoint, committed atomically. ``--resume latest`` (or a path) rebuilds the run as configured
and loads them — under any parallel layout and process count, since DCP reshards on load — so 10
steps + resume for 10 equals 20 uninterrupted steps. ``--async-save`` writes in the background
(the run goes on; the checkpoint appears when its writes are done).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch.distributed as dist

from purefine.checkpoint import state as state_io
from purefine.config import TrainConfig
from purefine.errors import ConfigError, PurefineError


def checkpoints_dir(out: Path) -> Path:
    """``<output-dir>/checkpoints``."""
    return Path(out) / "checkpoints"


def resume_path(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint ``--resume`` names: ``latest`` in this output directory, or a path."""
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        found = state_io.latest(checkpoints_dir(out))
        if found is None:
            raise ConfigError(f"--resume latest: no complete checkpoint in {checkpoints_dir(out)} "
                              "(save some with --save-every N)")
        return found
    path = Path(cfg.resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {cfg.resume}: checkpoint directory not found")
    return path


def maybe_resume(cfg: TrainConfig, out: Path, state: Any, trainable: Any, layout: Any) -> tuple[Any, Path | None]:
    """(state, checkpoint path) — the state loaded from ``--resume`` (saved under any layout), or
    unchanged without it. Every rank calls it."""
    path = resume_path(cfg, out)
    if path is None:
        return state, None
    return state_io.load(path, state, trainable), path


class Checkpoints:
    """The run's resumable checkpoints: ``save`` (every rank; in the background with
    ``--async-save``), ``wait`` for a background save to be committed, pruning to ``--keep-last``."""

    def __init__(self, cfg: TrainConfig, out: Path, trainable: Any, layout: Any):
        self.root, self.trainable, self.layout = checkpoints_dir(out), trainable, layout
        self.keep_last, self.async_save = cfg.keep_last, cfg.async_save
        self.pending: state_io.PendingSave | None = None
        # DCP coordinates a background save over a gloo group of its own (training keeps the default one)
        self.group = dist.new_group(backend="gloo") if self.async_save and layout.distributed else None

    def save(self, state: Any, *, wait: bool = False) -> Path:
        """Save ``state`` as ``checkpoints/step-<N>`` (``wait``: in the foreground even with
        --async-save, e.g. on Ctrl-C); the previous background save is committed first."""
        self.wait()
        result = state_io.save(self.root, state, self.trainable, extra={"parallel": self.layout.sizes},
                               async_save=self.async_save and not wait, process_group=self.group)
        if isinstance(result, state_io.PendingSave):
            self.pending = result
            return result.final
        self._prune()
        return result

    def wait(self) -> Path | None:
        """Block until a background save is committed (its directory), or None without one."""
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        path = pending.wait()
        self._prune()
        return path

    def _prune(self) -> None:
        if self.layout.is_main:
            state_io.prune(self.root, self.keep_last)


def check_finite(metrics: dict, step: int, out: Path) -> None:
    """Stop on a non-finite loss or gradient norm (unless --nan-policy skip already skipped the step),
    naming the step, the leaves whose gradients are not finite and the last good checkpoint."""
    if metrics.get("skipped") or (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
        return
    leaves = metrics.get("nonfinite_grads") or []
    where = f"; non-finite gradients in {', '.join(leaves[:5])}" if leaves else ""
    last = state_io.latest(checkpoints_dir(out))
    resume = f"; the last good checkpoint is {last} (--resume latest)" if last else "; no checkpoint was saved yet"
    raise PurefineError(f"step {step}: non-finite loss {metrics['loss']} or grad norm {metrics['grad_norm']}{where}"
                        f"{resume}; lower --optim.lr, check the data, or pass --nan-policy skip")
