"""Phi-3 family: Llama's block with fused projections and, optionally, partial rotary and a window.

- ``Phi3Config``: ``LlamaConfig`` plus ``sliding_window`` (every layer; Phi-3-mini-4k: 2047),
  ``original_max_position_embeddings`` and ``partial_rotary_factor`` (the share of each head that
  rotates). No ``head_dim`` field: hidden_size / num_attention_heads. LongRoPE (the 128K models)
  is refused with an error naming it.
- ``attention``: one ``qkv_proj`` (H + 2K heads of Dh rows) split into q, k, v, then Llama's ``attend``;
  ``mlp``: one ``gate_up_proj`` (2F rows) split into gate and up, ``down(up * silu(gate))``.
- LoRA targets are peft's module names for Phi-3: ``qkv_proj`` by default; ``all-linear`` adds
  ``o_proj``, ``gate_up_proj``, ``down_proj``. No tensor-parallel plan: a column split of a fused
  projection would cut across q / k / v (use data parallel or FSDP).

Params (``Phi3ForCausalLM`` names)::

    model.layers.{i}.self_attn.qkv_proj.weight   ((H + 2K) * Dh, D)
    model.layers.{i}.self_attn.o_proj.weight     (D, H * Dh)
    model.layers.{i}.mlp.gate_up_proj.weight     (2F, D)
    model.layers.{i}.mlp.down_proj.weight        (D, F)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from purefine import ops
from purefine.errors import ConfigError
from purefine.models import llama, mistral
from purefine.models.family import Context


@dataclass(frozen=True)
class Phi3Config(llama.LlamaConfig):
    """A Phi-3 architecture; field names are those of Hugging Face's ``Phi3Config``."""

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    original_max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = 32000
    sliding_window: int | None = None
    partial_rotary_factor: float = 1.0

    model_type: ClassVar[str] = "phi3"
    architecture: ClassVar[str] = "Phi3ForCausalLM"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention_bias or self.mlp_bias:
            raise ConfigError(f"{self.model_type} config: attention_bias / mlp_bias are not part of this family")
        mistral.check_window(self.model_type, self.sliding_window)
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2:
            raise ConfigError(f"{self.model_type} config: partial_rotary_factor must be in (0, 1] and leave an even "
                              f"number of rotary dims, found {self.partial_rotary_factor} of head_dim {self.head_dim}")

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> Phi3Config:
        """Read a Hugging Face config dict (``partial_rotary_factor`` at the top or in ``rope_parameters``)."""
        rope = d.get("rope_parameters") or {}
        kind = (d.get("rope_scaling") or rope or {}).get("rope_type", (d.get("rope_scaling") or {}).get("type", "default"))
        if kind in ("longrope", "su"):
            raise ConfigError(f"{source}: rope_scaling: LongRoPE (Phi-3 128K context) is not supported; use a 4K "
                              "Phi-3 checkpoint")
        factor = d.get("partial_rotary_factor", rope.get("partial_rotary_factor") if isinstance(rope, dict) else None)
        d = {**d, "partial_rotary_factor": 1.0 if factor is None else factor}
        if isinstance(rope, dict) and "partial_rotary_factor" in rope:
            d["rope_parameters"] = {k: v for k, v in rope.items() if k != "partial_rotary_factor"}
        return super().from_hf(d, source)

    def to_hf(self, dtype: torch.dtype | None = None) -> dict:
        """A Hugging Face ``config.json`` dict for ``Phi3ForCausalLM``."""
        d = super().to_hf(dtype)
        for key in ("attention_bias", "mlp_bias"):
            d.pop(key)
        if self.head_dim == self.hidden_size // self.num_attention_heads:
            d.pop("head_dim")  # transformers' Phi3Config derives it (and honours one that is given)
        d["rope_parameters"]["partial_rotary_factor"] = self.partial_rotary_factor
        return d

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF tensor name: shape}, in the order ``init`` creates them."""
        d, hd, f = self.hidden_size, self.head_dim, self.intermediate_size
        qkv = (self.num_attention_heads + 2 * self.num_key_value_heads) * hd
        shapes = {"model.embed_tokens.weight": (self.vocab_size, d)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes |= {p + "input_layernorm.weight": (d,), p + "self_attn.qkv_proj.weight": (qkv, d),
                       p + "self_attn.o_proj.weight": (d, self.num_attention_heads * hd),
                       p + "post_attention_layernorm.weight": (d,), p + "mlp.gate_up_proj.weight": (2 * f, d),
                       p + "mlp.down_proj.weight": (d, f)}
        shapes["model.norm.weight"] = (d,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        return shapes

    @property
    def rotary_dim(self) -> int:
        """The first int(head_dim * partial_rotary_factor) dims of each head rotate."""
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_window(self, layer: int) -> int | None:
        """Phi-3's window (when set) applies to every layer."""
        return self.sliding_window


PRESETS: dict[str, Phi3Config] = {
    "phi3-mini-4k": Phi3Config(sliding_window=2047),
    "phi3-medium-4k": Phi3Config(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=10, sliding_window=2047),
    # Tests: GQA, half of each head rotating, a window of 4.
    "phi3-debug": Phi3Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             original_max_position_embeddings=512, sliding_window=4, partial_rotary_factor=0.5,
                             pad_token_id=0, eos_token_id=2),
}


def attention(cfg: Phi3Config, p: dict, x: torch.Tensor, ctx: Context, i: int) -> torch.Tensor:
    """x (B, T, D) -> (B, T, D): the fused qkv_proj split into q (H heads), k and v (K heads each)."""
    q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    q, k, v = ops.linear(x, p["qkv_proj"]["weight"]).split((q_size, kv_size, kv_size), dim=-1)
    return llama.attend(cfg, p, *(llama.heads(z, cfg.head_dim) for z in (q, k, v)), ctx, i)


def mlp(cfg: Phi3Config, p: dict, x: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) -> (B, T, D): the fused gate_up_proj split into gate and up, then down(up * silu(gate))."""
    gate, up = ops.linear(x, p["gate_up_proj"]["weight"]).chunk(2, dim=-1)
    return ops.linear(ops.glu(F.silu, gate, up), p["down_proj"]["weight"])


FAMILY = dataclasses.replace(
    llama.FAMILY, name="phi3", model_types=("phi3",), config=Phi3Config, presets=PRESETS,
    block=functools.partial(llama.block, attention=attention, mlp=mlp), lora_targets=("qkv_proj",),
    linear_layers=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), tp_plan={},
)
