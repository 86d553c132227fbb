"""Llama-3.1 / 3.2 presets: published sizes, and their rope scaling and tied head against transformers."""

from __future__ import annotations

import dataclasses

import torch

import purefine as pf


def test_presets_have_published_sizes():
    expected = {"llama3-8b": 8_030_261_248, "llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496,
                "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824}
    for name, n in expected.items():
        assert pf.models.preset(name).num_params == n, name
    assert pf.models.preset("llama3.2-1b").tie_word_embeddings and not pf.models.preset("llama3.1-8b").tie_word_embeddings


def test_scaled_rope_and_tied_head_match_transformers_at_long_positions():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dataclasses.replace(pf.models.preset("llama3.2-1b"), vocab_size=96, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    assert model.config.tie_word_embeddings and model.config.rope_parameters["rope_type"] == "llama3"
    params = pf.tree.unflatten({n: p.detach() for n, p in model.named_parameters()})
    assert "lm_head" not in params
    tokens = torch.randint(0, 96, (2, 12))
    positions = torch.arange(20000, 20000 + 12 * 997, 997).expand(2, 12)  # past the 8K original context: scaling matters
    with torch.no_grad():
        ref = model(tokens, position_ids=positions).logits
        out = pf.models.forward(cfg, params, tokens, positions=positions)
        unscaled = pf.models.forward(dataclasses.replace(cfg, rope_scaling=None), params, tokens, positions=positions)
    assert (out - ref).abs().max() < 1e-4
    assert (unscaled - ref).abs().max() > 1e-4
