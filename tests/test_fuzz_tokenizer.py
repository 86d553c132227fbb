"""Fuzzed malformed tokenizer files through ``purefine.data.load_tokenizer``: every one is refused with a
TokenizerError (never RuntimeError, UnicodeDecodeError, a bare ``Exception`` from ``tokenizers``,
a crash or a hang).

- SentencePiece ``tokenizer.model``: random bytes, protos with a broken field, a vocabulary larger
  than the model's. Truncations, bit flips and splices of the bundled demo model may still parse
  (a cut at a field boundary is a valid smaller proto): those must load into a tokenizer that
  encodes and decodes, or be refused; nothing else. Thousands of such cases never crashed the
  interpreter (sentencepiece checks its protos), so they run in-process.
- Hugging Face ``tokenizer.json``: truncated, not an object, not UTF-8, nested too deeply, random
  bytes; junk under its keys (tolerated when ``tokenizers`` accepts it).
- ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``chat_template.jinja`` beside it:
  invalid JSON or UTF-8, not an object, special tokens of the wrong type or not in the vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from purefine.data import DEMO_TOKENIZER, load_tokenizer
from purefine.errors import TokenizerError
from tests.fuzz_common import Blob, deep_json, fuzz_settings, junk, refuses, report, tolerates

MINIMUM = 250  # malformed tokenizer cases this module must refuse
SP_BYTES = DEMO_TOKENIZER.read_bytes()
TEXT = "Hello wörld, 日本 🚀 <s> </s>\n\t"


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    report(request, "tokenizer", MINIMUM)


@pytest.fixture(scope="module")
def hf_json() -> bytes:
    """A small byte-level BPE tokenizer.json trained here (special tokens <s>, </s>, <unk>)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox", "tokenizers fuzz test"] * 5, trainer)
    return Blob(tok.to_str().encode())


def use(path: Path, model_vocab_size: int | None = None) -> None:
    """Load a tokenizer and use it the way the pipeline does."""
    tok = load_tokenizer(path, model_vocab_size=model_vocab_size)
    ids = tok.encode(TEXT, bos=True, eos=True)
    tok.decode([i for i in ids if 0 <= i < tok.vocab_size])
    tok.special_tokens, tok.pad_id, tok.token_to_id("<s>")


def write(directory: Path, files: dict[str, bytes | None]) -> Path:
    """Write ``files`` ({name: bytes, or None for a directory of that name}) under ``directory``."""
    for name, content in files.items():
        if content is None:
            (directory / name).mkdir()
        else:
            (directory / name).write_bytes(content)
    return directory


# ------------------------------------------------------------------ SentencePiece
@st.composite
def broken_proto(draw: st.DrawFn) -> bytes:
    """Bytes that are not a usable SentencePiece model."""
    kind = draw(st.sampled_from(["random", "prefix", "bad_varint", "bad_wire", "empty_piece", "no_unk"]))
    if kind == "random":
        return draw(st.binary(max_size=400).filter(lambda b: b[:2] != SP_BYTES[:2]))
    if kind == "prefix":  # cut inside the first piece's field
        return SP_BYTES[: draw(st.integers(1, 15))]
    if kind == "bad_varint":  # a length that never ends
        return draw(st.binary(max_size=50)) + b"\x0a" + b"\xff" * draw(st.integers(10, 30))
    if kind == "bad_wire":  # field 1 with wire types 6/7, which protobuf does not have
        return bytes([0x0E | draw(st.sampled_from([0, 1]))]) + draw(st.binary(max_size=50))
    if kind == "empty_piece":
        return b"\x0a\x00" + SP_BYTES
    return b"\x0a\x05\x0a\x03abc" * draw(st.integers(1, 20))  # pieces but no <unk>


@fuzz_settings(90)
@given(content=broken_proto().map(Blob), as_dir=st.booleans())
def test_broken_sentencepiece_models_are_refused(tmp_path_factory, content, as_dir):
    directory = write(tmp_path_factory.mktemp("sp"), {"tokenizer.model": content})
    refuses("tokenizer.sp", lambda: use(directory if as_dir else directory / "tokenizer.model"), content[:100])


@st.composite
def mutated_proto(draw: st.DrawFn) -> bytes:
    data = bytearray(SP_BYTES)
    kind = draw(st.sampled_from(["truncate", "flip", "splice"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for at in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=20)):
            data[at] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    at = draw(st.integers(0, len(data)))
    return bytes(data[:at]) + draw(st.binary(min_size=1, max_size=60)) + bytes(data[at:])


@fuzz_settings(90)
@given(content=mutated_proto().map(Blob))
def test_mutated_sentencepiece_models_load_or_are_refused(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(content)
    tolerates("tokenizer.sp-mutated", lambda: use(path), content[:100])


@fuzz_settings(15)
@given(model_vocab=st.integers(-5, 1023))
def test_a_vocabulary_larger_than_the_model_is_refused(model_vocab):
    error = refuses("tokenizer.vocab", lambda: use(DEMO_TOKENIZER, model_vocab), model_vocab)
    assert str(model_vocab) in str(error)


# ------------------------------------------------------------------ Hugging Face tokenizer.json
@st.composite
def broken_tokenizer_json(draw: st.DrawFn, good: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "not_object", "utf8", "deep", "random", "no_model", "model_type"]))
    if kind == "truncate":
        return good[: draw(st.integers(0, len(good.rstrip()) - 1))]
    if kind == "not_object":
        return json.dumps(draw(junk(5).filter(lambda v: not isinstance(v, dict)))).encode()
    if kind == "utf8":
        at = draw(st.integers(0, len(good)))
        return good[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])) + good[at:]
    if kind == "deep":
        return ('{"model": ' + deep_json(draw(st.integers(200, 50000))) + "}").encode()
    if kind == "random":
        return draw(st.binary(max_size=200))
    d = json.loads(good)
    if kind == "no_model":
        del d["model"]
    else:
        d["model"]["type"] = draw(junk(3).filter(lambda v: v not in ("BPE", "WordPiece", "WordLevel", "Unigram")))
    return json.dumps(d).encode()


@fuzz_settings(80)
@given(data=st.data(), as_dir=st.booleans())
def test_broken_tokenizer_json_is_refused(hf_json, tmp_path_factory, data, as_dir):
    content = data.draw(broken_tokenizer_json(hf_json).map(Blob))
    directory = write(tmp_path_factory.mktemp("hf"), {"tokenizer.json": content})
    refuses("tokenizer.hf-json", lambda: use(directory if as_dir else directory / "tokenizer.json"), content[:200])


@fuzz_settings(50)
@given(data=st.data())
def test_junk_inside_tokenizer_json_loads_or_is_refused(hf_json, tmp_path_factory, data):
    d = json.loads(hf_json)
    key = data.draw(st.sampled_from(sorted(d)))
    if isinstance(d[key], dict) and d[key] and data.draw(st.booleans()):
        d[key][data.draw(st.sampled_from(sorted(d[key])))] = data.draw(junk(4))
    else:
        d[key] = data.draw(junk(4))
    directory = write(tmp_path_factory.mktemp("hf"), {"tokenizer.json": json.dumps(d).encode()})
    tolerates("tokenizer.hf-junk", lambda: use(directory), {key: d[key]})


def test_a_file_the_tokenizers_library_panics_on_is_a_tokenizer_error(hf_json, tmp_path):
    # found by the fuzz test above: tokenizers loads this file, then panics (a BaseException) in encode
    d = json.loads(hf_json)
    d["normalizer"] = [""]
    directory = write(tmp_path, {"tokenizer.json": json.dumps(d).encode()})
    with pytest.raises(TokenizerError, match="tokenizer.json: the tokenizers library failed"):
        use(directory)


ROLES = ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


@st.composite
def broken_side_files(draw: st.DrawFn) -> dict[str, bytes | None]:
    """tokenizer_config.json / special_tokens_map.json / chat_template.jinja that must be refused."""
    name = draw(st.sampled_from(["tokenizer_config.json", "special_tokens_map.json"]))
    kind = draw(st.sampled_from(["json", "not_object", "role_type", "role_unknown", "template_utf8", "deep"]))
    if kind == "json":
        return {name: draw(st.binary(max_size=60).filter(lambda b: not b.strip().startswith(b"{")) | st.just(b"\xff{}"))}
    if kind == "not_object":
        return {name: json.dumps(draw(junk(4).filter(lambda v: not isinstance(v, dict)))).encode()}
    if kind == "deep":
        return {name: ('{"bos_token": ' + deep_json(draw(st.integers(1200, 30000))) + "}").encode()}
    role = draw(st.sampled_from(ROLES))
    if kind == "role_type":
        bad = draw(junk(4).filter(lambda v: v is not None and not isinstance(v, str)
                                  and not (isinstance(v, dict) and isinstance(v.get("content"), str))))
        return {name: json.dumps({role: bad}).encode()}
    if kind == "role_unknown":
        token = draw(st.text(max_size=10).map(lambda t: f"<never-in-vocab-{t}>"))
        value = draw(st.sampled_from([token, {"content": token}]))
        return {name: json.dumps({role: value}).encode()}
    return {"chat_template.jinja": draw(st.binary(max_size=30)) + b"\xff\xfe" + draw(st.binary(max_size=30))}


@fuzz_settings(80)
@given(data=st.data())
def test_broken_tokenizer_side_files_are_refused(hf_json, tmp_path_factory, data):
    files = data.draw(broken_side_files())
    directory = write(tmp_path_factory.mktemp("hf"), {"tokenizer.json": hf_json, **files})
    refuses("tokenizer.hf-config", lambda: use(directory), files)


@pytest.mark.parametrize("files", [{}, {"tokenizer.model": None}, {"tokenizer.json": None}, {"vocab.txt": b"a\nb"},
                                   {"tokenizer.model": b""}, {"tokenizer.json": b""}])
def test_directories_without_a_usable_tokenizer_are_refused(tmp_path, files):
    write(tmp_path, files)
    refuses("tokenizer.paths", lambda: use(tmp_path), files)
    refuses("tokenizer.paths", lambda: use(tmp_path / "missing" / "tokenizer.model"), "missing")
