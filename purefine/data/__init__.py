"""Data: tokenizers, row formats and prompt templates with exact loss masks, and the batch pipeline.

    from purefine import data
    tok = data.load_tokenizer(data.DEMO_TOKENIZER, model_vocab_size=cfg.vocab_size)
    train = data.build(data.DataConfig(), tok)               # the bundled demo by default
    for batch, state in data.batches(train, batch_size=8, seq_len=256, packing=True,
                                     sampler_state=data.SamplerState(seed=0)):
        loss_sum, n = loss(params, batch)                    # tokens, labels (shifted), positions, segment_ids

- ``tokenizer``: the ``Tokenizer`` protocol, ``SentencePieceTokenizer``, ``load_tokenizer``.
- ``templates`` / ``formats``: alpaca / chat / text / preference rows -> messages -> template
  segments -> token ids and shifted labels (``TEMPLATES`` is the registry).
- ``chat_template``: the tokenizer's own Jinja chat template (``--data.template tokenizer``, the
  default when the tokenizer ships one), rendered as transformers does, with exact assistant masks.
- ``config``: ``DataConfig`` (``--data.*``) and ``MixSource`` (``data.mix`` entries).
- ``sources`` / ``stream_rows``: the bundled demo, local files and directories, hub datasets;
  read whole, or row by row for streaming.
- ``sampler``: ``SamplerState`` (seed, epoch, position, mixed sources) and the packing plan shared
  by all ranks.
- ``pipeline``: ``build_split`` / ``build_eval_split`` -> ``TokenizedDataset``, ``batches``.
- ``streaming`` / ``mix``: ``StreamingDataset`` (``--data.streaming``), ``MixedDataset`` (``data.mix``).
- ``assemble``: ``build`` / ``build_eval``: whichever of those the config describes.
- ``bench``: ``bench_pipeline()`` (tokenization and packing throughput on the demo).
"""

from purefine.data.assemble import build, build_eval, describe, is_stream
from purefine.data.chat_template import ChatTemplate
from purefine.data.config import DataConfig, MixSource
from purefine.data.formats import (
    FORMATS, IGNORE_INDEX, TEMPLATES, Sample, Segment, Template, get_template, prompt_ids, register_template,
    resolve_template, tokenize_messages, tokenize_row,
)
from purefine.data.mix import MixedDataset
from purefine.data.pipeline import (
    TokenizedDataset, batches, build_eval_split, build_split, collate_packed, collate_padded, from_samples, tokenize,
    truncate, unpack,
)
from purefine.data.sampler import SamplerState, epoch_order, pack, plan_rows
from purefine.data.streaming import StreamingDataset
from purefine.data.sources import (
    ASSETS_DIR, BUILTIN_DEMO, DEMO_DIR, DEMO_EVAL, DEMO_TOKENIZER, DEMO_TRAIN, load_split,
)
from purefine.data.loader import load_tokenizer
from purefine.data.tokenizer import SentencePieceTokenizer, Tokenizer

__all__ = [
    "ASSETS_DIR", "BUILTIN_DEMO", "DEMO_DIR", "DEMO_EVAL", "DEMO_TOKENIZER", "DEMO_TRAIN", "FORMATS", "IGNORE_INDEX",
    "TEMPLATES", "ChatTemplate", "DataConfig", "MixSource", "MixedDataset", "Sample", "SamplerState", "Segment",
    "SentencePieceTokenizer", "StreamingDataset", "Template", "TokenizedDataset", "Tokenizer", "batches", "build",
    "build_eval", "build_eval_split", "build_split", "collate_packed", "collate_padded", "describe", "epoch_order",
    "from_samples", "get_template", "is_stream", "load_split", "load_tokenizer", "pack", "plan_rows", "prompt_ids",
    "register_template", "resolve_template", "tokenize", "tokenize_messages", "tokenize_row", "truncate", "unpack",
]
