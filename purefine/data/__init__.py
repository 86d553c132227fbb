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
- ``sources``: the bundled demo, local files and directories, hub datasets.
- ``sampler``: ``SamplerState`` (seed, epoch, position) and the packing plan shared by all ranks.
- ``pipeline``: ``DataConfig``, ``build`` / ``build_eval`` -> ``TokenizedDataset``, ``batches``.
- ``bench``: ``bench_pipeline()`` (tokenization and packing throughput on the demo).
"""

from purefine.data.formats import (
    FORMATS, IGNORE_INDEX, TEMPLATES, Sample, Segment, Template, get_template, prompt_ids, register_template,
    tokenize_messages, tokenize_row,
)
from purefine.data.pipeline import (
    DataConfig, TokenizedDataset, batches, build, build_eval, collate_packed, collate_padded, from_samples, tokenize,
    truncate, unpack,
)
from purefine.data.sampler import SamplerState, epoch_order, plan_rows
from purefine.data.sources import (
    ASSETS_DIR, BUILTIN_DEMO, DEMO_DIR, DEMO_EVAL, DEMO_TOKENIZER, DEMO_TRAIN, load_split,
)
from purefine.data.loader import load_tokenizer
from purefine.data.tokenizer import SentencePieceTokenizer, Tokenizer

__all__ = [
    "ASSETS_DIR", "BUILTIN_DEMO", "DEMO_DIR", "DEMO_EVAL", "DEMO_TOKENIZER", "DEMO_TRAIN", "FORMATS", "IGNORE_INDEX",
    "TEMPLATES", "DataConfig", "Sample", "SamplerState", "Segment", "SentencePieceTokenizer", "Template",
    "TokenizedDataset", "Tokenizer", "batches", "build", "build_eval", "collate_packed", "collate_padded",
    "epoch_order", "from_samples", "get_template", "load_split", "load_tokenizer", "plan_rows", "prompt_ids",
    "register_template", "tokenize", "tokenize_messages", "tokenize_row", "truncate", "unpack",
]
