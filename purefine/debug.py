"""Find out why a run misbehaves: per-layer statistics, a memory breakdown, a step profiler.

- ``layer_stats(cfg, params, batch)``: one forward and backward of the next-token loss with, per
  layer, the RMS, max and NaN/inf count of its output activations (B, T, D) and of their gradients,
  and the norm and NaN/inf count of its parameters' gradients. Where a NaN starts, and whether
  gradients vanish or explode with depth. ``format_layer_stats`` prints it as a table.
- ``memory_breakdown(step, state, batch)``: run one train step and split its peak memory into
  weights, adapters, optimizer state (the trees' storages), and the activations saved for
  backward, gradients and temporaries live at the peak (storages created during the step, counted
  as ops create and free them). The peak is measured independently: CUDA's allocator on a GPU,
  glibc's heap (``mallinfo2``) on a CPU. ``format_memory`` prints it.
- ``StepProfiler(out_dir)``: ``torch.profiler`` over a few steps (one warm-up step, then three),
  written as a Chrome trace (``profile/trace.json``, open in chrome://tracing or Perfetto) with a
  table of the top operators printed and saved (``profile/top_ops.txt``).
- ``TrainHooks``: what the train recipe calls for ``--profile``, ``--debug-stats N`` and
  ``--memory-report``.

The memory accounting follows storages through a ``TorchDispatchMode`` and tells backward kernels
apart with ``torch._C._current_graph_task_id``: private corners of torch, kept to this module.

    stats = pf.debug.layer_stats(cfg, params, batch, trainable=pf.lora.trainable)
    print(pf.debug.format_layer_stats(stats))
    state, metrics, report = pf.debug.memory_breakdown(step, state, batch)
    print(pf.debug.format_memory(report))
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import inspect
import json
import math
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from purefine import fsutil, lora, models, ops, train, tree
from purefine.errors import ConfigError

LAYER_PATH = re.compile(r"(?:^|\.)(?:layers|h|layer)\.(\d+)\.")


def _stats(x: torch.Tensor) -> dict[str, float]:
    """x (any shape) -> rms, max_abs over its finite values, and nonfinite (NaN/inf count)."""
    x = x.detach().float()
    finite = torch.isfinite(x)
    values = x[finite]
    n = max(values.numel(), 1)
    return {"rms": float(values.norm() / math.sqrt(n)), "max_abs": float(values.abs().max()) if values.numel() else 0.0,
            "nonfinite": int((~finite).sum())}


def _group(path: str) -> str:
    """The layer index of a param path (``model.layers.3.mlp...`` -> '3'), else its module
    (``model.embed_tokens.weight`` -> 'model.embed_tokens', ``lm_head.weight.lora_a`` -> 'lm_head')."""
    m = LAYER_PATH.search(path)
    return m.group(1) if m else re.sub(r"\.(weight|bias)(\..*)?$", "", path)


def _grad_groups(grads: dict[str, torch.Tensor], leaves: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """{group: grad_norm, grad_nonfinite, param_norm} summed over the group's trainable tensors."""
    out: dict[str, dict[str, float]] = {}
    for path, g in grads.items():
        row = out.setdefault(_group(path), {"grad_norm": 0.0, "grad_nonfinite": 0, "param_norm": 0.0})
        g = g.detach().float()
        row["grad_norm"] += float(g.pow(2).sum())
        row["grad_nonfinite"] += int((~torch.isfinite(g)).sum())
        row["param_norm"] += float(leaves[path].detach().float().pow(2).sum())
    for row in out.values():
        row["grad_norm"], row["param_norm"] = math.sqrt(row["grad_norm"]), math.sqrt(row["param_norm"])
    return out


def layer_stats(cfg: Any, params: Any, batch: dict[str, torch.Tensor], *, trainable: train.Filter = train.all_floating,
                compute_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Per-layer activation and gradient statistics of one forward and backward (params unchanged).

    ``batch``: ``tokens`` (B, T), ``labels`` (B, T) already shifted, optional ``positions`` (B, T)
    and ``segment_ids`` (B, T) or ``mask``, as for ``models.loss_fn``. Gradients are those of the
    mean token loss for the leaves ``trainable`` selects. Returns ``{"loss", "tokens", "layers":
    [{layer, act_rms, act_max_abs, act_nonfinite, act_grad_rms, act_grad_max_abs, act_grad_nonfinite,
    grad_norm, grad_nonfinite, param_norm}], "other": [{name, grad_norm, grad_nonfinite, param_norm}]}``
    (``other``: embeddings, final norm, head). Causal-LM families whose ``hidden_states`` takes ``observe``.
    """
    fam = models.family(cfg)
    if hasattr(fam, "loss_fn") or "observe" not in inspect.signature(fam.hidden_states).parameters:
        raise ConfigError(f"layer_stats: the {cfg.model_type} family has no per-layer hook for a causal LM loss")
    acts: dict[int, dict] = {}
    act_grads: dict[int, dict] = {}

    def observe(i: int, x: torch.Tensor) -> None:
        acts[i] = _stats(x)
        if x.requires_grad:
            x.register_hook(lambda g, i=i: act_grads.__setitem__(i, _stats(g)))

    leaves = {p: x.detach().requires_grad_() for p, x in train.trainable_leaves(params, trainable).items()}
    p = train.cast_params(train.with_leaves(params, leaves), compute_dtype)
    h, _ = fam.hidden_states(cfg, p, batch["tokens"], positions=batch.get("positions"), mask=models.batch_mask(batch),
                             observe=observe)
    loss_sum, n = ops.chunked_cross_entropy(h.reshape(-1, h.shape[-1]), models.output_weight(cfg, p),
                                            batch["labels"].reshape(-1))
    loss = loss_sum / n.clamp(min=1)
    raw = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = {path: torch.zeros_like(x) if g is None else g for (path, x), g in zip(leaves.items(), raw)}
    groups = _grad_groups(grads, leaves)
    empty = {"grad_norm": 0.0, "grad_nonfinite": 0, "param_norm": 0.0}
    layers = [{"layer": i, **{f"act_{k}": v for k, v in acts[i].items()},
               **{f"act_grad_{k}": v for k, v in act_grads.get(i, {"rms": 0.0, "max_abs": 0.0, "nonfinite": 0}).items()},
               **groups.get(str(i), empty)} for i in sorted(acts)]
    other = [{"name": k, **v} for k, v in groups.items() if not k.isdigit()]
    bad = [r["layer"] for r in layers if r["act_nonfinite"]]
    return {"loss": float(loss.detach()), "tokens": int(n), "first_nonfinite_layer": bad[0] if bad else None,
            "layers": layers, "other": other}


def format_layer_stats(stats: dict[str, Any]) -> str:
    """The table of ``layer_stats``: one row per layer, then the other parameter groups."""
    w = max([5, *(len(r["name"]) for r in stats["other"])])
    rows = [f"loss {stats['loss']:.4f} over {stats['tokens']} tokens"
            + (f"; activations first non-finite after layer {stats['first_nonfinite_layer']}"
               if stats["first_nonfinite_layer"] is not None else ""),
            f"{'layer':<{w}} {'act rms':>10} {'act max':>10} {'act nan/inf':>11} {'dL/dact rms':>11} {'grad norm':>10} "
            f"{'grad nan/inf':>12} {'param norm':>10}"]
    for r in stats["layers"]:
        rows.append(f"{r['layer']:<{w}} {r['act_rms']:>10.4g} {r['act_max_abs']:>10.4g} {r['act_nonfinite']:>11} "
                    f"{r['act_grad_rms']:>11.4g} {r['grad_norm']:>10.4g} {r['grad_nonfinite']:>12} {r['param_norm']:>10.4g}")
    for r in stats["other"]:
        rows.append(f"{r['name']:<{w}} {'':>10} {'':>10} {'':>11} {'':>11} {r['grad_norm']:>10.4g} "
                    f"{r['grad_nonfinite']:>12} {r['param_norm']:>10.4g}")
    return "\n".join(rows)


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


class StepProfiler:
    """``torch.profiler`` over steps ``warmup + 1 .. warmup + active`` of a run; call ``step()``
    after each train step and ``close()`` at the end. Writes ``profile/trace.json`` (a Chrome
    trace) and ``profile/top_ops.txt`` under ``out_dir`` and prints the top-ops table."""

    def __init__(self, out_dir: str | Path, *, warmup: int = 1, active: int = 3, rows: int = 15,
                 write: Callable[[str], None] = print, device: torch.device | str | None = None):
        from torch.profiler import ProfilerActivity, profile, schedule

        self.dir, self.rows, self.write, self.done = Path(out_dir) / "profile", rows, write, False
        self.cuda = device is not None and torch.device(device).type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1),
                            on_trace_ready=self._ready, record_shapes=True)
        self.prof.start()

    def step(self) -> None:
        """Mark the end of a train step."""
        if not self.done:
            self.prof.step()

    def _ready(self, prof: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / ".trace.json.tmp"
        prof.export_chrome_trace(str(tmp))
        tmp.replace(self.dir / "trace.json")
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=self.rows)
        fsutil.atomic_write(self.dir / "top_ops.txt", table)
        self.write(f"profile: top {self.rows} ops by {sort.replace('_', ' ')} "
                   f"(trace: {self.dir / 'trace.json'})\n{table}")
        self.done = True

    def close(self) -> None:
        """Stop profiling; a run shorter than warm-up + active steps writes what was recorded."""
        if not self.done:
            self.prof.stop()
        if not self.done:
            self.write("profile: the run ended before any step was traced (it needs more than the warm-up step)")
            self.done = True


class TrainHooks:
    """The train recipe's debugging flags. ``cfg`` gives ``profile``, ``debug_stats`` (every N
    steps: ``layer_stats`` of the step's first micro-batch, printed and appended to
    ``debug_stats.jsonl``) and ``memory_report`` (the first two steps measured, the second, warm one
    printed and written to ``memory.json``: the first also fills kernel caches the measuring path
    needs once). Only the main process reports; ``debug_stats`` and ``memory_report`` need one."""

    def __init__(self, cfg: Any, out_dir: str | Path, model_cfg: Any, trainable: train.Filter, compute_dtype: torch.dtype,
                 device: torch.device, *, world_size: int = 1, is_main: bool = True,
                 write: Callable[[str], None] = print):
        self.every = int(getattr(cfg, "debug_stats", 0) or 0)
        self.measure = 2 if getattr(cfg, "memory_report", False) else 0
        if self.every < 0:
            raise ConfigError(f"--debug-stats: must be >= 0 (0: off), found {self.every}")
        if world_size > 1 and (self.every or self.measure):
            flag = "--debug-stats" if self.every else "--memory-report"
            raise ConfigError(f"{flag}: runs in one process only (found {world_size} processes)")
        self.out, self.model_cfg, self.write = Path(out_dir), model_cfg, write
        self.trainable = trainable or train.all_floating
        self.dtype, self.device = (compute_dtype if compute_dtype != torch.float32 else None), device
        self.profile = bool(getattr(cfg, "profile", False)) and is_main
        self.profiler: StepProfiler | None = None  # started after the measured steps, so they never overlap

    def step(self, step_fn: Callable[[Any, Any], tuple[Any, dict]], state: Any, batch: Any) -> tuple[Any, dict]:
        """``step_fn(state, batch)``, measured when a memory report is due, and marked for the profiler."""
        if self.profile and not self.measure and self.profiler is None:
            self.profiler = StepProfiler(self.out, write=self.write, device=self.device)
        if self.measure:
            self.measure -= 1
            state, metrics, report = memory_breakdown(step_fn, state, batch, device=self.device)
            if not self.measure:
                self.write(f"step {state.step}: {format_memory(report)}")
                fsutil.atomic_write(self.out / "memory.json", json.dumps(report.to_dict(), indent=2))
        else:
            state, metrics = step_fn(state, batch)
        if self.profiler is not None:
            self.profiler.step()
        return state, metrics

    def after_step(self, state: Any, batch: Any) -> None:
        """Layer statistics every ``debug_stats`` steps (on the new params and the step's first micro-batch)."""
        if not self.every or state.step % self.every:
            return
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        stats = layer_stats(self.model_cfg, state.params, first, trainable=self.trainable, compute_dtype=self.dtype)
        self.write(f"layer stats at step {state.step}:\n{format_layer_stats(stats)}")
        with open(self.out / "debug_stats.jsonl", "a") as f:
            f.write(json.dumps({"step": state.step, **stats}) + "\n")

    def close(self) -> None:
        """Finish the profile (if one is running)."""
        if self.profiler is not None:
            self.profiler.close()
