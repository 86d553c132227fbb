"""What is Qwen3's own: head_dim its own field (128 by default, as transformers), ``attention_bias`` a
switch over all four projections (unlike Qwen2's fixed q/k/v biases), the per-head q/k norms,
preset sizes. Parity (head_dim apart from hidden / heads, windowed layers), decoding, round trips and
adapters run for every family in ``test_families.py``."""

from __future__ import annotations

import pytest

import purefine as pf
from purefine.errors import ConfigError

Config = pf.models.family("qwen3").config


def test_head_dim_defaults_to_128_as_transformers():
    from transformers import Qwen3Config

    kw = dict(vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    assert Config(**kw).head_dim == Qwen3Config(**kw).head_dim == 128  # not hidden_size / heads (16)
    d = {"model_type": "qwen3", **kw}
    assert pf.models.config_from_hf(d).head_dim == 128
    cfg = pf.models.config_from_hf({**d, "head_dim": 8})
    assert cfg.head_dim == 8 and cfg.param_shapes()["model.layers.0.self_attn.q_proj.weight"] == (32, 64)


@pytest.mark.parametrize("bias", [False, True])
def test_attention_bias_switches_biases_on_all_four_projections(bias):
    cfg = Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, attention_bias=bias)
    shapes = cfg.param_shapes()
    biases = sorted(n.split(".")[-2] for n in shapes if n.endswith(".bias"))
    assert biases == (sorted(["q_proj", "k_proj", "v_proj", "o_proj"] * 2) if bias else [])
    assert shapes["model.layers.1.self_attn.q_norm.weight"] == shapes["model.layers.1.self_attn.k_norm.weight"] == (8,)
    assert cfg.to_hf()["attention_bias"] is bias and pf.models.config_from_hf(cfg.to_hf()) == cfg
    with pytest.raises(ConfigError, match="mlp_bias"):
        Config(mlp_bias=True)


def test_presets_have_published_sizes():
    expected = {"qwen3-0.6b": 596_049_920, "qwen3-1.7b": 1_720_574_976, "qwen3-4b": 4_022_468_096,
                "qwen3-8b": 8_190_735_360}
    for name, n in expected.items():
        assert pf.models.preset(name).num_params == n, name
    assert pf.models.preset("qwen3-0.6b").tie_word_embeddings and not pf.models.preset("qwen3-8b").tie_word_embeddings
