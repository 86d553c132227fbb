"""Loader of the local ``purefine_mc`` task: ``purefine_mc.jsonl`` (beside this file) as a DatasetDict.

Each row: ``split`` (train / test), ``question``, ``choices`` (a list of answers) and ``answer``
(the index of the right one). lm-eval calls ``load(**metadata, **dataset_kwargs)``.
"""

import json
from pathlib import Path

import datasets

DATA_FILE = Path(__file__).with_suffix(".jsonl")


def load(**_: object) -> datasets.DatasetDict:
    """{split: Dataset} of the rows of ``purefine_mc.jsonl``."""
    splits: dict[str, list[dict]] = {}
    for line in DATA_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            splits.setdefault(row.pop("split"), []).append(row)
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})
