#!/usr/bin/env python
"""Helpers of scripts/gpu_bench.sh.

    python scripts/gpu_bench_env.py                                   # the versions the GPU run used
    python scripts/gpu_bench_env.py --steps RUN/metrics.jsonl MODEL   # one line per training step
"""

import importlib
import json
import sys

PACKAGES = ("transformers", "peft", "bitsandbytes", "torchao", "optree", "tyro", "datasets")


def versions() -> None:
    """torch, CUDA and the GPU, then each package's version or why it is unavailable (never fatal)."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(f"torch {torch.__version__} | cuda {torch.version.cuda} | gpu {gpu}")
    for name in PACKAGES:
        try:
            print(f"{name} {importlib.import_module(name).__version__}")
        except Exception as e:  # a missing or broken optional package is reported, not fatal
            first = str(e).splitlines()[0][:120] if str(e) else ""
            print(f"{name} unavailable: {type(e).__name__} {first}")


def steps(path: str, model: str) -> None:
    """Seconds, tokens/s and peak memory of every step a train run's metrics.jsonl logged."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        sys.exit(f"gpu_bench: {path} logged no step")
    for r in rows:
        print(f"{model} QLoRA step {r['step']}: {r['seconds']:.3f} s, {r['tokens_per_s']:,.0f} tok/s, "
              f"peak {r['peak_memory'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--steps"] and len(sys.argv) == 4:
        steps(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 1:
        versions()
    else:
        sys.exit("usage: gpu_bench_env.py [--steps METRICS_JSONL MODEL]")
