"""``purefine data`` / ``scripts/data.py``: look at the data as training will see it.

    python scripts/data.py --preview 3                         # samples, trained text in [[...]]
    python scripts/data.py --preview 100 --json > samples.jsonl  # {"tokens": [...], "labels": [...]} per line
    python scripts/data.py --config my-mix.yaml                # statistics of a data.mix preset

The flags are the train command's ``--data.*``, ``--tokenizer`` / ``--checkpoint-dir`` / ``--model``
(which tokenizer), ``--max-seq-len`` and ``--seed``; ``--config`` reads them from a train preset
(flags left at their defaults take the preset's values).

- ``--preview N``: the first N samples in source order (a mix: in draw order), read as a stream, so a
  preview never tokenizes the whole dataset. Each shows its text with the trained tokens between
  ``[[`` and ``]]`` (special tokens written out). With ``--json``: one object per sample per line,
  ``labels`` aligned with ``tokens`` (``labels[t]`` is ``tokens[t]`` where that token is trained,
  else -100; not shifted as in batches).
- Otherwise: statistics (``data.stats``) — lengths, truncated samples, packing efficiency and the
  trained-token share — over the whole training set (``--rows``: the first N; streaming: the first
  10000 unless ``--rows`` says otherwise); ``--json`` prints them as one JSON object.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from purefine import data
from purefine.config import load_preset
from purefine.data import stats
from purefine.errors import ConfigError
from purefine.recipes import setup

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


@dataclass(frozen=True)
class DataPreviewConfig:
    """Show tokenized samples with their trained tokens marked, or statistics of the training data."""

    config: str | None = None
    """A train YAML preset (name or path): its data, tokenizer, checkpoint, model, lengths and seed become the defaults."""
    model: str = "llama-tiny"
    """Model preset whose bundled tokenizer is used when --tokenizer and --checkpoint-dir are not given."""
    checkpoint_dir: str | None = None
    """An HF model directory whose tokenizer to use."""
    tokenizer: str | None = None
    """Tokenizer file or directory (default: the checkpoint's, else the bundled demo tokenizer)."""
    init: Literal["auto", "random", "checkpoint"] = "auto"
    """As train's --init (random: the bundled demo tokenizer for a preset without weights)."""
    data: data.DataConfig = field(default_factory=data.DataConfig)
    max_seq_len: int = 256
    """Longest sequence after tokenization, as train's --max-seq-len."""
    seed: int = 0
    """Seed of the shuffle (statistics of packing follow the training order)."""
    batch_size: int = 8
    """Sequences per batch (the padding efficiency without packing)."""
    preview: int | None = None
    """Print this many tokenized samples (source order) with the trained tokens marked."""
    json: bool = False
    """One JSON object per sample per line ({"tokens", "labels"}), or the statistics as one JSON object."""
    rows: int | None = None
    """Samples the statistics cover (default: all; the first 10000 of a stream)."""


def with_preset(cfg: DataPreviewConfig) -> DataPreviewConfig:
    """``cfg`` with every field left at its default taken from the ``--config`` train preset."""
    if cfg.config is None:
        return cfg
    preset, defaults = load_preset(cfg.config), DataPreviewConfig()
    changes: dict[str, Any] = {}
    for name in ("model", "checkpoint_dir", "tokenizer", "init", "max_seq_len", "seed", "batch_size"):
        if getattr(cfg, name) == getattr(defaults, name):
            changes[name] = getattr(preset, name)
    changes["data"] = dataclasses.replace(cfg.data, **{
        f.name: getattr(preset.data, f.name) for f in dataclasses.fields(cfg.data)
        if getattr(cfg.data, f.name) == getattr(defaults.data, f.name)})
    return dataclasses.replace(cfg, **changes)


def aligned_labels(sample: data.Sample) -> list[int]:
    """(n,) labels aligned with the tokens: ``tokens[t]`` where it is trained, else -100 (a batch's
    labels are shifted: ``labels[t]`` is the target of position t, i.e. ``tokens[t + 1]``)."""
    return [data.IGNORE_INDEX, *sample.labels[:-1]] if sample.tokens else []


def marked_text(tokenizer: data.Tokenizer, tokens: list[int], labels: list[int]) -> str:
    """The sample's text, special tokens written out and trained runs between ``[[`` and ``]]``."""
    names = {i: t for t, i in tokenizer.special_tokens.items()}
    out = []
    for trained, run in itertools.groupby(zip(tokens, labels), key=lambda p: p[1] != data.IGNORE_INDEX):
        text = "".join(_pieces(tokenizer, [t for t, _ in run], names))
        out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
    return "".join(out)


def _pieces(tokenizer: data.Tokenizer, ids: list[int], names: dict[int, str]) -> Iterator[str]:
    """Runs of plain tokens decoded together; special tokens as their strings."""
    for special, group in itertools.groupby(ids, key=lambda i: i in names):
        group = list(group)
        yield "".join(names[i] for i in group) if special else tokenizer.decode(group)


def _samples(train_set: Any, n: int) -> Iterator[tuple[str, Any]]:
    """(source name, sample) of the first ``n`` samples, in source (or draw) order."""
    mixed = isinstance(train_set, data.MixedDataset)
    draws = train_set.draws(data.SamplerState(), shuffle=False, loop=mixed)
    for ref, _, _ in itertools.islice(draws, n):
        if mixed:
            yield train_set.names[ref[0]], train_set.parts[ref[0]].fetch([ref[1]])[0]
        else:
            yield train_set.name, ref


def preview(cfg: DataPreviewConfig, tokenizer: data.Tokenizer, data_cfg: data.DataConfig) -> None:
    """Print ``cfg.preview`` samples (see the module doc)."""
    train_set = data.build(dataclasses.replace(data_cfg, streaming=True), tokenizer)
    for k, (source, sample) in enumerate(_samples(train_set, cfg.preview or 0)):
        named = dict(zip(("chosen", "rejected"), sample)) if isinstance(sample, tuple) else {"": sample}
        if cfg.json:
            objs = {name: {"tokens": s.tokens, "labels": aligned_labels(s)} for name, s in named.items()}
            print(json.dumps(objs.get("", objs)))
            continue
        for name, s in named.items():
            labels = aligned_labels(s)
            trained = sum(x != data.IGNORE_INDEX for x in labels)
            print(f"=== sample {k}{f' {name}' if name else ''} ({source}): {len(s.tokens)} tokens, {trained} trained ===")
            print(marked_text(tokenizer, s.tokens, labels))


def _print_stats(report: dict[str, Any], indent: str = "") -> None:
    lengths, fill = report["lengths"], report.get("packing") or report.get("padding")
    kind = "packing" if "packing" in report else "padding"
    print(f"{indent}samples {report['samples']:,} | tokens {report['tokens']:,} | truncated {report['truncated']:,}")
    print(f"{indent}lengths min {lengths['min']} | mean {lengths['mean']:.1f} | median {lengths['median']:.0f} | "
          f"p95 {lengths['p95']:.0f} | max {lengths['max']}")
    print(f"{indent}trained tokens {report['trained_tokens']:,} ({100 * report['trained_share']:.1f}%) | {kind}: "
          f"{fill['rows']:,} rows, {100 * (fill['efficiency'] or 0):.1f}% of positions hold a token")
    for name, part in report.get("sources", {}).items():
        print(f"{indent}source {name} (weight {part['weight']:.2f}):")
        _print_stats(part, indent + "  ")


def main(cfg: DataPreviewConfig) -> dict[str, Any] | None:
    """Preview samples or print statistics (see the module doc); returns the statistics."""
    cfg = with_preset(cfg)
    if cfg.preview is not None and cfg.preview < 0:
        raise ConfigError(f"--preview: must be >= 0, found {cfg.preview}")
    if cfg.rows is not None and cfg.rows < 1:
        raise ConfigError(f"--rows: must be >= 1, found {cfg.rows}")
    tokenizer = data.load_tokenizer(setup.tokenizer_path(cfg))  # type: ignore[arg-type]
    data_cfg = dataclasses.replace(cfg.data, max_seq_len=cfg.max_seq_len, seed=cfg.seed)
    if cfg.preview is not None:
        preview(cfg, tokenizer, data_cfg)
        return None
    report = stats.statistics(data.build(data_cfg, tokenizer), seq_len=cfg.max_seq_len, packing=data_cfg.packing,
                              batch_size=cfg.batch_size, seed=cfg.seed, shuffle=data_cfg.shuffle, limit=cfg.rows)
    if cfg.json:
        print(json.dumps(report))
    else:
        _print_stats(report)
    sys.stdout.flush()
    return report
