#!/usr/bin/env python
"""Download a model's safetensors, configs and tokenizer files from the Hugging Face Hub.

    python scripts/download.py --repo-id meta-llama/Llama-2-7b-hf --local-dir checkpoints/llama2-7b
    HF_TOKEN=... python scripts/download.py --repo-id owner/private-model
"""

import sys

from purefine.cli import main

if __name__ == "__main__":
    main(["download", *sys.argv[1:]])
