"""Resumable runs for the train recipe: where checkpoints go, resuming, periodic and final saves,
and the NaN guard's message.

Checkpoints live in ``<output-dir>/checkpoints/step-<N>/`` (see ``purefine.checkpoint.state``):
trainable leaves, optimizer state, RNG and data position, each rank its own shards, committed
atomically. ``--resume latest`` (or a path) rebuilds the run as configured and loads them, so 10
steps + resume for 10 equals 20 uninterrupted steps bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from purefine.checkpoint import state as state_io
from purefine.config import TrainConfig
from purefine.errors import ConfigError, PurefineError


def checkpoints_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


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
    """(state, checkpoint path) — the state loaded from ``--resume``, or unchanged without it."""
    path = resume_path(cfg, out)
    if path is None:
        return state, None
    return state_io.load(path, state, trainable, rank=layout.rank, world_size=layout.world_size), path


def save(out: Path, state: Any, trainable: Any, layout: Any, keep_last: int) -> Path:
    """Save a resumable checkpoint of ``state`` (every rank) and prune to the last ``keep_last``."""
    path = state_io.save(checkpoints_dir(out), state, trainable, rank=layout.rank, world_size=layout.world_size,
                         barrier=_barrier if layout.world_size > 1 else None)
    if layout.is_main:
        state_io.prune(checkpoints_dir(out), keep_last)
    return path


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
