#!/usr/bin/env python
"""Generate purefine's bundled preference set: prompt / chosen / rejected pairs over the demo tasks.

    python scripts/make_preference_data.py                         # rewrites purefine/assets/preference/
    python scripts/make_preference_data.py --out /tmp/p --check    # compare a fresh build with the bundled one

Each prompt is one of eight of the demo's tasks (scripts/make_demo_data.py's generators, another
seed; copying and reversing a list are left out, as their answers are themselves permutations of
the input), its input on the line after the instruction. The chosen answer is the correct one; the
rejected answer parrots the prompt back, the failure of a small model that has not learnt the
task: the list itself instead of its count, first or last word, largest number, sorted order or
continuation; the two numbers instead of their sum; the country instead of its capital; the word
instead of its opposite. The preference is a behaviour (answer, don't echo) that carries over to
new prompts: DPO of the bundled llama-tiny (LoRA on q_proj / v_proj, 60 steps of 8 pairs) raises
its held-out reward accuracy from 0 to about 0.9. Everything derives from one seed: the output is
byte-identical on every run. Held-out prompts never repeat a training prompt.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import Row, make_row  # noqa: E402

from purefine import fsutil  # noqa: E402
from purefine.data import ASSETS_DIR  # noqa: E402

SEED = 2468
TRAIN_ROWS = 800
EVAL_ROWS = 120
OUT = ASSETS_DIR / "preference"
LEFT_OUT = ("copy", "reverse")  # answers that are themselves permutations of the input


def parrot(row: Row) -> str:
    """The rejected answer to ``row``: the prompt's own content given back (see the module doc)."""
    if row.input:
        return row.input
    if row.task == "add":
        return " ".join(w.strip(".?") for w in row.instruction.split() if w.strip(".?").isdigit())
    if row.task == "capital":
        country = row.output.split(" is ")[0].removeprefix("The capital of ")
        return f"The capital of {country} is {country}."
    return row.instruction.rstrip("?.").split()[-1]  # opposite: "... opposite of hot?" -> "hot"


def make_pair(rng: random.Random) -> dict[str, str]:
    """One preference row: prompt (instruction, then its input), chosen (right), rejected (parroted)."""
    while True:
        row = make_row(rng)
        wrong = parrot(row)
        if row.task not in LEFT_OUT and wrong != row.output:
            prompt = f"{row.instruction}\n{row.input}" if row.input else row.instruction
            return {"prompt": prompt, "chosen": row.output, "rejected": wrong}


def make_pairs(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs); held-out prompts never repeat a training prompt."""
    train = [make_pair(rng) for _ in range(TRAIN_ROWS)]
    seen = {p["prompt"] for p in train}
    held_out: list[dict] = []
    while len(held_out) < EVAL_ROWS:
        p = make_pair(rng)
        if p["prompt"] not in seen:
            held_out.append(p)
            seen.add(p["prompt"])
    return train, held_out


def to_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def build(out_dir: Path) -> dict[str, bytes]:
    """Write train.jsonl and validation.jsonl to ``out_dir``; return their bytes."""
    train, held_out = make_pairs(random.Random(SEED))
    files = {"train.jsonl": to_jsonl(train), "validation.jsonl": to_jsonl(held_out)}
    for name, content in files.items():
        fsutil.atomic_write(out_dir / name, content)
    return files


def main(argv: list[str]) -> int:
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else OUT
    files = build(out)
    print(f"wrote {out}: " + ", ".join(f"{k} {len(v) / 1024:.0f} KiB" for k, v in files.items()))
    if "--check" in argv and out != OUT:
        differ = [k for k, v in files.items() if (OUT / k).read_bytes() != v]
        print("identical to the bundled set" if not differ else f"differs from the bundled set: {differ}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
