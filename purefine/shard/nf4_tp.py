"""NF4 weights under tensor parallelism: a row-block layout whose blocks split over tp ranks, and
the exact local leaf each rank computes with.

A standard ``nf4.NF4`` stores flat children over the row-major weight. Tensor parallelism splits a
weight W (out, in) by rows (colwise) or by columns (rowwise). When ``in`` is a multiple of 64 every
row is whole blocks of 64, and the same children, reshaped, split like any (out, x) weight:

    codes          (out, in/2)   uint8    each row's packed codes
    scale_codes    (out, in/64)  int8     each row's block scale codes (the padding to 256·G dropped)
    scale_factors  (G,)          float32  one per group of 256 consecutive blocks of the whole weight
    scale_mean     ()            float32

``codes`` and ``scale_codes`` take the placements of a plain weight with the same tp style
(``Shard(0)`` over tp colwise, ``Shard(1)`` rowwise; FSDP the other dimension); the group factors
and the mean are small and replicated. The quantization is the whole tensor's (the same bits a
one-process run holds), so a tensor-parallel run computes what one process computes.

Requirements, checked with an error naming the weight: ``in`` a multiple of 64, ``out``
divisible by tp (colwise) or ``in / tp`` a multiple of 64 (rowwise: no block crosses the split).

``local_leaf`` turns a rank's gathered slice — rows [r0, r0 + out_l), columns [c0, c0 + in_l) —
into a plain NF4 leaf (out_l, in_l) whose scale factors are one per block (the factor of the
block's group in the whole weight): ``nf4.block_scales`` then gives exactly the whole tensor's
block scales s'_b, and ``nf4.linear`` runs on the slice unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from purefine import nf4
from purefine.errors import ConfigError

ERR_SHAPE = ("{}: an NF4 weight split over {} tensor-parallel ranks ({}) needs {}, found shape {}; "
             "use --parallel.dp-shard (FSDP) for this model, or leave it unquantized")


def check(shape: tuple[int, ...], path: str, style: str, tp: int) -> None:
    """Raise ConfigError unless a weight of ``shape`` can be split ``style`` over ``tp`` ranks in NF4."""
    if len(shape) != 2 or shape[1] % nf4.BLOCK_SIZE:
        raise ConfigError(ERR_SHAPE.format(path, tp, style, "a 2-D weight whose rows are whole blocks of 64", shape))
    if style == "colwise" and shape[0] % tp:
        raise ConfigError(ERR_SHAPE.format(path, tp, style, f"a row count divisible by {tp}", shape))
    if style == "rowwise" and (shape[1] % tp or (shape[1] // tp) % nf4.BLOCK_SIZE):
        raise ConfigError(ERR_SHAPE.format(path, tp, style, f"columns per rank (in / {tp}) a multiple of 64", shape))


def is_tp_layout(q: Any) -> bool:
    """Whether an NF4 leaf is in the row-block layout (its codes are 2-D)."""
    return isinstance(q, nf4.NF4) and q.codes.dim() == 2


def to_tp_layout(q: nf4.NF4) -> nf4.NF4:
    """A standard NF4 leaf of a weight (out, in) in the row-block layout (views, no copy)."""
    if is_tp_layout(q):
        return q
    out, inn = q.shape
    blocks = out * inn // nf4.BLOCK_SIZE
    return nf4.NF4(q.codes.view(out, inn // 2), q.scale_codes[:blocks].view(out, inn // nf4.BLOCK_SIZE),
                   q.scale_factors, q.scale_mean, q.shape, q.dtype)


def from_tp_layout(q: nf4.NF4) -> nf4.NF4:
    """The standard NF4 leaf of a whole weight in the row-block layout (scale codes padded with
    zeros, the code every padding block has)."""
    if not is_tp_layout(q):
        return q
    scale_codes = q.scale_codes.reshape(-1)
    padding = q.scale_factors.numel() * nf4.GROUP_SIZE - scale_codes.numel()
    return nf4.NF4(q.codes.reshape(-1), F.pad(scale_codes, (0, padding)), q.scale_factors, q.scale_mean,
                   q.shape, q.dtype)


def local_leaf(q: nf4.NF4, row0: int, col0: int) -> nf4.NF4:
    """A rank's slice of a row-block NF4 weight (children: codes (out_l, in_l/2), scale codes
    (out_l, in_l/64), the whole weight's factors and mean; ``shape`` the whole (out, in)) starting
    at row ``row0``, column ``col0`` -> a plain NF4 leaf (out_l, in_l) that dequantizes exactly to
    those rows and columns of the whole weight."""
    rows, width = q.codes.shape[0], q.codes.shape[1] * 2
    per_row = q.shape[1] // nf4.BLOCK_SIZE
    row_ids = torch.arange(row0, row0 + rows, device=q.codes.device)[:, None]
    col_ids = torch.arange(col0 // nf4.BLOCK_SIZE, (col0 + width) // nf4.BLOCK_SIZE, device=q.codes.device)[None, :]
    groups = (row_ids * per_row + col_ids).reshape(-1) // nf4.GROUP_SIZE
    return nf4.NF4(q.codes.reshape(-1), q.scale_codes.reshape(-1), q.scale_factors[groups], q.scale_mean,
                   (rows, width), q.dtype)
