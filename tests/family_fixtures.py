"""Tiny random transformers checkpoints of every causal family, for the parametrized family tests.

- ``FAMILIES``: the causal families purefine runs (BERT has its own tests).
- ``BASE[family]``: the tiny transformers config keywords of each family's reference model: GQA,
  a window shorter than the test sequences where the family has one, Gemma-2's soft-caps,
  Phi-3's partial rotary, head_dim apart from hidden / heads where transformers allows it.
- ``VARIANTS``: (family, name, overrides) of the unusual shapes every parity test runs.
- ``make_hf(family, path, seed=, **overrides)``: a random ``<X>ForCausalLM`` saved to ``path``
  (every tensor drawn from N(0, 0.3), so differences show; Gemma-2 in eager attention).
- ``hf_kwargs_strategy(family)``: hypothesis configs over random shapes of one family.
- ``save_tiny_tokenizer(path, vocab_size)``: a byte-level BPE trained on the bundled demo data,
  saved with its special tokens as transformers does (``tokenizer.json`` + config).
- ``left_padded(b, t, pad)``: (attention mask (B, T) long, positions (B, T)) with the last row
  left-padded by ``pad``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2")
WINDOWED = ("mistral", "qwen2", "qwen3", "gemma2", "phi3")
SEQ = 12  # longer than every window below
UNSET = "<unset>"  # an override that drops the key (transformers' default), unlike None

HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
              "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM"),
              "gpt2": ("GPT2Config", "GPT2LMHeadModel")}

_DECODER = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
BASE: dict[str, dict[str, Any]] = {
    "llama": dict(_DECODER, head_dim=16),
    "mistral": dict(_DECODER, head_dim=16, sliding_window=4),
    "qwen2": dict(_DECODER, use_sliding_window=True, sliding_window=4,
                  layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True),
    "qwen3": dict(_DECODER, head_dim=16, use_sliding_window=True, sliding_window=3,
                  layer_types=["full_attention", "sliding_attention"], tie_word_embeddings=True),
    "gemma2": dict(_DECODER, num_hidden_layers=3, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                   attn_logit_softcapping=4.0, final_logit_softcapping=5.0),
    "phi3": dict(_DECODER, sliding_window=4, partial_rotary_factor=0.5, original_max_position_embeddings=128),
    "gpt2": dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0),
}

VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("llama", "gqa-head_dim", {}),
    ("llama", "mqa-tied-biases", dict(num_key_value_heads=1, head_dim=UNSET, tie_word_embeddings=True,
                                      attention_bias=True, mlp_bias=True)),
    ("mistral", "gqa-head_dim-window", {}),
    ("mistral", "mqa-tied-no-window", dict(num_key_value_heads=1, tie_word_embeddings=True, sliding_window=None)),
    ("qwen2", "windowed-layer-tied", {}),
    ("qwen2", "mqa-untied-max_window_layers", dict(num_key_value_heads=1, tie_word_embeddings=False, layer_types=UNSET,
                                                   num_hidden_layers=3, max_window_layers=1)),
    ("qwen3", "head_dim-windowed-layer", {}),
    ("qwen3", "attention_bias-untied", dict(attention_bias=True, tie_word_embeddings=False, head_dim=4,
                                            num_key_value_heads=1)),
    ("gemma2", "alternating-window-softcaps", {}),
    ("gemma2", "untied-no-softcaps", dict(tie_word_embeddings=False, attn_logit_softcapping=None,
                                          final_logit_softcapping=None, head_dim=8, query_pre_attn_scalar=8)),
    ("phi3", "partial-rotary-window", {}),
    ("phi3", "full-rotary-tied-mha", dict(partial_rotary_factor=1.0, sliding_window=None, tie_word_embeddings=True,
                                          num_key_value_heads=4)),
    ("gpt2", "tied", {}),
    ("gpt2", "untied-relu-inner", dict(tie_word_embeddings=False, activation_function="relu", n_inner=40,
                                       scale_attn_by_inverse_layer_idx=True)),
]


def hf_config(family: str, **overrides: Any) -> Any:
    """The transformers config of ``family``'s tiny model with ``overrides`` (``UNSET`` drops a key)."""
    kw = {k: v for k, v in {**BASE[family], **overrides}.items() if v is not UNSET}
    if family == "gemma2":
        kw["attn_implementation"] = "eager"  # transformers' SDPA path has no attention soft-cap
    return hf_config_class(family)(**kw)


def hf_config_class(family: str) -> type:
    """transformers' config class of ``family`` (``LlamaConfig``, ...)."""
    import transformers

    return getattr(transformers, HF_CLASSES[family][0])


def hf_model_class(family: str) -> type:
    """transformers' causal-LM class of ``family`` (``LlamaForCausalLM``, ...)."""
    import transformers

    return getattr(transformers, HF_CLASSES[family][1])


def make_hf(family: str, path: Path | None = None, *, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random tiny transformers model of ``family`` (eval mode, every tensor N(0, 0.3)), saved to
    ``path`` with ``save_pretrained`` when given."""
    torch.manual_seed(seed)
    model = hf_model_class(family)(hf_config(family, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.generation_config.eos_token_id = None  # generate up to max_new_tokens, as purefine without eos_ids
    if path is not None:
        model.save_pretrained(path)
    return model


def load_hf_model(family: str, path: Path) -> torch.nn.Module:
    """``from_pretrained`` of a saved tiny model (Gemma-2 in eager attention), eval mode."""
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": "eager"} if family == "gemma2" else {}
    return AutoModelForCausalLM.from_pretrained(path, **extra).eval()


def left_padded(b: int, t: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention mask (B, T) long with the last row's first ``pad`` tokens padding, positions (B, T))."""
    attn = torch.ones(b, t, dtype=torch.long)
    attn[-1, :pad] = 0
    return attn, (attn.cumsum(-1) - 1).clamp(min=0)


# ---- hypothesis: random shapes per family ----------------------------------------------------------

ROPE_SCALING = [None, {"rope_type": "linear", "factor": 2.0},
                {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 32}]


@st.composite
def _decoder_kwargs(draw: Any, family: str) -> dict:
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    own_head_dim = family in ("llama", "mistral", "qwen3", "gemma2")  # transformers has the field there
    layers = draw(st.integers(1, 3))
    kw = dict(hidden_size=heads * head_dim * (draw(st.sampled_from([1, 2])) if own_head_dim else 1),
              num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=draw(st.integers(8, 48)),
              num_hidden_layers=layers, vocab_size=draw(st.integers(16, 80)), tie_word_embeddings=draw(st.booleans()),
              rope_theta=draw(st.sampled_from([100.0, 10000.0, 500000.0])),
              head_dim=head_dim if own_head_dim else UNSET)
    window = st.sampled_from([1, 2, 3, 5, 64])
    if family == "llama":
        kw["rope_scaling"] = draw(st.sampled_from(ROPE_SCALING))
    elif family == "mistral":
        kw["sliding_window"] = draw(st.one_of(st.none(), window))
    elif family in ("qwen2", "qwen3"):
        kw.update(use_sliding_window=draw(st.booleans()), sliding_window=draw(window), layer_types=UNSET,
                  max_window_layers=draw(st.integers(0, layers)))
        if family == "qwen3":
            kw["attention_bias"] = draw(st.booleans())
    elif family == "gemma2":
        kw.update(sliding_window=draw(window), query_pre_attn_scalar=draw(st.sampled_from([4, 16, 24])),
                  attn_logit_softcapping=draw(st.sampled_from([None, 2.0, 50.0])),
                  final_logit_softcapping=draw(st.sampled_from([None, 3.0, 30.0])))
    elif family == "phi3":
        kw.update(sliding_window=draw(st.one_of(st.none(), window)),
                  partial_rotary_factor=draw(st.sampled_from([0.5, 1.0])))
    return kw


@st.composite
def _gpt2_kwargs(draw: Any) -> dict:
    heads = draw(st.sampled_from([1, 2, 4]))
    return dict(n_embd=heads * draw(st.sampled_from([4, 8])), n_head=heads, n_layer=draw(st.integers(1, 3)),
                n_inner=draw(st.sampled_from([None, 12, 40])), vocab_size=draw(st.integers(16, 64)),
                activation_function=draw(st.sampled_from(["gelu_new", "gelu", "relu"])),
                tie_word_embeddings=draw(st.booleans()), scale_attn_weights=draw(st.booleans()),
                scale_attn_by_inverse_layer_idx=draw(st.booleans()))


def hf_kwargs_strategy(family: str) -> st.SearchStrategy[dict]:
    """Overrides of ``BASE[family]`` over random shapes (GQA, head_dim, windows, ties, family options)."""
    return _gpt2_kwargs() if family == "gpt2" else _decoder_kwargs(family)


# ---- a tiny tokenizer beside a checkpoint --------------------------------------------------------

def save_tiny_tokenizer(path: Path, vocab_size: int) -> int:
    """Train a byte-level BPE of at most ``vocab_size`` ids on the bundled demo rows and save it
    (``tokenizer.json``, bos / eos / pad = ``<|endoftext|>``) in ``path``; return its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import purefine as pf
    from purefine.data.templates import ALPACA_INPUT_PREAMBLE, ALPACA_PREAMBLE

    rows = [json.loads(line) for line in Path(pf.data.DEMO_TRAIN).read_text().splitlines()[:400]]
    corpus = [" ".join(str(v) for v in row.values()) for row in rows]
    corpus += [f"{ALPACA_PREAMBLE}\n\n### Instruction:\n",
               f"{ALPACA_INPUT_PREAMBLE}\n\n### Input:\n### Response:\n"] * 50  # the template in few tokens
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(path)
    return tok.get_vocab_size()
