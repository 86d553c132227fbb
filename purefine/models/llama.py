"""Llama family (Llama-2, Llama-3.x and the tiny test/demo models): the reference decoder block.

- ``LlamaConfig``: a frozen dataclass that reads and writes Hugging Face ``config.json``; the base of
  the Llama-like families (Mistral, Qwen2/3, Gemma-2, Phi-3), which override what differs.
- ``PRESETS``: named configs (llama2-7b/13b/70b, llama3-8b, llama3.x, tiny ones for tests and the demo).
- The block as small pure functions the other families reuse: ``qkv`` (projections into heads),
  ``attend`` (q/k norms, rotary, KV cache, attention, ``o_proj``), ``mlp`` (SwiGLU), ``block``
  (pre-norm residual, with ``attention`` and ``mlp`` replaceable), ``embed`` / ``final`` / ``output_weight``.
- ``TP_PLAN``: heads and MLP columns split over tensor-parallel ranks; ``FAMILY``: the record.

Params layout (exactly the safetensors names of ``LlamaForCausalLM``)::

    model.embed_tokens.weight                       (V, D)
    model.layers.{i}.input_layernorm.weight         (D,)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight                               (D,)
    lm_head.weight                                  (V, D)   absent when embeddings are tied
"""


from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from purefine import ops
from purefine.errors import ConfigError
from purefine.models.family import Context, Family, Gather, ModelConfig, hf_fields

# Tensor parallelism: attention heads and MLP columns split over tp ranks (torchtitan's table).
TP_PLAN = {
    r".*\.self_attn\.(q|k|v)_proj\.(weight|bias)": "colwise",
    r".*\.self_attn\.o_proj\.(weight|bias)": "rowwise",
    r".*\.mlp\.(gate|up)_proj\.(weight|bias)": "colwise",
    r".*\.mlp\.down_proj\.(weight|bias)": "rowwise",
}


@dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    """A Llama-family architecture; field names are those of Hugging Face's ``LlamaConfig``."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    model_type: ClassVar[str] = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None and self.num_attention_heads > 0:
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"{self.model_type} config: {name} must be a positive integer, found {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{self.model_type} config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{self.model_type} config: head_dim must be even for rotary embeddings, found {self.head_dim}")
        ops.rope_inv_freq(2, self.rope_theta, self.rope_scaling)  # validates the scaling kind (2: no huge head_dim alloc)

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> LlamaConfig:
        """Read a Hugging Face config dict; ``source`` names the file in error messages."""
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act: expected 'silu' for {cls.model_type}, found {act!r}")
        rope = dict(d.get("rope_parameters") or {})
        theta = d.get("rope_theta", rope.pop("rope_theta", 10000.0))
        rope.pop("rope_theta", None)
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "rope_scaling"}
        kwargs = hf_fields(cls, d, names)
        try:
            return cls(**kwargs, rope_theta=float(theta), rope_scaling=dict(scaling) if scaling else None)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self, dtype: torch.dtype | None = None) -> dict:
        """A Hugging Face config dict (both the legacy ``rope_theta``/``rope_scaling`` keys and v5's
        ``rope_parameters``, so old and new ``transformers`` read it)."""
        d = {"architectures": [self.architecture], "model_type": self.model_type, "hidden_act": "silu"}
        d.update(dataclasses.asdict(self))
        d["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        if dtype is not None:
            d["torch_dtype"] = str(dtype).removeprefix("torch.")
        return d

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF tensor name: shape}, in the order ``init`` creates them."""
        d, h, k, hd, f = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim, \
            self.intermediate_size
        shapes = {"model.embed_tokens.weight": (self.vocab_size, d)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (d,)
            for name, out, inp in (("q", h * hd, d), ("k", k * hd, d), ("v", k * hd, d), ("o", d, h * hd)):
                shapes[p + f"self_attn.{name}_proj.weight"] = (out, inp)
                if self.attention_bias:
                    shapes[p + f"self_attn.{name}_proj.bias"] = (out,)
            shapes[p + "post_attention_layernorm.weight"] = (d,)
            for name, out, inp in (("gate", f, d), ("up", f, d), ("down", d, f)):
                shapes[p + f"mlp.{name}_proj.weight"] = (out, inp)
                if self.mlp_bias:
                    shapes[p + f"mlp.{name}_proj.bias"] = (out,)
        shapes["model.norm.weight"] = (d,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        return shapes

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rotate (all of them; Phi-3 may rotate a part)."""
        return self.head_dim

    @property
    def attention_scale(self) -> float | None:
        """The score scale (None: 1/sqrt(head_dim); Gemma-2: query_pre_attn_scalar^-1/2)."""
        return None

    @property
    def attention_softcap(self) -> float | None:
        """The attention score soft-cap (Gemma-2), or None."""
        return None

    @property
    def activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The MLP's gate activation (SiLU for Llama)."""
        return F.silu


def _llama31_rope(factor: float) -> dict:
    """The ``rope_scaling`` of Llama-3.1 / 3.2 (8K original context, llama3 frequency smoothing)."""
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(),
    "llama2-13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "llama2-70b": LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8
    ),
    "llama3-8b": LlamaConfig(
        vocab_size=128256, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
    ),
    # Llama-3.1 / 3.2: 128K context through llama3 rope scaling; 3.2's small models tie the embeddings.
    "llama3.1-8b": LlamaConfig(
        vocab_size=128256, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=_llama31_rope(8.0), bos_token_id=128000, eos_token_id=128001,
    ),
    "llama3.1-70b": LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_llama31_rope(8.0),
        bos_token_id=128000, eos_token_id=128001,
    ),
    "llama3.2-1b": LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=_llama31_rope(32.0), tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
    ),
    "llama3.2-3b": LlamaConfig(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=_llama31_rope(32.0), tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
    ),
    # ~134M parameters: the benchmark model (Llama-2 shapes at GPT-2-small width).
    "llama-134m": LlamaConfig(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=2048
    ),
    # The demo model: small enough to train on the bundled data in about a minute on 2 CPU cores.
    "llama-tiny": LlamaConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
    ),
    # For unit tests: the smallest shapes that still exercise GQA.
    "llama-debug": LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    ),
}


def embed(cfg: LlamaConfig, params: dict, tokens: torch.Tensor, ctx: Context, g: Gather, extra: dict) -> torch.Tensor:
    """tokens (B, T) -> rows of ``model.embed_tokens`` (B, T, D)."""
    return ops.embedding(tokens, g(params["model"]["embed_tokens"])["weight"])


def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, N * Dh) -> (B, N, T, Dh)."""
    b, t, _ = x.shape
    return x.view(b, t, -1, head_dim).transpose(1, 2)


def _proj(p: dict, x: torch.Tensor) -> torch.Tensor:
    return ops.linear(x, p["weight"], p.get("bias"))


def qkv(cfg: LlamaConfig, p: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, T, D) -> q (B, H, T, Dh), k and v (B, K, T, Dh) through q/k/v_proj."""
    return tuple(heads(_proj(p[f"{n}_proj"], x), cfg.head_dim) for n in "qkv")  # type: ignore[return-value]


def attend(cfg: LlamaConfig, p: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context,
           i: int) -> torch.Tensor:
    """q (B, H, T, Dh), k, v (B, K, T, Dh) -> (B, T, D): rotary positions, the KV cache, attention
    under layer i's mask (scale and soft-cap from the config), then ``o_proj``."""
    q, k = ops.apply_rope(q, ctx.cos, ctx.sin), ops.apply_rope(k, ctx.cos, ctx.sin)
    if ctx.cache is not None:
        k, v = ctx.cache.update(i, k, v)
    o = ops.attention(q, k, v, mask=ctx.masks[i], scale=cfg.attention_scale, softcap=cfg.attention_softcap)
    b, _, t, _ = o.shape
    return _proj(p["o_proj"], o.transpose(1, 2).reshape(b, t, -1))


def attention(cfg: LlamaConfig, p: dict, x: torch.Tensor, ctx: Context, i: int) -> torch.Tensor:
    """x (B, T, D) -> (B, T, D): grouped-query self-attention with rotary positions."""
    return attend(cfg, p, *qkv(cfg, p, x), ctx, i)


def mlp(cfg: LlamaConfig, p: dict, x: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) -> (B, T, D): the gated MLP down(act(gate(x)) * up(x)) (biases when ``mlp_bias``)."""
    return _proj(p["down_proj"], ops.glu(cfg.activation, _proj(p["gate_proj"], x), _proj(p["up_proj"], x)))


def block(cfg: LlamaConfig, p: dict, x: torch.Tensor, ctx: Context, i: int, *,
          attention: Callable[..., torch.Tensor] = attention, mlp: Callable[..., torch.Tensor] = mlp) -> torch.Tensor:
    """One pre-norm layer: x + attention(norm(x)), then + mlp(norm(.)). x (B, T, D) -> (B, T, D)."""
    eps = cfg.rms_norm_eps
    x = ops.residual(x, attention(cfg, p["self_attn"], ops.rms_norm(x, p["input_layernorm"]["weight"], eps), ctx, i))
    return ops.residual(x, mlp(cfg, p["mlp"], ops.rms_norm(x, p["post_attention_layernorm"]["weight"], eps)))


def final(cfg: LlamaConfig, params: dict, x: torch.Tensor, g: Gather) -> torch.Tensor:
    """The final RMSNorm: x (B, T, D) -> (B, T, D)."""
    return ops.rms_norm(x, g(params["model"]["norm"])["weight"], cfg.rms_norm_eps)


def output_weight(cfg: Any, params: dict) -> Any:
    """The (V, D) output projection: lm_head, or the input embedding when tied."""
    return params["model"]["embed_tokens"]["weight"] if cfg.tie_word_embeddings else params["lm_head"]["weight"]


FAMILY = Family(name="llama", model_types=("llama",), config=LlamaConfig, presets=PRESETS, embed=embed,
                block=block, final=final, output_weight=output_weight, tp_plan=TP_PLAN)
