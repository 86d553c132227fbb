"""Fuzzed malformed configs: every one is refused with a purefine error (ConfigError / CheckpointError),
never a TypeError, KeyError, ValueError, RecursionError, SystemExit or a hang.

- Train configs as dicts (``configio.merge`` / ``from_dict`` + ``config.validate``), as YAML presets
  (``config.load_preset``) and as command lines (``config.parse_train_args`` with ``--config FILE``
  and random flags). Each case is a valid base with one defect made on purpose (a wrong type, an
  unknown or non-string key, a non-mapping, a value out of range, NaN / inf / past int64, a broken
  or nested-too-deep or alias-bomb YAML file, an unknown flag, a bad flag value), so each must fail.
- HF ``config.json`` for every model family (``models.config_from_hf`` and, as files,
  ``checkpoint.read_config``): wrong types for every field, non-positive sizes, junk
  ``model_type`` / ``rope_scaling``, non-objects, invalid JSON or UTF-8, deep nesting. Random
  junk under arbitrary keys may be accepted (HF configs carry many keys purefine ignores) but must
  never raise anything but a purefine error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import assume, given
from hypothesis import strategies as st

from purefine import checkpoint, config, configio, models
from purefine.config import TrainConfig
from tests.fuzz_common import SCALARS, deep_json, fuzz_settings, junk, refuses, report, tolerates

MINIMUM = 300  # malformed config cases this module must refuse


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    report(request, "config", MINIMUM)


def leaf_fields(cls: type = TrainConfig, prefix: str = "") -> dict[str, Any]:
    """{dotted field name: annotation} of every non-dataclass field of ``cls`` (nested)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out |= leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            out[prefix + f.name] = tp
    return out


FIELDS = {k: v for k, v in leaf_fields().items() if k != "config"}  # a preset's own name replaces "config"
SECTIONS = ("lora", "data", "optim", "parallel")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number_text(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError, OverflowError):
        return False


def wrong_for(tp: Any, v: Any) -> bool:
    """True when ``v`` is not acceptable for annotation ``tp`` (this test's own, deliberately strict reading)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        return all(wrong_for(a, v) for a in args)
    if tp is type(None):
        return v is not None
    if origin is Literal:
        return not any(v == a and type(v) is type(a) for a in args)
    if tp is bool:
        return not isinstance(v, bool)
    if tp is int:
        return not is_int(v)
    if tp is float:  # numbers, and strings such as "3e-4" (YAML reads them as strings), are converted
        return isinstance(v, bool) or not (isinstance(v, (int, float)) or isinstance(v, str) and is_number_text(v))
    if tp is str:
        return not isinstance(v, str)
    if origin in (tuple, list):
        return not isinstance(v, (list, tuple)) or any(wrong_for(args[0], x) for x in v)
    if origin is dict:
        return not isinstance(v, dict) or any(not isinstance(k, str) or not isinstance(x, str) for k, x in v.items())
    raise AssertionError(f"no rule for {tp}")


def put(d: dict, dotted: str, value: Any) -> dict:
    """``d`` with ``value`` at the dotted key (nested dicts created as needed)."""
    *parents, last = dotted.split(".")
    node = d
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value
    return d


NEG_INT = st.integers(max_value=0) | st.just(-(2**70))
# (dotted field, strategy of values ``validate`` must refuse)
OUT_OF_RANGE: list[tuple[str, st.SearchStrategy]] = [
    *((f, NEG_INT) for f in ("batch_size", "grad_accum", "max_seq_len", "epochs", "max_steps", "lora.rank",
                             "log_every", "keep_last", "parallel.dp_replicate", "parallel.tp", "parallel.pp",
                             "data.max_samples", "data.num_proc")),
    *((f, st.integers(max_value=-1)) for f in ("optim.warmup_steps", "eval_every", "save_every", "eval_batches",
                                               "parallel.microbatches", "seed")),
    ("optim.lr", st.floats(max_value=0.0, allow_nan=False)),
    *((f, st.floats(max_value=-1e-12, allow_nan=False)) for f in ("lora.alpha", "optim.weight_decay",
                                                                  "optim.clip_norm", "optim.eps")),
    *((f, st.floats(max_value=-1e-12, allow_nan=False) | st.floats(min_value=1.0))
      for f in ("lora.dropout", "optim.b1", "optim.b2")),
    ("parallel.dp_shard", st.just(0) | st.integers(max_value=-2)),
    ("data.seed", st.integers(min_value=1, max_value=2**62)),  # disagrees with --seed 0
    ("data.max_seq_len", st.integers(min_value=2, max_value=2**62).filter(lambda n: n not in (256, 512))),
    ("model", st.text(max_size=20).filter(lambda s: s not in models.presets())),
    ("device", st.text(max_size=12).filter(lambda s: s not in ("auto", "cpu", "cuda", "mps")
                                            and not (s.startswith("cuda:") and s[5:].isdigit()))),
    ("lora.targets", st.just([]) | st.sampled_from([["("], ["q_proj", "[z-a]"], ["*"], ["(?P<"]])),
    ("init", st.just("checkpoint")),  # without --checkpoint-dir
    *((f, st.sampled_from([math.nan, math.inf, -math.inf, "nan", "inf", "-inf"]))
      for f, tp in FIELDS.items() if tp in (float, float | None)),
    *((f, st.sampled_from([2**63, -(2**63) - 1, 10**30])) for f, tp in FIELDS.items()
      if tp in (int, int | None) and f not in ("data.seed", "data.max_seq_len")),
]
NOISE: dict[str, st.SearchStrategy] = {  # valid values for fields no defect depends on
    "save_merged": st.booleans(), "plot": st.booleans(), "output_dir": st.text(min_size=1, max_size=10),
    "optim.schedule": st.sampled_from(["cosine", "linear", "constant"]), "peft": st.sampled_from(["none", "lora", "dora"]),
    "lora.rslora": st.booleans(), "data.packing": st.booleans(), "remat": st.booleans(),
}


@st.composite
def wrong_type(draw: st.DrawFn) -> tuple[str, Any]:
    name = draw(st.sampled_from(sorted(FIELDS)))
    value = draw(junk(6).filter(lambda v: wrong_for(FIELDS[name], v)))
    return name, value


@st.composite
def unknown_key(draw: st.DrawFn) -> tuple[str, Any]:
    section = draw(st.sampled_from(["", *SECTIONS]))
    known = {f.split(".")[-1] for f in FIELDS if f.startswith(section)} | set(SECTIONS)
    key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in known and "." not in k))
    return (f"{section}.{key}" if section else key), draw(junk(3))


@st.composite
def defective_dict(draw: st.DrawFn) -> dict:
    """A train-config dict with valid noise and one defect that must be refused."""
    d: dict = {}
    for name in draw(st.lists(st.sampled_from(sorted(NOISE)), max_size=3, unique=True)):
        put(d, name, draw(NOISE[name]))
    kind = draw(st.sampled_from(["wrong_type", "unknown_key", "range", "section", "odd_key"]))
    if kind == "wrong_type":
        put(d, *draw(wrong_type()))
    elif kind == "unknown_key":
        put(d, *draw(unknown_key()))
    elif kind == "range":
        name, values = draw(st.sampled_from(OUT_OF_RANGE))
        put(d, name, draw(values))
    elif kind == "section":  # a nested section that is not a mapping
        d[draw(st.sampled_from(SECTIONS))] = draw(junk(4).filter(lambda v: not isinstance(v, dict)))
    else:  # a key that is not a string (YAML allows them)
        key = draw(st.integers() | st.none() | st.booleans() | st.floats(allow_nan=False) | st.tuples(st.integers()))
        section = draw(st.sampled_from(["", *SECTIONS]))
        if section:
            d.setdefault(section, {})[key] = draw(SCALARS)
        else:
            d[key] = draw(SCALARS)
    return d


def build(d: Any, use_from_dict: bool) -> TrainConfig:
    cfg = configio.from_dict(TrainConfig, d, "fuzz") if use_from_dict else configio.merge(TrainConfig(), d, "fuzz")
    return config.validate(cfg)


@fuzz_settings(120)
@given(d=defective_dict(), use_from_dict=st.booleans())
def test_config_dicts_with_one_defect_are_refused(d, use_from_dict):
    refuses("config.dict", lambda: build(d, use_from_dict), d)


@fuzz_settings(15)
@given(top=junk(6).filter(lambda v: not isinstance(v, dict)), use_from_dict=st.booleans())
def test_non_mapping_configs_are_refused(top, use_from_dict):
    refuses("config.dict", lambda: build(top, use_from_dict), top)


BROKEN_YAML = ["key: [unclosed", "a: b: c", "- item\nkey: value", "\tlora: {rank: 4}", "x: *undefined",
               "lora: {rank: 4", "'unterminated", "!!python/object:os.system ['true']", "? [a\n: b", "%YAML 9.9\n---\na: 1"]


def alias_bomb(depth: int, width: int) -> str:
    """YAML whose value expands to width**depth strings through anchors (a billion-laughs file)."""
    layers = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    layers += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, depth)]
    return "lora:\n  targets: [" + ", ".join(layers) + "]\n"


@st.composite
def malformed_yaml(draw: st.DrawFn) -> bytes:
    """Bytes of a YAML preset that must be refused."""
    kind = draw(st.sampled_from(["defect", "top", "syntax", "utf8", "bomb"]))
    if kind in ("defect", "top"):
        not_mapping = junk(6).filter(lambda v: v is not None and not isinstance(v, dict))
        value = draw(defective_dict()) if kind == "defect" else draw(not_mapping)
        try:
            text = yaml.safe_dump(value, allow_unicode=True)
        except yaml.YAMLError:
            assume(False)
        try:  # "" / "..." load as an empty mapping: not malformed
            assume(yaml.safe_load(text) is not None)
        except yaml.YAMLError:
            pass  # e.g. a list as a key: malformed, as wanted
        return text.encode("utf-8", "surrogatepass")
    if kind == "syntax":
        base = yaml.safe_dump(draw(st.fixed_dictionaries({}, optional={k: NOISE[k] for k in ("plot", "remat")})))
        return (base + draw(st.sampled_from(BROKEN_YAML))).encode()
    if kind == "utf8":
        return b"max_steps: 3\noutput_dir: " + draw(st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]))
    return alias_bomb(draw(st.integers(4, 9)), draw(st.integers(4, 9))).encode()


@fuzz_settings(70)
@given(content=malformed_yaml())
def test_malformed_yaml_presets_are_refused(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("yaml") / "preset.yaml"
    path.write_bytes(content)
    refuses("config.yaml", lambda: config.validate(config.load_preset(str(path))), content[:200])


@pytest.mark.parametrize("depth", [1200, 30000])
def test_yaml_nested_past_the_recursion_limit_is_refused(tmp_path, depth):
    (tmp_path / "deep.yaml").write_text(f"lora: {deep_json(depth)}")  # PyYAML recurses per level
    error = refuses("config.yaml", lambda: config.load_preset(str(tmp_path / "deep.yaml")), f"depth {depth}")
    assert "deep.yaml" in str(error)


FLAG_TYPES = {"--" + name.replace("_", "-"): tp for name, tp in FIELDS.items()}
HELP = ("-h", "--help")
VALID_FLAGS = [["--max-steps", "3"], ["--lora.rank", "4"], ["--peft", "none"], ["--no-plot"], ["--optim.lr", "1e-3"],
               ["--data.no-packing"], ["--batch-size", "2"], ["--output-dir", "somewhere"], ["--save-merged"]]


@st.composite
def bad_flag(draw: st.DrawFn, yaml_dir: Path) -> list[str]:
    """One flag (with its value) that ``parse_train_args`` must refuse; no value is -h / --help."""
    kind = draw(st.sampled_from(["unknown", "int", "float", "choice", "range", "missing", "config"]))
    if kind == "unknown":
        name = draw(st.from_regex(r"--[a-z][a-z.\-]{0,15}", fullmatch=True).filter(
            lambda n: not any(known.startswith(n) for known in FLAG_TYPES)))
        return [name, draw(st.text(max_size=5).filter(lambda s: s not in HELP))]
    if kind in ("int", "float"):
        want = int if kind == "int" else float
        flag = draw(st.sampled_from(sorted(f for f, tp in FLAG_TYPES.items() if tp in (want, want | None))))
        value = draw(st.text(min_size=1, max_size=8).filter(
            lambda s: s.strip() not in ("None", "") and not is_number_text(s) and not s.startswith("-")))
        return [flag, value]
    if kind == "choice":
        flag = draw(st.sampled_from(sorted(f for f, tp in FLAG_TYPES.items() if typing.get_origin(tp) is Literal)))
        return [flag, draw(st.text(min_size=1, max_size=8).filter(
            lambda s: s not in typing.get_args(FLAG_TYPES[flag]) and not s.startswith("-")))]
    if kind == "range":
        name, values = draw(st.sampled_from([(n, v) for n, v in OUT_OF_RANGE if n not in ("lora.targets", "init")]))
        return ["--" + name.replace("_", "-"), str(draw(values.filter(lambda v: v not in HELP)))]
    if kind == "missing":
        # not --data.column-map: with no value it is a valid empty mapping
        return [draw(st.sampled_from(["--max-steps", "--lora.rank", "--config", "--optim.lr", "--peft"]))]
    path = yaml_dir / f"flags-{draw(st.integers(0, 10**9))}.yaml"
    path.write_bytes(draw(malformed_yaml()))
    return ["--config", str(path)]


@fuzz_settings(40)
@given(data=st.data())
def test_command_lines_with_a_bad_flag_are_refused(tmp_path_factory, data):
    groups = data.draw(st.lists(st.sampled_from(VALID_FLAGS), max_size=3))
    bad = data.draw(bad_flag(tmp_path_factory.mktemp("flags")))
    argv = [a for flags in [*groups, bad] for a in flags]  # last: a repeated flag's last value wins
    refuses("config.flags", lambda: config.parse_train_args(argv), argv)


# ------------------------------------------------------------------ HF config.json, every family
SMALLEST = {mt: min(models.family(mt).presets.values(), key=lambda c: c.num_params) for mt in models.FAMILIES}
DERIVED = {"bert": {"head", "label_names", "num_labels"}}  # read from architectures / id2label, not the key
SIZES = {"llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
         "gpt2": ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"),
         "bert": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size")}
SIZES["mistral"] = SIZES["qwen2"] = SIZES["qwen3"] = SIZES["gemma2"] = SIZES["phi3"] = SIZES["llama"]


def hf_fields(mt: str) -> dict[str, Any]:
    cls = type(SMALLEST[mt])
    hints = typing.get_type_hints(cls)
    skip = DERIVED.get(mt, set()) | {"rope_scaling"}  # rope_scaling: its own cases below
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in skip}


def hf_wrong(name: str, tp: Any, v: Any) -> bool:
    """Wrong for a config.json field: like ``wrong_for``, but a null means "the default" (fine), floats
    must be finite and take no strings, except ``rope_theta``, which is read with ``float()``."""
    if v is None:
        return False
    if isinstance(v, float) and not math.isfinite(v):
        return True
    if name == "rope_theta":
        return isinstance(v, (list, dict)) or isinstance(v, str) and not is_number_text(v)
    if tp in (float, float | None) and isinstance(v, str):
        return True
    return wrong_for(tp, v)


@st.composite
def defective_hf_config(draw: st.DrawFn) -> dict:
    mt = draw(st.sampled_from(sorted(models.FAMILIES)))
    d = SMALLEST[mt].to_hf()
    kind = draw(st.sampled_from(["type", "size", "model_type", "rope", "top"]))
    if kind == "type":
        fields = hf_fields(mt)
        name = draw(st.sampled_from(sorted(fields)))
        d[name] = draw(junk(5).filter(lambda v: hf_wrong(name, fields[name], v)))
        if name == "rope_theta":
            d.pop("rope_parameters", None)
    elif kind == "size":
        d[draw(st.sampled_from(SIZES[mt]))] = draw(st.integers(max_value=0) | st.integers(min_value=2**63))
    elif kind == "model_type":
        d["model_type"] = draw(junk(4).filter(lambda v: not (isinstance(v, str) and v in models.FAMILIES)))
    elif kind == "rope" and mt in ("llama", "mistral", "qwen2"):
        d["rope_scaling"] = draw(st.sampled_from([{"rope_type": "linear"}, {"rope_type": "llama3", "factor": 8.0},
                                                  {"rope_type": "linear", "factor": "x"}, {"rope_type": "yarn?"},
                                                  "linear", 5, [1, 2], {"rope_type": ["linear"]}]))
    else:
        return draw(junk(5).filter(lambda v: not isinstance(v, dict)))
    return d


@fuzz_settings(110)
@given(d=defective_hf_config())
def test_hf_config_dicts_with_one_defect_are_refused(d):
    refuses("config.hf", lambda: models.config_from_hf(d), d)


@fuzz_settings(40)
@given(mt=st.sampled_from(sorted(models.FAMILIES)),
       extra=st.dictionaries(st.text(max_size=30), junk(5), min_size=1, max_size=4))
def test_hf_configs_with_junk_keys_never_raise_anything_else(mt, extra):
    d = SMALLEST[mt].to_hf() | extra
    tolerates("config.hf-junk", lambda: models.config_from_hf(d), extra)


@st.composite
def malformed_config_json(draw: st.DrawFn) -> bytes | None:
    """config.json bytes that must be refused (None: a directory named config.json)."""
    kind = draw(st.sampled_from(["defect", "bytes", "truncated", "deep", "utf8", "dir"]))
    if kind == "defect":
        return json.dumps(draw(defective_hf_config())).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200).filter(lambda b: not _is_json_object(b)))
    if kind == "truncated":
        text = json.dumps(SMALLEST[draw(st.sampled_from(sorted(models.FAMILIES)))].to_hf())
        return text[: draw(st.integers(0, len(text) - 1))].encode()
    if kind == "deep":
        return deep_json(draw(st.integers(1500, 100000))).encode()
    if kind == "utf8":
        return b'{"model_type": "llama", "name": "\xff\xfe"}'
    return None


def _is_json_object(b: bytes) -> bool:
    try:
        return isinstance(json.loads(b), dict)
    except (ValueError, RecursionError):
        return False


@fuzz_settings(45)
@given(content=malformed_config_json())
def test_malformed_config_json_files_are_refused(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("hf")
    if content is None:
        (path / "config.json").mkdir()
    else:
        (path / "config.json").write_bytes(content)
    refuses("config.json-file", lambda: checkpoint.read_config(path), content and content[:200])
