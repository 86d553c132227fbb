"""What is Gemma-2's own: the query_pre_attn_scalar score scale, the default alternation of sliding and
full layers (as transformers), config.json's explicit nulls, the refused bidirectional variant,
zero-initialized (1 + w) norms, preset sizes and config errors. Parity with soft-caps and alternating
windows, decoding, round trips and adapters run for every family in ``test_families.py``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import purefine as pf
from purefine.errors import ConfigError

Config = pf.models.family("gemma2").config
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16)


def test_scores_scale_by_query_pre_attn_scalar_not_head_dim():
    cfg = dataclasses.replace(pf.models.preset("gemma2-debug"), query_pre_attn_scalar=24.0)
    assert cfg.attention_scale == 24.0 ** -0.5 and cfg.head_dim == 32
    gen = torch.Generator().manual_seed(0)
    params = pf.tree.map(lambda x: torch.randn(x.shape, generator=gen) * 0.3, pf.models.init(cfg, seed=0))
    tokens = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        ours = pf.models.forward(cfg, params, tokens)
        by_head_dim = pf.models.forward(dataclasses.replace(cfg, query_pre_attn_scalar=32.0), params, tokens)
    assert (ours - by_head_dim).abs().max() > 1e-3


def test_layer_types_alternate_from_a_sliding_first_layer_as_transformers():
    from transformers import Gemma2Config

    for layers in (1, 4, 5):
        cfg = Config(**SMALL, num_hidden_layers=layers, sliding_window=3)
        assert list(cfg.layer_types) == Gemma2Config(**SMALL, num_hidden_layers=layers).layer_types
        assert [cfg.layer_window(i) for i in range(layers)] == [3 if i % 2 == 0 else None for i in range(layers)]
    d = pf.models.preset("gemma2-debug").to_hf()
    del d["layer_types"]
    assert pf.models.config_from_hf(d).layer_types == ("sliding_attention", "full_attention", "sliding_attention")


def test_config_json_reads_like_transformers():
    from transformers import Gemma2Config

    d = pf.models.preset("gemma2-2b").to_hf()
    assert d["query_pre_attn_scalar"] == 256 and isinstance(d["query_pre_attn_scalar"], int)  # transformers 5: int
    assert Gemma2Config(**{k: v for k, v in d.items() if k != "architectures"}).query_pre_attn_scalar == 256
    nulls = {"sliding_window": None, "final_logit_softcapping": None, "attn_logit_softcapping": None}
    cfg = pf.models.config_from_hf({**d, **nulls})
    assert (cfg.sliding_window, cfg.final_logit_softcapping, cfg.attn_logit_softcapping) == (None, None, None)
    assert cfg.logit_softcap is None and cfg.attention_softcap is None and cfg.layer_window(0) is None
    missing = {k: v for k, v in d.items() if k not in nulls}
    assert pf.models.config_from_hf(missing).final_logit_softcapping == Gemma2Config().final_logit_softcapping == 30.0


def test_bidirectional_gemma_is_refused():
    d = pf.models.preset("gemma2-debug").to_hf()
    with pytest.raises(ConfigError, match="config.json: use_bidirectional_attention: purefine's gemma2 is causal"):
        pf.models.config_from_hf({**d, "use_bidirectional_attention": True})
    assert pf.models.config_from_hf({**d, "use_bidirectional_attention": False}) == pf.models.preset("gemma2-debug")


def test_norms_start_at_zero_for_their_one_plus_w_scale():
    cfg = pf.models.preset("gemma2-debug")
    flat = pf.tree.flatten(pf.models.init(cfg, seed=0))
    norms = [n for n in flat if n.endswith("norm.weight")]
    assert len(norms) == 4 * cfg.num_hidden_layers + 1 and all(not flat[n].any() for n in norms)
    assert flat["model.embed_tokens.weight"].std() > 0.01 and "lm_head.weight" not in flat  # tied


def test_presets_have_published_sizes_and_bad_configs_fail():
    expected = {"gemma2-2b": 2_614_341_888, "gemma2-9b": 9_241_705_984, "gemma2-27b": 27_227_128_320}
    for name, n in expected.items():
        assert pf.models.preset(name).num_params == n, name
    with pytest.raises(ConfigError, match="layer_types must list 2 entries"):
        Config(**SMALL, num_hidden_layers=2, layer_types=("full_attention",))
    with pytest.raises(ConfigError, match="layer_types"):
        Config(**SMALL, num_hidden_layers=1, layer_types=("chunked_attention",))
    with pytest.raises(ConfigError, match="final_logit_softcapping must be positive"):
        Config(**SMALL, final_logit_softcapping=0.0)
    with pytest.raises(ConfigError, match="mlp_bias"):
        Config(**SMALL, mlp_bias=True)
    with pytest.raises(ConfigError, match="hidden_activation"):
        Config(**SMALL, hidden_activation="swish2")
