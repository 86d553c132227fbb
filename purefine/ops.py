"""Pure layers shared by every model family.

- ``linear(x, w, bias)``: ``F.linear`` for a tensor weight; a leaf kind (LoRA, NF4) computes its own.
- ``embedding(tokens, w)``: a row lookup; leaf kinds are densified first.
- ``mm_wt(x, w)`` / ``mm_w(g, w)``: ``x @ wᵀ`` and ``g @ w`` for a weight stored in a lower precision
  than x, upcast ``UPCAST_BLOCK_BYTES`` at a time (a frozen bf16 weight computing in fp32); the
  ``blocks_*`` products under them take any weight given as blocks of output rows (NF4 decodes its own).
- ``rms_norm``: Llama's RMSNorm, in float32 like Hugging Face's, cast back to the input dtype.
- ``layer_norm``: LayerNorm with weight and bias (GPT-2, BERT).
- ``rope_inv_freq`` / ``rope_cos_sin`` / ``apply_rope``: rotary embeddings in the HF half-split
  layout (``rotate_half``), with default, linear and Llama-3 frequency scaling.
- ``attention``: scaled_dot_product_attention with grouped-query heads; causal by default, or an
  explicit boolean mask (True = attend) for packed, padded or cached sequences; with a logit
  soft-cap (Gemma-2) the scores are formed explicitly, since SDPA has no soft-cap.
- ``causal_mask`` / ``block_causal_mask`` / ``KVCache``: masks and the explicit decoding state.
- ``sliding_window_mask`` / ``window_mask``: Mistral's sliding window on top of any other mask.
- ``residual``: the residual sum, in place into the sublayer's fresh output where that is safe.
- ``swiglu`` / ``gated_mlp``: Llama's gated MLP (any activation: Gemma's GELU); ``activation`` /
  ``dense_mlp``: the up-act-down MLP of GPT-2 / BERT.
- ``run_layers``: the layer loop with per-block activation checkpointing and the FSDP gather hook.

The losses over these layers (chunked cross-entropy, preference and distillation losses) are in
``purefine.losses``.

Shapes: B batch, T query length, S key length, H heads, K kv heads, Dh head dim, D model dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from purefine import fused
from purefine.errors import ConfigError

IGNORE_INDEX = -100


def _plain(*xs: Any) -> bool:
    """True when ``fused`` applies: every argument a plain tensor (not a DTensor or another subclass),
    not under torch.compile (inductor fuses the composite itself, and plans what to save) and not
    under a torch.func transform (``vmap(grad(...))``: the composite has the rules it needs)."""
    return (all(type(x) is torch.Tensor for x in xs) and not torch.compiler.is_compiling()
            and _FUNCTORCH_LEVEL() is None)


# The innermost torch.func transform in progress, or None (a private hook; without it, assume none).
_FUNCTORCH_LEVEL = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", lambda: None)


def linear(x: torch.Tensor, w: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ w (out, in)ᵀ + bias -> (..., out). ``w`` is a tensor or a leaf kind."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    return w.linear(x, bias)


# The most of a stored weight that exists upcast at once (a Llama-2-7B output head is 0.5 GB in fp32).
UPCAST_BLOCK_BYTES = 32 << 20


def upcast_rows(w: torch.Tensor, dtype: torch.dtype) -> int:
    """Rows of ``w`` (out, in) upcast to ``dtype`` per block: all of them when they fit UPCAST_BLOCK_BYTES."""
    return max(1, UPCAST_BLOCK_BYTES // max(1, w.shape[1] * dtype.itemsize))


def upcast_blocks(w: torch.Tensor, dtype: torch.dtype) -> Any:
    """(first row, last row + 1, those rows of ``w`` (out, in) in ``dtype``), ``upcast_rows`` at a time;
    one block, w itself, when w is ``dtype`` already."""
    rows = w.shape[0] if w.dtype == dtype else upcast_rows(w, dtype)
    for i in range(0, w.shape[0], rows):
        yield i, min(i + rows, w.shape[0]), w[i : i + rows].to(dtype)


def blocks_mm_t(x: torch.Tensor, blocks: Any, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, in) @ Wᵀ (+ bias (out,), in x's dtype, summed inside the matmul as F.linear does) into ``out``
    (N, out), W given as ``blocks`` of output rows (first, end, rows (r, in))."""
    for r, r1, w in blocks:
        if r1 - r == out.shape[1]:  # the whole weight in one block: straight into out
            return torch.mm(x, w.t(), out=out) if bias is None else torch.addmm(bias, x, w.t(), out=out)
        out[:, r:r1] = torch.mm(x, w.t()) if bias is None else torch.addmm(bias[r:r1], x, w.t())
        del w  # before the next block is made: one block alive at a time
    return out


def blocks_mm(g: torch.Tensor, blocks: Any, out: torch.Tensor) -> torch.Tensor:
    """g (N, out) @ W into ``out`` (N, in), W given as ``blocks`` of output rows like ``blocks_mm_t``."""
    for r, r1, w in blocks:
        if r == 0:  # the first block writes, the others add
            torch.mm(g[:, r:r1], w, out=out)
        else:
            out.addmm_(g[:, r:r1], w)
        del w  # before the next block is made: one block alive at a time
    return out


def blocks_linear(x: torch.Tensor, blocks: Any, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ Wᵀ + bias -> (..., out) for W given in ``blocks``: a tensor of its own, not a view (LoRA
    adds its adapter into it in place)."""
    out = x.new_empty(*x.shape[:-1], out_features)
    blocks_mm_t(x.reshape(-1, x.shape[-1]), blocks, out.view(-1, out_features), bias)
    return out


def blocks_input_grad(g: torch.Tensor, blocks: Any, in_features: int) -> torch.Tensor:
    """g (..., out) @ W -> (..., in) for W given in ``blocks``."""
    out = g.new_empty(*g.shape[:-1], in_features)
    blocks_mm(g.reshape(-1, g.shape[-1]), blocks, out.view(-1, in_features))
    return out


def _weight_blocks(w: Any, x: torch.Tensor) -> Any:
    """Blocks of output rows of ``w`` in x's dtype: ``upcast_blocks`` of a tensor, or a frozen leaf
    kind's own ``row_blocks(x)`` (NF4, decoded into reused buffers)."""
    return upcast_blocks(w, x.dtype) if isinstance(w, torch.Tensor) else w.row_blocks(x)


def mm_wt(x: torch.Tensor, w: Any, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, in) @ w.to(x.dtype)ᵀ -> (N, out) in x's dtype (into ``out`` when given), w upcast a block of
    ``upcast_rows`` output rows at a time; one matmul when w is x's dtype or small enough. ``w`` may
    be a frozen leaf kind with ``row_blocks`` (NF4)."""
    return blocks_mm_t(x, _weight_blocks(w, x), x.new_empty(x.shape[0], w.shape[0]) if out is None else out)


def mm_w(g: torch.Tensor, w: Any, out: torch.Tensor | None = None) -> torch.Tensor:
    """g (N, out) @ w.to(g.dtype) -> (N, in) (into ``out`` when given), block by block of w's rows like ``mm_wt``."""
    return blocks_mm(g, _weight_blocks(w, g), g.new_empty(g.shape[0], w.shape[1]) if out is None else out)


def embedding(tokens: torch.Tensor, w: Any) -> torch.Tensor:
    """tokens (B, T) int -> (B, T, D) rows of w (V, D)."""
    if not isinstance(w, torch.Tensor):
        embed = getattr(w, "embed", None)
        if embed is not None:
            return embed(tokens)
        w = w.dense()
    return F.embedding(tokens, w)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) normalized by its root mean square in float32, scaled by weight (D,) (``fused``'s
    backward for plain tensors: the same values, fewer saved activations)."""
    if _plain(x, weight):
        return fused.rms_norm(x, weight, eps)
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x (..., D) centred and scaled by its standard deviation over D, then * weight (D,) + bias (D,)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies (Dh/2,) float32, with optional ``linear`` or ``llama3`` scaling.

    ``scaling`` is the Hugging Face ``rope_scaling`` / ``rope_parameters`` dict.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ConfigError(f"rope_scaling.rope_type: expected one of default, linear, llama3; found {kind!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) -> cos, sin (B, T, Dh), computed in float32 and cast to ``dtype``."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh) rotated in the half-split layout; cos, sin (B, T, R) with R <= Dh: only the
    first R dims rotate (partial rotary, Phi-3's ``partial_rotary_factor``), the rest pass through."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    if _plain(x, cos):
        return fused.rope(x, cos[:, None], sin[:, None])
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def causal_mask(t: int, s: int, *, offset: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, S) bool: query i (at absolute position offset + i) attends keys j <= offset + i."""
    q = torch.arange(t, device=device)[:, None] + offset
    return torch.arange(s, device=device)[None, :] <= q


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids (B, T) -> (B, 1, T, T) bool: causal, and only within the same segment (packing)."""
    t = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal_mask(t, t, device=segment_ids.device))[:, None]


def padded_causal_mask(key_padding: torch.Tensor, t: int, *, offset: int = 0) -> torch.Tensor:
    """key_padding (B, S) bool (True = real token) -> (B, 1, T, S) causal mask over real keys.

    Each query also attends to its own position, so a padding query never has an empty row
    (an all-masked row makes SDPA return NaN, which would then leak through 0 * NaN).
    """
    s = key_padding.shape[-1]
    causal = causal_mask(t, s, offset=offset, device=key_padding.device)
    own = torch.arange(s, device=key_padding.device)[None, :] == (torch.arange(t, device=key_padding.device)[:, None] + offset)
    return ((causal[None] & key_padding[:, None, :]) | own[None])[:, None]


def sliding_window_mask(t: int, s: int, window: int, *, offset: int = 0,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """(T, S) bool: causal, and query i (at offset + i) sees only keys j with offset + i - j < window.

    The same band as Hugging Face's ``sliding_window_causal_mask_function`` (``kv > q - window``),
    counted in sequence (cache) indices, not in position ids.
    """
    q = torch.arange(t, device=device)[:, None] + offset
    k = torch.arange(s, device=device)[None, :]
    return (k <= q) & (k > q - window)


def window_mask(mask: torch.Tensor | None, window: int | None, t: int, *, offset: int = 0,
                device: torch.device | str | None = None) -> torch.Tensor | None:
    """A prepared attention mask (None = causal, or bool broadcastable to (B, H, T, S)) narrowed to a
    sliding window over the S = offset + T keys; unchanged when the window covers every key."""
    s = offset + t
    if window is None or s <= window:
        return mask
    band = sliding_window_mask(t, s, window, offset=offset, device=device)
    return band if mask is None else mask & band


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None, scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q (B, H, T, Dh), k and v (B, K, S, Dh) with H % K == 0 -> (B, H, T, Dh).

    ``mask`` None means causal; otherwise a boolean mask broadcastable to (B, H, T, S), True = attend.
    ``softcap`` caps the scaled scores at ``softcap * tanh(scores / softcap)`` before the mask and
    the softmax (Gemma-2's ``attn_logit_softcapping``).
    """
    if softcap is not None:
        return _softcapped_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale, softcap)
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          scale: float, softcap: float) -> torch.Tensor:
    """``attention`` with soft-capped scores, formed explicitly (softmax in float32, as transformers)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh((q @ k.transpose(-1, -2)) * (scale / softcap)) * softcap
    t, s = q.shape[2], k.shape[2]
    if mask is None and t > 1:
        mask = causal_mask(t, s, offset=s - t, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


def residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) + y (B, T, D): the residual stream plus a sublayer's output, added into y in place when
    y is a fresh plain tensor of x's shape and dtype (one activation-sized tensor fewer per sublayer, the
    same values: IEEE addition commutes). y must be an output no backward saves (a projection's)."""
    if (_plain(x, y) and y.shape == x.shape and y.dtype == x.dtype and not y._is_view()
            and not (y.is_leaf and y.requires_grad) and y.data_ptr() != x.data_ptr()):
        return y.add_(x)
    return x + y


def glu(act: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., F) -> act(gate) * up (..., F), saving only gate and up for backward."""
    if _plain(gate, up):
        return fused.glu(act, gate, up)
    return act(gate) * up


def gated_mlp(x: torch.Tensor, gate: Any, up: Any, down: Any, act: Any = F.silu) -> torch.Tensor:
    """x (..., D) -> down(act(gate(x)) * up(x)) (..., D); gate, up (F, D), down (D, F)."""
    return linear(glu(act, linear(x, gate), linear(x, up)), down)


def swiglu(x: torch.Tensor, gate: Any, up: Any, down: Any) -> torch.Tensor:
    """x (..., D) -> down(silu(gate(x)) * up(x)) (..., D)."""
    return gated_mlp(x, gate, up, down, F.silu)


ACTIVATIONS: dict[str, Any] = {
    "gelu": F.gelu,                                         # exact (erf), BERT's hidden_act
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),    # GPT-2's tanh approximation
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str, source: str = "config") -> Any:
    """The elementwise function an HF ``hidden_act`` / ``activation_function`` names."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"{source}: activation: expected one of {sorted(ACTIVATIONS)}, found {name!r}")
    return ACTIVATIONS[name]


def dense_mlp(x: torch.Tensor, up: Any, up_bias: torch.Tensor | None, down: Any, down_bias: torch.Tensor | None,
              act: Any = F.gelu) -> torch.Tensor:
    """x (..., D) -> down(act(up(x))) (..., D); up (F, D), down (D, F) with optional biases."""
    return linear(act(linear(x, up, up_bias)), down, down_bias)


def run_layers(block: Any, layers: list, x: torch.Tensor, *, remat: bool = False, gather: Any = None,
               observe: Any = None) -> torch.Tensor:
    """x (B, T, D) through ``block(p, x, i) -> x`` for each layer's params ``p``.

    ``remat=True`` recomputes each block in backward (activation checkpointing); ``gather(p)``
    (FSDP) runs inside the checkpoint, so a layer's gathered weights are freed between uses.
    ``observe(i, x)`` (debugging, e.g. ``purefine.debug.layer_stats``) sees layer i's output (B, T, D).
    """
    for i, p in enumerate(layers):
        if remat and torch.is_grad_enabled():
            x = checkpoint(_run_block, block, gather, p, x, i, use_reentrant=False)
        else:
            x = _run_block(block, gather, p, x, i)
        if observe is not None:
            observe(i, x)
    return x


def _run_block(block: Any, gather: Any, p: Any, x: torch.Tensor, i: int) -> torch.Tensor:
    return block(gather(p) if gather is not None else p, x, i)


@dataclass(frozen=True)
class KVCache:
    """Decoding state: per-layer key and value buffers (B, K, S_max, Dh) and the filled length.

    ``update`` writes into the preallocated buffers in place (the one documented exception to
    purity, as in every KV cache) and the model returns the cache with ``length`` advanced.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    length: int = 0

    @staticmethod
    def empty(layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, *, dtype: torch.dtype, device: Any = None) -> KVCache:
        """Zeroed buffers for ``layers`` layers and up to ``max_len`` positions."""
        shape = (batch, kv_heads, max_len, head_dim)
        make = lambda: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
        return KVCache(tuple(make() for _ in range(layers)), tuple(make() for _ in range(layers)), 0)

    @property
    def max_len(self) -> int:
        """S_max: the positions each (B, K, S_max, Dh) buffer holds."""
        return self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, Dh) at [length, length + T); return keys, values up to length + T."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ConfigError(f"KV cache: {end} positions needed, the cache holds {self.max_len}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, t: int) -> KVCache:
        """The same buffers with ``length`` moved on by ``t`` positions (after writing (B, K, t, Dh))."""
        return KVCache(self.keys, self.values, self.length + t)
