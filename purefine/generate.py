"""Text generation over the pure model: the KV cache as explicit state, prefill, decode, sampling.

- ``left_pad(prompts)``: a batch of token lists -> tokens (B, L) padded on the left and the
  (B, L) padding mask; ``positions_from_mask`` gives positions that skip the padding, so a padded
  row computes exactly what it would alone.
- ``DecodeState``: what decoding carries from step to step: the KV cache, the key mask over the
  cached slots and each row's next position.
- ``prefill(cfg, params, tokens, mask, cache) -> (logits, state)`` and
  ``decode_step(cfg, params, state, token) -> (logits, state)``: pure functions, state in, state out
  (the cache buffers are written in place, the one documented exception, as in every KV cache).
- ``top_k_filter`` / ``top_p_filter`` / ``sample``: greedy, temperature, top-k and top-p (nucleus)
  sampling with a seeded ``torch.Generator``, in the order Hugging Face applies them.
- ``generate(cfg, params, prompts, ...)``: batched generation with stopping on eos ids or on stop
  strings (given a ``decode`` function); returns the new tokens of each prompt.
- ``cast_params`` / ``activation_dtype``: the compute dtype (tensor leaves cast, leaf kinds ``astype``).
- ``bench_generate()``: decode throughput on random weights, for scripts/bench.py.

Any params tree works, leaf kinds included (LoRA, NF4): every weight goes through ``ops.linear``.
Sharded params (DTensors under data parallelism / FSDP, e.g. during a torchrun training run) work
with ``gather=layout.gather``: each block's weights are gathered just before use, as in training,
so every rank computes the same tokens as one process (tensor-parallel layouts are not supported:
the KV cache holds every head).
Shapes: B batch, L padded prompt length, S filled cache length, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from purefine import models, ops, tree
from purefine.errors import ConfigError, DataError

PAD_ID = 0  # the token fed at padded slots; any valid id works, the mask hides it
Gather = Callable[[Any], Any]  # the FSDP hook: a subtree of (sharded) params -> the weights to compute with


@dataclass(frozen=True)
class DecodeState:
    """Decoding state between steps.

    ``cache``: the KV cache (S positions filled). ``key_mask``: (B, S) bool, True where a cached
    slot holds a real token, or None when no row is padded. ``next_positions``: (B,) int64, the
    rotary position of each row's next token.
    """

    cache: ops.KVCache
    key_mask: torch.Tensor | None
    next_positions: torch.Tensor


def left_pad(prompts: Sequence[Sequence[int]], *, pad_id: int = PAD_ID, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (tokens (B, L) int64 padded on the left with ``pad_id``, mask (B, L) bool, True = real)."""
    if not prompts:
        raise DataError("generate: expected at least one prompt, found none")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise DataError(f"generate: prompt {i} is empty; expected at least one token (e.g. the BOS id)")
    length = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, length - len(p):] = True
    return tokens.to(device), mask.to(device)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """mask (B, L) bool (True = real token) -> positions (B, L) int64 counting real tokens only.

    Padding slots get position 0; they are masked out as keys, so their value never matters.
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _last_logits(cfg: Any, params: dict, h: torch.Tensor, gather: Gather | None = None) -> torch.Tensor:
    """h (B, T, D) -> float32 logits (B, V) of the last position."""
    weight = models.output_weight(cfg, params)
    return ops.linear(h[:, -1], gather(weight) if gather is not None else weight).float()


def prefill(cfg: Any, params: dict, tokens: torch.Tensor, mask: torch.Tensor | None,
            cache: ops.KVCache, *, gather: Gather | None = None) -> tuple[torch.Tensor, DecodeState]:
    """Run the prompts through the model, filling an empty ``cache``.

    tokens (B, L), mask (B, L) bool (None = no padding) -> (logits (B, V) float32 of the last
    position, the decode state). Left padding is hidden from attention and skipped by positions.
    """
    if mask is None or bool(mask.all()):
        b, length = tokens.shape
        positions = torch.arange(cache.length, cache.length + length, device=tokens.device).expand(b, length)
        key_mask = None
    else:
        positions, key_mask = positions_from_mask(mask), mask.bool()
    h, cache = models.hidden_states(cfg, params, tokens, positions=positions, mask=key_mask, cache=cache, gather=gather)
    return _last_logits(cfg, params, h, gather), DecodeState(cache, key_mask, positions[:, -1] + 1)


def decode_step(cfg: Any, params: dict, state: DecodeState, token: torch.Tensor, *,
                gather: Gather | None = None) -> tuple[torch.Tensor, DecodeState]:
    """Feed one token per row: token (B,) int64 -> (logits (B, V) float32, the advanced state)."""
    key_mask = state.key_mask
    if key_mask is not None:
        key_mask = torch.cat([key_mask, key_mask.new_ones((key_mask.shape[0], 1))], dim=1)
    h, cache = models.hidden_states(cfg, params, token[:, None], positions=state.next_positions[:, None],
                                    mask=key_mask, cache=state.cache, gather=gather)
    return _last_logits(cfg, params, h, gather), DecodeState(cache, key_mask, state.next_positions + 1)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits (B, V) -> logits with everything below the k-th largest of each row set to -inf.

    Ties with the k-th value are kept (as Hugging Face's ``TopKLogitsWarper`` does).
    """
    if k <= 0:
        raise ConfigError(f"top_k: expected a positive integer, found {k}")
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """logits (B, V) -> logits outside each row's nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``p``: a token
    is kept when the mass of the tokens ranked above it is below ``p``. The top token always stays.
    """
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"top_p: expected a probability in (0, 1], found {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.float().softmax(-1)
    mass_above = probs.cumsum(-1) - probs
    remove_sorted = mass_above >= p
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ConfigError for a negative temperature, top_k < 1 or top_p outside (0, 1]."""
    if temperature < 0:
        raise ConfigError(f"temperature: expected >= 0, found {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k: expected a positive integer, found {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p: expected a probability in (0, 1], found {top_p}")


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,) int64. ``temperature == 0`` is greedy (argmax).

    Otherwise: divide by the temperature, keep the top-k, keep the top-p nucleus, then draw from
    the softmax with ``generator`` (seeded, so a run repeats exactly).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def trim_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the first occurrence of any stop string (the stop string itself removed)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def default_eos_ids(cfg: Any) -> tuple[int, ...]:
    """The config's ``eos_token_id`` (an int, a list or None) as a tuple of ids."""
    eos = getattr(cfg, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def _is_done(new: list[int], eos_ids: frozenset[int], stop: Sequence[str],
             decode: Callable[[list[int]], str] | None) -> bool:
    """Whether the row's newest token ends generation (an eos id, or the text now holds a stop string)."""
    if new[-1] in eos_ids:
        return True
    if stop and decode is not None:
        text = decode(new)
        return any(s in text for s in stop if s)
    return False


def activation_dtype(cfg: Any, params: dict) -> torch.dtype:
    """The dtype the model computes in (that of its output weight, a tensor or leaf kind): the KV cache's dtype."""
    return models.output_weight(cfg, params).dtype


def _first_tensor(params: dict) -> torch.Tensor:
    return next(x for _, x in tree.leaves_with_paths(params) if isinstance(x, torch.Tensor))


def cast_params(params: dict, dtype: torch.dtype) -> dict:
    """Floating tensor leaves cast to ``dtype``; leaf kinds prepared with their ``astype(dtype)`` when they
    have one (LoRA casts base, A and B; NF4 dequantizes into ``dtype``), else left as they are."""
    def cast(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(dtype) if x.is_floating_point() else x
        return x.astype(dtype) if hasattr(x, "astype") else x

    return tree.map(cast, params, is_leaf=tree.is_leaf)


def _check_options(max_new_tokens: int, stop: Sequence[str], decode: Callable | None) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: expected a positive integer, found {max_new_tokens}")
    if stop and decode is None:
        raise ConfigError("generate: stop strings need a decode function (decode=tokenizer.decode)")
    if isinstance(stop, str):
        raise ConfigError(f"generate: stop must be a sequence of strings, found the string {stop!r}")


@torch.no_grad()
def generate(cfg: Any, params: dict, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_ids: Sequence[int] = (),
             stop: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None, seed: int = 0,
             dtype: torch.dtype | None = None, gather: Gather | None = None) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` for each prompt; returns the new tokens of each (B lists).

    Prompts of different lengths are left-padded into one batch; positions skip the padding, so
    each row equals its unpadded generation. A row stops after a token in ``eos_ids`` (included in
    its output) or once ``decode(new tokens)`` contains a stop string (the tokens that complete it
    are included; ``trim_stop`` cuts the text). ``dtype`` casts the tensor leaves (the activation
    and KV-cache dtype); by default the params' own dtype is kept. ``gather``: the hook for
    sharded params (``Layout.gather``; every rank of the mesh calls ``generate`` with the same
    prompts and gets the same tokens).
    """
    _check_options(max_new_tokens, stop, decode)
    check_sampling(temperature, top_k, top_p)
    if dtype is not None:
        params = cast_params(params, dtype)
    device = _first_tensor(params).device
    tokens, mask = left_pad(prompts, device=device)
    cache = models.new_cache(cfg, len(prompts), tokens.shape[1] + max_new_tokens,
                             dtype=activation_dtype(cfg, params), device=device)
    logits, state = prefill(cfg, params, tokens, mask, cache, gather=gather)
    generator = torch.Generator(device=device).manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    eos = frozenset(int(e) for e in eos_ids)
    for step in range(max_new_tokens):
        next_tokens = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        for row, token in enumerate(next_tokens.tolist()):
            if not done[row]:
                outputs[row].append(token)
                done[row] = _is_done(outputs[row], eos, stop, decode)
        if all(done) or step == max_new_tokens - 1:
            break
        logits, state = decode_step(cfg, params, state, next_tokens, gather=gather)
    return outputs


@torch.no_grad()
def bench_generate(preset: str = "llama-134m", *, batch: int = 1, prompt_len: int = 128, new_tokens: int = 64,
                   dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> dict:
    """Greedy decoding throughput on random weights of a preset (llama-tiny, llama-134m, ...).

    Returns ``{preset, batch, prompt_len, new_tokens, dtype, prefill_s, prefill_tokens_per_s,
    decode_s, decode_tokens_per_s}``; decode tokens count every row of the batch.
    """
    cfg = models.preset(preset)
    params = models.init(cfg, seed=seed, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=gen).to(device)
    cache = models.new_cache(cfg, batch, prompt_len + new_tokens, dtype=dtype, device=device)
    start = time.perf_counter()
    logits, state = prefill(cfg, params, tokens, None, cache)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits, state = decode_step(cfg, params, state, logits.argmax(-1))
    decode_s = time.perf_counter() - start
    return {
        "preset": preset, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "dtype": str(dtype).removeprefix("torch."), "prefill_s": prefill_s,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s, "decode_s": decode_s,
        "decode_tokens_per_s": batch * new_tokens / decode_s,
    }
