"""Pipeline parallelism: the layer stack split into stages, run with a GPipe schedule over
point-to-point sends (the primitives ``torch.distributed.pipelining`` builds on).

- ``stage_ranges(n_layers, pp)``: contiguous, balanced layer ranges; stage 0 also holds the
  embedding, the last stage the final norm and the output projection (and computes the loss).
- ``stage_params(params, ...)``: the full tree with every weight other stages own set to None —
  paths (``model.layers.7...``) keep their global layer index, so plans, filters, optimizer state
  and saved names are unchanged.
- ``stage_forward``: one stage as a pure function: the pieces of ``models.decoder`` (prologue,
  blocks, final norm and loss) that a one-process run composes, so a pipelined run equals it.
- ``make_pipeline_step``: ``step(state, batch) -> (state, metrics)``, the ``train.make_step``
  contract. Each batch is cut into micro-batches along the batch dimension; GPipe runs every
  forward (activations sent to the next stage), then every backward in reverse order (gradients of
  the stage input sent back). The loss is normalized by the global token count, gradients
  accumulate on each stage's trainable leaves, the gradient norm is summed over stages.
- ``eval_loss_fn``: a forward-only pipeline; the last stage's loss goes to every stage.

Supports every causal family with untied embeddings (the split points are the family's ``layers``,
``first_stage`` and ``last_stage``); data parallelism, FSDP and tensor parallelism compose inside
each stage (a stage has its own dp_replicate x dp_shard x tp mesh).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from purefine import models, optim, train, tree
from purefine.errors import ConfigError
from purefine.models import decoder
from purefine.shard.gather import settle_grads


def stage_ranges(num_layers: int, pp: int) -> list[range]:
    """Balanced contiguous layer ranges, the earlier stages taking one more when uneven."""
    if num_layers < pp:
        raise ConfigError(f"--parallel.pp {pp}: the model has only {num_layers} layers to split into stages")
    base, extra = divmod(num_layers, pp)
    bounds = [0]
    for s in range(pp):
        bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


def check_model(model_cfg: Any, sizes: dict[str, int]) -> list[range]:
    """The stage ranges for ``model_cfg``, or a ConfigError if it cannot be pipelined."""
    fam = models.family(model_cfg)
    if not fam.causal:
        raise ConfigError(f"--parallel.pp: pipeline parallelism runs causal language models, found {fam.name!r}")
    if model_cfg.tie_word_embeddings:
        raise ConfigError("--parallel.pp: the model ties lm_head to the embedding (first and last stage); "
                          "pipeline parallelism needs untied embeddings")
    return stage_ranges(model_cfg.num_hidden_layers, sizes["pp"])


def owner_stage(model_cfg: Any, path: str, ranges: Sequence[range]) -> int:
    """The stage that holds the tensor at ``path``: its layer's stage; the family's ``first_stage``
    modules on stage 0, its ``last_stage`` modules on the last."""
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


def meta_template(params: Any) -> Any:
    """The tree with every tensor replaced by an empty meta tensor of its global shape and dtype."""
    return tree.map(lambda x: torch.empty(tuple(x.shape), dtype=x.dtype, device="meta"), params)


def stage_params(model_cfg: Any, params: Any, ranges: Sequence[range], stage: int) -> Any:
    """``params`` with the weights (tensors or leaf kinds) of other stages set to None."""
    return tree.map_with_path(lambda p, x: x if owner_stage(model_cfg, p, ranges) == stage else None, params,
                              is_leaf=tree.is_leaf)


def stage_forward(cfg: Any, params: dict, x: torch.Tensor | None, batch: dict, layers: range, *, last: bool,
                  gather: Any, remat: bool, chunk_size: int) -> Any:
    """Stage 0: tokens (B, T) -> hidden (B, T, D); middle: hidden -> hidden; last: -> (loss sum, n)."""
    fam, tokens = models.family(cfg), batch["tokens"]
    mask = decoder.batch_mask(batch)
    if x is None:
        x, ctx = decoder.prologue(fam, cfg, params, tokens, positions=batch.get("positions"), mask=mask, gather=gather)
    else:
        ctx = decoder.context(fam, cfg, tokens, positions=batch.get("positions"), mask=mask, dtype=x.dtype,
                              device=x.device)
    stack = fam.layer_list(params)
    x = decoder.run_blocks(fam, cfg, [stack[i] for i in layers], x, ctx, first=layers.start, remat=remat,
                           gather=gather)
    if not last:
        return x
    h = fam.final(cfg, params, x, gather or (lambda subtree: subtree))
    return decoder.lm_loss(fam, cfg, params, h, batch["labels"], chunk_size=chunk_size, gather=gather)


def split_batch(batch: dict, n: int) -> list[dict]:
    """A batch cut into ``n`` micro-batches along dim 0 (the batch size must be a multiple of n)."""
    rows = batch["tokens"].shape[0]
    if rows % n:
        raise ConfigError(f"--parallel.microbatches {n}: the batch of {rows} rows does not split into {n} "
                          "equal pipeline micro-batches; use a --batch-size that is a multiple of it")
    return [{k: v.chunk(n)[i] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
            for i in range(n)]


class Peers:
    """Global ranks of the neighbouring stages (same dp/tp coordinates) and the pp group."""

    def __init__(self, layout: Any):
        mesh = layout.world_mesh
        coord = mesh.get_coordinate()
        ranks = mesh.mesh
        self.stage, self.last = coord[0], layout.pp_size - 1
        self.prev = int(ranks[(coord[0] - 1, *coord[1:])]) if coord[0] > 0 else None
        self.next = int(ranks[(coord[0] + 1, *coord[1:])]) if coord[0] < self.last else None
        self.group = mesh.get_group("pp")
        self.device = layout.device


def _activation_dtype(model_cfg: Any, params: Any, layers: range, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the activations between stages: the compute dtype, else that of this stage's
    first layer's floating tensors (norm weights are cast with everything else, never quantized)."""
    if compute_dtype is not None:
        return compute_dtype
    layer = models.family(model_cfg).layer_list(params)[layers[0]]
    return next(x.dtype for path, x in tree.leaves_with_paths(layer) if "norm" in path and x.is_floating_point())


def _forward_all(cfg: Any, params: Any, chunks: list[dict], peers: Peers, layers: range, act_dtype: torch.dtype,
                 compute_dtype: torch.dtype | None, **opts: Any) -> list[tuple[Any, Any]]:
    """GPipe's forward phase: (stage input, stage output) per micro-batch, activations sent on."""
    records, sends = [], []
    for c in chunks:
        x = None
        if peers.prev is not None:
            b, t = c["tokens"].shape
            x = torch.empty(b, t, cfg.hidden_size, dtype=act_dtype, device=peers.device)
            dist.recv(x, src=peers.prev)
            x.requires_grad_(torch.is_grad_enabled())
        out = stage_forward(cfg, train.cast_params(params, compute_dtype), x, c, layers, last=peers.next is None, **opts)
        if peers.next is not None:
            sends.append(dist.isend(out.detach().contiguous(), dst=peers.next))
        records.append((x, out))
    for work in sends:
        work.wait()
    return records


def _backward_all(records: list[tuple[Any, Any]], leaves: dict[str, torch.Tensor], total: torch.Tensor,
                  peers: Peers) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """GPipe's backward phase, micro-batches in reverse: (summed leaf grads, this stage's loss)."""
    grads: dict[str, torch.Tensor] = {p: torch.zeros_like(x) for p, x in leaves.items()}
    loss, sends = torch.zeros((), dtype=torch.float64), []
    for x, out in reversed(records):
        if peers.next is None:
            target, grad_out = out[0] / total.clamp(min=1).to(out[0].device), None
            loss = loss + target.detach().double().cpu()
        else:
            target, grad_out = out, torch.empty_like(out)
            dist.recv(grad_out, src=peers.next)
        inputs = list(leaves.values()) + ([x] if x is not None else [])
        if inputs:
            got = torch.autograd.grad(target, inputs, grad_outputs=grad_out, allow_unused=True)
            for p, gr in zip(leaves, got):
                if gr is not None:
                    grads[p] = grads[p] + gr
            if x is not None:
                sent = got[-1] if got[-1] is not None else torch.zeros_like(x)
                sends.append(dist.isend(sent.contiguous(), dst=peers.prev))
    for work in sends:
        work.wait()
    return grads, loss


def _sum_over_stages(x: torch.Tensor, peers: Peers) -> torch.Tensor:
    out = x.detach().to(peers.device).clone()
    dist.all_reduce(out, group=peers.group)
    return out.cpu()


def make_pipeline_step(model_cfg: Any, optimizer: optim.Optimizer, layout: Any, *, trainable: train.Filter,
                       remat: bool = False, chunk_size: int = 1024, clip_norm: float | None = None,
                       compute_dtype: torch.dtype | None = None, skip_nonfinite: bool = False) -> Any:
    """The pipelined ``step(state, batch_or_micro_batches) -> (state, metrics)`` on this rank's stage
    (metrics as ``train.make_step``'s: loss, tokens, grad_norm, skipped — global on every rank)."""
    ranges = check_model(model_cfg, layout.sizes)
    peers, layers = Peers(layout), ranges[layout.pp_rank]
    n_micro = layout.microbatches or layout.pp_size
    opts = dict(gather=layout.gather, remat=remat, chunk_size=chunk_size)

    def step(state: train.TrainState, batch: Any) -> tuple[train.TrainState, dict[str, float]]:
        micro = [batch] if isinstance(batch, dict) else list(batch)
        chunks = [c for b in micro for c in split_batch(b, n_micro)]
        total = layout.sum_over_dp(sum((c["labels"] != -100).sum() for c in chunks))
        leaves = {p: x.detach().requires_grad_() for p, x in train.trainable_leaves(state.params, trainable).items()}
        params = train.with_leaves(state.params, leaves)
        act_dtype = _activation_dtype(model_cfg, state.params, layers, compute_dtype)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state.rng)
            records = _forward_all(model_cfg, params, chunks, peers, layers, act_dtype, compute_dtype, **opts)
            grads, loss = _backward_all(records, leaves, total, peers)
            rng = torch.get_rng_state()
        del records
        grads = settle_grads(grads)
        norm = _sum_over_stages(optim.global_norm(grads).double().cpu() ** 2, peers).sqrt()
        loss = _sum_over_stages(layout.sum_over_dp(loss), peers)
        metrics = {"loss": float(loss), "tokens": int(total), "grad_norm": float(norm), "skipped": 0}
        if skip_nonfinite and not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            return state.replace(step=state.step + 1, rng=rng), metrics | {"skipped": 1}
        if clip_norm is not None:
            factor = (clip_norm / (norm.float() + 1e-6)).clamp(max=1.0)
            grads = {p: g * factor.to(g.dtype) for p, g in grads.items()}
        new_leaves, opt_state = optimizer.update(grads, state.opt_state, train.trainable_leaves(state.params, trainable))
        params = train.with_leaves(state.params, new_leaves)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return step


def eval_loss_fn(model_cfg: Any, layout: Any, *, chunk_size: int = 1024) -> Any:
    """(params, batch) -> (loss sum, labelled tokens) through the pipeline, on every rank."""
    ranges = check_model(model_cfg, layout.sizes)
    peers, layers = Peers(layout), ranges[layout.pp_rank]

    def loss(params: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        act_dtype = _activation_dtype(model_cfg, params, layers, None)
        (_, out), = _forward_all(model_cfg, params, [batch], peers, layers, act_dtype, None,
                                 gather=layout.gather, remat=False, chunk_size=chunk_size)
        pair = torch.stack([out[0].detach().double().cpu(), out[1].double().cpu()]) if peers.next is None \
            else torch.zeros(2, dtype=torch.float64)
        pair = _sum_over_stages(pair, peers)
        return pair[0].float(), pair[1].long()

    return loss
