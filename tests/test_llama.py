"""The pure Llama forward against transformers.LlamaForCausalLM on random tiny configs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import purefine as pf
from purefine.errors import ConfigError
from purefine.models.module import as_function
from tests.conftest import make_hf_llama


@st.composite
def llama_configs(draw):
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    scaling = draw(st.sampled_from([None, "llama3", "linear"]))
    rope_scaling = {
        None: None,
        "linear": {"rope_type": "linear", "factor": 2.0},
        "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32},
    }[scaling]
    return dict(
        hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=draw(st.integers(8, 48)), num_hidden_layers=draw(st.integers(1, 3)),
        vocab_size=draw(st.integers(16, 80)), rope_theta=draw(st.sampled_from([100.0, 10000.0, 500000.0])),
        tie_word_embeddings=draw(st.booleans()), rope_scaling=rope_scaling,
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kw=llama_configs(), seed=st.integers(0, 2**16))
def test_logits_match_transformers_fp32(tmp_path_factory, kw, seed):
    path = tmp_path_factory.mktemp("hf")
    model = make_hf_llama(path, seed=seed, **kw)
    cfg, params = pf.checkpoint.load_hf(path)
    tokens = torch.randint(0, kw["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(tokens).logits
        out = pf.models.forward(cfg, params, tokens)
    assert (out - ref).abs().max().item() < 1e-4


def test_logits_match_transformers_bf16(tmp_path):
    model = make_hf_llama(tmp_path, dtype=torch.bfloat16, hidden_size=64, num_attention_heads=8,
                          num_key_value_heads=2, intermediate_size=128)
    cfg, params = pf.checkpoint.load_hf(tmp_path)
    assert params["lm_head"]["weight"].dtype == torch.bfloat16
    tokens = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        ref = model(tokens).logits.float()
        out = pf.models.forward(cfg, params, tokens).float()
    # bf16 has an 8-bit mantissa: compare relative to the logit scale
    assert (out - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


def test_padding_mask_and_positions_match_transformers(tmp_path):
    model = make_hf_llama(tmp_path)
    cfg, params = pf.checkpoint.load_hf(tmp_path)
    tokens = torch.randint(0, 96, (2, 9))
    attn = torch.ones(2, 9, dtype=torch.long)
    attn[1, :3] = 0  # left padding
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(tokens, attention_mask=attn, position_ids=positions).logits
        out = pf.models.forward(cfg, params, tokens, positions=positions, mask=attn.bool())
    real = attn.bool()
    assert (out - ref)[real].abs().max().item() < 1e-4


def test_kv_cache_decoding_equals_full_forward():
    cfg = pf.models.preset("llama-debug")
    params = pf.models.init(cfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        full = pf.models.forward(cfg, params, tokens)
        cache = pf.models.new_cache(cfg, 2, 16, dtype=torch.float32)
        h, cache = pf.models.hidden_states(cfg, params, tokens[:, :6], cache=cache)
        steps = [h]
        for t in range(6, 10):
            h, cache = pf.models.hidden_states(cfg, params, tokens[:, t : t + 1], cache=cache)
            steps.append(h)
        logits = torch.nn.functional.linear(torch.cat(steps, 1), params["lm_head"]["weight"])
    assert cache.length == 10
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def test_remat_changes_nothing_but_memory():
    cfg = pf.models.preset("llama-debug")
    params = pf.tree.map(lambda x: x.requires_grad_(), pf.models.init(cfg, seed=2))
    batch = {"tokens": torch.randint(0, cfg.vocab_size, (2, 12)), "labels": torch.randint(0, cfg.vocab_size, (2, 12))}
    leaves = [x for _, x in pf.tree.leaves_with_paths(params)]
    grads = []
    for remat in (False, True):
        loss, n = pf.models.loss_fn(cfg, remat=remat, chunk_size=5)(params, batch)
        grads.append(torch.autograd.grad(loss / n, leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_init_is_seeded_and_meta_is_free():
    cfg = pf.models.preset("llama-debug")
    a, b = pf.models.init(cfg, seed=3), pf.models.init(cfg, seed=3)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(pf.tree.leaves_with_paths(a), pf.tree.leaves_with_paths(b)))
    big = pf.models.init(pf.models.preset("llama2-70b"), device="meta")
    assert pf.tree.numel(big) == pf.models.preset("llama2-70b").num_params > 68e9
    assert all(x.is_meta for _, x in pf.tree.leaves_with_paths(big))


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


def test_functional_call_bridge_runs_transformers_over_purefine_params(tmp_path):
    from transformers import AutoModelForCausalLM

    make_hf_llama(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    cfg = pf.checkpoint.read_config(tmp_path)[0]
    params = pf.models.init(cfg, seed=9)  # different weights than the module holds
    tokens = torch.randint(0, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        ref = as_function(model)(params, tokens).logits
        out = pf.models.forward(cfg, params, tokens)
        own = model(tokens).logits
    assert (out - ref).abs().max().item() < 1e-4
    assert (own - ref).abs().max().item() > 1e-3  # the module's own weights were really swapped out
