"""Datasets -> tokenized samples -> packed or padded batches, deterministic and resumable.

    cfg = DataConfig()                                   # the bundled demo, alpaca template, packing
    tok = load_tokenizer(DEMO_TOKENIZER, model_vocab_size=1024)
    train = build_split(cfg, tok)                        # TokenizedDataset (data.build also mixes, streams)
    for batch, state in batches(train, batch_size=8, seq_len=cfg.max_seq_len, packing=cfg.packing,
                                sampler_state=SamplerState(seed=cfg.seed)):
        ...                                              # save ``state.to_dict()`` to resume exactly

- Loading (``load_split``): ``builtin:demo`` (the bundled dataset), a local json / jsonl / csv /
  parquet file (optionally compressed), a local directory (split files, or ``save_to_disk`` output),
  or a Hugging Face hub name with ``split``, ``subset`` and ``revision`` via ``datasets.load_dataset``.
- Tokenizing (``tokenize``): a batched ``datasets.map`` over the rows with a fingerprint made from
  the data, the tokenizer file, its chat template and the options, so a second run reads the
  cache. Bad rows are an error naming the source, row and field — or, with ``skip_bad_rows``,
  skipped, counted and logged.
  Samples truncated to ``max_seq_len`` that keep no labelled token are dropped and counted.
- Batching (``batches``): any dataset with ``plan`` and ``fetch`` (``TokenizedDataset``, a
  ``MixedDataset``, a ``StreamingDataset``): rows planned by ``purefine.data.sampler``, then
  collated. A batch is ``tokens``, ``labels`` (already shifted, -100 = no loss) and ``positions``, all (B, T) int64;
  packed batches (T = seq_len) add ``segment_ids`` (B, T) (one id per sample, trailing padding its
  own id; ``purefine.ops.block_causal_mask`` turns it into the attention mask) and positions restart
  at 0 for each sample. Unpacked batches are right-padded to the longest sample. Preference data
  yields ``{"chosen": batch, "rejected": batch}`` padded to one common length.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch

from purefine.data import sources
from purefine.data.config import DataConfig, check
from purefine.data.formats import IGNORE_INDEX, Sample, detect_format, resolve_template, tokenize_row
from purefine.data.sampler import SamplerState, index_draws, plan_rows, rank_rows
from purefine.data.sources import load_split
from purefine.data.tokenizer import Tokenizer
from purefine.errors import ConfigError, DataError

log = logging.getLogger("purefine.data")
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class TokenizedDataset:
    """Tokenized samples: ``rows`` (a ``datasets.Dataset`` with ``tokens``/``labels``, or
    ``chosen_*``/``rejected_*`` for preference data), ``lengths`` (N,), the pad id, and ``stats``
    (rows read, skipped bad rows with the first reasons, dropped unlabelled samples, truncated)."""

    rows: datasets.Dataset
    lengths: np.ndarray
    pad_id: int
    preference: bool = False
    name: str = "dataset"
    stats: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.lengths)

    def draws(self, state: SamplerState, *, shuffle: bool = True,
              loop: bool = True) -> Iterator[tuple[int, int, SamplerState]]:
        """(sample index, length, state after it) through the epochs (``sampler.index_draws``)."""
        return index_draws(self.lengths, state, shuffle=shuffle, loop=loop)

    def plan(self, state: SamplerState, *, rows: int, seq_len: int, packing: bool, shuffle: bool,
             loop: bool) -> tuple[list[list[int]], SamplerState]:
        """The next global batch's rows of sample indices and the state after it (``plan_rows``)."""
        return plan_rows(self.lengths, state, rows=rows, seq_len=seq_len, packing=packing, shuffle=shuffle, loop=loop)

    def fetch(self, indices: Sequence[int]) -> list[Any]:
        """The samples at ``indices``: ``Sample``s, or (chosen, rejected) pairs for preference data."""
        if not indices:
            return []
        cols = self.rows[[int(i) for i in indices]]
        if self.preference:
            return [(Sample(ct, cl), Sample(rt, rl)) for ct, cl, rt, rl in zip(
                cols["chosen_tokens"], cols["chosen_labels"], cols["rejected_tokens"], cols["rejected_labels"])]
        return [Sample(t, lab) for t, lab in zip(cols["tokens"], cols["labels"])]


def from_samples(samples: Sequence[Sample], *, pad_id: int = 0, name: str = "samples") -> TokenizedDataset:
    """An in-memory ``TokenizedDataset`` of ready-made samples (tests, custom pipelines)."""
    rows = datasets.Dataset.from_dict({"tokens": [s.tokens for s in samples], "labels": [s.labels for s in samples]})
    return TokenizedDataset(rows, np.array([len(s.tokens) for s in samples], dtype=np.int64), pad_id, name=name)


def truncate(sample: Sample, n: int) -> Sample:
    """The first ``n`` tokens; the new last position loses its label (its target was cut off)."""
    if len(sample.tokens) <= n:
        return sample
    return Sample(sample.tokens[:n], [*sample.labels[:n - 1], IGNORE_INDEX])


def row_result(row: Mapping[str, Any], index: int, opts: dict) -> dict[str, Any]:
    """One row's output columns: ``tokens`` / ``labels`` (or ``chosen_*`` / ``rejected_*``) truncated
    to ``opts["max_seq_len"]``, ``length``, ``labelled``, ``truncated``, and ``error`` (the message
    instead of tokens when the row is bad). ``opts``: ``tokenize_row``'s keyword arguments."""
    n = opts["max_seq_len"]
    try:
        result = tokenize_row(row, index, **{**opts, "max_seq_len": None})
    except DataError as e:
        return {"error": str(e)}
    full = {"chosen": result[0], "rejected": result[1]} if isinstance(result, tuple) else {"": result}
    pairs = {prefix: truncate(s, n) for prefix, s in full.items()}
    out: dict[str, Any] = {"error": "", "truncated": any(len(s.tokens) > n for s in full.values()),
                           "length": max(len(s.tokens) for s in pairs.values()),
                           "labelled": min(sum(x != IGNORE_INDEX for x in s.labels) for s in pairs.values())}
    for prefix, s in pairs.items():
        out[f"{prefix}_tokens" if prefix else "tokens"] = s.tokens
        out[f"{prefix}_labels" if prefix else "labels"] = s.labels
    return out


def _output_features(preference: bool) -> datasets.Features:
    ints = datasets.Sequence(datasets.Value("int32"))
    names = ("chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels") if preference else ("tokens", "labels")
    return datasets.Features({**{k: ints for k in names}, "length": datasets.Value("int64"),
                              "labelled": datasets.Value("int64"), "truncated": datasets.Value("bool"),
                              "error": datasets.Value("string")})


def _map_batch(batch: dict[str, list], indices: list[int], opts: dict, preference: bool,
               json_columns: tuple[str, ...]) -> dict[str, list]:
    columns = list(_output_features(preference))
    out: dict[str, list] = {k: [] for k in columns}
    for j, index in enumerate(indices):
        row = {k: v[j] for k, v in batch.items()}
        row.update({k: json.loads(row[k]) for k in json_columns if row.get(k) is not None})
        result = row_result(row, index, opts)
        for k in columns:
            out[k].append(result.get(k, False if k == "truncated" else [] if k.endswith(("tokens", "labels")) else 0))
    return out


def tokenize(rows: datasets.Dataset, tokenizer: Tokenizer, cfg: DataConfig, *, name: str = "dataset",
             json_columns: Sequence[str] = ()) -> TokenizedDataset:
    """Tokenize ``rows`` (any ``datasets.Dataset``) with ``cfg``'s format, template, masking and length.

    ``json_columns`` hold JSON text decoded before the row is read (see ``sources.exact_json_columns``).
    Raises ``DataError`` naming ``name``, the row index and the field at the first bad row, unless
    ``cfg.skip_bad_rows``. Samples left without a labelled token are dropped.
    """
    check(cfg)
    if len(rows) == 0:
        raise DataError(f"{name}: no rows")
    opts = row_options(cfg, tokenizer, rows.column_names, name)
    preference = opts["fmt"] == "preference"
    kwargs = {"opts": opts, "preference": preference, "json_columns": tuple(json_columns)}
    try:
        out = rows.map(_map_batch, with_indices=True, batched=True, batch_size=256, remove_columns=rows.column_names,
                       features=_output_features(preference), fn_kwargs=kwargs, num_proc=cfg.num_proc,
                       new_fingerprint=sources.fingerprint(rows, tokenizer, cfg, opts["fmt"], opts["template"]),
                       desc=f"tokenizing {name}")
    except UnicodeDecodeError as e:  # Arrow's JSON reader keeps invalid UTF-8; it fails when a column is read
        raise DataError(f"{name}: holds text that is not valid UTF-8 ({e}); re-encode the file as UTF-8") from None
    return _select_good(out, name, cfg, tokenizer.pad_id, preference, opts["fmt"])


def row_options(cfg: DataConfig, tokenizer: Tokenizer, columns: Sequence[str], name: str) -> dict[str, Any]:
    """``tokenize_row``'s keyword arguments for ``cfg``: the format (detected from ``columns`` under
    ``auto``), the template resolved with the tokenizer, masking and length."""
    fmt = detect_format(columns, cfg.column_map, source=name) if cfg.format == "auto" else cfg.format
    if fmt == "preference" and cfg.packing:
        raise ConfigError(f"{name}: preference pairs cannot be packed; pass --data.no-packing")
    return dict(fmt=fmt, template=resolve_template(cfg.template, tokenizer), tokenizer=tokenizer,
                column_map=dict(cfg.column_map), train_on=cfg.train_on, max_seq_len=cfg.max_seq_len)


def _select_good(out: datasets.Dataset, name: str, cfg: DataConfig, pad_id: int, preference: bool,
                 fmt: str) -> TokenizedDataset:
    errors = np.asarray(out["error"], dtype=object)
    bad = np.flatnonzero(errors != "")
    if len(bad) and not cfg.skip_bad_rows:
        more = f" ({len(bad)} bad rows in all; --data.skip-bad-rows skips them)" if len(bad) > 1 else ""
        raise DataError(f"{name}: {errors[bad[0]]}{more}")
    labelled = np.asarray(out["labelled"], dtype=np.int64)
    unlabelled = np.flatnonzero((errors == "") & (labelled == 0))
    keep = np.flatnonzero((errors == "") & (labelled > 0))
    if len(keep) == 0:
        raise DataError(f"{name}: no usable samples ({len(bad)} bad rows, {len(unlabelled)} without a "
                        f"labelled token after truncation to {cfg.max_seq_len})")
    stats = {"format": fmt, "rows": len(out), "samples": len(keep), "skipped_bad_rows": len(bad),
             "skipped_examples": [str(errors[i]) for i in bad[:5]], "dropped_unlabelled": len(unlabelled),
             "truncated": int(np.asarray(out["truncated"], dtype=bool)[keep].sum())}
    if len(bad):
        log.warning("%s: skipped %d bad row(s) of %d (first: %s)", name, len(bad), len(out), errors[bad[0]])
    if len(unlabelled):
        log.warning("%s: dropped %d sample(s) with no labelled token after truncation to %d tokens",
                    name, len(unlabelled), cfg.max_seq_len)
    rows = out if len(keep) == len(out) else out.select(keep)
    rows = rows.remove_columns(["error", "truncated", "labelled"])
    lengths = np.asarray(rows["length"], dtype=np.int64)
    return TokenizedDataset(rows, lengths, pad_id, preference, name, stats)


def build_split(cfg: DataConfig, tokenizer: Tokenizer) -> TokenizedDataset:
    """The training set: ``cfg.source``'s ``cfg.split`` (first ``cfg.max_samples`` rows), tokenized."""
    check(cfg)
    rows = load_split(cfg.source, cfg.split, subset=cfg.subset, revision=cfg.revision, cache_dir=cfg.cache_dir)
    rows, json_columns = sources.exact_json_columns(rows, cfg.source)
    if cfg.max_samples is not None:
        rows = rows.select(range(min(cfg.max_samples, len(rows))))
    return tokenize(rows, tokenizer, cfg, name=sources.describe(cfg.source, cfg.split), json_columns=json_columns)


def build_eval_split(cfg: DataConfig, tokenizer: Tokenizer) -> TokenizedDataset | None:
    """The held-out set: ``cfg.eval_source`` (or the source's ``cfg.eval_split``), or None if the
    source has no such split and no eval source was given."""
    check(cfg)
    explicit = cfg.eval_source is not None
    source = cfg.eval_source if explicit else cfg.source
    if not explicit and sources.is_single_file(source):
        return None
    rows = load_split(source, cfg.eval_split, subset=cfg.subset, revision=cfg.revision, cache_dir=cfg.cache_dir,
                      missing_ok=not explicit)
    if rows is None:
        return None
    rows, json_columns = sources.exact_json_columns(rows, source)
    return tokenize(rows, tokenizer, cfg, name=sources.describe(source, cfg.eval_split), json_columns=json_columns)


def collate_packed(rows: Sequence[Sequence[Sample]], seq_len: int, pad_id: int) -> Batch:
    """Rows of samples -> a packed batch: tokens, labels, positions, segment_ids, each (B, seq_len)."""
    b = len(rows)
    out = {"tokens": np.full((b, seq_len), pad_id, np.int64), "labels": np.full((b, seq_len), IGNORE_INDEX, np.int64),
           "positions": np.zeros((b, seq_len), np.int64), "segment_ids": np.zeros((b, seq_len), np.int64)}
    for r, row in enumerate(rows):
        start = 0
        for seg, sample in enumerate(row):
            s = truncate(sample, seq_len)
            end = start + len(s.tokens)
            if end > seq_len:
                raise DataError(f"row {r} of the planned batch overflows seq_len {seq_len}")
            out["tokens"][r, start:end], out["labels"][r, start:end] = s.tokens, s.labels
            out["positions"][r, start:end] = np.arange(end - start)
            out["segment_ids"][r, start:end] = seg
            start = end
        out["positions"][r, start:] = np.arange(seq_len - start)
        out["segment_ids"][r, start:] = len(row)
    return {k: torch.from_numpy(v) for k, v in out.items()}


def collate_padded(samples: Sequence[Sample | None], pad_id: int, *, length: int | None = None,
                   max_len: int | None = None) -> Batch:
    """One sample per row (None = an empty row), right-padded to ``length`` (default: the longest,
    truncated to ``max_len``): tokens, labels, positions, each (B, T)."""
    samples = [None if s is None else truncate(s, max_len) if max_len else s for s in samples]
    t = length if length is not None else max([1, *(len(s.tokens) for s in samples if s is not None)])
    tokens = np.full((len(samples), t), pad_id, np.int64)
    labels = np.full((len(samples), t), IGNORE_INDEX, np.int64)
    for r, s in enumerate(samples):
        if s is not None:
            tokens[r, :len(s.tokens)], labels[r, :len(s.labels)] = s.tokens, s.labels
    positions = np.broadcast_to(np.arange(t), (len(samples), t)).copy()
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels), "positions": torch.from_numpy(positions)}


def _collate_preference(pairs: Sequence[tuple[Sample, Sample] | None], pad_id: int, max_len: int) -> dict[str, Batch]:
    chosen = [None if p is None else truncate(p[0], max_len) for p in pairs]
    rejected = [None if p is None else truncate(p[1], max_len) for p in pairs]
    t = max([1, *(len(s.tokens) for s in chosen + rejected if s is not None)])
    return {"chosen": collate_padded(chosen, pad_id, length=t), "rejected": collate_padded(rejected, pad_id, length=t)}


def batches(dataset: Any, *, batch_size: int, seq_len: int, packing: bool,
            sampler_state: SamplerState | None = None, rank: int = 0, world_size: int = 1, shuffle: bool = True,
            loop: bool = True) -> Iterator[tuple[Any, SamplerState]]:
    """Yield (batch, state after it) for data-parallel rank ``rank`` of ``world_size``.

    ``dataset``: a ``TokenizedDataset``, ``MixedDataset`` or ``StreamingDataset`` (anything with
    ``plan``, ``fetch``, ``pad_id``, ``preference`` and ``name``).

    ``loop`` runs through epochs forever (training); without it the iterator ends with the epoch
    (evaluation: pass ``shuffle=False``), every rank yielding the same number of batches (rows past
    the data are padding with no labels). Restarting from any yielded state gives exactly the
    batches that would have followed it.
    """
    if batch_size < 1 or seq_len < 2 or world_size < 1:
        raise ConfigError(f"batches: need batch_size >= 1, seq_len >= 2, world_size >= 1; found "
                          f"{batch_size}, {seq_len}, {world_size}")
    if dataset.preference and packing:
        raise ConfigError(f"{dataset.name}: preference pairs cannot be packed; pass packing=False")
    state = sampler_state or SamplerState()
    while True:
        planned, next_state = dataset.plan(state, rows=batch_size * world_size, seq_len=seq_len, packing=packing,
                                           shuffle=shuffle, loop=loop)
        if not planned:
            return
        mine = rank_rows(planned, batch_size=batch_size, rank=rank, world_size=world_size)
        fetched = iter(dataset.fetch([i for row in mine for i in row]))
        rows = [[next(fetched) for _ in row] for row in mine]
        if packing:
            batch: Any = collate_packed(rows, seq_len, dataset.pad_id)
        elif dataset.preference:
            batch = _collate_preference([row[0] if row else None for row in rows], dataset.pad_id, seq_len)
        else:
            batch = collate_padded([row[0] if row else None for row in rows], dataset.pad_id, max_len=seq_len)
        yield batch, next_state
        state = next_state


def unpack(batch: Batch) -> list[Sample]:
    """The samples of a packed batch (B, T), row by row: every segment that carries at least one
    label (trailing padding carries none). The inverse of ``collate_packed`` for pipeline samples."""
    if "segment_ids" not in batch:
        raise DataError("unpack needs a packed batch (with segment_ids)")
    tokens, labels, segments = batch["tokens"].tolist(), batch["labels"].tolist(), batch["segment_ids"].tolist()
    out = []
    for toks, labs, segs in zip(tokens, labels, segments):
        bounds = [0, *[t for t in range(1, len(segs)) if segs[t] != segs[t - 1]], len(segs)]
        out += [Sample(toks[a:b], labs[a:b]) for a, b in zip(bounds, bounds[1:])
                if any(x != IGNORE_INDEX for x in labs[a:b])]
    return out
