"""Formats, templates and loss masks against independent references: Stanford Alpaca's prompt strings,
Meta's Llama-2 ``chat_completion`` token layout, the official ChatML and Llama-3 Jinja chat templates,
and (hypothesis) the decoded labelled tokens of random conversations."""

from __future__ import annotations

import json

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from purefine.data import DEMO_TOKENIZER, TEMPLATES, load_tokenizer, prompt_ids, tokenize_messages, tokenize_row
from purefine.data.formats import IGNORE_INDEX, detect_format, encode_segments, row_messages, shift_labels
from purefine.data.templates import validate_conversation
from purefine.errors import ConfigError, DataError

TOK = load_tokenizer(DEMO_TOKENIZER)
SP = TOK.processor  # the raw sentencepiece processor: the reference encoder

# Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca, train.py), copied verbatim.
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")
# The chat templates as published in the models' tokenizer_config.json.
CHATML_JINJA = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_JINJA = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
END_TOKEN = {"alpaca": "</s>", "none": "</s>", "llama2-chat": "</s>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def joined(template: str, messages: list, generation: bool = False, bos: str = "", eos: str = "") -> str:
    """A template's segments as one string (bos / eos shown as given)."""
    parts = {"bos": bos, "eos": eos}
    return "".join(parts.get(s.kind, s.text) for s in TEMPLATES[template].render(messages, generation))


def test_alpaca_template_is_stanford_alpaca():
    for inp in ("", "red cat sun"):
        row = {"instruction": "Reverse the words.", "input": inp, "output": "sun cat red"}
        prompt = (ALPACA_INPUT if inp else ALPACA_NO_INPUT).format(**row)
        assert joined("alpaca", row_messages(row, 0, "alpaca"), bos="<s>", eos="</s>") == f"<s>{prompt}sun cat red</s>"
        sample = tokenize_row(row, 0, fmt="alpaca", template="alpaca", tokenizer=TOK)
        assert sample.tokens == [1, *SP.encode(prompt), *SP.encode("sun cat red"), 2]


def test_llama2_chat_matches_metas_chat_completion():
    # Meta's llama/generation.py: per (user, answer) pair, bos + encode(f"[INST] {u} [/INST] {a} ") + eos,
    # the system prompt folded into the first user message.
    system, turns = "Be brief.", [("What is 2 plus 3?", "5"), ("And 4 plus 4?", "8")]
    messages = [{"role": "system", "content": system}]
    for u, a in turns:
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    reference = []
    for k, (u, a) in enumerate(turns):
        u = f"<<SYS>>\n{system}\n<</SYS>>\n\n{u}" if k == 0 else u
        reference += [SP.bos_id(), *SP.encode(f"[INST] {u.strip()} [/INST] {a.strip()} "), SP.eos_id()]
    assert tokenize_messages(messages, "llama2-chat", TOK).tokens == reference


@pytest.mark.parametrize("template, jinja, bos", [("chatml", CHATML_JINJA, ""), ("llama3", LLAMA3_JINJA, "<|begin_of_text|>")])
def test_chat_templates_match_the_published_jinja(template, jinja, bos):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Count to 3."}]
    ref = jinja2.Environment().from_string(jinja)
    for generation in (False, True):
        expected = ref.render(messages=messages, add_generation_prompt=generation, bos_token=bos)
        assert joined(template, messages, generation, bos=bos) == expected


def test_special_tokens_of_templates_are_single_ids():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chatml = tokenize_messages(messages, "chatml", TOK).tokens
    assert chatml.count(TOK.token_to_id("<|im_start|>")) == 2 and chatml.count(TOK.token_to_id("<|im_end|>")) == 2
    assert chatml[0] == TOK.bos_id and TOK.eos_id not in chatml
    llama3 = tokenize_messages(messages, "llama3", TOK).tokens
    assert llama3.count(TOK.token_to_id("<|eot_id|>")) == 2 and llama3[0] == TOK.bos_id


def test_bos_eos_placement_per_template():
    messages = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"},
                {"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}]
    ids = {name: tokenize_messages(messages, name, TOK).tokens for name in ("alpaca", "llama2-chat", "none", "chatml")}
    assert ids["alpaca"][0] == 1 and ids["alpaca"].count(1) == 1 and ids["alpaca"].count(2) == 2
    assert ids["llama2-chat"].count(1) == 2 and ids["llama2-chat"].count(2) == 2  # bos opens, eos closes each turn
    assert ids["llama2-chat"][-1] == 2 and ids["none"][-1] == 2
    assert ids["chatml"].count(2) == 0


def test_generation_prompt_ends_where_the_answer_starts():
    messages = [{"role": "user", "content": "What is the capital of Peru?"}]
    for name in ("alpaca", "llama2-chat", "chatml", "llama3", "none"):
        full = tokenize_messages([*messages, {"role": "assistant", "content": "Lima"}], name, TOK).tokens
        prompt = prompt_ids(messages, name, TOK)
        assert full[:len(prompt)] == prompt
        assert TOK.decode(full[len(prompt):]).strip().startswith("Lima")


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ,.?!", min_size=1, max_size=24).map(str.strip).filter(bool)


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": draw(words)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages += [{"role": "user", "content": draw(words)}, {"role": "assistant", "content": draw(words)}]
    if draw(st.booleans()):
        messages.append({"role": "user", "content": draw(words)})
    return messages


def labelled_runs(tokens: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive target tokens (a target at t is token t+1)."""
    runs, prev = [], None
    for t, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        assert label == tokens[t + 1]
        if prev == t - 1:
            runs[-1].append(label)
        else:
            runs.append([label])
        prev = t
    return runs


@settings(max_examples=25, deadline=None)
@given(conversations())
def test_masking_labels_exactly_the_intended_tokens(messages):
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    for name in ("alpaca", "llama2-chat", "chatml", "llama3", "none"):
        end = TOK.token_to_id(END_TOKEN[name])
        for train_on, expected in (("assistant", answers), ("last", answers[-1:])):
            s = tokenize_messages(messages, name, TOK, train_on=train_on)
            runs = labelled_runs(s.tokens, s.labels)
            assert [TOK.decode(r[:-1]).strip() for r in runs] == expected, (name, train_on)
            assert all(r[-1] == end for r in runs)
        s = tokenize_messages(messages, name, TOK, train_on="all")
        assert s.labels == [*s.tokens[1:], IGNORE_INDEX]


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """A byte-level BPE tokenizer.json (GPT-2 / Llama-3 style) trained here, Llama-3 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["the quick brown fox, 12 34 user assistant system hello world?!"] * 20, trainer)
    path = tmp_path_factory.mktemp("hf-tok")
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": specials[0], "eos_token": specials[1]}))
    return load_tokenizer(path, model_vocab_size=512)


@settings(max_examples=15, deadline=None)
@given(conversations())
def test_masking_is_exact_with_a_hugging_face_tokenizer(hf_tok, messages):
    assert type(hf_tok).__name__ == "HFTokenizer"
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    eot = hf_tok.token_to_id("<|eot_id|>")
    for name in ("alpaca", "llama2-chat", "llama3", "none"):
        s = tokenize_messages(messages, name, hf_tok)
        runs = labelled_runs(s.tokens, s.labels)
        assert [hf_tok.decode(r[:-1]).strip() for r in runs] == answers and all(r[-1] == eot for r in runs), name
        assert s.tokens[0] == hf_tok.token_to_id("<|begin_of_text|>")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 1023), max_size=30), st.data())
def test_shift_labels_and_truncation(tokens, data):
    mask = data.draw(st.lists(st.booleans(), min_size=len(tokens), max_size=len(tokens)))
    labels = shift_labels(tokens, mask)
    assert len(labels) == len(tokens)
    assert all(labels[t] == (tokens[t + 1] if mask[t + 1] else IGNORE_INDEX) for t in range(len(tokens) - 1))
    assert not labels or labels[-1] == IGNORE_INDEX


def test_text_format_trains_on_everything_and_truncates():
    s = tokenize_row({"text": "the cat sat"}, 0, fmt="text", template="llama3", tokenizer=TOK)
    assert s.tokens == [1, *SP.encode("the cat sat"), 2] and s.labels == [*s.tokens[1:], IGNORE_INDEX]
    short = tokenize_row({"text": "the cat sat"}, 0, fmt="text", template="alpaca", tokenizer=TOK, max_seq_len=3)
    assert short.tokens == s.tokens[:3] and short.labels == [*s.tokens[1:3], IGNORE_INDEX]


def test_chat_sharegpt_and_column_map():
    openai = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    renamed = {"dialog": openai["messages"]}
    want = tokenize_row(openai, 0, fmt="chat", template="chatml", tokenizer=TOK)
    assert tokenize_row(sharegpt, 0, fmt="chat", template="chatml", tokenizer=TOK) == want
    assert tokenize_row(renamed, 0, fmt="chat", template="chatml", tokenizer=TOK, column_map={"messages": "dialog"}) == want
    alpaca = {"q": "Add 1 and 2.", "a": "3"}
    s = tokenize_row(alpaca, 0, fmt="alpaca", template="alpaca", tokenizer=TOK, column_map={"instruction": "q", "output": "a"})
    assert TOK.decode([x for x in s.labels if x != IGNORE_INDEX]) == "3"


def test_preference_pairs_share_the_prompt_and_mask_it():
    row = {"prompt": "Capital of Peru?", "chosen": "Lima", "rejected": "Paris"}
    chosen, rejected = tokenize_row(row, 0, fmt="preference", template="alpaca", tokenizer=TOK)
    prompt = prompt_ids([{"role": "user", "content": row["prompt"]}], "alpaca", TOK)
    assert chosen.tokens[:len(prompt)] == rejected.tokens[:len(prompt)] == prompt
    assert TOK.decode([x for x in chosen.labels if x != IGNORE_INDEX]) == "Lima"
    assert TOK.decode([x for x in rejected.labels if x != IGNORE_INDEX]) == "Paris"
    conv = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}
    c, r = tokenize_row(conv, 0, fmt="preference", template="none", tokenizer=TOK)
    assert TOK.decode([x for x in r.labels if x != IGNORE_INDEX]) == "go away"


def test_detect_format():
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["conversations", "id"]) == "chat"
    assert detect_format(["prompt", "chosen", "rejected"]) == "preference"
    assert detect_format(["question", "answer"], {"instruction": "question", "output": "answer"}) == "alpaca"
    with pytest.raises(DataError, match=r"columns \['foo'\]"):
        detect_format(["foo"], source="x.jsonl")


@pytest.mark.parametrize("fmt, row, match", [
    ("alpaca", {"instruction": "a"}, r"row 8, field 'output': missing"),
    ("alpaca", {"instruction": "a", "output": 5}, r"row 8, field 'output': expected a string, found int"),
    ("alpaca", {"instruction": " ", "output": "b"}, r"row 8, field 'instruction': is empty"),
    ("chat", {"messages": []}, r"row 8, field 'messages': empty conversation"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
     r"row 8, field 'messages\[1\]\.role': unknown role 'bot'"),
    ("chat", {"messages": [{"role": "user", "content": ["hi"]}]}, r"row 8, field 'messages\[0\]\.content': expected a string"),
    ("chat", {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},
     r"field 'conversations\[1\]\.from': unknown role 'robot'"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, r"field 'messages': the conversation has no assistant turn"),
    ("chat", {"messages": [{"role": "assistant", "content": "hi"}]}, r"message 0 has role 'assistant' where 'user'"),
    ("chat", {"messages": "hi"}, r"field 'messages': expected a list of messages, found str"),
    ("text", {"text": None}, r"row 8, field 'text': missing"),
    ("preference", {"prompt": "p", "chosen": "a"}, r"row 8, field 'rejected': missing"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": 3}, r"field 'rejected': expected a string or a list"),
    ("preference", {"chosen": "a", "rejected": "b"}, r"field 'chosen': a string response needs a 'prompt' field"),
    ("preference", {"prompt": "p", "chosen": [{"role": "assistant", "content": 1}], "rejected": "b"},
     r"field 'chosen\[0\]\.content': expected a string, found int"),
])
def test_bad_rows_name_the_row_and_field(fmt, row, match):
    with pytest.raises(DataError, match=match):
        tokenize_row(row, 7, fmt=fmt, template="alpaca", tokenizer=TOK)


def test_unknown_template_and_train_on():
    with pytest.raises(ConfigError, match="unknown template 'vicuna'"):
        tokenize_messages([{"role": "user", "content": "a"}], "vicuna", TOK)
    with pytest.raises(DataError, match="train_on"):
        tokenize_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "none", TOK,
                          train_on="everything")


def test_special_token_missing_from_vocabulary_is_encoded_as_text():
    class NoSpecials:
        vocab_size, bos_id, eos_id, pad_id, special_tokens = TOK.vocab_size, 1, 2, 0, {}
        encode, decode = TOK.encode, TOK.decode

        def token_to_id(self, token):
            return None

    from purefine.data.templates import Segment
    ids, flags, _ = encode_segments([Segment("special", "<|im_end|>", True, 0)], NoSpecials())
    assert ids == SP.encode("<|im_end|>") and all(flags)
    assert validate_conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) is None
