"""Resumable training state on disk through ``torch.distributed.checkpoint`` (DCP): crash-safe,
resharded on load, no pickle anywhere.

A checkpoint is a directory ``<root>/step-<N>/`` holding one DCP checkpoint in DCP's safetensors
storage (``HuggingFaceStorageWriter`` / ``Reader``: DCP's default ``FileSystemWriter`` pickles its
``.metadata`` index, and purefine never unpickles a file):

    shard-<rank>-model-*.safetensors   the chunks rank <rank> wrote (its shards of DTensors; a
                                       tensor every rank holds whole is written once), each with
                                       its offsets in the global tensor in the safetensors header
    meta.json            format, step, data position, the writer's world size and parallel sizes,
                         the names saved

What is saved: ``params.<path>`` for each trainable leaf, ``opt.<path>`` for the optimizer state,
``rng`` (the generator state; the same on every rank). Frozen weights are not saved: a resumed run
rebuilds them from the same source (checkpoint or seeded init, quantized the same way).

**Commit.** Every rank writes into ``<root>/.step-<N>.tmp``; rank 0 then writes ``meta.json`` and
renames the directory into place, so a directory named ``step-<N>`` is always whole: a crash or a
full disk mid-save leaves the previous checkpoint as it was. ``latest`` finds the newest complete
one; ``prune`` keeps the last K. With ``async_save`` DCP stages a CPU copy of the state (so the
next steps may change it), writes in a background thread and the commit runs when the writes are
done; ``PendingSave.wait`` blocks until then and raises what went wrong.

**Load reshards.** ``load`` fills a freshly built state of the resuming run — plain tensors on one
process, DTensors of any mesh under torchrun — with ``dcp.load``, which reads each rank's slices
from whatever chunks the writer left: a run saved on N processes (FSDP, data or tensor parallel,
pipeline stages) resumes on M in any other layout. Names and global shapes are checked first.
One process reads and writes the same format (DCP without a process group).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from purefine import fsutil, tree
from purefine.checkpoint.hf import SafetensorsFile
from purefine.errors import CheckpointError

FORMAT = "purefine-train-state/2"
STEP_DIR = re.compile(r"step-(\d+)")
# DCP warns that it runs without a process group on one process (and in its save thread): expected here
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _dcp() -> Any:
    """``torch.distributed.checkpoint``, imported by the first save or load: with
    ``torch.distributed.tensor`` it is ~50 MB of resident memory a run that never saves need not hold."""
    import torch.distributed.checkpoint as dcp

    return dcp


def step_dir(root: str | os.PathLike, step: int) -> Path:
    """``<root>/step-<N>`` (N zero-padded to 8 digits, so names sort by step)."""
    return Path(root) / f"step-{step:08d}"


def state_dict(state: Any, trainable: Callable[[str, Any], bool]) -> dict[str, torch.Tensor]:
    """{name: tensor or DTensor} of what a checkpoint stores (the state's own tensors, not copies)."""
    flat = {f"params.{p}": x for p, x in tree.filtered(state.params, trainable)}
    flat |= {f"opt.{p}": x for p, x in tree.flatten(state.opt_state).items() if isinstance(x, torch.Tensor)}
    flat["rng"] = state.rng
    return flat


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def writer(path: Path) -> Any:
    """The DCP storage writer of a checkpoint directory: safetensors shards, one per rank, each
    holding its chunks' offsets (the index DCP rebuilds on load), fsynced."""
    return _dcp().HuggingFaceStorageWriter(str(path), save_distributed=True)


def reader(path: Path) -> Any:
    """The DCP storage reader of a checkpoint directory (see ``writer``)."""
    return _dcp().HuggingFaceStorageReader(str(path))


class PendingSave:
    """A checkpoint being written in the background (``save(..., async_save=True)``)."""

    def __init__(self, future: Future, final: Path, root: Path):
        self.future, self.final, self.root = future, final, root

    def done(self) -> bool:
        """Whether the writes (and on rank 0 the commit) are over."""
        return self.future.done()

    def wait(self) -> Path:
        """Block until the checkpoint is committed; its directory, or CheckpointError."""
        try:
            self.future.result()
        except (OSError, _dcp().CheckpointException) as e:
            raise _save_error(e, self.root, self.final) from None
        return self.final


def save(root: str | os.PathLike, state: Any, trainable: Callable[[str, Any], bool], *, extra: dict | None = None,
         async_save: bool = False, process_group: Any = None) -> Path | PendingSave:
    """Write ``state`` as ``<root>/step-<N>`` (every rank takes part; rank 0 commits). Returns the
    directory, or with ``async_save`` a PendingSave (``process_group``: the group DCP coordinates
    over in its background thread, e.g. a gloo group of its own). ``extra`` goes into meta.json."""
    root = Path(root)
    final, tmp = step_dir(root, state.step), root / f".{step_dir(root, state.step).name}.tmp"
    meta = {"format": FORMAT, "step": state.step, "data_position": state.data_position,
            "world_size": dist.get_world_size() if _distributed() else 1, **(extra or {})}
    tensors = state_dict(state, trainable)
    dcp = _dcp()
    try:
        _prepare(tmp)
        meta["tensors"] = sorted(_all_names(tensors))
        if not async_save:
            dcp.save(tensors, storage_writer=writer(tmp), process_group=process_group)
            if _rank() == 0:
                _commit(tmp, final, meta)
            _barrier()
            return final
        future = dcp.async_save(tensors, storage_writer=writer(tmp), process_group=process_group)
    except (OSError, dcp.CheckpointException) as e:
        raise _save_error(e, root, final) from None
    committed: Future = Future()
    future.add_done_callback(lambda f: _finish_async(f, committed, tmp, final, meta))
    return PendingSave(committed, final, root)


def _prepare(tmp: Path) -> None:
    """A fresh empty temporary directory (rank 0 makes it, the others wait)."""
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()


def _all_names(tensors: dict[str, Any]) -> set[str]:
    """The names every rank saves (pipeline stages each hold only theirs)."""
    if not _distributed():
        return set(tensors)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(tensors))
    return {name for names in everyone for name in names}


def _commit(tmp: Path, final: Path, meta: dict) -> None:
    """meta.json, then the rename that makes the checkpoint visible (rank 0)."""
    fsutil.atomic_write(tmp / "meta.json", json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_async(future: Future, committed: Future, tmp: Path, final: Path, meta: dict) -> None:
    """The background writes are over: commit on rank 0, then resolve ``committed``."""
    try:
        future.result()
        if _rank() == 0:
            _commit(tmp, final, meta)
        committed.set_result(final)
    except BaseException as e:  # noqa: BLE001 — handed to the waiting thread
        committed.set_exception(e)


def _save_error(e: BaseException, root: Path, final: Path) -> CheckpointError:
    """A CheckpointError naming what failed and which checkpoint is intact (rank 0 removes the temporary)."""
    cause = e
    if isinstance(e, _dcp().CheckpointException) and e.failures:
        cause = next(iter(e.failures.values()))[0]
    if _rank() == 0:
        shutil.rmtree(root / f".{final.name}.tmp", ignore_errors=True)
    previous = latest(root)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    reason = getattr(cause, "strerror", None) or cause
    return CheckpointError(f"saving checkpoint {final.name} to {final} failed ({reason}); {kept}")


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
        older = " (per-rank safetensors of an older purefine: resume with that version)" \
            if meta.get("format") == "purefine-train-state/1" else ""
        raise CheckpointError(f"{meta_path}: expected format {FORMAT!r}, found {meta.get('format')!r}{older}")
    if not isinstance(meta.get("step"), int) or isinstance(meta["step"], bool) or meta["step"] < 0:
        raise CheckpointError(f"{meta_path}: 'step' must be a non-negative integer, found {meta.get('step')!r}")
    world = meta.get("world_size")
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise CheckpointError(f"{meta_path}: 'world_size' must be a positive integer, found {world!r}")
    if meta.get("data_position") is not None and not isinstance(meta["data_position"], dict):
        raise CheckpointError(f"{meta_path}: 'data_position' must be an object or null, found {meta['data_position']!r}")
    return meta


def _check_against(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Each shard a valid safetensors file, then names and global shapes of this run's state against
    the index DCP rebuilds from the shards' headers."""
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no safetensors shards; not a complete checkpoint")
    for shard in shards:
        SafetensorsFile(shard)  # header, offsets and size checked before torch reads it
    try:
        saved = reader(path).read_metadata().state_dict_metadata
    except (OSError, EOFError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint's index from its safetensors headers ({e})") from None
    expected = _all_names(tensors)
    missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
    if missing or extra:
        raise CheckpointError(f"{path}: does not match this run's trainable state (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); was it saved with another --peft or model?")
    for name, like in tensors.items():
        entry = saved[name]
        shape = tuple(entry.size) if isinstance(entry, _dcp().metadata.TensorStorageMetadata) else None
        if shape != tuple(like.shape):
            raise CheckpointError(f"{path}: {name} has shape {list(shape)}, this run expects {list(like.shape)}")
        if entry.properties.dtype != like.dtype:
            raise CheckpointError(f"{path}: {name} is {entry.properties.dtype}, this run expects {like.dtype}")


def load(path: str | os.PathLike, template: Any, trainable: Callable[[str, Any], bool]) -> Any:
    """``template`` (a freshly built TrainState of the resuming run, in any parallel layout) with the
    saved trainable leaves, optimizer state, RNG, step and data position. The template's tensors
    are filled in place (it is consumed). Every rank calls it."""
    path = Path(path)
    meta = read_meta(path)
    tensors = state_dict(template, trainable)
    _check_against(path, tensors)
    tensors["rng"] = template.rng.clone()
    dcp = _dcp()
    try:
        dcp.load(tensors, storage_reader=reader(path))
    except (OSError, dcp.CheckpointException, ValueError, KeyError, RuntimeError) as e:
        cause = next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) and e.failures else e
        raise CheckpointError(f"{path}: reading the checkpoint failed ({cause})") from None
    return template.replace(step=meta["step"], rng=tensors["rng"].to(torch.uint8),
                            data_position=meta.get("data_position"))
