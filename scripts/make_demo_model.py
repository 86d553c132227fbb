#!/usr/bin/env python
"""Pretrain the bundled demo base model: llama-tiny, fully trained on a plain-text corpus of the demo tasks.

    python scripts/make_demo_model.py            # rewrites purefine/assets/llama-tiny/

The corpus is drawn from the same task generators as the demo instruction data but with another
seed and without any prompt template (``instruction``, ``input`` and ``output`` on three lines), so
the base model knows the vocabulary and the tasks while the bundled instruction fine-tune (the
alpaca template, loss on the answers only) still has something visible to learn. The result is
saved in bf16 (about 2 MB) with the demo tokenizer beside it, and is what ``python scripts/train.py``
starts from when no checkpoint is given for ``--model llama-tiny``.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import make_row  # noqa: E402

from purefine import checkpoint, data  # noqa: E402
from purefine.config import OptimConfig, TrainConfig  # noqa: E402
from purefine.recipes.train import main as train_main  # noqa: E402

SEED = 4321
ROWS = 6000
STEPS = 400
OUT = Path(__file__).resolve().parents[1] / "purefine" / "assets" / "llama-tiny"


def write_corpus(path: Path) -> None:
    rng = random.Random(SEED)
    with open(path, "w") as f:
        for _ in range(ROWS):
            r = make_row(rng)
            text = "\n".join(x for x in (r.instruction, r.input, r.output) if x)
            f.write(json.dumps({"text": text}) + "\n")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        write_corpus(corpus)
        cfg = TrainConfig(model="llama-tiny", init="random", peft="none", max_steps=STEPS, batch_size=16,
                          max_seq_len=256, seed=SEED, output_dir=str(Path(tmp) / "run"), plot=False, progress=False,
                          eval_batches=0, optim=OptimConfig(lr=3e-3, warmup_steps=20, weight_decay=0.0),
                          data=data.DataConfig(source=str(corpus), format="text", template="none", train_on="all",
                                               cache_dir=str(Path(tmp) / "cache")))
        summary = train_main(cfg)
        model_cfg, params = checkpoint.load_hf(summary["outputs"]["model"])
        checkpoint.save_hf(OUT, model_cfg, params, dtype=torch.bfloat16,
                           extra_files={"tokenizer.model": data.DEMO_TOKENIZER})
    print(f"pretrained llama-tiny: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; saved {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
