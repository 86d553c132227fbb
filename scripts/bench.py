#!/usr/bin/env python
"""Benchmarks: purefine side by side with HF PEFT (and torchtune) on the same workloads, as a Markdown
table with the machine beside it (``purefine bench``; docs/performance.md says what is measured).

    python scripts/bench.py --against hf
    python scripts/bench.py --against hf --cases llama-tiny/lora/fp32 --steps 1 --warmup 1 --rounds 1
    python scripts/bench.py --suite all --json bench.json
"""

import sys

from purefine.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
