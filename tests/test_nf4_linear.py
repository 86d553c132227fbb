"""The NF4 linear (forward, input gradient, what backward keeps alive) and NF4 as a tree mapping."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import purefine as pf
from purefine import nf4, ops, tree
from purefine.errors import ConfigError, TreeError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_and_its_input_gradient_equal_f_linear_on_the_dequantized_weight(dtype, with_bias):
    q = nf4.quantize_tensor(torch.randn(96, 200, generator=_gen(0)).to(dtype))
    bias = torch.randn(96, generator=_gen(1), dtype=torch.float32).to(dtype).requires_grad_() if with_bias else None
    x = torch.randn(3, 5, 200, generator=_gen(2)).to(dtype).requires_grad_()
    g = torch.randn(3, 5, 96, generator=_gen(3)).to(dtype)
    y = ops.linear(x, q, bias)  # dispatches to the leaf
    ref_x = x.detach().requires_grad_()
    ref_bias = bias.detach().requires_grad_() if with_bias else None
    ref = F.linear(ref_x, q.dense(dtype), ref_bias)
    assert torch.equal(y, ref)
    wrt = (x, bias) if with_bias else (x,)
    grads = torch.autograd.grad(y, wrt, g)
    ref_grads = torch.autograd.grad(ref, (ref_x, ref_bias) if with_bias else (ref_x,), g)
    for got, want in zip(grads, ref_grads):
        assert torch.equal(got, want)


def test_linear_dequantizes_into_the_activation_dtype():
    q = nf4.quantize_tensor(torch.randn(64, 128, generator=_gen(4)).to(torch.bfloat16))
    x = torch.randn(2, 128, generator=_gen(5))
    y = q.linear(x)
    assert y.dtype == torch.float32 and torch.equal(y, F.linear(x, q.dense(torch.float32)))


def _saved_tensors(fn) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_backward_saves_only_the_packed_codes_and_scales():
    q = nf4.quantize_tensor(torch.randn(512, 1024, generator=_gen(6)))
    x = torch.randn(4, 1024, generator=_gen(7), requires_grad=True)
    saved = _saved_tensors(lambda: nf4.linear(x, q))
    children = {id(t) for t in (q.codes, q.scale_codes, q.scale_factors, q.scale_mean)}
    assert saved and all(id(t) in children for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved) == q.nbytes()
    # the test can fail: the plain formulation saves the dequantized (512, 1024) weight
    naive = _saved_tensors(lambda: F.linear(x, q.dense()))
    assert any(t.numel() == 512 * 1024 and t.is_floating_point() for t in naive)


MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    from purefine import nf4
    torch.set_num_threads(1)
    mode, layers, d = sys.argv[1], 4, 4096
    qs = [nf4.quantize_tensor(torch.randn(d, d)) for _ in range(layers)]
    x = torch.randn(8, d, requires_grad=True)
    def kib(field):
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident size
    base = kib("VmRSS")
    h = x
    for q in qs:
        h = nf4.linear(h, q) if mode == "nf4" else F.linear(h, q.dense())
    h.square().sum().backward()
    print((kib("VmHWM") - base) * 1024)
""")


def _peak_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_backward_never_keeps_a_dequantized_weight_alive():
    """Four 4096x4096 float32 layers (64 MiB each dequantized), forward and backward, in a fresh
    process: the NF4 linear peaks at one dequantized weight plus its int32 index (~1.5x);
    F.linear(x, dense) keeps all four."""
    weight = 4096 * 4096 * 4
    nf4_peak, naive_peak = _peak_bytes("nf4"), _peak_bytes("naive")
    assert nf4_peak < 2 * weight, (nf4_peak / 2**20, naive_peak / 2**20)
    assert naive_peak > 3.5 * weight, (nf4_peak / 2**20, naive_peak / 2**20)


def test_activation_checkpointing_recomputes_through_the_nf4_linear():
    q = nf4.quantize_tensor(torch.randn(64, 128, generator=_gen(8)))
    x = torch.randn(3, 128, generator=_gen(9), requires_grad=True)
    (plain,) = torch.autograd.grad(torch.tanh(nf4.linear(x, q)).sum(), x)
    (remat,) = torch.autograd.grad(checkpoint(lambda h: torch.tanh(nf4.linear(h, q)), x, use_reentrant=False).sum(), x)
    assert torch.equal(plain, remat)


def test_embed_dequantizes_only_the_rows_it_needs():
    q = nf4.quantize_tensor(torch.randn(50, 192, generator=_gen(10)).to(torch.bfloat16))
    tokens = torch.tensor([[3, 0, 49], [7, 7, 12]])
    assert torch.equal(ops.embedding(tokens, q), F.embedding(tokens, q.dense()))
    odd = nf4.quantize_tensor(torch.randn(50, 70, generator=_gen(11)))  # rows straddle blocks: dense path
    assert torch.equal(ops.embedding(tokens, odd), F.embedding(tokens, odd.dense()))


def test_astype_keeps_the_codes_and_changes_the_compute_dtype():
    q = nf4.quantize_tensor(torch.randn(64, 64, generator=_gen(12)))
    half = q.astype(torch.bfloat16)
    assert half.codes is q.codes and half.scale_factors is q.scale_factors and half.dtype == torch.bfloat16
    assert torch.equal(half.dense(), q.dense(torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# the tree mapping


def _params() -> dict:
    g = _gen(13)
    layer = lambda: {"self_attn": {"q_proj": {"weight": torch.randn(64, 32, generator=g)},  # noqa: E731
                                   "v_proj": {"weight": torch.randn(32, 32, generator=g)}},
                     "input_layernorm": {"weight": torch.ones(32)}}
    return {"model": {"layers": [layer(), layer()], "norm": {"weight": torch.ones(32)}}}


def test_quantize_maps_the_matched_weights_and_leaves_the_rest_and_the_input_alone():
    params = _params()
    before = {p: (x, x.clone()) for p, x in tree.flatten(params).items()}
    q = nf4.quantize(params, where=r".*_proj\.weight")
    for path, (obj, copy) in before.items():  # the argument is untouched
        assert tree.flatten(params)[path] is obj and torch.equal(obj, copy)
    leaves = tree.flatten(q, is_leaf=tree.is_leaf)
    assert {p for p, x in leaves.items() if nf4.is_nf4(x)} == {
        f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2) for m in "qv"}
    assert leaves["model.norm.weight"] is params["model"]["norm"]["weight"]
    names = tree.paths(q)
    assert "model.layers.0.self_attn.q_proj.weight.codes" in names
    assert "model.layers.1.self_attn.v_proj.weight.scale_mean" in names
    # dequantize and materialize both give back dense weights of the right shapes
    for dense in (nf4.dequantize(q), tree.materialize(q)):
        for path, (obj, _) in before.items():
            assert tree.flatten(dense)[path].shape == obj.shape
    w = params["model"]["layers"][1]["self_attn"]["q_proj"]["weight"]
    assert torch.equal(nf4.dequantize(q)["model"]["layers"][1]["self_attn"]["q_proj"]["weight"],
                       nf4.quantize_tensor(w).dense())
    again = nf4.quantize(q, where=r".*\.weight")  # NF4 leaves are kept; the norms join them
    q_proj = lambda t: t["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]  # noqa: E731
    assert q_proj(again) is q_proj(q)
    assert nf4.is_nf4(again["model"]["norm"]["weight"])


def test_quantize_refuses_patterns_that_match_nothing_or_do_not_compile():
    with pytest.raises(ConfigError, match=r"k_proj.*matches no weight path \(paths look like model\.layers\.0\."):
        nf4.quantize(_params(), where=r".*\.k_proj\.weight")
    with pytest.raises(ConfigError, match="not a valid regex"):
        nf4.quantize(_params(), where="(")
    with pytest.raises(TreeError, match=r"model\.ids.*floating"):
        nf4.quantize({"model": {"ids": torch.arange(64)}}, where=".*")


def test_quantize_hook_streams_tensors_into_nf4():
    hook = nf4.quantize_hook(r".*q_proj\.weight", then=lambda name, x: (name, x))
    w = torch.randn(64, 32, generator=_gen(14))
    name, out = hook("a.q_proj.weight", w)
    assert name == "a.q_proj.weight" and nf4.is_nf4(out) and torch.equal(out.dense(), nf4.quantize_tensor(w).dense())
    assert hook("a.v_proj.weight", w)[1] is w
    assert hook.matched == ["a.q_proj.weight"]


def test_models_init_straight_into_nf4_equals_quantizing_afterwards():
    cfg = pf.models.preset("llama-debug")
    pattern = r".*_proj\.weight"
    streamed = pf.models.init(cfg, seed=3, hook=nf4.quantize_hook(pattern))
    after = nf4.quantize(pf.models.init(cfg, seed=3), where=pattern)
    a, b = tree.flatten(streamed), tree.flatten(after)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = pf.models.init(cfg, device="meta", hook=nf4.quantize_hook(pattern))
    assert all(x.is_meta for x in tree.flatten(meta).values())
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=_gen(15))
    logits = pf.models.forward(cfg, streamed, tokens)
    assert torch.equal(logits, pf.models.forward(cfg, nf4.dequantize(streamed), tokens))


@pytest.fixture
def scratch_for_every_size(monkeypatch):
    """Scratch buffers for weights of any size (the default; pinned here against a change of it)."""
    monkeypatch.setattr(nf4, "SCRATCH_MIN_BYTES", 0)
    nf4.release_scratch()
    yield
    nf4.release_scratch()


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("block_rows", [None, 16, 24])
def test_reused_dequantization_buffers_change_no_value(scratch_for_every_size, monkeypatch, remat, block_rows):
    """Two weights of one shape (sharing a scratch buffer), a third of another, chained, with and
    without checkpointing, dequantized whole or a block of output rows at a time (an uneven last block
    included): outputs and gradients equal those over fresh dense weights."""
    if block_rows is not None:
        monkeypatch.setattr(nf4, "DEQUANT_BLOCK_BYTES", block_rows * 128 * 4)
    qs = [nf4.quantize_tensor(torch.randn(64, 64, generator=_gen(i))) for i in range(2)]
    qs.append(nf4.quantize_tensor(torch.randn(64, 128, generator=_gen(2))))
    x = torch.randn(4, 128, generator=_gen(3), requires_grad=True)
    ref_x = x.detach().requires_grad_()

    def net(x, linear):
        h = linear(x, qs[2])
        return linear(torch.tanh(linear(h, qs[0])), qs[1])

    def run(x, linear):
        return checkpoint(net, x, linear, use_reentrant=False) if remat else net(x, linear)

    y = run(x, ops.linear)
    ref = run(ref_x, lambda x, q: F.linear(x, q.dense()))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=5e-5)  # block sums round apart
    g = torch.randn(4, 64, generator=_gen(4))
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, ref_x, g)[0],
                               rtol=1e-5, atol=5e-5)
    assert nf4._SCRATCH.buffers, "the scratch path was not taken"
    if block_rows is not None:  # the 128-wide weight went in blocks: its buffer holds block_rows rows
        assert (block_rows * 128, torch.float32) in nf4._SCRATCH.buffers


@pytest.mark.parametrize("width, rows", [(128, 16), (96, 40)])
def test_blocked_linear_with_bias_and_batch_dims(scratch_for_every_size, monkeypatch, width, rows):
    """A (B, T, in) input and a bias through the row-block path (3 blocks, the last one short; or, for rows
    that are not whole NF4 blocks, the whole weight as one block in a reused buffer): output and the
    input and bias gradients equal F.linear over the dense weight."""
    monkeypatch.setattr(nf4, "DEQUANT_BLOCK_BYTES", 16 * width * 4)
    q = nf4.quantize_tensor(torch.randn(40, width, generator=_gen(5)))
    assert nf4._block_rows(q, torch.empty(1, width)) == rows
    bias = torch.randn(40, generator=_gen(6), requires_grad=True)
    x = torch.randn(2, 3, width, generator=_gen(7), requires_grad=True)
    ref_x, ref_bias = x.detach().requires_grad_(), bias.detach().requires_grad_()
    y, ref = ops.linear(x, q, bias), F.linear(ref_x, q.dense(), ref_bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=5e-5)
    g = torch.randn(2, 3, 40, generator=_gen(8))
    got, want = torch.autograd.grad(y, (x, bias), g), torch.autograd.grad(ref, (ref_x, ref_bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-5)


def test_double_backward_through_reused_buffers(scratch_for_every_size):
    """create_graph=True: the input gradient's own graph keeps its weight, so it must not be a scratch buffer."""
    qs = [nf4.quantize_tensor(torch.randn(32, 32, generator=_gen(i))) for i in range(2)]
    x = torch.randn(3, 32, generator=_gen(2), requires_grad=True)
    ref_x = x.detach().requires_grad_()
    y = ops.linear(torch.tanh(ops.linear(x, qs[0])), qs[1]).pow(2).sum()
    ref = F.linear(torch.tanh(F.linear(ref_x, qs[0].dense())), qs[1].dense()).pow(2).sum()
    (gx,) = torch.autograd.grad(y, x, create_graph=True)
    (ref_gx,) = torch.autograd.grad(ref, ref_x, create_graph=True)
    assert torch.equal(gx, ref_gx)
    assert torch.equal(torch.autograd.grad(gx.sum(), x)[0], torch.autograd.grad(ref_gx.sum(), ref_x)[0])


def test_scratch_buffers_are_few_and_only_for_cpu_weights_above_the_threshold(monkeypatch):
    nf4.release_scratch()
    small = nf4.quantize_tensor(torch.randn(16, 64))
    assert nf4._block_rows(small, torch.empty(1, 64)) >= 16                   # by default: one reused block
    assert nf4._block_rows(small, torch.empty(1, 64, device="meta")) is None  # not on the CPU: a fresh copy
    monkeypatch.setattr(nf4, "SCRATCH_MIN_BYTES", 32 << 20)
    assert nf4._block_rows(small, torch.empty(1, 64)) is None                 # below the threshold: the heap
    big = nf4.SCRATCH_MIN_BYTES // 4
    sizes = [big + i for i in range(nf4.SCRATCH_BUFFERS + 2)]
    first = nf4._buffer(sizes[0], torch.float32)
    assert nf4._buffer(sizes[0], torch.float32) is first  # reused
    for n in sizes[1:]:
        nf4._buffer(n, torch.float32)
    assert len(nf4._SCRATCH.buffers) == nf4.SCRATCH_BUFFERS
    assert (sizes[0], torch.float32) not in nf4._SCRATCH.buffers  # least recently used went first
    nf4.release_scratch()
