"""Hugging Face ``tokenizer.json`` tokenizers (Llama-3, GPT-2, BERT, Qwen2, ...) behind purefine's
``Tokenizer`` protocol, through the ``tokenizers`` package (what transformers' fast tokenizers run).

- ``HFTokenizer(path)`` / ``HFTokenizer.from_dir(path)``: a ``tokenizer.json`` file or a model
  directory holding one. The special tokens come from ``tokenizer_config.json`` (and the older
  ``special_tokens_map.json``) beside it, as transformers reads them.
- ``encode(text, bos=, eos=)``: the ids of ``tokenizer(text, add_special_tokens=False)`` in
  transformers, with the bos / eos id added when asked. As there, special-token strings written
  in the text (``<|eot_id|>``) become their ids: that is how rendered chat templates are read.
- ``decode(ids)``: the text of ``tokenizer.decode(ids, skip_special_tokens=True)`` (the protocol:
  special tokens decode to nothing), including transformers' ``clean_up_tokenization_spaces``
  for non-BPE models (BERT's " ." -> ".").
- ``bos_id`` / ``eos_id``: the ``bos_token`` / ``eos_token``; a tokenizer with none (BERT) uses its
  ``cls_token`` / ``sep_token``, so ``encode(text, bos=True, eos=True)`` is ``[CLS] text [SEP]``.
  ``pad_id``: ``pad_token``, else the eos id, else the unknown token, else 0.
- ``encode_offsets(text)``: the ids and each token's character offsets (for chat-template masks).
- ``chat_template``: the Jinja chat template shipped with the tokenizer (or None):
  ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template`` (a string, or the
  entry named ``default`` of a list of named templates); ``chat_template_file`` says which file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend

from purefine import fsutil
from purefine.data.tokenizer import checked_ids, with_bos_eos
from purefine.errors import TokenizerError

TOKENIZER_JSON = "tokenizer.json"
CONFIG_FILES = ("special_tokens_map.json", "tokenizer_config.json")  # later files win, as in transformers
CHAT_TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("bos", "eos", "pad", "unk", "cls", "sep", "mask")
# transformers' clean_up_tokenization (tokenization_utils_base), applied to non-BPE decodes when asked
CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _read_json(path: Path) -> dict:
    return fsutil.read_json_object(path, TokenizerError)


def _token_text(value: Any, where: str) -> str | None:
    """A special-token entry as written by transformers: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: expected a token string or {{'content': ...}}, found {value!r}")


def _guarded(path: Path, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args)`` of the Rust backend, a panic in it (pyo3's PanicException, a BaseException: a malformed
    file the loader accepted, e.g. ``"normalizer": [""]``, fails at its first encode) a TokenizerError naming ``path``."""
    try:
        return fn(*args, **kwargs)
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise TokenizerError(f"{path}: the tokenizers library failed on this tokenizer.json "
                             f"({' '.join(str(e).split())})") from None


class HFTokenizer:
    """A ``tokenizer.json`` tokenizer with the ``purefine.data.tokenizer.Tokenizer`` interface."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        file = path / TOKENIZER_JSON if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"{file}: tokenizer.json not found")
        self.path = file
        try:
            self.backend = _guarded(file, _Backend.from_file, str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{file}: not a valid Hugging Face tokenizer.json ({' '.join(str(e).split())})") from None
        config = self._read_configs(file.parent)
        self.roles: dict[str, str] = {r: t for r in ROLES if (t := _token_text(config.get(f"{r}_token"), f"{file.parent}: {r}_token"))}
        self.vocab_size: int = max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self._special = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        self._role_ids = {r: self._role_id(r, t) for r, t in self.roles.items()}
        self.bos_id: int | None = self._role_ids.get("bos", self._role_ids.get("cls"))
        self.eos_id: int | None = self._role_ids.get("eos", self._role_ids.get("sep"))
        self.unk_id: int | None = self._role_ids.get("unk")
        pad = self._role_ids.get("pad", self.eos_id if self.eos_id is not None else self.unk_id)
        self.pad_id: int = pad if pad is not None else 0
        self.cleanup: bool = bool(config.get("clean_up_tokenization_spaces", False)) and self._model_kind() != "BPE"
        self.chat_template_file: Path | None = None
        self.chat_template: str | None = self._chat_template(file.parent, config)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> HFTokenizer:
        """The tokenizer of a model directory (``tokenizer.json`` + ``tokenizer_config.json``)."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path}: tokenizer directory not found")
        return cls(path)

    @staticmethod
    def _read_configs(directory: Path) -> dict:
        config: dict = {}
        for name in CONFIG_FILES:
            if (directory / name).is_file():
                config.update(_read_json(directory / name))
        return config

    def _role_id(self, role: str, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.path.parent}: {role}_token {token!r} is not in the vocabulary of {self.path.name}")
        return i

    def _model_kind(self) -> str:
        return type(self.backend.model).__name__  # "BPE", "WordPiece", "Unigram": transformers' own test

    def _chat_template(self, directory: Path, config: dict) -> str | None:
        if (directory / CHAT_TEMPLATE_FILE).is_file():
            self.chat_template_file = directory / CHAT_TEMPLATE_FILE
            try:
                return (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as e:
                raise TokenizerError(f"{directory / CHAT_TEMPLATE_FILE}: not a UTF-8 text file ({e})") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(template, str):
            self.chat_template_file = directory / "tokenizer_config.json"
            return template
        return None

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """{token string: id} of every special added token (``<|eot_id|>``, ``[CLS]``, ...)."""
        return dict(self._special)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids (no template tokens), with the bos / eos id added when asked and defined."""
        if not isinstance(text, str):
            raise TokenizerError(f"{self.path}: encode expects a string, found {type(text).__name__}")
        return with_bos_eos(self, self._encode(text).ids if text else [], bos, eos)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids (n,), (start, end) character offsets of each token (n,)) of ``text``, as ``encode``."""
        if not isinstance(text, str):
            raise TokenizerError(f"{self.path}: encode expects a string, found {type(text).__name__}")
        if not text:
            return [], []
        encoding = self._encode(text)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, special tokens dropped. Out-of-range ids are an error, not silently dropped."""
        ids = checked_ids(self, ids)
        text = _guarded(self.path, self.backend.decode, ids, skip_special_tokens=True)
        if self.cleanup:
            for old, new in CLEANUPS:
                text = text.replace(old, new)
        return text

    def _encode(self, text: str) -> Any:
        return _guarded(self.path, self.backend.encode, text, add_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        """The id of one whole token string, or None when the vocabulary lacks it."""
        return self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
