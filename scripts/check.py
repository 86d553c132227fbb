#!/usr/bin/env python
"""Check purefine's forward on a checkpoint against transformers: each layer's and the logits' largest difference.

    python scripts/check.py --checkpoint-dir checkpoints/llama2-7b
    python scripts/check.py --checkpoint-dir checkpoints/llama2-7b --dtype bf16 --seq-len 256
"""

import sys

from purefine.cli import main

if __name__ == "__main__":
    main(["check", *sys.argv[1:]])
