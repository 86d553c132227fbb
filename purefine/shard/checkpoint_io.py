"""Checkpoints under a mesh: sharded loading, gathering for saving, per-rank local state.

- ``make_reader(model_cfg, layout, dtype, quantize)``: the ``reader(name, file, file_name)`` that
  ``checkpoint.load_hf`` calls per tensor. Each rank reads only the rows of its own shard
  (``SafetensorsFile.read(name, rows=...)``), narrows other dimensions in memory, and wraps the
  slice as a DTensor (``DTensor.from_local``) with the placements ``plan.shard`` would give it.
  Weights to quantize become NF4: sharded ones (aligned, see ``plan``) are quantized slice by
  slice — the double-quantization mean is taken over all ranks' block scales, so the result equals
  quantizing the whole tensor bit for bit. A weight split over tensor-parallel ranks is read and
  quantized whole, then cut into ``nf4_tp``'s row-block layout. Under pipeline parallelism the
  tensors this rank's stages do not hold are not read at all (meta placeholders keep the shapes).
- ``gather_full(params, layout)``: the whole params tree as plain CPU tensors on rank 0 (None
  elsewhere; NF4 weights in the standard layout), tensor by tensor; pipeline stages send theirs
  to rank 0.

Resumable train state is not here: ``checkpoint.state`` saves and reshards it with
``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import optree
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Placement, Shard

from purefine import models, nf4, tree
from purefine.shard import plan, stages


def local_region(shape: tuple[int, ...], mesh: Any, placements: tuple[Placement, ...]) -> list[tuple[int, int]]:
    """[(start, length)] per tensor dim of this rank's shard (torch.chunk's split, as DTensor's)."""
    region = [(0, n) for n in shape]
    coord = mesh.get_coordinate()
    for i, placement in enumerate(placements):
        if isinstance(placement, Shard):
            start, length = region[placement.dim]
            ranks = mesh.mesh.shape[i]
            step = -(-length // ranks)
            begin = min(coord[i] * step, length)
            region[placement.dim] = (start + begin, min(length, begin + step) - begin)
    return region


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def _dtensor(local: torch.Tensor, mesh: Any, placements: tuple[Placement, ...], shape: tuple[int, ...]) -> DTensor:
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


class _Reader:
    """Reads one rank's slices of a checkpoint (see the module doc)."""

    def __init__(self, model_cfg: Any, layout: Any, dtype: torch.dtype | None, quantize: str | None):
        self.cfg, self.layout, self.dtype = model_cfg, layout, dtype
        self.mesh, self.sizes = layout.mesh, plan.mesh_sizes(layout.mesh)
        self.plan = plan.plan_for(model_cfg)
        self.quantize = re.compile(quantize) if quantize else None
        self.stage_plan = layout.plan_stages(model_cfg) if layout.pp_size > 1 else None

    def __call__(self, name: str, file: Any, file_name: str) -> Any:
        shape = tuple(file.shape(file_name))
        shape = tuple(models.hf_layout(self.cfg, name, torch.empty(shape, device="meta")).shape)  # params' layout
        if self.stage_plan is not None and not self.stage_plan.holds(name, self.layout.pp_rank):
            meta = torch.empty(shape, dtype=self.dtype or file.dtype(file_name), device="meta")
            return self._maybe_quantize(name, meta)
        if self.quantize is not None and self.quantize.fullmatch(name):
            return self._read_nf4(name, file, file_name, shape)
        placements = plan.tensor_placements(shape, plan.style_of(name, self.plan), self.sizes)
        local = self._read_region(name, file, file_name, local_region(shape, self.mesh, placements))
        return _dtensor(self._convert(local), self.mesh, placements, shape)

    def _maybe_quantize(self, name: str, t: torch.Tensor) -> Any:
        return nf4.quantize_tensor(t, name=name) if self.quantize is not None and self.quantize.fullmatch(name) else t

    def _convert(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t
        return t.to(self.layout.device).contiguous()

    def _read_region(self, name: str, file: Any, file_name: str, region: list[tuple[int, int]]) -> torch.Tensor:
        """The tensor's block ``region``, reading only its rows (all of a weight stored transposed)."""
        transposed = models.family(self.cfg).hf_transposed
        if transposed is not None and re.fullmatch(transposed, name):
            t = models.hf_layout(self.cfg, name, file.read(file_name))
        elif region:
            start, length = region[0]
            t = file.read(file_name, rows=slice(start, start + length))
            region = [(0, length), *region[1:]]
        else:
            t = file.read(file_name)
        for d, (start, length) in enumerate(region):
            t = t.narrow(d, start, length)
        return t

    def _read_nf4(self, name: str, file: Any, file_name: str, shape: tuple[int, ...]) -> Any:
        numel, style = math.prod(shape), plan.style_of(name, self.plan)
        if plan.splits_over_tp(style, self.sizes):  # quantized whole, cut into the row-block layout
            q = nf4.quantize_tensor(self._convert(self._read_region(name, file, file_name, [])), name=name)
            return plan.shard_leaf(q, name, style, self.mesh)
        placements = plan.nf4_placements(_Shape(shape), name, style, self.sizes)
        if not isinstance(placements["codes"][1], Shard):  # replicated NF4: read and quantize it whole
            q = nf4.quantize_tensor(self._convert(self._read_region(name, file, file_name, [])), name=name)
            return plan.shard({"w": q}, self.mesh)["w"]
        ranks, rank = self.sizes["dp_shard"], self.mesh.get_local_rank("dp_shard")
        start, stop = rank * numel // ranks, (rank + 1) * numel // ranks
        flat = self._read_flat(name, file, file_name, shape, start, stop)
        codes, absmax = nf4.encode_values(flat, (stop - start) // nf4.BLOCK_SIZE, name)
        pieces = [torch.empty_like(absmax) for _ in range(ranks)]
        dist.all_gather(pieces, absmax, group=self.mesh.get_group("dp_shard"))
        mean = torch.cat(pieces).mean()  # the same reduction as quantizing the whole tensor
        scale_codes, factors = double_quantize_with_mean(absmax, mean)
        blocks, flat_pl = numel // nf4.BLOCK_SIZE, placements["codes"]
        return nf4.NF4(_dtensor(codes, self.mesh, flat_pl, (numel // 2,)),
                       _dtensor(scale_codes, self.mesh, flat_pl, (blocks,)),
                       _dtensor(factors, self.mesh, flat_pl, (blocks // nf4.GROUP_SIZE,)),
                       _dtensor(mean, self.mesh, placements["scale_mean"], ()), shape, flat.dtype)

    def _read_flat(self, name: str, file: Any, file_name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the row-major tensor, reading only the rows that hold them."""
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        first, last = start // cols, -(-stop // cols)
        rows = self._read_region(name, file, file_name, [(first, last - first), *[(0, n) for n in shape[1:]]])
        return self._convert(rows.reshape(-1)[start - first * cols: stop - first * cols])


class _Shape:
    """What ``plan.nf4_placements`` reads of an NF4 leaf: its element count."""

    def __init__(self, shape: tuple[int, ...]):
        self.numel = math.prod(shape)


def double_quantize_with_mean(absmax: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``nf4.double_quantize`` for whole groups of block scales (B,) (B a multiple of 256) whose
    mean over the full tensor is given: (scale_codes (B,) int8, factors (B/256,) float32)."""
    centred = (absmax - mean).view(-1, nf4.GROUP_SIZE)
    spread = centred.abs().amax(dim=1)
    factors = torch.where(spread > 0, 256 / (2 * spread), torch.ones_like(spread))
    scale_codes = (centred * factors[:, None]).round().clamp(-128, 127).to(torch.int8)
    return scale_codes.view(-1), factors


def make_reader(model_cfg: Any, layout: Any, *, dtype: torch.dtype | None = None, quantize: str | None = None) -> Any:
    """``reader(params name, SafetensorsFile, name in the file) -> DTensor / NF4 / meta tensor``."""
    return _Reader(model_cfg, layout, dtype, quantize)


def _full_on_main(x: torch.Tensor, main: bool) -> torch.Tensor | None:
    """The full tensor on the CPU where ``main`` (its own memory: a replicated DTensor's full
    tensor is its local buffer, which a later fused optimizer step would overwrite)."""
    full = x.full_tensor() if isinstance(x, DTensor) else x
    if not main:
        return None
    local = x.to_local() if isinstance(x, DTensor) else None
    shared = local is not None and full.untyped_storage().data_ptr() == local.untyped_storage().data_ptr()
    return full.detach().clone().cpu() if shared else full.detach().cpu()


def gather_full(params: Any, layout: Any) -> Any:
    """The whole tree as plain CPU tensors on the main rank (None elsewhere); every rank calls it."""
    if layout.pp_size == 1:
        full = tree.map(lambda x: _full_on_main(x, layout.is_main), params)
    else:
        full = _gather_stages(params, layout)
    return plan.standard_nf4(full) if layout.is_main else None


def _gather_stages(params: Any, layout: Any) -> Any:
    """Pipeline stages: each tensor gathered in its stage, then sent by the stage's first rank to rank 0."""
    stage_plan = layout.stage_plan
    mine = dict(tree.leaves_with_paths(params))
    leaves, spec = optree.tree_flatten(layout.template, namespace=tree.NAMESPACE)
    paths = [p for p, _ in tree.leaves_with_paths(layout.template)]
    stage_leader = all(c == 0 for c in layout.world_mesh.get_coordinate()[1:])
    values = []
    for path, meta in zip(paths, leaves):
        owner = stages.owner_stage(layout.model_cfg, path, stage_plan.ranges) % stage_plan.pp
        value = None
        if owner == layout.pp_rank:
            value = _full_on_main(mine[path], layout.is_main or stage_leader)
            if owner != 0 and stage_leader:
                dist.send(value.to(layout.device), dst=0)
        elif layout.is_main:
            value = torch.empty(meta.shape, dtype=meta.dtype, device=layout.device)
            leader = int(layout.world_mesh.mesh[(owner,) + (0,) * (layout.world_mesh.ndim - 1)])
            dist.recv(value, src=leader)
            value = value.cpu()
        values.append(value)
    return optree.tree_unflatten(spec, values) if layout.is_main else None
