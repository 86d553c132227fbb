"""Learning-rate schedules: pure ``step -> lr`` functions, the ``lr`` argument of ``optim.adamw`` / ``sgd``.

- ``constant(lr, warmup=0)``: linear warmup from 0, then ``lr``.
- ``warmup_linear(peak, warmup=, total=, final=0.0)``: warmup, then linear decay to ``final`` at ``total``.
- ``warmup_cosine(peak, warmup=, total=, final=0.0)``: warmup, then half a cosine down to ``final``.

``step`` counts the updates already done (0 for the first), as ``torch.optim.lr_scheduler.LambdaLR``
does. The closed forms are Hugging Face's (``get_constant_schedule_with_warmup``,
``get_linear_schedule_with_warmup``, ``get_cosine_schedule_with_warmup`` with ``min_lr_rate =
final / peak``), so the warmup starts at 0 (step 0 has lr 0) and reaches ``peak`` at ``step = warmup``.
Past ``total`` the decaying schedules stay at ``final`` (HF's cosine would rise again).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from purefine.errors import ConfigError

Schedule = Callable[[int], float]


def _check(name: str, peak: float, warmup: int, total: int | None = None, final: float = 0.0) -> None:
    if not (math.isfinite(peak) and peak >= 0):
        raise ConfigError(f"{name}: learning rate must be a finite number >= 0, found {peak!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"{name}: warmup must be an integer >= 0, found {warmup!r}")
    if total is not None and (not isinstance(total, int) or total < warmup or total <= 0):
        raise ConfigError(f"{name}: total must be a positive integer >= warmup ({warmup}), found {total!r}")
    if not (math.isfinite(final) and final >= 0):
        raise ConfigError(f"{name}: final must be a finite number >= 0, found {final!r}")


def _warmup(peak: float, warmup: int, step: int) -> float:
    return peak * (float(step) / float(max(1, warmup)))


def constant(lr: float, warmup: int = 0) -> Schedule:
    """``lr · step / warmup`` for ``step < warmup``, then ``lr``."""
    _check("constant schedule", lr, warmup)

    def schedule(step: int) -> float:
        return _warmup(lr, warmup, step) if step < warmup else float(lr)

    return schedule


def warmup_linear(peak: float, *, warmup: int, total: int, final: float = 0.0) -> Schedule:
    """Warmup to ``peak`` at ``warmup``, then ``final + (peak − final)·(total − step)/(total − warmup)``,
    and ``final`` from ``total`` on."""
    _check("warmup_linear schedule", peak, warmup, total, final)

    def schedule(step: int) -> float:
        if step < warmup:
            return _warmup(peak, warmup, step)
        remaining = max(0.0, float(total - step) / float(max(1, total - warmup)))
        return final + (peak - final) * remaining

    return schedule


def warmup_cosine(peak: float, *, warmup: int, total: int, final: float = 0.0) -> Schedule:
    """Warmup to ``peak`` at ``warmup``, then ``final + (peak − final)·½(1 + cos(π·p))`` with
    ``p = (step − warmup)/(total − warmup)`` clamped to [0, 1]."""
    _check("warmup_cosine schedule", peak, warmup, total, final)

    def schedule(step: int) -> float:
        if step < warmup:
            return _warmup(peak, warmup, step)
        progress = min(1.0, float(step - warmup) / float(max(1, total - warmup)))
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule
