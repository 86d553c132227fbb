#!/usr/bin/env python
"""Benchmarks: tokens/s, MFU against a measured matmul peak, and peak memory, printed as JSON.

    python scripts/bench.py
    python scripts/bench.py --suite all
    python scripts/bench.py --cases llama-134m/lora/fp32/remat --steps 3
"""

from purefine.recipes import run
from purefine.recipes.bench import BenchConfig, main

if __name__ == "__main__":
    run(main, BenchConfig)
