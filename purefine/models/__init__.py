"""Models as pure functions over parameter trees, dispatched on the config's family.

    cfg = preset("llama-tiny")
    params = init(cfg, seed=0)
    logits = forward(cfg, params, tokens)                  # (B, T) -> (B, T, V)
    loss_sum, n_tokens = loss_fn(cfg)(params, batch)       # batch: tokens, labels (next-token targets)

Labels are already shifted: ``labels[b, t]`` is the target for the prediction at position t
(-100 where no loss is taken), so packing and masking never need to know about shifting.
"""

from __future__ import annotations

import re

from collections.abc import Callable, Sequence
from typing import Any

import torch

from purefine import ops
from purefine.errors import ConfigError
from purefine.models.registry import FAMILIES, config_from_hf, family, preset, presets

__all__ = [
    "FAMILIES", "config_from_hf", "family", "preset", "presets", "param_shapes", "init", "forward",
    "hidden_states", "output_weight", "new_cache", "loss_fn", "batch_mask", "lora_targets",
]

# Family-relative LoRA target names (``lora_targets``): the family's peft default, every linear layer.
DEFAULT_TARGETS, ALL_LINEAR = "default", "all-linear"


def param_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape} of the family's params."""
    return family(cfg).param_shapes(cfg)


def init(cfg: Any, **kwargs: Any) -> dict:
    """A seeded params tree (see the family's ``init``: seed, dtype, device, hook)."""
    return family(cfg).init(cfg, **kwargs)


def forward(cfg: Any, params: dict, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """tokens (B, T) -> logits (B, T, V); ``positions`` (B, T) and ``mask`` as keywords."""
    return family(cfg).forward(cfg, params, tokens, **kwargs)


def hidden_states(cfg: Any, params: dict, tokens: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """tokens (B, T) -> (final hidden states (B, T, D), advanced KV cache or None)."""
    return family(cfg).hidden_states(cfg, params, tokens, **kwargs)


def output_weight(cfg: Any, params: dict) -> Any:
    """The (V, D) output projection leaf (tied embeddings included)."""
    return family(cfg).output_weight(cfg, params)


def new_cache(cfg: Any, batch: int, max_len: int, **kwargs: Any) -> ops.KVCache:
    """An empty KV cache for decoding."""
    return family(cfg).new_cache(cfg, batch, max_len, **kwargs)


def batch_mask(batch: dict) -> torch.Tensor | None:
    """The attention mask a batch asks for: its ``mask``, or block-causal (B, 1, T, T) bool from
    ``segment_ids`` (B, T); None (plain causal) when it has neither."""
    if batch.get("mask") is not None:
        return batch["mask"]
    if batch.get("segment_ids") is not None:
        return ops.block_causal_mask(batch["segment_ids"])
    return None


def loss_fn(cfg: Any, *, chunk_size: int = 1024, remat: bool = False,
            gather: Callable[[Any], Any] | None = None) -> Callable[[dict, dict], tuple[torch.Tensor, torch.Tensor]]:
    """(params, batch) -> (summed next-token cross-entropy (float32), number of labelled tokens).

    batch: ``tokens`` (B, T), ``labels`` (B, T) already shifted, optional ``positions`` (B, T) and
    ``segment_ids`` (B, T) (packed samples) or ``mask``. The loss is chunked over tokens so the
    (B*T, V) logits never exist whole; ``remat`` checkpoints each block; ``gather`` (FSDP) maps each
    block's params just before use.
    """
    fam = family(cfg)
    if hasattr(fam, "loss_fn"):
        return fam.loss_fn(cfg, chunk_size=chunk_size, remat=remat, gather=gather)

    def loss(params: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        h, _ = fam.hidden_states(cfg, params, batch["tokens"], positions=batch.get("positions"),
                                 mask=batch_mask(batch), remat=remat, gather=gather)
        w = fam.output_weight(cfg, params)
        w = gather(w) if gather is not None else w
        labels = batch["labels"].reshape(-1)
        return ops.chunked_cross_entropy(h.reshape(-1, h.shape[-1]), w, labels, chunk_size=chunk_size)

    return loss


def lora_targets(cfg: Any, targets: str | Sequence[str] = DEFAULT_TARGETS) -> str | list[str]:
    """The ``where`` of ``lora.apply`` for ``targets`` over this config's family.

    ``"default"`` -> the family's ``LORA_TARGETS`` (peft's default: q_proj, v_proj for Llama /
    Mistral / Qwen2, c_attn for GPT-2, query, value for BERT); ``"all-linear"`` -> the family's
    ``LINEAR_LAYERS``; a list of names is kept (``"default"`` / ``"all-linear"`` inside it expand
    in place); any other single string is a regex over weight paths, kept as is.
    """
    fam = family(cfg)
    expand = {DEFAULT_TARGETS: getattr(fam, "LORA_TARGETS", None), ALL_LINEAR: getattr(fam, "LINEAR_LAYERS", None)}
    names = [targets] if isinstance(targets, str) else list(targets)
    if len(names) == 1 and names[0] not in expand and not names[0].isidentifier():
        return names[0]  # a regex
    if len(names) == 1 and names[0] == ALL_LINEAR and expand[ALL_LINEAR] is None:
        return ALL_LINEAR  # lora.apply's own rule: every 2-D weight but embeddings and lm_head
    out: dict[str, None] = {}
    for name in names:
        if name in expand and expand[name] is None:
            raise ConfigError(f"lora targets: {name!r}: the {cfg.model_type} family names no LoRA targets; "
                              "give module names or a regex")
        out.update(dict.fromkeys(expand[name] if name in expand else (name,)))
    return list(out)


def quantize_pattern(cfg: Any) -> str:
    """The regex of the weights QLoRA stores in NF4: every linear layer of the blocks (the family's
    ``LINEAR_LAYERS``), never embeddings or the output head."""
    names = getattr(family(cfg), "LINEAR_LAYERS", None)
    if not names:
        raise ConfigError(f"qlora: the {cfg.model_type} family names no linear layers to quantize")
    return r".*\.(?:" + "|".join(re.escape(n) for n in names) + r")\.weight"
