"""The gather hook: FSDP all-gathers and the Megatron tensor-parallel linears.

``make_gather(mesh)`` returns ``gather(subtree) -> subtree``, the hook the models apply to each
block's params just before the block runs (inside activation checkpointing, so it runs again in
backward). For every DTensor it:

1. all-gathers the ``dp_shard`` shards: ``x.redistribute(mesh, [Replicate(), Replicate(), tp])``;
2. returns the local tensor with ``to_local(grad_placements=[Partial(), Partial(), tp])`` — the
   gradient each rank computes is a partial sum over the data-parallel ranks, so autograd
   reduce-scatters it back to the ``Shard`` placement (all-reduces it for ``dp_replicate``).
   Without ``grad_placements`` DTensor would assume a replicated gradient: silently wrong.
3. wraps a weight split over ``tp`` in a tensor-parallel leaf kind, so the model code (which
   reshapes with ``view(b, t, -1, head_dim)``) runs on its local heads unchanged:

   - ``ColumnParallel(weight)``: ``y_local = f(x) W_localᵀ``; ``f`` is the identity forward and an
     all-reduce of the input gradient backward.
   - ``RowParallel(weight)``: ``y = g(x_local W_localᵀ) + bias``; ``g`` all-reduces forward and is
     the identity backward.

   A tensor replicated over tp inside such a weight (LoRA's A in a colwise leaf, B in a rowwise
   one) gets a partial gradient on each tp rank: its grad placement over tp is ``Partial()``.
   An NF4 weight split over tp (``nf4_tp``'s row-block layout) becomes the plain NF4 leaf of this
   rank's rows or columns (``nf4_tp.local_leaf``), dequantizing exactly as the whole weight does.

With no DTensor in the subtree (one process), ``gather`` returns it unchanged.

Memory: with ``remat=True`` a block's gathered weights live only while the block runs (forward,
then its recomputation in backward) — FSDP's saving. Without it autograd keeps every block's
gathered weights until that block's backward. LoRA dropout on a row-parallel input draws its mask
on the local slice, so it differs from a one-process run's mask (same distribution).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from purefine import nf4, ops, tree
from purefine.errors import TreeError
from purefine.shard import nf4_tp


class _CopyToParallel(torch.autograd.Function):
    """Megatron's f: identity forward, all-reduce (sum) of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromParallel(torch.autograd.Function):
    """Megatron's g: all-reduce (sum) forward, identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_parallel(x: torch.Tensor, group: Any) -> torch.Tensor:
    """x (...) unchanged; its gradient is summed over ``group`` (the input of a column-parallel linear)."""
    return _CopyToParallel.apply(x, group)


def reduce_from_parallel(x: torch.Tensor, group: Any) -> torch.Tensor:
    """x (...) summed over ``group``; the gradient passes unchanged (the output of a row-parallel linear)."""
    return _ReduceFromParallel.apply(x, group)


@dataclass(frozen=True)
class _LocalWeight:
    """What both tensor-parallel kinds share: this rank's slice of a weight (a tensor or a leaf kind)."""

    weight: Any
    group: Any = None

    @property
    def shape(self) -> torch.Size:
        """This rank's slice of the weight: (out/tp, in) column-wise, (out, in/tp) row-wise."""
        return torch.Size(self.weight.shape)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of this rank's weight slice."""
        return self.weight.dtype

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The local weight slice as a plain tensor."""
        return self.weight.dense(dtype) if tree.is_kind(self.weight) else self.weight.to(dtype or self.weight.dtype)


@dataclass(frozen=True)
class ColumnParallel(_LocalWeight):
    """A weight whose output rows are split over tp ranks: ``weight`` is this rank's (out/tp, in)
    tensor or leaf kind; ``linear`` gives this rank's (..., out/tp) slice of the output."""

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) replicated -> (..., out/tp) local; ``bias`` is the local (out/tp,) slice."""
        return ops.linear(copy_to_parallel(x, self.group), self.weight, bias)


@dataclass(frozen=True)
class RowParallel(_LocalWeight):
    """A weight whose input columns are split over tp ranks: ``weight`` is this rank's (out, in/tp)
    tensor or leaf kind; ``linear`` sums the partial outputs over tp."""

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in/tp) local -> (..., out) replicated; ``bias`` (out,) is added once, after the sum."""
        y = reduce_from_parallel(ops.linear(x, self.weight), self.group)
        return y if bias is None else y + bias


tree.register_node(ColumnParallel, ("weight",), ("group",))
tree.register_node(RowParallel, ("weight",), ("group",))


def _tp_index(mesh: Any) -> int:
    return mesh.mesh_dim_names.index("tp")


def _tp_split(x: Any, tp: int) -> int | None:
    """The tensor dim a DTensor is split on over tp, or None."""
    if not isinstance(x, DTensor):
        return None
    placement = x.placements[tp]
    return placement.dim if isinstance(placement, Shard) else None


def weight_split(leaf: Any, tp: int) -> int | None:
    """The dim of a weight (out, in) a leaf is split on over tp (0 colwise, 1 rowwise), or None: a
    tensor's own placement, an NF4 weight's codes (row-block layout), a LoRA leaf's base."""
    if isinstance(leaf, nf4.NF4):
        return _tp_split(leaf.codes, tp) if nf4_tp.is_tp_layout(leaf) else None
    if tree.is_kind(leaf) and hasattr(leaf, "base"):
        return weight_split(leaf.base, tp)
    return _tp_split(leaf, tp)


def gather_tensor(x: torch.Tensor, mesh: Any, *, partial_tp: bool = False) -> torch.Tensor:
    """A DTensor (e.g. a weight (out, in) sharded (out/N, in)) -> the plain tensor this rank computes
    with: full over the data-parallel dims,
    its own slice over tp. Gradients flow back as partial sums over the data-parallel dims (and
    over tp when ``partial_tp``); plain tensors pass through."""
    if not isinstance(x, DTensor):
        return x
    tp = _tp_index(x.device_mesh)
    sizes = x.device_mesh.mesh.shape
    keep_tp = x.placements[tp]
    full = x.redistribute(x.device_mesh, [keep_tp if i == tp else Replicate() for i in range(len(sizes))])
    grad = [Partial() if sizes[i] > 1 else Replicate() for i in range(len(sizes))]
    grad[tp] = Partial() if partial_tp and sizes[tp] > 1 else keep_tp
    return full.to_local(grad_placements=grad)


def _gather_kind(leaf: Any, mesh: Any, tp: int) -> Any:
    """A leaf kind with every child gathered; children replicated over tp inside a tp-split LoRA
    weight get partial tp gradients."""
    base_split = weight_split(leaf.base, tp) if hasattr(leaf, "base") else None
    fields = {f.name: getattr(leaf, f.name) for f in dataclasses.fields(leaf)}
    out = {}
    for name, value in fields.items():
        if isinstance(value, torch.Tensor):
            partial = base_split is not None and _tp_split(value, tp) is None and name != "base"
            out[name] = gather_tensor(value, mesh, partial_tp=partial)
        elif tree.is_kind(value):
            out[name] = _gather_kind(value, mesh, tp)
        else:
            out[name] = value
    if nf4_tp.is_tp_layout(leaf):
        return _local_nf4(type(leaf)(**out), weight_split(leaf, tp), mesh)
    return type(leaf)(**out)


def _local_nf4(q: nf4.NF4, split: int | None, mesh: Any) -> nf4.NF4:
    """A row-block NF4 weight with its children gathered (this rank's tp slice) -> its plain NF4 leaf."""
    rank = mesh.get_local_rank("tp") if split is not None else 0
    rows, width = q.codes.shape[0], q.codes.shape[1] * 2
    return nf4_tp.local_leaf(q, rank * rows if split == 0 else 0, rank * width if split == 1 else 0)


def gather_leaf(leaf: Any, mesh: Any, group: Any) -> Any:
    """One weight-level leaf (tensor or leaf kind) ready for compute on this rank; a 2-D weight
    split over tp comes back as ``ColumnParallel`` (dim 0) or ``RowParallel`` (dim 1)."""
    tp = _tp_index(mesh)
    split = weight_split(leaf, tp)
    if isinstance(leaf, torch.Tensor):
        local = gather_tensor(leaf, mesh)
    elif tree.is_kind(leaf):
        local = _gather_kind(leaf, mesh, tp)
    else:
        raise TreeError(f"gather: expected a tensor or a leaf kind, found {type(leaf).__name__}")
    if split is None or len(leaf.shape) != 2:
        return local
    return ColumnParallel(local, group) if split == 0 else RowParallel(local, group)


def make_gather(mesh: Any) -> Callable[[Any], Any]:
    """The ``gather(subtree) -> subtree`` hook for ``models.loss_fn`` / ``hidden_states`` on ``mesh``
    (a ("dp_replicate", "dp_shard", "tp") mesh)."""
    group = mesh.get_group("tp")

    def gather(subtree: Any) -> Any:
        return tree.map(lambda leaf: gather_leaf(leaf, mesh, group), subtree, is_leaf=tree.is_leaf)

    return gather


def settle_grads(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{path: gradient} (each of its parameter's shape, e.g. (out, in)): those left as partial sums
    (a ``Partial`` placement) all-reduced into replicas; the
    gather hook's backward already reduce-scatters / all-reduces the rest."""
    out = {}
    for path, g in grads.items():
        placements = getattr(g, "placements", ())
        if any(p.is_partial() for p in placements):
            g = g.redistribute(g.device_mesh, [Replicate() if p.is_partial() else p for p in placements])
        out[path] = g
    return out
