"""A deterministic, resumable sampler: which samples go into which batch rows, on which rank.

- ``SamplerState(seed, epoch, position, sources)``: everything needed to resume; ``position`` is
  the index, within epoch ``epoch``'s order, of the next sample not yet placed in a batch (for a
  stream: the next row of the stream; for a mix: the number of draws so far). ``sources`` holds
  the state of each mixed source (empty otherwise). Plain ints and lists, so ``to_dict`` /
  ``from_dict`` round-trip through JSON (a checkpoint's ``data_position``).
- ``epoch_order(n, seed, epoch, shuffle)``: the epoch's permutation (numpy PCG64 seeded by
  ``[seed, epoch]``, identical on every machine).
- ``pack(draws, start, rows=..., seq_len=..., packing=...)``: the packing plan over any stream of
  ``(sample ref, length, state after taking it)``. Greedy next-fit: samples join the current row
  while they fit in ``seq_len``; a sample that does not fit opens the next row; a sample that fits
  in no remaining row is left for the next batch (so no sample is ever split and nothing is
  carried between batches — the state alone says where to resume).
- ``plan_rows(lengths, state, rows=..., seq_len=..., packing=...)``: ``pack`` over an in-memory
  dataset's epochs: the next *global* batch as ``rows`` lists of sample indices, and the state.
  ``index_draws(lengths, state, ...)``: those epochs as draws (what a mix pulls from a source).

Every data-parallel rank plans the same global batch of ``batch_size * world_size`` rows from the
shared state and keeps rows ``[rank * batch_size, (rank + 1) * batch_size)``: ranks see disjoint
samples that together cover each epoch, take the same number of steps, and share one state.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from purefine.errors import DataError


@dataclass(frozen=True)
class SamplerState:
    """Where the sampler is: ``position`` indexes epoch ``epoch``'s order of the samples;
    ``sources`` are the states of a mix's sources (empty for a single dataset)."""

    seed: int = 0
    epoch: int = 0
    position: int = 0
    sources: tuple[SamplerState, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """{"seed", "epoch", "position"} (and "sources": a list of such dicts, for a mix): JSON-ready."""
        out: dict[str, Any] = {"seed": self.seed, "epoch": self.epoch, "position": self.position}
        if self.sources:
            out["sources"] = [s.to_dict() for s in self.sources]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplerState:
        """The state ``to_dict`` wrote; a missing or non-integer field is a ``DataError``."""
        fields: dict[str, Any] = {}
        for key in ("seed", "epoch", "position"):
            value = d.get(key) if isinstance(d, Mapping) else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DataError(f"sampler state: field {key!r} must be a non-negative integer, found {value!r}")
            fields[key] = value
        sources = d.get("sources", [])
        if not isinstance(sources, list):
            raise DataError(f"sampler state: field 'sources' must be a list of states, found {sources!r}")
        return cls(**fields, sources=tuple(cls.from_dict(s) for s in sources))


@functools.lru_cache(maxsize=4)
def _cached_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    order.setflags(write=False)
    return order


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """(n,) int64: the order of the sample indices in epoch ``epoch`` (read-only, cached)."""
    if seed < 0:
        raise DataError(f"sampler seed must be non-negative, found {seed}")
    return _cached_order(n, seed, epoch, shuffle)


Draw = tuple[Any, int, Any]  # (sample ref, length in tokens, state after taking it)


def pack(draws: Iterator[Draw], start: Any, *, rows: int, seq_len: int, packing: bool) -> tuple[list[list[Any]], Any]:
    """Up to ``rows`` rows of sample refs from ``draws``, and the state after the last one taken.

    A sample longer than ``seq_len`` counts as ``seq_len`` (it is truncated). Without packing each
    row holds one sample. The draw that opens row ``rows + 1`` is not taken: the returned state
    points at it. When ``draws`` ends, the last row may be partial (an empty list: nothing left).
    """
    out: list[list[Any]] = []
    current: list[Any] = []
    used, state = 0, start
    for ref, length, after in draws:
        length = min(int(length), seq_len)
        if current and (not packing or used + length > seq_len):
            out.append(current)
            current, used = [], 0
            if len(out) == rows:
                return out, state
        current.append(ref)
        used += length
        state = after
    if current:
        out.append(current)
    return out, state


def _epoch_draws(lengths: Sequence[int] | np.ndarray, seed: int, epoch: int, position: int, shuffle: bool,
                 loop: bool) -> Iterator[tuple[int, int, tuple[int, int]]]:
    """(index, length, (epoch, position) after it) through the epochs of an in-memory dataset."""
    n = len(lengths)
    while True:
        order = epoch_order(n, seed, epoch, shuffle)
        for pos in range(position, n):
            i = int(order[pos])
            after = (epoch + 1, 0) if loop and pos + 1 == n else (epoch, pos + 1)  # "epoch done" = next one's start
            yield i, int(lengths[i]), after
        if not loop:
            return
        epoch, position = epoch + 1, 0


def _start(lengths: Sequence[int] | np.ndarray, state: SamplerState, shuffle: bool, loop: bool) -> tuple[int, int]:
    """(epoch, position) to draw from next, after checking ``state`` against the dataset."""
    n = len(lengths)
    if n == 0:
        raise DataError("the dataset has no samples to sample from")
    if not 0 <= state.position <= n:
        raise DataError(f"sampler state position {state.position} is outside the dataset's {n} samples "
                        "(was the state saved for a different dataset?)")
    if state.sources:
        raise DataError(f"sampler state holds {len(state.sources)} mixed sources, but the data is one dataset "
                        "(was the state saved for a data.mix run?)")
    epoch_order(n, state.seed, state.epoch, shuffle)  # checks the seed
    if loop and state.position == n:
        return state.epoch + 1, 0
    return state.epoch, state.position


def index_draws(lengths: Sequence[int] | np.ndarray, state: SamplerState, *, shuffle: bool = True,
                loop: bool = True) -> Iterator[Draw]:
    """(sample index, length, ``SamplerState`` after it) through an in-memory dataset's epochs."""
    epoch, position = _start(lengths, state, shuffle, loop)
    for i, length, (e, p) in _epoch_draws(lengths, state.seed, epoch, position, shuffle, loop):
        yield i, length, SamplerState(state.seed, e, p)


def plan_rows(lengths: Sequence[int] | np.ndarray, state: SamplerState, *, rows: int, seq_len: int, packing: bool,
              shuffle: bool = True, loop: bool = True) -> tuple[list[list[int]], SamplerState]:
    """The next global batch: up to ``rows`` rows of sample indices, and the state after it.

    lengths (N,): tokens per sample (a sample longer than ``seq_len`` is truncated, so it counts as
    ``seq_len``). Without packing each row holds one sample. With ``loop`` the stream runs into the
    next epoch; without it, the last batch of the epoch may have fewer rows, and an empty list
    means the epoch is over.
    """
    epoch, position = _start(lengths, state, shuffle, loop)
    draws = _epoch_draws(lengths, state.seed, epoch, position, shuffle, loop)
    out, (epoch, position) = pack(draws, (epoch, position), rows=rows, seq_len=seq_len, packing=packing)
    return out, SamplerState(state.seed, epoch, position)


def rank_rows(global_rows: list[list[int]], *, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Rank ``rank``'s ``batch_size`` rows of a global batch; rows past the end are empty lists."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    mine = global_rows[rank * batch_size:(rank + 1) * batch_size]
    return mine + [[] for _ in range(batch_size - len(mine))]
