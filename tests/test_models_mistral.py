"""What is Mistral's own: how config.json's ``sliding_window`` reads (null, missing, present), its
presets and config errors. Parity (windows shorter than the sequence, padding), the window's effect,
KV-cache decoding past the window, packing, remat and round trips run for every family in
``test_families.py``."""

from __future__ import annotations

import json

import pytest

import purefine as pf
from purefine.errors import ConfigError


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
