#!/usr/bin/env python
"""Export a trained model: LoRA / DoRA merged (NF4 dequantized) into an HF checkpoint, or the adapter alone (PEFT).

    python scripts/export.py --run-dir outputs/demo --output-dir exports/demo --dtype bf16
    python scripts/export.py --checkpoint-dir checkpoints/llama2-7b --adapter-dir outputs/run/adapter \\
        --output-dir exports/adapter --format peft
"""

import sys

from purefine.cli import main

if __name__ == "__main__":
    main(["export", *sys.argv[1:]])
