"""Sharding plans as data, and ``shard`` / ``unshard`` of parameter trees on a device mesh.

A plan is a table ``{weight-path regex: tensor-parallel style}`` (torchtitan's layout): ``colwise``
splits the output rows of a weight (and its bias) over the ``tp`` mesh dimension, ``rowwise`` its
input columns; every other tensor is replicated over ``tp``. Data parallelism needs no entry:

- ``dp_replicate``: every tensor is replicated (gradients all-reduced).
- ``dp_shard`` (FSDP): every tensor is ``Shard(0)`` — or ``Shard(1)`` where tensor parallelism
  already splits dim 0 (a colwise weight), so that the two never split one dimension.

The mesh has three named dimensions ``("dp_replicate", "dp_shard", "tp")`` (any may be 1), and
each tensor gets one placement per dimension. Leaf kinds are sharded child by child:

- ``LoRA`` (colwise): base and B split by rows, A replicated (its gradient is a partial sum over
  ``tp`` ranks; the gather hook says so). Rowwise: base and A split by columns, B replicated.
  DoRA's magnitude follows the rows (colwise); rowwise DoRA is refused (its row norm would need
  a reduction over ``tp``).
- ``NF4``: its flat children (codes, scale codes, scale factors) are ``Shard(0)`` over
  ``dp_shard`` when the weight's element count is a multiple of 64·256·``dp_shard`` — then every
  rank holds whole double-quantization groups, the same blocks in its codes and its scales; any
  other NF4 weight stays replicated (correct, it just saves no memory). A weight the plan splits
  over ``tp`` (QLoRA with tensor parallelism) is stored in ``nf4_tp``'s row-block layout: codes
  (out, in/2) and scale codes (out, in/64) placed like a plain weight of that style, the group
  factors and the mean replicated.

``shard(params, mesh, plan)`` turns a full tree (identical on every rank) into DTensors without
communication; ``unshard(params)`` gathers full plain tensors on every rank.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from purefine import models, nf4, tree
from purefine.errors import ConfigError, TreeError
from purefine.lora import LoRA
from purefine.shard import nf4_tp

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")
COLWISE, ROWWISE = "colwise", "rowwise"
Plan = Mapping[str, str]

# Families without a tensor-parallel table: data parallel and FSDP only.
GENERIC_PLAN: Plan = {}

# How a tp style maps onto a LoRA leaf's children (None: replicated over tp).
LORA_STYLES: dict[str, dict[str, str | None]] = {
    COLWISE: {"base": COLWISE, "lora_a": None, "lora_b": COLWISE, "magnitude": COLWISE},
    ROWWISE: {"base": ROWWISE, "lora_a": ROWWISE, "lora_b": None},
}
NF4_ALIGN = nf4.BLOCK_SIZE * nf4.GROUP_SIZE  # elements per double-quantization group

ERR_DORA_ROW = ("{}: DoRA on a row-parallel weight is not supported under tensor parallelism "
                "(its row norms span tp ranks); use --parallel.dp-shard or leave o_proj/down_proj untargeted")
ERR_KIND = "{}: don't know how to shard a {} leaf (known: tensors, LoRA, NF4)"


def plan_for(model_cfg: Any) -> Plan:
    """The tensor-parallel plan the config's family declares (``Family.tp_plan``; empty: none)."""
    return models.family(model_cfg).tp_plan


def style_of(path: str, plan: Plan) -> str | None:
    """The tp style the first matching plan entry gives ``path`` (full match), or None."""
    for pattern, style in plan.items():
        if re.fullmatch(pattern, path):
            return style
    return None


def mesh_sizes(mesh: Any) -> dict[str, int]:
    """{dimension name: size} of a ("dp_replicate", "dp_shard", "tp") mesh."""
    return dict(zip(mesh.mesh_dim_names, mesh.mesh.shape))


def tensor_placements(shape: tuple[int, ...], style: str | None, sizes: Mapping[str, int]) -> tuple[Placement, ...]:
    """Placements over (dp_replicate, dp_shard, tp) of a plain tensor of ``shape`` with tp ``style``.

    Colwise: ``Shard(0)`` over tp (weights and biases); rowwise: ``Shard(1)`` for 2-D weights (a
    rowwise bias is added after the reduction, so it is replicated). FSDP takes the first dimension
    tp does not split; a 0-d tensor, or a 1-d one tp already splits, is replicated over dp_shard.
    """
    tp: Placement = Replicate()
    if sizes.get("tp", 1) > 1 and style == COLWISE:
        tp = Shard(0)
    elif sizes.get("tp", 1) > 1 and style == ROWWISE and len(shape) >= 2:
        tp = Shard(1)
    used = tp.dim if isinstance(tp, Shard) else None
    free = [d for d in range(len(shape)) if d != used]
    fsdp: Placement = Shard(free[0]) if sizes.get("dp_shard", 1) > 1 and free else Replicate()
    return Replicate(), fsdp, tp


def splits_over_tp(style: str | None, sizes: Mapping[str, int]) -> bool:
    """Whether a weight of tp ``style`` is split over more than one tp rank."""
    return style is not None and sizes.get("tp", 1) > 1


def nf4_placements(q: nf4.NF4, path: str, style: str | None, sizes: Mapping[str, int]) -> dict[str, tuple[Placement, ...]]:
    """Placements of an NF4 leaf's children: flat ``Shard(0)`` over dp_shard when aligned (see the
    module doc), else replicated; the scalar mean is always replicated. Split over tp: the
    row-block layout's codes and scale codes placed like a plain weight of ``style``."""
    rep = (Replicate(),) * 3
    if splits_over_tp(style, sizes):
        nf4_tp.check(tuple(q.shape), path, style, sizes["tp"])
        out, inn = q.shape
        return {"codes": tensor_placements((out, inn // 2), style, sizes), "scale_factors": rep, "scale_mean": rep,
                "scale_codes": tensor_placements((out, inn // nf4.BLOCK_SIZE), style, sizes)}
    n = sizes.get("dp_shard", 1)
    split = n > 1 and q.numel % (NF4_ALIGN * n) == 0
    flat = (Replicate(), Shard(0) if split else Replicate(), Replicate())
    return {"codes": flat, "scale_codes": flat, "scale_factors": flat, "scale_mean": rep}


def leaf_placements(leaf: Any, path: str, style: str | None, sizes: Mapping[str, int]) -> Any:
    """A tree shaped like ``leaf`` (tensor or leaf kind) whose leaves are placement tuples."""
    if isinstance(leaf, torch.Tensor):
        return tensor_placements(tuple(leaf.shape), style, sizes)
    if isinstance(leaf, nf4.NF4):
        return nf4.NF4(**nf4_placements(leaf, path, style, sizes), shape=leaf.shape, dtype=leaf.dtype)
    if isinstance(leaf, LoRA):
        tp_on = style is not None and sizes.get("tp", 1) > 1
        if tp_on and style == ROWWISE and leaf.magnitude is not None:
            raise ConfigError(ERR_DORA_ROW.format(path))
        styles = LORA_STYLES[style] if tp_on else {}
        child = {c: getattr(leaf, c) for c in ("base", "lora_a", "lora_b", "magnitude")}
        placed = {c: None if x is None else leaf_placements(x, f"{path}.{c}", styles.get(c), sizes)
                  for c, x in child.items()}
        return LoRA(**placed, alpha=leaf.alpha, rslora=leaf.rslora, dropout=leaf.dropout)
    raise TreeError(ERR_KIND.format(path, type(leaf).__name__))


def _place(x: torch.Tensor, mesh: Any, placements: tuple[Placement, ...]) -> DTensor:
    """A DTensor of ``x`` with ``placements``: a full local tensor is cut without communication
    (every rank holds the same values); a DTensor is redistributed if needed."""
    if isinstance(x, DTensor):
        same = x.device_mesh == mesh and tuple(x.placements) == tuple(placements)
        return x if same else x.redistribute(mesh, placements)
    return distribute_tensor(x.detach(), mesh, placements, src_data_rank=None)


def tp_layout(leaf: Any, style: str | None, sizes: Mapping[str, int]) -> Any:
    """``leaf`` with its NF4 weights in the row-block layout when ``style`` splits it over tp."""
    if not splits_over_tp(style, sizes):
        return leaf
    return tree.map(lambda x: nf4_tp.to_tp_layout(x) if isinstance(x, nf4.NF4) else x, leaf,
                    is_leaf=lambda x: isinstance(x, (torch.Tensor, nf4.NF4)))


def shard_leaf(leaf: Any, path: str, style: str | None, mesh: Any) -> Any:
    """One weight-level leaf (tensor or leaf kind, the same on every rank) as DTensors on ``mesh``."""
    sizes = mesh_sizes(mesh)
    leaf = tp_layout(leaf, style, sizes)
    placements = leaf_placements(leaf, path, style, sizes)
    return tree.map(lambda x, pl: _place(x, mesh, pl), leaf, placements, is_leaf=lambda x: isinstance(x, torch.Tensor))


def shard(params: tree.Tree, mesh: Any, plan: Plan = GENERIC_PLAN) -> tree.Tree:
    """A new tree whose tensors are DTensors on ``mesh`` placed as ``plan`` and the mesh say.

    ``params`` must hold the same values on every rank (a seeded init, or a checkpoint); tensors
    that are already DTensors (a sharded load) keep or change their placements.
    """
    return tree.map_with_path(lambda path, leaf: shard_leaf(leaf, path, style_of(path, plan), mesh), params,
                              is_leaf=tree.is_leaf)


def tp_layouts(params: tree.Tree, plan: Plan, sizes: Mapping[str, int]) -> tree.Tree:
    """``params`` with every NF4 weight that ``plan`` splits over tp in the row-block layout (the
    global shapes a sharded tree has)."""
    return tree.map_with_path(lambda path, leaf: tp_layout(leaf, style_of(path, plan), sizes), params,
                              is_leaf=tree.is_leaf)


def standard_nf4(params: tree.Tree) -> tree.Tree:
    """``params`` (whole tensors) with NF4 weights in the row-block layout back in the standard one."""
    return tree.map(nf4_tp.from_tp_layout, params, is_leaf=lambda x: isinstance(x, (torch.Tensor, nf4.NF4)))


def unshard(params: tree.Tree) -> tree.Tree:
    """A new tree with every DTensor gathered into a full plain tensor (NF4 weights in their standard
    layout). A collective: every rank of the mesh must call it."""
    return standard_nf4(tree.map(lambda x: x.full_tensor() if isinstance(x, DTensor) else x, params))


def local_nbytes(params: tree.Tree) -> int:
    """Bytes this rank holds for the tensors of ``params`` (a DTensor counts its local shard)."""
    total = 0
    for _, x in tree.leaves_with_paths(params):
        if isinstance(x, torch.Tensor):
            local = x.to_local() if isinstance(x, DTensor) else x
            total += local.numel() * local.element_size()
    return total
