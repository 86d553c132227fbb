"""The tokenizer's own chat template against transformers' ``apply_chat_template``: token ids and
trained-token masks (``return_assistant_tokens_mask``) on templates with ``{% generation %}`` markers,
and, without markers, prefix rendering against the masks the marker version of the same template
gives in transformers. Tokenizers are trained here (byte-level BPE) and saved with
``PreTrainedTokenizerFast``; nothing comes from the hub."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from purefine.data import DEMO_TOKENIZER, DataConfig, build, load_tokenizer, prompt_ids, tokenize_messages, tokenize_row
from purefine.data.chat_template import ChatTemplate, tokenize_chat
from purefine.data.formats import IGNORE_INDEX, resolve_template
from purefine.errors import ConfigError, DataError, TokenizerError

SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
           "<|im_end|>", "<|endoftext|>", "<s>", "</s>"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "user assistant system tool hello world",
          "What is 2 + 2? It is 4.", "  spaces\n\nnewlines\tand tabs", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
          "<tool_call> </tool_call> <tool_response> </tool_response> You are Qwen, a helpful assistant."]

# ChatML as published (e.g. OpenHermes), and its marker version.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_MARKED = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
                 "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
                 "{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Meta-Llama-3-8B-Instruct's template, and its marker version.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_MARKED = ("{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' + "
                 "message['role'] + '<|end_header_id|>\n\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
                 "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
                 "{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Qwen2.5-Instruct's template (without its tool-schema system block): a default system prompt, tool
# calls in assistant turns, tool results folded into user turns; and its marker version.
QWEN_HEAD = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
"""
QWEN_TAIL = """    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN = QWEN_HEAD + """    {%- elif message.role == "assistant" and not message.tool_calls %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
""" + QWEN_TAIL
QWEN_MARKED = QWEN_HEAD + """    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
        {{- message.content }}
        {%- for tool_call in message.tool_calls %}
            {%- set call = tool_call.function %}
            {%- if message.content or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' + (call.arguments | tojson) + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
""" + QWEN_TAIL
# Mistral-style: no system role, the answer and eos inside the markers.
MISTRAL_MARKED = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                  "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                  "{% generation %}{{ ' ' + message['content'] + eos_token }}{% endgeneration %}{% endif %}{% endfor %}")

SPECIALS = {"chatml": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
            "llama3": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
            "qwen": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
            "mistral": dict(bos_token="<s>", eos_token="</s>")}
PLAIN = {"chatml": CHATML, "llama3": LLAMA3, "qwen": QWEN}
MARKED = {"chatml": CHATML_MARKED, "llama3": LLAMA3_MARKED, "qwen": QWEN_MARKED, "mistral": MISTRAL_MARKED}

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}],
    "system, three turns": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "the quick brown fox?"},
        {"role": "assistant", "content": " jumps over\n the lazy dog "}, {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "naïve café 東京 🚀\n\n"}],
    "tools": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "name": "get_weather", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."}],
}
CASES = {"chatml": ["one turn", "system, three turns"], "llama3": ["one turn", "system, three turns"],
         "qwen": ["one turn", "system, three turns", "tools"], "mistral": ["one turn", "system, three turns"]}


def byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """{(family, "plain" | "marked"): directory} of tokenizers saved by transformers with that template."""
    from transformers import PreTrainedTokenizerFast

    backend, out = byte_level_bpe(), {}
    for kind, table in (("plain", PLAIN), ("marked", MARKED)):
        for family, template in table.items():
            path = tmp_path_factory.mktemp(f"{family}-{kind}")
            PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **SPECIALS[family]).save_pretrained(path)
            out[family, kind] = path
    return out


def reference(path, messages, **kw):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).apply_chat_template(messages, tokenize=True, return_dict=True, **kw)


def ours(path, messages, train_on="assistant"):
    tok = load_tokenizer(path)
    return tokenize_chat(messages, ChatTemplate.of(tok), tok, train_on)


def cases(table):
    return [(family, name) for family in table for name in CASES[family]]


@pytest.mark.parametrize("family, conversation", cases(MARKED))
def test_generation_markers_equal_transformers_assistant_masks(tokenizer_dirs, family, conversation):
    messages = CONVERSATIONS[conversation]
    want = reference(tokenizer_dirs[family, "marked"], messages, return_assistant_tokens_mask=True)
    ids, mask = ours(tokenizer_dirs[family, "marked"], messages)
    assert ids == list(want["input_ids"])
    assert mask == [bool(m) for m in want["assistant_masks"]]
    assert sum(mask) > 0


@pytest.mark.parametrize("family, conversation", cases(PLAIN))
def test_prefix_rendering_equals_the_masks_of_the_marker_version(tokenizer_dirs, family, conversation):
    messages = CONVERSATIONS[conversation]
    plain = reference(tokenizer_dirs[family, "plain"], messages)
    marked = reference(tokenizer_dirs[family, "marked"], messages, return_assistant_tokens_mask=True)
    assert list(plain["input_ids"]) == list(marked["input_ids"])  # the marker version renders the same text
    ids, mask = ours(tokenizer_dirs[family, "plain"], messages)
    assert ids == list(plain["input_ids"])
    assert mask == [bool(m) for m in marked["assistant_masks"]]


texts = st.text(alphabet="abc xyz?!.\n\té東", min_size=1, max_size=20).filter(lambda t: t.strip())


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": draw(texts)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages += [{"role": "user", "content": draw(texts)}, {"role": "assistant", "content": draw(texts)}]
    return messages


@pytest.fixture(scope="module")
def references(tokenizer_dirs):
    from transformers import AutoTokenizer

    return {key: AutoTokenizer.from_pretrained(path) for key, path in tokenizer_dirs.items()}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversations(), st.sampled_from(sorted(PLAIN)))
def test_random_conversations_match_the_marker_masks(tokenizer_dirs, references, messages, family):
    marked = references[family, "marked"].apply_chat_template(messages, tokenize=True, return_dict=True,
                                                              return_assistant_tokens_mask=True)
    ids, mask = ours(tokenizer_dirs[family, "plain"], messages)
    assert ids == list(marked["input_ids"]) and mask == [bool(m) for m in marked["assistant_masks"]]


@pytest.mark.parametrize("kind", ["plain", "marked"])
def test_train_on_last_keeps_the_last_turn_and_all_keeps_everything(tokenizer_dirs, kind):
    messages = CONVERSATIONS["system, three turns"]
    path = tokenizer_dirs["llama3", kind]
    ids, every = ours(path, messages)
    _, last = ours(path, messages, train_on="last")
    _, everything = ours(path, messages, train_on="all")
    start = len(prompt_ids(messages[:-1], "tokenizer", load_tokenizer(path)))  # where the last answer starts
    assert last == [m and t >= start for t, m in enumerate(every)] and any(last)
    assert everything == [True] * len(ids)


def test_tokenize_messages_shifts_the_chat_template_mask_and_auto_picks_it(tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs["chatml", "plain"])
    messages = CONVERSATIONS["system, three turns"]
    ids, mask = ours(tokenizer_dirs["chatml", "plain"], messages)
    for name in ("auto", "tokenizer"):
        sample = tokenize_messages(messages, name, tok)
        assert sample.tokens == ids
        assert sample.labels == [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])] + [IGNORE_INDEX]
    truncated = tokenize_messages(messages, "auto", tok, max_seq_len=12)
    assert truncated.tokens == ids[:12] and truncated.labels[-1] == IGNORE_INDEX
    assert resolve_template("auto", load_tokenizer(DEMO_TOKENIZER)).name == "alpaca"  # no template shipped
    with pytest.raises(ConfigError, match="ships no chat template"):
        resolve_template("tokenizer", load_tokenizer(DEMO_TOKENIZER))


def test_generation_prompt_equals_transformers(tokenizer_dirs):
    for family in PLAIN:
        messages = CONVERSATIONS["system, three turns"][:-1]
        want = reference(tokenizer_dirs[family, "plain"], messages, add_generation_prompt=True)["input_ids"]
        assert prompt_ids(messages, "auto", load_tokenizer(tokenizer_dirs[family, "plain"])) == list(want)


def test_a_template_that_rewrites_earlier_turns_needs_markers(tmp_path, tokenizer_dirs):
    # Qwen3 style: only the last assistant turn carries an (empty) reasoning block.
    template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% if m.role == 'assistant' and loop.last %}"
                "{{ '<think></think>' }}{% endif %}{{ m.content + '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    save_tokenizer(tmp_path, template, eos_token="<|im_end|>")
    tok = load_tokenizer(tmp_path)
    messages = CONVERSATIONS["system, three turns"]
    with pytest.raises(DataError, match="renders assistant message 2 differently.*generation"):
        tokenize_messages(messages, "tokenizer", tok)
    last = tokenize_messages(messages, "tokenizer", tok, train_on="last")  # the last turn alone is found
    trained = [t for t in last.labels if t != IGNORE_INDEX]
    assert tok.decode(trained) == "<think></think>naïve café 東京 🚀\n\n" and trained[-1] == tok.token_to_id("<|im_end|>")


def save_tokenizer(path, template, **special):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(), chat_template=template, **special).save_pretrained(path)


def test_a_template_that_fails_to_render_names_the_row(tmp_path):
    template = ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                "{% for m in messages %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}")
    save_tokenizer(tmp_path / "tok", template, eos_token="</s>")
    rows = [{"messages": CONVERSATIONS["one turn"]}, {"messages": CONVERSATIONS["system, three turns"]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(tmp_path / "tok")
    with pytest.raises(DataError, match=r"row 2: the chat template \(.*\) failed to render it: .*System role not supported"):
        tokenize_row(rows[1], 1, fmt="chat", template="auto", tokenizer=tok)
    cfg = DataConfig(source=str(tmp_path / "rows.jsonl"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"rows.jsonl: row 2: .*System role not supported") as e:
        build(cfg, tok)
    assert "\n" not in str(e.value)


def test_invalid_jinja_is_a_tokenizer_error_naming_the_file(tmp_path):
    save_tokenizer(tmp_path, "{% for m in messages %}{{ m.content }", eos_token="</s>")
    with pytest.raises(TokenizerError, match=r"chat_template.jinja: the chat template is not valid Jinja \(line 1"):
        tokenize_messages(CONVERSATIONS["one turn"], "auto", load_tokenizer(tmp_path))


def test_tool_messages_reach_the_template_and_hand_written_templates_refuse_them():
    row = {"messages": CONVERSATIONS["tools"]}
    tok = load_tokenizer(DEMO_TOKENIZER)
    chatml = tokenize_row(row, 3, fmt="chat", template="chatml", tokenizer=tok)
    assert tok.decode([t for t in chatml.labels if t != IGNORE_INDEX]).endswith("It is 21 degrees in Paris.")
    with pytest.raises(DataError, match="row 4: message 2 has role 'tool', which the alpaca template cannot show"):
        tokenize_row(row, 3, fmt="chat", template="alpaca", tokenizer=tok)
    with pytest.raises(DataError, match="row 4, field 'messages': message 1 has role 'tool'"):
        tokenize_row({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}, 3, fmt="chat",
                     template="chatml", tokenizer=tok)


def test_a_template_that_fails_to_render_is_one_line_and_exit_2_through_the_cli(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    template = "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    save_tokenizer(tmp_path / "tok", template + "{% for m in messages %}{{ m.content }}{% endfor %}", eos_token="</s>")
    rows = [{"messages": CONVERSATIONS["one turn"]}, {"messages": CONVERSATIONS["system, three turns"]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--tokenizer", str(tmp_path / "tok"),
                          "--data.source", str(tmp_path / "rows.jsonl"), "--data.cache-dir", str(tmp_path / "cache"),
                          "--max-steps", "1", "--output-dir", str(tmp_path / "out"), "--no-progress"],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-800:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rows.jsonl: row 2: the chat template" in errors[0]
    assert "System role not supported" in errors[0]
