"""NF4 numerics: the paper's codebook, nearest-entry coding, the double-quantization error bound,
packing, padding, storage, and bit-for-bit agreement with torchao's NF4Tensor (when installed)."""

from __future__ import annotations

import importlib
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from purefine import nf4, tree
from purefine.errors import TreeError

# The NF4 data type, Appendix E of the QLoRA paper (Dettmers et al., 2023), as bitsandbytes stores it
# (bitsandbytes/functional.py, the 4-bit NF4 lookup table).
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
WIDEST_GAP = max(b - a for a, b in zip(PAPER_NF4, PAPER_NF4[1:]))
FP32_SLACK = 4 * 2.0 ** -24  # a few float32 roundings, relative to the block scale

SETTINGS = settings(max_examples=30, deadline=None)


def test_codebook_is_the_papers_sixteen_values():
    assert nf4.CODEBOOK.dtype == torch.float32
    assert torch.equal(nf4.CODEBOOK, torch.tensor(PAPER_NF4, dtype=torch.float32))


def test_codebook_values_are_normal_quantiles():
    """Checked the other way round, with the normal CDF: entry i of the 8 positive (7 negative)
    values sits at probability linspace(offset, 0.5, 9 (8))[i] once scaled back by ndtri(offset)."""
    book = torch.tensor(PAPER_NF4, dtype=torch.float64)
    top = torch.special.ndtri(torch.tensor(nf4.NORMAL_OFFSET, dtype=torch.float64))
    positive = torch.special.ndtr(book[8:].flip(0) * top)
    negative = torch.special.ndtr(-book[:7] * top)
    assert torch.allclose(positive, torch.linspace(nf4.NORMAL_OFFSET, 0.5, 9, dtype=torch.float64)[:-1], atol=2e-7)
    assert torch.allclose(negative, torch.linspace(nf4.NORMAL_OFFSET, 0.5, 8, dtype=torch.float64)[:-1], atol=2e-7)
    assert (book < 0).sum() == 7 and (book > 0).sum() == 8 and (book == 0).sum() == 1


def _probe_block(values: torch.Tensor) -> torch.Tensor:
    """A weight of 64-blocks each holding a 1.0 (so the block scale is 1) and 63 probe values."""
    pad = (-values.numel()) % 63
    probes = torch.cat([values, torch.zeros(pad)]).view(-1, 63)
    return torch.cat([torch.ones(probes.shape[0], 1), probes], dim=1).reshape(-1)


def test_codes_are_the_nearest_entry_ties_to_lower():
    """Every float32 within 40 ulps of each midpoint, and a dense sweep, code to argmin |v - c|."""
    probes = [torch.linspace(-1, 1, 200_001)]
    for a, b in zip(PAPER_NF4, PAPER_NF4[1:]):
        mid = torch.tensor((a + b) / 2, dtype=torch.float32)
        down, up = [mid], [mid]
        for _ in range(40):
            down.append(torch.nextafter(down[-1], torch.tensor(-2.0)))
            up.append(torch.nextafter(up[-1], torch.tensor(2.0)))
        probes += [torch.stack(down), torch.stack(up)]
    w = _probe_block(torch.cat(probes))
    codes = nf4.unpack_codes(nf4.quantize_tensor(w).codes)[: w.numel()].long()
    expected = (w[:, None] - nf4.CODEBOOK[None, :]).abs().argmin(dim=1)  # first index on ties
    assert torch.equal(codes, expected)


def _weights(draw, max_rows: int = 6, max_cols: int = 200) -> torch.Tensor:
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    kind = draw(st.sampled_from(["any", "gauss"]))
    if kind == "any":
        values = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
        w = torch.from_numpy(draw(arrays(np.float32, (rows, cols), elements=values)).copy())
    else:
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        w = torch.randn(rows, cols, generator=gen) * draw(st.sampled_from([1e-3, 0.02, 1.0, 50.0]))
    return w.to(draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])))


def _true_block_absmax(w: torch.Tensor) -> torch.Tensor:
    flat = w.float().reshape(-1)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 64)])
    return flat.view(-1, 64).abs().amax(dim=1)


def _per_block(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    return torch.cat([flat, flat.new_zeros((-flat.numel()) % 64)]).view(-1, 64)


@SETTINGS
@given(st.data())
def test_roundtrip_error_within_the_double_quantization_bound(data):
    w = _weights(data.draw)
    q = nf4.quantize_tensor(w)
    s = _true_block_absmax(w).double()
    s_dq = nf4.block_scales(q).double()
    error = _per_block((q.dense(torch.float32).double() - w.double()).abs())
    bound = WIDEST_GAP / 2 * s + (s - s_dq).abs() + FP32_SLACK * (s + s_dq.abs())
    assert (error <= bound[:, None]).all()
    # the weight's own dtype decodes the same values up to that dtype's rounding
    half = q.dense().double() - q.dense(torch.float32).double()
    eps = torch.finfo(w.dtype).eps
    assert (_per_block(half.abs()) <= 3 * eps * s_dq.abs()[:, None] + 2.0**-24).all()  # fp16 subnormals


@SETTINGS
@given(st.data())
def test_codes_are_nearest_to_the_block_scaled_value(data):
    w = _weights(data.draw)
    q = nf4.quantize_tensor(w)
    s = _true_block_absmax(w)
    scaled = _per_block(w.float()) / torch.where(s == 0, 1.0, s)[:, None]
    codes = nf4.unpack_codes(q.codes).view(-1, 64).long()
    chosen = (scaled - nf4.CODEBOOK[codes]).abs()
    best = (scaled[..., None] - nf4.CODEBOOK).abs().amin(dim=-1)
    assert torch.equal(chosen, best)


@SETTINGS
@given(st.data())
def test_requantizing_the_dequantized_weight(data):
    """quantize(dequantize(q)): the same 4-bit codes, first-level scales exactly q's s'_b, and the
    int8 scale codes redone within one step (their mean moved: mean(s') is not mean(s))."""
    w = _weights(data.draw).float()
    q = nf4.quantize_tensor(w)
    again = nf4.quantize_tensor(q.dense())
    s, s_dq = _true_block_absmax(w), nf4.block_scales(q)
    assert torch.equal(_true_block_absmax(q.dense()), torch.where(s == 0, 0.0, s_dq.abs()))
    # blocks whose double-quantized scale fell to <= 0 (absmax below 1/256 of the group's spread,
    # torchao's rounding) decode sign-flipped or to zero; every other block keeps its codes
    kept = (s == 0) | (s_dq > 0)
    codes, codes_again = (nf4.unpack_codes(x.codes).view(-1, 64) for x in (q, again))
    assert torch.equal(codes[kept], codes_again[kept])
    first_level = torch.where(s == 0, 0.0, s_dq.abs())
    step = 1 / again.scale_factors.repeat_interleave(256)[: q.num_blocks]
    assert ((nf4.block_scales(again) - first_level).abs() <= step + 2.0**-21 * first_level).all()


def test_realistic_weights_keep_positive_scales_and_requantize_to_the_same_codes():
    gen = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(4.0).sample((512, 1024)) * 0.02
    w[torch.rand(512, 1024, generator=gen) < 1e-4] *= 30  # a few outliers
    q = nf4.quantize_tensor(w)
    assert (nf4.block_scales(q) > 0).all()
    assert torch.equal(nf4.quantize_tensor(q.dense()).codes, q.codes)


@SETTINGS
@given(st.data())
def test_packing_round_trip(data):
    n = 2 * data.draw(st.integers(1, 300))
    codes = torch.from_numpy(data.draw(arrays(np.uint8, n, elements=st.integers(0, 15))).copy())
    packed = nf4.pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == n // 2
    assert torch.equal(nf4.unpack_codes(packed), codes)
    assert torch.equal(packed, (codes[0::2] * 16 + codes[1::2]).to(torch.uint8))  # element 2i high
    raw = torch.from_numpy(data.draw(arrays(np.uint8, n // 2)).copy())
    assert torch.equal(nf4.pack_codes(nf4.unpack_codes(raw)), raw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fast_lookup_equals_plain_indexing(dtype):
    gen = torch.Generator().manual_seed(1)
    q = nf4.quantize_tensor(torch.randn(130, 200, generator=gen).to(dtype))
    plain = nf4.CODEBOOK.to(dtype)[nf4.unpack_codes(q.codes).long()].view(-1, 64) * nf4.block_scales(q, dtype)[:, None]
    assert torch.equal(q.dense(), plain.reshape(-1)[: q.numel].view(q.shape))


@pytest.mark.parametrize("shape", [(1,), (3, 5), (7, 100), (300, 70), (2, 3, 50)])
def test_padding_is_documented_and_harmless(shape):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(*shape, generator=gen)
    q = nf4.quantize_tensor(w)
    blocks, groups = math.ceil(w.numel() / 64), math.ceil(math.ceil(w.numel() / 64) / 256)
    assert q.codes.shape == (blocks * 32,) and q.scale_codes.shape == (groups * 256,)
    assert q.scale_factors.shape == (groups,) and q.scale_mean.shape == ()
    assert torch.equal(q.scale_mean, _true_block_absmax(w).mean())  # the real blocks only
    codes = nf4.unpack_codes(q.codes)
    assert (codes[w.numel():] == 7).all() and nf4.CODEBOOK[7] == 0  # zeros code to the 0.0 entry
    assert (q.scale_codes[blocks:] == 0).all()  # padded scales sit at the mean
    d = q.dense()
    assert d.shape == w.shape and d.dtype == w.dtype
    scale_error = (nf4.block_scales(q) - _true_block_absmax(w)).abs().max()
    assert (d - w).abs().max() <= WIDEST_GAP / 2 * w.abs().max() + scale_error + 1e-6


def test_zero_blocks_and_constant_groups_decode_exactly():
    w = torch.zeros(4, 64)
    w[1] = 3.0  # block 1: all +3; blocks 0, 2, 3: all zero
    d = nf4.quantize_tensor(w).dense()
    assert torch.isfinite(d).all() and torch.equal(d[[0, 2, 3]], torch.zeros(3, 64))
    assert torch.allclose(d[1], torch.full((64,), 3.0), rtol=0.01)
    const = nf4.quantize_tensor(torch.full((8, 64), -0.5))  # every block the same scale: spread 0
    assert torch.equal(const.scale_factors, torch.ones(1)) and torch.equal(const.dense(), torch.full((8, 64), -0.5))


def test_bad_tensors_are_refused_by_name():
    with pytest.raises(TreeError, match=r"layers\.0\.w.*floating"):
        nf4.quantize_tensor(torch.ones(4, 64, dtype=torch.int64), name="layers.0.w")
    with pytest.raises(TreeError, match="empty_w.*at least one element"):
        nf4.quantize_tensor(torch.ones(0, 64), name="empty_w")
    bad = torch.randn(4, 64)
    bad[2, 5] = float("nan")
    with pytest.raises(TreeError, match="nan_w.*non-finite"):
        nf4.quantize_tensor(bad, name="nan_w")


def test_storage_at_most_4_13_bits_per_parameter():
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(3))
    q = nf4.quantize_tensor(w)
    bits = 8 * tree.nbytes({"w": q}) / w.numel()
    assert bits == 8 * q.nbytes() / w.numel()
    assert bits <= 4.13, bits
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)


def test_7b_shaped_layer():
    """One Llama-2-7B MLP weight (4096 x 11008, bf16): bytes exactly as the format says, and the
    time to quantize and to dequantize printed (run with -s); no timing is asserted."""
    w = (torch.randn(4096, 11008, generator=torch.Generator().manual_seed(6)) * 0.02).to(torch.bfloat16)
    start = time.perf_counter()
    q = nf4.quantize_tensor(w)
    quantize_s = time.perf_counter() - start
    start = time.perf_counter()
    d = q.dense()
    dequantize_s = time.perf_counter() - start
    blocks = w.numel() // 64
    assert q.nbytes() == w.numel() // 2 + blocks + 4 * math.ceil(blocks / 256) + 4
    assert 8 * q.nbytes() / w.numel() <= 4.13
    rows = slice(4000, 4096)  # spot check against plain indexing, from the tail of the weight
    plain = nf4.CODEBOOK.to(torch.bfloat16)[nf4.unpack_codes(q.codes.view(4096, -1)[rows]).long()].view(-1, 64)
    plain = plain * nf4.block_scales(q, torch.bfloat16).view(4096, -1)[rows].reshape(-1, 1)
    assert torch.equal(d[rows], plain.view(96, 11008))
    print(f"4096x11008 bf16: quantize {quantize_s:.2f} s, dequantize {dequantize_s * 1e3:.0f} ms "
          f"({d.numel() * 2 / dequantize_s / 1e9:.2f} GB/s out), {q.nbytes()} bytes "
          f"({8 * q.nbytes() / w.numel():.4f} bits/param) vs {w.numel() * 2} in bf16")


def test_meta_tensors_give_meta_leaves_of_the_right_sizes():
    q = nf4.quantize_tensor(torch.empty(100, 300, device="meta", dtype=torch.bfloat16))
    real = nf4.quantize_tensor(torch.zeros(100, 300, dtype=torch.bfloat16))
    for child in ("codes", "scale_codes", "scale_factors", "scale_mean"):
        meta, full = getattr(q, child), getattr(real, child)
        assert meta.is_meta and meta.shape == full.shape and meta.dtype == full.dtype
    assert q.shape == (100, 300) and q.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# torchao's NF4Tensor as the independent reference (test-only: `pip install --no-deps torchao`)


def _torchao():
    pytest.importorskip("torchao", reason="torchao is not installed (optional test-only reference)",
                        exc_type=ImportError)
    for module in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
        try:  # the module moved in torchao 0.1x
            return importlib.import_module(module)
        except ImportError:
            continue
    pytest.skip("this torchao has no NF4Tensor module")


@pytest.mark.parametrize("shape", [(256, 64), (512, 512), (64, 16384 * 2)])
def test_quantization_equals_torchao_bit_for_bit(shape):
    """float32 weights: torchao's own quantization routines, given the paper's codebook (torchao's
    table is rounded to 4 decimals), produce exactly our codes, scale codes, factors and mean."""
    ao = _torchao()
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(4)) * 0.02
    q = nf4.quantize_tensor(w)
    scale_codes, factors, mean = ao.NF4Tensor.double_quantize_scalers(w.flatten(), 64, 256)
    codes = ao.NF4Tensor.convert_to_norm_float_weight(w, w.numel() // 64, 64, nf4.CODEBOOK)
    assert torch.equal(codes, q.codes)
    assert torch.equal(scale_codes, q.scale_codes)
    assert torch.equal(factors, q.scale_factors)
    assert torch.equal(mean, q.scale_mean)


def test_torchao_codebook_is_ours_rounded():
    ao = _torchao()
    stock = ao.NF4Tensor.from_tensor(torch.randn(64, 256), 64, 256).nf4
    assert torch.allclose(stock, nf4.CODEBOOK, atol=5e-5, rtol=0)


def _torchao_tensor(ao, q: nf4.NF4, dtype: torch.dtype, scale_codes, factors, mean):
    stride = torch.empty(q.shape).stride()
    meta = ao.SubclassTensorArgs(torch.Size(q.shape), stride, 0, dtype, torch.device("cpu"), False)
    return ao.NF4Tensor(meta, 64, q.num_blocks, 256, scale_codes, factors, mean, q.codes, nf4.CODEBOOK.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantization_equals_torchao_bit_for_bit(dtype):
    """torchao's ``get_original_weight`` on our codes and scales. float32: all of it, the double
    quantization included. Half precision: we decode s'_b in float32 and round once (torchao rounds
    before adding the mean), so torchao is handed those float32 scales (factor 1, mean 0) and does
    the codebook lookup, the per-block multiply and the nibble interleaving in ``dtype``."""
    ao = _torchao()
    torch.manual_seed(5)
    w = (torch.distributions.StudentT(4.0).sample((384, 512)) * 0.02).to(dtype)
    q = nf4.quantize_tensor(w)
    full = _torchao_tensor(ao, q, torch.float32, q.scale_codes, q.scale_factors, q.scale_mean)
    assert torch.equal(q.dense(torch.float32), full.get_original_weight())
    scales = full.dequantize_scalers(q.scale_codes, q.scale_factors, 256)  # torchao's s'_b, float32
    first_level = _torchao_tensor(ao, q, dtype, scales, torch.ones(q.num_blocks // 256), torch.zeros((), dtype=dtype))
    assert torch.equal(q.dense(), first_level.get_original_weight())


@SETTINGS
@given(rows=st.integers(1, 40), cols=st.sampled_from([64, 192, 4096]), data=st.data())
def test_some_block_scales_equal_the_whole_weights_scales_at_those_blocks(rows, cols, data):
    """A block matmul decodes only its own rows' scales: bit for bit the slice (or gather) of the whole."""
    q = nf4.quantize_tensor(torch.randn(rows * 8, cols, generator=torch.Generator().manual_seed(rows)))
    full = nf4.block_scales(q, torch.bfloat16)
    start = data.draw(st.integers(0, q.num_blocks - 1))
    stop = data.draw(st.integers(start + 1, q.num_blocks))
    assert torch.equal(nf4.some_block_scales(q, slice(start, stop), torch.bfloat16), full[start:stop])
    index = torch.tensor(data.draw(st.lists(st.integers(0, q.num_blocks - 1), min_size=1, max_size=50)))
    assert torch.equal(nf4.some_block_scales(q, index, torch.bfloat16), full[index])
    assert torch.equal(nf4.some_block_scales(q, slice(start, stop)), nf4.block_scales(q)[start:stop])  # float32
