"""Where rows come from: the bundled demo, local files and directories, or the Hugging Face hub.

- ``load_split(source, split, ...)`` -> ``datasets.Dataset``: ``builtin:demo``; a local json / jsonl
  / csv / parquet file (``.gz`` / ``.bz2`` / ``.xz`` / ``.zst`` compressed too; a single file is its
  own split); a local directory (split files such as ``train.jsonl`` / ``validation.jsonl``, or the
  output of ``save_to_disk``); otherwise a hub dataset name, with ``subset`` and ``revision``.
  Every failure is a ``DataError`` naming the source: a path that does not exist, an unknown split
  (with the available ones), an unreadable file, or a hub that cannot be reached.
- ``fingerprint(rows, tokenizer, cfg, fmt, template)``: the cache key of a tokenization: the rows'
  own fingerprint, the tokenizer file's hash, the template (a chat template's text), the options
  and the data code's source.
- The bundled demo's paths: ``DEMO_TRAIN``, ``DEMO_EVAL``, ``DEMO_TOKENIZER`` (inside the package).
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import functools
import gzip
import hashlib
import json
import lzma
import os
from pathlib import Path
from typing import Any

import datasets

from purefine.data.chat_template import ChatTemplate
from purefine.errors import DataError

BUILTIN_DEMO = "builtin:demo"
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
DEMO_DIR = ASSETS_DIR / "demo"
DEMO_TRAIN = DEMO_DIR / "train.jsonl"
DEMO_EVAL = DEMO_DIR / "validation.jsonl"
DEMO_TOKENIZER = DEMO_DIR / "tokenizer.model"

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SAVED_MARKERS = ("dataset_dict.json", "state.json")


def file_builder(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def is_single_file(source: str) -> bool:
    """True when ``source`` is one local file (which holds exactly one split)."""
    return source != BUILTIN_DEMO and Path(source).expanduser().is_file()


def looks_like_path(source: str) -> bool:
    """A source meant as a local path: it starts like one or ends in a data-file extension."""
    return source.startswith((".", "/", "~")) or file_builder(Path(source)) is not None


def describe(source: str, split: str) -> str:
    """``source`` as errors name it: a file by its path, anything else with its split."""
    return source if is_single_file(source) else f"{source} (split {split})"


def csv_options(path: Path) -> dict[str, Any]:
    """CSV has no types: read every column as a string ("42" stays "42", "NA" stays "NA")."""
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower(), open)
    try:
        with opener(path, "rt", newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the CSV header ({e})") from None
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}), "keep_default_na": False}


def _check_json_lines(path: Path) -> None:
    """Refuse a json / jsonl file with a line that starts with ``null``: pyarrow's JSON reader, which
    ``datasets`` runs on blocks of whole lines, crashes the interpreter (a segfault, pyarrow 26) on a
    block whose first value is null."""
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower(), open)
    if path.suffix.lower() == ".zst":
        return
    try:
        with opener(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.lstrip().startswith(b"null"):
                    raise DataError(f"{path}: line {number}: expected a JSON object (one row), found null")
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


class MissingSplit(DataError):
    """The source exists but has no such split."""


def _split_of(loaded: Any, source: str, split: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise MissingSplit(f"{source}: no split {split!r}; available: {', '.join(loaded)}")
        return loaded[split]
    return loaded


def call_loader(source: str, wanted_split: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a datasets loader, turning its failures into ``DataError``s that name ``source``."""
    try:
        return fn(*args, **kwargs)
    except StopIteration:  # datasets' json reader on a file with no bytes
        raise DataError(f"{source}: cannot load (the file holds no rows)") from None
    except ConnectionError as e:
        raise DataError(
            f"{source}: cannot reach the Hugging Face Hub to load this dataset ({' '.join(str(e).split())[:160]}), "
            "and there is no local file or directory of that name. Download it where the hub is reachable "
            f"(hf download {source} --repo-type dataset --local-dir DIR) and pass --data.source DIR") from None
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(f"{source}: no such local path, and not found on the hub ({' '.join(str(e).split())[:200]})") from None
    except ValueError as e:
        if "Unknown split" in str(e) or "split" in str(e).lower() and "available" in str(e).lower():
            raise MissingSplit(f"{source}: no split {wanted_split!r} ({' '.join(str(e).split())[:200]})") from None
        raise DataError(f"{source}: cannot load ({' '.join(str(e).split())[:300]})") from None
    except (OSError, datasets.exceptions.DatasetGenerationError) as e:
        cause = e.__cause__ or e
        raise DataError(f"{source}: cannot read ({type(cause).__name__}: {' '.join(str(cause).split())[:300]})") from None


def _load(source: str, split: str, subset: str | None, revision: str | None, cache_dir: str | None) -> datasets.Dataset:
    if source == BUILTIN_DEMO:
        files = {"train": str(DEMO_TRAIN), "validation": str(DEMO_EVAL)}
        if split not in files:
            raise MissingSplit(f"{source}: no split {split!r}; available: train, validation")
        return call_loader(source, split, datasets.load_dataset, "json", data_files={split: files[split]}, split=split,
                     cache_dir=cache_dir)
    path = Path(source).expanduser()
    if path.is_file():
        builder = file_builder(path)
        if builder is None:
            raise DataError(f"{path}: unknown data file type {path.suffix!r}; expected .json, .jsonl, .csv or .parquet")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the data file is empty")
        if builder == "json":
            _check_json_lines(path)
        extra = csv_options(path) if builder == "csv" and path.suffix.lower() != ".zst" else {}
        return call_loader(source, split, datasets.load_dataset, builder, data_files={"train": str(path)}, split="train",
                     cache_dir=cache_dir, **extra)
    if path.is_dir():
        if any((path / m).is_file() for m in SAVED_MARKERS):
            return _split_of(call_loader(source, split, datasets.load_from_disk, str(path)), source, split)
        for file in (f for f in path.rglob("*") if file_builder(f) == "json" and f.is_file()):
            _check_json_lines(file)
        return call_loader(source, split, datasets.load_dataset, str(path), name=subset, split=split, cache_dir=cache_dir)
    if looks_like_path(source):
        raise DataError(f"{source}: data file or directory not found")
    return call_loader(source, split, datasets.load_dataset, source, name=subset, split=split, revision=revision,
                 cache_dir=cache_dir)


def load_split(source: str, split: str, *, subset: str | None = None, revision: str | None = None,
               cache_dir: str | None = None, missing_ok: bool = False) -> datasets.Dataset | None:
    """The rows of ``source``'s ``split`` (a single file ignores ``split``); with ``missing_ok``, None
    when the source exists but has no such split."""
    try:
        rows = _load(source, split, subset, revision, cache_dir)
    except MissingSplit:
        if missing_ok:
            return None
        raise
    if not isinstance(rows, datasets.Dataset):
        raise DataError(f"{source}: expected one split of rows, found {type(rows).__name__}")
    return rows


def _read_json_rows(path: Path) -> list[Any] | None:
    """A json / jsonl file's rows as Python values (a top-level list, or one value per line)."""
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower(), open)
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    try:
        whole = json.loads(text)
        if isinstance(whole, dict) and ".jsonl" in path.name.lower():
            return [whole]  # a JSON Lines file of one row
        return whole if isinstance(whole, list) else None
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def exact_json_columns(rows: datasets.Dataset, source: str) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """Undo ``datasets``' lossy reading of mixed-type JSON columns.

    A column that mixes types (strings in some rows, numbers or lists in others) is read as a
    ``Json`` feature that turns strings such as ``"3"`` into ``3``, so a row check would blame the
    wrong rows. A nested column with a NUL character in a field name does not read back at all
    (``_nul_keys``). For a local json / jsonl ``source``, such columns are re-read with Python's json
    and stored as JSON text; returns the rows and those column names (decode them with ``json.loads``).
    """
    mixed = [name for name, feature in rows.features.items() if isinstance(feature, datasets.Json) or _nul_keys(feature)]
    if not mixed or not is_single_file(source) or file_builder(Path(source).expanduser()) != "json":
        return rows, ()
    try:
        exact = _read_json_rows(Path(source).expanduser())
    except (OSError, EOFError, ValueError, RecursionError, lzma.LZMAError):  # ValueError: bad JSON or UTF-8
        return rows, ()
    if exact is None or len(exact) != len(rows) or not all(isinstance(r, dict) for r in exact):
        return rows, ()
    for name in mixed:
        values = [json.dumps(r[name]) if r.get(name) is not None else None for r in exact]
        if len(rows.column_names) == 1:  # removing the only column would leave a table of no rows
            rows = rows.add_column(f"{name}.json", values, feature=datasets.Value("string"))
            rows = rows.remove_columns(name).rename_column(f"{name}.json", name)
        else:
            rows = rows.remove_columns(name).add_column(name, values, feature=datasets.Value("string"))
    return rows, tuple(mixed)


def _nul_keys(feature: Any) -> bool:
    """Whether a nested feature has a field name with a NUL character: Arrow's C++ side cuts names
    there, so such a column does not read back (colliding names, missing keys) and is re-read exactly."""
    if isinstance(feature, dict):
        return any("\x00" in k or _nul_keys(v) for k, v in feature.items())
    if isinstance(feature, (list, tuple)):
        return any(_nul_keys(v) for v in feature)
    inner = getattr(feature, "feature", None)  # Sequence / List
    return inner is not None and _nul_keys(inner)


@functools.lru_cache(maxsize=16)
def _file_hash(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes when the tokenizer does: its file's bytes, else its observable behaviour."""
    path = getattr(tokenizer, "path", None)
    if path is not None and Path(path).is_file():
        st = os.stat(path)
        return _file_hash(str(path), st.st_mtime_ns, st.st_size)
    probe = "Hello, world! 123 \n\t <s> </s> <|im_start|> é 日本"
    facts = [type(tokenizer).__qualname__, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
             sorted(dict(tokenizer.special_tokens).items()), tokenizer.encode(probe)]
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    here = Path(__file__).parent
    files = ("formats.py", "templates.py", "chat_template.py", "pipeline.py")
    return hashlib.sha256(b"".join((here / f).read_bytes() for f in files)).hexdigest()


def fingerprint(rows: datasets.Dataset, tokenizer: Any, cfg: Any, fmt: str, template: Any = None) -> str:
    """The cache fingerprint of tokenizing ``rows`` with ``tokenizer`` under ``cfg`` (a DataConfig);
    ``template``: the resolved template (a tokenizer's chat template keys the cache by its text)."""
    options = {k: v for k, v in dataclasses.asdict(cfg).items()
               if k in ("template", "column_map", "train_on", "max_seq_len")}
    resolved = [template.source, template.special] if isinstance(template, ChatTemplate) else None
    key = [rows._fingerprint, tokenizer_fingerprint(tokenizer), fmt, options, resolved, _code_hash()]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
