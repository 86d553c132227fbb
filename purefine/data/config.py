"""What data a run trains on, as the train CLI's ``--data.*`` flags and YAML ``data:`` keys.

- ``DataConfig``: one source (a file, directory, hub dataset or the bundled demo), its format,
  prompt template and loss masking, sequence length, packing, shuffling, streaming; or a weighted
  ``mix`` of sources (YAML only).
- ``MixSource``: one entry of ``data.mix``: a source with its own split, subset, format, column
  map, template options and ``weight``; unset options (None, an empty column map) follow the
  top-level ``--data.*`` ones.
- ``check(cfg)``: the rules a config must follow before any data is read (known template, sane
  lengths, positive mix weights, unique mix names), as ``ConfigError``s naming the flag or source.
- ``source_config(cfg, i)``: the single-source ``DataConfig`` of ``cfg.mix[i]``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import tyro

from purefine.data.sources import BUILTIN_DEMO
from purefine.data.templates import get_template
from purefine.errors import ConfigError

Format = Literal["auto", "alpaca", "chat", "text", "preference"]
TrainOn = Literal["assistant", "all", "last"]


@dataclass(frozen=True)
class MixSource:
    """One source of ``data.mix``; unset options (None) follow the top-level ``--data.*`` ones."""

    source: str
    """A local file or directory, a hub dataset name, or builtin:demo."""
    weight: float = 1.0
    """Share of the samples drawn from this source (weights are normalized; each must be > 0)."""
    name: str | None = None
    """Name in summary.json's samples_per_source and in eval_loss/<name> (default: the source as given)."""
    split: str | None = None
    """Split to train on (default: --data.split)."""
    subset: str | None = None
    """Hub dataset configuration."""
    revision: str | None = None
    """Hub dataset revision."""
    eval_split: str | None = None
    """Held-out split of this source (default: --data.eval-split; the source may have none)."""
    format: Format | None = None
    """Row format of this source (default: --data.format)."""
    template: str | None = None
    """Prompt template (default: --data.template)."""
    column_map: dict[str, str] = field(default_factory=dict)
    """Expected field -> column of this source."""
    train_on: TrainOn | None = None
    """Tokens that carry loss (default: --data.train-on)."""
    max_samples: int | None = None
    """Use only the first N rows of this source."""

    @property
    def label(self) -> str:
        """The source's name in summaries and metrics."""
        return self.name if self.name is not None else self.source


@dataclass(frozen=True)
class DataConfig:
    """Which data to train on and how to turn it into batches (the train CLI's ``--data.*``)."""

    source: str = BUILTIN_DEMO
    """A local json/jsonl/csv/parquet file or directory, a hub dataset name, or builtin:demo (the bundled demo)."""
    split: str = "train"
    """Split to train on (a single local file is its own split)."""
    subset: str | None = None
    """Hub dataset configuration (load_dataset's name=)."""
    revision: str | None = None
    """Hub dataset revision: branch, tag or commit."""
    eval_source: str | None = None
    """Held-out data; default: the eval split of --data.source (none if it has no such split)."""
    eval_split: str = "validation"
    """Split of the held-out data (a single local file is its own split)."""
    format: Format = "auto"
    """Row format; auto picks it from the columns (see --data.column-map for renamed ones)."""
    template: str = "auto"
    """Prompt template: auto (the tokenizer's chat template if it ships one, else alpaca), tokenizer, alpaca, llama2-chat, chatml, llama3 or none."""
    column_map: dict[str, str] = field(default_factory=dict)
    """Expected field -> dataset column, e.g. instruction question output answer."""
    train_on: TrainOn = "assistant"
    """Tokens that carry loss: assistant turns, all tokens, or the last assistant turn."""
    max_seq_len: Annotated[int, tyro.conf.Suppress] = 512
    """Samples are truncated to this many tokens; packed rows have this length (on the command line: --max-seq-len)."""
    packing: bool = True
    """Pack several samples per row (block-causal attention keeps them apart)."""
    shuffle: bool = True
    """Shuffle the training samples each epoch."""
    seed: Annotated[int, tyro.conf.Suppress] = 0
    """Seed of the sampler's shuffling (on the command line: --seed)."""
    max_samples: int | None = None
    """Use only the first N training rows."""
    skip_bad_rows: bool = False
    """Skip malformed rows (counted and reported) instead of stopping at the first."""
    num_proc: int | None = None
    """Processes for tokenization (datasets.map)."""
    cache_dir: str | None = None
    """Datasets cache directory (default: the Hugging Face cache)."""
    streaming: bool = False
    """Stream the data (datasets' streaming mode): rows are read, tokenized and packed on the fly, so the first step does not wait for the whole dataset; needs --max-steps."""
    shuffle_buffer: int = 10000
    """With --data.streaming: rows read and shuffled together (each block of this many rows is permuted)."""
    mix: tuple[MixSource, ...] = ()
    """Several sources drawn by weight (YAML: a list of {source, weight, split, format, template, ...}); replaces --data.source."""
    text_column: str = "text"
    """The text column for --task classify / mlm."""
    label_column: str = "label"
    """The label column for --task classify: class ids 0..C-1 or class names."""


def _check_mix(cfg: DataConfig) -> None:
    names: set[str] = set()
    for i, src in enumerate(cfg.mix):
        where = f"data.mix[{i}] ({src.source})"
        if not isinstance(src.weight, (int, float)) or not math.isfinite(src.weight) or src.weight <= 0:
            raise ConfigError(f"{where}: weight must be a finite number > 0, found {src.weight}")
        if src.max_samples is not None and src.max_samples <= 0:
            raise ConfigError(f"{where}: max_samples must be > 0, found {src.max_samples}")
        if src.template is not None:
            get_template(src.template)
        if src.label in names:
            raise ConfigError(f"{where}: the name {src.label!r} is used twice in data.mix; give each entry its own name")
        names.add(src.label)


def check(cfg: DataConfig) -> None:
    """Raise a ``ConfigError`` naming the flag (or mix source) for a config no data could satisfy."""
    get_template(cfg.template)
    if cfg.max_seq_len < 2:
        raise ConfigError(f"--data.max-seq-len must be at least 2, found {cfg.max_seq_len}")
    if cfg.train_on not in ("assistant", "all", "last"):
        raise ConfigError(f"--data.train-on must be assistant, all or last, found {cfg.train_on!r}")
    if cfg.shuffle_buffer < 1:
        raise ConfigError(f"--data.shuffle-buffer must be at least 1, found {cfg.shuffle_buffer}")
    _check_mix(cfg)


def source_config(cfg: DataConfig, index: int) -> DataConfig:
    """The single-source config of ``cfg.mix[index]``: its own options over the top-level ones."""
    src = cfg.mix[index]
    return dataclasses.replace(
        cfg, source=src.source, split=src.split if src.split is not None else cfg.split, subset=src.subset,
        revision=src.revision, eval_source=None,
        eval_split=src.eval_split if src.eval_split is not None else cfg.eval_split,
        format=src.format if src.format is not None else cfg.format,
        template=src.template if src.template is not None else cfg.template,
        column_map=dict(src.column_map) if src.column_map else dict(cfg.column_map),
        train_on=src.train_on if src.train_on is not None else cfg.train_on, max_samples=src.max_samples, mix=())
