"""Tokenizers: one small protocol and the SentencePiece tokenizer of Llama-2 (the loader that
dispatches between it and ``hf_tokenizer`` is ``data.loader``).

- ``Tokenizer``: what the data pipeline, generation and evaluation rely on — ``vocab_size``,
  ``bos_id`` / ``eos_id`` (None when the tokenizer has none), ``pad_id``, ``encode``, ``decode``,
  ``token_to_id`` (for special tokens) and ``special_tokens`` ({token string: id}).
- ``SentencePieceTokenizer``: a ``tokenizer.model`` file (Llama-2, Mistral, the bundled demo).
  ``encode`` follows SentencePiece exactly: each call adds the word-boundary prefix ``▁``.
- ``with_bos_eos`` / ``checked_ids``: what every tokenizer kind shares.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import sentencepiece as spm

from purefine.errors import TokenizerError

@runtime_checkable
class Tokenizer(Protocol):
    """The interface every tokenizer in purefine provides."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """{special token string: id}, e.g. {"<s>": 1, "</s>": 2, "<|eot_id|>": 128009}."""
        ...

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> token ids, with the bos / eos id added when asked (and the tokenizer has one)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text; special tokens decode to nothing."""
        ...

    def token_to_id(self, token: str) -> int | None:
        """The id of one whole token string (a special token), or None if the vocabulary lacks it."""
        ...


def with_bos_eos(tok: Any, ids: list[int], bos: bool, eos: bool) -> list[int]:
    """``ids`` with the tokenizer's bos / eos id around them when asked for and defined."""
    if bos and tok.bos_id is not None:
        ids = [tok.bos_id, *ids]
    if eos and tok.eos_id is not None:
        ids = [*ids, tok.eos_id]
    return ids


def checked_ids(tok: Any, ids: Sequence[int]) -> list[int]:
    """``ids`` as ints, or a TokenizerError naming the tokenizer file and the first id outside its vocabulary."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise TokenizerError(f"{tok.path}: token id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})")
    return ids


class SentencePieceTokenizer:
    """A SentencePiece ``tokenizer.model`` (Llama-2's format) behind the ``Tokenizer`` protocol.

    ``pad_id`` is the model's pad piece if it has one, else the unknown piece (Llama-2 defines no
    pad; padded positions never carry a label, so the id only has to be a valid one).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: tokenizer file not found")
        try:
            self.processor = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({' '.join(str(e).split())})") from None
        except UnicodeDecodeError:  # sentencepiece's own error message quoted bytes of the broken file
            raise TokenizerError(f"{self.path}: not a SentencePiece model (unreadable model proto)") from None
        sp = self.processor
        self.vocab_size: int = sp.get_piece_size()
        self.bos_id: int | None = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id: int | None = sp.eos_id() if sp.eos_id() >= 0 else None
        self.unk_id: int | None = sp.unk_id() if sp.unk_id() >= 0 else None
        self.pad_id: int = sp.pad_id() if sp.pad_id() >= 0 else (self.unk_id or 0)
        try:
            self._special = {sp.id_to_piece(i): i for i in range(self.vocab_size)
                             if sp.is_control(i) or sp.is_unknown(i)}
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{self.path}: a special piece is not valid UTF-8 ({e})") from None

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """{piece: id} of the control and unknown pieces (``<unk>``, ``<s>``, ``</s>``, ...)."""
        return dict(self._special)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids (SentencePiece semantics: special-token strings in the text stay plain text)."""
        if not isinstance(text, str):
            raise TokenizerError(f"{self.path}: encode expects a string, found {type(text).__name__}")
        return with_bos_eos(self, self.processor.encode(text) if text else [], bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Out-of-range ids are an error, not silently dropped."""
        ids = checked_ids(self, ids)
        try:
            return self.processor.decode(ids)
        except UnicodeDecodeError as e:  # a piece of a damaged model holds bytes that are not UTF-8
            raise TokenizerError(f"{self.path}: cannot decode {ids[:8]}... ({e})") from None

    def token_to_id(self, token: str) -> int | None:
        """The id of one piece, or None when the vocabulary lacks it."""
        i = self.processor.piece_to_id(token)
        if i == self.unk_id and token != self.processor.id_to_piece(i):
            return None
        return i

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
