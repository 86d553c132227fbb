"""Throughput of the data pipeline on the bundled demo: tokenization and packing, in samples per second.

``bench_pipeline()`` loads the demo's training split into a fresh temporary cache (so nothing is
read from an earlier run's cache and nothing is left behind), times the batched ``datasets.map``
tokenization, then times one full epoch of packed batches (planning, fetching and collation).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator

import datasets

from purefine.data.pipeline import DataConfig, batches, tokenize
from purefine.data.sampler import SamplerState
from purefine.data.sources import BUILTIN_DEMO, DEMO_TOKENIZER, load_split
from purefine.data.loader import load_tokenizer


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def bench_pipeline(*, batch_size: int = 8, seq_len: int = 256, template: str = "alpaca") -> dict:
    """{"samples", "tokens", "tokenize_samples_per_s", "pack_samples_per_s", "packing_efficiency", ...}
    for the demo's training split; packing_efficiency is the fraction of batch slots holding tokens."""
    tokenizer = load_tokenizer(DEMO_TOKENIZER)
    cfg = DataConfig(template=template, max_seq_len=seq_len)
    with tempfile.TemporaryDirectory(prefix="purefine-bench-") as cache, _quiet():
        rows = load_split(BUILTIN_DEMO, "train", cache_dir=cache)
        start = time.perf_counter()
        dataset = tokenize(rows, tokenizer, cfg, name="builtin:demo")
        tokenize_s = time.perf_counter() - start
        start = time.perf_counter()
        n_batches = slots = 0
        for batch, _ in batches(dataset, batch_size=batch_size, seq_len=seq_len, packing=True,
                                sampler_state=SamplerState(seed=0), loop=False):
            n_batches += 1
            slots += batch["tokens"].numel()
        pack_s = time.perf_counter() - start
    n, tokens = len(dataset), int(dataset.lengths.sum())
    return {"name": "data pipeline (demo, alpaca)", "samples": n, "tokens": tokens, "batches": n_batches,
            "batch_size": batch_size, "seq_len": seq_len,
            "tokenize_samples_per_s": round(n / tokenize_s, 1), "pack_samples_per_s": round(n / pack_s, 1),
            "packing_efficiency": round(tokens / slots, 4)}
