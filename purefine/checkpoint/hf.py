"""Hugging Face checkpoint directories in and out.

- ``load_hf(path)``: config.json plus ``model.safetensors`` or shards with
  ``model.safetensors.index.json`` -> (config, params). Tensors are read one at a time with plain
  positioned reads (no mmap, whose touched pages would stay resident), converted to ``dtype`` and
  passed through ``hook(name, tensor)`` (NF4 quantizes there), so peak memory stays near the
  size of the final params. Every name and shape is checked against the config first: a missing,
  unexpected or misshapen tensor is an error before anything is read.
- ``save_hf(path, cfg, params)``: an HF directory ``transformers`` loads: size-bounded shards with
  an index, config.json; leaf kinds are materialized one tensor at a time. Written to a temporary
  directory and renamed into place.
- ``inspect(path)``: config, parameter count, dtypes and bytes, from headers alone.

Only safetensors is read; pickled ``.bin`` checkpoints are refused.

Where a family's files differ from its params, its ``Family`` record says how:
``checkpoint_name(cfg, file_name) -> params name | None`` (renames; None skips a tensor) and
``hf_transposed`` (a regex of weights the files store as (in, out): GPT-2's Conv1D), which
``models.hf_layout`` transposes on the way in and out.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from purefine import fsutil, models, tree
from purefine.errors import CheckpointError, ConfigError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Buffers some exporters write that are not parameters; recomputed from the config instead.
IGNORED = re.compile(r".*rotary_emb\.inv_freq")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
Hook = Callable[[str, torch.Tensor], Any]


class SafetensorsFile:
    """Header and positioned reads of one .safetensors file (validated by ``safetensors`` itself)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with safe_open(self.path, framework="pt") as f:  # validates header, offsets and file size
                self.metadata = f.metadata() or {}
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a valid safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        self.data_start = 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self.header[name]["dtype"]
        if code not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return DTYPES[code]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The tensor ``name`` (or a contiguous range of its first dimension) in fresh memory."""
        shape, dtype = list(self.shape(name)), self.dtype(name)
        begin, end = self.header[name]["data_offsets"]
        if rows is not None and shape:
            start, stop, _ = rows.indices(shape[0])
            row_bytes = (end - begin) // max(shape[0], 1)
            begin, end, shape[0] = begin + start * row_bytes, begin + stop * row_bytes, stop - start
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            got = f.readinto(memoryview(buf.numpy()))
        if got != end - begin:
            raise CheckpointError(f"{self.path}: tensor {name!r} is truncated ({got} of {end - begin} bytes)")
        return buf.view(dtype).reshape(shape)


def read_config(path: str | os.PathLike) -> tuple[Any, dict]:
    """(config, raw config.json dict) of an HF model directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    cfg_path = path / "config.json"
    raw = fsutil.read_json_object(cfg_path, CheckpointError, what="config.json")
    try:
        return models.config_from_hf(raw, str(cfg_path)), raw
    except ConfigError as e:
        raise CheckpointError(str(e) if str(cfg_path) in str(e) else f"{cfg_path}: {e}") from None


def tensor_index(path: str | os.PathLike) -> dict[str, Path]:
    """{tensor name: the safetensors file that holds it}, from the index or the single file."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError, OSError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
        for name, file in weight_map.items():
            if not isinstance(file, str) or not file or file != Path(file).name or file in (".", ".."):
                raise CheckpointError(f"{index}: weight_map[{name!r}]: expected a file name in {path}, "
                                      f"found {reprlib.repr(file)}")
        return {name: path / file for name, file in weight_map.items()}
    single = path / SINGLE_NAME
    if single.exists():
        return {name: single for name in SafetensorsFile(single).keys()}
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(f"{path}: only pickle weights (.bin/.pt) found; purefine reads safetensors only "
                              "(convert them with transformers' save_pretrained(safe_serialization=True))")
    raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} found")


def _check_names(path: Path, cfg: Any, index: Mapping[str, Path]) -> dict[str, tuple[int, ...]]:
    expected = models.param_shapes(cfg)
    found = {n for n in index if not IGNORED.fullmatch(n)}
    if cfg.tie_word_embeddings:
        found.discard("lm_head.weight")  # some exporters write the tied copy too
    missing = [n for n in expected if n not in found]
    unexpected = sorted(found - set(expected))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) the config needs are missing, e.g. {missing[:3]}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensor(s) for a {cfg.model_type} config, "
                              f"e.g. {unexpected[:3]}")
    return expected


def _group_by_file(names: list[str], index: Mapping[str, Path]) -> Iterator[tuple[SafetensorsFile, list[str]]]:
    files: dict[Path, list[str]] = {}
    for n in names:
        files.setdefault(index[n], []).append(n)
    for file, group in files.items():
        yield SafetensorsFile(file), group


def _file_names(cfg: Any, index: Mapping[str, Path]) -> dict[str, str]:
    """{params name: name in the checkpoint file}, through the family's ``checkpoint_name``."""
    rename = models.family(cfg).checkpoint_name
    names = {}
    for n in index:
        new = rename(cfg, n)
        if new in names:
            raise CheckpointError(f"checkpoint tensors {names[new]!r} and {n!r} both map to {new!r}")
        if new is not None:
            names[new] = n
    return names


def load_hf(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, hook: Hook | None = None,
    device: Any = "cpu", quantize: str | None = None, reader: Callable[[str, SafetensorsFile, str], Any] | None = None,
) -> tuple[Any, dict]:
    """Load an HF model directory -> (config, params tree keyed by the safetensors names).

    ``dtype`` converts floating tensors as they are read; ``hook(name, tensor)`` may replace each
    tensor by a leaf kind; ``quantize`` is a regex of weights to store in NF4 (QLoRA).
    ``reader(params name, file, name in the file)``, if given, replaces the read, conversion and
    hooks of each tensor after the checks (sharded loading: ``purefine.shard`` reads one rank's slice).
    """
    path = Path(path)
    cfg, _ = read_config(path)
    index = tensor_index(path)
    source = _file_names(cfg, index)
    index = {n: index[s] for n, s in source.items()}
    expected = _check_names(path, cfg, index)
    if quantize is not None:
        from purefine import nf4  # layer 2; imported only when asked for

        if not any(re.fullmatch(quantize, n) for n in expected):
            raise ConfigError(f"quantize: the pattern {quantize!r} matches no tensor of {path} "
                              f"(names look like {next(iter(expected))!r})")
        hook = nf4.quantize_hook(quantize, then=hook)
    flat: dict[str, Any] = {}
    for file, names in _group_by_file(list(expected), index):
        for name in names:
            want = tuple(models.hf_layout(cfg, name, torch.empty(expected[name], device="meta")).shape)
            if file.shape(source[name]) != want:
                raise CheckpointError(f"{file.path}: tensor {source[name]!r} has shape {list(file.shape(source[name]))}, "
                                      f"config.json implies {list(want)}")
        for name in names:
            if reader is not None:
                flat[name] = reader(name, file, source[name])
                continue
            t = models.hf_layout(cfg, name, file.read(source[name]))
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            t = t.to(device)
            flat[name] = hook(name, t) if hook is not None else t
    return cfg, tree.unflatten({n: flat[n] for n in expected})


def _shard_plan(items: list[tuple[str, Any]], dtype: torch.dtype | None, max_bytes: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, leaf) in enumerate(items):
        nbytes = torch.Size(leaf.shape).numel() * (dtype or leaf.dtype).itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def save_hf(
    path: str | os.PathLike, cfg: Any, params: Any, *, dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 << 30, extra_files: Mapping[str, str | os.PathLike] | None = None,
) -> Path:
    """Write an HF model directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

    Leaf kinds are written as their dense weight (LoRA merged, NF4 dequantized), one shard at a
    time. ``extra_files`` ({name in the directory: source}) copies e.g. tokenizer files alongside.
    """
    path = Path(path)
    items = tree.leaves_with_paths(params, is_leaf=tree.is_leaf)
    expected = models.param_shapes(cfg)
    names = [n for n, _ in items]
    if sorted(names) != sorted(expected):
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        raise CheckpointError(f"save_hf {path}: params do not match the config (missing {missing[:3]}, extra {extra[:3]})")
    order = {n: i for i, n in enumerate(expected)}
    items.sort(key=lambda item: order[item[0]])
    plan = _shard_plan(items, dtype, max_shard_bytes)
    out_dtype = dtype or items[0][1].dtype
    with fsutil.atomic_dir(path) as tmp:
        weight_map = {}
        for k, shard in enumerate(plan):
            file = SINGLE_NAME if len(plan) == 1 else f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
            tensors = {}
            for i in shard:
                name, leaf = items[i]
                t = leaf.dense(dtype) if tree.is_kind(leaf) else (leaf if dtype is None else leaf.to(dtype))
                tensors[name] = models.hf_layout(cfg, name, t.detach().to("cpu")).contiguous()
                weight_map[name] = file
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            del tensors
        if len(plan) > 1:
            total = sum(torch.Size(leaf.shape).numel() * (dtype or leaf.dtype).itemsize for _, leaf in items)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(out_dtype), indent=2))
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
    return path


def inspect(path: str | os.PathLike) -> dict:
    """Summary of a checkpoint from its headers: model type, config, parameter count, dtypes, bytes."""
    path = Path(path)
    cfg, _ = read_config(path)
    index = tensor_index(path)
    count, nbytes, dtypes = 0, 0, {}
    for file, names in _group_by_file(list(index), index):
        for name in names:
            n = torch.Size(file.shape(name)).numel()
            dt = str(file.dtype(name)).removeprefix("torch.")
            count, nbytes = count + n, nbytes + n * file.dtype(name).itemsize
            dtypes[dt] = dtypes.get(dt, 0) + n
    return {"path": str(path), "model_type": cfg.model_type, "config": cfg.to_hf(), "num_params": count,
            "dtypes": dtypes, "bytes": nbytes, "files": sorted({p.name for p in index.values()})}
