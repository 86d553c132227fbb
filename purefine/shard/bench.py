"""Throughput of N processes against one: ``bench_parallel`` under torchrun, ``compare`` to launch both.

The global batch is the same in every run (strong scaling): with data parallelism each rank takes
``batch_size / dp`` rows; tensor and pipeline ranks see all of them. tokens/s counts the global
batch's tokens per optimizer step. One process gets all the threads N processes share.

    python -m purefine.shard.bench --nproc 2 --layouts fsdp dp tp pp     # prints JSON
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import torch

LAYOUTS = {
    "fsdp": lambda n: dict(dp_shard=n),
    "dp": lambda n: dict(dp_replicate=n, dp_shard=1),
    "tp": lambda n: dict(dp_shard=1, tp=n),
    "pp": lambda n: dict(dp_shard=1, pp=n),
}


def bench_parallel(preset: str = "llama-tiny", *, mode: str = "lora", layout_name: str = "fsdp",
                   batch_size: int = 8, seq_len: int = 256, steps: int = 5, warmup: int = 2) -> dict:
    """Run under torchrun (or alone): time ``steps`` train steps of ``preset`` under ``layout_name``
    with the global batch (batch_size, seq_len); returns tokens/s and seconds per step."""
    from purefine import lora, models, optim, shard, train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = SimpleNamespace(**{"dp_replicate": 1, "dp_shard": -1, "tp": 1, "pp": 1, "microbatches": 0,
                                  **(LAYOUTS[layout_name](world) if world > 1 else {})})
    layout = shard.layout(parallel, "cpu")
    cfg = models.preset(preset)
    params, trainable = models.init(cfg, seed=0), train.all_floating
    if mode == "lora":
        params, trainable = lora.apply(params, rank=8, alpha=16, where=["q_proj", "v_proj"], seed=0), lora.trainable
    opt = optim.adamw(1e-4)
    step = layout.make_step(cfg, opt, trainable=trainable)
    state = train.init(layout.shard_params(cfg, params), opt, trainable=trainable, copy=False)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen)
    rows = batch_size // layout.dp_size
    mine = tokens[layout.dp_rank * rows:(layout.dp_rank + 1) * rows]
    batch = {"tokens": mine, "labels": torch.roll(mine, -1, 1)}
    for _ in range(warmup):
        state, _ = step(state, batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    seconds = (time.perf_counter() - t0) / steps
    return {"preset": preset, "mode": mode, "layout": layout_name if world > 1 else "single", "processes": world,
            "threads_per_process": torch.get_num_threads(), "batch": [batch_size, seq_len],
            "seconds_per_step": round(seconds, 4), "tokens_per_s": round(batch_size * seq_len / seconds, 1),
            "loss": round(metrics["loss"], 4)}


def _launch(nproc: int, threads: int, args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "purefine.shard.bench", "--worker", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1], "processes": nproc}
    return json.loads(lines[-1])


@dataclass(frozen=True)
class BenchArgs:
    """Tokens/s of N processes (gloo on CPU) against one process with all the threads."""

    nproc: int = 2
    """Processes of the parallel runs."""
    layouts: tuple[Literal["fsdp", "dp", "tp", "pp"], ...] = ("fsdp", "dp", "tp", "pp")
    """Layouts to time."""
    preset: str = "llama-tiny"
    """Model preset."""
    mode: Literal["lora", "full"] = "lora"
    """LoRA on q/v, or full fine-tuning."""
    batch_size: int = 8
    """Global batch rows."""
    seq_len: int = 256
    """Tokens per row."""
    steps: int = 5
    """Timed steps (after 2 warm-up steps)."""
    worker: bool = False
    """Internal: run one timing under torchrun and print it (rank 0)."""
    layout: str = "fsdp"
    """Internal: the layout of a --worker run."""


def compare(args: BenchArgs) -> dict:
    """One process with one thread and with ``nproc`` threads, then each layout on ``nproc``
    processes of one thread."""
    common = ["--preset", args.preset, "--mode", args.mode, "--batch-size", str(args.batch_size),
              "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    results = [_launch(1, 1, common), _launch(1, args.nproc, common)]
    results += [_launch(args.nproc, 1, [*common, "--layout", name]) for name in args.layouts]
    return {"note": "shared, noisy machine: compare runs taken together, repeat before concluding",
            "cpu_count": os.cpu_count(), "runs": results}


def main() -> None:
    """``python -m purefine.shard.bench``: print ``compare``'s JSON (or, with --worker, one timing)."""
    import tyro

    args = tyro.cli(BenchArgs)
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        result = bench_parallel(args.preset, mode=args.mode, layout_name=args.layout, batch_size=args.batch_size,
                                seq_len=args.seq_len, steps=args.steps)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return
    print(json.dumps(compare(args), indent=2))


if __name__ == "__main__":
    main()
