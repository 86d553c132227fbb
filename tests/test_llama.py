"""What is Llama's own: published preset sizes and config errors. Parity (rope scaling kinds included),
padding, KV cache, bf16, remat, init, the ``functional_call`` bridge and round trips run for every
family in ``test_families.py``; Llama-3.1 / 3.2 rope scaling at long positions in
``test_models_llama3.py``."""

from __future__ import annotations

import pytest

import purefine as pf
from purefine.errors import ConfigError


def test_presets_have_published_sizes():
    expected = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192,
                "llama3-8b": 8_030_261_248}
    for name, n in expected.items():
        assert pf.models.preset(name).num_params == n


def test_bad_configs_are_errors():
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        pf.models.family("llama").config(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="unknown name 'llama2-8b'"):
        pf.models.preset("llama2-8b")
    with pytest.raises(ConfigError, match="hidden_act"):
        pf.models.config_from_hf({"model_type": "llama", "hidden_act": "gelu"})

