"""Pipeline parallelism on ``torch.distributed.pipelining``: our stages, torch's schedules.

- ``StageModule``: one stage as the ``nn.Module`` a ``PipelineStage`` wraps. It owns no
  parameters; the step binds the params tree (trainable leaves requiring grad) before running the
  schedule. Stage 0 runs ``decoder.prologue`` (embedding), every stage its ``run_blocks`` range,
  the last one the family's ``final`` norm; the loss (``decoder.lm_loss``: output projection and
  chunked cross-entropy, divided by the global token count) is the schedule's ``loss_fn``.
  Positions, packing segments and masks reach every stage as keyword inputs (each rank of a
  pipeline reads the same batch); only hidden states (B, T, D) travel between stages.
- ``Pipeline``: this rank's stages and one torch schedule per micro-batch shape (stages are
  static: their input / output shapes are given, so no shape inference runs): ``gpipe``
  (``ScheduleGPipe``), ``1f1b`` (``Schedule1F1B``), ``interleaved`` (``ScheduleInterleaved1F1B``
  over ``stages_per_rank`` virtual stages per rank). Evaluation runs a forward-only GPipe (or
  looped BFS with virtual stages) over one micro-batch.
- ``make_pipeline_step``: ``step(state, batch_or_micro_batches) -> (state, metrics)``, the
  ``train.make_step`` contract: each batch is cut into ``microbatches`` along dim 0, gradients
  accumulate on the trainable leaves (``scale_grads=False``: the loss is already normalized by
  the global token count), partial sums are settled over the stage mesh, a tied embedding's
  gradient is summed between the first and the last stage, the gradient norm covers every stage,
  then clipping and the optimizer update, on every rank for its own leaves.
- ``eval_loss_fn``: (params, batch) -> (loss sum, labelled tokens) on every rank.

Dropout: the step draws one seed from the state's RNG (the same on every rank, so a checkpoint
holds one RNG) and each pipeline rank seeds its dropout stream with seed + rank.
Data parallelism, FSDP and tensor parallelism compose inside each stage (a stage has its own
dp_replicate x dp_shard x tp mesh; the ``gather`` hook runs per block as in one process).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (
    PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B, ScheduleLoopedBFS,
)
from torch.distributed.tensor import DTensor

from purefine import models, optim, train, tree
from purefine.errors import ConfigError
from purefine.models import decoder
from purefine.shard.gather import settle_grads

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}
SIDE_INPUTS = ("positions", "segment_ids", "mask")  # batch keys every stage reads besides the tokens
KEPT_SCHEDULES = 8  # schedules (static stages, receive buffers) kept per batch shape; unpacked batches vary in T


def _same(subtree: Any) -> Any:
    return subtree


class StageModule(torch.nn.Module):
    """One stage (its ``layers`` range) as a module: ``forward(x, tokens=..., **side)`` maps tokens
    (B, T) (the first stage) or hidden states (B, T, D) to hidden states (B, T, D) (normed on the last)."""

    def __init__(self, model_cfg: Any, layers: range, *, first: bool, last: bool, gather: Any, remat: bool,
                 compute_dtype: torch.dtype | None):
        super().__init__()
        self.cfg, self.fam, self.layers = model_cfg, models.family(model_cfg), layers
        self.first, self.last, self.gather, self.remat, self.compute_dtype = first, last, gather, remat, compute_dtype
        self.params: Any = None  # bound by Pipeline.bind for the duration of a step

    def forward(self, x: torch.Tensor, *, tokens: torch.Tensor, **side: torch.Tensor) -> torch.Tensor:
        params = train.cast_params(self.params, self.compute_dtype)
        positions, mask = side.get("positions"), decoder.batch_mask(side)
        if self.first:
            x, ctx = decoder.prologue(self.fam, self.cfg, params, tokens, positions=positions, mask=mask,
                                      gather=self.gather)
        else:
            ctx = decoder.context(self.fam, self.cfg, tokens, positions=positions, mask=mask, dtype=x.dtype,
                                  device=x.device)
        stack = self.fam.layer_list(params)
        x = decoder.run_blocks(self.fam, self.cfg, [stack[i] for i in self.layers], x, ctx, first=self.layers.start,
                               remat=self.remat, gather=self.gather)
        return self.fam.final(self.cfg, params, x, self.gather or _same) if self.last else x


class Pipeline:
    """This rank's stages of ``layout.stage_plan`` and their torch schedules (see the module doc)."""

    def __init__(self, model_cfg: Any, layout: Any, *, remat: bool = False, chunk_size: int = 1024,
                 compute_dtype: torch.dtype | None = None):
        self.cfg, self.layout, self.plan = model_cfg, layout, layout.stage_plan
        self.chunk_size, self.compute_dtype = chunk_size, compute_dtype
        self.group = layout.world_mesh.get_group("pp")
        last = self.plan.num_stages - 1
        self.modules = [StageModule(model_cfg, self.plan.ranges[s], first=s == 0, last=s == last,
                                    gather=layout.gather, remat=remat, compute_dtype=compute_dtype)
                        for s in self.plan.stages_of(layout.pp_rank)]
        self.indices = self.plan.stages_of(layout.pp_rank)
        self.schedules: dict[tuple, Any] = {}
        self.params: Any = None
        self.total: torch.Tensor | None = None

    def bind(self, params: Any, total: torch.Tensor | None) -> None:
        """Give the stages ``params`` and the loss its normalizer (None, None: let go of them)."""
        self.params, self.total = params, total
        for module in self.modules:
            module.params = params

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The schedule's loss_fn: hidden states (b, T, D), labels (b, T) -> loss sum / total ()."""
        params = train.cast_params(self.params, self.compute_dtype)
        fam = models.family(self.cfg)
        loss_sum, _ = decoder.lm_loss(fam, self.cfg, params, h, labels, chunk_size=self.chunk_size,
                                      gather=self.layout.gather)
        return loss_sum / self.total.clamp(min=1).to(loss_sum.device)

    def _stage(self, module: StageModule, index: int, rows: int, seq: int, grad: bool,
               dtype: torch.dtype) -> PipelineStage:
        hidden = torch.empty(rows, seq, self.cfg.hidden_size, dtype=dtype, device="meta")
        tokens = torch.empty(rows, seq, dtype=torch.long, device="meta")
        inputs = tokens if index == 0 else hidden.clone().requires_grad_(grad)
        return PipelineStage(module, index, self.plan.num_stages, self.layout.device, input_args=inputs,
                             output_args=hidden.clone().requires_grad_(grad), group=self.group)

    def schedule(self, rows: int, seq: int, *, training: bool) -> Any:
        """The schedule for batches of ``rows`` x ``seq`` (training: cut into micro-batches) whose
        activations have the compute dtype, else that of the bound params' floating tensors."""
        n = (self.layout.microbatches or self.plan.pp) if training else 1
        dtype = self.compute_dtype or _floating_dtype(self.params)
        key = (rows, seq, training, dtype)
        if key not in self.schedules:
            if rows % n:
                raise ConfigError(f"--parallel.microbatches {n}: the batch of {rows} rows does not split into {n} "
                                  "equal pipeline micro-batches; use a --batch-size that is a multiple of it")
            if len(self.schedules) == KEPT_SCHEDULES:
                self.schedules.pop(next(iter(self.schedules)))
            self.schedules[key] = self._build(rows // n, seq, n, training, dtype)
        return self.schedules[key]

    def _build(self, rows: int, seq: int, n: int, training: bool, dtype: torch.dtype) -> Any:
        """Static stages for micro-batches of ``rows`` x ``seq`` and the torch schedule over them:
        training's ``--parallel.pp-schedule``; evaluation a forward-only GPipe (looped BFS when a
        rank runs several stages)."""
        stages = [self._stage(m, s, rows, seq, training, dtype) for m, s in zip(self.modules, self.indices)]
        name = self.layout.pp_schedule
        kind = SCHEDULES[name] if training else (ScheduleGPipe if len(stages) == 1 else ScheduleLoopedBFS)
        try:
            return kind(stages[0] if kind in (ScheduleGPipe, Schedule1F1B) else stages, n, loss_fn=self.loss,
                        scale_grads=False)
        except ValueError as e:  # torch's own rule of the schedule, e.g. 1F1B needs micro-batches >= stages
            raise ConfigError(f"--parallel.pp-schedule {name} with --parallel.microbatches {n}: {e}") from None

    def run(self, batch: dict, *, training: bool) -> torch.Tensor:
        """One batch through the schedule; the sum of its micro-batches' loss_fn values on the rank
        with the last stage (zero elsewhere), detached, float64 on the CPU."""
        tokens, labels = batch["tokens"], batch["labels"]
        side = {k: batch[k] for k in SIDE_INPUTS if isinstance(batch.get(k), torch.Tensor)}
        schedule, losses = self.schedule(*tokens.shape, training=training), []
        run = schedule.step if training else schedule.eval
        run(tokens, target=labels, losses=losses, return_outputs=False, tokens=tokens, **side)
        return sum((x.detach().double().cpu() for x in losses), torch.zeros((), dtype=torch.float64))

    def sum_over_stages(self, x: torch.Tensor) -> torch.Tensor:
        """x (any shape) summed over the pipeline ranks (a new CPU tensor)."""
        out = x.detach().to(self.layout.device).clone()
        dist.all_reduce(out, group=self.group)
        return out.cpu()

    def sum_tied(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tied embedding's gradient summed between the first and the last stage's copies."""
        group = self.layout.tie_group
        for path in self.plan.tied:
            if path in grads and group is not None:
                g = grads[path]
                dist.all_reduce(g.to_local() if isinstance(g, DTensor) else g, group=group)
        return grads

    def global_norm(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """The L2 norm of every stage's gradients, a tied one counted once (a float64 () tensor)."""
        counted = grads if self.layout.pp_rank != self.plan.last_rank else \
            {p: g for p, g in grads.items() if p not in self.plan.tied}
        return self.sum_over_stages(optim.global_norm(counted).double().cpu() ** 2).sqrt()


def _floating_dtype(params: Any) -> torch.dtype:
    """The dtype of the first floating-point tensor of a rank's params (norms are never quantized):
    the activation dtype when no compute dtype casts everything."""
    tensors = (x for _, x in tree.leaves_with_paths(params) if isinstance(x, torch.Tensor))
    return next(x.dtype for x in tensors if x.is_floating_point())


def _seed_stage_rng(rng: torch.Tensor, rank: int) -> torch.Tensor:
    """Seed this rank's dropout stream for one step from ``rng`` (the same on every rank); returns
    the RNG state the next step starts from."""
    torch.set_rng_state(rng)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    after = torch.get_rng_state()
    torch.random.default_generator.manual_seed(seed + rank)
    return after


def make_pipeline_step(model_cfg: Any, optimizer: optim.Optimizer, layout: Any, *, trainable: train.Filter,
                       remat: bool = False, chunk_size: int = 1024, clip_norm: float | None = None,
                       compute_dtype: torch.dtype | None = None, skip_nonfinite: bool = False,
                       count: Callable[[Any], torch.Tensor] = train.labelled_tokens) -> Any:
    """The pipelined ``step(state, batch_or_micro_batches) -> (state, metrics)`` on this rank's
    stages (metrics as ``train.make_step``'s: loss, count, grad_norm, skipped — global on every rank)."""
    pipe = Pipeline(model_cfg, layout, remat=remat, chunk_size=chunk_size, compute_dtype=compute_dtype)

    def step(state: train.TrainState, batch: Any) -> tuple[train.TrainState, dict[str, float]]:
        micro = [batch] if isinstance(batch, dict) else list(batch)
        total = layout.sum_over_dp(sum((count(b) for b in micro), torch.zeros((), dtype=torch.long)))
        leaves = {p: x.detach().requires_grad_() for p, x in train.trainable_leaves(state.params, trainable).items()}
        pipe.bind(train.with_leaves(state.params, leaves), total)
        with torch.random.fork_rng(devices=[]):
            rng = _seed_stage_rng(state.rng, layout.pp_rank)
            loss = sum(pipe.run(b, training=True) for b in micro)
        pipe.bind(None, None)
        grads = {p: x.grad if x.grad is not None else torch.zeros_like(x) for p, x in leaves.items()}
        del leaves
        grads = pipe.sum_tied(settle_grads(grads))
        norm = pipe.global_norm(grads)
        loss = pipe.sum_over_stages(layout.sum_over_dp(loss))
        metrics = {"loss": float(loss), "count": int(total), "grad_norm": float(norm), "skipped": 0}
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            metrics["nonfinite_grads"] = train.nonfinite_paths(grads)
            if skip_nonfinite:
                return state.replace(step=state.step + 1, rng=rng), metrics | {"skipped": 1}
        if clip_norm is not None:
            factor = (clip_norm / (norm.float() + 1e-6)).clamp(max=1.0)
            grads = {p: g * factor.to(g.dtype) for p, g in grads.items()}
        new_leaves, opt_state = optimizer.update(grads, state.opt_state, train.trainable_leaves(state.params, trainable))
        params = train.with_leaves(state.params, new_leaves)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return step


def eval_loss_fn(model_cfg: Any, layout: Any, *, chunk_size: int = 1024) -> Any:
    """(params, batch) -> (loss sum () float32, labelled tokens () int64) through the pipeline, on every rank."""
    pipe = Pipeline(model_cfg, layout, chunk_size=chunk_size)

    def loss(params: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        pipe.bind(params, torch.ones((), dtype=torch.long))
        try:
            loss_sum = pipe.sum_over_stages(pipe.run(batch, training=False))
        finally:
            pipe.bind(None, None)
        return loss_sum.float(), train.labelled_tokens(batch)

    return loss
