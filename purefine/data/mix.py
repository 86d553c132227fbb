"""Weighted mixing (``data.mix``): samples drawn from several sources by weight, resumable exactly.

    mixed = MixedDataset(parts, names=("a.jsonl", "b.jsonl"), weights=(0.75, 0.25))
    for batch, state in batches(mixed, batch_size=8, seq_len=512, packing=True,
                                sampler_state=SamplerState(seed=0)):
        counts = mixed.samples_per_source(state)           # {"a.jsonl": 6, "b.jsonl": 2}

- Draw ``k`` comes from the source picked by a uniform number from numpy's PCG64 seeded
  by ``[seed, MIX_STREAM, k // BLOCK]`` placed on the cumulative normalized weights, so the whole
  draw sequence is a function of the seed alone. The numbers are stratified: every run of 64 draws
  takes one number in each 64th of [0, 1), in random order, so each source's share of any run of
  draws stays within a sample or so per 64 of its weight (i.i.d. draws would wander by
  sqrt(n w (1 - w)): 6 of 200 at 0.75). Each source then gives its own next sample: an
  in-memory source walks its own shuffled epochs, a streamed one its stream.
- State: ``SamplerState(seed, 0, draws taken, sources=(each source's state, ...))``; the sources'
  states start from seeds derived from the run's seed and the source's index. Resume continues the
  same draw sequence and each source from where it was.
- ``samples_per_source(state)``: how many samples each source gave up to ``state`` (counted from the
  draw sequence, so it survives resume).
- Every source must share the tokenizer (one pad id) and be all plain or all preference data.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from purefine.data.sampler import Draw, SamplerState, pack
from purefine.errors import ConfigError, DataError

MIX_STREAM = 0x6D6978  # "mix": keeps the draw sequence apart from the epoch orders of the same seed
STRATA = 64  # draws per stratified run: each run holds every source within one sample of its share
BLOCK = STRATA * STRATA  # draws per block generated (and cached) at once


@functools.lru_cache(maxsize=16)
def _block_sources(seed: int, block: int, cumulative: tuple[float, ...]) -> np.ndarray:
    """(BLOCK,) the source index of draws [block * BLOCK, (block + 1) * BLOCK): each run of STRATA
    draws takes one uniform number in each of STRATA equal strata of [0, 1), in random order."""
    rng = np.random.default_rng([seed, MIX_STREAM, block])
    strata = rng.permuted(np.tile(np.arange(STRATA), (BLOCK // STRATA, 1)), axis=1)
    u = ((strata + rng.random(strata.shape)) / STRATA).reshape(-1)
    return np.searchsorted(np.asarray(cumulative), u, side="right").clip(max=len(cumulative) - 1)


def _count(seed: int, start: int, stop: int, cumulative: tuple[float, ...]) -> np.ndarray:
    """(sources,) how many of draws [start, stop) come from each source."""
    counts = np.zeros(len(cumulative), dtype=np.int64)
    for block in range(start // BLOCK, -(-stop // BLOCK)):
        lo, hi = max(start - block * BLOCK, 0), min(stop - block * BLOCK, BLOCK)
        counts += np.bincount(_block_sources(seed, block, cumulative)[lo:hi], minlength=len(cumulative))
    return counts


def source_seed(seed: int, index: int) -> int:
    """The seed of source ``index``'s own shuffling (non-negative, from the run's seed)."""
    return int(np.random.SeedSequence([seed, MIX_STREAM, index]).generate_state(1)[0] >> 1)


class MixedDataset:
    """Several datasets (``TokenizedDataset`` or ``StreamingDataset``) drawn from by weight."""

    def __init__(self, parts: Sequence[Any], *, names: Sequence[str], weights: Sequence[float], name: str = "mix"):
        if not parts or len(parts) != len(names) or len(parts) != len(weights):
            raise ConfigError(f"{name}: needs one name and one weight per source")
        if any(not w > 0 for w in weights):
            bad = next(i for i, w in enumerate(weights) if not w > 0)
            raise ConfigError(f"data.mix[{bad}] ({names[bad]}): weight must be > 0, found {weights[bad]}")
        if len({p.preference for p in parts}) > 1 or len({p.pad_id for p in parts}) > 1:
            raise ConfigError(f"{name}: the sources {', '.join(names)} mix preference pairs with plain samples (or "
                              "tokenizers); mix sources of one kind")
        self.parts, self.names, self.name = tuple(parts), tuple(names), name
        total = float(sum(weights))
        self.weights = tuple(float(w) / total for w in weights)
        self.cumulative = tuple(float(c) for c in np.cumsum(self.weights))
        self.pad_id, self.preference = parts[0].pad_id, parts[0].preference

    @property
    def lengths(self) -> np.ndarray:
        """(N,) the lengths of every source's samples: an epoch of a mix is as many draws as the
        sources hold together (what --epochs counts)."""
        return np.concatenate([np.asarray(p.lengths) for p in self.parts])

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def start(self, state: SamplerState) -> SamplerState:
        """``state`` with every source's own state (a fresh state gets them from the seed)."""
        if not state.sources:
            if state.position or state.epoch:
                raise DataError(f"{self.name}: the saved data position is one dataset's, not a mix of "
                                f"{len(self.parts)} sources (was it saved by a run without data.mix?)")
            subs = tuple(SamplerState(seed=source_seed(state.seed, j)) for j in range(len(self.parts)))
            return SamplerState(state.seed, 0, 0, subs)
        if len(state.sources) != len(self.parts):
            raise DataError(f"{self.name}: the saved data position holds {len(state.sources)} sources, data.mix has "
                            f"{len(self.parts)} ({', '.join(self.names)})")
        return state

    def draws(self, state: SamplerState, *, shuffle: bool = True, loop: bool = True) -> Iterator[Draw]:
        """((source index, sample ref), length, state after it), draw after draw. Without ``loop``
        the mix ends after ``len(self)`` draws."""
        state = self.start(state)
        subs, pulls = list(state.sources), {}
        k = state.position
        while loop or k < len(self):
            j = int(_block_sources(state.seed, k // BLOCK, self.cumulative)[k % BLOCK])
            if j not in pulls:
                pulls[j] = self.parts[j].draws(subs[j], shuffle=shuffle, loop=True)
            ref, length, subs[j] = next(pulls[j])
            k += 1
            yield (j, ref), length, SamplerState(state.seed, 0, k, tuple(subs))

    def plan(self, state: SamplerState, *, rows: int, seq_len: int, packing: bool, shuffle: bool,
             loop: bool) -> tuple[list[list[Any]], SamplerState]:
        """The next global batch's rows of (source, ref) and the state after it (``sampler.pack``)."""
        state = self.start(state)
        return pack(self.draws(state, shuffle=shuffle, loop=loop), state, rows=rows, seq_len=seq_len, packing=packing)

    def fetch(self, refs: Sequence[tuple[int, Any]]) -> list[Any]:
        """The samples of planned (source, ref) pairs, fetched source by source, in order."""
        out: list[Any] = [None] * len(refs)
        for j, part in enumerate(self.parts):
            mine = [(n, ref) for n, (src, ref) in enumerate(refs) if src == j]
            for (n, _), sample in zip(mine, part.fetch([ref for _, ref in mine])):
                out[n] = sample
        return out

    def samples_per_source(self, state: SamplerState, since: SamplerState | None = None) -> dict[str, int]:
        """{source name: samples drawn from it} over the draws before ``state`` (after ``since``)."""
        start = since.position if since is not None else 0
        return dict(zip(self.names, (int(c) for c in _count(state.seed, start, state.position, self.cumulative))))

    def __repr__(self) -> str:
        return f"MixedDataset({dict(zip(self.names, self.weights))})"
