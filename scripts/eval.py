#!/usr/bin/env python
"""Run lm-eval tasks on a trained model and print lm-eval's results table (needs purefine[eval]).

    python scripts/eval.py --run-dir outputs/demo --tasks purefine_mc
    python scripts/eval.py --checkpoint-dir checkpoints/llama2-7b --adapter-dir outputs/run/adapter \\
        --quantize --tasks hellaswag arc_easy --limit 200
"""

import sys

from purefine.cli import main

if __name__ == "__main__":
    main(["eval", *sys.argv[1:]])
