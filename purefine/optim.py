"""Optimizers as optax-style pairs of pure functions over flat ``{dotted path: tensor}`` dicts.

- ``Optimizer(init, update)``: ``init(params) -> state``; ``update(grads, state, params) -> (params, state)``.
- ``GradientTransformation(init, update)``: ``update(grads, state, params) -> (grads, state)``.
- ``adamw``: equals ``torch.optim.AdamW`` bit for bit; the fused path calls ``torch._fused_adamw_`` on
  flat lists (grouped by device and dtype), the other path is ``_single_tensor_adam``'s arithmetic.
- ``sgd``: equals ``torch.optim.SGD`` (momentum, Nesterov, weight decay).
- ``chain(*transforms, optimizer)``, ``clip_by_global_norm``, ``global_norm``, ``masked``,
  ``parallel`` (disjoint masked optimizers, e.g. no weight decay on norms and biases), ``load_state``.

Params and grads are flat, insertion-ordered dicts (``tree.flatten`` of the trainable partition).
State is nested dicts/lists of tensors only, for exactly the leaves ``init`` was given, with the
step count as a float32 scalar tensor (as torch keeps it): ``tree.flatten(state)`` is a safetensors
dict, and ``load_state(opt.init(params), flat)`` restores it. Moments are keyed by the param path
(``exp_avg.model.layers.0.self_attn.q_proj.weight.lora_a`` once flattened) and looked up by name,
so a state that went through ``tree.unflatten`` works as is.

Purity: the non-fused paths never modify their arguments. The fused AdamW path reuses the buffers
of ``params`` and of the moments in place (``torch._fused_adamw_`` writes into them) and returns
them in new dicts: treat the arguments of a fused ``update`` as consumed (JAX's buffer donation).
This is the one documented exception to purity.

DTensors (FSDP / tensor-parallel shards) work on both paths: state is created with ``zeros_like``,
so moments carry their parameter's placements. On CPU with torch 2.13, ``torch._fused_adamw_``
accepts DTensor lists (sharding propagation runs the CPU kernel on the local shards; checked in
tests/test_optim.py with a 2-process gloo mesh).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from purefine import tree
from purefine.errors import ConfigError, TreeError

Params = dict[str, torch.Tensor]
State = Any
Schedule = Callable[[int], float]
LearningRate = float | Schedule

ERR_KEYS = "{}: grads and state disagree: {} (state has {} tensors, grads {})"
FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")


class Optimizer(NamedTuple):
    """init(params) -> state; update(grads, state, params) -> (new params, new state)."""

    init: Callable[[Params], State]
    update: Callable[[Params, State, Params], tuple[Params, State]]


class GradientTransformation(NamedTuple):
    """init(params) -> state; update(grads, state, params) -> (new grads, new state)."""

    init: Callable[[Params], State]
    update: Callable[[Params, State, Params], tuple[Params, State]]


def _lr_at(lr: LearningRate, count: int) -> float:
    return float(lr(count)) if callable(lr) else float(lr)


def _new_step() -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32)


def _moments(state_part: Any, grads: Params, where: str) -> dict[str, torch.Tensor]:
    """The per-path buffers of ``state_part`` (flat or unflattened), checked against the grad keys."""
    flat = tree.flatten(state_part)
    if flat.keys() != grads.keys():
        missing = [k for k in grads if k not in flat][:3]
        extra = [k for k in flat if k not in grads][:3]
        raise TreeError(ERR_KEYS.format(where, f"missing state for {missing}, state for unknown {extra}",
                                        len(flat), len(grads)))
    return flat


def _check_params(grads: Params, params: Params, where: str) -> None:
    missing = [k for k in grads if k not in params]
    if missing:
        raise TreeError(f"{where}: grads for {missing[:3]} have no matching params")


def _zeros_like(params: Params) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(p, memory_format=torch.preserve_format) for k, p in params.items()}


def _use_fused(fused: bool | None, params: Mapping[str, torch.Tensor]) -> bool:
    if fused is not None:
        return fused
    return all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params.values())


def _check_hyper(name: str, **values: float) -> None:
    for key, value in values.items():
        if not (value >= 0):
            raise ConfigError(f"{name}: {key} must be >= 0, found {value!r}")


def adamw(lr: LearningRate, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01,
          fused: bool | None = None) -> Optimizer:
    """AdamW (decoupled weight decay), equal to ``torch.optim.AdamW`` with the same flags bit for bit.

    ``lr`` is a float or a schedule ``step -> lr`` called with the number of updates done so far (0 for
    the first, as ``LambdaLR`` does). ``fused=None`` picks the fused kernel for floating tensors on
    cpu/cuda/xpu/mps (which then reuses the param and moment buffers; see the module doc).
    State: ``{"step": () float32, "exp_avg": {path: like param}, "exp_avg_sq": {path: like param}}``.
    """
    _check_hyper("adamw", eps=eps, weight_decay=weight_decay)
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ConfigError(f"adamw: betas must be in [0, 1), found b1={b1!r}, b2={b2!r}")

    def init(params: Params) -> State:
        return {"step": _new_step(), "exp_avg": _zeros_like(params), "exp_avg_sq": _zeros_like(params)}

    @torch.no_grad()
    def update(grads: Params, state: State, params: Params) -> tuple[Params, State]:
        _check_params(grads, params, "adamw")
        m, v = _moments(state["exp_avg"], grads, "adamw"), _moments(state["exp_avg_sq"], grads, "adamw")
        lr_now = _lr_at(lr, int(state["step"].item()))
        step = state["step"] + 1
        hyper = dict(lr=lr_now, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
        kernel = _adamw_fused if _use_fused(fused, {k: params[k] for k in grads}) else _adamw_reference
        new_p, new_m, new_v = kernel(grads, params, m, v, step, **hyper)
        return {**params, **new_p}, {"step": step, "exp_avg": new_m, "exp_avg_sq": new_v}

    return Optimizer(init, update)


def _adamw_reference(grads: Params, params: Params, m: Params, v: Params, step: torch.Tensor, *, lr: float,
                     b1: float, b2: float, eps: float, weight_decay: float) -> tuple[Params, Params, Params]:
    """torch's ``_single_tensor_adam`` (decoupled decay, not capturable) written out of place."""
    t = float(step.item())
    bias1, bias2 = 1 - b1**t, 1 - b2**t
    step_size, bias2_sqrt = lr / bias1, bias2**0.5
    new_p, new_m, new_v = {}, {}, {}
    for k, g in grads.items():
        p = params[k].mul(1 - lr * weight_decay) if weight_decay != 0 else params[k]
        new_m[k] = torch.lerp(m[k], g, 1 - b1)
        new_v[k] = v[k].mul(b2).addcmul_(g, g, value=1 - b2)
        denom = (new_v[k].sqrt() / bias2_sqrt).add_(eps)
        new_p[k] = p.addcdiv(new_m[k], denom, value=-step_size)
    return new_p, new_m, new_v


def _groups(keys: list[str], tensors: Params) -> dict[tuple[torch.device, torch.dtype], list[str]]:
    out: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for k in keys:
        out.setdefault((tensors[k].device, tensors[k].dtype), []).append(k)
    return out


def _adamw_fused(grads: Params, params: Params, m: Params, v: Params, step: torch.Tensor, *, lr: float,
                 b1: float, b2: float, eps: float, weight_decay: float) -> tuple[Params, Params, Params]:
    """``torch._fused_adamw_`` per (device, dtype) group; writes into params, m and v (buffer donation)."""
    for (device, _), keys in _groups(list(grads), params).items():
        device_step = step.to(device)
        torch._fused_adamw_(
            [params[k] for k in keys], [grads[k] for k in keys], [m[k] for k in keys], [v[k] for k in keys], [],
            [device_step] * len(keys), amsgrad=False, lr=lr, beta1=b1, beta2=b2, weight_decay=weight_decay,
            eps=eps, maximize=False,
        )
    return {k: params[k] for k in grads}, {k: m[k] for k in grads}, {k: v[k] for k in grads}


def sgd(lr: LearningRate, *, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> Optimizer:
    """SGD equal to ``torch.optim.SGD`` (dampening 0): ``p -= lr·(g + wd·p)`` through an optional momentum buffer.

    State: ``{"step": () float32}`` plus ``"momentum": {path: like param}`` when ``momentum > 0``.
    """
    _check_hyper("sgd", momentum=momentum, weight_decay=weight_decay)
    if nesterov and momentum <= 0:
        raise ConfigError("sgd: nesterov=True needs momentum > 0")

    def init(params: Params) -> State:
        return {"step": _new_step(), **({"momentum": _zeros_like(params)} if momentum else {})}

    @torch.no_grad()
    def update(grads: Params, state: State, params: Params) -> tuple[Params, State]:
        _check_params(grads, params, "sgd")
        count = int(state["step"].item())
        lr_now = _lr_at(lr, count)
        bufs = _moments(state["momentum"], grads, "sgd") if momentum else {}
        new_p, new_bufs = {}, {}
        for k, g in grads.items():
            if weight_decay != 0:
                g = g.add(params[k], alpha=weight_decay)
            if momentum:
                new_bufs[k] = g.detach().clone() if count == 0 else bufs[k].mul(momentum).add_(g)
                g = g.add(new_bufs[k], alpha=momentum) if nesterov else new_bufs[k]
            new_p[k] = params[k].add(g, alpha=-lr_now)
        new_state = {"step": state["step"] + 1, **({"momentum": new_bufs} if momentum else {})}
        return {**params, **new_p}, new_state

    return Optimizer(init, update)


def global_norm(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all tensors (any shapes) as one vector: a scalar tensor (), computed as ``clip_grad_norm_`` does
    (``_foreach_norm`` per device and dtype, then the norm of the norms). DTensors are reduced to a
    plain (replicated) scalar."""
    tensors = list(grads.values())
    if not tensors:
        return torch.zeros(())
    norms: list[torch.Tensor] = []
    for (device, _), keys in _groups(list(grads), dict(grads)).items():
        group = [grads[k] for k in keys]
        if any(_is_dtensor(g) for g in group):
            norms.extend(_replicated(torch.linalg.vector_norm(g)) for g in group)
        else:
            norms.extend(torch._foreach_norm(group, 2.0))
    first = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), 2.0)


def _is_dtensor(x: Any) -> bool:
    return type(x).__name__ == "DTensor"


def _replicated(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if _is_dtensor(x) else x


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all grads by ``min(1, max_norm / (global_norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``."""
    if not max_norm > 0:
        raise ConfigError(f"clip_by_global_norm: max_norm must be > 0, found {max_norm!r}")

    def init(params: Params) -> State:
        return {}

    @torch.no_grad()
    def update(grads: Params, state: State, params: Params) -> tuple[Params, State]:
        coef = torch.clamp(max_norm / (global_norm(grads) + 1e-6), max=1.0)
        return {k: g * coef.to(g.device) for k, g in grads.items()}, state

    return GradientTransformation(init, update)


def chain(*parts: GradientTransformation | Optimizer) -> Optimizer:
    """``chain(t1, ..., tn, optimizer)``: grads go through each transform in turn, then the optimizer.

    State: ``[state of t1, ..., state of tn, state of the optimizer]``.
    """
    if not parts or not isinstance(parts[-1], Optimizer):
        raise ConfigError("chain: the last argument must be an Optimizer (adamw, sgd, ...)")
    transforms, optimizer = parts[:-1], parts[-1]
    for t in transforms:
        if not isinstance(t, GradientTransformation):
            raise ConfigError(f"chain: expected GradientTransformations before the optimizer, found {type(t).__name__}")

    def init(params: Params) -> State:
        return [t.init(params) for t in transforms] + [optimizer.init(params)]

    def update(grads: Params, state: State, params: Params) -> tuple[Params, State]:
        new_state = []
        for t, s in zip(transforms, state[:-1]):
            grads, s = t.update(grads, s, params)
            new_state.append(s)
        params, s = optimizer.update(grads, state[-1], params)
        return params, new_state + [s]

    return Optimizer(init, update)


def masked(inner: Optimizer | GradientTransformation,
           keep: Callable[[str], bool]) -> Optimizer | GradientTransformation:
    """``inner`` applied to the paths ``keep(path)`` selects only; the others pass through unchanged
    (params not updated by a masked Optimizer, grads not transformed by a masked transform).
    The state is ``inner``'s, for the kept paths alone."""

    def init(params: Params) -> State:
        return inner.init({k: p for k, p in params.items() if keep(k)})

    def update(grads: Params, state: State, params: Params) -> tuple[Params, State]:
        kept = {k: g for k, g in grads.items() if keep(k)}
        sub_params = {k: params[k] for k in kept if k in params}
        out, state = inner.update(kept, state, sub_params)
        if isinstance(inner, Optimizer):
            return {**params, **out}, state
        return {k: out.get(k, g) for k, g in grads.items()}, state

    return type(inner)(init, update)


def parallel(*optimizers: Optimizer) -> Optimizer:
    """Run each optimizer in turn, each on the paths its ``masked`` keeps (make the masks disjoint).

    Equal to torch's param groups, e.g. AdamW without weight decay on norms and biases::

        parallel(masked(adamw(lr, weight_decay=0.1), decays),
                 masked(adamw(lr, weight_decay=0.0), lambda path: not decays(path)))
    """

    def init(params: Params) -> State:
        return [o.init(params) for o in optimizers]

    def update(grads: Params, state: State, params: Params) -> tuple[Params, State]:
        new_state = []
        for o, s in zip(optimizers, state):
            params, s = o.update(grads, s, params)
            new_state.append(s)
        return params, new_state

    return Optimizer(init, update)


def decays(path: str) -> bool:
    """The usual weight-decay mask: false for norm weights and biases, true for everything else."""
    parts = path.split(".")
    return not (parts[-1] == "bias" or (len(parts) > 1 and parts[-2].endswith("norm")))


def load_state(template: State, flat: Mapping[str, torch.Tensor]) -> State:
    """Rebuild a state from ``{dotted path: tensor}`` (each of its template leaf's shape, e.g. (out, r)
    for a moment of a LoRA B, () for the step count; read from safetensors, say) in the structure of
    ``template`` (``opt.init(params)``), checking names and shapes; each tensor takes the template's
    dtype and device (a DTensor template is distributed with its own placements)."""
    names = tree.flatten(template)
    missing, extra = [n for n in names if n not in flat], [n for n in flat if n not in names]
    if missing or extra:
        raise TreeError(f"optimizer state: missing {missing[:3]}, unexpected {extra[:3]} "
                        f"({len(names)} tensors expected, {len(flat)} found)")

    def fill(path: str, like: torch.Tensor) -> torch.Tensor:
        value = flat[path]
        if tuple(value.shape) != tuple(like.shape):
            raise TreeError(f"optimizer state {path!r}: shape {tuple(value.shape)}, expected {tuple(like.shape)}")
        if _is_dtensor(like):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(value.to(like.dtype), like.device_mesh, like.placements)
        return value.to(device=like.device, dtype=like.dtype)

    return tree.map_with_path(fill, template)
