#!/usr/bin/env python
"""Upload an exported HF checkpoint or PEFT adapter folder to the Hugging Face Hub.

    python scripts/upload.py --folder out/merged --repo-id me/llama2-7b-alpaca --private
    HF_TOKEN=... python scripts/upload.py --folder out/adapter --repo-id me/llama2-7b-alpaca-lora
"""

import sys

from purefine.cli import main

if __name__ == "__main__":
    main(["upload", *sys.argv[1:]])
