"""The training paths beside the causal families' (those run per family in ``test_families.py``: a
LoRA run of the train CLI from each checkpoint, adapters through peft both ways): family-relative
LoRA target names (GPT-2's Conv1D, BERT), BERT classifier adapters with peft's ``modules_to_save``,
and the generic ``nn.Module`` path training a family purefine does not implement through
``train.make_step``."""

from __future__ import annotations

import json
import re

import pytest
import torch

import purefine as pf
from purefine import lora, tree
from purefine.data import DataConfig
from purefine.errors import CheckpointError, ConfigError
from tests.test_models_bert import make_hf_bert


def test_lora_targets_resolve_per_family():
    gpt2, bert = pf.models.preset("gpt2-debug"), pf.models.preset("bert-debug")
    assert pf.models.lora_targets(gpt2) == ["c_attn"]
    assert pf.models.lora_targets(gpt2, ["all-linear"]) == ["c_attn", "c_proj", "c_fc"]
    assert pf.models.lora_targets(bert, ("default", "key")) == ["query", "value", "key"]
    assert pf.models.lora_targets(bert, (r".*query\.weight",)) == r".*query\.weight"
    params = pf.models.init(gpt2)
    # lora's own "all-linear" is family-blind: every 2-D weight but embedding tables and lm_head
    assert lora.linear_modules(params) == ["c_attn", "c_proj", "c_fc"]
    assert len(lora.adapters(lora.apply(params, rank=2, alpha=4, where="all-linear"))) == 4 * gpt2.n_layer
    with pytest.raises(ConfigError, match=r"ties lm_head to transformer\.wte\.weight"):
        lora.apply(params, rank=2, alpha=4, where=["c_attn", "lm_head"])
    with pytest.raises(ConfigError, match=r"'q_proj' matches no weight .*linear modules here: c_attn, c_proj, c_fc"):
        lora.apply(params, rank=2, alpha=4, where=["q_proj"])
    with pytest.raises(ConfigError, match="embedding table"):
        lora.apply(params, rank=2, alpha=4, where=["wpe"])


# ---- BERT adapters through peft ----------------------------------------------------------------------

def perturbed(params, seed=0, where=r".*\.lora_b"):
    """B (and any path ``where`` matches) moved off zero so the adapter changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    return tree.map_with_path(lambda p, x: x + torch.randn(x.shape, generator=gen) * 0.3
                              if torch.is_tensor(x) and re.fullmatch(where, p) else x, params)


def peft_logits(model, adapter, tokens, **kwargs):
    from peft import PeftModel

    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(model, adapter).eval()
        return peft_model(tokens, **kwargs).logits, peft_model


def test_bert_classifier_adapter_saves_its_head_as_peft_modules_to_save(tmp_path):
    model = make_hf_bert(tmp_path / "base", "classify", num_labels=3)
    cfg, base = pf.checkpoint.load_hf(tmp_path / "base")
    params = lora.apply(base, rank=4, alpha=8, where=pf.models.lora_targets(cfg), seed=1)
    params = perturbed(params, where=r".*\.lora_b|classifier\..*|bert\.pooler\..*")  # the head trained in full
    adapter = pf.checkpoint.save_peft(tmp_path / "adapter", cfg, params)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier", "bert.pooler.dense"]
    tokens = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        ours = pf.models.forward(cfg, params, tokens, mask=mask)
        theirs, _ = peft_logits(model, adapter, tokens, attention_mask=mask.long())
    assert (theirs - ours).abs().max().item() < 1e-4
    assert (pf.models.forward(cfg, pf.models.init(cfg), tokens) - ours).abs().max() > 1e-2  # not trivially equal
    reloaded = pf.checkpoint.load_peft(adapter, base)
    assert torch.equal(reloaded["classifier"]["weight"], params["classifier"]["weight"])
    assert torch.equal(pf.models.forward(cfg, reloaded, tokens, mask=mask), ours)


def test_peft_saved_bert_adapter_loads(tmp_path):
    """What peft itself writes for a BERT classifier (its ``score`` entry matches nothing) loads here."""
    import peft

    model = make_hf_bert(tmp_path / "base", "classify")
    cfg, base = pf.checkpoint.load_hf(tmp_path / "base")
    ref = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                     task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.3)
    ref.save_pretrained(tmp_path / "adapter")
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = pf.models.forward(cfg, pf.checkpoint.load_peft(tmp_path / "adapter", base), tokens)
        assert (ref.eval()(tokens).logits - ours).abs().max().item() < 1e-4


def test_modules_to_save_and_fan_in_fan_out_are_checked(tmp_path):
    make_hf_bert(tmp_path / "base", "classify")
    cfg, base = pf.checkpoint.load_hf(tmp_path / "base")
    adapter = pf.checkpoint.save_peft(tmp_path / "adapter", cfg, lora.apply(base, rank=2, alpha=4, where=["query"]))
    with pytest.raises(ConfigError, match="modules_to_save"):  # a head module cannot be an adapter target too
        pf.checkpoint.save_peft(tmp_path / "bad", cfg, lora.apply(base, rank=2, alpha=4, where=["classifier"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"fan_in_fan_out": True}))
    with pytest.raises(CheckpointError, match="fan_in_fan_out=True is not supported"):
        pf.checkpoint.load_peft(adapter, base)
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"modules_to_save": ["classifier", "bert.pooler.dense", "key"]}))
    with pytest.raises(CheckpointError, match=r"missing key 'base_model\.model\.bert\.encoder\.layer\.0\.attention\.self\.key"):
        pf.checkpoint.load_peft(adapter, base)


# ---- the generic nn.Module path through the train step --------------------------------------------

def test_generic_module_full_finetune_through_make_step_lowers_the_loss():
    """A transformers GPT-NeoX (no native family) trained by ``train.make_step`` over
    ``models.module.loss_fn`` on batches of the bundled demo: the loss falls."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from purefine.models import module

    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=128)).eval()
    tok = pf.data.load_tokenizer(pf.data.DEMO_TOKENIZER, model_vocab_size=1024)
    train_set = pf.data.build(DataConfig(max_seq_len=64, max_samples=200, packing=False), tok)
    stream = pf.data.batches(train_set, batch_size=8, seq_len=64, packing=False, sampler_state=pf.data.SamplerState())
    opt = pf.optim.adamw(pf.schedules.constant(3e-3, warmup=2))
    state = pf.train.init(module.params_of(neox), opt, seed=0)
    step = pf.train.make_step(module.loss_fn(neox), opt, clip_norm=1.0)
    losses = []
    for _ in range(20):
        batch, _ = next(stream)  # right-padded: causal attention never sees the padding, labels skip it
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert all(p.grad is None for p in neox.parameters())  # the module itself is never trained in place
