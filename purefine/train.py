"""The training step as a pure function: ``step(state, batch) -> (state, metrics)``.

- ``TrainState``: everything a run needs to continue — step, params, optimizer state, RNG state
  and data position.
- ``value_and_grad(fn, trainable)``: gradients of ``fn(params, ...)`` with respect to the leaves a
  ``(path, tensor) -> bool`` filter selects, through ``torch.autograd.grad`` (not torch.func,
  which keeps activations alive and breaks activation checkpointing).
- ``make_step(loss_fn, optimizer, ...)``: gradient accumulation over micro-batches normalized by
  the number of labelled tokens in all of them (so k micro-batches equal one large batch),
  gradient clipping, a compute dtype (fp32 or bf16 over fp32 master weights), an optional
  skip of non-finite steps, and hooks through which data parallelism syncs token counts and
  gradients.

    opt = pf.optim.adamw(pf.schedules.warmup_cosine(3e-4, warmup=10, total=100))
    state = pf.train.init(params, opt, trainable=pf.lora.trainable, seed=0)
    step = pf.train.make_step(pf.models.loss_fn(cfg, remat=True), opt, trainable=pf.lora.trainable, clip_norm=1.0)
    for batch in batches:
        state, metrics = step(state, batch)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from purefine import optim, tree, upcast
from purefine.errors import ConfigError

Batch = dict[str, torch.Tensor]
# (params, batch) -> (summed loss, count) or (summed loss, count, {metric: summed value})
LossFn = Callable[[Any, Batch], tuple]
Filter = Callable[[str, Any], bool]


def all_floating(path: str, x: Any) -> bool:
    """The full fine-tuning filter: every floating-point tensor is trainable."""
    return isinstance(x, torch.Tensor) and x.is_floating_point()


@dataclass(frozen=True)
class TrainState:
    """What resume needs: ``step``, ``params`` (the whole tree), ``opt_state`` (for the trainable
    leaves only), ``rng`` (the CPU generator state that dropout draws from) and ``data_position``
    (the sampler's JSON-serializable position, kept by the recipe)."""

    step: int
    params: Any
    opt_state: Any
    rng: torch.Tensor
    data_position: dict | None = None

    def replace(self, **changes: Any) -> TrainState:
        """A new TrainState with ``changes`` (field name -> value) applied."""
        return dataclasses.replace(self, **changes)


def trainable_leaves(params: Any, trainable: Filter) -> dict[str, torch.Tensor]:
    """{path: tensor} of the leaves ``trainable`` selects, in flattening order (each tensor as stored, e.g.
    (r, in) for a ``lora_a``, (out, in) for a weight)."""
    return dict(tree.filtered(params, trainable))


def with_leaves(params: Any, leaves: dict[str, torch.Tensor]) -> Any:
    """``params`` with the tensors at ``leaves``' paths replaced (a new tree); each replacement has the
    shape of the tensor it replaces (e.g. (out, in))."""
    return tree.map_with_path(lambda p, x: leaves.get(p, x), params)


def init(params: Any, optimizer: optim.Optimizer, *, trainable: Filter = all_floating, seed: int = 0,
         copy: bool = True) -> TrainState:
    """A fresh TrainState: optimizer state for the trainable leaves, RNG seeded with ``seed``.

    The fused optimizer updates the state's trainable buffers in place (the one documented
    exception to purity: a state is consumed by the step that advances it). ``copy=True`` gives
    the state its own copies of the trainable leaves so ``params`` stays untouched; a recipe
    that owns ``params`` passes ``copy=False`` to save the memory of a second copy.
    """
    leaves = trainable_leaves(params, trainable)
    if not leaves:
        raise ConfigError("train.init: the trainable filter selects no tensor")
    if copy:
        leaves = {p: x.detach().clone() for p, x in leaves.items()}
        params = with_leaves(params, leaves)
    rng = torch.Generator().manual_seed(seed).get_state()
    return TrainState(0, params, optimizer.init(leaves), rng)


def value_and_grad(fn: Callable[..., Any], trainable: Filter, *, has_aux: bool = False) -> Callable[..., Any]:
    """``g(params, *args) -> (fn(params, *args), {path: grad})`` over the trainable leaves.

    ``fn`` returns a scalar (or ``(scalar, aux)`` with ``has_aux``). Leaves that do not reach the
    output get zero gradients.
    """

    def g(params: Any, *args: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        leaves = {p: x.detach().requires_grad_() for p, x in trainable_leaves(params, trainable).items()}
        out = fn(with_leaves(params, leaves), *args)
        value = out[0] if has_aux else out
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        return out, {p: torch.zeros_like(x) if gr is None else gr for (p, x), gr in zip(leaves.items(), grads)}

    return g


def cast_params(params: Any, dtype: torch.dtype | None) -> Any:
    """Params prepared for compute in ``dtype``: float tensors cast (differentiably; a frozen matrix
    stored in lower precision is wrapped in ``upcast.Upcast`` instead of copied), leaf kinds through
    their ``astype``; a no-op for tensors already in ``dtype``."""
    if dtype is None:
        return params

    def cast(x: Any) -> Any:
        if tree.is_kind(x):
            return x.astype(dtype) if hasattr(x, "astype") else x
        return upcast.cast(x, dtype)

    return tree.map(cast, params, is_leaf=tree.is_leaf)


def labelled_tokens(batch: Batch) -> torch.Tensor:
    """The default normalizer of a batch: the positions of ``labels`` (B, T) (or (B,)) that are not -100, as a () tensor."""
    return (batch["labels"] != -100).sum()


def make_step(
    loss_fn: LossFn, optimizer: optim.Optimizer, *, trainable: Filter = all_floating, clip_norm: float | None = None,
    compute_dtype: torch.dtype | None = None, skip_nonfinite: bool = False,
    count: Callable[[Batch], torch.Tensor] = labelled_tokens,
    sync_count: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sync_grads: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> Callable[[TrainState, Batch | Sequence[Batch]], tuple[TrainState, dict[str, float]]]:
    """Build ``step(state, batch_or_micro_batches) -> (new_state, metrics)``.

    A list of micro-batches is one optimizer step with gradients accumulated; the loss is the
    sum of per-item losses over all of them divided by their total ``count`` (labelled tokens by
    default; a task may count examples or pairs). A loss that returns ``(sum, n, sums)`` has each of
    its ``sums`` reported the same way (a metric per item: accuracy, rewards).
    ``sync_count`` / ``sync_grads`` all-reduce across data-parallel ranks. With
    ``skip_nonfinite`` a step whose loss or gradient norm is not finite leaves params and
    optimizer state unchanged (``metrics['skipped'] = 1``). Metrics: loss, count (the normalizer
    summed over micro-batches and ranks), grad_norm, skipped, and the loss's own.
    """
    grad_fn = value_and_grad(lambda p, b, total: _scaled_loss(loss_fn, cast_params(p, compute_dtype), b, total),
                             trainable, has_aux=True)

    def step(state: TrainState, batch: Batch | Sequence[Batch]) -> tuple[TrainState, dict[str, float]]:
        micro = [batch] if isinstance(batch, dict) else list(batch)
        total = sum((count(b) for b in micro), torch.zeros((), dtype=torch.long))
        total = sync_count(total) if sync_count is not None else total
        loss, grads, sums = torch.zeros((), dtype=torch.float32), None, {}
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state.rng)
            for b in micro:
                (scaled, extra), g = grad_fn(state.params, b, total)
                loss = loss + scaled.detach().float()
                sums = {k: sums.get(k, 0.0) + v for k, v in extra.items()}
                grads = g if grads is None else {p: grads[p].add_(g[p]) for p in grads}
            rng = torch.get_rng_state()
        if sync_grads is not None:
            grads = sync_grads(grads)
        norm = optim.global_norm(grads)
        loss_value, norm_value = float(loss), float(norm)
        metrics = {"loss": loss_value, "count": int(total), "grad_norm": norm_value, "skipped": 0}
        metrics |= {k: float(v) for k, v in sums.items()}
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            metrics["nonfinite_grads"] = nonfinite_paths(grads)
            if skip_nonfinite:
                return state.replace(step=state.step + 1, rng=rng), metrics | {"skipped": 1}
        if clip_norm is not None:
            grads = _clip(grads, norm, clip_norm)
        leaves = trainable_leaves(state.params, trainable)
        new_leaves, opt_state = optimizer.update(grads, state.opt_state, leaves)
        params = with_leaves(state.params, new_leaves)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return step


def nonfinite_paths(tensors: dict[str, torch.Tensor], limit: int = 10) -> list[str]:
    """The first ``limit`` paths whose tensor (any shape, e.g. a gradient (out, in)) holds a NaN or an
    infinity (the NaN guard's diagnostic)."""
    bad = []
    for p, x in tensors.items():
        local = x.to_local() if type(x).__name__ == "DTensor" else x
        if not bool(torch.isfinite(local).all()):
            bad.append(p)
            if len(bad) == limit:
                break
    return bad


def _scaled_loss(loss_fn: LossFn, params: Any, batch: Batch, total: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(loss sum / total, {metric: its sum / total, detached})."""
    out = loss_fn(params, batch)
    denominator = total.clamp(min=1).to(out[0].device)
    extra = {k: (v.detach().double() / denominator).cpu() for k, v in (out[2] if len(out) > 2 else {}).items()}
    return out[0] / denominator, extra


def _clip(grads: dict[str, torch.Tensor], norm: torch.Tensor, max_norm: float) -> dict[str, torch.Tensor]:
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return {p: g * factor.to(g.dtype) for p, g in grads.items()}
