"""Gemma-2 family: Llama's attention and gated MLP with Gemma's norms, soft-caps and windows.

What differs from Llama, all read from ``Gemma2Config``:

- embeddings scaled by sqrt(hidden_size) (in the weights' dtype, as transformers does);
- RMSNorm as ``(1 + w) * norm(x)`` in float32, weights initialized to zero, and four per layer:
  ``input_layernorm`` / ``post_attention_layernorm`` around attention, ``pre_feedforward_layernorm``
  / ``post_feedforward_layernorm`` around the MLP (each sub-block's output is normed before the sum);
- attention scores scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped at
  ``attn_logit_softcapping``; layers alternate sliding-window (even) and full attention
  (``layer_types``); the final logits soft-capped at ``final_logit_softcapping``;
- a GELU (tanh) gate (``hidden_activation``), ``head_dim`` its own field, embeddings tied.

Params: Llama's names plus ``model.layers.{i}.{pre,post}_feedforward_layernorm.weight``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from purefine import fused, ops
from purefine.errors import ConfigError
from purefine.models import llama, mistral
from purefine.models.family import Context, Gather, normal_init

LAYER_TYPES = ("full_attention", "sliding_attention")
# Fields whose explicit ``null`` in config.json means "none" (not the default): transformers reads them so.
NULLABLE = ("sliding_window", "final_logit_softcapping", "attn_logit_softcapping")


@dataclass(frozen=True)
class Gemma2Config(llama.LlamaConfig):
    """A Gemma-2 architecture; field names are those of Hugging Face's ``Gemma2Config``."""

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 4
    head_dim: int | None = 256
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256.0
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] | None = None
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0

    model_type: ClassVar[str] = "gemma2"
    architecture: ClassVar[str] = "Gemma2ForCausalLM"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mlp_bias:
            raise ConfigError(f"{self.model_type} config: mlp_bias is not part of this family")
        mistral.check_window(self.model_type, self.sliding_window)
        ops.activation(self.hidden_activation, f"{self.model_type} config: hidden_activation")
        types = self.layer_types or tuple(LAYER_TYPES[i % 2 == 0] for i in range(self.num_hidden_layers))
        object.__setattr__(self, "layer_types", tuple(types))
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise ConfigError(f"{self.model_type} config: layer_types must list {self.num_hidden_layers} entries "
                              f"from {LAYER_TYPES}, found {list(self.layer_types)}")
        for name in ("query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{self.model_type} config: {name} must be positive, found {value!r}")

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> Gemma2Config:
        """Read a Hugging Face config dict (``hidden_activation``; ``layer_types`` may be a list)."""
        if d.get("use_bidirectional_attention"):
            raise ConfigError(f"{source}: use_bidirectional_attention: purefine's gemma2 is causal, found true")
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        d = {**d, "hidden_act": "silu", "hidden_activation": act}  # Llama's reader checks hidden_act
        if isinstance(d.get("layer_types"), list):
            d["layer_types"] = tuple(d["layer_types"])
        if isinstance(d.get("query_pre_attn_scalar"), int) and not isinstance(d["query_pre_attn_scalar"], bool):
            d["query_pre_attn_scalar"] = float(d["query_pre_attn_scalar"])
        cfg = super().from_hf(d, source)
        nulls = {k: None for k in NULLABLE if k in d and d[k] is None}  # an explicit null: no cap / no window
        return dataclasses.replace(cfg, **nulls) if nulls else cfg

    def to_hf(self, dtype: torch.dtype | None = None) -> dict:
        """A Hugging Face ``config.json`` dict for ``Gemma2ForCausalLM``."""
        d = super().to_hf(dtype)
        del d["hidden_act"], d["mlp_bias"]
        d["layer_types"] = list(self.layer_types)
        scalar = self.query_pre_attn_scalar  # transformers 5 types it int and refuses 256.0
        d["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
        return d

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF tensor name: shape}: Llama's, with the two feed-forward norms after each layer's MLP."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in super().param_shapes().items():
            shapes[name] = shape
            if name.endswith("mlp.down_proj.weight"):
                prefix = name.removesuffix("mlp.down_proj.weight")
                shapes[prefix + "pre_feedforward_layernorm.weight"] = (self.hidden_size,)
                shapes[prefix + "post_feedforward_layernorm.weight"] = (self.hidden_size,)
        return shapes

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of a ``sliding_attention`` layer (the even ones by default), else None."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def attention_scale(self) -> float:
        return self.query_pre_attn_scalar ** -0.5

    @property
    def attention_softcap(self) -> float | None:
        return self.attn_logit_softcapping

    @property
    def logit_softcap(self) -> float | None:
        return self.final_logit_softcapping

    @property
    def activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return ops.activation(self.hidden_activation)


PRESETS: dict[str, Gemma2Config] = {
    "gemma2-2b": Gemma2Config(),
    "gemma2-9b": Gemma2Config(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                              num_key_value_heads=8),
    "gemma2-27b": Gemma2Config(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
                               num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144.0),
    # Tests: 3 layers (sliding, full, sliding), a window of 4, head_dim 32 apart from hidden 64 / 4 heads.
    "gemma2-debug": Gemma2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                                 query_pre_attn_scalar=32.0, sliding_window=4),
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: x (..., D) normalized in float32, times (1 + weight) in float32, cast back."""
    if ops._plain(x, weight):
        return fused.rms_norm(x, weight, eps, offset=True)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


def init_tensor(cfg: Gemma2Config, name: str, shape: tuple[int, ...], gen: torch.Generator,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """HF's init, with Gemma's norm weights at zero (the norm scales by 1 + w)."""
    return torch.zeros(shape, dtype=dtype) if name.endswith("norm.weight") else normal_init(cfg, name, shape, gen, dtype)


def embed(cfg: Gemma2Config, params: dict, tokens: torch.Tensor, ctx: Context, g: Gather, extra: dict) -> torch.Tensor:
    """tokens (B, T) -> embedding rows times sqrt(hidden_size) (rounded to their dtype) (B, T, D)."""
    x = llama.embed(cfg, params, tokens, ctx, g, extra)
    return x * torch.tensor(cfg.hidden_size ** 0.5, dtype=x.dtype)


def block(cfg: Gemma2Config, p: dict, x: torch.Tensor, ctx: Context, i: int) -> torch.Tensor:
    """x + post_norm(attention(input_norm(x))), then + post_ff_norm(mlp(pre_ff_norm(.))). (B, T, D)."""
    def norm(name: str, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, p[name]["weight"], cfg.rms_norm_eps)

    x = ops.residual(x, norm("post_attention_layernorm", llama.attention(cfg, p["self_attn"], norm("input_layernorm", x), ctx, i)))
    return ops.residual(x, norm("post_feedforward_layernorm", llama.mlp(cfg, p["mlp"], norm("pre_feedforward_layernorm", x))))


def final(cfg: Gemma2Config, params: dict, x: torch.Tensor, g: Gather) -> torch.Tensor:
    """The final norm (Gemma's): x (B, T, D) -> (B, T, D)."""
    return rms_norm(x, g(params["model"]["norm"])["weight"], cfg.rms_norm_eps)


FAMILY = dataclasses.replace(llama.FAMILY, name="gemma2", model_types=("gemma2",), config=Gemma2Config,
                             presets=PRESETS, embed=embed, block=block, final=final, init_tensor=init_tensor)

