"""The NF4 code itself (QLoRA paper): the codebook, nearest-entry encoding, nibble packing, double
quantization of the block scales, and table-lookup decoding. ``nf4`` builds the leaf kind on it.

- ``CODEBOOK``: the paper's 16 values, quantiles of N(0, 1) scaled to [-1, 1] (derived with
  ``torch.special.ndtri`` exactly as bitsandbytes' ``create_normal_map`` does).
- ``encode_values(flat, blocks)``: (packed codes, block absmax), a chunk of blocks at a time;
  ``double_quantize(absmax)``: int8 scale codes per group of 256, their factors and the mean.
- ``lookup(codes, dtype)`` / ``dequantize_blocks``: one table lookup maps each pair of code bytes
  straight to four values in the compute dtype (an 8-byte table row read as one int64), then one
  multiply per block scale.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F

from purefine.errors import TreeError

BLOCK_SIZE = 64      # values per absmax block
GROUP_SIZE = 256     # block scales per int8 double-quantization group
NORMAL_OFFSET = 0.9677083  # the QLoRA paper's outermost quantile, (1 - 1/(2·15) + 1 - 1/(2·16)) / 2
_CHUNK_BLOCKS = 1 << 14  # blocks per step: 4 MiB float32 temporaries (cache-friendly, few thread syncs)
ERR_NONFINITE = "nf4: {} has non-finite values (inf or nan); refusing to quantize it"


def normal_float_codebook(offset: float = NORMAL_OFFSET) -> torch.Tensor:
    """The 16 NF4 values (16,) float32: 8 positive and 7 negative N(0, 1) quantiles and 0, over max.

    Follows bitsandbytes ``create_normal_map(offset, use_extra_value=True)``: probabilities evenly
    spaced from ``offset`` to 0.5 (float32), quantiles in float64, normalized in float32.
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()
    values = torch.cat([positive, torch.zeros(1), negative]).sort().values
    return values / values.max()


CODEBOOK = normal_float_codebook()


def _decision_boundaries(codebook: torch.Tensor) -> torch.Tensor:
    """(15,) float32: the largest float32 <= each exact midpoint; counting the boundaries below v
    picks the nearest entry in exact arithmetic, ties to the lower (an argmin over |v - c|)."""
    exact = (codebook[:-1].double() + codebook[1:].double()) / 2
    below = exact.float()
    return torch.where(below.double() > exact, torch.nextafter(below, torch.tensor(-math.inf)), below)


_BOUNDARIES = _decision_boundaries(CODEBOOK)

# Nearest-entry search by table instead of a binary search (bucketize is ~2x slower on CPU): v in
# [-1, 1] falls in cell c = trunc((v + 1)·128) of width 1/128; every boundary below cell c - 1 is
# below v, and the window [c - 1, c + 1] holds at most one boundary (they are >= 0.08 apart), so
# code = CELL_BASE[c] + (v > CELL_NEXT[c]) equals the number of boundaries below v, exactly.
_CELLS_PER_UNIT = 128
_cell_starts = (torch.arange(2 * _CELLS_PER_UNIT + 1, dtype=torch.float64) - 1) / _CELLS_PER_UNIT - 1
_CELL_BASE = (_BOUNDARIES.double()[None, :] < _cell_starts[:, None]).sum(1).to(torch.uint8)
_CELL_NEXT = torch.cat([_BOUNDARIES, torch.tensor([math.inf])])[_CELL_BASE.long()]


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes (..., 2k) integers in [0, 16) -> (..., k) uint8: element 2i in the high nibble."""
    return ((codes[..., 0::2] << 4) | codes[..., 1::2]).to(torch.uint8)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """packed (..., k) uint8 -> (..., 2k) uint8 codes in [0, 16), the inverse of ``pack_codes``."""
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).flatten(-2)


def _blocks(flat: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Blocks [start, stop) of a flat weight as (stop - start, 64) float32, zero-padded at the end."""
    chunk = flat[start * BLOCK_SIZE: stop * BLOCK_SIZE].float()
    missing = (stop - start) * BLOCK_SIZE - chunk.numel()
    return (F.pad(chunk, (0, missing)) if missing else chunk).view(stop - start, BLOCK_SIZE)


def _nearest(scaled: torch.Tensor, base: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """scaled (k, 64) float32 in [-1, 1] -> (k, 64) uint8 index of the nearest codebook entry."""
    cell = scaled.mul(_CELLS_PER_UNIT).add_(_CELLS_PER_UNIT).to(torch.int32).view(-1)
    code = base.index_select(0, cell)
    code += scaled.view(-1) > upper.index_select(0, cell)
    return code.view(scaled.shape)


def encode_values(flat: torch.Tensor, num_blocks: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """flat (N,) -> (packed codes (32·B,) uint8, block absmax (B,) float32), a chunk at a time."""
    codes = torch.empty(num_blocks * BLOCK_SIZE // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(num_blocks, dtype=torch.float32, device=flat.device)
    base, upper = _CELL_BASE.to(flat.device), _CELL_NEXT.to(flat.device)
    for start in range(0, num_blocks, _CHUNK_BLOCKS):
        stop = min(start + _CHUNK_BLOCKS, num_blocks)
        blocks = _blocks(flat, start, stop)
        scale = blocks.abs().amax(dim=1)
        if not torch.isfinite(scale).all():
            raise TreeError(ERR_NONFINITE.format(name))
        absmax[start:stop] = scale
        scaled = blocks / torch.where(scale == 0, torch.ones_like(scale), scale)[:, None]
        codes[start * BLOCK_SIZE // 2: stop * BLOCK_SIZE // 2] = pack_codes(_nearest(scaled, base, upper)).view(-1)
    return codes, absmax


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block absmaxes (B,) float32 -> (scale_codes (256·G,) int8, factors (G,) float32, mean ()).

    torchao's ``double_quantize_scalers``: subtract the mean, then int8 absmax quantization per group
    of 256 with factor 256 / (2·max|·|). Padding scales are centred to 0; an all-equal group gets
    factor 1 (its codes are 0) instead of torchao's division by zero.
    """
    mean = absmax.mean()
    groups = -(-absmax.numel() // GROUP_SIZE)
    centred = F.pad(absmax - mean, (0, groups * GROUP_SIZE - absmax.numel())).view(groups, GROUP_SIZE)
    spread = centred.abs().amax(dim=1)
    factors = torch.where(spread > 0, 256 / (2 * spread), torch.ones_like(spread))
    scale_codes = (centred * factors[:, None]).round().clamp(-128, 127).to(torch.int8)
    return scale_codes.view(-1), factors, mean


@functools.lru_cache(maxsize=None)
def _lookup_table(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, int]:
    """(table of int64 rows, code bytes per row): each row holds the 8 bytes of the values that
    ``8 / itemsize`` consecutive codes decode to, so one ``index_select`` decodes several codes."""
    with torch.inference_mode(False), torch.no_grad():
        per_row = 8 // dtype.itemsize // 2  # code bytes per 8-byte row: 2 for 16-bit, 1 for 32-bit
        index = torch.arange(256 ** per_row, dtype=torch.int32)
        if per_row == 2:  # the two bytes of each uint16 index, in memory order
            raw = index.to(torch.uint16).view(torch.uint8).view(-1, 2)
        else:
            raw = index.to(torch.uint8)[:, None]
        values = CODEBOOK.to(dtype)[unpack_codes(raw).long()]  # (rows, 2·per_row)
        return values.contiguous().view(torch.int64).view(-1).to(device), per_row


_INDEX = threading.local()


def _index(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` (uint8 or uint16) as int32 lookup indices; on CPU in this thread's reused buffer (a
    fresh 1-2 MiB index per pass was ~40 GB of allocations per 7B QLoRA step)."""
    if codes.device.type != "cpu" or type(codes) is not torch.Tensor or torch.compiler.is_compiling():
        return codes.int()
    buf = getattr(_INDEX, "buf", None)
    if buf is None or buf.numel() < codes.numel():
        buf = _INDEX.buf = torch.empty(max(codes.numel(), DEQUANT_BLOCKS * BLOCK_SIZE // 2), dtype=torch.int32)
    return buf[: codes.numel()].copy_(codes)


def lookup(codes: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """packed codes (k,) uint8 (k even) -> (2k,) codebook values in ``dtype`` (written into ``out`` if given)."""
    aligned = codes.is_contiguous() and codes.numel() % 2 == 0 and codes.storage_offset() % 2 == 0
    if dtype.itemsize in (2, 4) and aligned:
        table, per_row = _lookup_table(dtype, codes.device)
        index = _index(codes.view(torch.uint16) if per_row == 2 else codes)
        if out is not None and out.is_contiguous():
            torch.index_select(table, 0, index, out=out.view(torch.int64))
            return out
        values = table.index_select(0, index).view(dtype)
    else:
        values = CODEBOOK.to(dtype=dtype, device=codes.device)[unpack_codes(codes).long()]
    return values if out is None else out.copy_(values)


# Blocks of 64 decoded per pass of ``dequantize_blocks``: its index and value temporaries stay ~1-4 MiB
# (reused from the heap) instead of growing with the weight (a 7B MLP weight's would be ~90 MiB each).
DEQUANT_BLOCKS = 1 << 14


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """codes (k·32,) uint8 and scales (k,) in ``dtype`` -> (k, 64) values in ``dtype``, decoded a few
    thousand blocks at a time straight into the result (``out``, k·64 contiguous elements, if given)."""
    k = scales.shape[0]
    if out is None:
        out = torch.empty(k, BLOCK_SIZE, dtype=dtype, device=codes.device)
    else:
        out = out.view(k, BLOCK_SIZE)
    half = BLOCK_SIZE // 2
    for b in range(0, k, DEQUANT_BLOCKS):
        part = out[b : b + DEQUANT_BLOCKS]
        lookup(codes[b * half : (b + part.shape[0]) * half], dtype, out=part.view(-1))
        part.mul_(scales[b : b + part.shape[0], None])
    return out


