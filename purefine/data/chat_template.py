"""The tokenizer's own Jinja chat template, rendered as transformers renders it, with exact loss masks.

    template = ChatTemplate.of(tokenizer)                     # None when the tokenizer ships none
    ids, mask = tokenize_chat(messages, template, tokenizer, train_on="assistant")   # (n,), (n,)

- Rendering: jinja2's ``ImmutableSandboxedEnvironment`` with transformers' settings (``trim_blocks``,
  ``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now``, a
  ``tojson`` that keeps non-ASCII text, an underscore-safe ``namespace``) and the ``{% generation %}``
  extension that records where each assistant span lands in the text. The template sees
  ``messages``, ``add_generation_prompt``, ``tools`` / ``documents`` (None) and the tokenizer's
  named special tokens (``bos_token``, ``eos_token``, ...), as ``apply_chat_template`` passes them.
- Trained characters: the ``{% generation %}`` spans where the template has markers; otherwise each
  assistant turn's span is found by rendering the conversation prefix by prefix: the turn starts
  where ``render(messages[:i], add_generation_prompt=True)`` ends and ends where
  ``render(messages[:i + 1])`` ends, less trailing whitespace (the newline templates put after an
  end-of-turn token is not generated). A template that renders earlier turns differently once
  later turns follow (Qwen3 drops old reasoning) cannot be split this way: a ``DataError`` says so.
- Trained tokens: the rendered text is encoded whole (``add_special_tokens=False``) and a token is
  trained when its character offsets overlap a span: transformers' ``return_assistant_tokens_mask``.
- Errors: a template that is not valid Jinja is a ``TokenizerError`` naming its file; one that fails
  on a conversation (``raise_exception``, a missing key) is a ``DataError`` with the template's words.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from purefine.data.hf_tokenizer import HFTokenizer
from purefine.errors import DataError, TokenizerError

GENERATION_MARKER = re.compile(r"\{\%-?\s*generation\s*-?\%\}")  # transformers' test for markers
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # names a message's reasoning goes by
Span = tuple[int, int]  # [start, end) character offsets in the rendered text

# (blocks rendered so far, spans found) while a render tracks its {% generation %} blocks
_TRACKING: ContextVar[tuple[list[str], list[Span]] | None] = ContextVar("purefine_generation", default=None)


class GenerationExtension(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body and, while tracking, records where
    the body lands in the output (as transformers' ``AssistantTracker``)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

    @jinja2.pass_eval_context
    def _generation(self, context: Any, caller: Any) -> str:
        text = caller()
        tracking = _TRACKING.get()
        if tracking is not None:
            start = len("".join(tracking[0]))
            tracking[1].append((start, start + len(text)))
        return text


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` without underscore-prefixed attributes (no path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment chat templates render in (transformers' settings)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationExtension, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
    return environment().from_string(source)


@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer's Jinja chat template: its ``source`` text, the file it came from (``origin``) and
    the named special tokens it may use (``special``: (("bos_token", "<s>"), ...))."""

    source: str
    origin: str
    special: tuple[tuple[str, str], ...] = ()
    name: str = "tokenizer"
    stop_tokens: tuple[str, ...] = ()

    @classmethod
    def of(cls, tokenizer: Any) -> ChatTemplate | None:
        """The chat template ``tokenizer`` ships, compiled once to check it, or None."""
        if not isinstance(tokenizer, HFTokenizer) or tokenizer.chat_template is None:
            return None
        special = tuple((f"{role}_token", text) for role, text in tokenizer.roles.items())
        template = cls(tokenizer.chat_template, str(tokenizer.chat_template_file), special)
        template.compiled()
        return template

    @property
    def has_markers(self) -> bool:
        """Whether the template marks assistant text with ``{% generation %}``."""
        return GENERATION_MARKER.search(self.source) is not None

    def compiled(self) -> jinja2.Template:
        """The compiled template; Jinja syntax errors are a ``TokenizerError`` naming ``origin``."""
        try:
            return _compiled(self.source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TokenizerError(f"{self.origin}: the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> tuple[str, list[Span]]:
        """(text, ``{% generation %}`` spans) of a conversation; render failures are ``DataError``s."""
        blocks: list[str] = []
        spans: list[Span] = []
        token = _TRACKING.set((blocks, spans))
        try:
            for block in self.compiled().generate(messages=template_messages(messages), tools=None, documents=None,
                                                  add_generation_prompt=add_generation_prompt, **dict(self.special)):
                blocks.append(block)
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise DataError(f"the chat template ({self.origin}) failed to render it: {type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}") from None
        finally:
            _TRACKING.reset(token)
        return "".join(blocks), spans


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as a chat template sees them (as transformers passes them): None-valued keys dropped,
    an alpaca ``input`` folded into the content, reasoning under both ``thinking`` and ``reasoning_content``."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("input"):
            m["content"] = f"{m['content']}\n\n{m['input']}"
        m.pop("input", None)
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _turn_span(template: ChatTemplate, messages: Sequence[Mapping[str, Any]], i: int, text: str) -> Span:
    """Assistant message ``i``'s characters in ``text`` (the whole conversation), by prefix renders."""
    before = template.render(messages[:i], add_generation_prompt=True)[0]
    through = template.render(messages[:i + 1])[0]
    if not through.startswith(before) or not text.startswith(through):
        raise DataError(f"the chat template ({template.origin}) renders assistant message {i} differently once "
                        "later messages follow, so its tokens cannot be found by prefix rendering; add "
                        "{% generation %} markers to the template or use --data.train-on last")
    return len(before), len(before) + len(through[len(before):].rstrip())


def assistant_spans(template: ChatTemplate, messages: Sequence[Mapping[str, Any]],
                    last_only: bool = False) -> tuple[str, list[Span]]:
    """(rendered conversation, character spans of its assistant text): every assistant turn, or the
    last one only."""
    text, spans = template.render(messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not template.has_markers:
        return text, [_turn_span(template, messages, i, text) for i in (turns[-1:] if last_only else turns)]
    if last_only and turns:
        before = template.render(messages[:turns[-1]], add_generation_prompt=True)[0]
        spans = [s for s in spans if s[0] >= len(before)] if text.startswith(before) else spans[-1:]
    return text, spans


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[bool]:
    """(n,) whether each token (its character ``offsets``) overlaps a span: transformers' rule."""
    mask = [False] * len(offsets)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        mask[t] = end > spans[k][0]
    return mask


def tokenize_chat(messages: Sequence[Mapping[str, Any]], template: ChatTemplate, tokenizer: HFTokenizer,
                  train_on: str = "assistant") -> tuple[list[int], list[bool]]:
    """(token ids (n,), trained (n,)) of a conversation under the tokenizer's template; ``train_on``
    is assistant, last or all."""
    if train_on not in ("assistant", "last", "all"):
        raise DataError(f"unknown train_on {train_on!r}; expected assistant, all or last")
    text, spans = assistant_spans(template, messages, last_only=train_on == "last")
    ids, offsets = tokenizer.encode_offsets(text)
    return ids, [True] * len(ids) if train_on == "all" else token_mask(offsets, spans)


def chat_prompt_ids(messages: Sequence[Mapping[str, Any]], template: ChatTemplate, tokenizer: HFTokenizer) -> list[int]:
    """Token ids of a conversation plus the template's generation prompt (what generation continues)."""
    return tokenizer.encode_offsets(template.render(messages, add_generation_prompt=True)[0])[0]
