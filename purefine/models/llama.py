"""Llama family (Llama-2, Llama-3.x and the tiny test/demo models) as pure functions.

- ``LlamaConfig``: a frozen dataclass that reads and writes Hugging Face ``config.json``.
- ``PRESETS``: named configs (llama2-7b/13b/70b, llama3-8b, tiny ones for tests and the demo).
- ``init(cfg, ...)``: a seeded params tree whose dotted paths are the HF tensor names; on the meta
  device it costs no memory; a per-tensor ``hook`` can turn each tensor into a leaf kind (NF4) as
  soon as it exists, so a large model never sits in memory in full precision.
- ``hidden_states`` / ``output_weight`` / ``forward``: tokens (B, T) -> logits (B, T, V).

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
from functools import partial
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.utils.checkpoint import checkpoint

from purefine import ops
from purefine.errors import ConfigError

Hook = Callable[[str, torch.Tensor], Any]
# LoRA targets: peft's default (q, v), and every linear layer (``all-linear``; lm_head left out).
LORA_TARGETS = ("q_proj", "v_proj")
LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaConfig:
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
        kwargs = {k: d[k] for k in names if d.get(k) is not None}
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

    @property
    def num_params(self) -> int:
        """Parameter count, from shapes alone."""
        return sum(torch.Size(s).numel() for s in param_shapes(self).values())


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


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape}, in the order ``init`` creates them."""
    d, h, k, hd, f = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        for name, out, inp in (("q", h * hd, d), ("k", k * hd, d), ("v", k * hd, d), ("o", d, h * hd)):
            shapes[p + f"self_attn.{name}_proj.weight"] = (out, inp)
            if cfg.attention_bias:
                shapes[p + f"self_attn.{name}_proj.bias"] = (out,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        for name, out, inp in (("gate", f, d), ("up", f, d), ("down", d, f)):
            shapes[p + f"mlp.{name}_proj.weight"] = (out, inp)
            if cfg.mlp_bias:
                shapes[p + f"mlp.{name}_proj.bias"] = (out,)
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def init_tensor(name: str, shape: tuple[int, ...], std: float, gen: torch.Generator, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """HF's init: N(0, std) for matrices, ones for norm weights, zeros for biases."""
    if str(device) == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    t = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
    return t.to(dtype=dtype, device=device)


def init(
    cfg: LlamaConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: Any = "cpu", hook: Hook | None = None
) -> dict:
    """A seeded params tree. ``device='meta'`` gives shapes without memory; ``hook(name, tensor)``
    maps each tensor as soon as it is made (e.g. to NF4), so peak memory is one tensor above the result."""
    from purefine import tree  # local: keeps the model file's import list to ops

    gen = torch.Generator().manual_seed(seed)
    flat = {}
    for name, shape in param_shapes(cfg).items():
        t = init_tensor(name, shape, cfg.initializer_range, gen, dtype, device)
        flat[name] = hook(name, t) if hook is not None else t
    return tree.unflatten(flat)


def attention_block(cfg: LlamaConfig, p: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    mask: torch.Tensor | None, cache: ops.KVCache | None, layer: int) -> torch.Tensor:
    """x (B, T, D) -> (B, T, D): grouped-query self-attention with rotary positions."""
    b, t, _ = x.shape
    hd = cfg.head_dim
    q = ops.linear(x, p["q_proj"]["weight"], p["q_proj"].get("bias")).view(b, t, -1, hd).transpose(1, 2)
    k = ops.linear(x, p["k_proj"]["weight"], p["k_proj"].get("bias")).view(b, t, -1, hd).transpose(1, 2)
    v = ops.linear(x, p["v_proj"]["weight"], p["v_proj"].get("bias")).view(b, t, -1, hd).transpose(1, 2)
    q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
    if cache is not None:
        k, v = cache.update(layer, k, v)
    o = ops.attention(q, k, v, mask=mask)
    return ops.linear(o.transpose(1, 2).reshape(b, t, -1), p["o_proj"]["weight"], p["o_proj"].get("bias"))


def mlp_block(cfg: LlamaConfig, p: dict, x: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) -> (B, T, D): SwiGLU (biases when ``mlp_bias``)."""
    if not cfg.mlp_bias:
        return ops.swiglu(x, p["gate_proj"]["weight"], p["up_proj"]["weight"], p["down_proj"]["weight"])
    gate = ops.linear(x, p["gate_proj"]["weight"], p["gate_proj"]["bias"])
    up = ops.linear(x, p["up_proj"]["weight"], p["up_proj"]["bias"])
    return ops.linear(torch.nn.functional.silu(gate) * up, p["down_proj"]["weight"], p["down_proj"]["bias"])


def decoder_layer(cfg: LlamaConfig, p: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  mask: torch.Tensor | None, cache: ops.KVCache | None = None, layer: int = 0) -> torch.Tensor:
    """One pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""
    x = x + attention_block(cfg, p["self_attn"], ops.rms_norm(x, p["input_layernorm"]["weight"], cfg.rms_norm_eps),
                            cos, sin, mask, cache, layer)
    return x + mlp_block(cfg, p["mlp"], ops.rms_norm(x, p["post_attention_layernorm"]["weight"], cfg.rms_norm_eps))


def default_positions(tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """(B, T) positions offset, offset + 1, ... for every row."""
    b, t = tokens.shape
    return torch.arange(offset, offset + t, device=tokens.device).expand(b, t)


def prepare_mask(mask: torch.Tensor | None, t: int, cache: ops.KVCache | None) -> torch.Tensor | None:
    """Normalize a mask argument to what ``ops.attention`` takes (None = plain causal).

    (B, S) is a key padding mask (True = real token) combined with causality; (B, T, S) or
    (B, 1, T, S) is used as given. With a cache, S counts the cached positions too.
    """
    offset = cache.length if cache is not None else 0
    if mask is None:
        if cache is None or t == 1:
            return None
        return ops.causal_mask(t, offset + t, offset=offset, device=cache.keys[0].device)
    if mask.dim() == 2:
        return ops.padded_causal_mask(mask.bool(), t, offset=offset)
    if mask.dim() == 3:
        return mask[:, None]
    return mask


def hidden_states(
    cfg: LlamaConfig, params: dict, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None, cache: ops.KVCache | None = None, remat: bool = False,
    gather: Callable[[Any], Any] | None = None, observe: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, ops.KVCache | None]:
    """tokens (B, T) -> (final normed hidden states (B, T, D), advanced cache or None).

    ``remat=True`` recomputes each block in backward (activation checkpointing). ``gather(subtree)``
    is applied to each layer's params just before the layer runs (inside the checkpoint, so it runs
    again in backward) and to the embedding and final norm where they are used: FSDP gathers
    sharded weights there. ``observe(i, x)`` (debugging) sees layer i's output x (B, T, D).
    """
    g = gather if gather is not None else (lambda subtree: subtree)
    m = params["model"]
    x = ops.embedding(tokens, g(m["embed_tokens"])["weight"])
    if positions is None:
        positions = default_positions(tokens, cache.length if cache is not None else 0)
    inv_freq = ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(x.device)
    cos, sin = ops.rope_cos_sin(inv_freq, positions, x.dtype)
    attn_mask = prepare_mask(mask, tokens.shape[1], cache)
    layer_fn = decoder_layer if gather is None else partial(_gathered_layer, gather)
    for i, layer in enumerate(m["layers"]):
        if remat and torch.is_grad_enabled():
            x = checkpoint(layer_fn, cfg, layer, x, cos, sin, attn_mask, cache, i, use_reentrant=False)
        else:
            x = layer_fn(cfg, layer, x, cos, sin, attn_mask, cache, i)
        if observe is not None:
            observe(i, x)
    x = ops.rms_norm(x, g(m["norm"])["weight"], cfg.rms_norm_eps)
    return x, (cache.advance(tokens.shape[1]) if cache is not None else None)


def _gathered_layer(gather: Callable[[Any], Any], cfg: LlamaConfig, p: dict, *args: Any) -> torch.Tensor:
    return decoder_layer(cfg, gather(p), *args)


def output_weight(cfg: LlamaConfig, params: dict) -> Any:
    """The (V, D) output projection: lm_head, or the input embedding when tied."""
    return params["model"]["embed_tokens"]["weight"] if cfg.tie_word_embeddings else params["lm_head"]["weight"]


def forward(cfg: LlamaConfig, params: dict, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
            mask: torch.Tensor | None = None, gather: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """tokens (B, T) int64 -> logits (B, T, V). Causal unless ``mask`` says otherwise."""
    h, _ = hidden_states(cfg, params, tokens, positions=positions, mask=mask, gather=gather)
    w = output_weight(cfg, params)
    return ops.linear(h, gather(w) if gather is not None else w)


def new_cache(cfg: LlamaConfig, batch: int, max_len: int, *, dtype: torch.dtype, device: Any = None) -> ops.KVCache:
    """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens."""
    return ops.KVCache.empty(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim,
                             dtype=dtype, device=device)

Config = LlamaConfig
