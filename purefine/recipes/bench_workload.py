"""What a benchmark case is, and the parts every library's side of it shares.

- ``Workload``: a case name ``preset/mode/dtype[/remat]`` parsed (``llama-134m/lora/bf16``): mode
  ``full``, ``lora`` or ``qlora`` (NF4 base), dtype ``fp32`` or ``bf16`` (the matmuls' dtype), and the
  batch shape of the preset (``SHAPES``).
- The recipe every side runs (``RECIPE``): LoRA r=8 alpha=16 on q_proj, v_proj, no dropout; AdamW lr
  3e-4, weight decay 0.01 on every trainable tensor, no clipping, no warm-up, loss on every position
  that has a next token, no packing.
- ``batches(workload, vocab_size, n)``: n fixed, seeded batches of random tokens, identical for every
  side: ``tokens`` (B, T) and ``labels`` (B, T) = tokens shifted left, the last position ignored
  (what a causal LM's ``labels=tokens`` trains on).
- ``Fixture``: where the shared checkpoint lies: the base weights (an HF directory) and the initial
  LoRA adapter (a PEFT directory), so every side starts from the same weights.
- ``run_steps(step, batches, warmup)``: the timing loop every side uses, and ``child_result`` the
  record a child process prints. ``Unavailable``: a side that cannot run here says why (reported
  as n/a, never as a failure).

This module stays light (torch and purefine's bottom layers only): every side's child imports it, and
its peak memory is part of what is measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from purefine.errors import ConfigError
from purefine.ops import IGNORE_INDEX

SHAPES = {"llama-tiny": (8, 256), "llama-134m": (4, 512), "llama3.2-1b": (4, 1024)}  # (batch, sequence length)
DEFAULT_SHAPE = (4, 512)
MODES = ("full", "lora", "qlora")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FLAGS = ("remat",)
RECIPE = {"lora_rank": 8, "lora_alpha": 16, "lora_targets": ("q_proj", "v_proj"), "lora_dropout": 0.0, "lr": 3e-4,
          "weight_decay": 0.01, "clip_norm": None, "warmup_steps": 0, "packing": False, "loss_on": "all tokens"}
BATCH_SEED = 1234
ERR_CASE = "--cases {!r}: expected preset/mode/dtype[/remat] with mode in {} and dtype in {} (e.g. llama-134m/lora/bf16)"


class Unavailable(Exception):
    """A side that cannot run this case on this machine (a library or kernel missing); the message says why."""


@dataclass(frozen=True)
class Workload:
    """One benchmark case: ``preset`` (a purefine preset name), ``mode``, ``dtype_name``, ``remat``, and
    the batch shape (``batch_size``, ``seq_len``)."""

    case: str
    preset: str
    mode: str
    dtype_name: str
    remat: bool
    batch_size: int
    seq_len: int

    @property
    def dtype(self) -> torch.dtype:
        """The matmuls' dtype (fp32 or bf16)."""
        return DTYPES[self.dtype_name]

    @property
    def adapters(self) -> bool:
        """Whether the base is frozen and LoRA adapters train (lora, qlora)."""
        return self.mode != "full"

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The dtype the weights are stored in: the compute dtype for a frozen base, fp32 masters for full."""
        return self.dtype if self.adapters else torch.float32


def parse(case: str) -> Workload:
    """``"llama-134m/lora/bf16[/remat]"`` -> a Workload; anything else is a ConfigError naming --cases."""
    parts = case.split("/")
    if len(parts) < 3 or parts[1] not in MODES or parts[2] not in DTYPES or any(f not in FLAGS for f in parts[3:]):
        raise ConfigError(ERR_CASE.format(case, "|".join(MODES), "|".join(DTYPES)))
    batch_size, seq_len = SHAPES.get(parts[0], DEFAULT_SHAPE)
    return Workload(case, parts[0], parts[1], parts[2], "remat" in parts[3:], batch_size, seq_len)


def batches(workload: Workload, vocab_size: int, n: int, device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """``n`` fixed batches on ``device``: ``tokens`` (B, T) uniform random ids (seeded per batch index, drawn
    on CPU so every device gets the same ids) and ``labels`` (B, T), the next token at each position and
    IGNORE_INDEX at the last."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(BATCH_SEED + i)
        tokens = torch.randint(0, vocab_size, (workload.batch_size, workload.seq_len), generator=g)
        labels = torch.full_like(tokens, IGNORE_INDEX)
        labels[:, :-1] = tokens[:, 1:]
        out.append({"tokens": tokens.to(device), "labels": labels.to(device)})
    return out


@dataclass(frozen=True)
class Fixture:
    """The checkpoint every side loads: ``base`` (an HF model directory, fp32 safetensors) and ``adapter``
    (a PEFT LoRA directory with the initial A and B of RECIPE's targets)."""

    base: Path
    adapter: Path

    def to_dict(self) -> dict[str, str]:
        """{"base": path, "adapter": path} (for the child's command line)."""
        return {"base": str(self.base), "adapter": str(self.adapter)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fixture:
        """The fixture named by ``d["base"]`` and ``d["adapter"]``."""
        return cls(Path(d["base"]), Path(d["adapter"]))


def run_steps(step: Callable[[dict[str, torch.Tensor]], float], data: list[dict[str, torch.Tensor]],
              warmup: int, device: torch.device | str = "cpu") -> tuple[list[float], list[float]]:
    """Run ``step`` once per batch of ``data``; returns (the loss of every step, the seconds of each step
    after the first ``warmup``). ``step`` returns the loss as a float; on CUDA the clock also waits for
    the kernels the step queued after its loss (the optimizer update)."""
    from purefine.hardware import synchronize

    losses, seconds = [], []
    synchronize(device)
    for i, batch in enumerate(data):
        t0 = time.perf_counter()
        losses.append(float(step(batch)))
        synchronize(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - t0)
    return losses, seconds


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS), 0 where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a weight holds: its storage, or for a tensor subclass (torchao's NF4Tensor) its inner tensors'."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def child_result(library: str, losses: list[float], seconds: list[float], *, weights_bytes: int,
                 setup_rss_bytes: int) -> dict[str, Any]:
    """The record a child prints: its library (name and version), every step's loss, the timed steps'
    seconds, the weights' bytes, the resident memory after setup, the peak resident memory (VmHWM)
    and the thread count; where CUDA was used, ``peak_device_bytes`` (``torch.cuda.max_memory_allocated``)."""
    from purefine.logging import peak_memory_bytes

    out = {"library": library, "losses": losses, "step_seconds": [round(s, 5) for s in seconds],
           "weights_bytes": weights_bytes, "setup_rss_bytes": setup_rss_bytes,
           "peak_rss_bytes": peak_memory_bytes(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_device_bytes"] = peak_memory_bytes("cuda")
    return out
