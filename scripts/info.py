#!/usr/bin/env python
"""Print a checkpoint's (or a preset's) config, parameter count, dtypes and size.

    python scripts/info.py --checkpoint-dir path/to/hf-model
    python scripts/info.py --model llama2-7b
    python scripts/info.py --list
"""

import sys

from purefine.cli import main

if __name__ == "__main__":
    main(["info", *sys.argv[1:]])
