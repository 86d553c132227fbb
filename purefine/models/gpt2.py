"""GPT-2 family as pure functions: learned positions, pre-norm LayerNorm blocks, GELU MLP, tied head.

- ``GPT2Config``: the fields of Hugging Face's ``GPT2Config`` (``n_embd``, ``n_layer``, ...).
- ``PRESETS``: gpt2 (124M), gpt2-medium (355M), gpt2-large, gpt2-xl, and gpt2-debug for tests.
- ``embed`` (token + learned position tables), ``block``, ``final`` (``ln_f``), ``output_weight``.
- ``FAMILY``: the record; ``hf_transposed`` names the Conv1D weights (see below), ``checkpoint_name``
  reads old uploads, ``peft_fields`` the adapter fields ``save_peft`` writes.

Params layout: the names ``GPT2LMHeadModel`` saves, with one difference in layout. GPT-2's
``Conv1D`` stores its weights as (in, out); purefine stores them as (out, in), like every other
linear, so ``ops.linear``, LoRA (``...c_attn.weight`` wrapped like any projection) and NF4 treat
them alike. ``checkpoint.hf`` transposes exactly the ``CONV1D`` weights when a checkpoint is read
or written, and peft's GPT-2 adapters (``fan_in_fan_out``) already use the
(out, in) orientation for their A and B::

    transformer.wte.weight                      (V, D)
    transformer.wpe.weight                      (P, D)
    transformer.h.{i}.ln_1.{weight,bias}        (D,)
    transformer.h.{i}.attn.c_attn.weight        (3D, D)   fused q, k, v (HF file: (D, 3D))
    transformer.h.{i}.attn.c_attn.bias          (3D,)
    transformer.h.{i}.attn.c_proj.{weight,bias} (D, D), (D,)
    transformer.h.{i}.ln_2.{weight,bias}        (D,)
    transformer.h.{i}.mlp.c_fc.{weight,bias}    (F, D), (F,)     (HF file: (D, F))
    transformer.h.{i}.mlp.c_proj.{weight,bias}  (D, F), (D,)     (HF file: (F, D))
    transformer.ln_f.{weight,bias}              (D,)
    lm_head.weight                              (V, D)   only when embeddings are untied
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from purefine import ops
from purefine.errors import ConfigError
from purefine.models.family import Context, Family, Gather, ModelConfig, hf_fields, normal_tensor

CONV1D = r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight"
# Buffers old checkpoints (the original ``gpt2`` upload) carry: the causal mask, not parameters.
BUFFERS = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")


@dataclass(frozen=True)
class GPT2Config(ModelConfig):
    """A GPT-2 architecture; field names are those of Hugging Face's ``GPT2Config``."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None

    model_type: ClassVar[str] = "gpt2"
    architecture: ClassVar[str] = "GPT2LMHeadModel"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"gpt2 config: {name} must be a positive integer, found {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"gpt2 config: n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        ops.activation(self.activation_function, "gpt2 config: activation_function")

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF tensor name: shape in purefine's (out, in) layout}, in the order ``init`` creates them."""
        d, f = self.n_embd, self.inner_size
        shapes = {"transformer.wte.weight": (self.vocab_size, d), "transformer.wpe.weight": (self.n_positions, d)}
        for i in range(self.n_layer):
            p = f"transformer.h.{i}."
            for name, out, inp in (("ln_1", d, 0), ("attn.c_attn", 3 * d, d), ("attn.c_proj", d, d), ("ln_2", d, 0),
                                   ("mlp.c_fc", f, d), ("mlp.c_proj", d, f)):
                shapes[p + name + ".weight"] = (out, inp) if inp else (out,)
                shapes[p + name + ".bias"] = (out,)
        shapes["transformer.ln_f.weight"] = shapes["transformer.ln_f.bias"] = (d,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, d)
        return shapes

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> GPT2Config:
        """Read a Hugging Face config dict; ``source`` names the file in error messages."""
        if d.get("add_cross_attention"):
            raise ConfigError(f"{source}: add_cross_attention: purefine's gpt2 is decoder-only, found true")
        names = {f.name for f in dataclasses.fields(cls)} - {"n_inner", "pad_token_id"}
        kwargs = hf_fields(cls, d, names)
        try:
            return cls(**kwargs, n_inner=d.get("n_inner"), pad_token_id=d.get("pad_token_id"))
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self, dtype: torch.dtype | None = None) -> dict:
        """A Hugging Face ``config.json`` dict for ``GPT2LMHeadModel``."""
        d = {"architectures": [self.architecture], "model_type": self.model_type, **dataclasses.asdict(self)}
        if dtype is not None:
            d["torch_dtype"] = str(dtype).removeprefix("torch.")
        return d


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    "gpt2-debug": GPT2Config(vocab_size=1024, n_positions=128, n_embd=64, n_layer=2, n_head=4),
}


def init_tensor(cfg: GPT2Config, name: str, shape: tuple[int, ...], gen: torch.Generator,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """HF's init: N(0, initializer_range) matrices, the residual projections (``c_proj``) scaled by
    1/sqrt(2 n_layer), LayerNorm weights one, biases zero."""
    if ".ln_" in name and name.endswith(".weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    std = cfg.initializer_range / (2 * cfg.n_layer) ** 0.5 if name.endswith("c_proj.weight") else cfg.initializer_range
    return normal_tensor(shape, std, gen, dtype)


def checkpoint_name(cfg: GPT2Config, name: str) -> str | None:
    """The params name of a checkpoint tensor, or None to skip it: adds the ``transformer.`` prefix
    old uploads lack and drops their attention-mask buffers."""
    if BUFFERS.fullmatch(name):
        return None
    if name.startswith(("h.", "wte.", "wpe.", "ln_f.")):
        return "transformer." + name
    return name


def peft_fields(cfg: GPT2Config) -> dict:
    """adapter_config.json fields of a GPT-2 adapter: ``fan_in_fan_out`` (HF's Conv1D stores (in, out);
    peft's A and B are (r, in) / (out, r) either way, so only the flag differs from Llama's)."""
    return {"fan_in_fan_out": True}


def embed(cfg: GPT2Config, params: dict, tokens: torch.Tensor, ctx: Context, g: Gather, extra: dict) -> torch.Tensor:
    """tokens (B, T) -> token rows + learned position rows (B, T, D); a position past the table is an error."""
    m = params["transformer"]
    if int(ctx.positions.max()) >= cfg.n_positions:
        raise ConfigError(f"gpt2: position {int(ctx.positions.max())} is past n_positions ({cfg.n_positions})")
    return ops.embedding(tokens, g(m["wte"])["weight"]) + ops.embedding(ctx.positions, g(m["wpe"])["weight"])


def attention(cfg: GPT2Config, p: dict, x: torch.Tensor, ctx: Context, i: int) -> torch.Tensor:
    """x (B, T, D) -> (B, T, D): multi-head self-attention through the fused q/k/v projection."""
    b, t, _ = x.shape
    qkv = ops.linear(x, p["c_attn"]["weight"], p["c_attn"]["bias"])
    q, k, v = (z.view(b, t, cfg.n_head, cfg.head_dim).transpose(1, 2) for z in qkv.split(cfg.n_embd, dim=-1))
    if ctx.cache is not None:
        k, v = ctx.cache.update(i, k, v)
    scale = cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
        scale /= i + 1
    o = ops.attention(q, k, v, mask=ctx.masks[i], scale=scale)
    return ops.linear(o.transpose(1, 2).reshape(b, t, -1), p["c_proj"]["weight"], p["c_proj"]["bias"])


def block(cfg: GPT2Config, p: dict, x: torch.Tensor, ctx: Context, i: int) -> torch.Tensor:
    """One pre-norm layer: x + attn(ln_1(x)), then + mlp(ln_2(.)). x (B, T, D) -> (B, T, D)."""
    eps, act = cfg.layer_norm_epsilon, ops.activation(cfg.activation_function)
    x = ops.residual(x, attention(cfg, p["attn"], ops.layer_norm(x, p["ln_1"]["weight"], p["ln_1"]["bias"], eps), ctx, i))
    h = ops.layer_norm(x, p["ln_2"]["weight"], p["ln_2"]["bias"], eps)
    mlp = p["mlp"]
    return ops.residual(x, ops.dense_mlp(h, mlp["c_fc"]["weight"], mlp["c_fc"]["bias"], mlp["c_proj"]["weight"],
                                         mlp["c_proj"]["bias"], act))


def final(cfg: GPT2Config, params: dict, x: torch.Tensor, g: Gather) -> torch.Tensor:
    """The final LayerNorm ``ln_f``: x (B, T, D) -> (B, T, D)."""
    ln_f = g(params["transformer"]["ln_f"])
    return ops.layer_norm(x, ln_f["weight"], ln_f["bias"], cfg.layer_norm_epsilon)


def output_weight(cfg: GPT2Config, params: dict) -> Any:
    """The (V, D) output projection: the token embedding (tied, GPT-2's default) or lm_head."""
    return params["transformer"]["wte"]["weight"] if cfg.tie_word_embeddings else params["lm_head"]["weight"]


# LoRA: peft's default target for GPT-2 is the fused c_attn; ``all-linear`` (c_proj is in attn and mlp).
FAMILY = Family(
    name="gpt2", model_types=("gpt2",), config=GPT2Config, presets=PRESETS, embed=embed, block=block, final=final,
    output_weight=output_weight, layers="transformer.h", first_stage=("transformer.wte", "transformer.wpe"),
    last_stage=("transformer.ln_f", "lm_head"), rotary=False, lora_targets=("c_attn",),
    linear_layers=("c_attn", "c_proj", "c_fc"), init_tensor=init_tensor, hf_transposed=CONV1D,
    checkpoint_name=checkpoint_name, peft_fields=peft_fields,
)
