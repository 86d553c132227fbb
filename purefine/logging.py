"""Metrics sinks for training runs: stdout, JSONL, TensorBoard, Weights & Biases, a progress bar
and a loss-curve PNG, plus the memory and throughput readings they report.

- ``peak_memory_bytes()``: peak resident memory of this process (CPU) or peak CUDA allocation.
- ``MetricsLogger``: ``log(step, metrics)`` appends a JSON line per step, prints a line every
  ``every`` steps, feeds TensorBoard / W&B when asked (and installed), advances a progress bar
  (tqdm when installed); ``close()`` writes ``loss.png`` when matplotlib is installed.

Optional packages are imported only when asked for; asking for one that is missing is an error
that says which extra to install.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from purefine.errors import ConfigError


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory so far: CUDA max allocated on a GPU, else the process's peak resident set (VmHWM)."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# "reuse": allocations below this come from the heap and freed ones stay there for the next step
REUSE_THRESHOLD = 1 << 30


def _libc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def resolve_allocator(policy: str, *, full: bool) -> str:
    """``auto`` -> ``reuse`` for full fine-tuning (``full``), else ``fast``; any other policy as given.

    Only full fine-tuning allocates (vocab x hidden) tensors every step (the embedding and output-head
    gradients, their casts): above glibc's 32 MiB dynamic mmap maximum for any real vocabulary, so
    under glibc's defaults each is fresh zeroed pages every step. A PEFT step's temporaries stay below
    it, and ``reuse`` measured no faster there (docs/performance.md)."""
    if policy == "auto":
        return "reuse" if full else "fast"
    return policy


def set_allocator(policy: str) -> bool:
    """Apply a CPU memory policy (glibc ``mallopt``; False where glibc is absent or refuses):

    - ``fast``: glibc's defaults, as the peers run: allocations above a dynamic threshold (at most
      32 MiB) are mapped fresh from the OS each time and returned when freed.
    - ``reuse``: every allocation below 1 GiB comes from the heap and stays there when freed (mmap and
      trim thresholds at 1 GiB), so a step's large temporaries (a full fine-tune's 32k-vocab output-head
      and embedding gradients and casts, 50-100 MB each) reuse the last step's pages instead of
      faulting in fresh zeroed ones: ~0.6 fewer page faults per byte allocated, at the cost of memory
      the process keeps.
    - ``lean``: ``limit_heap_fragmentation``: from 1 MiB up every allocation is mapped and unmapped.
    """
    if policy == "lean":
        return limit_heap_fragmentation()
    if policy == "reuse":
        libc = _libc()
        try:
            return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, REUSE_THRESHOLD)
                        and libc.mallopt(_M_TRIM_THRESHOLD, REUSE_THRESHOLD))
        except AttributeError:
            return False
    return True


def limit_heap_fragmentation(mmap_threshold: int = 1 << 20) -> bool:
    """Serve allocations above ``mmap_threshold`` bytes with mmap (glibc ``mallopt``), so freed
    activations go back to the OS instead of fragmenting the heap.

    With glibc's default dynamic threshold (up to 32 MiB) a LoRA step on a 134M model peaked ~0.8 GiB
    higher in resident memory than its live tensors needed. Returns False where glibc is absent.
    """
    libc = _libc()
    try:
        return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
    except AttributeError:
        return False


def format_bytes(n: float) -> str:
    """1536 -> '1.5KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1024
    return str(n)


# Task metrics printed on the stdout line when a step reports them (metrics.jsonl keeps every metric).
TASK_METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
                "logps/rejected", "kl")


def format_metrics(step: int, total: int | None, metrics: dict[str, Any]) -> str:
    """One stdout line: ``step 10/100 | loss 2.3456 | lr 3.0e-04 | grad_norm 0.91 | tok/s 1234 | mem 1.2GiB``,
    then the ``TASK_METRICS`` a step reports (``rewards/accuracies 0.875 | ... | eval_rewards/accuracies 0.933``)."""
    parts = [f"step {step}" + (f"/{total}" if total else "")]
    for key, fmt in (("loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"),
                     ("tokens_per_s", "{:.0f}")):
        if key in metrics and metrics[key] is not None:
            parts.append(f"{key.replace('tokens_per_s', 'tok/s')} {fmt.format(metrics[key])}")
    if "peak_memory" in metrics:
        parts.append(f"mem {format_bytes(metrics['peak_memory'])}")
    for key in TASK_METRICS:  # a task's own metrics (TRL's preference names, distillation's KL), held-out ones too
        for name in (key, f"eval_{key}"):
            if isinstance(metrics.get(name), (int, float)):
                parts.append(f"{name} {metrics[name]:.3f}")
    return " | ".join(parts)


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{module} is not installed: pip install 'purefine[{extra}]' (or pip install {module})") from None


class MetricsLogger:
    """Fan metrics out to the sinks a run asked for. Use as a context manager or call ``close``."""

    def __init__(self, output_dir: str | Path, *, every: int = 10, total_steps: int | None = None,
                 tensorboard: bool = False, wandb: bool = False, wandb_project: str = "purefine",
                 progress: bool = True, plot: bool = True, config: dict | None = None, quiet: bool = False,
                 resume_step: int | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.every, self.total, self.plot, self.quiet = max(1, every), total_steps, plot, quiet
        self.history = self._resumed_history(resume_step)
        self.jsonl = open(self.dir / "metrics.jsonl", "w", buffering=1)
        for row in self.history:
            self.jsonl.write(json.dumps(row) + "\n")
        self.tb = _require("torch.utils.tensorboard", "logging").SummaryWriter(str(self.dir / "tensorboard")) if tensorboard else None
        self.wandb = None
        if wandb:
            wb = _require("wandb", "logging")
            self.wandb = wb.init(project=wandb_project, dir=str(self.dir), config=config or {})
        self.bar = self._progress_bar() if progress and not quiet else None
        self.started = time.perf_counter()

    def _resumed_history(self, resume_step: int | None) -> list[dict[str, Any]]:
        """The rows of an earlier metrics.jsonl up to ``resume_step`` (a resumed run continues the file
        from its checkpoint; the steps logged after it are logged again); [] for a fresh run."""
        path = self.dir / "metrics.jsonl"
        if resume_step is None or not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= resume_step:
                rows.append(row)
        return rows

    def _progress_bar(self) -> Any:
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        if not sys.stderr.isatty():
            return None  # a log file gets the periodic metric lines, not a redrawn bar
        return tqdm(total=self.total, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` for ``step`` in every sink (stdout every ``every`` steps and at the end)."""
        row = {"step": step, "time": round(time.perf_counter() - self.started, 3), **metrics}
        self.history.append(row)
        self.jsonl.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.bar is not None:
            self.bar.update(1)
            if "loss" in metrics:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if not self.quiet and (step % self.every == 0 or step == self.total or step == 1):
            self.write(format_metrics(step, self.total, metrics))

    def write(self, line: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def plot_loss(self) -> Path | None:
        """Write loss.png (train loss, and eval loss when logged); None without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        train = [(r["step"], r["loss"]) for r in self.history if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.history if "eval_loss" in r]
        if not train:
            return None
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        path = self.dir / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self, *, interrupted: bool = False) -> None:
        """Flush and close every sink; plot the loss curve (not on Ctrl-C: exit promptly)."""
        if self.bar is not None:
            self.bar.close()
        if self.plot and not interrupted:
            self.plot_loss()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(interrupted=exc_type is not None and issubclass(exc_type, KeyboardInterrupt))
