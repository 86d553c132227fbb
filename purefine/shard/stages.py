"""Pipeline stages as data: which layers and weights each stage and each pipeline rank holds.

- ``stage_ranges(num_layers, stages)``: contiguous, balanced layer ranges (earlier stages take one
  more when uneven).
- ``owner_stage(model_cfg, path, ranges)``: the stage that owns a weight: its layer's stage; the
  family's ``first_stage`` modules on stage 0, its ``last_stage`` modules on the last.
- ``tied_paths(model_cfg)``: the output projection's path when it is the embedding (tied
  embeddings): stage 0 owns it and the last stage holds a copy for the head.
- ``StagePlan`` (from ``plan_stages``): the layer range of every stage, which stages a pipeline
  rank runs (``stages_per_rank`` > 1: virtual stages for interleaved schedules, stage s on rank
  s mod pp, as ``torch.distributed.pipelining`` places them), which ranks hold a weight, and a
  rank's part of the params tree (``rank_params``: other ranks' weights set to None — paths keep
  their global layer index, so plans, filters, optimizer state and saved names do not change).
- ``meta_template(params)``: the tree with every tensor an empty meta tensor (shapes, no memory).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from purefine import models, tree
from purefine.errors import ConfigError


def stage_ranges(num_layers: int, stages: int) -> list[range]:
    """Balanced contiguous layer ranges, the earlier stages taking one more when uneven."""
    if num_layers < stages:
        raise ConfigError(f"--parallel.pp: the model has only {num_layers} layers to split into {stages} stages")
    base, extra = divmod(num_layers, stages)
    bounds = [0]
    for s in range(stages):
        bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


def owner_stage(model_cfg: Any, path: str, ranges: Sequence[range]) -> int:
    """The stage that owns the tensor at ``path`` (see the module doc)."""
    fam = models.family(model_cfg)
    match = re.fullmatch(re.escape(fam.layers) + r"\.(\d+)\..*", path)
    if match:
        layer = int(match.group(1))
        return next(s for s, r in enumerate(ranges) if layer in r)
    if path.startswith(tuple(m + "." for m in fam.first_stage)):
        return 0
    if path.startswith(tuple(m + "." for m in fam.last_stage)):
        return len(ranges) - 1
    raise ConfigError(f"--parallel.pp: don't know which pipeline stage holds {path!r}")


def tied_paths(model_cfg: Any) -> tuple[str, ...]:
    """(path,) of the output projection when it is a first-stage weight (tied embeddings), else ()."""
    meta = models.init(model_cfg, device="meta")
    head = models.output_weight(model_cfg, meta)
    path = next(p for p, x in tree.leaves_with_paths(meta) if x is head)
    return (path,) if path.startswith(tuple(m + "." for m in models.family(model_cfg).first_stage)) else ()


@dataclass(frozen=True)
class StagePlan:
    """The stages of a pipeline over ``pp`` ranks: ``ranges[s]`` the layers of stage s (stage s runs
    on rank s mod pp), ``tied`` the paths the first and the last stage both hold."""

    model_cfg: Any
    ranges: tuple[range, ...]
    pp: int
    tied: tuple[str, ...] = ()

    @property
    def num_stages(self) -> int:
        """Stages in all (pp x stages per rank)."""
        return len(self.ranges)

    @property
    def last_rank(self) -> int:
        """The pipeline rank that runs the last stage (the loss)."""
        return (self.num_stages - 1) % self.pp

    def stages_of(self, rank: int) -> list[int]:
        """The stages pipeline rank ``rank`` runs, in order."""
        return list(range(rank, self.num_stages, self.pp))

    def holders(self, path: str) -> set[int]:
        """The pipeline ranks that hold the tensor at ``path``."""
        ranks = {owner_stage(self.model_cfg, path, self.ranges) % self.pp}
        return ranks | {self.last_rank} if path in self.tied else ranks

    def holds(self, path: str, rank: int) -> bool:
        """Whether pipeline rank ``rank`` holds the tensor at ``path``."""
        return rank in self.holders(path)

    def rank_params(self, params: Any, rank: int) -> Any:
        """``params`` with the weights (tensors or leaf kinds) that ``rank`` does not hold set to None."""
        return tree.map_with_path(lambda p, x: x if self.holds(p, rank) else None, params, is_leaf=tree.is_leaf)


def plan_stages(model_cfg: Any, pp: int, stages_per_rank: int = 1) -> StagePlan:
    """The StagePlan of ``model_cfg`` over ``pp`` ranks, or a ConfigError if it cannot be pipelined."""
    fam = models.family(model_cfg)
    if not fam.causal:
        raise ConfigError(f"--parallel.pp: pipeline parallelism runs causal language models, found {fam.name!r}")
    ranges = stage_ranges(model_cfg.num_hidden_layers, pp * stages_per_rank)
    return StagePlan(model_cfg, tuple(ranges), pp, tied_paths(model_cfg))


def meta_template(params: Any) -> Any:
    """The tree with every tensor replaced by an empty meta tensor of its global shape and dtype."""
    return tree.map(lambda x: torch.empty(tuple(x.shape), dtype=x.dtype, device="meta"), params)
