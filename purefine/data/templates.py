"""Prompt templates: messages -> segments whose assistant flags make loss masking exact.

A ``Segment`` is plain text, a named special token (``<|im_end|>``), or the tokenizer's bos / eos;
``assistant`` marks the tokens of an assistant turn (its content and the token that ends it) and
``turn`` numbers the assistant turns. Registered templates (``TEMPLATES``):

- ``alpaca``: BOS, Stanford Alpaca's preamble (the with-input variant when the row has an input;
  a system message replaces it), ``### Instruction:`` / ``### Input:`` / ``### Response:``; each
  response ends with EOS.
- ``llama2-chat``: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>`` per
  turn, as Meta's reference ``chat_completion`` builds it.
- ``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` (BOS first when the tokenizer has one).
- ``llama3``: ``<|begin_of_text|>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``.
- ``none``: BOS, the contents one after another (non-assistant ones end with a newline), EOS after
  each answer.
- ``auto`` / ``tokenizer``: names resolved with the tokenizer (``formats.resolve_template``): its own
  Jinja chat template (``purefine.data.chat_template``); ``auto`` falls back to ``alpaca`` when the
  tokenizer ships none. They render only through ``tokenize_messages`` / ``prompt_ids``.

Tool messages (role ``tool``, after an assistant turn) show under ``chatml``, ``llama3`` and
``none`` with their role as written; ``alpaca`` and ``llama2-chat`` have no place for them.

A plain-text sample (role ``text``, the ``text`` format) renders the same under every template:
BOS, the text (all of it trainable), EOS. ``render(messages, add_generation_prompt=True)`` ends
with the assistant header, for generation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from purefine.errors import ConfigError, DataError

Message = dict  # {"role": "system" | "user" | "assistant" | "tool" | "text", "content": str, optional "input": str, ...}
SegmentKind = Literal["text", "special", "bos", "eos"]

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ALPACA_INPUT_PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.")


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation, encoded on its own."""

    kind: SegmentKind
    text: str = ""
    assistant: bool = False
    turn: int = -1


@dataclass(frozen=True)
class Template:
    """A named chat format; ``stop_tokens`` are special tokens besides EOS that end an answer."""

    name: str
    render_fn: Callable[[Sequence[Message], bool], list[Segment]]
    stop_tokens: tuple[str, ...] = ()
    tools: bool = False
    """Whether the template can show tool messages."""

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[Segment]:
        """Messages -> segments (a plain-text sample is BOS, text, EOS under every template)."""
        if len(messages) == 1 and messages[0]["role"] == "text":
            return [Segment("bos"), Segment("text", messages[0]["content"], True, 0), Segment("eos", "", True, 0)]
        tool = next((j for j, m in enumerate(messages) if m["role"] == "tool"), None)
        if tool is not None and not self.tools:
            raise DataError(f"message {tool} has role 'tool', which the {self.name} template cannot show; use "
                            "--data.template tokenizer (the tokenizer's chat template), chatml or llama3")
        return self.render_fn(messages, add_generation_prompt)


# The roles that may follow each role (None: the conversation's start, after an optional system message).
NEXT_ROLES = {None: ("user",), "user": ("assistant",), "assistant": ("user", "tool"), "tool": ("tool", "assistant")}


def validate_conversation(messages: Sequence[Message]) -> str | None:
    """What is wrong with a conversation's turn order, or None: an optional system message first,
    then user and assistant alternating from a user turn (tool messages answer an assistant turn and
    are followed by more tool messages or an assistant turn), with at least one assistant turn."""
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    previous = None
    for j, m in enumerate(rest):
        allowed = NEXT_ROLES.get(previous, ())
        if m["role"] not in allowed:
            at = j + len(messages) - len(rest)
            want = " or ".join(repr(r) for r in allowed)
            return (f"message {at} has role {m['role']!r} where {want} was expected (an optional system "
                    "message first, then user and assistant turns alternating, tool messages after an assistant turn)")
        previous = m["role"]
    if not any(m["role"] == "assistant" for m in rest):
        return "the conversation has no assistant turn"
    return None


def _split_system(messages: Sequence[Message]) -> tuple[str | None, Sequence[Message]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _user_text(m: Message) -> str:
    """A user message's text; an alpaca ``input`` follows the instruction after a blank line."""
    return f"{m['content']}\n\n{m['input']}" if m.get("input") else m["content"]


def _numbered(messages: Sequence[Message]) -> list[tuple[Message, int]]:
    """Each message with its assistant-turn index (-1 for non-assistant messages)."""
    out, turn = [], 0
    for m in messages:
        out.append((m, turn if m["role"] == "assistant" else -1))
        turn += m["role"] == "assistant"
    return out


def _alpaca(messages: Sequence[Message], generation: bool) -> list[Segment]:
    system, rest = _split_system(messages)
    segs = [Segment("bos")]
    for i, (m, turn) in enumerate(_numbered(rest)):
        if m["role"] == "assistant":
            segs += [Segment("text", m["content"], True, turn), Segment("eos", "", True, turn)]
            continue
        head = "\n\n"
        if i == 0:
            head = (system if system is not None else ALPACA_INPUT_PREAMBLE if m.get("input") else ALPACA_PREAMBLE) + "\n\n"
        body = f"### Instruction:\n{m['content']}\n\n"
        if m.get("input"):
            body += f"### Input:\n{m['input']}\n\n"
        segs.append(Segment("text", head + body + "### Response:\n"))
    return segs


def _llama2_chat(messages: Sequence[Message], generation: bool) -> list[Segment]:
    system, rest = _split_system(messages)
    segs: list[Segment] = []
    for i, (m, turn) in enumerate(_numbered(rest)):
        if m["role"] == "assistant":
            segs += [Segment("text", m["content"].strip() + " ", True, turn), Segment("eos", "", True, turn)]
            continue
        content = _user_text(m).strip()
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{content}"
        segs += [Segment("bos"), Segment("text", f"[INST] {content} [/INST]")]
    return segs


def _chatml(messages: Sequence[Message], generation: bool) -> list[Segment]:
    segs = [Segment("bos")]
    for m, turn in _numbered(messages):
        mine = m["role"] == "assistant"
        content = _user_text(m) if m["role"] == "user" else m["content"]
        segs += [Segment("special", "<|im_start|>"), Segment("text", f"{m['role']}\n"),
                 Segment("text", content, mine, turn), Segment("special", "<|im_end|>", mine, turn), Segment("text", "\n")]
    if generation:
        segs += [Segment("special", "<|im_start|>"), Segment("text", "assistant\n")]
    return segs


def _llama3_header(role: str) -> list[Segment]:
    return [Segment("special", "<|start_header_id|>"), Segment("text", role),
            Segment("special", "<|end_header_id|>"), Segment("text", "\n\n")]


def _llama3(messages: Sequence[Message], generation: bool) -> list[Segment]:
    segs = [Segment("bos")]
    for m, turn in _numbered(messages):
        mine = m["role"] == "assistant"
        content = _user_text(m) if m["role"] == "user" else m["content"]
        segs += [*_llama3_header(m["role"]), Segment("text", content.strip(), mine, turn),
                 Segment("special", "<|eot_id|>", mine, turn)]
    if generation:
        segs += _llama3_header("assistant")
    return segs


def _none(messages: Sequence[Message], generation: bool) -> list[Segment]:
    segs = [Segment("bos")]
    for m, turn in _numbered(messages):
        if m["role"] == "assistant":
            segs += [Segment("text", m["content"], True, turn), Segment("eos", "", True, turn)]
        else:
            segs.append(Segment("text", (_user_text(m) if m["role"] == "user" else m["content"]) + "\n"))
    return segs


TEMPLATES: dict[str, Template] = {}
TOKENIZER_TEMPLATES = ("auto", "tokenizer")  # names resolved with the tokenizer's own chat template


def _with_tokenizer(messages: Sequence[Message], generation: bool) -> list[Segment]:
    raise ConfigError("the tokenizer's chat template renders with the tokenizer: use formats.tokenize_messages, "
                      "formats.prompt_ids or formats.resolve_template")


def register_template(template: Template) -> Template:
    """Add ``template`` to ``TEMPLATES`` under its name (replacing one of the same name)."""
    TEMPLATES[template.name] = template
    return template


def get_template(name: str) -> Template:
    """The registered template called ``name``."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r} (--data.template); expected one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


for _t in (Template("auto", _with_tokenizer, tools=True), Template("tokenizer", _with_tokenizer, tools=True),
           Template("alpaca", _alpaca), Template("llama2-chat", _llama2_chat),
           Template("chatml", _chatml, ("<|im_end|>",), tools=True), Template("llama3", _llama3, ("<|eot_id|>",), tools=True),
           Template("none", _none, tools=True)):
    register_template(_t)
TEMPLATES["plain"] = TEMPLATES["none"]
