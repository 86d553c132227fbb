"""Dataset rows -> conversations -> template segments -> token ids with exact loss masks.

- Formats (``FORMATS``): ``alpaca`` (instruction, input, output), ``chat`` (OpenAI ``messages`` with
  role/content, or ShareGPT ``conversations`` with from/value), ``text`` (plain completion) and
  ``preference`` (prompt, chosen, rejected). ``column_map`` {expected field: dataset column} reads
  renamed columns. Each row becomes a list of messages ``{"role", "content"}`` (alpaca rows keep
  their ``input`` so the alpaca template can show it the way Stanford Alpaca does).
  Chat messages may carry tool turns (role ``tool``; ShareGPT ``observation``) and, in the OpenAI
  layout, extra keys (``tool_calls``, ``name``, ``tool_call_id``, ``reasoning_content``) that are
  passed through to the tokenizer's chat template.
- ``resolve_template(name, tokenizer)``: ``auto`` -> the tokenizer's own chat template
  (``purefine.data.chat_template``) when it ships one, else ``alpaca``; ``tokenizer`` -> that
  template (a ``ConfigError`` when there is none); any other name -> the hand-written template.
- Templates (``purefine.data.templates``, re-exported here; ``TEMPLATES`` maps name -> ``Template``):
  ``alpaca``, ``llama2-chat`` (``[INST]``, ``<<SYS>>``), ``chatml``, ``llama3`` and ``none``. A template renders messages to ``Segment``s:
  text, a named special token, or the tokenizer's bos / eos, each flagged as part of an assistant
  turn or not. Segments are encoded one by one, so the loss mask follows segment boundaries exactly
  (never a re-tokenization guess). A special token the tokenizer lacks is encoded as plain text.
  Add a template with ``register_template``.
- Masking (``train_on``): ``assistant`` (every assistant turn, with its end token), ``all`` or
  ``last`` (the last assistant turn). Labels are shifted: ``labels[t]`` is the target of position t,
  ``tokens[t + 1]`` if that token carries loss, else -100; the last position is always -100.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from purefine.data.chat_template import ChatTemplate, chat_prompt_ids, tokenize_chat
from purefine.data.templates import (
    TEMPLATES, Message, Segment, Template, get_template, register_template, validate_conversation,
)
from purefine.data.tokenizer import Tokenizer
from purefine.errors import ConfigError, DataError
from purefine.ops import IGNORE_INDEX

__all__ = [
    "FORMATS", "TEMPLATES", "Message", "Segment", "Template", "Sample", "TrainOn", "IGNORE_INDEX",
    "get_template", "register_template", "row_error", "detect_format", "row_messages", "encode_segments",
    "loss_mask", "shift_labels", "tokenize_messages", "tokenize_row", "prompt_ids", "resolve_template",
    "ChatTemplate", "AnyTemplate",
]

TrainOn = Literal["assistant", "all", "last"]
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
                  "tool": "tool", "observation": "tool", "function_call": "assistant"}
OPENAI_ROLES = ("system", "user", "assistant", "tool")
AnyTemplate = Template | ChatTemplate


@dataclass(frozen=True)
class Sample:
    """One tokenized example: ``tokens`` (n,) and already-shifted ``labels`` (n,), -100 = no loss."""

    tokens: list[int]
    labels: list[int]


def row_error(index: int, field: str, problem: str) -> DataError:
    """The error for a bad row: names the row index and the field."""
    return DataError(f"row {index + 1}, field {field!r}: {problem}")  # rows count from 1, as a file's lines


def _string(row: Mapping[str, Any], index: int, column: str, *, optional: bool = False) -> str:
    value = row.get(column)
    if value is None:
        if optional:
            return ""
        present = sorted(k for k, v in row.items() if v is not None)
        raise row_error(index, column, f"missing (expected a string; the row has {present})")
    if not isinstance(value, str):
        raise row_error(index, column, f"expected a string, found {type(value).__name__} {str(value)[:40]!r}")
    return value


def _alpaca(row: Mapping[str, Any], index: int, col: Callable[[str], str]) -> list[Message]:
    instruction = _string(row, index, col("instruction"))
    if not instruction.strip():
        raise row_error(index, col("instruction"), "is empty")
    user: Message = {"role": "user", "content": instruction}
    extra = _string(row, index, col("input"), optional=True)
    if extra:
        user["input"] = extra
    return [user, {"role": "assistant", "content": _string(row, index, col("output"))}]


def _parse_message(m: Any, index: int, where: str) -> Message:
    if not isinstance(m, Mapping):
        raise row_error(index, where, f"expected a message object, found {type(m).__name__}")
    sharegpt = m.get("from") is not None or m.get("value") is not None
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    role = m.get(role_key)
    if role is None:
        raise row_error(index, f"{where}.{role_key}", "missing")
    if not isinstance(role, str):
        raise row_error(index, f"{where}.{role_key}", f"expected a string, found {type(role).__name__}")
    known = SHAREGPT_ROLES if sharegpt else {r: r for r in OPENAI_ROLES}
    if role not in known:
        raise row_error(index, f"{where}.{role_key}", f"unknown role {role!r}; expected one of {', '.join(known)}")
    content = m.get(content_key)
    if content is None and not sharegpt and m.get("tool_calls") is not None:
        content = ""  # an assistant turn that only calls tools
    if not isinstance(content, str):
        found = "missing" if content is None else f"found {type(content).__name__}"
        raise row_error(index, f"{where}.{content_key}", f"expected a string, {found}")
    extra = {} if sharegpt else {k: v for k, v in m.items() if k not in ("role", "content") and v is not None}
    return {**extra, "role": known[role], "content": content}


def _conversation(value: Any, index: int, field: str) -> list[Message]:
    if value is None:
        raise row_error(index, field, "missing (expected a list of messages)")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise row_error(index, field, f"expected a list of messages, found {type(value).__name__}")
    if len(value) == 0:
        raise row_error(index, field, "empty conversation")
    messages = [_parse_message(m, index, f"{field}[{j}]") for j, m in enumerate(value)]
    problem = validate_conversation(messages)
    if problem:
        raise row_error(index, field, problem)
    return messages


def _chat(row: Mapping[str, Any], index: int, col: Callable[[str], str]) -> list[Message]:
    field = col("messages")
    if row.get(field) is None and row.get(col("conversations")) is not None:
        field = col("conversations")
    return _conversation(row.get(field), index, field)


def _text(row: Mapping[str, Any], index: int, col: Callable[[str], str]) -> list[Message]:
    return [{"role": "text", "content": _string(row, index, col("text"))}]


def _response(value: Any, prompt: list[Message], index: int, field: str) -> list[Message]:
    """The prompt followed by a response given as a string or as a list of messages."""
    if value is None:
        raise row_error(index, field, "missing (expected a string or a list of messages)")
    if isinstance(value, str):
        if not prompt:
            raise row_error(index, field, "a string response needs a 'prompt' field")
        messages = [*prompt, {"role": "assistant", "content": value}]
    elif isinstance(value, Sequence) and not isinstance(value, bytes):
        messages = [*prompt, *(_parse_message(m, index, f"{field}[{j}]") for j, m in enumerate(value))]
    else:
        raise row_error(index, field, f"expected a string or a list of messages, found {type(value).__name__}")
    if not messages:
        raise row_error(index, field, "empty conversation")
    problem = validate_conversation(messages)
    if problem:
        raise row_error(index, field, problem)
    return messages


def _preference(row: Mapping[str, Any], index: int, col: Callable[[str], str]) -> tuple[list[Message], list[Message]]:
    raw = row.get(col("prompt"))
    if raw is None:
        prompt: list[Message] = []
    elif isinstance(raw, str):
        prompt = [{"role": "user", "content": raw}]
    elif isinstance(raw, Sequence):
        prompt = [_parse_message(m, index, f"{col('prompt')}[{j}]") for j, m in enumerate(raw)]
    else:
        raise row_error(index, col("prompt"), f"expected a string or a list of messages, found {type(raw).__name__}")
    return (_response(row.get(col("chosen")), prompt, index, col("chosen")),
            _response(row.get(col("rejected")), prompt, index, col("rejected")))


FORMATS: dict[str, Callable[..., Any]] = {"alpaca": _alpaca, "chat": _chat, "text": _text, "preference": _preference}
# Columns that identify a format (after column_map), in the order auto-detection tries them.
FORMAT_COLUMNS = (("preference", ("chosen", "rejected")), ("chat", ("messages",)), ("chat", ("conversations",)),
                  ("alpaca", ("instruction", "output")), ("text", ("text",)))


def detect_format(columns: Sequence[str], column_map: Mapping[str, str] | None = None, *, source: str = "dataset") -> str:
    """The format whose fields ``columns`` has: preference, chat, alpaca or text (in that order)."""
    cmap = dict(column_map or {})
    for name, needed in FORMAT_COLUMNS:
        if all(cmap.get(f, f) in columns for f in needed):
            return name
    raise DataError(f"{source}: cannot tell the format from its columns {list(columns)}; expected "
                    "instruction+output (alpaca), messages or conversations (chat), text, or chosen+rejected "
                    "(preference). Set --data.format and --data.column-map")


def row_messages(row: Mapping[str, Any], index: int, fmt: str, column_map: Mapping[str, str] | None = None) -> Any:
    """A row as messages (a pair of message lists for ``preference``); bad rows raise ``DataError``."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    cmap = dict(column_map or {})
    return FORMATS[fmt](row, index, lambda f: cmap.get(f, f))


def encode_segments(segments: Sequence[Segment], tokenizer: Tokenizer) -> tuple[list[int], list[bool], list[int]]:
    """Segments -> (token ids (n,), in-assistant-turn flags (n,), assistant turn index or -1 (n,))."""
    ids: list[int] = []
    flags: list[bool] = []
    turns: list[int] = []
    for seg in segments:
        if seg.kind == "bos":
            part = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        elif seg.kind == "eos":
            part = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        else:
            special = tokenizer.token_to_id(seg.text) if seg.kind == "special" else None
            part = [special] if special is not None else tokenizer.encode(seg.text) if seg.text else []
        ids += part
        flags += [seg.assistant] * len(part)
        turns += [seg.turn] * len(part)
    return ids, flags, turns


def loss_mask(flags: Sequence[bool], turns: Sequence[int], train_on: TrainOn) -> list[bool]:
    """Which tokens are prediction targets (n,): assistant turns, all tokens, or the last assistant turn."""
    if train_on == "all":
        return [True] * len(flags)
    if train_on == "assistant":
        return list(flags)
    if train_on == "last":
        last = max((t for t, f in zip(turns, flags) if f), default=-1)
        return [f and t == last for f, t in zip(flags, turns)]
    raise DataError(f"unknown train_on {train_on!r}; expected assistant, all or last")


def shift_labels(tokens: Sequence[int], mask: Sequence[bool]) -> list[int]:
    """labels (n,): ``labels[t] = tokens[t+1]`` where ``mask[t+1]``, else -100; the last is -100."""
    return [tok if m else IGNORE_INDEX for tok, m in zip(tokens[1:], mask[1:])] + [IGNORE_INDEX] * bool(tokens)


def resolve_template(template: AnyTemplate | str, tokenizer: Tokenizer) -> AnyTemplate:
    """The template a name stands for with this tokenizer (see the module doc); objects pass through."""
    if not isinstance(template, str):
        return template
    if template not in ("auto", "tokenizer"):
        return get_template(template)
    own = ChatTemplate.of(tokenizer)
    if own is not None:
        return own
    if template == "tokenizer":
        raise ConfigError(f"--data.template tokenizer: the tokenizer ({tokenizer!r}) ships no chat template "
                          "(tokenizer_config.json chat_template or chat_template.jinja); pick a hand-written one: "
                          "alpaca, llama2-chat, chatml, llama3 or none")
    return get_template("alpaca")


def rendered_ids(messages: Sequence[Message], template: AnyTemplate, tokenizer: Tokenizer,
                 add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` as ``template`` renders them (no loss mask)."""
    if isinstance(template, ChatTemplate):
        if add_generation_prompt:
            return chat_prompt_ids(messages, template, tokenizer)  # type: ignore[arg-type]
        return tokenizer.encode_offsets(template.render(messages)[0])[0]  # type: ignore[attr-defined]
    return encode_segments(template.render(messages, add_generation_prompt), tokenizer)[0]


def tokenize_messages(messages: Sequence[Message], template: AnyTemplate | str, tokenizer: Tokenizer, *,
                      train_on: TrainOn = "assistant", max_seq_len: int | None = None) -> Sample:
    """Render, encode, truncate to ``max_seq_len`` (keeping the start) and shift the labels."""
    template = resolve_template(template, tokenizer)
    if isinstance(template, ChatTemplate) and not (len(messages) == 1 and messages[0]["role"] == "text"):
        ids, mask = tokenize_chat(messages, template, tokenizer, train_on)  # type: ignore[arg-type]
    else:  # a plain-text sample renders the same under every template
        template = get_template("none") if isinstance(template, ChatTemplate) else template
        ids, flags, turns = encode_segments(template.render(messages, False), tokenizer)
        mask = loss_mask(flags, turns, train_on)
    if max_seq_len is not None:
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    return Sample(ids, shift_labels(ids, mask))


def tokenize_row(row: Mapping[str, Any], index: int, *, fmt: str, template: AnyTemplate | str, tokenizer: Tokenizer,
                 column_map: Mapping[str, str] | None = None, train_on: TrainOn = "assistant",
                 max_seq_len: int | None = None) -> Sample | tuple[Sample, Sample]:
    """One dataset row -> a ``Sample`` (a (chosen, rejected) pair for ``preference``); a row the
    template cannot render is a ``DataError`` naming the row."""
    messages = row_messages(row, index, fmt, column_map)
    kw = dict(train_on=train_on, max_seq_len=max_seq_len)
    try:
        if fmt == "preference":
            return _preference_samples(*messages, template, tokenizer, kw)
        return tokenize_messages(messages, template, tokenizer, **kw)
    except DataError as e:
        raise DataError(f"row {index + 1}: {e}") from None


def _preference_samples(chosen: list[Message], rejected: list[Message], template: Template | str, tokenizer: Tokenizer,
                        kw: dict) -> tuple[Sample, Sample]:
    """(chosen, rejected) samples with loss on the completions only: the messages the two share (the
    prompt, at most all but each one's last message) carry none, whatever ``train_on`` says of them."""
    template = resolve_template(template, tokenizer)
    limit = min(len(chosen), len(rejected)) - 1
    shared = next((i for i in range(limit) if chosen[i] != rejected[i]), limit)
    prompt = rendered_ids(chosen[:shared], template, tokenizer) if shared > 0 else []
    out = []
    for messages in (chosen, rejected):
        s = tokenize_messages(messages, template, tokenizer, **kw)
        if prompt and s.tokens[:len(prompt)] == prompt:  # a template whose prompt renders as a prefix (all built in)
            s = Sample(s.tokens, [IGNORE_INDEX] * (len(prompt) - 1) + s.labels[len(prompt) - 1:])
        out.append(s)
    return out[0], out[1]


def prompt_ids(messages: Sequence[Message], template: AnyTemplate | str, tokenizer: Tokenizer) -> list[int]:
    """Token ids of a conversation ending in a user turn, plus the assistant header: what generation
    continues from, encoded exactly as training encodes it."""
    return rendered_ids(messages, resolve_template(template, tokenizer), tokenizer, add_generation_prompt=True)
