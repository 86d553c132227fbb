"""HFTokenizer against transformers' AutoTokenizer on tokenizers trained here: a GPT-2-style
byte-level BPE, a Llama-3-style BPE with special tokens and a template, and a BERT WordPiece."""

from __future__ import annotations

import json
import re

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from purefine.data.hf_tokenizer import HFTokenizer
from purefine.data.tokenizer import Tokenizer as TokenizerProtocol
from purefine.data.loader import load_tokenizer
from purefine.errors import TokenizerError

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "naïve café — 東京 🚀 don't we'll they're I'm you've",
    "  spaces   and\ttabs\nnewlines\n\n",
    "numbers 12345 and 3.14159, commas; colons: (parens) [brackets]",
    "def f(x):\n    return x ** 2  # code",
]
STRINGS = [
    "", "Hello world!", "hello WORLD, it's 3.14159 o'clock.", "  leading and trailing  ", "tabs\tand\nnewlines",
    "naïve café — 東京 🚀", "unseen: zyzzyva qxj", "don't stop , we 're here .", "a" * 50, "x ** 2 # y",
]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"


def byte_level_bpe(pre_tokenizer, special: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    return tok


def save(tok: Tokenizer, path, **special) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(path)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2-tok")
    tok = byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"])
    save(tok, path, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    return path


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3-tok")
    split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False)
    tok = byte_level_bpe(pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                         LLAMA3_SPECIAL)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B", special_tokens=[("<|begin_of_text|>", bos)])
    save(tok, path, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert-tok")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS * 10, trainers.WordPieceTrainer(vocab_size=300, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    save(tok, path, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
         clean_up_tokenization_spaces=True)
    return path


def reference(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("name", ["gpt2_dir", "llama3_dir", "bert_dir"])
def test_ids_and_decode_equal_transformers(request, name):
    path = request.getfixturevalue(name)
    ours, ref = HFTokenizer.from_dir(path), reference(path)
    assert isinstance(ours, TokenizerProtocol)
    assert ours.vocab_size == len(ref)
    for text in STRINGS:
        ids = ours.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        with_special = ref(text)["input_ids"]  # the tokenizer's own template, where it has one
        assert ours.decode(with_special) == ref.decode(with_special, skip_special_tokens=True), text


def test_llama3_special_tokens_and_template(llama3_dir):
    ours, ref = HFTokenizer(llama3_dir / "tokenizer.json"), reference(llama3_dir)
    assert ours.bos_id == ref.bos_token_id == ours.token_to_id("<|begin_of_text|>")
    assert ours.eos_id == ref.eos_token_id == ours.token_to_id("<|eot_id|>")
    assert ours.special_tokens == {t: ref.convert_tokens_to_ids(t) for t in LLAMA3_SPECIAL}
    for text in STRINGS[1:]:
        assert ours.encode(text, bos=True) == ref(text)["input_ids"]  # the post-processor adds bos only
        assert ours.encode(text, bos=True, eos=True)[-1] == ours.eos_id
    chat = ref.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False)
    assert ours.chat_template == CHAT_TEMPLATE
    assert ours.encode(chat) == ref(chat, add_special_tokens=False)["input_ids"]
    assert ours.encode(chat).count(ours.token_to_id("<|eot_id|>")) == 1  # special strings in text become ids
    assert ours.decode(ours.encode(chat)) == "user\n\nhi there"
    assert ours.token_to_id("not-a-token") is None


def test_bert_uses_cls_sep_and_cleans_up_spaces(bert_dir):
    ours, ref = HFTokenizer.from_dir(bert_dir), reference(bert_dir)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.cls_token_id, ref.sep_token_id, ref.pad_token_id)
    for text in STRINGS[1:]:
        assert ours.encode(text, bos=True, eos=True) == ref(text)["input_ids"]
    ids = ours.encode("don't stop , we 're here .")
    assert ours.decode(ids) == ref.decode(ids) == "don't stop, we're here."
    assert set(ours.special_tokens) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}


def test_gpt2_pad_falls_back_to_eos_and_loader_dispatches(gpt2_dir):
    tok = load_tokenizer(gpt2_dir, model_vocab_size=1024)
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id == tok.eos_id == tok.pad_id == tok.token_to_id("<|endoftext|>")
    assert tok.decode(tok.encode("Hello world!", eos=True)) == "Hello world!"


def test_older_special_tokens_map_and_added_token_dicts(tmp_path, gpt2_dir):
    (tmp_path / "tokenizer.json").write_bytes((gpt2_dir / "tokenizer.json").read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<|endoftext|>", "lstrip": False}, "eos_token": "<|endoftext|>"}))
    tok = HFTokenizer.from_dir(tmp_path)
    assert tok.bos_id == tok.eos_id == tok.token_to_id("<|endoftext|>")


def test_bad_inputs_are_tokenizer_errors(tmp_path, gpt2_dir):
    with pytest.raises(TokenizerError, match="tokenizer.json not found"):
        HFTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid Hugging Face tokenizer.json"):
        HFTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((gpt2_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match=re.escape("eos_token '<|nope|>' is not in the vocabulary")):
        HFTokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    tok = HFTokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError, match="encode expects a string"):
        tok.encode(None)  # type: ignore[arg-type]
