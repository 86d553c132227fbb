"""The pure Qwen2 forward (q/k/v biases, per-layer windows, tied embeddings) against transformers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import purefine as pf
from purefine.errors import ConfigError


def make_hf_qwen2(path, *, seed=0, **kw):
    """A random tiny transformers Qwen2 saved to ``path`` (biases random too, not HF's zeros)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(Qwen2Config(**{**base, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path)
    return model


@st.composite
def qwen2_configs(draw):
    kv = draw(st.sampled_from([1, 2]))
    heads = kv * draw(st.sampled_from([1, 2, 3]))
    layers = draw(st.integers(1, 3))
    return dict(hidden_size=heads * draw(st.sampled_from([4, 8])), num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=draw(st.integers(8, 40)), num_hidden_layers=layers, vocab_size=draw(st.integers(16, 64)),
                tie_word_embeddings=draw(st.booleans()), use_sliding_window=draw(st.booleans()),
                sliding_window=draw(st.sampled_from([1, 3, 6])), max_window_layers=draw(st.integers(0, layers)),
                rope_theta=draw(st.sampled_from([10000.0, 1000000.0])))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kw=qwen2_configs(), seed=st.integers(0, 2**16))
def test_logits_match_transformers_fp32(tmp_path_factory, kw, seed):
    path = tmp_path_factory.mktemp("hf")
    model = make_hf_qwen2(path, seed=seed, **kw)
    cfg, params = pf.checkpoint.load_hf(path)
    assert list(cfg.layer_types) == model.config.layer_types
    tokens = torch.randint(0, kw["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(seed))
    attn = torch.ones(2, 10, dtype=torch.long)
    attn[1, :3] = 0
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        assert (pf.models.forward(cfg, params, tokens) - model(tokens).logits).abs().max() < 1e-4
        ref = model(tokens, attention_mask=attn, position_ids=positions).logits
        out = pf.models.forward(cfg, params, tokens, mask=attn.bool(), positions=positions)
    assert (out - ref)[attn.bool()].abs().max() < 1e-4


def test_biases_on_qkv_only_and_tied_head():
    cfg = pf.models.preset("qwen2-debug")
    shapes = pf.models.param_shapes(cfg)
    biases = sorted(n.split(".")[-2] for n in shapes if n.endswith(".bias"))
    assert biases == sorted(["k_proj", "q_proj", "v_proj"] * cfg.num_hidden_layers)
    assert "lm_head.weight" not in shapes
    params = pf.models.init(cfg, seed=0)
    assert pf.models.output_weight(cfg, params) is params["model"]["embed_tokens"]["weight"]


def test_windowed_layers_follow_max_window_layers():
    cfg = pf.models.family("qwen2").config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=32, num_hidden_layers=4, vocab_size=64,
                                            use_sliding_window=True, sliding_window=3, max_window_layers=2)
    assert [cfg.layer_window(i) for i in range(4)] == [None, None, 3, 3]
    off = pf.models.family("qwen2").config(hidden_size=32, num_attention_heads=4, intermediate_size=32, vocab_size=64,
                                            num_hidden_layers=2, use_sliding_window=False, sliding_window=3)
    assert [off.layer_window(i) for i in range(2)] == [None, None]


def test_transformers_round_trip_and_bit_exact_save_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_hf_qwen2(tmp_path / "src", use_sliding_window=True, sliding_window=2, max_window_layers=1)
    cfg, params = pf.checkpoint.load_hf(tmp_path / "src")
    pf.checkpoint.save_hf(tmp_path / "out", cfg, params)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert again.config.layer_types == ["full_attention", "sliding_attention"]
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)
        assert (pf.models.forward(cfg, params, tokens) - model(tokens).logits).abs().max() < 1e-4
    cfg2, back = pf.checkpoint.load_hf(tmp_path / "out")
    assert cfg2 == cfg
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(pf.tree.leaves_with_paths(back), pf.tree.leaves_with_paths(params)))


def test_kv_cache_decoding_equals_full_forward():
    cfg = pf.models.preset("qwen2-debug")
    params = pf.models.init(cfg, seed=1)
    params = pf.tree.map_with_path(lambda p, x: torch.randn_like(x) if p.endswith(".bias") else x, params)
    tokens = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        full = pf.models.forward(cfg, params, tokens)
        cache = pf.models.new_cache(cfg, 1, 8, dtype=torch.float32)
        h, cache = pf.models.hidden_states(cfg, params, tokens[:, :5], cache=cache)
        h2, cache = pf.models.hidden_states(cfg, params, tokens[:, 5:], cache=cache)
        logits = pf.ops.linear(torch.cat([h, h2], 1), pf.models.output_weight(cfg, params))
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_presets_have_published_sizes_and_bad_configs_fail():
    expected = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512}
    for name, n in expected.items():
        assert pf.models.preset(name).num_params == n
    assert pf.models.preset("qwen2.5-0.5b").tie_word_embeddings and not pf.models.preset("qwen2.5-7b").tie_word_embeddings
    Config = pf.models.family("qwen2").config
    with pytest.raises(ConfigError, match="layer_types must list 2 entries"):
        Config(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, layer_types=("full_attention",))
    with pytest.raises(ConfigError, match="not switches in this family"):
        Config(attention_bias=True)
