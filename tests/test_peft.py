"""PEFT adapter I/O: peft loads what we save (same logits and gradients), we load what peft saves, merged
checkpoints load in transformers, and corrupt adapters fail with errors that name the file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import purefine as pf
from purefine import lora, tree
from purefine.errors import CheckpointError, ConfigError
from tests.conftest import make_hf_llama

TOKENS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
VARIANTS = {
    "lora": dict(where="all-linear", rank=4, alpha=8),
    "dora-rslora": dict(where=["q_proj", "v_proj", "down_proj"], rank=4, alpha=6, dora=True, rslora=True),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(HF directory, purefine config, purefine params) of a tiny random Llama."""
    path = tmp_path_factory.mktemp("peft") / "base"
    make_hf_llama(path, seed=3)
    cfg, params = pf.checkpoint.load_hf(path)
    return path, cfg, params


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def adapted(params, variant, seed=1):
    """LoRA applied (plus a rank-2 lm_head adapter) with B and m perturbed so the adapter matters."""
    p = lora.apply(params, seed=seed, **VARIANTS[variant])
    p = lora.apply(p, rank=2, alpha=3, where=["lm_head"], dora=VARIANTS[variant].get("dora", False),
                   rslora=VARIANTS[variant].get("rslora", False))
    g = torch.Generator().manual_seed(seed)

    def move(path, x):
        if path.endswith(".lora_b"):
            return torch.randn(x.shape, generator=g) * 0.2
        return x * (1 + 0.3 * torch.rand(x.shape, generator=g)) if path.endswith(".magnitude") else x

    return tree.map_with_path(move, p)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_loads_our_adapter_with_equal_logits_and_gradients(base, tmp_path, variant):
    from peft import PeftModel

    path, cfg, params = base
    p = adapted(params, variant)
    out = pf.checkpoint.save_peft(tmp_path / "adapter", cfg, p, base_model=str(path))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(path)
    assert config["rank_pattern"] == {"lm_head": 2} and config["alpha_pattern"] == {"lm_head": 3}
    model = PeftModel.from_pretrained(hf_model(path), out, is_trainable=True)
    ref = model(TOKENS).logits
    leaves = {n: x.detach().requires_grad_() for n, x in tree.filtered(p, lora.trainable)}
    ours = pf.models.forward(cfg, tree.map_with_path(lambda n, x: leaves.get(n, x), p), TOKENS)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert (pf.models.forward(cfg, params, TOKENS) - ref).abs().max() > 1e-2  # the adapter is not trivial
    target = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    ours_grads = torch.autograd.grad((ours * target).sum(), list(leaves.values()))
    peft_names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs_grads = torch.autograd.grad((ref * target).sum(), list(peft_names.values()))
    theirs = {peft_key(n): g for n, g in zip(peft_names, theirs_grads)}
    assert len(theirs) == len(leaves)
    for name, g in zip(leaves, ours_grads):
        torch.testing.assert_close(g, theirs[name], rtol=1e-4, atol=1e-5)


def peft_key(name: str) -> str:
    """PEFT parameter name -> purefine path ('...q_proj.lora_A.default.weight' -> '...q_proj.weight.lora_a')."""
    name = name.removeprefix("base_model.model.")
    for theirs, ours in ((".lora_A.default.weight", "lora_a"), (".lora_B.default.weight", "lora_b"),
                         (".lora_magnitude_vector.default.weight", "magnitude")):
        if name.endswith(theirs):
            return name[: -len(theirs)] + ".weight." + ours
    raise AssertionError(name)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_peft_round_trip_and_merged_checkpoint_in_transformers(base, tmp_path, variant):
    path, cfg, params = base
    p = adapted(params, variant)
    pf.checkpoint.save_peft(tmp_path / "adapter", cfg, p)
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_" in k for k in keys)  # the adapter alone, no base weights
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    loaded = pf.checkpoint.load_peft(tmp_path / "adapter", params)
    assert lora.adapters(loaded).keys() == lora.adapters(p).keys()
    for (_, a), (_, b) in zip(tree.leaves_with_paths(loaded), tree.leaves_with_paths(p)):
        assert torch.equal(a, b)
    with torch.no_grad():
        ours = pf.models.forward(cfg, p, TOKENS)
        assert torch.equal(pf.models.forward(cfg, loaded, TOKENS), ours)
        pf.checkpoint.save_hf(tmp_path / "merged", cfg, lora.merge(p))
        torch.testing.assert_close(hf_model(tmp_path / "merged")(TOKENS).logits, ours, rtol=1e-4, atol=1e-4)


def test_load_peft_reads_an_adapter_peft_wrote(base, tmp_path):
    from peft import LoraConfig, get_peft_model

    path, cfg, params = base
    config = LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj", "up_proj", "lm_head"], use_dora=True,
                        task_type="CAUSAL_LM")
    model = get_peft_model(hf_model(path), config)
    with torch.no_grad():
        for name, x in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                x.add_(torch.randn_like(x) * 0.2)
    model.save_pretrained(tmp_path / "theirs")
    loaded = pf.checkpoint.load_peft(tmp_path / "theirs", params)
    assert len(lora.adapters(loaded)) == 2 * 2 + 1
    with torch.no_grad():
        torch.testing.assert_close(pf.models.forward(cfg, loaded, TOKENS), model.eval()(TOKENS).logits,
                                   rtol=1e-4, atol=1e-4)


def write_bad(tmp_path, adapter, *, config=None, tensors=None):
    bad = tmp_path / "bad"
    bad.mkdir(exist_ok=True)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    save_file(tensors if tensors is not None else load_file(adapter / "adapter_model.safetensors"),
              bad / "adapter_model.safetensors")
    return bad


def test_bad_adapters_fail_with_errors_naming_the_file(base, tmp_path):
    path, cfg, params = base
    adapter = pf.checkpoint.save_peft(tmp_path / "adapter", cfg, lora.apply(params, rank=4, alpha=8))
    good = load_file(adapter / "adapter_model.safetensors")
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    cases = [
        (dict(tensors={k: v for k, v in good.items() if not k.startswith(q0 + ".lora_B")}), "missing key"),
        (dict(tensors={**good, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)}),
         "target_modules"),
        (dict(tensors={**good, "base_model.model.model.layers.0.mlp.up_proj.weight": torch.zeros(4, 32)}), "unexpected key"),
        (dict(tensors={**good, q0 + ".lora_A.weight": torch.zeros(5, 32)}), "has shape [5, 32], expected [4, 32]"),
        (dict(tensors={**good, "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
              config={"target_modules": ["q_proj", "v_proj"]}), "which the params lack"),
        (dict(config={"use_dora": True}), "missing key"),
        (dict(config={"fan_in_fan_out": True}), "fan_in_fan_out=True is not supported"),
        (dict(config={"peft_type": "IA3"}), "peft_type"),
        (dict(config={"r": 0}), "r: expected a positive integer"),
        (dict(config={"modules_to_save": ["lm_head"]}), "modules_to_save"),
    ]
    for kwargs, message in cases:
        bad = write_bad(tmp_path, adapter, **kwargs)
        with pytest.raises(CheckpointError) as info:
            pf.checkpoint.load_peft(bad, params)
        assert message in str(info.value) and str(bad) in str(info.value), (kwargs.get("config"), str(info.value))
    truncated = write_bad(tmp_path, adapter)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        pf.checkpoint.load_peft(truncated, params)
    (truncated / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: file not found"):
        pf.checkpoint.load_peft(truncated, params)
    (truncated / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="adapter_config.json: not valid JSON"):
        pf.checkpoint.load_peft(truncated, params)
    with pytest.raises(CheckpointError, match="adapter config not found"):
        pf.checkpoint.load_peft(tmp_path / "nowhere", params)
    with pytest.raises(CheckpointError, match="already has a LoRA adapter"):
        pf.checkpoint.load_peft(adapter, lora.apply(params, rank=4, alpha=8))


def test_save_refuses_what_peft_cannot_express(base, tmp_path):
    path, cfg, params = base
    with pytest.raises(ConfigError, match="no LoRA leaves"):
        pf.checkpoint.save_peft(tmp_path / "a", cfg, params)
    mixed = lora.apply(lora.apply(params, rank=2, alpha=4, where=["q_proj"]), rank=2, alpha=4, where=["v_proj"], dora=True)
    with pytest.raises(ConfigError, match="is_dora"):
        pf.checkpoint.save_peft(tmp_path / "a", cfg, mixed)
    assert not (tmp_path / "a").exists()


def test_partial_targets_are_written_as_a_regex_peft_understands(base, tmp_path):
    from peft import PeftModel

    path, cfg, params = base
    p = lora.apply(params, rank=2, alpha=4, where=r"model\.layers\.1\.self_attn\.(q|o)_proj\.weight")
    p = tree.map_with_path(lambda n, x: torch.full(x.shape, 0.1) if n.endswith("lora_b") else x, p)
    out = pf.checkpoint.save_peft(tmp_path / "adapter", cfg, p)
    config = json.loads((out / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)
    model = PeftModel.from_pretrained(hf_model(path), out).eval()
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 2
    with torch.no_grad():
        torch.testing.assert_close(pf.models.forward(cfg, p, TOKENS), model(TOKENS).logits, rtol=1e-4, atol=1e-4)
    assert lora.adapters(pf.checkpoint.load_peft(out, params)).keys() == lora.adapters(p).keys()
