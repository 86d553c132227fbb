"""What is Phi-3's own: ``partial_rotary_factor`` (top level or in ``rope_parameters``), LongRoPE
refused with an error naming it, no head_dim field, the fused projections as LoRA / QLoRA targets
under peft's names, no tensor-parallel plan, preset sizes. Parity (partial rotary, window), decoding,
round trips, adapters and CLI training run for every family in ``test_families.py``."""

from __future__ import annotations

import json
import re

import pytest

import purefine as pf
from purefine.errors import CheckpointError, ConfigError

Config = pf.models.family("phi3").config
HF = {"model_type": "phi3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
      "num_attention_heads": 4, "num_key_value_heads": 2}


def test_partial_rotary_factor_reads_from_either_place_and_writes_where_transformers_reads_it():
    from transformers import Phi3Config

    top = pf.models.config_from_hf({**HF, "partial_rotary_factor": 0.5})
    nested = pf.models.config_from_hf({**HF, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                                                                 "partial_rotary_factor": 0.5}})
    assert top.partial_rotary_factor == nested.partial_rotary_factor == 0.5 and nested.rope_theta == 500.0
    assert top.rotary_dim == 4 and top.head_dim == 8
    assert pf.models.config_from_hf(HF).rotary_dim == 8
    d = top.to_hf()
    hf = Phi3Config(**{k: v for k, v in d.items() if k != "architectures"})
    assert hf.rope_parameters["partial_rotary_factor"] == 0.5
    assert pf.models.config_from_hf(d) == top
    with pytest.raises(ConfigError, match="partial_rotary_factor must be in"):
        Config(hidden_size=32, num_attention_heads=4, partial_rotary_factor=0.375)  # 3 of 8 dims: odd
    with pytest.raises(ConfigError, match="partial_rotary_factor must be in"):
        Config(hidden_size=32, num_attention_heads=4, partial_rotary_factor=1.5)


@pytest.mark.parametrize("rope", [{"rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [1.0]}},
                                  {"rope_scaling": {"rope_type": "longrope"}},
                                  {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}])
def test_longrope_is_refused_with_an_error_naming_it(rope, tmp_path):
    with pytest.raises(ConfigError, match="config.json: rope_scaling: LongRoPE .* not supported; use a 4K"):
        pf.models.config_from_hf({**HF, **rope})
    (tmp_path / "config.json").write_text(json.dumps({**HF, **rope}))
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "config.json")) + ".*LongRoPE"):
        pf.checkpoint.read_config(tmp_path)


def test_no_head_dim_field_and_no_biases():
    plain = pf.models.config_from_hf(HF)  # no field of Phi3Config: hidden_size / heads
    assert plain.head_dim == 8 and "head_dim" not in plain.to_hf()
    cfg = pf.models.config_from_hf({**HF, "head_dim": 16})  # transformers honours one given (getattr), so do we
    assert cfg.head_dim == 16 and cfg.to_hf()["head_dim"] == 16
    with pytest.raises(ConfigError, match="attention_bias / mlp_bias are not part of this family"):
        Config(attention_bias=True)


def test_fused_projections_are_the_lora_and_qlora_targets_and_there_is_no_tp_plan():
    cfg = pf.models.preset("phi3-debug")
    fam = pf.models.family(cfg)
    assert pf.models.lora_targets(cfg) == ["qkv_proj"]
    assert pf.models.lora_targets(cfg, "all-linear") == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    pattern = pf.models.quantize_pattern(cfg)
    quantized = [n for n in cfg.param_shapes() if re.fullmatch(pattern, n)]
    assert len(quantized) == 4 * cfg.num_hidden_layers and not any("embed" in n or "lm_head" in n for n in quantized)
    assert dict(fam.tp_plan) == {}  # a column split of qkv_proj would cut across q / k / v
    assert [cfg.layer_window(i) for i in range(cfg.num_hidden_layers)] == [cfg.sliding_window] * cfg.num_hidden_layers


def test_presets_have_published_sizes():
    assert pf.models.preset("phi3-mini-4k").num_params == 3_821_079_552
    assert pf.models.preset("phi3-medium-4k").num_params == 13_960_238_080
    assert pf.models.preset("phi3-mini-4k").sliding_window == 2047
