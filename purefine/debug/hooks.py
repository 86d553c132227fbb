"""What the train loop calls for ``--profile``, ``--debug-stats N`` and ``--memory-report``.

- ``StepProfiler(out_dir)``: ``torch.profiler`` over a few steps (one warm-up step, then three),
  written as a Chrome trace (``profile/trace.json``, open in chrome://tracing or Perfetto) with a
  table of the top operators printed and saved (``profile/top_ops.txt``).
- ``TrainHooks``: the three flags around each step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from purefine import fsutil, train
from purefine.debug.memory import format_memory, memory_breakdown
from purefine.debug.stats import format_layer_stats, layer_stats
from purefine.errors import ConfigError

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
