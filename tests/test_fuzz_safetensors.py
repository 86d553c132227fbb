"""Fuzzed malformed safetensors files, index files, adapter and train-state checkpoints: every one is
refused with a CheckpointError (never SafetensorError, ValueError, KeyError, RuntimeError or a crash).

Each case starts from a valid file written by purefine for a tiny Llama (``save_hf``,
``save_peft``, ``checkpoint.state.save``) and makes one defect on purpose: a header length field
that lies, a header that is not a JSON object, entries that are not objects, unknown or
unsupported dtypes, shapes that disagree with the data length, offsets out of range or
overlapping, invalid UTF-8, bad ``__metadata__``, truncation, trailing bytes, random bytes. The
file is then read through ``SafetensorsFile`` (every tensor), ``load_hf``, ``load_peft`` or the
train-state loader. Random bit flips in the header may leave a valid file; for them only "a
purefine error or success" is required. safetensors validates headers in Rust and none of
thousands of cases crashed the interpreter, so the cases run in-process.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import purefine as pf
from purefine.checkpoint import hf
from purefine.checkpoint import state as train_state
from purefine.models.llama import LlamaConfig
from tests.fuzz_common import Blob, deep_json, fuzz_settings, junk, refuses, report, tolerates

MINIMUM = 500  # malformed checkpoint cases this module must refuse
CFG = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=16)
# dtypes safetensors knows but purefine does not read, and names it does not know at all
UNSUPPORTED_DTYPES = ["U16", "U32", "U64", "C64", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "F8_E4M3FNUZ"]
# (dtype, itemsize) purefine reads: a defect must not turn one F32 tensor into another 4-byte one
SUPPORTED_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    report(request, "safetensors", MINIMUM)


class Originals(dict):
    """The valid files and trees the cases start from (a short repr: hypothesis prints its arguments)."""

    def __repr__(self) -> str:
        return "originals"


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Originals:
    """A tiny model directory, a PEFT adapter of it and a train-state checkpoint, all written by purefine."""
    root = tmp_path_factory.mktemp("originals")
    params = pf.models.init(CFG, seed=0)
    pf.checkpoint.save_hf(root / "model", CFG, params)
    adapted = pf.lora.apply(params, rank=2, alpha=4, where=["q_proj", "v_proj"], seed=0)
    pf.checkpoint.save_peft(root / "adapter", CFG, adapted)
    opt = pf.optim.adamw(1e-3)
    state = pf.train.init(adapted, opt, trainable=pf.lora.trainable, seed=0).replace(step=3)
    step_dir = train_state.save(root / "state", state, pf.lora.trainable)
    return Originals(model=root / "model", adapter=root / "adapter", state=step_dir, params=params,
                     adapted=adapted, opt=opt)


def split(data: bytes) -> tuple[dict, bytes]:
    """(header dict, tensor bytes) of a safetensors file."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: Any, body: bytes, *, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def malformed_safetensors(original: bytes) -> st.SearchStrategy:
    """(defect kind, file bytes) of a safetensors file that must be refused."""
    return _malformed_safetensors(original).map(lambda kind_content: (kind_content[0], Blob(kind_content[1])))


@st.composite
def _malformed_safetensors(draw: st.DrawFn, original: bytes) -> tuple[str, bytes]:
    header, body = split(original)
    names = [k for k in header if k != "__metadata__"]
    name = draw(st.sampled_from(names))
    entry = dict(header[name])
    kind = draw(st.sampled_from(["length", "not_object", "entry", "dtype", "shape", "offsets", "truncate",
                                 "extend", "utf8", "metadata", "random", "tiny"]))
    if kind == "length":  # a header length field that lies (too short, too long, past the file)
        true = len(original) - len(body) - 8
        return kind, join(json.dumps(header).encode(), body, length=draw(
            st.integers(0, 2**64 - 1).filter(lambda n: n != true)))
    if kind == "not_object":
        return kind, join(draw(junk(5).filter(lambda v: not isinstance(v, dict))), body)
    if kind == "entry":
        return kind, join(header | {name: draw(junk(4).filter(lambda v: not isinstance(v, dict)))}, body)
    if kind == "dtype":
        dtype = draw(st.sampled_from(UNSUPPORTED_DTYPES) | junk(3).filter(
            lambda v: not (isinstance(v, str) and v in SUPPORTED_SIZES)))
        return kind, join(header | {name: entry | {"dtype": dtype}}, body)
    if kind == "shape":
        numel = (entry["data_offsets"][1] - entry["data_offsets"][0]) // SUPPORTED_SIZES[entry["dtype"]]
        shape = draw(st.lists(st.integers(-3, 2**66), max_size=4).filter(
            lambda s: any(d < 0 or d >= 2**64 for d in s) or torch.Size(s).numel() != numel) | junk(3).filter(
            lambda v: not isinstance(v, list)))
        return kind, join(header | {name: entry | {"shape": shape}}, body)
    if kind == "offsets":
        offsets = draw(st.lists(st.integers(-5, 2**65), min_size=2, max_size=2).filter(
            lambda o: o != entry["data_offsets"]) | st.lists(st.integers(0, len(body)), max_size=4).filter(
            lambda o: len(o) != 2) | junk(3).filter(lambda v: not isinstance(v, list)))
        return kind, join(header | {name: entry | {"data_offsets": offsets}}, body)
    if kind == "truncate":
        return kind, original[: draw(st.integers(0, len(original) - 1))]
    if kind == "extend":
        return kind, original + draw(st.binary(min_size=1, max_size=64))
    if kind == "utf8":
        text = json.dumps(header).encode()
        at = text.index(name.encode())
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"]))
        return kind, join(text[:at] + bad + text[at:], body)
    if kind == "metadata":
        bad = draw(junk(4).filter(lambda v: not (isinstance(v, dict) and all(isinstance(x, str) for x in v.values()))
                                  and v is not None))
        return kind, join(header | {"__metadata__": bad}, body)
    if kind == "random":
        return kind, draw(st.binary(min_size=8, max_size=300))
    return kind, draw(st.binary(max_size=7))


def read_all(path: Path) -> None:
    """Open ``path`` and read every tensor (whole and its first row) with its dtype and shape."""
    file = hf.SafetensorsFile(path)
    for name in file.keys():
        file.shape(name), file.dtype(name)
        file.read(name)
        if file.shape(name):
            file.read(name, slice(0, 1))


@fuzz_settings(250)
@given(data=st.data())
def test_malformed_safetensors_files_are_refused(originals, tmp_path_factory, data):
    kind, content = data.draw(malformed_safetensors((originals["model"] / hf.SINGLE_NAME).read_bytes()))
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    path.write_bytes(content)
    refuses(f"safetensors.file.{kind}", lambda: read_all(path), content[:160])


def copy_dir(src: Path, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("dir") / src.name
    shutil.copytree(src, dst)
    return dst


@fuzz_settings(60)
@given(data=st.data())
def test_load_hf_refuses_a_malformed_weights_file(originals, tmp_path_factory, data):
    path = copy_dir(originals["model"], tmp_path_factory)
    kind, content = data.draw(malformed_safetensors((path / hf.SINGLE_NAME).read_bytes()))
    (path / hf.SINGLE_NAME).write_bytes(content)
    quantize = data.draw(st.sampled_from([None, r".*mlp.*\.weight"]))
    refuses(f"safetensors.load_hf.{kind}", lambda: pf.checkpoint.load_hf(path, quantize=quantize), content[:160])


@fuzz_settings(60)
@given(data=st.data())
def test_header_bit_flips_never_raise_anything_but_a_purefine_error(originals, tmp_path_factory, data):
    path = copy_dir(originals["model"], tmp_path_factory)
    content = bytearray((path / hf.SINGLE_NAME).read_bytes())
    header_end = 8 + struct.unpack("<Q", content[:8])[0]
    for at in data.draw(st.lists(st.integers(0, header_end - 1), min_size=1, max_size=6)):
        content[at] ^= 1 << data.draw(st.integers(0, 7))
    (path / hf.SINGLE_NAME).write_bytes(bytes(content))
    tolerates("safetensors.bitflip", lambda: pf.checkpoint.load_hf(path), bytes(content[:160]))


@st.composite
def malformed_config_for(draw: st.DrawFn) -> dict:
    """A valid-looking config.json that disagrees with the tiny checkpoint's tensors."""
    field = draw(st.sampled_from(["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_key_value_heads", "attention_bias", "mlp_bias"]))
    d = CFG.to_hf()
    if isinstance(d[field], bool):
        d[field] = not d[field]
    elif field == "num_hidden_layers":  # not huge: a layer count is a loop over layers
        d[field] = draw(st.integers(2, 4))
    else:
        d[field] = draw(st.sampled_from([2, 4, 10**6, 10**12, 2**40]).filter(lambda v: v != d[field]))
        if field == "hidden_size":
            del d["head_dim"]
    return d


@fuzz_settings(25)
@given(d=malformed_config_for())
def test_load_hf_refuses_a_config_that_disagrees_with_the_tensors(originals, tmp_path_factory, d):
    path = copy_dir(originals["model"], tmp_path_factory)
    (path / "config.json").write_text(json.dumps(d))
    refuses("safetensors.config_mismatch", lambda: pf.checkpoint.load_hf(path), d)


@st.composite
def malformed_index(draw: st.DrawFn, names: list[str]) -> bytes:
    """model.safetensors.index.json bytes that must be refused for the tiny checkpoint."""
    weight_map = {n: hf.SINGLE_NAME for n in names}
    kind = draw(st.sampled_from(["json", "no_map", "map_type", "file_type", "escape", "missing_file", "drop", "extra",
                                 "deep", "utf8"]))
    if kind == "json":
        return draw(st.binary(max_size=100).filter(lambda b: not b.strip().startswith(b"{")))
    if kind == "no_map":
        return json.dumps(draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "weight_map"), junk(3)))).encode()
    if kind == "map_type":
        return json.dumps({"weight_map": draw(junk(4).filter(lambda v: not isinstance(v, dict)))}).encode()
    name = draw(st.sampled_from(names))
    if kind == "file_type":
        weight_map[name] = draw(junk(3).filter(lambda v: not isinstance(v, str)))
    elif kind == "escape":
        weight_map[name] = draw(st.sampled_from(["../model/model.safetensors", "/etc/passwd", "sub/model.safetensors",
                                                 "..", ".", "", "./model.safetensors"]))
    elif kind == "missing_file":
        weight_map[name] = draw(st.text(min_size=1, max_size=12).filter(
            lambda s: "/" not in s and "\x00" not in s and s not in (".", "..", hf.SINGLE_NAME)))
    elif kind == "drop":
        del weight_map[name]
    elif kind == "extra":
        weight_map[draw(st.text(min_size=1, max_size=20).filter(lambda s: s not in weight_map))] = hf.SINGLE_NAME
    elif kind == "deep":
        return ('{"weight_map": ' + deep_json(draw(st.integers(1500, 50000))) + "}").encode()
    else:
        return b'{"weight_map": {"\xff": "model.safetensors"}}'
    return json.dumps({"metadata": {}, "weight_map": weight_map}).encode()


@fuzz_settings(60)
@given(data=st.data())
def test_load_hf_refuses_a_malformed_index(originals, tmp_path_factory, data):
    path = copy_dir(originals["model"], tmp_path_factory)
    names = hf.SafetensorsFile(path / hf.SINGLE_NAME).keys()
    content = data.draw(malformed_index(names).map(Blob))
    (path / hf.INDEX_NAME).write_bytes(content)
    refuses("safetensors.index", lambda: pf.checkpoint.load_hf(path), content[:200])


ADAPTER_DEFECTS: dict[str, st.SearchStrategy] = {
    "peft_type": junk(3).filter(lambda v: v != "LORA"),
    "r": junk(3).filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool) and v > 0))
    | st.sampled_from([1, 3, 64]),
    "lora_alpha": junk(3).filter(lambda v: not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)),
    "target_modules": junk(3).filter(lambda v: not isinstance(v, str) and not (isinstance(v, list) and v))
    | st.sampled_from([["k_proj"], ["q_proj"], "nothing", ["q_proj", "v_proj", 1]]),
    "lora_dropout": junk(3).filter(lambda v: not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1)),
    "use_dora": junk(3).filter(lambda v: v not in (False, None, 0)),
    "use_rslora": junk(3).filter(lambda v: not isinstance(v, bool)),
    "rank_pattern": junk(3).filter(lambda v: v and not isinstance(v, dict)) | st.sampled_from(
        [{"q_proj": 3}, {"(": 2}, {"q_proj": "x"}, {"q_proj": -1}, {"v_proj": 1.5}]),
    "alpha_pattern": junk(3).filter(lambda v: v and not isinstance(v, dict)) | st.sampled_from(
        [{"[": 2}, {"q_proj": "x"}, {"q_proj": 0}, {"q_proj": float("nan")}]),
    "fan_in_fan_out": st.just(True), "bias": st.sampled_from(["all", "lora_only"]), "modules_to_save": st.just(["lm_head"]),
}


@st.composite
def malformed_adapter(draw: st.DrawFn, config: dict, weights: bytes) -> tuple[str, bytes, bytes]:
    """(defect, adapter_config.json bytes, adapter_model.safetensors bytes) that must be refused."""
    kind = draw(st.sampled_from(["config_key", "config_json", "weights"]))
    if kind == "weights":
        defect, content = draw(malformed_safetensors(weights))
        return f"weights.{defect}", json.dumps(config).encode(), content
    if kind == "config_json":
        bad = draw(st.binary(max_size=80).filter(lambda b: not b.strip().startswith(b"{")) | st.sampled_from(
            [b"[]", b"null", deep_json(5000).encode(), b'{"r": 2, "\xff": 1}']))
        return "config.json", bad, weights
    key = draw(st.sampled_from(sorted(ADAPTER_DEFECTS)))
    return f"config.{key}", json.dumps(config | {key: draw(ADAPTER_DEFECTS[key])}).encode(), weights


@fuzz_settings(100)
@given(data=st.data())
def test_load_peft_refuses_a_malformed_adapter(originals, tmp_path_factory, data):
    path = copy_dir(originals["adapter"], tmp_path_factory)
    config = json.loads((path / "adapter_config.json").read_text())
    kind, config_bytes, weights = data.draw(malformed_adapter(config, (path / "adapter_model.safetensors").read_bytes()))
    (path / "adapter_config.json").write_bytes(config_bytes)
    (path / "adapter_model.safetensors").write_bytes(weights)
    refuses(f"safetensors.peft.{kind}", lambda: pf.checkpoint.load_peft(path, originals["params"]), config_bytes[:200])


META_DEFECTS: dict[str, st.SearchStrategy] = {
    "format": junk(3).filter(lambda v: v != train_state.FORMAT),
    "step": junk(3).filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool) and v >= 0)),
    "world_size": junk(3).filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool) and v >= 1)),
    "data_position": junk(3).filter(lambda v: v is not None and not isinstance(v, dict)),
}


@fuzz_settings(80)
@given(data=st.data())
def test_train_state_loader_refuses_a_malformed_checkpoint(originals, tmp_path_factory, data):
    path = copy_dir(originals["state"], tmp_path_factory)
    state_file = next(path.glob("*.safetensors"))
    meta = json.loads((path / "meta.json").read_text())
    kind = data.draw(st.sampled_from(["weights", "meta_key", "meta_json", "no_meta", "wrong_run"]))
    if kind == "weights":
        defect, content = data.draw(malformed_safetensors(state_file.read_bytes()))
        state_file.write_bytes(content)
        kind = f"weights.{defect}"
    elif kind == "meta_key":
        key = data.draw(st.sampled_from(sorted(META_DEFECTS)))
        (path / "meta.json").write_text(json.dumps(meta | {key: data.draw(META_DEFECTS[key])}))
        kind = f"meta_key.{key}"
    elif kind == "meta_json":
        (path / "meta.json").write_bytes(data.draw(st.binary(max_size=80).filter(lambda b: not b.strip().startswith(b"{"))
                                                   | st.sampled_from([b"[]", deep_json(5000).encode(), b"\xff{}"])))
    elif kind == "no_meta":
        (path / "meta.json").unlink()
    else:  # saved by another run: a different adapter rank
        header, body = split(state_file.read_bytes())
        name = data.draw(st.sampled_from(sorted(k for k in header if k.startswith("params."))))
        header[name + ".renamed"] = header.pop(name)
        state_file.write_bytes(join(header, body))
    template = pf.train.init(originals["adapted"], originals["opt"], trainable=pf.lora.trainable, seed=1)
    refuses(f"safetensors.state.{kind}", lambda: train_state.load(path, template, pf.lora.trainable),
            (path / "meta.json").read_bytes()[:300] if (path / "meta.json").exists() else "no meta.json")


def test_pickled_weights_are_refused_not_loaded(originals, tmp_path):
    """A directory holding only pickle files is refused by name; nothing is unpickled."""
    marker = tmp_path / "unpickled"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."  # runs a command if unpickled
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(CFG.to_hf()))
    (tmp_path / "model" / "pytorch_model.bin").write_bytes(payload)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text((originals["adapter"] / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(payload)
    assert "pickle" in str(refuses("safetensors.pickle", lambda: pf.checkpoint.load_hf(tmp_path / "model")))
    assert "pickle" in str(refuses("safetensors.pickle", lambda: pf.checkpoint.load_peft(tmp_path / "adapter",
                                                                                          originals["params"])))
    (tmp_path / "model" / hf.SINGLE_NAME).write_bytes(payload)  # a pickle under a safetensors name
    refuses("safetensors.pickle", lambda: pf.checkpoint.load_hf(tmp_path / "model"))
    assert not marker.exists()
