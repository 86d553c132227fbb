"""Load a tokenizer by what the path holds: ``load_tokenizer(path_or_dir, model_vocab_size=...)``.

A ``.model`` file or a directory holding ``tokenizer.model`` -> ``SentencePieceTokenizer``; a
``tokenizer.json`` -> ``HFTokenizer`` (Llama-3, GPT-2, BERT, Qwen, Gemma). A vocabulary larger than
the model's embedding is a ``TokenizerError``: its ids would index past the embedding table.
"""

from __future__ import annotations

import os
from pathlib import Path

from purefine.data.hf_tokenizer import HFTokenizer
from purefine.data.tokenizer import SentencePieceTokenizer, Tokenizer
from purefine.errors import TokenizerError

SENTENCEPIECE_NAME = "tokenizer.model"
HF_TOKENIZER_NAME = "tokenizer.json"


def _resolve(path: Path) -> tuple[str, Path]:
    """(kind, file) for a tokenizer path: a .model file, a tokenizer.json, or a directory holding one."""
    if path.is_dir():
        for name, kind in ((SENTENCEPIECE_NAME, "sentencepiece"), (HF_TOKENIZER_NAME, "hf")):
            if (path / name).is_file():
                return kind, path / name
        raise TokenizerError(f"{path}: no {SENTENCEPIECE_NAME} or {HF_TOKENIZER_NAME} in this directory")
    if not path.exists():
        raise TokenizerError(f"{path}: tokenizer file or directory not found")
    return ("hf" if path.suffix == ".json" else "sentencepiece"), path


def load_tokenizer(path_or_dir: str | os.PathLike, *, model_vocab_size: int | None = None) -> Tokenizer:
    """Load the tokenizer at ``path_or_dir`` (a file, or an HF model directory).

    A directory with both files (Llama-2 checkpoints ship both) uses ``tokenizer.model``. With
    ``model_vocab_size``, a tokenizer that can emit ids >= the model's vocabulary is an error; a
    smaller tokenizer is fine (models often pad their embedding table).
    """
    kind, file = _resolve(Path(path_or_dir))
    tok: Tokenizer = SentencePieceTokenizer(file) if kind == "sentencepiece" else HFTokenizer(file)
    if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
        raise TokenizerError(
            f"{file}: tokenizer vocabulary has {tok.vocab_size} tokens but the model's vocab_size is "
            f"{model_vocab_size}; ids >= {model_vocab_size} would index past the embedding. "
            "Use the tokenizer that belongs to the model")
    return tok
