#!/usr/bin/env python
"""Check purefine's forward on a checkpoint against transformers: each layer's and the logits' largest difference.

    python scripts/check.py --checkpoint-dir checkpoints/llama2-7b
    python scripts/check.py --checkpoint-dir checkpoints/llama2-7b --dtype bf16 --seq-len 256
"""

from purefine.recipes import run
from purefine.recipes.check import CheckConfig, main

if __name__ == "__main__":
    run(main, CheckConfig)
