"""What is GPT-2's own: the Conv1D layout ((in, out) on disk, (out, in) in params), legacy checkpoint
names and mask buffers, its init, presets and config errors, and LoRA on Conv1D weights as peft's
``fan_in_fan_out``. Parity, KV cache, round trips (sharded) and adapters both ways run for every
family in ``test_families.py``."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import purefine as pf
from purefine.errors import ConfigError
from tests.family_fixtures import make_hf


def test_conv1d_weights_are_out_in_in_params_and_in_out_on_disk(tmp_path):
    model = make_hf("gpt2", tmp_path / "src")
    cfg, params = pf.checkpoint.load_hf(tmp_path / "src")
    c_attn = params["transformer"]["h"][0]["attn"]["c_attn"]["weight"]
    assert c_attn.shape == (3 * 32, 32) and torch.equal(c_attn, model.transformer.h[0].attn.c_attn.weight.T)
    assert params["transformer"]["h"][1]["mlp"]["c_fc"]["weight"].shape == (128, 32)
    x = torch.randn(3, 32)
    torch.testing.assert_close(pf.ops.linear(x, c_attn, params["transformer"]["h"][0]["attn"]["c_attn"]["bias"]),
                               model.transformer.h[0].attn.c_attn(x))
    pf.checkpoint.save_hf(tmp_path / "out", cfg, params)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.get_slice("transformer.h.0.attn.c_attn.weight").get_shape() == [32, 96]
        assert f.get_slice("transformer.h.1.mlp.c_proj.weight").get_shape() == [128, 32]
        assert "lm_head.weight" not in f.keys()


def test_legacy_checkpoint_names_and_mask_buffers_load(tmp_path):
    model = make_hf("gpt2", tmp_path / "src", n_layer=1)
    legacy = {}
    for name, t in model.state_dict().items():
        if name != "lm_head.weight":
            legacy[name.removeprefix("transformer.")] = t.contiguous()
    legacy["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))  # the causal-mask buffer old uploads carry
    (tmp_path / "old").mkdir()
    save_file(legacy, tmp_path / "old" / "model.safetensors")
    (tmp_path / "old" / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    cfg, params = pf.checkpoint.load_hf(tmp_path / "old")
    tokens = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert (pf.models.forward(cfg, params, tokens) - model(tokens).logits).abs().max() < 1e-4


def test_init_has_unit_layer_norms_and_scaled_residual_projections():
    cfg = pf.models.preset("gpt2-debug")
    params = pf.models.init(cfg, seed=2)
    assert torch.equal(params["transformer"]["h"][0]["ln_1"]["weight"], torch.ones(64))
    std = params["transformer"]["h"][0]["attn"]["c_proj"]["weight"].std().item()
    assert 0.5 * 0.02 / 2 < std < 1.5 * 0.02 / 2  # residual projections scaled by 1/sqrt(2 n_layer)


def test_presets_and_bad_input():
    assert pf.models.preset("gpt2").num_params == 124_439_808
    assert pf.models.preset("gpt2-medium").num_params == 354_823_168
    cfg = pf.models.preset("gpt2-debug")
    params = pf.models.init(cfg, seed=0)
    with pytest.raises(ConfigError, match="past n_positions"):
        pf.models.forward(cfg, params, torch.zeros(1, cfg.n_positions + 1, dtype=torch.long))
    with pytest.raises(ConfigError, match="activation"):
        pf.models.family("gpt2").config(activation_function="swish2")
    with pytest.raises(ConfigError, match="multiple of n_head"):
        pf.models.family("gpt2").config(n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match="add_cross_attention"):
        pf.models.config_from_hf({"model_type": "gpt2", "add_cross_attention": True})


def test_lora_on_conv1d_weights_equals_peft_fan_in_fan_out(tmp_path):
    peft = pytest.importorskip("peft")
    lora = pytest.importorskip("purefine.lora")
    gpt2 = pf.models.family("gpt2")
    model = make_hf("gpt2", tmp_path)
    cfg, params = pf.checkpoint.load_hf(tmp_path)
    params = lora.apply(params, rank=4, alpha=8, where=list(gpt2.linear_layers), seed=0)
    gen = torch.Generator().manual_seed(1)
    params = pf.tree.map_with_path(lambda p, x: torch.randn(x.shape, generator=gen) * 0.1 if p.endswith("lora_b") else x, params)
    ref = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(gpt2.linear_layers),
                                                     fan_in_fan_out=True))
    flat = pf.tree.flatten(params)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".lora_" in name:  # peft's A (r, in) and B (out, r) are purefine's lora_a / lora_b as they are
                ours = name.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".weight.lora_a")
                p.copy_(flat[ours.replace(".lora_B.default.weight", ".weight.lora_b")])
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert (pf.models.forward(cfg, params, tokens) - ref(tokens).logits).abs().max() < 1e-4
