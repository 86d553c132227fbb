"""The training and held-out sets a ``DataConfig`` describes: one source, a stream, or a weighted mix.

    train = build(cfg, tok)          # TokenizedDataset | StreamingDataset | MixedDataset
    held_out = build_eval(cfg, tok)  # one of those, {source name: dataset} for a mix, or None

- One source: tokenized up front and cached (``pipeline.build_split``), or with
  ``--data.streaming`` read as a stream (``streaming.build_stream``).
- ``data.mix``: each entry becomes its own single-source config (``config.source_config``: its
  split, format, template options over the top-level ones), built as above, and the parts are
  drawn from by weight (``mix.MixedDataset``). Held out: ``{name: that source's eval split}`` for
  the sources that have one (plus ``--data.eval-source`` under its own name), so the loop reports
  ``eval_loss/<name>`` per source.
- ``describe(dataset)``: "1,234 samples", or "a stream" when the size is unknown.
"""

from __future__ import annotations

from typing import Any

from purefine.data.config import DataConfig, check, source_config
from purefine.data.mix import MixedDataset
from purefine.data.pipeline import build_eval_split, build_split
from purefine.data.streaming import StreamingDataset, build_eval_stream, build_stream
from purefine.data.tokenizer import Tokenizer

__all__ = ["build", "build_eval", "describe", "is_stream"]


def _train_part(cfg: DataConfig, tokenizer: Tokenizer) -> Any:
    return build_stream(cfg, tokenizer) if cfg.streaming else build_split(cfg, tokenizer)


def _eval_part(cfg: DataConfig, tokenizer: Tokenizer) -> Any:
    return build_eval_stream(cfg, tokenizer) if cfg.streaming else build_eval_split(cfg, tokenizer)


def build(cfg: DataConfig, tokenizer: Tokenizer) -> Any:
    """The training set: ``cfg.source`` (streamed with ``cfg.streaming``), or the mix of ``cfg.mix``."""
    check(cfg)
    if not cfg.mix:
        return _train_part(cfg, tokenizer)
    parts = [_train_part(source_config(cfg, i), tokenizer) for i in range(len(cfg.mix))]
    return MixedDataset(parts, names=[s.label for s in cfg.mix], weights=[s.weight for s in cfg.mix])


def build_eval(cfg: DataConfig, tokenizer: Tokenizer) -> Any:
    """The held-out data: one dataset, ``{name: dataset}`` for a mix (the sources with an eval
    split), or None when there is none."""
    check(cfg)
    if not cfg.mix:
        return _eval_part(cfg, tokenizer)
    sets = {src.label: _eval_part(source_config(cfg, i), tokenizer) for i, src in enumerate(cfg.mix)}
    if cfg.eval_source is not None:
        sets[cfg.eval_source] = _eval_part(cfg, tokenizer)
    sets = {name: ds for name, ds in sets.items() if ds is not None}
    return sets or None


def is_stream(dataset: Any) -> bool:
    """Whether ``dataset``'s size is unknown (a stream, or a mix with a streamed source)."""
    if isinstance(dataset, MixedDataset):
        return any(is_stream(p) for p in dataset.parts)
    return isinstance(dataset, StreamingDataset)


def describe(dataset: Any) -> str:
    """The training set's size for a run's first line: "N samples", or "streamed samples"."""
    return "streamed samples" if is_stream(dataset) else f"{len(dataset)} samples"
