"""Models as pure functions over parameter trees: every family runs the one decoder of ``decoder.py``.

    cfg = preset("llama-tiny")
    params = init(cfg, seed=0)
    logits = forward(cfg, params, tokens)                  # (B, T) -> (B, T, V)
    loss_sum, n_tokens = loss_fn(cfg)(params, batch)       # batch: tokens, labels (next-token targets)

Labels are already shifted: ``labels[b, t]`` is the target for the prediction at position t
(-100 where no loss is taken), so packing and masking never need to know about shifting.
``family(cfg)`` is the config's declared ``Family`` record (``family.py``); the functions here look
it up and hand it to the decoder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from purefine import ops
from purefine.errors import ConfigError
from purefine.models import decoder
from purefine.models.decoder import batch_mask
from purefine.models.family import Context, Family, ModelConfig
from purefine.models.registry import FAMILIES, config_from_hf, family, preset, presets

__all__ = [
    "FAMILIES", "Context", "Family", "ModelConfig", "config_from_hf", "family", "preset", "presets",
    "param_shapes", "init", "forward", "hidden_states", "logits", "output_weight", "new_cache", "loss_fn",
    "batch_mask", "lora_targets", "quantize_pattern", "hf_layout",
]

# Family-relative LoRA target names (``lora_targets``): the family's peft default, every linear layer.
DEFAULT_TARGETS, ALL_LINEAR = "default", "all-linear"


def param_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape} of the config's params."""
    return cfg.param_shapes()


def init(cfg: Any, **kwargs: Any) -> dict:
    """A seeded params tree (``decoder.init``: seed, dtype, device, hook)."""
    return decoder.init(family(cfg), cfg, **kwargs)


def forward(cfg: Any, params: dict, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """tokens (B, T) -> logits (B, T, V); ``positions`` (B, T), ``mask``, ``gather`` and ``extra`` as keywords."""
    return decoder.forward(family(cfg), cfg, params, tokens, **kwargs)


def hidden_states(cfg: Any, params: dict, tokens: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """tokens (B, T) -> (final hidden states (B, T, D), advanced KV cache or None)."""
    return decoder.hidden_states(family(cfg), cfg, params, tokens, **kwargs)


def logits(cfg: Any, params: dict, h: torch.Tensor, gather: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """Final hidden states (..., D) -> logits (..., V) (soft-capped where the family says so)."""
    return decoder.head(family(cfg), cfg, params, h, gather)


def output_weight(cfg: Any, params: dict) -> Any:
    """The (V, D) output projection leaf (tied embeddings included)."""
    return family(cfg).output_weight(cfg, params)


def new_cache(cfg: Any, batch: int, max_len: int, **kwargs: Any) -> ops.KVCache:
    """An empty KV cache for decoding (``dtype``, ``device`` as keywords)."""
    return decoder.new_cache(family(cfg), cfg, batch, max_len, **kwargs)


def loss_fn(cfg: Any, *, chunk_size: int = 1024, remat: bool = False,
            gather: Callable[[Any], Any] | None = None) -> Callable[[dict, Mapping], tuple[torch.Tensor, torch.Tensor]]:
    """(params, batch) -> (summed next-token cross-entropy (float32), number of labelled tokens).

    batch: ``tokens`` (B, T), ``labels`` (B, T) already shifted, optional ``positions`` (B, T) and
    ``segment_ids`` (B, T) (packed samples) or ``mask``. The loss is chunked over tokens so the
    (B*T, V) logits never exist whole; ``remat`` checkpoints each block; ``gather`` (FSDP) maps each
    block's params just before use. An encoder's head (BERT) has its own loss (``Family.loss``).
    """
    return decoder.loss_fn(family(cfg), cfg, chunk_size=chunk_size, remat=remat, gather=gather)


def lora_targets(cfg: Any, targets: str | Sequence[str] = DEFAULT_TARGETS) -> str | list[str]:
    """The ``where`` of ``lora.apply`` for ``targets`` over this config's family.

    ``"default"`` -> the family's ``lora_targets`` (peft's default: q_proj, v_proj for Llama /
    Mistral / Qwen / Gemma-2, qkv_proj for Phi-3, c_attn for GPT-2, query, value for BERT);
    ``"all-linear"`` -> the family's ``linear_layers``; a list of names is kept (``"default"`` /
    ``"all-linear"`` inside it expand in place); any other single string is a regex over weight
    paths, kept as is.
    """
    fam = family(cfg)
    expand = {DEFAULT_TARGETS: fam.lora_targets, ALL_LINEAR: fam.linear_layers}
    names = [targets] if isinstance(targets, str) else list(targets)
    if len(names) == 1 and names[0] not in expand and not names[0].isidentifier():
        return names[0]  # a regex
    out: dict[str, None] = {}
    for name in names:
        out.update(dict.fromkeys(expand.get(name, (name,))))
    if not out:
        raise ConfigError(f"lora targets: the {cfg.model_type} family names no LoRA targets; give module names or a regex")
    return list(out)


def hf_layout(cfg: Any, name: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor between purefine's (out, in) layout and the HF file's: transposed where the family
    stores the weight as (in, out) (``Family.hf_transposed``: GPT-2's Conv1D), else unchanged. Its
    own inverse; works on meta tensors (shapes)."""
    pattern = family(cfg).hf_transposed
    return t.t().contiguous() if pattern is not None and re.fullmatch(pattern, name) else t


def quantize_pattern(cfg: Any, *, embeddings: bool = False) -> str:
    """The regex of the weights QLoRA stores in NF4: every linear layer of the blocks (the family's
    ``linear_layers``); with ``embeddings`` also the 2-D weights of the first and last stages (the
    input embedding and the output head, as torchtune's QLoRA does for a LoRA'd output projection),
    never norms or biases."""
    fam = family(cfg)
    if not fam.linear_layers:
        raise ConfigError(f"qlora: the {cfg.model_type} family names no linear layers to quantize")
    pattern = r".*\.(?:" + "|".join(re.escape(n) for n in fam.linear_layers) + r")\.weight"
    if not embeddings:
        return pattern
    ends = tuple(f"{s}." for s in fam.first_stage + fam.last_stage)
    outer = [n for n, shape in param_shapes(cfg).items() if len(shape) == 2 and n.startswith(ends)]
    return "|".join([pattern, *map(re.escape, outer)])
