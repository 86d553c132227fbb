"""Mistral family: Llama blocks with sliding-window attention, as pure functions.

- ``MistralConfig``: ``LlamaConfig`` plus ``sliding_window`` (None = full causal attention, as in
  Mistral-7B-v0.2+; 4096 in v0.1). Reads and writes Hugging Face ``config.json``.
- ``PRESETS``: mistral-7b (v0.1, window 4096), mistral-7b-v0.3 (no window, vocab 32768),
  mistral-debug (tests: a window of 4 so short sequences exercise it).
- ``hidden_states`` / ``forward``: the Llama decoder layers, each with the mask of its own
  attention kind (``cfg.layer_window(i)``). Qwen2 reuses this loop with per-layer windows.

The window matches transformers' ``sliding_window_causal_mask_function``: query i sees keys
j with i - window < j <= i, counted in sequence (KV-cache) indices, and it narrows any mask it is
given (padding, packing). Params layout is exactly Llama's (``MistralForCausalLM`` names).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from purefine import ops
from purefine.errors import ConfigError
from purefine.models import llama
from purefine.models.llama import init, new_cache, output_weight, param_shapes  # noqa: F401  (the family protocol)

# transformers' MistralConfig default when config.json has no sliding_window key at all
HF_DEFAULT_WINDOW = 4096

# LoRA targets and the ``all-linear`` set: the layer names are Llama's.
LORA_TARGETS, LINEAR_LAYERS = llama.LORA_TARGETS, llama.LINEAR_LAYERS


@dataclass(frozen=True)
class MistralConfig(llama.LlamaConfig):
    """A Mistral architecture; field names are those of Hugging Face's ``MistralConfig``."""

    vocab_size: int = 32000
    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    sliding_window: int | None = None

    model_type: ClassVar[str] = "mistral"
    architecture: ClassVar[str] = "MistralForCausalLM"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention_bias or self.mlp_bias:
            raise ConfigError(f"{self.model_type} config: attention_bias / mlp_bias are not part of this family")
        check_window(self.model_type, self.sliding_window)

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> MistralConfig:
        """Read a Hugging Face config dict; an explicit ``"sliding_window": null`` means no window."""
        cfg = super().from_hf(d, source)
        return dataclasses.replace(cfg, sliding_window=d.get("sliding_window", HF_DEFAULT_WINDOW))

    def to_hf(self, dtype: torch.dtype | None = None) -> dict:
        """A Hugging Face ``config.json`` dict for ``MistralForCausalLM``."""
        d = super().to_hf(dtype)
        for key in ("attention_bias", "mlp_bias"):
            d.pop(key)
        return d

    def layer_window(self, layer: int) -> int | None:
        """The attention window of layer ``layer`` (None = full causal)."""
        return self.sliding_window


def check_window(model_type: str, window: Any) -> None:
    """A window is None or a positive int."""
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise ConfigError(f"{model_type} config: sliding_window must be null or a positive integer, found {window!r}")


PRESETS: dict[str, MistralConfig] = {
    "mistral-7b": MistralConfig(sliding_window=4096, bos_token_id=1, eos_token_id=2),
    "mistral-7b-v0.3": MistralConfig(vocab_size=32768, rope_theta=1000000.0, sliding_window=None),
    "mistral-debug": MistralConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, sliding_window=4,
    ),
}


def layer_masks(cfg: Any, mask: torch.Tensor | None, t: int, cache: ops.KVCache | None,
                device: torch.device) -> list[torch.Tensor | None]:
    """One prepared attention mask per layer: the shared causal/padding mask, windowed where the
    layer has a window. Layers with the same window share one tensor."""
    offset = cache.length if cache is not None else 0
    full = llama.prepare_mask(mask, t, cache)
    by_window: dict[int | None, torch.Tensor | None] = {None: full}
    out = []
    for i in range(cfg.num_hidden_layers):
        w = cfg.layer_window(i)
        if w not in by_window:
            by_window[w] = ops.window_mask(full, w, t, offset=offset, device=device)
        out.append(by_window[w])
    return out


def hidden_states(
    cfg: Any, params: dict, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None, cache: ops.KVCache | None = None, remat: bool = False,
    gather: Callable[[Any], Any] | None = None, observe: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, ops.KVCache | None]:
    """tokens (B, T) -> (final normed hidden states (B, T, D), advanced cache or None).

    As ``llama.hidden_states`` (``mask``, ``positions``, ``remat``, ``gather``, ``observe``), with each layer's
    attention limited to its window.
    """
    g = gather if gather is not None else (lambda subtree: subtree)
    m = params["model"]
    x = ops.embedding(tokens, g(m["embed_tokens"])["weight"])
    if positions is None:
        positions = llama.default_positions(tokens, cache.length if cache is not None else 0)
    inv_freq = ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(x.device)
    cos, sin = ops.rope_cos_sin(inv_freq, positions, x.dtype)
    masks = layer_masks(cfg, mask, tokens.shape[1], cache, x.device)

    def block(p: dict, h: torch.Tensor, i: int) -> torch.Tensor:
        return llama.decoder_layer(cfg, p, h, cos, sin, masks[i], cache, i)

    x = ops.run_layers(block, m["layers"], x, remat=remat, gather=gather, observe=observe)
    x = ops.rms_norm(x, g(m["norm"])["weight"], cfg.rms_norm_eps)
    return x, (cache.advance(tokens.shape[1]) if cache is not None else None)


def forward(cfg: Any, params: dict, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
            mask: torch.Tensor | None = None, gather: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """tokens (B, T) int64 -> logits (B, T, V). Causal (and windowed) unless ``mask`` narrows it."""
    h, _ = hidden_states(cfg, params, tokens, positions=positions, mask=mask, gather=gather)
    w = output_weight(cfg, params)
    return ops.linear(h, gather(w) if gather is not None else w)


Config = MistralConfig
