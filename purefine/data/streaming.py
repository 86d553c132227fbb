"""Streaming (``--data.streaming``): rows read, shuffled in blocks, tokenized and packed as batches ask.

    train = build_stream(DataConfig(source="big.jsonl", streaming=True), tok)
    for batch, state in batches(train, batch_size=8, seq_len=512, packing=True,
                                sampler_state=SamplerState(seed=0)):
        ...                                   # state.position: rows of this epoch taken so far

- Nothing is read ahead of need: the first batch waits for one block of ``--data.shuffle-buffer``
  rows and tokenizes only the rows it packs, so the time to the first step does not grow with the
  dataset (which is never counted: a streamed run needs ``--max-steps``).
- Order: epoch ``e`` reads the rows in blocks of W = ``--data.shuffle-buffer``; block ``b`` is taken
  in the order of ``default_rng([seed, e, b]).permutation`` (in file order with ``shuffle=False``).
- State: ``SamplerState(seed, epoch, position)``, ``position`` = rows of the epoch's order taken
  or skipped. Resume reopens the source at row ``b * W`` (``reader.rows(skip=...)``) and re-reads
  the block, so a resumed run sees exactly the batches an uninterrupted one would.
- Rows that fail (bad JSON lines, rows the format or template rejects) are a ``DataError`` naming the
  source and row, or with ``--data.skip-bad-rows`` skipped and counted in ``stats``; samples with no
  labelled token after truncation are dropped. A whole epoch without a sample is an error.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np

from purefine.data import sources
from purefine.data.config import DataConfig, check
from purefine.data.formats import Sample
from purefine.data.pipeline import row_options, row_result
from purefine.data.sampler import Draw, SamplerState, pack
from purefine.data.stream_rows import BadRow, RowReader, open_rows
from purefine.data.tokenizer import Tokenizer
from purefine.errors import ConfigError, DataError

log = logging.getLogger("purefine.data")


@functools.lru_cache(maxsize=8)
def _block_order(seed: int, epoch: int, block: int, n: int, shuffle: bool) -> np.ndarray:
    """(n,) the order rows of one block are taken in."""
    return np.random.default_rng([seed, epoch, block]).permutation(n) if shuffle else np.arange(n)


class StreamingDataset:
    """A source read as a stream (see the module doc); ``plan`` / ``fetch`` / ``draws`` as the
    other datasets, so ``batches`` and a mix take it as they take a tokenized one."""

    def __init__(self, reader: RowReader, opts: dict, *, name: str, pad_id: int, block_rows: int,
                 max_rows: int | None = None, skip_bad_rows: bool = False):
        self.reader, self.opts, self.name, self.pad_id = reader, opts, name, pad_id
        self.preference = opts["fmt"] == "preference"
        self.block_rows, self.max_rows, self.skip_bad_rows = block_rows, max_rows, skip_bad_rows
        self.stats: dict[str, Any] = {"format": opts["fmt"], "rows_read": 0, "samples": 0, "skipped_bad_rows": 0,
                                      "skipped_examples": [], "dropped_unlabelled": 0, "truncated": 0}
        self._block: tuple[int | None, list] = (None, [])
        self._rows: Generator | None = None
        self._next_row = 0
        self._counted = (0, 0)  # (epoch, position) up to which rows were counted in stats

    @property
    def lengths(self) -> np.ndarray:
        """Unknown for a stream: a streamed run gives --max-steps instead of counting epochs."""
        raise ConfigError(f"{self.name}: a streamed dataset is never counted, so --epochs cannot be turned into "
                          "steps; give --max-steps")

    def _block_rows(self, block: int) -> list:
        """The rows of block ``block`` (fewer than ``block_rows`` at the end of the data)."""
        if self._block[0] == block:
            return self._block[1]
        start = block * self.block_rows
        if self._rows is None or self._next_row != start:
            if self._rows is not None:
                self._rows.close()  # closes the file it reads
            self._rows, self._next_row = self.reader.rows(skip=start), start
        count = self.block_rows if self.max_rows is None else max(0, min(self.block_rows, self.max_rows - start))
        rows = list(itertools.islice(self._rows, count))
        self._next_row += len(rows)
        self.stats["rows_read"] += len(rows)
        self._block = (block, rows)
        return rows

    def _sample(self, row: dict | BadRow, index: int, count: bool) -> tuple[Any, int] | None:
        """(sample or (chosen, rejected), length) of a row; None for a skipped or unlabelled row."""
        result = {"error": row.message} if isinstance(row, BadRow) else row_result(row, index, self.opts)
        if result["error"]:
            if not self.skip_bad_rows:
                raise DataError(f"{self.name}: {result['error']} (--data.skip-bad-rows skips bad rows)")
            if count:
                self.stats["skipped_bad_rows"] += 1
                if len(self.stats["skipped_examples"]) < 5:
                    self.stats["skipped_examples"].append(result["error"])
                    log.warning("%s: skipped a bad row (%s)", self.name, result["error"])
            return None
        if result["labelled"] == 0:
            self.stats["dropped_unlabelled"] += count
            return None
        self.stats["samples"] += count
        self.stats["truncated"] += count and bool(result["truncated"])
        if self.preference:
            pair = (Sample(result["chosen_tokens"], result["chosen_labels"]),
                    Sample(result["rejected_tokens"], result["rejected_labels"]))
            return pair, result["length"]
        return Sample(result["tokens"], result["labels"]), result["length"]

    def draws(self, state: SamplerState, *, shuffle: bool = True, loop: bool = True) -> Iterator[Draw]:
        """(sample, length, state after it) from ``state`` on, through the epochs when ``loop``."""
        if state.sources:
            raise DataError(f"{self.name}: the saved data position holds {len(state.sources)} mixed sources, but the "
                            "data is one stream (was it saved by a data.mix run?)")
        seed, epoch, position, since_sample = state.seed, state.epoch, state.position, 0
        while True:
            block, offset = divmod(position, self.block_rows)
            rows = self._block_rows(block)
            if offset >= len(rows):
                if position == 0:
                    raise DataError(f"{self.name}: no rows")
                if since_sample >= position:
                    raise DataError(f"{self.name}: no usable samples in its {position} rows "
                                    f"({self.stats['skipped_bad_rows']} bad, {self.stats['dropped_unlabelled']} "
                                    "without a labelled token)")
                if not loop:
                    return
                epoch, position = epoch + 1, 0
                continue
            j = int(_block_order(seed, epoch, block, len(rows), shuffle)[offset])
            count = (epoch, position) >= self._counted
            position, since_sample = position + 1, since_sample + 1
            self._counted = max(self._counted, (epoch, position))
            taken = self._sample(rows[j], block * self.block_rows + j, count)
            if taken is not None:
                since_sample = 0
                yield taken[0], taken[1], SamplerState(seed, epoch, position)

    def plan(self, state: SamplerState, *, rows: int, seq_len: int, packing: bool, shuffle: bool,
             loop: bool) -> tuple[list[list[Any]], SamplerState]:
        """The next global batch's rows of samples and the state after it (``sampler.pack``)."""
        return pack(self.draws(state, shuffle=shuffle, loop=loop), state, rows=rows, seq_len=seq_len, packing=packing)

    def fetch(self, refs: list[Any]) -> list[Any]:
        """The samples of planned refs (a stream's refs are its samples)."""
        return list(refs)

    def __repr__(self) -> str:
        return f"StreamingDataset({self.name!r}, format={self.opts['fmt']!r}, block_rows={self.block_rows})"


def _stream(reader: RowReader, cfg: DataConfig, tokenizer: Tokenizer, name: str, max_rows: int | None) -> StreamingDataset:
    rows = reader.rows(0)
    first = next(rows, None)
    rows.close()
    if first is None:
        raise DataError(f"{name}: no rows")
    if isinstance(first, BadRow) and cfg.format == "auto":
        raise DataError(f"{name}: cannot tell the format from its first row: {first.message}")
    opts = row_options(cfg, tokenizer, list(first) if isinstance(first, dict) else [], name)
    return StreamingDataset(reader, opts, name=name, pad_id=tokenizer.pad_id, block_rows=cfg.shuffle_buffer,
                            max_rows=max_rows, skip_bad_rows=cfg.skip_bad_rows)


def build_stream(cfg: DataConfig, tokenizer: Tokenizer) -> StreamingDataset:
    """``cfg.source``'s ``cfg.split`` as a stream (its first ``cfg.max_samples`` rows)."""
    check(cfg)
    reader = open_rows(cfg.source, cfg.split, subset=cfg.subset, revision=cfg.revision, cache_dir=cfg.cache_dir)
    return _stream(reader, cfg, tokenizer, sources.describe(cfg.source, cfg.split), cfg.max_samples)


def build_eval_stream(cfg: DataConfig, tokenizer: Tokenizer) -> StreamingDataset | None:
    """The held-out data as a stream: ``cfg.eval_source``, or the source's ``cfg.eval_split`` (None
    when it has none)."""
    check(cfg)
    explicit = cfg.eval_source is not None
    source = cfg.eval_source if explicit else cfg.source
    if not explicit and sources.is_single_file(source):
        return None
    try:
        reader = open_rows(source, cfg.eval_split, subset=cfg.subset, revision=cfg.revision, cache_dir=cfg.cache_dir)
    except sources.MissingSplit:
        if explicit:
            raise
        return None
    return _stream(reader, cfg, tokenizer, sources.describe(source, cfg.eval_split), None)
