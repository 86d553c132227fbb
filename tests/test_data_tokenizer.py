"""The SentencePiece tokenizer and the loader: round trips, bos/eos, special tokens, vocabulary checks,
against the raw ``sentencepiece`` processor and a tokenizer trained inside the test."""

from __future__ import annotations

import io
import shutil

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from purefine import models
from purefine.data import DEMO_TOKENIZER, SentencePieceTokenizer, Tokenizer, load_tokenizer
from purefine.errors import TokenizerError

DEMO = load_tokenizer(DEMO_TOKENIZER)
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenizer", "1 2 3 4 5 6 7 8 9 0"] * 30


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A 300-piece BPE tokenizer.model trained here (Llama-2 style: unk 0, bos 1, eos 2, byte fallback)."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=out, model_type="bpe", vocab_size=300,
                                   byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
                                   control_symbols=["<|eot_id|>"], num_threads=1)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return path


def test_trained_tokenizer_matches_sentencepiece(small_model):
    tok = load_tokenizer(small_model)
    sp = spm.SentencePieceProcessor(model_file=str(small_model))
    assert isinstance(tok, Tokenizer) and isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (300, 1, 2, 0)
    for text in CORPUS[:3] + ["unseen ☃ words"]:
        assert tok.encode(text) == sp.encode(text)
        assert tok.encode(text, bos=True, eos=True) == [1, *sp.encode(text), 2]
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<|eot_id|>": 3}
    assert tok.token_to_id("<|eot_id|>") == 3 and tok.token_to_id("<|im_end|>") is None
    assert tok.token_to_id("<unk>") == 0


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_bundled_tokenizer_round_trips_any_text(text):
    ids = DEMO.encode(text)
    assert all(0 <= i < DEMO.vocab_size for i in ids)
    assert DEMO.decode(ids) == text  # byte fallback + identity normalization: nothing is lost


def test_bundled_tokenizer_fits_the_tiny_model():
    tok = load_tokenizer(DEMO_TOKENIZER, model_vocab_size=models.preset("llama-tiny").vocab_size)
    assert tok.vocab_size == 1024 and (tok.processor.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.processor.is_byte(tok.processor.piece_to_id("<0x0A>"))
    assert {"<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>"} <= set(tok.special_tokens)
    assert tok.encode("") == [] and tok.encode("", bos=True) == [1]


def test_vocabulary_larger_than_the_model_is_an_error(small_model):
    with pytest.raises(TokenizerError, match=r"300 tokens but the model's vocab_size is 256"):
        load_tokenizer(small_model, model_vocab_size=256)
    assert load_tokenizer(small_model, model_vocab_size=32000).vocab_size == 300  # a smaller tokenizer is fine


def test_loader_dispatch_and_errors(small_model, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(model_dir)
    shutil.copy(small_model, model_dir / "tokenizer.model")
    assert load_tokenizer(model_dir).vocab_size == 300
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="garbage.model: not a SentencePiece model"):
        load_tokenizer(garbage)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        load_tokenizer(small_model).decode([5000])


def test_tokenizer_json_goes_to_the_hf_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    try:
        import purefine.data.hf_tokenizer  # noqa: F401  (written separately; may not exist yet)
    except ModuleNotFoundError:
        with pytest.raises(TokenizerError, match="needs purefine.data.hf_tokenizer"):
            load_tokenizer(tmp_path)
    else:
        with pytest.raises(Exception):  # an empty tokenizer.json is not a tokenizer
            load_tokenizer(tmp_path)
