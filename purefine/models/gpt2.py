"""GPT-2 family as pure functions: learned positions, pre-norm LayerNorm blocks, GELU MLP, tied head.

- ``GPT2Config``: the fields of Hugging Face's ``GPT2Config`` (``n_embd``, ``n_layer``, ...).
- ``PRESETS``: gpt2 (124M), gpt2-medium (355M), gpt2-large, gpt2-xl, and gpt2-debug for tests.
- ``hidden_states`` / ``output_weight`` / ``forward`` / ``new_cache``: the family protocol.
- ``checkpoint_name`` / ``from_hf_tensor`` / ``to_hf_tensor``: the hooks ``checkpoint.hf`` calls
  to read and write the HF files (see below); ``peft_config``: the adapter fields ``save_peft`` writes.

Params layout: the names ``GPT2LMHeadModel`` saves, with one difference in layout. GPT-2's
``Conv1D`` stores its weights as (in, out); purefine stores them as (out, in), like every other
linear, so ``ops.linear``, LoRA (``...c_attn.weight`` wrapped like any projection) and NF4 treat
them alike. ``from_hf_tensor`` / ``to_hf_tensor`` transpose exactly the ``CONV1D`` weights when a
checkpoint is read or written, and peft's GPT-2 adapters (``fan_in_fan_out``) already use the
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from purefine import ops
from purefine.errors import ConfigError
from purefine.models import llama

CONV1D = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
# LoRA targets: peft's default for GPT-2, and every linear layer (``all-linear``; c_proj is in attn and mlp).
LORA_TARGETS = ("c_attn",)
LINEAR_LAYERS = ("c_attn", "c_proj", "c_fc")
# Buffers old checkpoints (the original ``gpt2`` upload) carry: the causal mask, not parameters.
BUFFERS = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)")


@dataclass(frozen=True)
class GPT2Config:
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
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def num_params(self) -> int:
        """Parameter count, from shapes alone."""
        return sum(torch.Size(s).numel() for s in param_shapes(self).values())

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> GPT2Config:
        """Read a Hugging Face config dict; ``source`` names the file in error messages."""
        if d.get("add_cross_attention"):
            raise ConfigError(f"{source}: add_cross_attention: purefine's gpt2 is decoder-only, found true")
        names = {f.name for f in dataclasses.fields(cls)} - {"n_inner", "pad_token_id"}
        kwargs = {k: d[k] for k in names if d.get(k) is not None}
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


def param_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape in purefine's (out, in) layout}, in the order ``init`` creates them."""
    d, f = cfg.n_embd, cfg.inner_size
    shapes = {"transformer.wte.weight": (cfg.vocab_size, d), "transformer.wpe.weight": (cfg.n_positions, d)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for name, out, inp in (("ln_1", d, 0), ("attn.c_attn", 3 * d, d), ("attn.c_proj", d, d), ("ln_2", d, 0),
                               ("mlp.c_fc", f, d), ("mlp.c_proj", d, f)):
            shapes[p + name + ".weight"] = (out, inp) if inp else (out,)
            shapes[p + name + ".bias"] = (out,)
    shapes["transformer.ln_f.weight"] = shapes["transformer.ln_f.bias"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def init(cfg: GPT2Config, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: Any = "cpu",
         hook: Callable[[str, torch.Tensor], Any] | None = None) -> dict:
    """A seeded params tree: N(0, initializer_range) matrices (GPT-2's residual projections scaled
    by 1/sqrt(2 n_layer), as HF does), LayerNorm weights one, biases zero."""
    from purefine import tree

    gen = torch.Generator().manual_seed(seed)
    flat = {}
    for name, shape in param_shapes(cfg).items():
        std = cfg.initializer_range / (2 * cfg.n_layer) ** 0.5 if name.endswith("c_proj.weight") else cfg.initializer_range
        if ".ln_" in name and name.endswith(".weight") and str(device) != "meta":
            t = torch.ones(shape, dtype=dtype, device=device)
        else:  # N(0, std) for matrices, zeros for biases, empty on meta
            t = llama.init_tensor(name, shape, std, gen, dtype, device)
        flat[name] = hook(name, t) if hook is not None else t
    return tree.unflatten(flat)


def checkpoint_name(cfg: GPT2Config, name: str) -> str | None:
    """The params name of a checkpoint tensor, or None to skip it: adds the ``transformer.`` prefix
    old uploads lack and drops their attention-mask buffers."""
    if BUFFERS.fullmatch(name):
        return None
    if name.startswith(("h.", "wte.", "wpe.", "ln_f.")):
        return "transformer." + name
    return name


def from_hf_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor as read from an HF file -> purefine's layout (Conv1D weights transposed to (out, in))."""
    return t.t().contiguous() if CONV1D.fullmatch(name) else t


def to_hf_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor in purefine's layout -> the HF file layout (Conv1D weights back to (in, out))."""
    return t.t().contiguous() if CONV1D.fullmatch(name) else t


def peft_config(cfg: GPT2Config) -> dict:
    """adapter_config.json fields of a GPT-2 adapter: ``fan_in_fan_out`` (HF's Conv1D stores (in, out);
    peft's A and B are (r, in) / (out, r) either way, so only the flag differs from Llama's)."""
    return {"fan_in_fan_out": True}


def attention_block(cfg: GPT2Config, p: dict, x: torch.Tensor, mask: torch.Tensor | None,
                    cache: ops.KVCache | None, layer: int) -> torch.Tensor:
    """x (B, T, D) -> (B, T, D): multi-head self-attention through the fused q/k/v projection."""
    b, t, _ = x.shape
    qkv = ops.linear(x, p["c_attn"]["weight"], p["c_attn"]["bias"])
    q, k, v = (z.view(b, t, cfg.n_head, cfg.head_dim).transpose(1, 2) for z in qkv.split(cfg.n_embd, dim=-1))
    if cache is not None:
        k, v = cache.update(layer, k, v)
    scale = cfg.head_dim ** -0.5 if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
        scale /= layer + 1
    o = ops.attention(q, k, v, mask=mask, scale=scale)
    return ops.linear(o.transpose(1, 2).reshape(b, t, -1), p["c_proj"]["weight"], p["c_proj"]["bias"])


def block(cfg: GPT2Config, p: dict, x: torch.Tensor, mask: torch.Tensor | None,
          cache: ops.KVCache | None, layer: int) -> torch.Tensor:
    """One pre-norm block: x + attn(ln_1(x)), then + mlp(ln_2(.))."""
    eps, act = cfg.layer_norm_epsilon, ops.activation(cfg.activation_function)
    x = x + attention_block(cfg, p["attn"], ops.layer_norm(x, p["ln_1"]["weight"], p["ln_1"]["bias"], eps),
                            mask, cache, layer)
    h = ops.layer_norm(x, p["ln_2"]["weight"], p["ln_2"]["bias"], eps)
    mlp = p["mlp"]
    return x + ops.dense_mlp(h, mlp["c_fc"]["weight"], mlp["c_fc"]["bias"], mlp["c_proj"]["weight"],
                             mlp["c_proj"]["bias"], act)


def hidden_states(
    cfg: GPT2Config, params: dict, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None, cache: ops.KVCache | None = None, remat: bool = False,
    gather: Callable[[Any], Any] | None = None, observe: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, ops.KVCache | None]:
    """tokens (B, T) -> (final LayerNormed hidden states (B, T, D), advanced cache or None).

    ``positions`` (B, T) index the learned position table (default: offset + 0, 1, ...);
    ``mask``, ``remat``, ``gather`` and ``observe`` as in ``llama.hidden_states``.
    """
    g = gather if gather is not None else (lambda subtree: subtree)
    m = params["transformer"]
    if positions is None:
        positions = llama.default_positions(tokens, cache.length if cache is not None else 0)
    if int(positions.max()) >= cfg.n_positions:
        raise ConfigError(f"gpt2: position {int(positions.max())} is past n_positions ({cfg.n_positions})")
    x = ops.embedding(tokens, g(m["wte"])["weight"]) + ops.embedding(positions, g(m["wpe"])["weight"])
    attn_mask = llama.prepare_mask(mask, tokens.shape[1], cache)
    x = ops.run_layers(lambda p, h, i: block(cfg, p, h, attn_mask, cache, i), m["h"], x, remat=remat, gather=gather,
                       observe=observe)
    ln_f = g(m["ln_f"])
    x = ops.layer_norm(x, ln_f["weight"], ln_f["bias"], cfg.layer_norm_epsilon)
    return x, (cache.advance(tokens.shape[1]) if cache is not None else None)


def output_weight(cfg: GPT2Config, params: dict) -> Any:
    """The (V, D) output projection: the token embedding (tied, GPT-2's default) or lm_head."""
    return params["transformer"]["wte"]["weight"] if cfg.tie_word_embeddings else params["lm_head"]["weight"]


def forward(cfg: GPT2Config, params: dict, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
            mask: torch.Tensor | None = None, gather: Callable[[Any], Any] | None = None) -> torch.Tensor:
    """tokens (B, T) int64 -> logits (B, T, V). Causal unless ``mask`` says otherwise."""
    h, _ = hidden_states(cfg, params, tokens, positions=positions, mask=mask, gather=gather)
    w = output_weight(cfg, params)
    return ops.linear(h, gather(w) if gather is not None else w)


def new_cache(cfg: GPT2Config, batch: int, max_len: int, *, dtype: torch.dtype, device: Any = None) -> ops.KVCache:
    """An empty KV cache for ``batch`` sequences of up to ``max_len`` (<= n_positions) tokens."""
    if max_len > cfg.n_positions:
        raise ConfigError(f"gpt2: a cache of {max_len} positions exceeds n_positions ({cfg.n_positions})")
    return ops.KVCache.empty(cfg.n_layer, batch, cfg.n_head, max_len, cfg.head_dim, dtype=dtype, device=device)


Config = GPT2Config
