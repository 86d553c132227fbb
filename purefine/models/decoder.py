"""The one forward every family runs: embed -> blocks -> final norm -> head, as pure functions.

``fam`` is the config's ``Family`` record (``registry.family(cfg)``; ``pf.models`` passes it):

    x, ctx = prologue(fam, cfg, params, tokens, positions=..., mask=..., cache=..., gather=...)
    x = run_blocks(fam, cfg, fam.layer_list(params), x, ctx, remat=..., gather=..., observe=...)
    h = fam.final(cfg, params, x, gather)                      # (B, T, D)
    logits = head(fam, cfg, params, h, gather)                 # (B, T, V), soft-capped if the family says so

Causal families get a causal mask (combined with padding, packing or a KV cache) narrowed per
layer to that layer's sliding window (``cfg.layer_window(i)``); an encoder (``fam.causal`` False)
attends to every real key. ``remat`` recomputes each block in backward; ``gather`` (FSDP / tensor
parallel) maps a subtree of params just before use, inside the checkpoint; ``observe(i, x)`` sees
each layer's output (debugging). The pipeline stages run the same three pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from purefine import losses, ops, tree, upcast
from purefine.errors import ConfigError
from purefine.models.family import Context, Family, Gather

Hook = Callable[[str, torch.Tensor], Any]
Observe = Callable[[int, torch.Tensor], None]


def init(fam: Family, cfg: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: Any = "cpu",
         hook: Hook | None = None) -> dict:
    """A seeded params tree keyed by the HF names. ``device='meta'`` costs no memory; ``hook(name,
    tensor)`` maps each tensor as soon as it exists (e.g. to NF4), so peak memory stays one tensor
    above the result."""
    gen = torch.Generator().manual_seed(seed)
    flat = {}
    for name, shape in cfg.param_shapes().items():
        if str(device) == "meta":
            t = torch.empty(shape, dtype=dtype, device="meta")
        else:
            t = fam.init_tensor(cfg, name, shape, gen, dtype).to(device=device)
        flat[name] = hook(name, t) if hook is not None else t
    return tree.unflatten(flat)


def default_positions(tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """(B, T) positions offset, offset + 1, ... for every row."""
    b, t = tokens.shape
    return torch.arange(offset, offset + t, device=tokens.device).expand(b, t)


def causal_mask_arg(mask: torch.Tensor | None, t: int, cache: ops.KVCache | None) -> torch.Tensor | None:
    """A mask argument -> what ``ops.attention`` takes (None = plain causal). (B, S) is key padding
    (True = real) combined with causality; (B, T, S) / (B, 1, T, S) is used as given. With a cache, S
    counts the cached positions too."""
    offset = cache.length if cache is not None else 0
    if mask is None:
        if cache is None or t == 1:
            return None
        return ops.causal_mask(t, offset + t, offset=offset, device=cache.keys[0].device)
    if mask.dim() == 2:
        return ops.padded_causal_mask(mask.bool(), t, offset=offset)
    return mask[:, None] if mask.dim() == 3 else mask


def encoder_mask_arg(mask: torch.Tensor | None, s: int, device: torch.device) -> torch.Tensor:
    """A mask argument of an encoder -> bool for ``ops.attention``: None = every key; (B, S) key
    padding (True = real); (B, T, S) / (B, 1, T, S) used as given."""
    if mask is None:
        return torch.ones(1, 1, 1, s, dtype=torch.bool, device=device)
    mask = mask.bool()
    if mask.dim() == 2:
        return mask[:, None, None, :]
    return mask[:, None] if mask.dim() == 3 else mask


def layer_masks(fam: Family, cfg: Any, mask: torch.Tensor | None, t: int, cache: ops.KVCache | None,
                device: torch.device) -> tuple[torch.Tensor | None, ...]:
    """One prepared mask per layer: the shared one, windowed where the layer has a window (layers
    with the same window share one tensor)."""
    if not fam.causal:
        if cache is not None:
            raise ConfigError(f"{cfg.model_type}: an encoder has no KV cache (cache must be None)")
        return (encoder_mask_arg(mask, t, device),) * cfg.num_hidden_layers
    offset = cache.length if cache is not None else 0
    full = causal_mask_arg(mask, t, cache)
    by_window: dict[int | None, torch.Tensor | None] = {None: full}
    out = []
    for i in range(cfg.num_hidden_layers):
        w = cfg.layer_window(i)
        if w not in by_window:
            by_window[w] = ops.window_mask(full, w, t, offset=offset, device=device)
        out.append(by_window[w])
    return tuple(out)


def context(fam: Family, cfg: Any, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
            mask: torch.Tensor | None = None, cache: ops.KVCache | None = None, dtype: torch.dtype = torch.float32,
            device: torch.device | None = None) -> Context:
    """The Context of a forward over tokens (B, T): positions (default: after the cache), rotary
    cos / sin in the activation ``dtype`` when the family is rotary, one mask per layer."""
    if positions is None:
        positions = default_positions(tokens, cache.length if cache is not None else 0)
    device = device if device is not None else tokens.device
    cos = sin = None
    if fam.rotary:
        inv_freq = ops.rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
        cos, sin = ops.rope_cos_sin(inv_freq, positions, dtype)
    return Context(positions, cos, sin, layer_masks(fam, cfg, mask, tokens.shape[1], cache, device), cache)


def prologue(fam: Family, cfg: Any, params: dict, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, cache: ops.KVCache | None = None, gather: Gather | None = None,
             extra: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, Context]:
    """tokens (B, T) -> (embeddings x (B, T, D), the Context every block reads)."""
    if positions is None:
        positions = default_positions(tokens, cache.length if cache is not None else 0)
    x = fam.embed(cfg, params, tokens, Context(positions, None, None, (), cache), gather or _same, extra or {})
    ctx = context(fam, cfg, tokens, positions=positions, mask=mask, cache=cache, dtype=x.dtype, device=x.device)
    return x, ctx


def run_blocks(fam: Family, cfg: Any, layers: list, x: torch.Tensor, ctx: Context, *, first: int = 0,
               remat: bool = False, gather: Gather | None = None, observe: Observe | None = None) -> torch.Tensor:
    """x (B, T, D) through ``layers`` (the params of layers first, first + 1, ...)."""

    def block(p: dict, h: torch.Tensor, i: int) -> torch.Tensor:
        return fam.block(cfg, p, h, ctx, first + i)

    seen = None if observe is None else (lambda i, h: observe(first + i, h))
    return ops.run_layers(block, layers, x, remat=remat, gather=gather, observe=seen)


def hidden_states(fam: Family, cfg: Any, params: dict, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None, cache: ops.KVCache | None = None, remat: bool = False,
                  gather: Gather | None = None, observe: Observe | None = None,
                  extra: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ops.KVCache | None]:
    """tokens (B, T) -> (final hidden states (B, T, D), the cache advanced by T, or None).

    ``mask``: None (causal), (B, S) key padding (True = real token), or an explicit bool mask
    (B, T, S) / (B, 1, T, S) (True = attend); ``extra``: family inputs such as BERT's
    ``token_type_ids`` (B, T).
    """
    x, ctx = prologue(fam, cfg, params, tokens, positions=positions, mask=mask, cache=cache, gather=gather, extra=extra)
    x = run_blocks(fam, cfg, fam.layer_list(params), x, ctx, remat=remat, gather=gather, observe=observe)
    x = fam.final(cfg, params, x, gather or _same)
    return x, (cache.advance(tokens.shape[1]) if cache is not None else None)


def head(fam: Family, cfg: Any, params: dict, h: torch.Tensor, gather: Gather | None = None) -> torch.Tensor:
    """Hidden states (..., D) -> logits: the output projection (soft-capped where the config says),
    or the family's own head (BERT: class logits or masked-LM logits)."""
    g = gather or _same
    if fam.head is not None:
        return fam.head(cfg, params, h, g)
    return losses.softcap(ops.linear(h, g(fam.output_weight(cfg, params))), cfg.logit_softcap)


def forward(fam: Family, cfg: Any, params: dict, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
            mask: torch.Tensor | None = None, gather: Gather | None = None,
            extra: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """tokens (B, T) int64 -> logits (B, T, V) (an encoder's head decides its own shape)."""
    h, _ = hidden_states(fam, cfg, params, tokens, positions=positions, mask=mask, gather=gather, extra=extra)
    return head(fam, cfg, params, h, gather)


def batch_mask(batch: Mapping[str, Any]) -> torch.Tensor | None:
    """The attention mask a batch asks for: its ``mask``, or block-causal (B, 1, T, T) bool from
    ``segment_ids`` (B, T); None (plain causal) when it has neither."""
    if batch.get("mask") is not None:
        return batch["mask"]
    if batch.get("segment_ids") is not None:
        return ops.block_causal_mask(batch["segment_ids"])
    return None


def lm_loss(fam: Family, cfg: Any, params: dict, h: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 1024,
            gather: Gather | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (B, T, D), labels (B, T) already shifted -> (summed next-token loss fp32, count)."""
    w = (gather or _same)(fam.output_weight(cfg, params))
    if isinstance(w, upcast.Upcast):  # frozen, stored in bf16: the chunked loss upcasts it a block at a time
        w = w.base if type(w.base) is torch.Tensor else w.dense()  # a DTensor (tensor parallel): whole
    return losses.chunked_cross_entropy(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), chunk_size=chunk_size,
                                        softcap=cfg.logit_softcap)


def loss_fn(fam: Family, cfg: Any, *, chunk_size: int = 1024, remat: bool = False,
            gather: Gather | None = None) -> Callable[[dict, dict], tuple[torch.Tensor, torch.Tensor]]:
    """(params, batch) -> (summed loss fp32, count): next-token cross-entropy for language models
    (batch: ``tokens``, shifted ``labels``, optional ``positions`` / ``segment_ids`` / ``mask``),
    the family's own loss for an encoder's head."""
    if fam.loss is not None:
        return fam.loss(cfg, chunk_size=chunk_size, remat=remat, gather=gather)

    def loss(params: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        h, _ = hidden_states(fam, cfg, params, batch["tokens"], positions=batch.get("positions"),
                             mask=batch_mask(batch), remat=remat, gather=gather)
        return lm_loss(fam, cfg, params, h, batch["labels"], chunk_size=chunk_size, gather=gather)

    return loss


def new_cache(fam: Family, cfg: Any, batch: int, max_len: int, *, dtype: torch.dtype, device: Any = None) -> ops.KVCache:
    """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens."""
    if not fam.causal:
        raise ConfigError(f"{cfg.model_type}: an encoder cannot generate; there is no KV cache")
    return ops.KVCache.empty(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim,
                             dtype=dtype, device=device)


def _same(subtree: Any) -> Any:
    return subtree
