"""The process layout of a run: torchrun's environment, the device mesh, and what the recipe asks of it.

``layout(parallel, device)`` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by torchrun),
starts the process group (gloo on CPU; NCCL for CUDA tensors with gloo beside it for CPU ones)
and builds the mesh ``init_device_mesh(device, (dp_replicate, dp_shard, tp))`` — with a leading
``pp`` dimension when pipeline stages are asked for. One process (no torchrun) gives a layout
whose every method is the identity, so the recipe has one code path.

``Layout`` answers: rank, world size, data-parallel rank and size, ``is_main``; and provides
``shard_params``, ``gather`` (the FSDP / tensor-parallel hook, also for ``generate``),
``loss_fn`` (evaluation), ``make_step`` (the training step with its sync hooks, or the pipeline
schedule: ``pp_schedule`` gpipe / 1f1b / interleaved with ``pp_stages_per_rank`` virtual stages),
``checkpoint_reader`` (each rank reads its own slices), ``full_params_for_save`` and
``main_first`` (rank 0 builds caches first).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from purefine import models, optim, train
from purefine.errors import ConfigError
from purefine.shard import stages

# checkpoint_io, gather, plan and pipeline work on DTensors: they are imported where a mesh exists
# (more than one process), so a run on one device never loads torch.distributed.tensor (~50 MB).

DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
# Step metrics that are already global (or per process); every other one is this rank's share of a mean.
_RANK_METRICS = ("count", "grad_norm", "skipped", "nonfinite_grads")


def resolve_sizes(parallel: Any, world_size: int) -> dict[str, int]:
    """{pp, dp_replicate, dp_shard, tp} for ``world_size`` processes; ``dp_shard=-1`` takes what the
    other dimensions leave. The product must equal the number of processes."""
    sizes = {"pp": int(getattr(parallel, "pp", 1)), "dp_replicate": int(getattr(parallel, "dp_replicate", 1)),
             "dp_shard": int(getattr(parallel, "dp_shard", -1)), "tp": int(getattr(parallel, "tp", 1))}
    fixed = sizes["pp"] * sizes["dp_replicate"] * sizes["tp"]
    if sizes["dp_shard"] == -1:
        if world_size % fixed:
            raise ConfigError(f"--parallel: pp x dp-replicate x tp = {fixed} does not divide the {world_size} "
                              f"processes torchrun started (WORLD_SIZE){_launch_hint(world_size, fixed)}")
        sizes["dp_shard"] = world_size // fixed
    product = fixed * sizes["dp_shard"]
    if product != world_size:
        shown = " x ".join(f"{k.replace('_', '-')} {v}" for k, v in sizes.items())
        raise ConfigError(f"--parallel: {shown} = {product} processes, but {world_size} were started "
                          f"(WORLD_SIZE){_launch_hint(world_size, product)}")
    return sizes


def _launch_hint(world_size: int, needed: int) -> str:
    return f"; launch with torchrun --nproc-per-node {needed}" if world_size == 1 else ""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}: expected an integer, found {value!r}") from None


def init_process_group(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device) from torchrun's environment, starting the process
    group if there is more than one process. CUDA: ``cuda:LOCAL_RANK``."""
    world = _env_int("WORLD_SIZE", 1)
    if world == 1 and not dist.is_initialized():
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", _env_int("LOCAL_RANK", 0))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dist.get_rank(), dist.get_world_size(), device


@dataclass
class Layout:
    """Where this process sits: sizes of each mesh dimension, its rank, its device and its mesh.

    ``mesh`` is the ("dp_replicate", "dp_shard", "tp") mesh of this pipeline stage (None on one
    process); ``world_mesh`` has the leading "pp" dimension when ``sizes['pp'] > 1``.
    """

    sizes: dict[str, int]
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None
    world_mesh: Any = None
    microbatches: int = 0
    pp_schedule: str = "1f1b"
    pp_stages_per_rank: int = 1
    template: Any = None  # pipeline only, set by shard_params: the full tree on the meta device
    model_cfg: Any = None  # pipeline only, set by shard_params: the model config the stages split
    stage_plan: Any = None  # pipeline only, set by shard_params: a stages.StagePlan
    tie_group: Any = None  # pipeline only: the group of the first and last stage's ranks sharing a tied weight

    @property
    def distributed(self) -> bool:
        """True with a mesh (more than one process)."""
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes files (global rank 0)."""
        return self.rank == 0

    @property
    def pp_size(self) -> int:
        """Pipeline stages."""
        return self.sizes["pp"]

    @property
    def pp_rank(self) -> int:
        """This process's pipeline stage."""
        return self.world_mesh.get_local_rank("pp") if self.pp_size > 1 else 0

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: processes that see different batches (dp_replicate x dp_shard)."""
        return self.sizes["dp_replicate"] * self.sizes["dp_shard"]

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel index in [0, dp_size): which rows of the global batch it takes."""
        if not self.distributed:
            return 0
        return self.mesh.get_local_rank("dp_replicate") * self.sizes["dp_shard"] + self.mesh.get_local_rank("dp_shard")

    def dp_groups(self) -> list[Any]:
        """The process groups of the data-parallel mesh dimensions larger than one."""
        return [self.mesh.get_group(d) for d in ("dp_replicate", "dp_shard") if self.distributed and self.sizes[d] > 1]

    @property
    def gather(self) -> Callable[[Any], Any] | None:
        """The models' ``gather`` hook (None on one process)."""
        if not self.distributed:
            return None
        from purefine.shard.gather import make_gather

        return make_gather(self.mesh)

    def sum_over_dp(self, x: torch.Tensor) -> torch.Tensor:
        """x (any shape, e.g. a token count ()) summed over the data-parallel ranks (a new tensor of
        x's shape on x's device)."""
        out = x.detach().to(self.device).clone()
        for group in self.dp_groups():
            dist.all_reduce(out, group=group)
        return out.to(x.device)

    def shard_params(self, model_cfg: Any, params: Any) -> Any:
        """The full params tree (the same on every rank) -> this rank's part: DTensors placed by
        the family's plan; under pipeline parallelism only this stage's tensors (others None)."""
        if not self.distributed:
            return params
        from purefine.shard import plan

        if self.pp_size > 1:
            self.plan_stages(model_cfg)
            self.template = stages.meta_template(plan.tp_layouts(params, plan.plan_for(model_cfg), self.sizes))
            params = self.stage_plan.rank_params(params, self.pp_rank)
        _check_heads(model_cfg, self.sizes["tp"])
        return plan.shard(params, self.mesh, plan.plan_for(model_cfg))

    def plan_stages(self, model_cfg: Any) -> Any:
        """The pipeline's StagePlan for ``model_cfg`` (made once; a collective the first time: the
        groups of the ranks that hold a tied embedding's two copies)."""
        if self.stage_plan is None:
            self.stage_plan = stages.plan_stages(model_cfg, self.pp_size, self.pp_stages_per_rank)
            self.model_cfg = model_cfg
            self.tie_group = _tie_group(self.world_mesh, self.stage_plan) if self.stage_plan.tied else None
        return self.stage_plan

    def loss_fn(self, model_cfg: Any, *, chunk_size: int = 1024,
                loss: Callable[..., Any] | None = None) -> Callable[[Any, dict], tuple]:
        """(params, batch) -> (loss sum, count[, sums]) of this rank's batch, on every rank of a
        stage group (for evaluation; training goes through ``make_step``). ``loss(gather, remat)``
        builds a task's own loss; None is the model's next-token loss."""
        if self.pp_size > 1:
            if loss is not None:
                raise ConfigError("--parallel.pp: pipeline stages train the causal-LM task only")
            from purefine.shard import pipeline  # torch.distributed.pipelining imports torch._dynamo: only when used

            return pipeline.eval_loss_fn(model_cfg, self, chunk_size=chunk_size)
        if loss is not None:
            return loss(self.gather, False)
        return models.loss_fn(model_cfg, chunk_size=chunk_size, gather=self.gather)

    def make_step(self, model_cfg: Any, optimizer: optim.Optimizer, *, trainable: train.Filter = train.all_floating,
                  remat: bool = False, chunk_size: int = 1024, clip_norm: float | None = None,
                  compute_dtype: torch.dtype | None = None, skip_nonfinite: bool = False,
                  loss: Callable[..., Any] | None = None,
                  count: Callable[[Any], torch.Tensor] = train.labelled_tokens, compile: bool = False) -> Callable[..., Any]:
        """``train.make_step`` with this layout's gather and sync hooks (or the pipeline schedule);
        the step's ``loss`` (and the loss's own metrics) are the global ones on every rank.
        ``loss(gather, remat)`` builds a task's own loss (None: the model's next-token loss, the
        only one pipeline stages run); ``count`` is its per-batch normalizer; ``compile`` passes the
        loss through ``torch.compile`` (not with pipeline stages)."""
        options = dict(trainable=trainable, clip_norm=clip_norm, compute_dtype=compute_dtype,
                       skip_nonfinite=skip_nonfinite)
        if self.pp_size > 1:
            if loss is not None:
                raise ConfigError("--parallel.pp: pipeline stages train the causal-LM task only")
            if compile:
                raise ConfigError("--compile: not with --parallel.pp (pipeline stages run eagerly)")
            self.plan_stages(model_cfg)
            from purefine.shard import pipeline

            return pipeline.make_pipeline_step(model_cfg, optimizer, self, remat=remat, chunk_size=chunk_size,
                                               count=count, **options)
        fn = loss(self.gather, remat) if loss is not None else \
            models.loss_fn(model_cfg, chunk_size=chunk_size, remat=remat, gather=self.gather)
        if compile:
            fn = torch.compile(fn)  # shapes that change compile once more, then dynamically
        if not self.distributed:
            return train.make_step(fn, optimizer, count=count, **options)
        from purefine.shard.gather import settle_grads

        inner = train.make_step(fn, optimizer, count=count, sync_count=self.sum_over_dp, sync_grads=settle_grads,
                                **options)

        def step(state: train.TrainState, batch: Any) -> tuple[train.TrainState, dict[str, float]]:
            state, metrics = inner(state, batch)
            summed = {k: float(self.sum_over_dp(torch.tensor(metrics[k], dtype=torch.float64)))
                      for k in metrics if k == "loss" or k not in _RANK_METRICS}
            return state, metrics | summed

        return step

    def checkpoint_reader(self, model_cfg: Any, *, dtype: torch.dtype | None = None,
                          quantize: str | None = None) -> Callable[..., Any] | None:
        """The ``reader`` for ``checkpoint.load_hf``: each rank reads only the rows of its own
        shards (None on one process: the plain load)."""
        if not self.distributed:
            return None
        from purefine.shard import checkpoint_io

        return checkpoint_io.make_reader(model_cfg, self, dtype=dtype, quantize=quantize)

    def full_params_for_save(self, params: Any) -> Any:
        """The full params tree (plain tensors on the CPU) on the main rank, None elsewhere. A
        collective: every rank must call it."""
        if not self.distributed:
            return params
        from purefine.shard import checkpoint_io

        return checkpoint_io.gather_full(params, self)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the body on rank 0 first, then on the others (e.g. building a dataset cache)."""
        if self.distributed and not self.is_main:
            dist.barrier()
        yield
        if self.distributed and self.is_main:
            dist.barrier()


def _check_heads(model_cfg: Any, tp: int) -> None:
    """Tensor parallelism needs the family's plan and heads / MLP columns that tp divides."""
    if tp == 1:
        return
    fam = models.family(model_cfg)
    if not fam.tp_plan:
        raise ConfigError(f"--parallel.tp {tp}: the {fam.name} family declares no tensor-parallel plan; "
                          "use --parallel.dp-shard (FSDP) or --parallel.dp-replicate")
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(model_cfg, name)
        if value % tp:
            raise ConfigError(f"--parallel.tp {tp}: the model's {name} ({value}) must be a multiple of tp")


def _tie_group(world_mesh: Any, stage_plan: Any) -> Any:
    """The process group of this rank and its counterpart holding the other copy of a tied weight
    (the first and the last stage's ranks with the same dp / tp coordinates); None for ranks of
    middle stages. Every rank creates every pair's group (``new_group`` is a collective)."""
    ranks = world_mesh.mesh.reshape(world_mesh.mesh.shape[0], -1)
    mine = None
    for column in range(ranks.shape[1]):
        pair = sorted({int(ranks[0, column]), int(ranks[stage_plan.last_rank, column])})
        group = dist.new_group(pair)
        if dist.get_rank() in pair:
            mine = group
    return mine


def build_mesh(sizes: dict[str, int], device: torch.device) -> tuple[Any, Any]:
    """(stage mesh over dp_replicate x dp_shard x tp, world mesh with pp when pp > 1)."""
    from torch.distributed.device_mesh import init_device_mesh

    if sizes["pp"] > 1:
        world = init_device_mesh(device.type, tuple(sizes[d] for d in DIMS), mesh_dim_names=DIMS)
        return world[DIMS[1:]], world
    mesh = init_device_mesh(device.type, tuple(sizes[d] for d in DIMS[1:]), mesh_dim_names=DIMS[1:])
    return mesh, None


def layout(parallel: Any = None, device: torch.device | str = "cpu") -> Layout:
    """The layout of this process for a ``ParallelConfig`` (dp_replicate, dp_shard, tp, pp,
    microbatches): one process without torchrun, else the process group and the mesh."""
    device = torch.device(device)
    rank, world, device = init_process_group(device)
    sizes = resolve_sizes(parallel, world)
    schedule = dict(microbatches=int(getattr(parallel, "microbatches", 0) or 0),
                    pp_schedule=str(getattr(parallel, "pp_schedule", "1f1b")),
                    pp_stages_per_rank=pp_stages_per_rank(parallel))
    if world == 1:
        return Layout(sizes, device=device, **schedule)
    mesh, world_mesh = build_mesh(sizes, device)
    return Layout(sizes, rank, world, device, mesh, world_mesh, **schedule)


def pp_stages_per_rank(parallel: Any) -> int:
    """Stages each pipeline rank runs: ``--parallel.pp-stages-per-rank`` (default 2) under the
    interleaved schedule, one under gpipe and 1f1b."""
    if getattr(parallel, "pp_schedule", "1f1b") != "interleaved":
        return 1
    per_rank = int(getattr(parallel, "pp_stages_per_rank", 2))
    if per_rank < 1:
        raise ConfigError(f"--parallel.pp-stages-per-rank: must be >= 1, found {per_rank}")
    return per_rank
