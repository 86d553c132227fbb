#!/usr/bin/env python
"""List, copy and validate the training presets (configs/*.yaml).

    python scripts/configs.py ls
    python scripts/configs.py cp llama2-7b-qlora my-run.yaml
    python scripts/configs.py validate my-run.yaml
"""

from purefine.recipes import run
from purefine.recipes.configs import Command, main

if __name__ == "__main__":
    run(main, Command)
