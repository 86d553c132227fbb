"""Generation: greedy decoding equals transformers token for token (single and left-padded batches),
KV-cache decoding equals full recomputation, sampling filters equal a direct implementation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import purefine as pf
from purefine import generate as G
from purefine import ops, tree
from purefine.errors import ConfigError, DataError
from tests.conftest import make_hf_llama

PROMPTS = [[5, 7, 9, 11, 13], [3, 4], [8, 1, 2, 60], [17]]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(transformers model with no eos, purefine cfg, params) of one tiny random Llama."""
    path = tmp_path_factory.mktemp("gen") / "hf-llama"
    model = make_hf_llama(path, seed=1)
    model.generation_config.eos_token_id = None
    cfg, params = pf.checkpoint.load_hf(path)
    return model, cfg, params


def hf_generate(model, prompts, max_new_tokens, **kwargs):
    """transformers greedy generation of a left-padded batch -> new tokens per row (pad id 0)."""
    tokens, mask = G.left_pad(prompts)
    out = model.generate(tokens, attention_mask=mask.long(), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=0, **kwargs)
    return out[:, tokens.shape[1]:].tolist()


def test_greedy_single_prompt_equals_transformers(hf_pair):
    model, cfg, params = hf_pair
    for prompt in PROMPTS:
        ours = G.generate(cfg, params, [prompt], max_new_tokens=10)
        assert ours == hf_generate(model, [prompt], 10)


def test_greedy_with_tied_embeddings_equals_transformers(tmp_path):
    model = make_hf_llama(tmp_path / "tied", seed=2, tie_word_embeddings=True)
    model.generation_config.eos_token_id = None
    cfg, params = pf.checkpoint.load_hf(tmp_path / "tied")
    assert cfg.tie_word_embeddings and "lm_head" not in params
    assert G.generate(cfg, params, PROMPTS, max_new_tokens=8) == hf_generate(model, PROMPTS, 8)


def test_greedy_left_padded_batch_equals_transformers_and_unpadded(hf_pair):
    model, cfg, params = hf_pair
    ours = G.generate(cfg, params, PROMPTS, max_new_tokens=10)
    assert ours == hf_generate(model, PROMPTS, 10)
    assert ours == [G.generate(cfg, params, [p], max_new_tokens=10)[0] for p in PROMPTS]


def test_eos_stops_each_row_like_transformers(hf_pair):
    model, cfg, params = hf_pair
    free = G.generate(cfg, params, PROMPTS, max_new_tokens=10)
    eos = free[1][3]  # a token that row 1 produces at step 3: it must stop there
    ours = G.generate(cfg, params, PROMPTS, max_new_tokens=10, eos_ids=[eos])
    ref = hf_generate(model, PROMPTS, 10, eos_token_id=eos)
    assert len(ours[1]) == 4 and ours[1][-1] == eos
    for row, ref_row in zip(ours, ref):
        cut = ref_row.index(eos) + 1 if eos in ref_row else len(ref_row)
        assert row == ref_row[:cut]


def _teacher_forced_logits(cfg, params, prompts, continuation):
    """Per step: (cached decode logits (B, V), full recomputation logits (B, V))."""
    tokens, mask = G.left_pad(prompts)
    cache = pf.models.new_cache(cfg, len(prompts), tokens.shape[1] + continuation.shape[1], dtype=torch.float32)
    logits, state = G.prefill(cfg, params, tokens, mask, cache)
    pairs = []
    for step in range(continuation.shape[1] + 1):
        full_mask = torch.cat([mask, torch.ones_like(continuation[:, :step], dtype=torch.bool)], dim=1)
        full = torch.cat([tokens, continuation[:, :step]], dim=1)
        ref = pf.models.forward(cfg, params, full, positions=G.positions_from_mask(full_mask), mask=full_mask)[:, -1]
        pairs.append((logits, ref))
        if step < continuation.shape[1]:
            logits, state = G.decode_step(cfg, params, state, continuation[:, step])
    return pairs


@pytest.mark.parametrize("prompts", [[[5, 7, 9, 11]], PROMPTS])
def test_kv_cache_decoding_equals_full_recomputation(hf_pair, prompts):
    _, cfg, params = hf_pair
    continuation = torch.randint(0, cfg.vocab_size, (len(prompts), 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pairs = _teacher_forced_logits(cfg, params, prompts, continuation)
    for step, (cached, full) in enumerate(pairs):
        assert (cached - full).abs().max().item() < 1e-5, f"step {step}"


def test_positions_skip_left_padding():
    tokens, mask = G.left_pad([[4, 5, 6], [7]], pad_id=0)
    assert tokens.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert G.positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


# --- sampling -------------------------------------------------------------------------------------

def direct_top_k(row: list[float], k: int) -> set[int]:
    kth = sorted(row, reverse=True)[min(k, len(row)) - 1]
    return {i for i, x in enumerate(row) if x >= kth}


def direct_top_p(row: list[float], p: float) -> set[int]:
    """The nucleus, by the definition: walk tokens from most to least likely until the mass reaches p."""
    z = max(row)
    weights = [math.exp(x - z) for x in row]
    total = sum(weights)
    kept, mass = set(), 0.0
    for i in sorted(range(len(row)), key=lambda i: -row[i]):
        if mass >= p:
            break
        kept.add(i)
        mass += weights[i] / total
    return kept


def kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in filtered]


def _unambiguous_p(row: list[float], p: float) -> bool:
    """False when p sits within float error of a cumulative mass (either answer would be right)."""
    probs = sorted(torch.tensor(row, dtype=torch.float64).softmax(-1).tolist(), reverse=True)
    cumulative = [sum(probs[: i + 1]) for i in range(len(probs))]
    return all(abs(c - p) > 1e-5 for c in cumulative)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(1, 40), k=st.integers(1, 50),
       p=st.floats(0.01, 1.0), scale=st.floats(0.1, 8.0))
def test_top_k_and_top_p_equal_direct_implementation(seed, vocab, k, p, scale):
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    rows = logits.tolist()
    assert kept(G.top_k_filter(logits, k)) == [direct_top_k(r, k) for r in rows]
    for row, got in zip(rows, kept(G.top_p_filter(logits, p))):
        if _unambiguous_p(row, p):
            assert got == direct_top_p(row, p)


def test_top_k_top_p_equal_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(3)) * 3
    for k in (1, 5, 50):
        assert kept(G.top_k_filter(logits, k)) == kept(TopKLogitsWarper(k)(None, logits.clone()))
    for p in (0.1, 0.5, 0.9):
        assert kept(G.top_p_filter(logits, p)) == kept(TopPLogitsWarper(p)(None, logits.clone()))


def test_sampling_frequencies_follow_the_filtered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(20000, 5)
    gen = torch.Generator().manual_seed(0)
    draws = G.sample(logits, temperature=0.7, top_k=4, generator=gen)
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    expected = torch.cat([(logits[0, :4].double() / 0.7).softmax(-1), torch.zeros(1, dtype=torch.float64)])
    assert (freq - expected).abs().max().item() < 0.015


def test_seeded_sampling_is_reproducible(hf_pair):
    _, cfg, params = hf_pair
    run = lambda seed: G.generate(cfg, params, PROMPTS, max_new_tokens=12, temperature=1.5, top_k=40,  # noqa: E731
                                  top_p=0.95, seed=seed)
    first = run(7)
    assert run(7) == first
    assert run(8) != first
    greedy = G.generate(cfg, params, PROMPTS, max_new_tokens=12)
    assert G.generate(cfg, params, PROMPTS, max_new_tokens=12, temperature=1.0, top_k=1, seed=3) == greedy


def toy_decode(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_stop_where_the_text_first_contains_them(hf_pair):
    _, cfg, params = hf_pair
    free = G.generate(cfg, params, PROMPTS, max_new_tokens=12)
    stop = toy_decode(free[0][4:6])  # spans two tokens of row 0
    ours = G.generate(cfg, params, PROMPTS, max_new_tokens=12, stop=[stop], decode=toy_decode)
    for row, full in zip(ours, free):
        n = next((n for n in range(1, len(full) + 1) if stop in toy_decode(full[:n])), len(full))
        assert row == full[:n]
    assert len(ours[0]) <= 6
    assert G.trim_stop(toy_decode(ours[0]), [stop]) == toy_decode(ours[0]).split(stop)[0]


# --- leaf kinds, options, errors, bench -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Scaled:
    """A test leaf kind: the weight ``base * scale``, computed on the activation side."""

    base: torch.Tensor
    scale: torch.Tensor

    def linear(self, x, bias=None):
        return ops.linear(x, self.base, bias) * self.scale

    def dense(self, dtype=None):
        w = self.base * self.scale
        return w if dtype is None else w.to(dtype)

    @property
    def shape(self):
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype


tree.register_node(Scaled, ("base", "scale"))


def test_leaf_kinds_generate_like_their_dense_weights(hf_pair):
    _, cfg, params = hf_pair
    wrap = lambda p, x: Scaled(x, torch.tensor(1.5)) if p.endswith("proj.weight") else x  # noqa: E731
    wrapped = tree.map_with_path(wrap, params)
    assert G.generate(cfg, wrapped, PROMPTS, max_new_tokens=8) == \
        G.generate(cfg, tree.materialize(wrapped), PROMPTS, max_new_tokens=8)


def test_dtype_option_runs_in_bfloat16(hf_pair):
    _, cfg, params = hf_pair
    out = G.generate(cfg, params, PROMPTS, max_new_tokens=5, dtype=torch.bfloat16)
    assert out == G.generate(cfg, G.cast_params(params, torch.bfloat16), PROMPTS, max_new_tokens=5)
    assert [len(r) for r in out] == [5] * len(PROMPTS)


def test_bad_options_raise_purefine_errors(hf_pair):
    _, cfg, params = hf_pair
    with pytest.raises(DataError, match="prompt 1 is empty"):
        G.generate(cfg, params, [[1], []], max_new_tokens=2)
    with pytest.raises(ConfigError, match="decode"):
        G.generate(cfg, params, [[1]], max_new_tokens=2, stop=["x"])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        G.generate(cfg, params, [[1]], max_new_tokens=0)
    with pytest.raises(ConfigError, match="top_p"):
        G.generate(cfg, params, [[1]], max_new_tokens=2, temperature=1.0, top_p=1.5)


def test_bench_generate_reports_throughput():
    result = G.bench_generate("llama-debug", batch=2, prompt_len=8, new_tokens=4)
    assert result["preset"] == "llama-debug" and result["new_tokens"] == 4
    assert result["decode_tokens_per_s"] > 0 and result["prefill_tokens_per_s"] > 0
