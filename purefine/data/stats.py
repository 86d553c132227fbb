"""What a training set looks like in numbers: lengths, truncation, packing efficiency, trained share.

    report = statistics(dataset, seq_len=512, packing=True, batch_size=8, seed=0)

- ``lengths``: min / mean / median / p95 / max tokens per sample (after truncation to ``seq_len``),
  ``tokens`` in all, ``truncated`` samples (cut at ``seq_len``).
- ``trained_tokens`` / ``trained_share``: the tokens that carry a label, over all tokens.
- ``packing``: the rows one epoch fills and the share of their positions that hold a token (with
  packing: rows of ``seq_len``; without: batches of ``batch_size`` padded to their longest sample).
- A ``TokenizedDataset`` counts every sample; a ``StreamingDataset`` its first ``limit`` samples in
  stream order (``rows_read`` says how far that read); a ``MixedDataset`` each source (``sources``)
  and all of them together.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pyarrow.compute as pc

from purefine.data.formats import IGNORE_INDEX
from purefine.data.mix import MixedDataset
from purefine.data.pipeline import TokenizedDataset
from purefine.data.sampler import SamplerState, plan_rows

DEFAULT_STREAM_LIMIT = 10000


def _labelled(column: Any, n: int) -> np.ndarray:
    """(n,) labelled positions per sample of an Arrow list column of labels."""
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
    return np.bincount(parents, weights=flat != IGNORE_INDEX, minlength=n).astype(np.int64)


def _arrays(dataset: Any, limit: int | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(lengths (N,), labelled tokens (N,), the dataset's own counters) of the samples counted."""
    if isinstance(dataset, TokenizedDataset):
        table = dataset.rows.with_format("arrow")[:len(dataset) if limit is None else limit]  # indices applied
        n = table.num_rows
        names = ("chosen_labels", "rejected_labels") if dataset.preference else ("labels",)
        labelled = sum(_labelled(table.column(c).combine_chunks(), n) for c in names)
        return np.asarray(dataset.lengths[:n], dtype=np.int64), labelled, dict(dataset.stats)
    draws = dataset.draws(SamplerState(), shuffle=False, loop=False)
    lengths, labelled = [], []
    for sample, length, _ in itertools.islice(draws, limit or DEFAULT_STREAM_LIMIT):
        pair = sample if isinstance(sample, tuple) else (sample,)
        lengths.append(length)
        labelled.append(sum(sum(x != IGNORE_INDEX for x in s.labels) for s in pair))
    return np.asarray(lengths, dtype=np.int64), np.asarray(labelled, dtype=np.int64), dict(dataset.stats)


def _fill(lengths: np.ndarray, seq_len: int, packing: bool, batch_size: int, seed: int, shuffle: bool) -> dict[str, Any]:
    """The rows one epoch fills and the share of their positions that hold a token."""
    used = np.minimum(lengths, seq_len)
    if not len(lengths):
        return {"rows": 0, "efficiency": None}
    if packing:
        rows, _ = plan_rows(lengths, SamplerState(seed=seed), rows=len(lengths) + 1, seq_len=seq_len, packing=True,
                            shuffle=shuffle, loop=False)
        return {"rows": len(rows), "efficiency": float(used.sum() / (len(rows) * seq_len))}
    padded = sum(len(chunk) * int(chunk.max()) for chunk in np.array_split(used, -(-len(used) // batch_size)))
    return {"rows": len(used), "efficiency": float(used.sum() / padded)}


def _report(lengths: np.ndarray, labelled: np.ndarray, counters: dict[str, Any], *, seq_len: int, packing: bool,
            batch_size: int, seed: int, shuffle: bool) -> dict[str, Any]:
    tokens = int(lengths.sum())
    low, mean, median, p95, high = ((lengths.min(), lengths.mean(), *np.percentile(lengths, [50, 95]), lengths.max())
                                    if len(lengths) else (0, 0.0, 0.0, 0.0, 0))
    out = {"samples": int(len(lengths)), "tokens": tokens,
           "lengths": {"min": int(low), "mean": float(mean), "median": float(median), "p95": float(p95), "max": int(high)},
           "truncated": int(counters.get("truncated", 0)), "trained_tokens": int(labelled.sum()),
           "trained_share": float(labelled.sum() / tokens) if tokens else 0.0,
           "packing" if packing else "padding": _fill(lengths, seq_len, packing, batch_size, seed, shuffle)}
    for key in ("rows", "rows_read", "skipped_bad_rows", "dropped_unlabelled"):
        if key in counters:
            out[key] = counters[key]
    return out


def statistics(dataset: Any, *, seq_len: int, packing: bool, batch_size: int = 8, seed: int = 0, shuffle: bool = True,
               limit: int | None = None) -> dict[str, Any]:
    """The numbers of the module doc for ``dataset`` (JSON-ready)."""
    kw = dict(seq_len=seq_len, packing=packing, batch_size=batch_size, seed=seed, shuffle=shuffle)
    if not isinstance(dataset, MixedDataset):
        return _report(*_arrays(dataset, limit), **kw)
    parts = [_arrays(p, limit) for p in dataset.parts]
    total = {"truncated": sum(int(c.get("truncated", 0)) for _, _, c in parts)}
    out = _report(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), total, **kw)
    out["sources"] = {name: _report(*p, **kw) | {"weight": w}
                      for name, p, w in zip(dataset.names, parts, dataset.weights)}
    return out
