#!/usr/bin/env python
"""Look at the data as training sees it: tokenized samples with the trained tokens marked, or statistics.

    python scripts/data.py --preview 3
    python scripts/data.py --preview 100 --json --data.source data/train.jsonl --tokenizer path/to/tokenizer
    python scripts/data.py --config my-mix.yaml          # lengths, truncation, packing, trained share
"""

import sys

from purefine.cli import main

if __name__ == "__main__":
    main(["data", *sys.argv[1:]])
