"""The data of the encoder tasks (``--task classify`` / ``mlm``): texts and labels from a dataset
column, ``[CLS] text [SEP]`` ids, right-padded batches, and BERT's token masking.

- Data: ``--data.source`` rows with a text column (``--data.text-column``, default ``text``) and,
  to classify, a label column (``--data.label-column``, default ``label``) of class ids 0..C-1 or of
  names. Names map to ids by the checkpoint's ``id2label`` when it has them all, else in sorted
  order, and become the saved model's ``id2label``; ``--num-labels`` defaults to what the training
  data holds. ``builtin:demo`` (the default source) means the bundled topic set
  (``purefine/assets/classify``, made by ``scripts/make_classify_data.py``: 4 topics, 800 / 200
  rows) with its WordPiece tokenizer. Each text is ``[CLS] text [SEP]`` (the tokenizer's bos / eos,
  else cls / sep), cut to ``--max-seq-len``; batches are right-padded with a key mask.
- Masked-LM: 15% of the non-special tokens of each row are chosen (at least one); of those 80%
  become the mask token, 10% a random token, 10% stay (BERT's recipe).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from purefine import data, lora
from purefine.config import TrainConfig
from purefine.errors import ConfigError, DataError
from purefine.recipes import setup

CLASSIFY_DIR = data.ASSETS_DIR / "classify"
BUILTIN_SOURCES = (data.BUILTIN_DEMO, "builtin:classify")
MASK_TOKENS = ("[MASK]", "<mask>")
MLM_PROBABILITY = 0.15  # BERT's: of the chosen tokens 80% become [MASK], 10% a random token, 10% stay


@dataclass(frozen=True)
class Encoded:
    """Tokenized texts: ``tokens`` (one id list per row), ``labels`` (a class id per row, or None
    for masked-LM), ``lengths`` (N,) for the sampler, and the split's ``name`` for messages."""

    tokens: list[list[int]]
    labels: list[int] | None
    lengths: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.tokens)


def source_of(cfg: TrainConfig) -> str:
    """The data source: the bundled topic set for ``builtin:demo`` / ``builtin:classify``."""
    return str(CLASSIFY_DIR) if cfg.data.source in BUILTIN_SOURCES else cfg.data.source


def tokenizer_source(cfg: TrainConfig) -> Path:
    """--tokenizer, else the checkpoint's tokenizer files (an error if it has none), else for a
    random init the bundled WordPiece tokenizer for the bundled data and the demo SentencePiece
    tokenizer for any other data."""
    default = CLASSIFY_DIR if cfg.data.source in BUILTIN_SOURCES else data.DEMO_TOKENIZER
    return setup.tokenizer_path(cfg, default=default)


def read_splits(cfg: TrainConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(training rows, held-out rows or None) of --data.source / --data.eval-source."""
    d, source = cfg.data, source_of(cfg)
    rows = data.load_split(source, d.split, subset=d.subset, revision=d.revision, cache_dir=d.cache_dir)
    if d.max_samples is not None:
        rows = rows.select(range(min(d.max_samples, len(rows))))
    eval_source = d.eval_source if d.eval_source is not None else source
    if d.eval_source is None and data.sources.is_single_file(source):
        return rows, None
    held = data.load_split(eval_source, d.eval_split, subset=d.subset, revision=d.revision, cache_dir=d.cache_dir,
                           missing_ok=d.eval_source is None)
    return rows, held


def column(rows: datasets.Dataset, name: str, flag: str, source: str) -> list[Any]:
    """The values of column ``name``, or a DataError naming the source, the flag and the columns."""
    if name not in rows.column_names:
        raise DataError(f"{source}: no column {name!r} ({flag}); the columns are {rows.column_names}")
    return rows[name]


def label_names(rows: datasets.Dataset, cfg: TrainConfig, model_cfg: Any) -> tuple[str, ...] | None:
    """The class names the label column uses, or None when it holds class ids: a ClassLabel's
    names, else the checkpoint's names if they cover the column, else the sorted distinct names."""
    name = cfg.data.label_column
    feature = rows.features.get(name)
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names)
    values = column(rows, name, "--data.label-column", source_of(cfg))
    if not all(isinstance(v, str) for v in values) or all(v.strip().isdigit() for v in values):
        return None
    known = getattr(model_cfg, "label_names", None) if getattr(model_cfg, "head", None) == "classify" else None
    return tuple(known) if known and set(values) <= set(known) else tuple(sorted(set(values)))


def is_class_id(value: Any) -> bool:
    """A label value that is a class id: a non-negative int, or such an int written as text (CSV)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0 or isinstance(value, str) and value.strip().isdigit()


def label_ids(values: list[Any], names: tuple[str, ...] | None, num_labels: int, where: str) -> list[int]:
    """Class ids in [0, num_labels) for the label column's values; a bad one is a DataError naming its row."""
    index = {n: i for i, n in enumerate(names or ())}
    out = []
    for row, v in enumerate(values):
        if isinstance(v, str) and v in index:
            out.append(index[v])
            continue
        if not is_class_id(v) or not 0 <= int(v) < num_labels:
            expected = f"one of {list(names)}" if names else f"a class id in [0, {num_labels})"
            raise DataError(f"{where}: row {row + 1}: label {v!r}: expected {expected} (--data.label-column, --num-labels)")
        out.append(int(v))
    return out


def encode(rows: datasets.Dataset, tokenizer: Any, cfg: TrainConfig, labels: list[int] | None, name: str) -> Encoded:
    """Rows -> ``[CLS] text [SEP]`` ids cut to --max-seq-len (the last id kept), with their labels."""
    tokens = []
    for row, text in enumerate(column(rows, cfg.data.text_column, "--data.text-column", name)):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{name}: row {row + 1}: column {cfg.data.text_column!r}: expected non-empty text, found {text!r}")
        ids = tokenizer.encode(text, bos=True, eos=True)
        tokens.append(ids if len(ids) <= cfg.max_seq_len else [*ids[: cfg.max_seq_len - 1], ids[-1]])
    return Encoded(tokens, labels, np.array([len(t) for t in tokens], dtype=np.int64), name)


def mask_tokens(tokens: torch.Tensor, real: torch.Tensor, special: list[int], mask_id: int, vocab: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of tokens (B, T): (inputs, labels (B, T), -100 where not chosen). At least one
    non-special token per row is chosen (15% on average), never padding or special tokens."""
    candidates = real & ~torch.isin(tokens, torch.tensor(special, dtype=tokens.dtype))
    draw = torch.rand(tokens.shape, generator=gen)
    chosen = candidates & (draw < MLM_PROBABILITY)
    first = torch.where(candidates, draw, 2.0).argmin(-1, keepdim=True)  # the row's lowest draw, if none was chosen
    chosen |= torch.zeros_like(chosen).scatter_(1, first, True) & candidates & ~chosen.any(-1, keepdim=True)
    how = torch.rand(tokens.shape, generator=gen)
    inputs = torch.where(chosen & (how < 0.8), mask_id, tokens)
    random_ids = torch.randint(0, vocab, tokens.shape, generator=gen)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
    return inputs, torch.where(chosen, tokens, -100)


def collate(enc: Encoded, indices: list[int | None], pad_id: int, masking: dict | None,
            seed: int) -> dict[str, torch.Tensor]:
    """The rows ``indices`` right-padded: tokens (B, T), mask (B, T) bool (True = real), labels (B,)
    class ids, or for masked-LM (``masking``) masked tokens and labels (B, T) drawn from ``seed``.
    A None row (a data-parallel rank's share past the end of the data) is one pad token with no label."""
    lengths = [int(enc.lengths[i]) if i is not None else 1 for i in indices]
    tokens = torch.full((len(indices), max(lengths)), pad_id, dtype=torch.long)
    for r, i in enumerate(indices):
        if i is not None:
            tokens[r, : lengths[r]] = torch.tensor(enc.tokens[i])
    real = torch.arange(tokens.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    if masking is None:
        labels = [enc.labels[i] if i is not None else -100 for i in indices]
        return {"tokens": tokens, "mask": real, "labels": torch.tensor(labels)}
    inputs, labels = mask_tokens(tokens, real, gen=torch.Generator().manual_seed(seed), **masking)
    return {"tokens": inputs, "mask": real, "labels": labels}


def batches(enc: Encoded, *, batch_size: int, pad_id: int, masking: dict | None, state: data.SamplerState,
            shuffle: bool, loop: bool, rank: int = 0, world_size: int = 1) -> Iterator[tuple[dict, data.SamplerState]]:
    """(batch, state after it): one text per row, in the sampler's order (``loop``: epoch after
    epoch), rank ``rank``'s ``batch_size`` rows of each global batch; masked-LM masks are drawn from
    the batch's place in the stream, so a run is repeatable (and resumable)."""
    while True:
        rows, after = data.plan_rows(enc.lengths, state, rows=batch_size * world_size, seq_len=int(enc.lengths.max()),
                                     packing=False, shuffle=shuffle, loop=loop)
        if not rows:
            return
        mine = [r[0] if r else None for r in data.sampler.rank_rows(rows, batch_size=batch_size, rank=rank,
                                                                    world_size=world_size)]
        seed = lora.path_seed(state.seed, f"mlm:{state.epoch}:{state.position}")
        yield collate(enc, mine, pad_id, masking, seed=seed), after
        state = after


def masking_of(cfg: TrainConfig, tokenizer: Any) -> dict | None:
    """The masked-LM options (``mask_tokens`` keywords) for --task mlm, else None."""
    if cfg.task != "mlm":
        return None
    mask_id = next((i for t in MASK_TOKENS if (i := tokenizer.token_to_id(t)) is not None), None)
    if mask_id is None:
        raise ConfigError(f"--task mlm: the tokenizer {tokenizer!r} has no mask token ({' or '.join(MASK_TOKENS)})")
    special = {*tokenizer.special_tokens.values(), tokenizer.pad_id}
    special |= {i for i in (getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)) if i is not None}
    return {"special": sorted(special), "mask_id": mask_id, "vocab": tokenizer.vocab_size}


def held_labels(cfg: TrainConfig, model_cfg: Any, held: datasets.Dataset) -> list[int] | None:
    """The held-out rows' class ids under the trained head's names (None for masked-LM)."""
    if cfg.task == "mlm":
        return None
    values = column(held, cfg.data.label_column, "--data.label-column", "held-out data")
    feature = held.features.get(cfg.data.label_column)
    names = model_cfg.label_names if not isinstance(feature, datasets.ClassLabel) else tuple(feature.names)
    return label_ids(values, names, model_cfg.num_labels, "held-out data")


