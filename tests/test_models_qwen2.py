"""What is Qwen2's own: q/k/v biases (not a switch), which layers slide (``use_sliding_window``,
``max_window_layers``, ``layer_types``), preset sizes and config errors. Parity with per-layer
windows, padding, KV cache and round trips run for every family in ``test_families.py``."""

from __future__ import annotations

import pytest

import purefine as pf
from purefine.errors import ConfigError


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


def test_presets_have_published_sizes_and_bad_configs_fail():
    expected = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512}
    for name, n in expected.items():
        assert pf.models.preset(name).num_params == n
    assert pf.models.preset("qwen2.5-0.5b").tie_word_embeddings
    assert not pf.models.preset("qwen2.5-7b").tie_word_embeddings
    Config = pf.models.family("qwen2").config
    with pytest.raises(ConfigError, match="layer_types must list 2 entries"):
        Config(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, layer_types=("full_attention",))
    with pytest.raises(ConfigError, match="not switches in this family"):
        Config(attention_bias=True)


@pytest.mark.parametrize("use_sliding_window", [True, False])
def test_explicit_layer_types_slide_only_with_use_sliding_window_as_in_transformers(use_sliding_window):
    from transformers import Qwen2Config

    hf = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2,
                     use_sliding_window=use_sliding_window, sliding_window=3,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    cfg = pf.models.config_from_hf(hf.to_dict())
    hf_windows = [hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]
    assert [cfg.layer_window(i) for i in range(3)] == hf_windows == ([3, None, 3] if use_sliding_window else [None] * 3)
