"""The ``Task`` record: what varies per task, as the training loop takes it (see ``recipes.tasks``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from purefine.train import labelled_tokens
from purefine.data import SamplerState

Stream = Callable[..., Iterator[tuple[Any, SamplerState]]]
LossBuilder = Callable[[Any, bool], Callable[[Any, Any], tuple]]


@dataclass(frozen=True)
class Task:
    """One task, ready for the loop.

    - ``model_cfg`` / ``params``: the model as the task needs it (BERT gets a fresh head), before PEFT.
    - ``tokenizer_path``: copied next to saved models.
    - ``train_set`` / ``eval_set``: datasets with ``lengths`` (N,) and ``len()`` (eval may be None).
    - ``stream(dataset, sampler_state, *, shuffle, loop, rank, world_size)``: (batch, state after it).
    - ``loss``: ``(gather, remat) -> loss_fn``; None for the model's own next-token loss (which
      pipeline parallelism can also run in stages).
    - ``count``: a batch's normalizer; ``full``: a regex of tensors trained in full beside adapters
      (``full_name`` says what they are).
    - ``packing``: whether rows are packed (steps per epoch); ``header``: words for the run's first
      line; ``facts``: task facts for summary.json.
    """

    name: str
    model_cfg: Any
    params: Any
    tokenizer_path: Path
    train_set: Any
    eval_set: Any
    stream: Stream
    loss: LossBuilder | None = None
    count: Callable[[Any], torch.Tensor] = labelled_tokens
    full: str | None = None
    full_name: str = "tensors trained in full"
    packing: bool = False
    header: str = ""
    facts: Mapping[str, Any] = field(default_factory=dict)
