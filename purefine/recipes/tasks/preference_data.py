"""The data of ``--task dpo``: preference pairs, their batches and the precomputed reference log-probs.

- Rows: ``{"prompt", "chosen", "rejected"}`` as strings, or conversational (lists of messages; with
  no prompt the shared leading messages are the prompt), through the supervised data's formats and
  templates (``--data.template``, ``--data.column-map``); the loss is on the completions only and
  samples are never packed. ``builtin:demo`` (the default source) means the bundled preference set
  (``purefine/assets/preference``, made by ``scripts/make_preference_data.py``).
- An empty completion (chosen or rejected text that is blank) is a DataError naming the source, row
  and field (with ``--data.skip-bad-rows`` the row is skipped and counted like any bad row).
- ``PairSet``: the tokenized pairs and, for full fine-tuning, their reference log-probs (N, 2),
  computed once before training (``with_reference``) so that no second model is ever held.
- ``batches``: ``{"chosen": {tokens, labels, positions}, "rejected": {...}, "index": (B,)}`` (rows
  of a data-parallel rank's share past the end have index -1 and no labels), plus ``ref_chosen`` /
  ``ref_rejected`` (B,) when the set carries reference log-probs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch

from purefine import data
from purefine.data import sources
from purefine.errors import DataError

PREFERENCE_DIR = data.ASSETS_DIR / "preference"
BUILTIN_SOURCES = (data.BUILTIN_DEMO, "builtin:preference")


@dataclass(frozen=True, eq=False)
class PairSet:
    """Tokenized preference pairs (``pairs``: a preference ``TokenizedDataset``) and their reference
    log-probs ``reference`` (N, 2) float64 (chosen, rejected), or None (the reference runs live)."""

    pairs: data.TokenizedDataset
    reference: torch.Tensor | None = None

    @property
    def lengths(self) -> np.ndarray:
        """(N,) the longer side's token count of each pair (what the sampler plans with)."""
        return self.pairs.lengths

    @property
    def name(self) -> str:
        """The split's name for messages."""
        return self.pairs.name

    def __len__(self) -> int:
        return len(self.pairs)


def data_config(cfg: Any) -> data.DataConfig:
    """--data.* for preference pairs: the bundled set for builtin sources, the preference format, no packing."""
    source = str(PREFERENCE_DIR) if cfg.data.source in BUILTIN_SOURCES else cfg.data.source
    fmt = "preference" if cfg.data.format == "auto" else cfg.data.format
    return dataclasses.replace(cfg.data, source=source, format=fmt, packing=False, max_seq_len=cfg.max_seq_len,
                               seed=cfg.seed)


def _blank_completion(value: Any) -> bool:
    """True for a completion with no text: a blank string, or messages whose assistant turns are all blank."""
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        replies = [m.get("content", m.get("value")) for m in value if m.get("role", m.get("from")) in ("assistant", "gpt")]
        return bool(replies) and all(isinstance(r, str) and not r.strip() for r in replies)
    return False


def check_completions(rows: datasets.Dataset, d: data.DataConfig, json_columns: tuple[str, ...],
                      name: str) -> datasets.Dataset:
    """``rows`` with no blank completion: a DataError names the first (with ``skip_bad_rows`` the
    field is emptied so that tokenization skips and counts the row as bad)."""
    blank: dict[int, str] = {}
    for field in ("chosen", "rejected"):
        column = d.column_map.get(field, field)
        if column not in rows.column_names:
            continue
        for i, value in enumerate(rows[column]):
            value = json.loads(value) if column in json_columns and isinstance(value, str) else value
            if _blank_completion(value) and i not in blank:
                blank[i] = column
    if not blank:
        return rows
    if not d.skip_bad_rows:
        i = min(blank)
        raise DataError(f"{name}: row {i + 1}, field {blank[i]!r}: empty completion (expected non-empty text to "
                        f"{'prefer' if blank[i] == d.column_map.get('chosen', 'chosen') else 'reject'})")
    return rows.map(lambda row, i: {blank[i]: None} if i in blank else {}, with_indices=True)


def _tokenized(d: data.DataConfig, tokenizer: Any, source: str, split: str, *, missing_ok: bool,
               limit: int | None) -> data.TokenizedDataset | None:
    rows = data.load_split(source, split, subset=d.subset, revision=d.revision, cache_dir=d.cache_dir,
                           missing_ok=missing_ok)
    if rows is None:
        return None
    name = sources.describe(source, split)
    rows, json_columns = sources.exact_json_columns(rows, source)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    rows = check_completions(rows, d, json_columns, name)
    return data.tokenize(rows, tokenizer, d, name=name, json_columns=json_columns)


def load(cfg: Any, tokenizer: Any) -> tuple[PairSet, PairSet | None]:
    """(training pairs, held-out pairs or None) of --data.source / --data.eval-source, tokenized."""
    d = data_config(cfg)
    train_set = _tokenized(d, tokenizer, d.source, d.split, missing_ok=False, limit=d.max_samples)
    eval_source = d.eval_source if d.eval_source is not None else d.source
    held = None
    if d.eval_source is not None or not sources.is_single_file(d.source):
        held = _tokenized(d, tokenizer, eval_source, d.eval_split, missing_ok=d.eval_source is None, limit=None)
    return PairSet(train_set), (PairSet(held) if held is not None else None)


def collate(pair_set: PairSet, indices: list[int | None], seq_len: int) -> dict[str, Any]:
    """The pairs at ``indices`` (None = an empty row): chosen and rejected right-padded to one length T
    (tokens, labels, positions, each (B, T)), ``index`` (B,) (-1 for an empty row) and, when the set
    carries them, ``ref_chosen`` / ``ref_rejected`` (B,) float32 (0 for an empty row)."""
    fetched = iter(pair_set.pairs.fetch([i for i in indices if i is not None]))
    pairs = [None if i is None else next(fetched) for i in indices]
    chosen = [None if p is None else data.truncate(p[0], seq_len) for p in pairs]
    rejected = [None if p is None else data.truncate(p[1], seq_len) for p in pairs]
    t = max([1, *(len(s.tokens) for s in chosen + rejected if s is not None)])
    pad = pair_set.pairs.pad_id
    index = torch.tensor([-1 if i is None else i for i in indices], dtype=torch.long)
    batch: dict[str, Any] = {"chosen": data.collate_padded(chosen, pad, length=t),
                             "rejected": data.collate_padded(rejected, pad, length=t), "index": index}
    if pair_set.reference is not None:
        ref = pair_set.reference[index.clamp(min=0)].float() * (index >= 0)[:, None]
        batch["ref_chosen"], batch["ref_rejected"] = ref[:, 0], ref[:, 1]
    return batch


def batches(pair_set: PairSet, *, batch_size: int, seq_len: int, state: data.SamplerState, shuffle: bool, loop: bool,
            rank: int = 0, world_size: int = 1) -> Iterator[tuple[dict, data.SamplerState]]:
    """(batch, state after it): one pair per row in the sampler's order (``loop``: epoch after epoch),
    rank ``rank``'s ``batch_size`` rows of each global batch of ``batch_size * world_size``."""
    while True:
        rows, after = data.plan_rows(pair_set.lengths, state, rows=batch_size * world_size, seq_len=seq_len,
                                     packing=False, shuffle=shuffle, loop=loop)
        if not rows:
            return
        mine = data.sampler.rank_rows(rows, batch_size=batch_size, rank=rank, world_size=world_size)
        yield collate(pair_set, [r[0] if r else None for r in mine], seq_len), after
        state = after


def real_pairs(batch: dict) -> torch.Tensor:
    """The number of pairs in a batch (rows with an index), as a () tensor: DPO's normalizer."""
    return (batch["index"] >= 0).sum()


def with_reference(pair_set: PairSet, logps: Callable[[dict], tuple[torch.Tensor, torch.Tensor]], *, batch_size: int,
                   seq_len: int, layout: Any, to_device: Callable[[Any], Any]) -> PairSet:
    """``pair_set`` with every pair's reference log-probs (N, 2), from one pass without gradients:
    ``logps(batch) -> (chosen (B,), rejected (B,))``. Each data-parallel rank scores its rows of
    every global batch; the sums over ranks give every rank the whole table."""
    table = torch.zeros(len(pair_set), 2, dtype=torch.float64)
    stream = batches(pair_set, batch_size=batch_size, seq_len=seq_len, state=data.SamplerState(), shuffle=False,
                     loop=False, rank=layout.dp_rank, world_size=layout.dp_size)
    with torch.no_grad():
        for batch, _ in stream:
            chosen, rejected = logps(to_device(batch))
            index = batch["index"]
            real = index >= 0
            table[index[real], 0] = chosen.detach().double().cpu()[real]
            table[index[real], 1] = rejected.detach().double().cpu()[real]
    return PairSet(pair_set.pairs, layout.sum_over_dp(table))
