"""Qwen2 / Qwen2.5 family: Llama blocks with q/k/v biases and optional per-layer sliding windows.

- ``Qwen2Config``: ``LlamaConfig`` plus Qwen2's ``use_sliding_window`` / ``sliding_window`` /
  ``max_window_layers`` / ``layer_types``. Reads and writes Hugging Face ``config.json``. The q/k/v
  biases are part of the architecture, not a config switch (``o_proj`` has none).
- ``PRESETS``: qwen2.5-0.5b / 1.5b (tied embeddings), qwen2.5-7b, and qwen2-debug for tests.
- ``param_shapes``: Llama's tensors plus ``self_attn.{q,k,v}_proj.bias``.
- ``FAMILY``: Llama's block; a layer listed as ``sliding_attention`` in ``layer_types`` sees only the
  last ``sliding_window`` keys (as in transformers, that needs ``use_sliding_window``; the released
  Qwen2.5 checkpoints leave it off).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from purefine.errors import ConfigError
from purefine.models import llama, mistral

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class Qwen2Config(llama.LlamaConfig):
    """A Qwen2 architecture; field names are those of Hugging Face's ``Qwen2Config``."""

    vocab_size: int = 151936
    intermediate_size: int = 22016
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: tuple[str, ...] | None = None

    model_type: ClassVar[str] = "qwen2"
    architecture: ClassVar[str] = "Qwen2ForCausalLM"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_biases()
        mistral.check_window(self.model_type, self.sliding_window)
        types = self.layer_types
        if types is None:  # transformers' rule: layers from max_window_layers on slide, when enabled
            slides = self.use_sliding_window and self.sliding_window is not None
            types = tuple(LAYER_TYPES[slides and i >= self.max_window_layers] for i in range(self.num_hidden_layers))
        object.__setattr__(self, "layer_types", tuple(types))
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise ConfigError(f"{self.model_type} config: layer_types must list {self.num_hidden_layers} entries "
                              f"from {LAYER_TYPES}, found {list(self.layer_types)}")

    def check_biases(self) -> None:
        """q/k/v always have biases in Qwen2, o_proj and the MLP never: the bias flags are not switches."""
        if self.attention_bias or self.mlp_bias:
            raise ConfigError(f"{self.model_type} config: attention_bias / mlp_bias are not switches in this "
                              "family (q/k/v always have biases, o_proj and the MLP never)")

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> Qwen2Config:
        """Read a Hugging Face config dict (``layer_types`` may be a list)."""
        if isinstance(d.get("layer_types"), list):
            d = {**d, "layer_types": tuple(d["layer_types"])}
        return super().from_hf(d, source)

    def to_hf(self, dtype: torch.dtype | None = None) -> dict:
        """A Hugging Face ``config.json`` dict for ``Qwen2ForCausalLM``."""
        d = super().to_hf(dtype)
        for key in ("attention_bias", "mlp_bias"):
            d.pop(key)
        d["layer_types"] = list(self.layer_types)
        return d

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF tensor name: shape}: Llama's, with a bias after each q/k/v projection weight."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in super().param_shapes().items():
            shapes[name] = shape
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                shapes[name.removesuffix("weight") + "bias"] = (shape[0],)
        return shapes

    def layer_window(self, layer: int) -> int | None:
        """The attention window of layer ``layer`` (None = full causal)."""
        sliding = self.use_sliding_window and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None


def _qwen25(**kw: Any) -> Qwen2Config:
    base = dict(max_position_embeddings=32768, rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151643,
                sliding_window=32768)
    return Qwen2Config(**{**base, **kw})


PRESETS: dict[str, Qwen2Config] = {
    "qwen2.5-0.5b": _qwen25(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                            num_key_value_heads=2, tie_word_embeddings=True, max_window_layers=24),
    "qwen2.5-1.5b": _qwen25(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                            num_key_value_heads=2, tie_word_embeddings=True, max_window_layers=28),
    "qwen2.5-7b": _qwen25(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, max_window_layers=28,
                          max_position_embeddings=131072),
    "qwen2-debug": Qwen2Config(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    ),
}


FAMILY = dataclasses.replace(llama.FAMILY, name="qwen2", model_types=("qwen2",), config=Qwen2Config, presets=PRESETS)
