#!/usr/bin/env python
"""Generate text with a base checkpoint (optionally with a LoRA adapter, or NF4 via --quantize) or a training run.

    python scripts/generate.py --run-dir outputs/demo --prompt "Give three tips for staying healthy."
    python scripts/generate.py --checkpoint-dir checkpoints/llama2-7b --adapter-dir outputs/run/adapter \\
        --template llama2-chat --prompt "Hi!" --temperature 0.7 --top-p 0.9 --max-new-tokens 200
"""

import sys

from purefine.cli import main

if __name__ == "__main__":
    main(["generate", *sys.argv[1:]])
