#!/usr/bin/env python
"""Fine-tune a model: LoRA, QLoRA, DoRA or full. With no flags, the bundled demo (about a minute on a CPU).

    python scripts/train.py
    python scripts/train.py --config llama2-7b-qlora --checkpoint-dir path/to/Llama-2-7b-hf
    python scripts/train.py --model llama2-7b --peft qlora --init random --max-steps 2 --batch-size 1 --max-seq-len 256
"""

import sys

from purefine.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
