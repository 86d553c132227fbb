"""Where a train step's peak memory goes: weights, adapters, optimizer state, and the activations
saved for backward, gradients and temporaries live at the peak.

``memory_breakdown(step, state, batch)`` runs one step under a ``TorchDispatchMode`` that follows
storages as ops create and free them, telling backward kernels apart with
``torch._C._current_graph_task_id`` (private corners of torch, kept to this module). The peak is
measured independently: CUDA's allocator on a GPU, glibc's heap (``mallinfo2``) on a CPU.
``format_memory`` prints the report.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from purefine import lora, train, tree

DYNAMIC = ("activations", "gradients", "temporaries")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _heap_reader() -> Callable[[], int] | None:
    """Bytes in use on the C heap (glibc ``mallinfo2``: arena + mmapped blocks), or None elsewhere."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2

    def read() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return read


class _StorageTracker(TorchDispatchMode):
    """Bytes of the tensor storages ops create under it, by category, with the split at the peak.

    A storage made by a backward kernel counts as ``gradients``, any other as ``temporaries`` until the
    autograd graph saves it (``saved``), when it becomes ``activations``; freeing it (a weakref on
    the storage) takes it off. ``heap`` (optional) is sampled after every op: an independent peak.
    """

    def __init__(self, heap: Callable[[], int] | None = None):
        super().__init__()
        self.live = dict.fromkeys(DYNAMIC, 0)
        self.at_peak = dict(self.live)
        self.peak = 0
        self.storages: dict[int, list] = {}  # key -> [category, nbytes, weakref]
        self.heap = heap
        self.heap_start = heap() if heap else 0
        self.heap_peak = self.heap_start

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if type(t) is torch.Tensor}
        for t in tree_leaves(out):  # a view or an in-place result shares an input's storage: nothing new
            if type(t) is torch.Tensor and t.untyped_storage()._cdata not in inputs:  # DTensors hold no storage
                self._track(t)
        if self.heap is not None:
            self.heap_peak = max(self.heap_peak, self.heap())
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.storages:
            return
        in_backward = torch._C._current_graph_task_id() != -1
        # backward kernels run without grad mode; a checkpoint's recomputation runs with it
        category = "gradients" if in_backward and not torch.is_grad_enabled() else "temporaries"
        entry = [category, storage.nbytes(), None]
        entry[2] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.storages[key] = entry
        self.live[category] += entry[1]
        total = sum(self.live.values())
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.live)

    def _free(self, key: int) -> None:
        entry = self.storages.pop(key, None)
        if entry is not None:
            self.live[entry[0]] -= entry[1]

    def saved(self, t: torch.Tensor) -> torch.Tensor:
        """The ``saved_tensors_hooks`` pack hook: a saved temporary becomes an activation."""
        entry = self.storages.get(t.untyped_storage()._cdata) if type(t) is torch.Tensor else None
        if entry is not None and entry[0] == "temporaries":
            self.live["temporaries"] -= entry[1]
            self.live["activations"] += entry[1]
            entry[0] = "activations"
        return t


@dataclass(frozen=True)
class MemoryReport:
    """Peak memory of a train step in bytes, by part, and the independently measured peak.

    ``weights``: every model tensor but the adapters (NF4 codes and scales as stored);
    ``adapters``: LoRA A, B (and DoRA magnitudes); ``optimizer_state``: moments and step counts;
    ``activations``: tensors saved for backward, ``gradients``: tensors made in backward, and
    ``temporaries``: everything else made during the step (logits chunks, casts, recomputation,
    optimizer scratch), each as live at the step's peak. ``measured_peak``: CUDA's
    ``max_memory_allocated``, or the trees plus the C heap's growth (``method`` says which).
    """

    weights: int
    adapters: int
    optimizer_state: int
    activations: int
    gradients: int
    temporaries: int
    measured_peak: int
    method: str

    @property
    def parts(self) -> dict[str, int]:
        """{part name: bytes}, in the table's order."""
        names = ("weights", "adapters", "optimizer_state", "activations", "gradients", "temporaries")
        return {n: getattr(self, n) for n in names}

    @property
    def total(self) -> int:
        """The sum of the parts (compare with ``measured_peak``)."""
        return sum(self.parts.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (parts, total, measured peak, method)."""
        return dataclasses.asdict(self) | {"total": self.total}


def _static_parts(state: train.TrainState) -> dict[str, int]:
    """Bytes of the trees that exist before the step, each storage counted once."""
    seen: set[int] = set()
    parts = {"weights": 0, "adapters": 0, "optimizer_state": 0}
    trees = (("params", state.params), ("optimizer_state", state.opt_state))
    for name, t in trees:
        for path, x in tree.flatten(t).items():
            if not isinstance(x, torch.Tensor) or x.untyped_storage()._cdata in seen:
                continue
            seen.add(x.untyped_storage()._cdata)
            part = name if name == "optimizer_state" else "adapters" if lora.trainable(path, x) else "weights"
            parts[part] += x.untyped_storage().nbytes()
    return parts


def memory_breakdown(step: Callable[[Any, Any], tuple[Any, dict]], state: train.TrainState, batch: Any, *,
                     device: torch.device | str | None = None) -> tuple[train.TrainState, dict, MemoryReport]:
    """Run ``step(state, batch)`` once, measuring; returns (the new state, the step's metrics, the report).

    ``batch``: what ``step`` takes (a dict of ``tokens`` (B, T), ``labels`` (B, T), ... or a list of
    micro-batches). One process only (a DTensor's storages are its local shards, not counted).
    The step runs about 3x slower while measured on a CPU (every op passes through Python).
    """
    static = _static_parts(state)
    cuda = device is not None and torch.device(device).type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tracker = _StorageTracker(None if cuda else _heap_reader())
    with tracker, torch.autograd.graph.saved_tensors_hooks(tracker.saved, lambda t: t):
        state, metrics = step(state, batch)
    if cuda:
        torch.cuda.synchronize(device)
        measured, method = int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    elif tracker.heap is not None:
        measured, method = sum(static.values()) + tracker.heap_peak - tracker.heap_start, "trees + C heap growth"
    else:
        measured, method = sum(static.values()) + tracker.peak, "trees + storage accounting"
    return state, metrics, MemoryReport(**static, **tracker.at_peak, measured_peak=measured, method=method)


def format_memory(report: MemoryReport) -> str:
    """The report as a table: each part in MiB and as a share of the measured peak."""
    from purefine.logging import format_bytes

    peak = max(report.measured_peak, 1)
    rows = [f"memory at the step's peak: {format_bytes(report.measured_peak)} measured ({report.method})"]
    for name, n in report.parts.items():
        rows.append(f"  {name.replace('_', ' '):<16} {format_bytes(n):>10} {100 * n / peak:6.1f}%")
    rows.append(f"  {'sum of parts':<16} {format_bytes(report.total):>10} {100 * report.total / peak:6.1f}%")
    return "\n".join(rows)
