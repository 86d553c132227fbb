#!/usr/bin/env python
"""Generate purefine's bundled classification demo: a labelled topic dataset and a BERT WordPiece tokenizer.

    python scripts/make_classify_data.py                       # rewrites purefine/assets/classify/
    python scripts/make_classify_data.py --out /tmp/c --check  # compare a fresh build with the bundled one

The task: which of four topics (animal, food, nature, home) a short sentence is about. Each
sentence names two or three things of its topic and, half the time, one thing of another topic as
a distractor, joined by shared adjectives and connecting words ("a small dog sits near the old
cat and a red apple" is about an animal). Chance is 25%; a model must weigh the nouns, not spot
one. Everything derives from one seed, so the output is byte-identical on every run; the held-out
split draws fresh sentences and never repeats a training sentence.

Files (``purefine/assets/classify/``): ``train.jsonl`` and ``validation.jsonl`` with columns ``text``
and ``label`` (the topic name), and a lowercasing WordPiece ``tokenizer.json`` holding the
training text's words and single letters, with BERT's special tokens ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4) and its
``[CLS] text [SEP]`` post-processor, with ``tokenizer_config.json`` naming them, so the bundled
files load exactly as a ``bert-base-uncased`` download would (in purefine and in transformers).
"""

from __future__ import annotations

import io
import json
import random
import string
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from purefine import fsutil
from purefine.data import ASSETS_DIR

OUT_DIR = ASSETS_DIR / "classify"
SEED = 4321
TRAIN_ROWS = 800
EVAL_ROWS = 200
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

TOPICS = {
    "animal": "bird cat cow dog duck fish frog goat horse lion mouse owl pig tiger whale wolf",
    "food": "apple bread cake egg milk soup rice cheese honey pie corn plum",
    "nature": "cloud rain sun moon star wind sand rock stone leaf tree plant rose river snow hill",
    "home": "book chair coat cup desk door hat key lamp pen ring shoe sock table wall bed",
}
TOPICS = {name: words.split() for name, words in TOPICS.items()}
ADJECTIVES = "big small old new red green blue quiet warm cold bright dark little soft round".split()
LINKS = ["and", "near", "with", "by", "under", "next to", "behind", "beside", "sits near", "is by", "looks at"]


def noun_phrase(rng: random.Random, noun: str) -> str:
    """``the old cat`` / ``a cat``: an article, sometimes an adjective, the noun."""
    article = rng.choice(["the", "a", "one", "that"])
    return f"{article} {rng.choice(ADJECTIVES)} {noun}" if rng.random() < 0.6 else f"{article} {noun}"


def make_row(rng: random.Random) -> dict[str, str]:
    """One labelled sentence: 2-3 nouns of the label's topic, maybe one distractor of another."""
    label = rng.choice(sorted(TOPICS))
    nouns = rng.sample(TOPICS[label], rng.randint(2, 3))
    if rng.random() < 0.5:
        other = rng.choice([t for t in sorted(TOPICS) if t != label])
        nouns.append(rng.choice(TOPICS[other]))
    rng.shuffle(nouns)
    parts = [noun_phrase(rng, nouns[0])]
    for noun in nouns[1:]:
        parts += [rng.choice(LINKS), noun_phrase(rng, noun)]
    text = " ".join(parts)
    return {"text": text[0].upper() + text[1:] + ".", "label": label}


def make_rows() -> tuple[list[dict], list[dict]]:
    """(train, validation): distinct sentences from one seeded generator."""
    rng, seen = random.Random(SEED), set()
    splits: list[list[dict]] = []
    for n in (TRAIN_ROWS, EVAL_ROWS):
        rows: list[dict] = []
        while len(rows) < n:
            row = make_row(rng)
            if row["text"] not in seen:
                seen.add(row["text"])
                rows.append(row)
        splits.append(rows)
    return splits[0], splits[1]


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """A BERT-style uncased WordPiece tokenizer for ``texts``: the special tokens (ids 0-4), every
    word of the texts (sorted), then every letter and digit alone and as a ``##`` continuation,
    and ASCII punctuation, so unseen words still split into pieces. Built from the words directly, not by
    ``WordPieceTrainer`` (whose order of equally frequent pieces changes from run to run)."""
    pre = pre_tokenizers.BertPreTokenizer()
    norm = normalizers.BertNormalizer(lowercase=True)
    words = sorted({w for text in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(string.digits)
    pieces = dict.fromkeys([*SPECIAL, *words, *letters, *string.punctuation, *(f"##{c}" for c in letters)])
    tok = Tokenizer(models.WordPiece(vocab={p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = norm, pre, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def tokenizer_config() -> dict:
    """What transformers' BertTokenizerFast reads beside tokenizer.json."""
    return {"tokenizer_class": "BertTokenizerFast", "do_lower_case": True, "model_max_length": 128,
            "clean_up_tokenization_spaces": True, "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
            "cls_token": "[CLS]", "mask_token": "[MASK]"}


def jsonl(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    for row in rows:
        buf.write(json.dumps(row) + "\n")
    return buf.getvalue().encode()


def build(out: Path) -> None:
    """Write the dataset splits and the tokenizer files into ``out``."""
    train, validation = make_rows()
    tok = train_tokenizer([row["text"] for row in train])
    out.mkdir(parents=True, exist_ok=True)
    fsutil.atomic_write(out / "train.jsonl", jsonl(train))
    fsutil.atomic_write(out / "validation.jsonl", jsonl(validation))
    fsutil.atomic_write(out / "tokenizer.json", json.dumps(json.loads(tok.to_str()), indent=1).encode())
    fsutil.atomic_write(out / "tokenizer_config.json", json.dumps(tokenizer_config(), indent=1).encode())


def main(argv: list[str]) -> int:
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else OUT_DIR
    build(out)
    if "--check" in argv:
        names = ("train.jsonl", "validation.jsonl", "tokenizer.json", "tokenizer_config.json")
        differ = [n for n in names if (out / n).read_bytes() != (OUT_DIR / n).read_bytes()]
        print(f"differs from the bundled copy: {', '.join(differ)}" if differ else "identical to the bundled copy")
        return 1 if differ else 0
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
