"""The generic nn.Module path: a transformers model of a family purefine does not implement (GPT-NeoX)
run as a pure function; gradients against autograd on the module itself, and weight-side LoRA against peft."""

from __future__ import annotations

import copy

import pytest
import torch

import purefine as pf
from purefine.errors import ConfigError
from purefine.models import module


@pytest.fixture(scope="module")
def neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        max_position_embeddings=64, rotary_pct=0.5, use_parallel_residual=True, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def batch_and_hf_labels(seed=0):
    """A purefine batch (labels already shifted, right padding) and the unshifted labels transformers takes."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (2, 9), generator=gen)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    hf_labels = tokens.masked_fill(~mask, -100)
    labels = torch.cat([hf_labels[:, 1:], torch.full((2, 1), -100)], 1)
    return {"tokens": tokens, "mask": mask, "labels": labels}, hf_labels


def test_gradients_through_the_pure_function_equal_autograd_on_the_module(neox):
    batch, hf_labels = batch_and_hf_labels()
    params = pf.tree.map(lambda x: x.clone().requires_grad_(), module.params_of(neox))
    names = pf.tree.paths(params)
    loss_sum, n = module.loss_fn(neox)(params, batch)
    grads = torch.autograd.grad(loss_sum / n, [x for _, x in pf.tree.leaves_with_paths(params)])

    ref_model = copy.deepcopy(neox)
    ref = ref_model(batch["tokens"], attention_mask=batch["mask"].long(), labels=hf_labels).loss
    ref.backward()
    ref_grads = dict(ref_model.named_parameters())
    torch.testing.assert_close(loss_sum / n, ref, atol=1e-6, rtol=1e-6)
    assert n == int((hf_labels[:, 1:] != -100).sum())
    for name, g in zip(names, grads):
        torch.testing.assert_close(g, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    assert all(p.grad is None for p in neox.parameters())  # the module itself was never touched


def test_full_fine_tuning_lowers_the_loss(neox):
    batch, _ = batch_and_hf_labels(1)
    params = pf.tree.map(lambda x: x.clone().requires_grad_(), module.params_of(neox))
    leaves = [x for _, x in pf.tree.leaves_with_paths(params)]
    loss = module.loss_fn(neox)
    losses = []
    for _ in range(8):
        loss_sum, n = loss(params, batch)
        grads = torch.autograd.grad(loss_sum / n, leaves)
        with torch.no_grad():
            for x, g in zip(leaves, grads):
                x -= 0.5 * g
        losses.append((loss_sum / n).item())
    assert losses[-1] < 0.7 * losses[0]


def test_weight_side_lora_gradients_equal_peft(neox):
    peft = pytest.importorskip("peft")
    lora = pytest.importorskip("purefine.lora")
    batch, hf_labels = batch_and_hf_labels(2)
    params = lora.apply(module.params_of(neox), rank=4, alpha=8, where=r".*query_key_value\.weight", seed=0)
    gen = torch.Generator().manual_seed(3)  # a nonzero B, so that A gets a gradient too
    params = pf.tree.map_with_path(lambda p, x: torch.randn(x.shape, generator=gen) * 0.1 if p.endswith("lora_b") else x, params)
    trainable, frozen = pf.tree.partition(params, lora.trainable)
    trainable = pf.tree.map(lambda x: x.requires_grad_(), trainable)
    named = pf.tree.filtered(trainable, lambda p, x: True)
    loss_sum, n = module.loss_fn(neox)(pf.tree.combine(trainable, frozen), batch)
    grads = dict(zip([p for p, _ in named], torch.autograd.grad(loss_sum / n, [x for _, x in named])))

    ref_model = peft.get_peft_model(copy.deepcopy(neox), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"]))
    flat = dict(named)
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if ".lora_" in name:
                ours = name.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".weight.lora_a")
                p.copy_(flat[ours.replace(".lora_B.default.weight", ".weight.lora_b")])
    ref = ref_model(batch["tokens"], attention_mask=batch["mask"].long(), labels=hf_labels).loss
    ref.backward()
    torch.testing.assert_close(loss_sum / n, ref, atol=1e-6, rtol=1e-6)
    checked = 0
    for name, p in ref_model.named_parameters():
        if ".lora_" in name:
            ours = name.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".weight.lora_a")
            torch.testing.assert_close(grads[ours.replace(".lora_B.default.weight", ".weight.lora_b")], p.grad,
                                       atol=1e-5, rtol=1e-4, msg=name)
            checked += 1
    assert checked == 2 * neox.config.num_hidden_layers


def test_bad_batch_masks_and_outputs_are_errors(neox):
    batch, _ = batch_and_hf_labels()
    with pytest.raises(ConfigError, match=r"\(B, T\) padding mask"):
        module.loss_fn(neox)(module.params_of(neox), {**batch, "mask": torch.ones(2, 1, 9, 9, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="without 'logits'"):
        module.logits_of({"hidden": torch.zeros(1)})
