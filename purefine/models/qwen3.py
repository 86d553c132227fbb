"""Qwen3 family: Qwen2's layout with an RMS norm over each head's queries and keys, no q/k/v biases.

- ``Qwen3Config``: ``Qwen2Config`` (sliding-window layers through ``layer_types``) where
  ``attention_bias`` is a switch again (all four projections, as Llama's) and ``head_dim`` is its
  own field (128 by default, not hidden_size / heads). Reads and writes Hugging Face ``config.json``.
- ``PRESETS``: qwen3-0.6b / 1.7b / 4b (tied embeddings), qwen3-8b, and qwen3-debug for tests.
- ``attention``: Llama's, with ``q_norm`` / ``k_norm`` (RMSNorm over Dh) before the rotary positions.

Params: Llama's names plus ``model.layers.{i}.self_attn.{q,k}_norm.weight`` (Dh,).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from purefine import ops
from purefine.errors import ConfigError
from purefine.models import llama, qwen2
from purefine.models.family import Context


@dataclass(frozen=True)
class Qwen3Config(qwen2.Qwen2Config):
    """A Qwen3 architecture; field names are those of Hugging Face's ``Qwen3Config``."""

    head_dim: int | None = 128
    tie_word_embeddings: bool = False

    model_type: ClassVar[str] = "qwen3"
    architecture: ClassVar[str] = "Qwen3ForCausalLM"

    def check_biases(self) -> None:
        """``attention_bias`` switches biases on q/k/v/o; the MLP never has one."""
        if self.mlp_bias:
            raise ConfigError(f"{self.model_type} config: mlp_bias is not part of this family")

    def to_hf(self, dtype: torch.dtype | None = None) -> dict:
        """A Hugging Face ``config.json`` dict for ``Qwen3ForCausalLM``."""
        d = super().to_hf(dtype)
        d["attention_bias"] = self.attention_bias
        return d

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF tensor name: shape}: Llama's, with q_norm and k_norm (Dh,) after each o_proj."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in llama.LlamaConfig.param_shapes(self).items():
            shapes[name] = shape
            if name.endswith("self_attn.o_proj.weight"):
                prefix = name.removesuffix("o_proj.weight")
                shapes[prefix + "q_norm.weight"] = shapes[prefix + "k_norm.weight"] = (self.head_dim,)
        return shapes


def _qwen3(**kw: Any) -> Qwen3Config:
    base = dict(vocab_size=151936, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=40960, rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645,
                max_window_layers=28)
    return Qwen3Config(**{**base, **kw})


PRESETS: dict[str, Qwen3Config] = {
    "qwen3-0.6b": _qwen3(hidden_size=1024, intermediate_size=3072, tie_word_embeddings=True),
    "qwen3-1.7b": _qwen3(hidden_size=2048, intermediate_size=6144, tie_word_embeddings=True),
    "qwen3-4b": _qwen3(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                       tie_word_embeddings=True, max_window_layers=36),
    "qwen3-8b": _qwen3(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                       max_window_layers=36),
    # head_dim 32 with 4 heads over hidden 64: the shapes where head_dim is its own field.
    "qwen3-debug": Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                               tie_word_embeddings=True),
}


def attention(cfg: Qwen3Config, p: dict, x: torch.Tensor, ctx: Context, i: int) -> torch.Tensor:
    """x (B, T, D) -> (B, T, D): Llama's attention with q and k RMS-normed per head before rotary."""
    q, k, v = llama.qkv(cfg, p, x)
    q = ops.rms_norm(q, p["q_norm"]["weight"], cfg.rms_norm_eps)
    k = ops.rms_norm(k, p["k_norm"]["weight"], cfg.rms_norm_eps)
    return llama.attend(cfg, p, q, k, v, ctx, i)


FAMILY = dataclasses.replace(llama.FAMILY, name="qwen3", model_types=("qwen3",), config=Qwen3Config, presets=PRESETS,
                             block=functools.partial(llama.block, attention=attention))
