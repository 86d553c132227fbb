"""Resumable training state on disk: crash-safe, safetensors + JSON, no pickle.

A checkpoint is a directory ``<root>/step-<N>/`` holding

    state-<rank>-of-<world>.safetensors   trainable params (``params.<path>``), optimizer state
                                          (``opt.<path>``) and the RNG state (``rng``), this rank's
                                          shards only when they are DTensors
    meta.json                             step, data position, world size, format, the paths saved

It is written into ``<root>/.step-<N>.tmp`` and renamed into place only when every file is
complete (``meta.json`` last), so a directory named ``step-<N>`` is always whole: a crash or a
full disk mid-save leaves the previous checkpoint as it was. ``latest`` finds the newest complete
one; ``prune`` keeps the last K. Frozen weights are not saved: a resumed run rebuilds them from
the same source (checkpoint or seeded init, quantized the same way) and takes the trainable
leaves, optimizer state, RNG and data position from here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from purefine import fsutil, tree
from purefine.checkpoint.hf import SafetensorsFile
from purefine.errors import CheckpointError

FORMAT = "purefine-train-state/1"
STEP_DIR = re.compile(r"step-(\d+)")


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if type(x).__name__ == "DTensor" else x


def state_tensors(state: Any, trainable: Callable[[str, Any], bool]) -> dict[str, torch.Tensor]:
    """{name: tensor} of what a checkpoint stores (local shards of DTensors), contiguous on CPU."""
    flat = {f"params.{p}": x for p, x in tree.filtered(state.params, trainable)}
    flat |= {f"opt.{p}": x for p, x in tree.flatten(state.opt_state).items()}
    flat["rng"] = state.rng
    return {k: _local(v).detach().to("cpu").contiguous() for k, v in flat.items()}


def save(root: str | os.PathLike, state: Any, trainable: Callable[[str, Any], bool], *, rank: int = 0,
         world_size: int = 1, barrier: Callable[[], None] | None = None, extra: dict | None = None) -> Path:
    """Write ``state`` as ``<root>/step-<N>``; every rank writes its shard, rank 0 commits.

    On failure (a full disk, a dead writer) the temporary directory is removed and the error says
    which checkpoint is still intact.
    """
    root = Path(root)
    final = step_dir(root, state.step)
    tmp = root / f".{final.name}.tmp"
    tensors = state_tensors(state, trainable)
    try:
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        if barrier is not None:
            barrier()
        save_file(tensors, tmp / f"state-{rank:05d}-of-{world_size:05d}.safetensors", metadata={"format": FORMAT})
        if barrier is not None:
            barrier()
        if rank == 0:
            meta = {"format": FORMAT, "step": state.step, "data_position": state.data_position,
                    "world_size": world_size, "tensors": sorted(tensors), **(extra or {})}
            fsutil.atomic_write(tmp / "meta.json", json.dumps(meta, indent=2))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
    except OSError as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(root)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"saving checkpoint step {state.step} to {final} failed ({e.strerror or e}); {kept}") from None
    if barrier is not None:
        barrier()
    return final


def complete_steps(root: str | os.PathLike) -> list[Path]:
    """The complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and (p / "meta.json").exists()]
    return [p for _, p in sorted(found)]


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    steps = complete_steps(root)
    return steps[-1] if steps else None


def prune(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` complete checkpoints (and stale temporaries)."""
    root = Path(root)
    removed = complete_steps(root)[:-keep_last] if keep_last > 0 else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".step-*.tmp") if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def read_meta(path: str | os.PathLike) -> dict:
    """meta.json of a checkpoint directory, checked."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise CheckpointError(f"{path}: not a complete training checkpoint (no meta.json)")
    meta = fsutil.read_json_object(meta_path, CheckpointError)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: expected format {FORMAT!r}, found {meta.get('format')!r}")
    if not isinstance(meta.get("step"), int) or isinstance(meta["step"], bool) or meta["step"] < 0:
        raise CheckpointError(f"{meta_path}: 'step' must be a non-negative integer, found {meta.get('step')!r}")
    return meta


def load(path: str | os.PathLike, template: Any, trainable: Callable[[str, Any], bool], *, rank: int = 0,
         world_size: int = 1) -> Any:
    """``template`` (a freshly built TrainState of the same run) with the saved trainable leaves,
    optimizer state, RNG, step and data position. Names, shapes and the world size are checked."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("world_size", 1) != world_size:
        raise CheckpointError(f"{path}: saved by {meta.get('world_size')} processes, resuming with {world_size}; "
                              "resume under the same parallel layout")
    file = SafetensorsFile(path / f"state-{rank:05d}-of-{world_size:05d}.safetensors")
    expected = state_tensors(template, trainable)
    missing, extra = sorted(set(expected) - set(file.keys())), sorted(set(file.keys()) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{file.path}: does not match this run's trainable state (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); was it saved with another --peft or model?")
    loaded = {}
    for name, like in expected.items():
        if file.shape(name) != tuple(like.shape):
            raise CheckpointError(f"{file.path}: {name} has shape {list(file.shape(name))}, this run expects {list(like.shape)}")
        loaded[name] = file.read(name)
    return _restore(template, trainable, loaded, meta)


def _restore(template: Any, trainable: Callable[[str, Any], bool], loaded: dict[str, torch.Tensor], meta: dict) -> Any:
    def fill(like: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        value = value.to(dtype=like.dtype, device=_local(like).device)
        if type(like).__name__ == "DTensor":
            from torch.distributed.tensor import DTensor

            return DTensor.from_local(value, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
        return value

    params = tree.map_with_path(
        lambda p, x: fill(x, loaded[f"params.{p}"]) if f"params.{p}" in loaded and trainable(p, x) else x, template.params)
    opt_state = tree.map_with_path(lambda p, x: fill(x, loaded[f"opt.{p}"]), template.opt_state)
    return template.replace(step=meta["step"], params=params, opt_state=opt_state, rng=loaded["rng"].to(torch.uint8),
                            data_position=meta.get("data_position"))
