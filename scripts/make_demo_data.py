#!/usr/bin/env python
"""Generate purefine's bundled demo: a synthetic alpaca dataset and a 1024-piece SentencePiece tokenizer.

    python scripts/make_demo_data.py                 # rewrites purefine/assets/demo/
    python scripts/make_demo_data.py --out /tmp/demo --check   # compare a fresh build with the bundled one

Ten small tasks a ~1M-parameter model makes visible progress on within a minute of CPU training:
reversing, copying and counting short word lists, first/last word, sorting and taking the maximum
of a few numbers, adding two small numbers, continuing an arithmetic sequence, capitals from a fixed
table and opposites from a fixed table. Everything derives from one seed, so the output is
byte-identical on every run. The held-out split draws fresh rows; rows of the generated tasks never
repeat a training row, while the two table tasks (capitals, opposites) necessarily ask about the
same table entries as training does.

The tokenizer is BPE, vocab_size exactly 1024 (unk=0, bos=1, eos=2, no pad), byte fallback so any
text encodes, digits split one per token, identity normalization (whitespace and newlines kept),
and the chatml / llama3 special tokens as control symbols so those templates work on the demo too.
"""

from __future__ import annotations

import io
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from purefine import fsutil
from purefine.data import DEMO_DIR
from purefine.data.templates import get_template

SEED = 1234
TRAIN_ROWS = 3000
EVAL_ROWS = 200
VOCAB_SIZE = 1024
CONTROL_SYMBOLS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]

WORDS = ("apple bird boat book bread cake car cat chair cloud coat cow cup desk dog door duck egg fish "
         "flag frog goat hat horse house key kite lamp leaf lion map milk moon mouse nest owl pen pig "
         "plant rain ring road rock rose sand ship shoe sock star stone sun table tent tiger tree "
         "truck wall water whale wind wolf").split()
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Greece": "Athens", "Egypt": "Cairo", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Russia": "Moscow", "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin",
    "Turkey": "Ankara", "Iran": "Tehran", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Australia": "Canberra", "Cuba": "Havana", "Hungary": "Budapest", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Switzerland": "Bern",
}
OPPOSITES = dict(pair.split("/") for pair in (
    "hot/cold big/small up/down fast/slow happy/sad light/dark old/young open/closed early/late "
    "full/empty hard/soft high/low long/short rich/poor strong/weak wet/dry loud/quiet near/far "
    "clean/dirty thick/thin heavy/light day/night left/right win/lose buy/sell push/pull").split())
OPPOSITES.update({v: k for k, v in list(OPPOSITES.items()) if v not in OPPOSITES})


@dataclass(frozen=True)
class Row:
    instruction: str
    input: str
    output: str
    task: str


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _numbers(rng: random.Random, lo: int, hi: int) -> list[int]:
    return rng.sample(range(100), rng.randint(lo, hi))


def _join(xs: list) -> str:
    return " ".join(str(x) for x in xs)


def make_row(rng: random.Random) -> Row:
    """One random row of one of the ten tasks."""
    task = rng.choice(["reverse", "copy", "count", "first_last", "sort", "max", "add", "sequence", "capital", "opposite"])
    if task == "reverse":
        w = _words(rng, 3, 6)
        ask = rng.choice(["Reverse the order of the words.", "Write the words backwards, last word first."])
        return Row(ask, _join(w), _join(w[::-1]), task)
    if task == "copy":
        w = _words(rng, 3, 6)
        return Row(rng.choice(["Repeat the words exactly.", "Copy the list of words."]), _join(w), _join(w), task)
    if task == "count":
        w = _words(rng, 1, 8)
        return Row(rng.choice(["How many words are in the list?", "Count the words."]), _join(w), str(len(w)), task)
    if task == "first_last":
        w, first = _words(rng, 2, 6), rng.random() < 0.5
        return Row(f"What is the {'first' if first else 'last'} word?", _join(w), w[0] if first else w[-1], task)
    if task == "sort":
        n = _numbers(rng, 3, 5)
        ask = rng.choice(["Sort the numbers from smallest to largest.", "Put the numbers in increasing order."])
        return Row(ask, _join(n), _join(sorted(n)), task)
    if task == "max":
        n = _numbers(rng, 2, 6)
        return Row(rng.choice(["Which number is the largest?", "Find the biggest number."]), _join(n), str(max(n)), task)
    if task == "add":
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return Row(rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Compute {a} + {b}."]), "", str(a + b), task)
    if task == "sequence":
        start, step = rng.randint(0, 20), rng.randint(1, 9)
        seq = [start + step * k for k in range(6)]
        return Row("Continue the sequence with three more numbers.", _join(seq[:3]), _join(seq[3:]), task)
    if task == "capital":
        country = rng.choice(sorted(CAPITALS))
        q = rng.choice([f"What is the capital of {country}?", f"Name the capital city of {country}."])
        return Row(q, "", f"The capital of {country} is {CAPITALS[country]}.", task)
    word = rng.choice(sorted(OPPOSITES))
    ask = rng.choice([f"What is the opposite of {word}?", f"Give the opposite of the word {word}."])
    return Row(ask, "", OPPOSITES[word], task)


def make_rows(rng: random.Random) -> tuple[list[Row], list[Row]]:
    """(train rows, held-out rows); held-out rows of generated tasks never repeat a training row."""
    train = [make_row(rng) for _ in range(TRAIN_ROWS)]
    seen = {(r.instruction, r.input) for r in train}
    held_out: list[Row] = []
    while len(held_out) < EVAL_ROWS:
        r = make_row(rng)
        if r.task in ("capital", "opposite") or (r.instruction, r.input) not in seen:
            held_out.append(r)
            seen.add((r.instruction, r.input))
    return train, held_out


def to_jsonl(rows: list[Row]) -> str:
    return "".join(json.dumps({"instruction": r.instruction, "input": r.input, "output": r.output}) + "\n" for r in rows)


def corpus(rows: list[Row]) -> list[str]:
    """The tokenizer's training text: every row rendered with the alpaca template, plus chat headers."""
    template = get_template("alpaca")
    texts = []
    for r in rows:
        user = {"role": "user", "content": r.instruction, **({"input": r.input} if r.input else {})}
        segs = template.render([user, {"role": "assistant", "content": r.output}])
        texts.append("".join(s.text for s in segs))
    texts += ["[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n", "[/INST]", "system\n", "user\n", "assistant\n"] * 20
    return texts


def train_tokenizer(texts: list[str]) -> bytes:
    """A BPE SentencePiece model (bytes) with exactly VOCAB_SIZE pieces."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=out, model_type="bpe", vocab_size=VOCAB_SIZE,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, control_symbols=CONTROL_SYMBOLS, num_threads=1, shuffle_input_sentence=False,
        max_sentence_length=4096, minloglevel=2)
    return out.getvalue()


def build(out_dir: Path) -> dict[str, bytes]:
    """Write train.jsonl, validation.jsonl and tokenizer.model to ``out_dir``; return their bytes."""
    train, held_out = make_rows(random.Random(SEED))
    files = {"train.jsonl": to_jsonl(train).encode(), "validation.jsonl": to_jsonl(held_out).encode(),
             "tokenizer.model": train_tokenizer(corpus(train))}
    for name, data in files.items():
        fsutil.atomic_write(out_dir / name, data)
    return files


def main(argv: list[str]) -> int:
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else DEMO_DIR
    files = build(out)
    sizes = ", ".join(f"{k} {len(v) / 1024:.0f} KiB" for k, v in files.items())
    print(f"wrote {out}: {sizes}")
    if "--check" in argv and out != DEMO_DIR:
        differ = [k for k, v in files.items() if (DEMO_DIR / k).read_bytes() != v]
        print("identical to the bundled demo" if not differ else f"differs from the bundled demo: {differ}")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
