"""A deterministic, resumable sampler: which samples go into which batch rows, on which rank.

- ``SamplerState(seed, epoch, position)``: everything needed to resume; ``position`` is the index,
  within epoch ``epoch``'s order, of the next sample not yet placed in a batch. Plain ints, so
  ``to_dict`` / ``from_dict`` round-trip through JSON.
- ``epoch_order(n, seed, epoch, shuffle)``: the epoch's permutation (numpy PCG64 seeded by
  ``[seed, epoch]``, identical on every machine).
- ``plan_rows(lengths, state, rows=..., seq_len=..., packing=...)``: the next *global* batch as
  ``rows`` lists of sample indices, and the state after it. Packing is greedy next-fit: samples
  join the current row while they fit in ``seq_len``; a sample that does not fit opens the next
  row; a sample that fits in no remaining row is left for the next batch (so no sample is ever
  split and nothing is carried between batches — the state alone says where to resume).

Every data-parallel rank plans the same global batch of ``batch_size * world_size`` rows from the
shared state and keeps rows ``[rank * batch_size, (rank + 1) * batch_size)``: ranks see disjoint
samples that together cover each epoch, take the same number of steps, and share one state.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from purefine.errors import DataError


@dataclass(frozen=True)
class SamplerState:
    """Where the sampler is: ``position`` indexes epoch ``epoch``'s order of the samples."""

    seed: int = 0
    epoch: int = 0
    position: int = 0

    def to_dict(self) -> dict[str, int]:
        """{"seed", "epoch", "position"}: JSON-serializable."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> SamplerState:
        """The state ``to_dict`` wrote; a missing or non-integer field is a ``DataError``."""
        fields = {}
        for key in ("seed", "epoch", "position"):
            value = d.get(key) if isinstance(d, Mapping) else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DataError(f"sampler state: field {key!r} must be a non-negative integer, found {value!r}")
            fields[key] = value
        return cls(**fields)


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


def plan_rows(lengths: Sequence[int] | np.ndarray, state: SamplerState, *, rows: int, seq_len: int, packing: bool,
              shuffle: bool = True, loop: bool = True) -> tuple[list[list[int]], SamplerState]:
    """The next global batch: up to ``rows`` rows of sample indices, and the state after it.

    lengths (N,): tokens per sample (a sample longer than ``seq_len`` is truncated, so it counts as
    ``seq_len``). Without packing each row holds one sample. With ``loop`` the stream runs into the
    next epoch; without it, the last batch of the epoch may have fewer rows, and an empty list
    means the epoch is over.
    """
    n = len(lengths)
    if n == 0:
        raise DataError("the dataset has no samples to sample from")
    if not 0 <= state.position <= n:
        raise DataError(f"sampler state position {state.position} is outside the dataset's {n} samples "
                        "(was the state saved for a different dataset?)")
    epoch, pos = state.epoch, state.position
    out: list[list[int]] = []
    current: list[int] = []
    used = 0
    while True:
        if pos == n:
            if not loop:
                break
            epoch, pos = epoch + 1, 0
        i = int(epoch_order(n, state.seed, epoch, shuffle)[pos])
        length = min(int(lengths[i]), seq_len)
        if current and (not packing or used + length > seq_len):
            out.append(current)
            current, used = [], 0
            if len(out) == rows:
                break
        current.append(i)
        used += length
        pos += 1
    if current and len(out) < rows:
        out.append(current)
    if loop and pos == n:  # one name for "epoch done": the start of the next
        epoch, pos = epoch + 1, 0
    return out, SamplerState(state.seed, epoch, pos)


def rank_rows(global_rows: list[list[int]], *, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Rank ``rank``'s ``batch_size`` rows of a global batch; rows past the end are empty lists."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    mine = global_rows[rank * batch_size:(rank + 1) * batch_size]
    return mine + [[] for _ in range(batch_size - len(mine))]
