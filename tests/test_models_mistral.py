"""The pure Mistral forward (sliding window) against transformers.MistralForCausalLM."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import purefine as pf
from purefine.errors import ConfigError


def make_hf_mistral(path, *, seed=0, **kw):
    """A random tiny transformers Mistral saved to ``path`` (every tensor random, not HF's init)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, sliding_window=3)
    model = MistralForCausalLM(MistralConfig(**{**base, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path)
    return model


def left_padded(b, t, pad):
    attn = torch.ones(b, t, dtype=torch.long)
    attn[-1, :pad] = 0
    return attn, (attn.cumsum(-1) - 1).clamp(min=0)


@st.composite
def mistral_configs(draw):
    kv = draw(st.sampled_from([1, 2]))
    heads = kv * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8]))
    return dict(hidden_size=heads * head_dim * draw(st.sampled_from([1, 2])), num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=head_dim, intermediate_size=draw(st.integers(8, 40)),
                num_hidden_layers=draw(st.integers(1, 2)), vocab_size=draw(st.integers(16, 64)),
                sliding_window=draw(st.sampled_from([None, 1, 2, 3, 5, 64])), tie_word_embeddings=draw(st.booleans()))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kw=mistral_configs(), seed=st.integers(0, 2**16), pad=st.integers(0, 4))
def test_logits_match_transformers_fp32(tmp_path_factory, kw, seed, pad):
    path = tmp_path_factory.mktemp("hf")
    model = make_hf_mistral(path, seed=seed, **kw)
    cfg, params = pf.checkpoint.load_hf(path)
    assert cfg.sliding_window == kw["sliding_window"]
    tokens = torch.randint(0, kw["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(seed))
    attn, positions = left_padded(2, 11, pad)
    with torch.no_grad():
        assert (pf.models.forward(cfg, params, tokens) - model(tokens).logits).abs().max() < 1e-4
        ref = model(tokens, attention_mask=attn, position_ids=positions).logits
        out = pf.models.forward(cfg, params, tokens, mask=attn.bool(), positions=positions)
    assert (out - ref)[attn.bool()].abs().max() < 1e-4


def test_window_changes_the_logits(tmp_path):
    make_hf_mistral(tmp_path, sliding_window=2)
    cfg, params = pf.checkpoint.load_hf(tmp_path)
    tokens = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        windowed = pf.models.forward(cfg, params, tokens)
        full = pf.models.forward(dataclasses.replace(cfg, sliding_window=None), params, tokens)
    assert torch.equal(windowed[:, :2], full[:, :2])  # the first two queries see all their keys anyway
    assert (windowed[:, 2:] - full[:, 2:]).abs().max() > 1e-3


def test_kv_cache_decoding_past_the_window_equals_full_forward():
    cfg = pf.models.preset("mistral-debug")
    params = pf.models.init(cfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        full = pf.models.forward(cfg, params, tokens)
        cache = pf.models.new_cache(cfg, 2, 16, dtype=torch.float32)
        h, cache = pf.models.hidden_states(cfg, params, tokens[:, :6], cache=cache)
        steps = [h]
        for t in range(6, 10):
            h, cache = pf.models.hidden_states(cfg, params, tokens[:, t : t + 1], cache=cache)
            steps.append(h)
        logits = torch.nn.functional.linear(torch.cat(steps, 1), params["lm_head"]["weight"])
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_packed_segments_are_windowed_like_separate_sequences():
    cfg = pf.models.preset("mistral-debug")  # window 4
    params = pf.models.init(cfg, seed=2)
    a, b = torch.randint(0, cfg.vocab_size, (1, 7)), torch.randint(0, cfg.vocab_size, (1, 6))
    segments = torch.tensor([[0] * 7 + [1] * 6])
    positions = torch.cat([torch.arange(7), torch.arange(6)])[None]
    with torch.no_grad():
        packed = pf.models.forward(cfg, params, torch.cat([a, b], 1), positions=positions,
                                   mask=pf.ops.block_causal_mask(segments))
        separate = torch.cat([pf.models.forward(cfg, params, a), pf.models.forward(cfg, params, b)], 1)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


def test_remat_and_gather_change_nothing():
    cfg = pf.models.preset("mistral-debug")
    params = pf.tree.map(lambda x: x.requires_grad_(), pf.models.init(cfg, seed=3))
    batch = {"tokens": torch.randint(0, cfg.vocab_size, (2, 9)), "labels": torch.randint(0, cfg.vocab_size, (2, 9))}
    leaves = [x for _, x in pf.tree.leaves_with_paths(params)]
    calls = []
    gather = lambda p: calls.append(1) or p  # noqa: E731
    grads = []
    for remat, g in ((False, None), (True, gather)):
        loss, n = pf.models.loss_fn(cfg, remat=remat, gather=g)(params, batch)
        grads.append(torch.autograd.grad(loss / n, leaves))
    assert len(calls) >= cfg.num_hidden_layers
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_transformers_round_trip_and_bit_exact_save_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_hf_mistral(tmp_path / "src", sliding_window=3)
    cfg, params = pf.checkpoint.load_hf(tmp_path / "src")
    pf.checkpoint.save_hf(tmp_path / "out", cfg, params)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert again.config.sliding_window == 3 and type(again).__name__ == "MistralForCausalLM"
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)
    cfg2, back = pf.checkpoint.load_hf(tmp_path / "out")
    assert cfg2 == cfg
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(pf.tree.leaves_with_paths(back), pf.tree.leaves_with_paths(params)))


def test_config_reads_hf_window_semantics():
    d = pf.models.preset("mistral-debug").to_hf()
    assert "attention_bias" not in d and d["sliding_window"] == 4
    assert pf.models.config_from_hf({**d, "sliding_window": None}).sliding_window is None
    without = {k: v for k, v in d.items() if k != "sliding_window"}
    assert pf.models.config_from_hf(without).sliding_window == 4096  # transformers' default
    assert pf.models.config_from_hf(json.loads(json.dumps(d))) == pf.models.preset("mistral-debug")


def test_presets_and_bad_configs():
    assert pf.models.preset("mistral-7b").num_params == 7_241_732_096
    assert pf.models.preset("mistral-7b").sliding_window == 4096
    assert pf.models.preset("mistral-7b-v0.3").sliding_window is None
    with pytest.raises(ConfigError, match="sliding_window must be null or a positive integer"):
        pf.models.family("mistral").config(sliding_window=0)
    with pytest.raises(ConfigError, match="attention_bias"):
        pf.models.family("mistral").config(attention_bias=True)
