"""Rows of a source read in order, from any row on, without loading the source: what streaming reads.

    reader = open_rows("big.jsonl", "train")
    for row in reader.rows(skip=1000):      # a dict per row, or a BadRow for a line that is not one
        ...

- Local JSON Lines files (``.json`` / ``.jsonl``, compressed with gzip / bz2 / xz too), the bundled
  demo and directories of such split files: read line by line with Python's json. Skipping rows
  counts lines without parsing them. (pyarrow's JSON reader, which ``datasets`` streams JSON with,
  crashes the interpreter on a block that starts with ``null``; checking for such lines would mean
  reading the whole file before step 1.) A line that is not a JSON object is a ``BadRow`` naming the
  file and line, so ``--data.skip-bad-rows`` can skip it.
- Everything else (csv, parquet, ``save_to_disk`` directories, other directories, hub datasets):
  ``datasets``' streaming mode (``IterableDataset``), skipping with ``IterableDataset.skip``.
- A source without the split raises ``sources.MissingSplit``; other failures a ``DataError``.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import datasets
from datasets.data_files import DataFilesDict, get_data_patterns

from purefine.data import sources
from purefine.errors import DataError

OPENERS: dict[str, Callable[..., IO[bytes]]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


@dataclass(frozen=True)
class BadRow:
    """A row that could not be read: ``message`` names the file and line."""

    message: str


def _parse_line(line: bytes, path: Path, number: int) -> dict | BadRow:
    try:
        value = json.loads(line)
    except UnicodeDecodeError as e:
        return BadRow(f"{path}: line {number}: not valid UTF-8 ({e.reason})")
    except (ValueError, RecursionError) as e:
        return BadRow(f"{path}: line {number}: not valid JSON ({' '.join(str(e).split())[:120]})")
    if not isinstance(value, dict):
        return BadRow(f"{path}: line {number}: expected a JSON object (one row), found {type(value).__name__}")
    return value


@dataclass(frozen=True)
class JsonLinesReader:
    """JSON Lines files read one line at a time (blank lines are not rows)."""

    files: tuple[Path, ...]
    name: str

    def rows(self, skip: int = 0) -> Generator[dict | BadRow, None, None]:
        """The rows from row ``skip`` on (the rows before it are counted, not parsed)."""
        index = 0
        for path in self.files:
            try:
                with OPENERS.get(path.suffix.lower(), open)(path, "rb") as f:
                    for number, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        index += 1
                        if index > skip:
                            yield _parse_line(line, path, number)
            except (OSError, EOFError, lzma.LZMAError) as e:
                raise DataError(f"{path}: cannot read ({e})") from None


@dataclass(frozen=True)
class IterableReader:
    """A ``datasets.IterableDataset`` (streaming mode), its failures turned into ``DataError``s."""

    dataset: Any
    name: str

    def rows(self, skip: int = 0) -> Generator[dict | BadRow, None, None]:
        """The rows from row ``skip`` on."""
        it = iter(self.dataset.skip(skip) if skip else self.dataset)
        while True:
            try:
                row = next(it)
            except StopIteration:
                return
            except (OSError, ValueError, TypeError, datasets.exceptions.DatasetGenerationError) as e:
                cause = e.__cause__ or e
                raise DataError(f"{self.name}: cannot read ({type(cause).__name__}: "
                                f"{' '.join(str(cause).split())[:300]})") from None
            yield row


RowReader = JsonLinesReader | IterableReader


def _is_json_lines(path: Path) -> bool:
    """A .json / .jsonl file (optionally compressed) whose first non-blank byte opens an object."""
    if sources.file_builder(path) != "json" or path.suffix.lower() == ".zst":
        return False
    try:
        with OPENERS.get(path.suffix.lower(), open)(path, "rb") as f:
            head = f.read(1 << 16).lstrip()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    return head.startswith(b"{")


def _split_files(path: Path, split: str) -> list[Path]:
    """The data files of ``split`` in a directory, as ``datasets`` names them (train.jsonl, ...)."""
    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except (datasets.data_files.EmptyDatasetError, FileNotFoundError) as e:
        raise DataError(f"{path}: no data files ({e})") from None
    if split not in found:
        raise sources.MissingSplit(f"{path}: no split {split!r}; available: {', '.join(found)}")
    return [Path(f) for f in found[split]]


def _streamed(source: str, wanted: str, *args: Any, **kwargs: Any) -> IterableReader:
    """``datasets.load_dataset(*args, streaming=True, **kwargs)`` for ``source``'s split ``wanted``."""
    loaded = sources.call_loader(source, wanted, datasets.load_dataset, *args, streaming=True, **kwargs)
    return IterableReader(loaded, sources.describe(source, wanted))


def _file_reader(path: Path, source: str, split: str, cache_dir: str | None) -> RowReader:
    builder = sources.file_builder(path)
    if builder is None:
        raise DataError(f"{path}: unknown data file type {path.suffix!r}; expected .json, .jsonl, .csv or .parquet")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the data file is empty")
    if _is_json_lines(path):
        return JsonLinesReader((path,), source)
    extra = sources.csv_options(path) if builder == "csv" and path.suffix.lower() != ".zst" else {}
    return _streamed(source, split, builder, data_files={"train": str(path)}, split="train", cache_dir=cache_dir, **extra)


def _dir_reader(path: Path, source: str, split: str, subset: str | None, cache_dir: str | None) -> RowReader:
    if any((path / m).is_file() for m in sources.SAVED_MARKERS):
        loaded = sources.call_loader(source, split, datasets.load_from_disk, str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise sources.MissingSplit(f"{source}: no split {split!r}; available: {', '.join(loaded)}")
            loaded = loaded[split]
        return IterableReader(loaded.to_iterable_dataset(), sources.describe(source, split))
    files = _split_files(path, split)
    if files and all(_is_json_lines(f) for f in files):
        return JsonLinesReader(tuple(files), sources.describe(source, split))
    return _streamed(source, split, str(path), name=subset, split=split, cache_dir=cache_dir)


def open_rows(source: str, split: str, *, subset: str | None = None, revision: str | None = None,
              cache_dir: str | None = None) -> RowReader:
    """A reader of ``source``'s ``split`` (a single file is its own split; see the module doc)."""
    if source == sources.BUILTIN_DEMO:
        files = {"train": sources.DEMO_TRAIN, "validation": sources.DEMO_EVAL}
        if split not in files:
            raise sources.MissingSplit(f"{source}: no split {split!r}; available: train, validation")
        return JsonLinesReader((files[split],), sources.describe(source, split))
    path = Path(source).expanduser()
    if path.is_file():
        return _file_reader(path, source, split, cache_dir)
    if path.is_dir():
        return _dir_reader(path, source, split, subset, cache_dir)
    if sources.looks_like_path(source):
        raise DataError(f"{source}: data file or directory not found")
    return _streamed(source, split, source, name=subset, split=split, revision=revision, cache_dir=cache_dir)
