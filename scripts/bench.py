#!/usr/bin/env python
"""Benchmarks: tokens/s, MFU against a measured matmul peak, and peak memory, printed as JSON.

    python scripts/bench.py
    python scripts/bench.py --suite all
    python scripts/bench.py --cases llama-134m/lora/fp32/remat --steps 3
"""

import sys

from purefine.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
