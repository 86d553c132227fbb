"""QLoRA / QDoRA (LoRA over NF4 bases) against LoRA over the dequantized weights, and quantizing
while loading a Hugging Face checkpoint (against transformers running the same dequantized weights)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import purefine as pf
from purefine import lora, nf4, tree
from tests.conftest import make_hf_llama

CFG = pf.models.preset("llama-debug")
PROJ = r".*_proj\.weight"
TARGETS = ["q_proj", "v_proj", "down_proj"]
TOKENS = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


def batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (2, 12), generator=g)
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, dims=1)}


def moved(params: dict, seed: int = 1) -> dict:
    """B (and DoRA's magnitude) moved away from init so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)

    def move(path: str, x: torch.Tensor) -> torch.Tensor:
        if path.endswith(".lora_b"):
            return torch.randn(x.shape, generator=g) * 0.05
        if path.endswith(".magnitude"):
            return x * (1 + 0.2 * torch.rand(x.shape, generator=g))
        return x

    return tree.map_with_path(move, params)


@pytest.fixture(scope="module")
def quantized() -> dict:
    return nf4.quantize(pf.models.init(CFG, seed=0), where=PROJ)


def pair(quantized: dict, **kwargs) -> tuple[dict, dict]:
    """(QLoRA params, LoRA params over the same weights dequantized), with the same adapters."""
    q = moved(lora.apply(quantized, rank=4, alpha=8, where=TARGETS, seed=0, **kwargs))
    ref = moved(lora.apply(nf4.dequantize(quantized), rank=4, alpha=8, where=TARGETS, seed=0, **kwargs))
    return q, ref


@pytest.mark.parametrize("dora", [False, True], ids=["qlora", "qdora"])
def test_logits_equal_lora_over_the_dequantized_weights(quantized, dora):
    q, ref = pair(quantized, dora=dora)
    leaf = q["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]
    assert lora.is_lora(leaf) and nf4.is_nf4(leaf.base) and leaf.is_dora == dora
    assert nf4.is_nf4(q["model"]["layers"][0]["self_attn"]["k_proj"]["weight"])  # quantized, no adapter
    logits = pf.models.forward(CFG, q, TOKENS)
    assert torch.equal(logits, pf.models.forward(CFG, ref, TOKENS))
    assert not torch.equal(logits, pf.models.forward(CFG, nf4.dequantize(quantized), TOKENS))  # adapters act


@pytest.mark.parametrize("dora", [False, True], ids=["qlora", "qdora"])
def test_gradients_reach_only_the_adapters_and_equal_lora_over_dequantized(quantized, dora):
    q, ref = pair(quantized, dora=dora)
    loss = pf.models.loss_fn(CFG)
    grad_fn = pf.train.value_and_grad(lambda p, b: loss(p, b)[0], lora.trainable)
    (value, grads), (ref_value, ref_grads) = grad_fn(q, batch(2)), grad_fn(ref, batch(2))
    assert torch.equal(value, ref_value)
    assert grads.keys() == ref_grads.keys()
    adapters = {"lora_a", "lora_b", "magnitude"} if dora else {"lora_a", "lora_b"}
    assert {p.rsplit(".", 1)[-1] for p in grads} == adapters
    for p in grads:
        assert torch.allclose(grads[p], ref_grads[p], rtol=1e-5, atol=1e-7), p
        assert grads[p].abs().sum() > 0, p
    # even when asked for, the frozen NF4 base gets no gradient: its floating children are not in the graph
    frozen = [x for p, x in tree.leaves_with_paths(q) if ".base." in p and x.is_floating_point()]
    assert len(frozen) == 2 * 2 * len(TARGETS)  # scale_factors and scale_mean, 2 layers
    asked = [x.detach().requires_grad_() for x in frozen]
    swap = dict(zip(map(id, frozen), asked))
    with_grad = tree.map(lambda x: swap.get(id(x), x), q)
    assert all(g is None for g in torch.autograd.grad(loss(with_grad, batch(2))[0], asked, allow_unused=True))


def test_training_qlora_tracks_lora_on_the_dequantized_base_and_leaves_the_codes_alone(quantized):
    opt = pf.optim.adamw(1e-2, weight_decay=0.0)
    step = pf.train.make_step(pf.models.loss_fn(CFG), opt, trainable=lora.trainable)
    q, ref = pair(quantized)
    codes_before = {p: x.clone() for p, x in tree.leaves_with_paths(q) if ".base." in p}
    runs = []
    for params in (q, ref):
        state, losses = pf.train.init(params, opt, trainable=lora.trainable, seed=0), []
        for _ in range(4):
            state, metrics = step(state, batch(3))
            losses.append(metrics["loss"])
        runs.append((state, losses))
    (q_state, q_losses), (_, ref_losses) = runs
    assert q_losses == pytest.approx(ref_losses, rel=1e-5) and q_losses[-1] < q_losses[0]
    after = dict(tree.leaves_with_paths(q_state.params))
    assert all(torch.equal(after[p], x) for p, x in codes_before.items())


def test_quantized_embeddings_match_lora_over_the_dequantized_tables():
    """--lora.quantize-embeddings: the input embedding and the output head in NF4 too (the lookup
    decodes only the rows used; the chunked loss runs the NF4 head per chunk): logits, loss and
    adapter gradients equal LoRA over the same tables dequantized; norms stay dense."""
    pattern = pf.models.quantize_pattern(CFG, embeddings=True)
    assert pf.models.quantize_pattern(CFG) in pattern
    base = nf4.quantize(pf.models.init(CFG, seed=0), where=pattern)
    assert nf4.is_nf4(base["model"]["embed_tokens"]["weight"]) and nf4.is_nf4(base["lm_head"]["weight"])
    assert isinstance(base["model"]["norm"]["weight"], torch.Tensor)
    q, ref = pair(base)
    assert torch.equal(pf.models.forward(CFG, q, TOKENS), pf.models.forward(CFG, ref, TOKENS))
    for remat in (False, True):
        loss = pf.models.loss_fn(CFG, chunk_size=8, remat=remat)  # 24 tokens: three chunks of the head
        grad_fn = pf.train.value_and_grad(lambda p, b: loss(p, b)[0], lora.trainable)
        (value, grads), (ref_value, ref_grads) = grad_fn(q, batch(4)), grad_fn(ref, batch(4))
        assert value.item() == pytest.approx(ref_value.item(), rel=1e-6)
        for p in grads:  # the dense head goes through the fused linear cross-entropy: another summation order
            assert (grads[p] - ref_grads[p]).abs().max() <= 1e-5 * ref_grads[p].abs().max(), p
    dense = pf.models.init(CFG, seed=0)
    rows = base["model"]["embed_tokens"]["weight"].embed(TOKENS)
    assert 0 < (rows - dense["model"]["embed_tokens"]["weight"][TOKENS]).abs().max() < 0.05  # NF4's rounding


# ---------------------------------------------------------------------------------------------
# quantize while loading


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_hf_quantizes_while_loading_and_matches_transformers(tmp_path, dtype):
    model = make_hf_llama(tmp_path / "hf")
    cfg, params = pf.checkpoint.load_hf(tmp_path / "hf", dtype=dtype, quantize=PROJ)
    _, plain = pf.checkpoint.load_hf(tmp_path / "hf", dtype=dtype)
    leaves = tree.flatten(params, is_leaf=tree.is_leaf)
    assert {p for p, x in leaves.items() if nf4.is_nf4(x)} == {p for p in leaves if p.endswith("_proj.weight")}
    assert all(x.dtype == dtype for x in leaves.values())
    same = tree.flatten(nf4.quantize(plain, where=PROJ))
    assert all(torch.equal(x, same[p]) for p, x in tree.flatten(params).items())
    # transformers, running the dequantized weights, computes the same logits
    dense = tree.materialize(params, torch.float32)
    missing, unexpected = model.load_state_dict(tree.flatten(dense), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    tokens = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
    got = pf.models.forward(cfg, dense, tokens)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(pf.models.forward(cfg, params, tokens), pf.models.forward(cfg, nf4.dequantize(params), tokens))


MEASURE = r"""
import json, sys, torch
import purefine as pf
import purefine.checkpoint, purefine.models, purefine.nf4  # imports are not what this measures

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
before = status("VmRSS")
cfg, params = pf.checkpoint.load_hf(sys.argv[1], quantize=r".*_proj\.weight")
print(json.dumps({"growth": status("VmHWM") - before, "bytes": pf.tree.nbytes(params)}))
"""


@pytest.mark.slow
def test_load_hf_with_quantize_never_holds_the_model_in_full_precision(tmp_path):
    """A 4-layer float32 checkpoint (210 MiB, mostly projections): loading it into NF4 grows the
    process by the NF4 params plus a few tensors' worth of transients, far less than the checkpoint."""
    cfg = pf.models.family("llama").config(vocab_size=1024, hidden_size=1024, intermediate_size=2816,
                                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)
    pf.checkpoint.save_hf(tmp_path, cfg, pf.models.init(cfg, seed=0))
    size = sum(x.numel() * 4 for x in tree.flatten(pf.models.init(cfg, device="meta")).values())
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    print(f"checkpoint {size / 2**20:.0f} MiB, params after {m['bytes'] / 2**20:.0f} MiB, "
          f"resident growth at peak {m['growth'] / 2**20:.0f} MiB")
    assert m["bytes"] < 0.25 * size
    assert m["growth"] < 0.6 * size  # measured 77-104 MiB: the NF4 params, one tensor, chunk temporaries


def test_an_nf4_output_head_goes_through_the_fused_cross_entropy(monkeypatch):
    """A frozen NF4 head decodes block by block inside ``_LinearCrossEntropy`` (no checkpointed chunk,
    no logits kept for backward): the loss and dL/dh of the dequantized head, for each chunking."""
    from purefine import losses

    q = nf4.quantize_tensor(torch.randn(300, 64, generator=torch.Generator().manual_seed(0)))
    h = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(2))
    labels[3] = -100
    monkeypatch.setattr(losses, "checkpoint", lambda *a, **k: pytest.fail("an NF4 head took the checkpointed path"))
    for chunk in (7, 64):
        for dtype in (torch.float32, torch.bfloat16):
            x, ref = h.to(dtype).clone().requires_grad_(), h.to(dtype).clone().requires_grad_()
            loss, count = losses.chunked_cross_entropy(x, q.astype(dtype), labels, chunk_size=chunk)
            ref_loss, _ = losses.chunked_cross_entropy(ref, q.dense(dtype), labels, chunk_size=chunk)
            loss.backward(), ref_loss.backward()
            assert count == 39 and torch.equal(loss, ref_loss), (chunk, dtype)
            assert torch.equal(x.grad, ref.grad), (chunk, dtype)
