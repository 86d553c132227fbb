"""Every causal family (Llama, Mistral, Qwen2, Qwen3, Gemma-2, Phi-3, GPT-2) through the same checks,
one body each, against independent references: transformers' logits (fp32 and bf16, padded batches,
random shapes), KV-cache decoding against the full forward, greedy generation against
``model.generate``, checkpoints and config.json through ``from_pretrained``, LoRA adapters through
peft both ways, packing, remat and gather, init and preset sizes against transformers' own modules,
and a LoRA run of the train CLI from each family's checkpoint (with its own tokenizer) whose adapter
peft loads. Family-specific rules stay in ``test_models_<family>.py``."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import purefine as pf
from purefine import generate as G
from purefine import lora, tree
from purefine.models.module import as_function
from tests.family_fixtures import (FAMILIES, SEQ, VARIANTS, WINDOWED, hf_config_class, hf_kwargs_strategy,
                                   hf_model_class, left_padded, load_hf_model, make_hf, save_tiny_tokenizer)

CASES = [pytest.param(f, ov, id=f"{f}-{name}") for f, name, ov in VARIANTS]
PROMPTS = [[5, 7, 9, 11, 13, 3, 8], [8, 1, 4]]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """family -> (checkpoint dir, transformers model, cfg, params) of BASE[family], built once."""
    built = {}

    def get(family):
        if family not in built:
            path = tmp_path_factory.mktemp(family) / "hf"
            model = make_hf(family, path)
            built[family] = (path, model, *pf.checkpoint.load_hf(path))
        return built[family]

    return get


def tokens_for(cfg, b=2, t=SEQ, seed=0):
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def max_diffs(cfg, params, model, tokens, pad):
    """(max |ours - transformers| unpadded, the same on the real tokens of a left-padded batch)."""
    attn, positions = left_padded(*tokens.shape, pad)
    with torch.no_grad():
        plain = (pf.models.forward(cfg, params, tokens) - model(tokens).logits).abs().max().item()
        ref = model(tokens, attention_mask=attn, position_ids=positions).logits
        out = pf.models.forward(cfg, params, tokens, mask=attn.bool(), positions=positions)
    return plain, (out - ref)[attn.bool()].abs().max().item()


# ---- forward parity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family,overrides", CASES)
def test_logits_match_transformers_fp32_plain_and_left_padded(family, overrides, tmp_path):
    model = make_hf(family, tmp_path, **overrides)
    cfg, params = pf.checkpoint.load_hf(tmp_path)
    if family in WINDOWED:
        assert [cfg.layer_window(i) for i in range(cfg.num_hidden_layers)] == hf_windows(family, model.config)
    plain, padded = max_diffs(cfg, params, model, tokens_for(cfg), pad=3)
    assert plain < 1e-4 and padded < 1e-4, (plain, padded)


def hf_windows(family, hf):
    """Each layer's window as transformers configures it (None: full attention)."""
    if family in ("mistral", "phi3"):
        return [hf.sliding_window] * hf.num_hidden_layers
    return [hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]


@pytest.mark.parametrize("family", FAMILIES)
def test_random_shapes_match_transformers(family, tmp_path_factory):
    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(kw=hf_kwargs_strategy(family), seed=st.integers(0, 2**16), pad=st.integers(0, 4))
    def check(kw, seed, pad):
        path = tmp_path_factory.mktemp("hf")
        model = make_hf(family, path, seed=seed, **kw)
        cfg, params = pf.checkpoint.load_hf(path)
        if family in ("qwen2", "qwen3", "gemma2"):
            assert list(cfg.layer_types) == model.config.layer_types
        if family in WINDOWED:
            assert [cfg.layer_window(i) for i in range(cfg.num_hidden_layers)] == hf_windows(family, model.config)
        plain, padded = max_diffs(cfg, params, model, tokens_for(cfg, t=11, seed=seed), pad)
        assert plain < 1e-4 and padded < 1e-4, (plain, padded)

    check()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_bf16(family, tmp_path):
    model = make_hf(family, tmp_path / "fp32").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    cfg, params = pf.checkpoint.load_hf(tmp_path / "bf16")
    assert pf.models.output_weight(cfg, params).dtype == torch.bfloat16
    tokens = tokens_for(cfg)
    with torch.no_grad():
        ref = model(tokens).logits.float()
        out = pf.models.forward(cfg, params, tokens).float()
        exact = model.float()(tokens).logits  # the same (bf16-rounded) weights computed in fp32
    # bf16 has an 8-bit mantissa: compare relative to the logit scale. Gemma-2 (four norms, two tanh
    # soft-caps on N(0, 0.3) weights) is 2-3% off in transformers itself.
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= (3e-2 if family == "gemma2" else 2e-2) * scale
    assert (out - exact).abs().max() <= 2 * (ref - exact).abs().max() + 1e-3 * scale  # as accurate as transformers


@pytest.mark.parametrize("family", WINDOWED)
def test_window_changes_the_logits(family, base):
    _, _, cfg, params = base(family)
    window = min(w for i in range(cfg.num_hidden_layers) if (w := cfg.layer_window(i)) is not None)
    tokens = tokens_for(cfg, b=1)
    with torch.no_grad():
        windowed = pf.models.forward(cfg, params, tokens)
        full = pf.models.forward(dataclasses.replace(cfg, sliding_window=None), params, tokens)
    assert torch.equal(windowed[:, :window], full[:, :window])  # the first queries see all their keys anyway
    assert (windowed[:, window:] - full[:, window:]).abs().max() > 1e-3


# ---- decoding ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_past_the_window_equals_full_forward(family, base):
    _, _, cfg, params = base(family)
    tokens = tokens_for(cfg, t=14)
    with torch.no_grad():
        full = pf.models.forward(cfg, params, tokens)
        cache = pf.models.new_cache(cfg, 2, 16, dtype=torch.float32)
        steps = []
        for t0, t1 in [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, 14)]:  # prefill, a chunk, then one at a time
            h, cache = pf.models.hidden_states(cfg, params, tokens[:, t0:t1], cache=cache)
            steps.append(h)
        logits = pf.models.logits(cfg, params, torch.cat(steps, 1))
    assert cache.length == 14
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


def hf_generate(model, prompts, max_new_tokens):
    """transformers greedy generation of a left-padded batch -> new tokens per row (pad id 0)."""
    tokens, mask = G.left_pad(prompts)
    out = model.generate(tokens, attention_mask=mask.long(), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=0)
    return out[:, tokens.shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers(family, base):
    _, model, cfg, params = base(family)
    single = G.generate(cfg, params, PROMPTS[:1], max_new_tokens=8)
    assert single == hf_generate(model, PROMPTS[:1], 8)
    batch = G.generate(cfg, params, PROMPTS, max_new_tokens=8)
    assert batch == hf_generate(model, PROMPTS, 8)
    assert batch[0] == single[0] and all(len(row) == 8 for row in batch)


# ---- checkpoints -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,overrides", CASES)
def test_save_hf_round_trips_through_transformers(family, overrides, tmp_path):
    model = make_hf(family, tmp_path / "src", **overrides)
    cfg, params = pf.checkpoint.load_hf(tmp_path / "src")
    pf.checkpoint.save_hf(tmp_path / "out", cfg, params, max_shard_bytes=20_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    read = hf_config_class(family).from_pretrained(tmp_path / "out")
    ref = model.config.to_dict()
    assert {k: read.to_dict().get(k) for k in ref} == ref  # purefine's config.json means what transformers' does
    again = load_hf_model(family, tmp_path / "out")
    assert type(again).__name__ == cfg.architecture
    tokens = tokens_for(cfg)
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)
    cfg2, back = pf.checkpoint.load_hf(tmp_path / "out")
    assert cfg2 == cfg
    flat = tree.flatten(params)
    assert tree.flatten(back).keys() == flat.keys() and all(torch.equal(t, flat[n]) for n, t in tree.flatten(back).items())


def test_every_preset_has_transformers_parameter_count_and_reads_back():
    for name, cfg in pf.models.presets().items():
        family = pf.models.family(cfg).name
        if family not in FAMILIES:
            continue
        assert pf.models.config_from_hf(json.loads(json.dumps(cfg.to_hf())), name) == cfg, name
        hf = hf_config_class(family)(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
        with torch.device("meta"):
            count = sum(p.numel() for p in hf_model_class(family)(hf).parameters())
        assert cfg.num_params == count, name


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_answers_each_model_type_and_debug_presets_run(family):
    fam = pf.models.family(family)
    assert fam.name == family and family in fam.model_types
    cfg = pf.models.preset(f"{family}-debug")
    assert pf.models.family(cfg) is fam and type(cfg).model_type == family
    params = pf.models.init(cfg, seed=0)
    tokens = tokens_for(cfg)
    logits = pf.models.forward(cfg, params, tokens)
    assert logits.shape == (2, SEQ, cfg.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_init_is_seeded_and_meta_is_free(family):
    cfg = pf.models.preset(f"{family}-debug")
    a, b = pf.models.init(cfg, seed=3), pf.models.init(cfg, seed=3)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(tree.leaves_with_paths(a), tree.leaves_with_paths(b)))
    assert {n: tuple(t.shape) for n, t in tree.flatten(a).items()} == pf.models.param_shapes(cfg)  # HF names
    assert not torch.equal(pf.models.output_weight(cfg, a), pf.models.output_weight(cfg, pf.models.init(cfg, seed=4)))
    own = [p for p in pf.models.presets().values() if pf.models.family(p).name == family]
    big = max(own, key=lambda p: p.num_params)
    meta = pf.models.init(big, device="meta")
    assert tree.numel(meta) == big.num_params and all(x.is_meta for _, x in tree.leaves_with_paths(meta))


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_runs_over_purefine_init_params(family, base):
    """The ``functional_call`` bridge: purefine's params are transformers' own tensors by name and
    (through ``hf_layout``) layout, so the module runs over them and gives purefine's logits."""
    _, model, cfg, _ = base(family)
    params = pf.models.init(cfg, seed=9)  # different weights than the module holds
    flat = {name: pf.models.hf_layout(cfg, name, t) for name, t in tree.flatten(params).items()}
    assert set(flat) == {name for name, _ in model.named_parameters()}
    tokens = tokens_for(cfg)
    with torch.no_grad():
        ref = as_function(model)(tree.unflatten(flat), tokens).logits
        out = pf.models.forward(cfg, params, tokens)
        own = model(tokens).logits
    assert (out - ref).abs().max().item() < 1e-4
    assert (own - ref).abs().max().item() > 1e-3  # the module's own weights were really swapped out


# ---- training paths ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_cross_entropy_and_remat_and_gather_change_nothing(family):
    cfg = pf.models.preset(f"{family}-debug")
    params = tree.map(lambda x: x.requires_grad_(), pf.models.init(cfg, seed=2))
    batch = {"tokens": tokens_for(cfg, t=9), "labels": tokens_for(cfg, t=9, seed=1)}
    leaves = [x for _, x in tree.leaves_with_paths(params)]
    calls = []
    gather = lambda p: calls.append(1) or p  # noqa: E731
    grads = []
    for remat, g in ((False, None), (True, gather)):
        loss, n = pf.models.loss_fn(cfg, remat=remat, gather=g, chunk_size=5)(params, batch)
        grads.append(torch.autograd.grad(loss / n, leaves))
    assert len(calls) >= cfg.num_hidden_layers
    logits = pf.models.forward(cfg, params, batch["tokens"])  # soft-capped where the family caps
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    torch.testing.assert_close(loss / n, ref)
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_segments_equal_separate_sequences(family, base):
    _, _, cfg, params = base(family)  # windows of 3-4: the window narrows inside each segment too
    a, b = tokens_for(cfg, b=1, t=7), tokens_for(cfg, b=1, t=6, seed=1)
    segments = torch.tensor([[0] * 7 + [1] * 6])
    positions = torch.cat([torch.arange(7), torch.arange(6)])[None]
    with torch.no_grad():
        packed = pf.models.forward(cfg, params, torch.cat([a, b], 1), positions=positions,
                                   mask=pf.ops.block_causal_mask(segments))
        separate = torch.cat([pf.models.forward(cfg, params, a), pf.models.forward(cfg, params, b)], 1)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)


# ---- LoRA adapters through peft ----------------------------------------------------------------------

def peft_targets(family, model, targets):
    """peft's own answer: its default target modules for the model type, or the modules its
    ``all-linear`` resolves to on this model (Phi-3 has no peft default: qkv_proj, as peft's docs use)."""
    import peft
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if targets == "default":
        return sorted(DEFAULTS.get(family) or ["qkv_proj"])
    probe = peft.get_peft_model(hf_model_class(family)(model.config), peft.LoraConfig(target_modules="all-linear"))
    return sorted({name.split(".")[-1] for name in probe.peft_config["default"].target_modules})


def perturbed(params, seed=0):
    """LoRA B moved off zero so the adapter changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    return tree.map_with_path(lambda p, x: x + torch.randn(x.shape, generator=gen) * 0.3
                              if p.endswith(".lora_b") else x, params)


LORA_CASES = [pytest.param(f, t, {}, id=f"{f}-{t}") for f in FAMILIES for t in ("default", "all-linear")]
LORA_CASES.append(pytest.param("gpt2", "all-linear", {"tie_word_embeddings": False}, id="gpt2-untied-all-linear"))


@pytest.mark.parametrize("family,targets,overrides", LORA_CASES)
def test_purefine_adapters_load_in_peft_with_equal_logits(family, targets, overrides, tmp_path):
    from peft import PeftModel

    model = make_hf(family, tmp_path / "base", **overrides)
    cfg, params = pf.checkpoint.load_hf(tmp_path / "base")
    adapted = perturbed(lora.apply(params, rank=4, alpha=8, where=pf.models.lora_targets(cfg, targets), seed=1))
    adapter = pf.checkpoint.save_peft(tmp_path / "adapter", cfg, adapted, base_model=str(tmp_path / "base"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == peft_targets(family, model, targets)
    tokens = tokens_for(cfg)
    with torch.no_grad():
        ours = pf.models.forward(cfg, adapted, tokens)
        assert (ours - pf.models.forward(cfg, params, tokens)).abs().max() > 1e-2  # the adapter matters
        peft_model = PeftModel.from_pretrained(model, adapter).eval()
        assert (peft_model(tokens).logits - ours).abs().max().item() < 1e-4
        assert peft_model.peft_config["default"].fan_in_fan_out is (family == "gpt2")
        # merging needs the right fan_in_fan_out (Conv1D's (in, out) base): the merged model agrees too
        assert (peft_model.merge_and_unload()(tokens).logits - ours).abs().max().item() < 1e-4
    assert torch.equal(pf.models.forward(cfg, pf.checkpoint.load_peft(adapter, params), tokens), ours)


@pytest.mark.parametrize("family,targets", [(f, t) for f in FAMILIES for t in ("default", "all-linear")])
def test_peft_made_adapters_load_with_equal_logits(family, targets, tmp_path):
    import peft

    model = make_hf(family, tmp_path / "base")
    cfg, params = pf.checkpoint.load_hf(tmp_path / "base")
    names = peft_targets(family, model, targets)
    ref = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=names,
                                                     fan_in_fan_out=family == "gpt2"))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    ref.save_pretrained(tmp_path / "adapter")
    tokens = tokens_for(cfg)
    with torch.no_grad():
        ours = pf.models.forward(cfg, pf.checkpoint.load_peft(tmp_path / "adapter", params), tokens)
        assert (ref.eval()(tokens).logits - ours).abs().max().item() < 1e-4
        assert (ours - pf.models.forward(cfg, params, tokens)).abs().max() > 1e-2



# ---- LoRA training through the CLI -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """(directory of a tiny byte-level BPE tokenizer, its vocabulary size), trained once."""
    path = tmp_path_factory.mktemp("tokenizer")
    return path, save_tiny_tokenizer(path, 1024)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One tokenization cache for every run (the bundled demo is tokenized once)."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_training_through_the_cli_lowers_the_loss_and_peft_loads_the_adapter(family, tmp_path, tokenizer_dir,
                                                                                   cache_dir):
    from peft import PeftModel

    from purefine.config import parse_train_args
    from purefine.recipes.train import main

    tok_dir, vocab = tokenizer_dir
    ckpt = tmp_path / "hf"
    model = make_hf(family, ckpt, vocab_size=vocab, **({"n_positions": 64} if family == "gpt2" else {}))
    for file in tok_dir.iterdir():
        shutil.copy(file, ckpt / file.name)  # the checkpoint's own tokenizer, as a hub download has
    summary = main(parse_train_args([
        "--checkpoint-dir", str(ckpt), "--peft", "lora", "--max-steps", "30", "--batch-size", "4",
        "--max-seq-len", "64", "--output-dir", str(tmp_path / "out"), "--no-progress", "--no-plot",
        "--eval-batches", "1", "--log-every", "100", "--optim.lr", "3e-2", "--optim.warmup-steps", "3",
        "--data.cache-dir", cache_dir, "--device", "cpu"]))
    assert summary["last_loss"] < summary["first_loss"] - 0.05, summary["losses"]
    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == peft_targets(family, model, "default")  # the family's peft default
    assert config["fan_in_fan_out"] is (family == "gpt2")
    cfg, params = pf.checkpoint.load_hf(ckpt)
    tokens = tokens_for(cfg)
    with torch.no_grad():
        ours = pf.models.forward(cfg, pf.checkpoint.load_peft(adapter, params), tokens)
        assert (ours - pf.models.forward(cfg, params, tokens)).abs().max() > 1e-3  # training moved the adapter
        theirs = PeftModel.from_pretrained(model, adapter).eval()(tokens).logits
    assert (theirs - ours).abs().max().item() < 1e-4
