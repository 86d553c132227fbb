"""The causal-LM task: next-token loss on the supervised data ``--data.*`` describes.

Rows go through the data pipeline (formats, chat templates, loss masks, packing); the loss is the
model's own (``models.loss_fn``), so pipeline parallelism can run it in stages.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from purefine import data
from purefine.recipes import setup
from purefine.recipes.tasks.base import Task


def build(cfg: Any, model_cfg: Any, params: Any, layout: Any) -> Task:
    """The causal-LM task over --data.source (and its held-out split) with the run's tokenizer."""
    tok_path = setup.tokenizer_path(cfg)
    tokenizer = data.load_tokenizer(tok_path, model_vocab_size=model_cfg.vocab_size)
    data_cfg = dataclasses.replace(cfg.data, max_seq_len=cfg.max_seq_len, seed=cfg.seed)
    with layout.main_first():  # rank 0 fills the tokenization cache, the others read it
        train_set, eval_set = data.build(data_cfg, tokenizer), data.build_eval(data_cfg, tokenizer)

    def stream(dataset: Any, state: data.SamplerState, *, shuffle: bool, loop: bool, rank: int = 0,
               world_size: int = 1) -> Any:
        return data.batches(dataset, batch_size=cfg.batch_size, seq_len=cfg.max_seq_len, packing=cfg.data.packing,
                            sampler_state=state, shuffle=shuffle, loop=loop, rank=rank, world_size=world_size)

    return Task("causal_lm", model_cfg, params, tok_path, train_set, eval_set, stream, packing=cfg.data.packing)
