"""LoRA / DoRA leaf and transform: init, merge equivalence, gradients against nn.Linear and PEFT's own layer."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import purefine as pf
from purefine import fused, lora, tree
from purefine.errors import ConfigError

CFG = pf.models.preset("llama-debug")
TOKENS = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def params():
    return pf.models.init(CFG, seed=0)


def perturbed(params, seed=1, scale=0.05):
    """B (and DoRA's magnitude) moved away from init so the adapter is non-trivial."""
    g = torch.Generator().manual_seed(seed)

    def move(path, x):
        if path.endswith(".lora_b"):
            return torch.randn(x.shape, generator=g) * scale
        if path.endswith(".magnitude"):
            return x * (1 + 0.2 * torch.rand(x.shape, generator=g))
        return x

    return tree.map_with_path(move, params)


def test_apply_wraps_targets_with_documented_paths(params):
    p = lora.apply(params, rank=4, alpha=8, where=["q_proj", "v_proj"], dora=True)
    trainable = [name for name, _ in tree.filtered(p, lora.trainable)]
    expected = [f"model.layers.{i}.self_attn.{m}_proj.weight.{c}" for i in range(2) for m in "qv"
                for c in ("lora_a", "lora_b", "magnitude")]
    assert sorted(trainable) == sorted(expected)
    leaf = p["model"]["layers"][1]["self_attn"]["v_proj"]["weight"]
    base = params["model"]["layers"][1]["self_attn"]["v_proj"]["weight"]
    assert leaf.base is base and leaf.shape == base.shape and leaf.dtype == base.dtype
    assert leaf.lora_a.shape == (4, 64) and leaf.lora_b.shape == (32, 4) and not leaf.lora_b.any()
    torch.testing.assert_close(leaf.magnitude, torch.linalg.vector_norm(base, dim=1), rtol=0, atol=0)
    assert "lora_a" not in str(tree.flatten(params))  # the input tree is untouched


def test_a_is_kaiming_uniform_like_nn_linear_and_seeded_per_path(params):
    p = lora.apply(params, rank=16, alpha=16, where=["gate_proj"], seed=3)
    a = p["model"]["layers"][0]["mlp"]["gate_proj"]["weight"].lora_a  # (16, 64)
    reference = nn.Linear(64, 16, bias=False).weight  # PEFT's A init is nn.Linear's: U(±1/sqrt(in))
    bound = 1 / math.sqrt(64)
    assert a.abs().max() <= bound and reference.abs().max() <= bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.15 * bound
    again = lora.apply(params, rank=16, alpha=16, where=r".*layers\.0\.mlp\.gate_proj\.weight", seed=3)
    assert torch.equal(again["model"]["layers"][0]["mlp"]["gate_proj"]["weight"].lora_a, a)
    other_layer = p["model"]["layers"][1]["mlp"]["gate_proj"]["weight"].lora_a
    other_seed = lora.apply(params, rank=16, alpha=16, where=["gate_proj"], seed=4)
    assert not torch.equal(other_layer, a)
    assert not torch.equal(other_seed["model"]["layers"][0]["mlp"]["gate_proj"]["weight"].lora_a, a)


@pytest.mark.parametrize("dora", [False, True])
def test_output_unchanged_at_init(params, dora):
    p = lora.apply(params, rank=4, alpha=32, where="all-linear", dora=dora)
    p = lora.apply(p, rank=2, alpha=4, where=["lm_head"], dora=dora)
    with torch.no_grad():
        torch.testing.assert_close(pf.models.forward(CFG, p, TOKENS), pf.models.forward(CFG, params, TOKENS),
                                   rtol=0, atol=1e-6)


@settings(max_examples=8, deadline=None)
@given(rank=st.integers(1, 8), alpha=st.floats(0.5, 64), rslora=st.booleans(), dora=st.booleans(),
       seed=st.integers(0, 2**31), targets=st.sampled_from([["q_proj", "v_proj"], "all-linear", ["down_proj", "lm_head"]]))
def test_merge_equals_activation_side_forward(params, rank, alpha, rslora, dora, seed, targets):
    # float64: the two forms round differently in float32, by up to ~1e-5 of the logits at scale 60
    params = tree.map(lambda x: x.double(), params)
    p = perturbed(lora.apply(params, rank=rank, alpha=alpha, where=targets, rslora=rslora, dora=dora, seed=seed), seed)
    p = tree.map(lambda x: x.double() if x.is_floating_point() else x, p)
    merged = lora.merge(p)
    assert all(isinstance(x, torch.Tensor) for x in tree.flatten(merged, is_leaf=tree.is_leaf).values())
    with torch.no_grad():
        out, ref = pf.models.forward(CFG, p, TOKENS), pf.models.forward(CFG, merged, TOKENS)
        assert not torch.allclose(out, pf.models.forward(CFG, params, TOKENS), atol=1e-4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_scale_is_alpha_over_rank_or_sqrt_rank(params):
    w = lambda p: p["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]  # noqa: E731
    assert w(lora.apply(params, rank=4, alpha=8)).scale == 2.0
    assert w(lora.apply(params, rank=4, alpha=8, rslora=True)).scale == 4.0


def test_trainable_with_adds_paths_to_the_adapters(params):
    p = lora.apply(params, rank=2, alpha=4)
    norms = [n for n, _ in tree.filtered(p, lora.trainable_with(r".*norm\.weight"))]
    assert sum(n.endswith("norm.weight") for n in norms) == 5 and sum(n.endswith(".lora_a") for n in norms) == 4
    everything = dict(tree.filtered(p, lora.trainable_with(".*")))
    assert everything.keys() == tree.flatten(p).keys()


def reference_lora_linear(weight, a, b, scale, x):
    """nn.Linear + autograd: y = base(x) + s * B(A(x)), base frozen."""
    base = nn.Linear(weight.shape[1], weight.shape[0], bias=False).requires_grad_(False)
    lin_a, lin_b = nn.Linear(a.shape[1], a.shape[0], bias=False), nn.Linear(b.shape[1], b.shape[0], bias=False)
    with torch.no_grad():
        base.weight.copy_(weight), lin_a.weight.copy_(a), lin_b.weight.copy_(b)
    y = base(x) + scale * lin_b(lin_a(x))
    return y, lin_a.weight, lin_b.weight


def test_only_adapters_get_gradients_and_they_match_nn_linear(params):
    p = perturbed(lora.apply(params, rank=4, alpha=8, where=["q_proj", "v_proj"]))
    kept, frozen = tree.partition(p, lora.trainable)
    names = [n for n, _ in tree.leaves_with_paths(kept)]
    assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names)
    leaves = [x.detach().requires_grad_() for _, x in tree.leaves_with_paths(kept)]
    kept = tree.map_with_path(lambda path, x: dict(zip(names, leaves))[path], kept)
    x = torch.randn(3, 5, 64)
    leaf = tree.combine(kept, frozen)["model"]["layers"][1]["self_attn"]["v_proj"]["weight"]
    grads = torch.autograd.grad(pf.ops.linear(x, leaf).square().sum(), leaves, allow_unused=True)
    by_name = dict(zip(names, grads))
    y, ref_a, ref_b = reference_lora_linear(leaf.base, leaf.lora_a.detach(), leaf.lora_b.detach(), leaf.scale, x)
    ref_ga, ref_gb = torch.autograd.grad(y.square().sum(), [ref_a, ref_b])
    torch.testing.assert_close(by_name["model.layers.1.self_attn.v_proj.weight.lora_a"], ref_ga, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(by_name["model.layers.1.self_attn.v_proj.weight.lora_b"], ref_gb, rtol=1e-5, atol=1e-6)
    assert all(g is None for n, g in by_name.items() if "layers.1.self_attn.v_proj" not in n)


def peft_layer(leaf, bias=None, dropout=0.0):
    """PEFT's own LoraLayer over nn.Linear with the leaf's weights."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    out_f, in_f = leaf.shape
    base = nn.Linear(in_f, out_f, bias=bias is not None)
    with torch.no_grad():
        base.weight.copy_(leaf.base)
        if bias is not None:
            base.bias.copy_(bias)
    config = LoraConfig(r=leaf.rank, lora_alpha=leaf.alpha, lora_dropout=dropout, use_rslora=leaf.rslora,
                        use_dora=leaf.is_dora)
    layer = PeftLinear(base, "default", config, r=leaf.rank, lora_alpha=leaf.alpha)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(leaf.lora_a)
        layer.lora_B["default"].weight.copy_(leaf.lora_b)
        if leaf.is_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(leaf.magnitude)
    return layer


def peft_params(layer):
    out = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return out + ([layer.lora_magnitude_vector["default"].weight] if layer.use_dora["default"] else [])


@pytest.mark.parametrize("dora,rslora,with_bias,dropout", [
    (True, False, False, 0.0), (True, True, True, 0.0), (True, False, True, 0.3), (False, True, True, 0.3),
    (False, False, True, 0.0), (False, True, False, 0.0)])
def test_forward_and_grads_match_peft_lora_layer(dora, rslora, with_bias, dropout):
    gen = torch.Generator().manual_seed(7)
    w, bias = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen) if with_bias else None
    leaf = lora.apply({"proj": {"weight": w}}, rank=6, alpha=12, where=["proj"], rslora=rslora, dora=dora,
                      dropout=dropout)["proj"]["weight"]
    leaf = dataclasses.replace(leaf, lora_b=torch.randn(24, 6, generator=gen) * 0.3)
    if dora:
        leaf = dataclasses.replace(leaf, magnitude=leaf.magnitude * (1 + torch.rand(24, generator=gen)))
    layer = peft_layer(leaf, bias, dropout).train()
    x = torch.randn(4, 3, 40, generator=gen)
    torch.manual_seed(11)
    ref = layer(x)
    trainables = [leaf.lora_a, leaf.lora_b] + ([leaf.magnitude] if dora else [])
    trainables = [t.detach().requires_grad_() for t in trainables]
    ours_leaf = dataclasses.replace(leaf, lora_a=trainables[0], lora_b=trainables[1],
                                    magnitude=trainables[2] if dora else None)
    torch.manual_seed(11)  # the same global RNG draw gives the same dropout mask
    out = pf.ops.linear(x, ours_leaf, bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    target = torch.randn(out.shape, generator=gen)
    ours = torch.autograd.grad((out * target).sum(), trainables)
    theirs = torch.autograd.grad((ref * target).sum(), peft_params(layer))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dropout_only_while_gradients_are_enabled(params):
    p = perturbed(lora.apply(params, rank=4, alpha=8, dropout=0.5))
    with torch.no_grad():
        a, b = pf.models.forward(CFG, p, TOKENS), pf.models.forward(CFG, p, TOKENS)
        assert torch.equal(a, b)
    torch.manual_seed(0)
    c = pf.models.forward(CFG, p, TOKENS)
    assert not torch.allclose(c, a, atol=1e-4)


def test_remat_replays_dropout(params):
    p = perturbed(lora.apply(params, rank=4, alpha=8, dropout=0.3, where="all-linear"))
    batch = {"tokens": TOKENS, "labels": torch.roll(TOKENS, -1, 1)}
    results = []
    for remat in (False, True):
        leaves = {n: x.detach().requires_grad_() for n, x in tree.filtered(p, lora.trainable)}
        q = tree.map_with_path(lambda path, x: leaves.get(path, x), p)
        torch.manual_seed(5)
        loss, _ = pf.models.loss_fn(CFG, remat=remat)(q, batch)
        results.append((loss, torch.autograd.grad(loss, list(leaves.values()))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_astype_computes_in_low_precision_and_grads_stay_fp32(params):
    p = perturbed(lora.apply(tree.map(lambda x: x.bfloat16(), params), rank=4, alpha=8, dora=True))
    leaf = p["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]
    assert leaf.lora_a.dtype == torch.float32 and leaf.magnitude.dtype == torch.float32
    a = leaf.lora_a.detach().requires_grad_()
    cast = dataclasses.replace(leaf, lora_a=a).astype(torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = pf.ops.linear(x, cast)
    assert y.dtype == torch.bfloat16
    (grad,) = torch.autograd.grad(y.float().sum(), [a])
    assert grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), pf.ops.linear(x.float(), dataclasses.replace(leaf, base=leaf.base.float())),
                               rtol=0.05, atol=0.05)


@dataclass(frozen=True)
class Scaled:
    """A test-only leaf kind (int8 codes x per-row scale), standing in for NF4: LoRA never imports it."""

    codes: torch.Tensor
    scale: torch.Tensor

    shape = property(lambda self: self.codes.shape)
    dtype = property(lambda self: self.scale.dtype)

    def dense(self, dtype=None):
        return (self.codes.float() * self.scale[:, None]).to(dtype or self.dtype)

    def linear(self, x, bias=None):
        return torch.nn.functional.linear(x, self.dense(x.dtype), bias)


tree.register_node(Scaled, ("codes", "scale"))


@pytest.mark.parametrize("dora", [False, True])
def test_lora_over_another_leaf_kind(params, dora):
    def quantize(path, x):
        if not path.endswith("_proj.weight"):
            return x
        scale = x.abs().amax(1) / 127
        return Scaled(torch.round(x / scale[:, None]).to(torch.int8), scale)

    q = tree.map_with_path(quantize, params)
    p = perturbed(lora.apply(q, rank=4, alpha=8, dora=dora, where="all-linear"))
    assert isinstance(p["model"]["layers"][0]["mlp"]["up_proj"]["weight"].base, Scaled)
    assert all(n.endswith(lora.ADAPTER_CHILDREN) for n, _ in tree.filtered(p, lora.trainable))
    with torch.no_grad():
        torch.testing.assert_close(pf.models.forward(CFG, p, TOKENS), pf.models.forward(CFG, lora.merge(p), TOKENS),
                                   rtol=1e-5, atol=1e-5)


def test_lora_over_nf4_when_available(params):
    nf4 = pytest.importorskip("purefine.nf4")
    q = nf4.quantize(params, where=r".*_proj\.weight")
    for dora in (False, True):
        p = perturbed(lora.apply(q, rank=4, alpha=8, dora=dora))
        with torch.no_grad():
            torch.testing.assert_close(pf.models.forward(CFG, p, TOKENS),
                                       pf.models.forward(CFG, lora.merge(p), TOKENS), rtol=1e-4, atol=1e-4)


def test_bad_input_raises_config_errors(params):
    tied = pf.models.init(dataclasses.replace(CFG, tie_word_embeddings=True))
    cases = [
        (dict(rank=0), "rank: expected a positive integer, found 0"),
        (dict(rank=-2), "found -2"),
        (dict(rank=2.5), "found 2.5"),
        (dict(where=r".*\.qq_proj\.weight"), "'.*\\\\.qq_proj\\\\.weight' matches no weight"),
        (dict(where=["q_proj", "w_proj"]), "'w_proj' matches no weight"),
        (dict(where="(unclosed"), "not a valid regex"),
        (dict(where=r"model\.embed_tokens\.weight"), "embedding table"),
        (dict(where=r".*norm\.weight"), "expected a 2-D (out, in) weight"),
        (dict(dropout=1.0), "dropout"),
        (dict(alpha=0), "alpha"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=None) as info:
            lora.apply(params, **{"rank": 4, "alpha": 8, **kwargs})
        assert message in str(info.value), (kwargs, str(info.value))
    with pytest.raises(ConfigError, match="ties lm_head to model.embed_tokens.weight"):
        lora.apply(tied, rank=4, alpha=8, where=["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        lora.apply(lora.apply(params, rank=4, alpha=8), rank=4, alpha=8)


def _fused_calls(monkeypatch):
    calls = []
    apply = fused._LoRALinear.apply
    monkeypatch.setattr(fused._LoRALinear, "apply", lambda *a: (calls.append(1), apply(*a))[1])
    return calls


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_lora_linear_equals_the_composite_and_peft(monkeypatch, with_bias):
    """The one-Function path (adapter accumulated into the base matmul, input gradient accumulated in
    backward) gives PEFT's values and every gradient, input's included; the composite path agrees."""
    calls = _fused_calls(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    w, bias = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen) if with_bias else None
    leaf = lora.apply({"proj": {"weight": w}}, rank=6, alpha=12, where=["proj"])["proj"]["weight"]
    leaf = dataclasses.replace(leaf, lora_b=torch.randn(24, 6, generator=gen) * 0.3)
    layer = peft_layer(leaf, bias, 0.0).train()
    x = torch.randn(4, 3, 40, generator=gen)
    g = torch.randn(4, 3, 24, generator=gen)

    def run(fn, tensors):
        xx = x.detach().requires_grad_()
        out = fn(xx)
        return out, torch.autograd.grad(out, [xx] + tensors, g)

    mine = [t.detach().requires_grad_() for t in (leaf.lora_a, leaf.lora_b) + ((bias,) if with_bias else ())]
    ours_leaf = dataclasses.replace(leaf, lora_a=mine[0], lora_b=mine[1])
    out, grads = run(lambda xx: pf.ops.linear(xx, ours_leaf, mine[2] if with_bias else None), mine)
    assert len(calls) == 1
    theirs = peft_params(layer)[:2] + ([layer.base_layer.bias] if with_bias else [])
    ref, ref_grads = run(layer, theirs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(lora.LoRA, "_fusable", lambda self, x, b: False)
    out2, grads2 = run(lambda xx: pf.ops.linear(xx, ours_leaf, mine[2] if with_bias else None), mine)
    assert len(calls) == 1
    torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads2, grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_lora_linear_gradcheck_and_bf16_accuracy():
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(6, 7, generator=gen, dtype=torch.float64)
    a, b = torch.randn(3, 7, generator=gen, dtype=torch.float64), torch.randn(6, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    ins = [t.requires_grad_() for t in (x, a, b, bias)]
    assert torch.autograd.gradcheck(lambda x, a, b, bias: fused._LoRALinear.apply(x, w, a, b, bias, 1.7), ins)
    # bf16: the adapter summed inside the base matmul's float32 accumulation, rounded once
    leaf = lora.LoRA(base=w.to(torch.bfloat16), lora_a=a.detach().float(), lora_b=b.detach().float(), alpha=6.0)
    xb = torch.randn(64, 7, generator=gen).to(torch.bfloat16)
    exact = xb.double() @ w.to(torch.bfloat16).double().t() + 2.0 * (xb.double() @ a.float().double().t()) @ b.float().double().t()
    err = (leaf.linear(xb).double() - exact).abs().max() / exact.abs().max()
    assert err < 2 ** -7


def test_fused_lora_linear_only_where_it_applies(monkeypatch, params):
    calls = _fused_calls(monkeypatch)
    x = torch.randn(2, 3, 40)
    w = torch.randn(24, 40)
    make = lambda **kw: lora.apply({"proj": {"weight": w}}, rank=4, alpha=8, where=["proj"], **kw)["proj"]["weight"]
    make(dropout=0.1).linear(x)                          # dropout while training: the composite
    assert calls == []
    with torch.no_grad():
        make(dropout=0.1).linear(x)                      # no dropout without gradients
    assert len(calls) == 1
    trained_base = make()
    trained_base = dataclasses.replace(trained_base, base=w.clone().requires_grad_())
    trained_base.linear(x)                               # a base that trains: the composite
    make(dora=True).linear(x)                            # DoRA: its own path
    assert len(calls) == 1
