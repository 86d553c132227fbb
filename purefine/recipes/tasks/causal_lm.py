"""The causal-LM task: next-token loss on the supervised data ``--data.*`` describes.

Rows go through the data pipeline (formats, the tokenizer's chat template or a hand-written one,
loss masks, packing); the loss is the model's own (``models.loss_fn``), so pipeline parallelism can
run it in stages. The data may be one source, a stream (``--data.streaming``: needs
``--max-steps``) or a weighted mix (``data.mix``): then the held-out set is one per source (the
loop reports ``eval_loss/<source>``) and summary.json's ``samples_per_source`` says how many
samples each source gave, counted from the resumable draw sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from purefine import data
from purefine.errors import ConfigError
from purefine.recipes import setup
from purefine.recipes.tasks.base import Task


def _counted(stream: Iterator[tuple[Any, data.SamplerState]], mixed: data.MixedDataset, start: data.SamplerState,
             facts: dict) -> Iterator[tuple[Any, data.SamplerState]]:
    """``stream`` with ``facts["samples_per_source"]`` kept current (summary.json reads it at the end)."""
    before = mixed.start(start)
    counts = mixed.samples_per_source(before)
    facts["samples_per_source"] = counts
    for batch, state in stream:
        counts = {name: n + k for (name, n), k in zip(counts.items(), mixed.samples_per_source(state, before).values())}
        facts["samples_per_source"], before = counts, state
        yield batch, state


def _header(train_set: Any) -> str:
    if isinstance(train_set, data.MixedDataset):
        return "mix " + ", ".join(f"{n} {w:.2f}" for n, w in zip(train_set.names, train_set.weights))
    return "streaming" if data.is_stream(train_set) else ""


def build(cfg: Any, model_cfg: Any, params: Any, layout: Any) -> Task:
    """The causal-LM task over --data.source (or data.mix; held-out splits too) with the run's tokenizer."""
    streams = cfg.data.streaming
    if streams and cfg.max_steps is None:
        raise ConfigError("--data.streaming: give --max-steps (a stream is never counted, so --epochs cannot be "
                          "turned into steps)")
    tok_path = setup.tokenizer_path(cfg)
    tokenizer = data.load_tokenizer(tok_path, model_vocab_size=model_cfg.vocab_size)
    data_cfg = dataclasses.replace(cfg.data, max_seq_len=cfg.max_seq_len, seed=cfg.seed)
    with layout.main_first():  # rank 0 fills the tokenization cache, the others read it
        train_set, eval_set = data.build(data_cfg, tokenizer), data.build_eval(data_cfg, tokenizer)
    facts: dict[str, Any] = {}

    def stream(dataset: Any, state: data.SamplerState, *, shuffle: bool, loop: bool, rank: int = 0,
               world_size: int = 1) -> Iterator[tuple[Any, data.SamplerState]]:
        batches = data.batches(dataset, batch_size=cfg.batch_size, seq_len=cfg.max_seq_len, packing=cfg.data.packing,
                               sampler_state=state, shuffle=shuffle, loop=loop, rank=rank, world_size=world_size)
        if dataset is train_set and isinstance(train_set, data.MixedDataset):
            return _counted(batches, train_set, state, facts)
        return batches

    return Task("causal_lm", model_cfg, params, tok_path, train_set, eval_set, stream, packing=cfg.data.packing,
                header=_header(train_set), facts=facts)
