"""LoRA / DoRA adapters in Hugging Face PEFT's format: ``adapter_model.safetensors`` + ``adapter_config.json``.

- ``save_peft(path, cfg, params, base_model=None)``: the adapter alone, from the LoRA leaves (the base
  weights are never densified or written), loadable by ``peft.PeftModel.from_pretrained``.
- ``load_peft(path, params)``: an adapter directory applied to a base params tree -> params with LoRA
  leaves (what ``lora.apply`` would have made, with the adapter's values).

Key names are PEFT's for a ``LlamaForCausalLM`` (module path = the weight path without ``.weight``)::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight        A (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight        B (out, r)
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector  DoRA m (out,)

``target_modules`` is written as module names (``["q_proj", "v_proj"]``) when the adapter covers
every module of those names, else as PEFT's full-match regex over module paths. Differing ranks or
alphas are written as PEFT's ``rank_pattern`` / ``alpha_pattern``. Reading checks every key,
shape and config field and names the file: PEFT features purefine does not implement (LoRA
biases, embedding adapters, ...) are refused. A ``<module>.base_layer.weight`` entry (PEFT saves
the base of a targeted lm_head) replaces that base.

Families: a family's record declares ``peft_fields(cfg) -> dict``, the adapter_config fields that
differ for it. GPT-2 sets ``fan_in_fan_out: true`` (its Conv1D weights are (in, out) in HF files;
PEFT's A (r, in) and B (out, r) are the same either way, so only the flag differs). A BERT
classifier sets ``task_type: SEQ_CLS`` and ``modules_to_save`` (the head, trained in full next to
the adapters): those modules' tensors are written in full as ``base_model.model.<path>``, as PEFT
saves them, and ``load_peft`` puts them in place of the base's.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from purefine import fsutil, lora, models, tree
from purefine.checkpoint.hf import SafetensorsFile
from purefine.errors import CheckpointError, ConfigError

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
# PEFT key suffix -> LoRA child (None: the base weight PEFT may store for lm_head / embeddings).
SUFFIXES = {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b", ".lora_magnitude_vector": "magnitude",
            ".lora_magnitude_vector.weight": "magnitude", ".base_layer.weight": None}
# Config fields that change the math; any other value than these is refused.
UNSUPPORTED = {"bias": ("none", None), "lora_bias": (False, None),
               "layers_to_transform": (None, []), "layer_replication": (None,),
               "exclude_modules": (None, [], ""), "target_parameters": (None, []), "use_qalora": (False, None),
               "trainable_token_indices": (None, [], {})}


def _module(weight_path: str) -> str:
    if not weight_path.endswith(".weight"):
        raise ConfigError(f"save_peft: LoRA leaf at {weight_path!r} is not the '.weight' of a module; "
                          "PEFT cannot name it")
    return weight_path[: -len(".weight")]


def _host(t: torch.Tensor) -> torch.Tensor:
    if type(t).__name__ == "DTensor":  # sharded adapters: every rank must call save_peft
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _uniform(leaves: dict[str, lora.LoRA], field: str) -> Any:
    values = {getattr(leaf, field) for leaf in leaves.values()}
    if len(values) > 1:
        raise ConfigError(f"save_peft: all LoRA leaves must share {field} for one PEFT adapter, found {sorted(values)}")
    return values.pop()


def _pattern(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(most common value, {escaped module path: value} for the others): PEFT's *_pattern fields."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {re.escape(m): v for m, v in values.items() if v != common}


def target_modules(cfg: Any, modules: list[str]) -> list[str] | str:
    """Module names when ``modules`` are all the 2-D weights of those names in ``cfg``, else a regex."""
    names = sorted({m.rsplit(".", 1)[-1] for m in modules})
    shapes = models.param_shapes(cfg)
    unknown = [m for m in modules if m + ".weight" not in shapes]
    if unknown:
        raise ConfigError(f"save_peft: LoRA leaves at {unknown[:3]} are not weights of a {cfg.model_type} config")
    every = {p[: -len(".weight")] for p, s in shapes.items()
             if p.endswith(".weight") and len(s) == 2 and p.rsplit(".", 2)[-2] in names}
    if every == set(modules):
        return names
    return "(" + "|".join(re.escape(m) for m in modules) + ")"


def family_fields(cfg: Any) -> dict:
    """The adapter_config fields the config's family sets (``Family.peft_fields``)."""
    return dict(models.family(cfg).peft_fields(cfg))


def adapter_config(cfg: Any, leaves: dict[str, lora.LoRA], base_model: str | None) -> dict:
    """The ``adapter_config.json`` dict of PEFT's LoraConfig for these LoRA leaves (and the family's
    own fields: ``fan_in_fan_out`` for GPT-2, ``task_type`` / ``modules_to_save`` for a classifier)."""
    modules = {_module(p): leaf for p, leaf in leaves.items()}
    r, rank_pattern = _pattern({m: leaf.rank for m, leaf in modules.items()})
    alpha, alpha_pattern = _pattern({m: _number(leaf.alpha) for m, leaf in modules.items()})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": target_modules(cfg, list(modules)), "lora_dropout": _uniform(leaves, "dropout"),
        "use_rslora": _uniform(leaves, "rslora"), "use_dora": _uniform(leaves, "is_dora"),
        "fan_in_fan_out": False, "bias": "none", "lora_bias": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
        "revision": None, **family_fields(cfg),
    }


def save_peft(path: str | os.PathLike, cfg: Any, params: Any, *, base_model: str | None = None) -> Path:
    """Write the LoRA leaves of ``params`` as a PEFT adapter directory (atomically); returns its path.

    ``base_model`` becomes ``base_model_name_or_path`` (a hub id or directory of the base weights).
    Only A, B and DoRA magnitudes are read (an NF4 base stays packed), and the tensors of the
    family's ``modules_to_save`` (a classifier head) in full.
    """
    leaves = lora.adapters(params)
    if not leaves:
        raise ConfigError("save_peft: the params hold no LoRA leaves (apply lora.apply or load_peft first)")
    config = adapter_config(cfg, leaves, base_model)
    tensors = {PREFIX + p: _host(t) for p, t in saved_module_tensors(params, config.get("modules_to_save")).items()}
    for weight_path, leaf in leaves.items():
        key = PREFIX + _module(weight_path)
        tensors[key + ".lora_A.weight"] = _host(leaf.lora_a)
        tensors[key + ".lora_B.weight"] = _host(leaf.lora_b)
        if leaf.is_dora:
            tensors[key + ".lora_magnitude_vector"] = _host(leaf.magnitude)
    path = Path(path)
    with fsutil.atomic_dir(path) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def _under(path: str, entries: list[str]) -> bool:
    """True when a module above tensor ``path`` is named by a ``modules_to_save`` entry (PEFT's
    suffix match, at a dot boundary: ``classifier`` names ``classifier`` and ``x.classifier``)."""
    parts = path.split(".")
    modules = [".".join(parts[:k]) for k in range(1, len(parts))]
    return any(m == e or m.endswith("." + e) for m in modules for e in entries)


def saved_module_tensors(params: Any, entries: list[str] | None) -> dict[str, torch.Tensor]:
    """{tensor path: tensor} of the modules ``entries`` (``modules_to_save``) name in ``params``."""
    if not entries:
        return {}
    out = {}
    for path, leaf in tree.leaves_with_paths(params, is_leaf=tree.is_leaf):
        if _under(path, entries):
            if not isinstance(leaf, torch.Tensor):
                raise ConfigError(f"save_peft: {path} is in modules_to_save {entries} (trained in full), but "
                                  f"holds a {type(leaf).__name__}; leave it out of the LoRA targets")
            out[path] = leaf
    return out


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The validated ``adapter_config.json`` of an adapter directory (CheckpointError naming the file)."""
    file = Path(path) / CONFIG_NAME
    config = fsutil.read_json_object(file, CheckpointError, what="the adapter config")
    _check_config(file, config)
    return config


def _check_config(file: Path, c: dict) -> None:
    def bad(key: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{file}: {key}: expected {expected}, found {c.get(key)!r}")

    if c.get("peft_type") != "LORA":
        raise bad("peft_type", "'LORA'")
    if not isinstance(c.get("r"), int) or isinstance(c.get("r"), bool) or c["r"] <= 0:
        raise bad("r", "a positive integer")
    alpha = c.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise bad("lora_alpha", "a positive number")
    targets = c.get("target_modules")
    names = isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    if not (isinstance(targets, str) or names):
        raise bad("target_modules", "a list of module names or a regex string")
    dropout = c.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise bad("lora_dropout", "a number in [0, 1)")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(c.get(key, False), bool):
            raise bad(key, "true or false")
    saved = c.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
        raise bad("modules_to_save", "null or a list of module names")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(c.get(key) or {}, dict):
            raise bad(key, "an object of {module pattern: value}")
        kinds = int if key == "rank_pattern" else (int, float)
        for pattern, value in (c.get(key) or {}).items():
            if not isinstance(value, kinds) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                what = "a positive integer" if key == "rank_pattern" else "a positive number"
                raise CheckpointError(f"{file}: {key}[{pattern!r}]: expected {what}, found {value!r}")
    for pattern in [*(c.get("rank_pattern") or {}), *(c.get("alpha_pattern") or {}),
                    *([targets] if isinstance(targets, str) else [])]:
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as e:
            raise CheckpointError(f"{file}: {pattern!r} is not a valid regex ({e})") from None
    for key, allowed in UNSUPPORTED.items():
        if key in c and c[key] not in allowed:
            raise CheckpointError(f"{file}: {key}={c[key]!r} is not supported by purefine (supported: {allowed[0]!r})")


def _targeted(config: dict, module: str) -> bool:
    """PEFT's ``check_target_module_exists`` for target_modules (a list or a full-match regex)."""
    targets = config["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return module in targets or any(module.endswith("." + t) for t in targets)


def _pattern_value(pattern: dict, module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of ``module`` at a dot boundary."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_tensors(file: SafetensorsFile, config: dict) -> tuple[dict[str, dict[str | None, str]], dict[str, str]]:
    """({module: {child: key}} of the adapters, {tensor path: key} of the ``modules_to_save``
    tensors) from the adapter's keys; an unknown key is an error naming it."""
    modules: dict[str, dict[str | None, str]] = {}
    saved: dict[str, str] = {}
    entries = config.get("modules_to_save") or []
    for key in file.keys():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if key.startswith(PREFIX) and suffix is None and _under(key[len(PREFIX):], entries):
            saved[key[len(PREFIX):]] = key
            continue
        if not key.startswith(PREFIX) or suffix is None:
            raise CheckpointError(f"{file.path}: unexpected key {key!r}: expected {PREFIX}<module>"
                                  f"{{.lora_A.weight, .lora_B.weight, .lora_magnitude_vector}}")
        module = key[len(PREFIX): -len(suffix)]
        modules.setdefault(module, {})[SUFFIXES[suffix]] = key
    return modules, saved


def _conv1d(module: str) -> bool:
    """True when ``module`` holds a weight some family stores transposed in HF files (GPT-2's Conv1D)."""
    patterns = (fam.hf_transposed for fam in models.FAMILIES.values())
    return any(p is not None and re.fullmatch(p, module + ".weight") for p in patterns)


def _check_fan_in_fan_out(file: SafetensorsFile, config: dict, found: dict[str, dict]) -> None:
    """PEFT's fan_in_fan_out flag names the layout of the *base* weight; A and B are the same either
    way. Accept it where the base really is a Conv1D (GPT-2), refuse it elsewhere."""
    if config.get("fan_in_fan_out") and not all(_conv1d(m) for m in found):
        other = next(m for m in found if not _conv1d(m))
        raise CheckpointError(f"{CONFIG_NAME}: fan_in_fan_out=True is not supported by purefine for {other!r} "
                              f"(only for GPT-2's Conv1D layers) in {file.path.parent}")


def _saved_modules(file: SafetensorsFile, config: dict, saved: dict[str, str], weights: dict[str, Any]) -> dict:
    """{tensor path: tensor} of the ``modules_to_save`` tensors, each checked against the base's:
    every tensor of a named module present (an entry naming no module of the params, such as
    peft's ``score`` on BERT, is skipped as peft does), same shape, put in the base's dtype."""
    entries = config.get("modules_to_save") or []
    expected = [p for p, x in weights.items() if _under(p, entries)]
    for path in saved:
        if path not in weights or not isinstance(weights[path], torch.Tensor):
            raise CheckpointError(f"{file.path}: {PREFIX + path!r} (modules_to_save) is not a plain tensor of the params")
    missing = [p for p in expected if p not in saved]
    if missing:
        raise CheckpointError(f"{file.path}: modules_to_save {entries}: missing key {PREFIX + missing[0]!r}")
    return {p: _read(file, k, tuple(weights[p].shape), weights[p].dtype).to(weights[p].device) for p, k in saved.items()}


def _check_modules(file: SafetensorsFile, config: dict, found: dict[str, dict], weights: dict[str, Any]) -> None:
    """Targets and keys agree: every targeted module has A, B (and m for DoRA); no key is left over."""
    linear = {p[: -len(".weight")]: leaf for p, leaf in weights.items()
              if p.endswith(".weight") and len(leaf.shape) == 2}
    for module in found:
        if module not in linear:
            raise CheckpointError(f"{file.path}: the adapter targets {module!r}, which the params lack "
                                  f"(no 2-D {module}.weight)")
        if not _targeted(config, module):
            raise CheckpointError(f"{file.path}: unexpected keys for {module!r}, which target_modules "
                                  f"{config['target_modules']!r} does not select")
    children = ["lora_a", "lora_b"] + (["magnitude"] if config.get("use_dora") else [])
    peft_names = {"lora_a": ".lora_A.weight", "lora_b": ".lora_B.weight", "magnitude": ".lora_magnitude_vector"}
    for module in (m for m in linear if _targeted(config, m)):
        for child in children:
            if child not in found.get(module, {}):
                raise CheckpointError(f"{file.path}: missing key {PREFIX + module + peft_names[child]!r}")
    if not config.get("use_dora") and any("magnitude" in c for c in found.values()):
        raise CheckpointError(f"{file.path}: DoRA magnitude keys present but use_dora is false in {CONFIG_NAME}")


def _leaf(file: SafetensorsFile, config: dict, module: str, keys: dict, base: Any) -> lora.LoRA:
    """The LoRA leaf of one module, with shapes checked against the base (out, in)."""
    if lora.is_lora(base):
        raise CheckpointError(f"{file.path}: {module}.weight already has a LoRA adapter; load onto the base params")
    if None in keys:
        base = _read(file, keys[None], tuple(base.shape), base.dtype)
    out_features, in_features = base.shape
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    dtype, device = lora.adapter_dtype(base.dtype), lora.device_of(base)
    a = _read(file, keys["lora_a"], (rank, in_features), dtype).to(device)
    b = _read(file, keys["lora_b"], (out_features, rank), dtype).to(device)
    m = _read(file, keys["magnitude"], (out_features,), dtype).to(device) if config.get("use_dora") else None
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return lora.LoRA(base, a, b, m, float(alpha), bool(config.get("use_rslora", False)),
                     float(config.get("lora_dropout", 0.0)))


def _read(file: SafetensorsFile, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if file.shape(key) != tuple(shape):
        raise CheckpointError(f"{file.path}: {key!r} has shape {list(file.shape(key))}, expected {list(shape)}")
    t = file.read(key)
    if not t.is_floating_point():
        raise CheckpointError(f"{file.path}: {key!r} has dtype {t.dtype}, expected a floating-point tensor")
    return t.to(dtype)


def load_peft(path: str | os.PathLike, params: Any) -> Any:
    """Apply the PEFT LoRA adapter in directory ``path`` to the base ``params``; returns a new tree.

    Reads safetensors only (a pickled ``adapter_model.bin`` is refused). A missing file, an unknown or
    missing key, a shape mismatch or a target the params lack raises CheckpointError naming the file.
    """
    path = Path(path)
    config = read_adapter_config(path)
    weights_file = path / WEIGHTS_NAME
    if not weights_file.exists() and (path / "adapter_model.bin").exists():
        raise CheckpointError(f"{path}: only adapter_model.bin (pickle) found; purefine reads {WEIGHTS_NAME} only")
    file = SafetensorsFile(weights_file)
    found, saved = _read_tensors(file, config)
    weights = dict(tree.leaves_with_paths(params, is_leaf=tree.is_leaf))
    _check_modules(file, config, found, weights)
    _check_fan_in_fan_out(file, config, found)
    new = _saved_modules(file, config, saved, weights)
    new.update({m + ".weight": _leaf(file, config, m, keys, weights[m + ".weight"]) for m, keys in found.items()})
    return tree.map_with_path(lambda p, x: new.get(p, x), params, is_leaf=tree.is_leaf)
