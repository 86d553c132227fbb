"""Mistral family: Llama blocks with sliding-window attention, as pure functions.

- ``MistralConfig``: ``LlamaConfig`` plus ``sliding_window`` (None = full causal attention, as in
  Mistral-7B-v0.2+; 4096 in v0.1). Reads and writes Hugging Face ``config.json``.
- ``PRESETS``: mistral-7b (v0.1, window 4096), mistral-7b-v0.3 (no window, vocab 32768),
  mistral-debug (tests: a window of 4 so short sequences exercise it).
- ``FAMILY``: Llama's record with this config; the shared decoder narrows each layer's mask to
  ``cfg.layer_window(i)``.

The window matches transformers' ``sliding_window_causal_mask_function``: query i sees keys
j with i - window < j <= i, counted in sequence (KV-cache) indices, and it narrows any mask it is
given (padding, packing). Params layout is exactly Llama's (``MistralForCausalLM`` names).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from purefine.errors import ConfigError
from purefine.models import llama

# transformers' MistralConfig default when config.json has no sliding_window key at all
HF_DEFAULT_WINDOW = 4096


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


FAMILY = dataclasses.replace(llama.FAMILY, name="mistral", model_types=("mistral",), config=MistralConfig,
                             presets=PRESETS)
