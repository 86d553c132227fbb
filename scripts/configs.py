#!/usr/bin/env python
"""List, copy and validate the training presets (configs/*.yaml).

    python scripts/configs.py ls
    python scripts/configs.py cp llama2-7b-qlora my-run.yaml
    python scripts/configs.py validate my-run.yaml
"""

import sys

from purefine.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])  # ls | cp | validate, as `purefine ls` ...
