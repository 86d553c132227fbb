"""Benchmarks: tokens/s, MFU against a matmul peak measured on the spot, and peak memory.

Each case runs in a fresh subprocess so its peak resident memory is its own. Printed as JSON:

    python scripts/bench.py                       # train steps: tiny and ~134M presets, full and LoRA
    python scripts/bench.py --suite parallel      # 2 processes under torchrun against 1
    python scripts/bench.py --suite all           # + data pipeline, generation and parallel
    python scripts/bench.py --cases llama-134m/lora/fp32/remat

MFU counts the FLOPs a step must do (PaLM's accounting: 6N per token for full fine-tuning, 4N when
the weights are frozen and only input gradients flow, plus 12·L·T·d for attention) divided by
``tokens/s × peak``, where peak is the best of repeated square matmuls in the step's dtype.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch

DEFAULT_CASES = (
    "llama-tiny/full/fp32", "llama-tiny/lora/fp32",
    "llama-134m/full/fp32", "llama-134m/lora/fp32", "llama-134m/lora/fp32/remat", "llama-134m/lora/bf16",
)
SHAPES = {"llama-tiny": (8, 256), "llama-134m": (4, 512)}


@dataclass(frozen=True)
class BenchConfig:
    """What to measure."""

    suite: Literal["train", "parallel", "all"] = "train"
    """train: the train-step cases; parallel: 2 processes (torchrun, gloo) against 1; all: train, parallel, data pipeline and generation."""
    cases: tuple[str, ...] = DEFAULT_CASES
    """Cases preset/mode/dtype[/remat]: mode full or lora, dtype fp32 or bf16."""
    steps: int = 5
    """Timed steps per case (after 2 warm-up steps)."""
    threads: int = 0
    """torch threads (0: torch's default)."""


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n x n matmul in ``dtype`` on this machine, right now."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def flops_per_token(cfg: object, seq_len: int, frozen: bool) -> float:
    """Training FLOPs per token: (6 or 4)·N_matmul + 12·L·T·d (attention scores and values)."""
    import purefine as pf

    shapes = pf.models.param_shapes(cfg)
    n_matmul = sum(torch.Size(s).numel() for name, s in shapes.items() if len(s) == 2 and "embed_tokens" not in name)
    if cfg.tie_word_embeddings:
        n_matmul += cfg.vocab_size * cfg.hidden_size
    attn = 12 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim
    return (4 if frozen else 6) * n_matmul + attn


def run_case(case: str, steps: int) -> dict:
    """Time ``steps`` train steps of one case; returns tokens/s, MFU, peak memory."""
    import purefine as pf
    from purefine.logging import limit_heap_fragmentation, peak_memory_bytes

    limit_heap_fragmentation()
    preset, mode, dtype_name, *flags = case.split("/")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    cfg = pf.models.preset(preset)
    batch_size, seq_len = SHAPES.get(preset, (4, 512))
    rss_start = _rss()
    lora = mode == "lora"
    params = pf.models.init(cfg, seed=0, dtype=dtype if lora else torch.float32)
    weights = pf.tree.nbytes(params)
    trainable = pf.train.all_floating
    if lora:
        params = pf.lora.apply(params, rank=8, alpha=16, where=["q_proj", "v_proj"], seed=0)
        trainable = pf.lora.trainable
    opt = pf.optim.adamw(1e-4)
    step = pf.train.make_step(pf.models.loss_fn(cfg, remat="remat" in flags), opt, trainable=trainable,
                              compute_dtype=dtype if dtype != torch.float32 else None)
    state = pf.train.init(params, opt, trainable=trainable, copy=False)
    del params
    g = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=g)}
    batch["labels"] = torch.roll(batch["tokens"], -1, 1)
    rss_ready = _rss()
    for _ in range(2):
        state, _ = step(state, batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    seconds = (time.perf_counter() - t0) / steps
    tokens_per_s = batch_size * seq_len / seconds
    achieved = flops_per_token(cfg, seq_len, frozen=lora) * tokens_per_s
    peak = matmul_peak(dtype)
    peak_mem = peak_memory_bytes()
    return {"case": case, "params": cfg.num_params, "batch": [batch_size, seq_len], "threads": torch.get_num_threads(),
            "seconds_per_step": round(seconds, 4), "tokens_per_s": round(tokens_per_s, 1),
            "achieved_tflops": round(achieved / 1e12, 4), "peak_tflops": round(peak / 1e12, 4),
            "mfu": round(achieved / peak, 4), "weights_bytes": weights, "peak_rss_bytes": peak_mem,
            "step_peak_over_weights": round((peak_mem - rss_start) / weights, 3),
            "step_growth_after_setup_bytes": peak_mem - rss_ready, "loss": round(metrics["loss"], 4)}


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main(cfg: BenchConfig) -> dict:
    """Run every case in its own subprocess and print one JSON document."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results: dict = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__}, "train": []}
    if cfg.suite == "parallel":
        from purefine.shard.bench import BenchArgs, compare

        results["parallel"] = compare(BenchArgs(nproc=2))
        print(json.dumps(results, indent=2))
        return results
    for case in cfg.cases:
        cmd = [sys.executable, "-m", "purefine.recipes.bench_case", case, str(cfg.steps), str(cfg.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            results["train"].append({"case": case, "error": out.stderr.strip().splitlines()[-1:]})
            continue
        results["train"].append(json.loads(out.stdout.strip().splitlines()[-1]))
    if cfg.suite == "all":
        from purefine.data.bench import bench_pipeline
        from purefine.generate import bench_generate

        results["data"] = bench_pipeline()
        results["generate"] = [bench_generate("llama-tiny"), bench_generate("llama-134m")]
        from purefine.shard.bench import BenchArgs, compare

        results["parallel"] = compare(BenchArgs(nproc=2))
    print(json.dumps(results, indent=2))
    return results
