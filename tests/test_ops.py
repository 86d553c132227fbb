"""purefine.ops against direct references: norms, rope, attention masks, chunked cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from purefine import losses, ops
from purefine.errors import ConfigError


def test_rms_norm_matches_formula():
    x = torch.randn(3, 5, 16)
    w = torch.randn(16)
    ref = w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), ref)


def test_rope_is_a_rotation_and_relative():
    hd = 8
    inv = ops.rope_inv_freq(hd, 10000.0)
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def rot(x, pos):
        cos, sin = ops.rope_cos_sin(inv, torch.tensor([[pos]]), torch.float32)
        return ops.apply_rope(x, cos, sin)

    assert torch.allclose(rot(q, 7).norm(), q.norm(), atol=1e-5)
    # <R_m q, R_n k> depends only on m - n
    a = (rot(q, 5) * rot(k, 2)).sum()
    b = (rot(q, 13) * rot(k, 10)).sum()
    assert torch.allclose(a, b, atol=1e-4)


def test_llama3_rope_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters={**scaling, "rope_theta": 500000.0})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    torch.testing.assert_close(ops.rope_inv_freq(128, 500000.0, scaling), ref)


def test_unknown_rope_type_is_a_config_error():
    with pytest.raises(ConfigError, match="rope_type"):
        ops.rope_inv_freq(8, 1e4, {"rope_type": "mystery"})


def reference_attention(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


@settings(max_examples=20, deadline=None)
@given(t=st.integers(1, 9), kv=st.sampled_from([1, 2, 4]))
def test_attention_causal_gqa(t, kv):
    q, k, v = torch.randn(2, 4, t, 8), torch.randn(2, kv, t, 8), torch.randn(2, kv, t, 8)
    ref = reference_attention(q, k, v, ops.causal_mask(t, t))
    torch.testing.assert_close(ops.attention(q, k, v), ref, atol=1e-5, rtol=1e-5)


def test_block_causal_mask_isolates_segments():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = ops.block_causal_mask(seg)[0, 0]
    assert m[3].tolist() == [False, False, True, True, False, False]
    assert m[5].tolist() == [False] * 5 + [True]


def test_padded_causal_mask_never_has_empty_rows():
    pad = torch.tensor([[False, False, True, True]])
    m = ops.padded_causal_mask(pad, 4)[0, 0]
    assert m.any(-1).all()
    assert m[3].tolist() == [False, False, True, True]
    out = ops.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), mask=m)
    assert torch.isfinite(out).all()


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 40), chunk=st.integers(1, 16), masked=st.floats(0, 0.9))
def test_chunked_cross_entropy_matches_full(n, chunk, masked):
    h = torch.randn(n, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    labels = torch.randint(0, 11, (n,))
    labels[torch.rand(n) < masked] = ops.IGNORE_INDEX
    loss, count = losses.chunked_cross_entropy(h, w, labels, chunk_size=chunk)
    ref = F.cross_entropy(h @ w.T, labels, ignore_index=-100, reduction="sum")
    assert count == (labels != -100).sum()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    if count > 0:
        g = torch.autograd.grad(loss, (h, w))
        g_ref = torch.autograd.grad(ref, (h, w))
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_kv_cache_refuses_overflow():
    cache = ops.KVCache.empty(1, 1, 1, 4, 2, dtype=torch.float32)
    cache.update(0, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    with pytest.raises(ConfigError, match="KV cache"):
        cache.advance(3).update(0, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_adds_into_a_fresh_sublayer_output_with_the_same_values_and_gradients(dtype):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 5, 8, generator=gen).to(dtype).requires_grad_()
    h0 = torch.randn(2, 5, 8, generator=gen).to(dtype).requires_grad_()
    w0 = torch.randn(8, 8, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(2, 5, 8, generator=gen).to(dtype)

    def run(add):
        x, h, w = (t.detach().clone().requires_grad_() for t in (x0, h0, w0))
        y = F.linear(h, w)
        out = add(x * 2, y)  # x * 2: the residual stream is itself a graph node, as in a block
        return out, y, torch.autograd.grad(out, (x, h, w), g)

    out, y, grads = run(ops.residual)
    ref, _, ref_grads = run(lambda a, b: a + b)
    assert out.data_ptr() == y.data_ptr()  # no new activation-sized tensor: written into y
    assert torch.equal(out, ref)           # addition commutes exactly
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)


def test_residual_leaves_views_leaves_and_promotions_alone():
    x = torch.randn(3, 4)
    base = torch.randn(3, 8)
    view = base[:, :4]
    assert ops.residual(x, view).data_ptr() != view.data_ptr() and torch.equal(view, base[:, :4])
    leaf = torch.randn(3, 4, requires_grad=True)
    assert torch.equal(ops.residual(x, leaf), x + leaf) and leaf.grad_fn is None
    half = torch.randn(3, 4, dtype=torch.bfloat16)
    before = half.clone()
    out = ops.residual(x, half)
    assert out.dtype == torch.float32 and torch.equal(half, before)   # promoted, as x + y
    row = torch.randn(4)
    assert ops.residual(x, row).shape == (3, 4) and row.shape == (4,)  # broadcast: out of place
    assert torch.equal(ops.residual(x, x), 2 * x)                     # never into the stream itself
