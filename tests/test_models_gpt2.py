"""The pure GPT-2 forward against transformers.GPT2LMHeadModel, and its Conv1D checkpoint layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import purefine as pf
from purefine.errors import ConfigError


def make_hf_gpt2(path, *, seed=0, **kw):
    """A random tiny transformers GPT-2 saved to ``path`` (LayerNorms and biases random too)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    base = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(GPT2Config(**{**base, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path)
    return model


@st.composite
def gpt2_configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    return dict(n_embd=heads * draw(st.sampled_from([4, 8])), n_head=heads, n_layer=draw(st.integers(1, 3)),
                n_inner=draw(st.sampled_from([None, 12, 40])), vocab_size=draw(st.integers(16, 64)),
                activation_function=draw(st.sampled_from(["gelu_new", "gelu", "relu"])),
                tie_word_embeddings=draw(st.booleans()), scale_attn_weights=draw(st.booleans()),
                scale_attn_by_inverse_layer_idx=draw(st.booleans()))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kw=gpt2_configs(), seed=st.integers(0, 2**16))
def test_logits_match_transformers_fp32(tmp_path_factory, kw, seed):
    path = tmp_path_factory.mktemp("hf")
    model = make_hf_gpt2(path, seed=seed, **kw)
    cfg, params = pf.checkpoint.load_hf(path)
    tokens = torch.randint(0, kw["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(seed))
    attn = torch.ones(2, 10, dtype=torch.long)
    attn[1, :4] = 0
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        assert (pf.models.forward(cfg, params, tokens) - model(tokens).logits).abs().max() < 1e-4
        ref = model(tokens, attention_mask=attn, position_ids=positions).logits
        out = pf.models.forward(cfg, params, tokens, mask=attn.bool(), positions=positions)
    assert (out - ref)[attn.bool()].abs().max() < 1e-4


def test_conv1d_weights_are_out_in_in_params_and_in_out_on_disk(tmp_path):
    model = make_hf_gpt2(tmp_path / "src")
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


def test_transformers_round_trip_and_bit_exact_save_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_hf_gpt2(tmp_path / "src")
    cfg, params = pf.checkpoint.load_hf(tmp_path / "src")
    pf.checkpoint.save_hf(tmp_path / "out", cfg, params, max_shard_bytes=20_000)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)
    cfg2, back = pf.checkpoint.load_hf(tmp_path / "out")
    assert cfg2 == cfg
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(pf.tree.leaves_with_paths(back), pf.tree.leaves_with_paths(params)))


def test_legacy_checkpoint_names_and_mask_buffers_load(tmp_path):
    model = make_hf_gpt2(tmp_path / "src", n_layer=1)
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


def test_kv_cache_decoding_equals_full_forward():
    cfg = pf.models.preset("gpt2-debug")
    params = pf.models.init(cfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        full = pf.models.forward(cfg, params, tokens)
        cache = pf.models.new_cache(cfg, 2, 12, dtype=torch.float32)
        steps = []
        for t0, t1 in ((0, 5), (5, 6), (6, 9)):
            h, cache = pf.models.hidden_states(cfg, params, tokens[:, t0:t1], cache=cache)
            steps.append(h)
        logits = pf.ops.linear(torch.cat(steps, 1), pf.models.output_weight(cfg, params))
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_loss_remat_and_init():
    cfg = pf.models.preset("gpt2-debug")
    params = pf.tree.map(lambda x: x.requires_grad_(), pf.models.init(cfg, seed=2))
    assert torch.equal(params["transformer"]["h"][0]["ln_1"]["weight"], torch.ones(64))
    std = params["transformer"]["h"][0]["attn"]["c_proj"]["weight"].std().item()
    assert 0.5 * 0.02 / 2 < std < 1.5 * 0.02 / 2  # residual projections scaled by 1/sqrt(2 n_layer)
    batch = {"tokens": torch.randint(0, cfg.vocab_size, (2, 8)), "labels": torch.randint(0, cfg.vocab_size, (2, 8))}
    leaves = [x for _, x in pf.tree.leaves_with_paths(params)]
    grads = []
    for remat in (False, True):
        loss, n = pf.models.loss_fn(cfg, remat=remat, chunk_size=5)(params, batch)
        grads.append(torch.autograd.grad(loss / n, leaves))
    logits = pf.models.forward(cfg, params, batch["tokens"])
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch["labels"].reshape(-1))
    torch.testing.assert_close(loss / n, ref)
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


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
    model = make_hf_gpt2(tmp_path)
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
