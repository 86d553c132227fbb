"""Frozen weights stored in low precision and computed in a higher one: the ``Upcast`` leaf kind.

On a CPU without native bf16 (AVX2 only, AVX512 without BF16) torch's bf16 matmuls run 8-200x
slower than fp32, so a run computes in fp32 there; its frozen weights can still be *stored* in bf16,
half the memory. ``cast(x, dtype)`` — what ``train.cast_params`` and ``LoRA.astype`` apply to every
tensor inside the step — wraps such a frozen matrix in ``Upcast(base, dtype)`` instead of copying it:

- ``linear(x)``: ``x @ base.to(x.dtype)ᵀ`` through an autograd Function that saves the stored
  weight, never the upcast copy, and upcasts it again in backward for the input gradient. A weight
  larger than ``ops.UPCAST_BLOCK_BYTES`` once upcast is upcast and multiplied a block of output rows
  at a time (``ops.mm_wt`` / ``ops.mm_w``).
- ``embed(tokens)``: the rows gathered from the stored table, then upcast.
- ``dense()``: the whole weight upcast (``ops.embedding`` / merging, where a dense tensor is needed).

Trained tensors are never wrapped: they are float32 masters cast differentiably.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from purefine import ops, tree


class _UpcastLinear(torch.autograd.Function):
    """x @ w.to(x.dtype)ᵀ for a frozen w, saving w as stored."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return ops.blocks_linear(x, ops.upcast_blocks(w, x.dtype), w.shape[0])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        (w,) = ctx.saved_tensors
        return (ops.blocks_input_grad(g, ops.upcast_blocks(w, g.dtype), w.shape[1]) if ctx.needs_input_grad[0]
                else None), None


@dataclass(frozen=True)
class Upcast:
    """A frozen weight ``base`` (e.g. (out, in) bf16) that computes in ``dtype`` (e.g. float32)."""

    base: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        """The stored weight's shape, e.g. (out, in)."""
        return self.base.shape

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype; the bias (out,) is upcast too."""
        if torch.compiler.is_compiling() or _functorch_active():
            y = F.linear(x, self.base.to(x.dtype))
        else:
            y = _UpcastLinear.apply(x, self.base)
        return y if bias is None else y + bias.to(y.dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> rows (B, T, D) in ``dtype``."""
        return F.embedding(tokens, self.base).to(self.dtype)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole weight in ``dtype`` (default: the compute dtype)."""
        return self.base.to(dtype or self.dtype)

    def astype(self, dtype: torch.dtype) -> Any:
        """The same stored weight computing in ``dtype`` (the plain tensor when ``dtype`` is its own)."""
        return cast(self.base, dtype)


tree.register_node(Upcast, ("base",), ("dtype",))


def _functorch_active() -> bool:
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def cast(x: torch.Tensor, dtype: torch.dtype) -> Any:
    """``x`` prepared for compute in ``dtype``: unchanged when it is already ``dtype`` (or not floating);
    a frozen plain matrix of lower precision wrapped in ``Upcast``; anything else cast (differentiably)."""
    if not x.is_floating_point() or x.dtype == dtype:
        return x
    if (type(x) is torch.Tensor and not x.requires_grad and x.dim() == 2
            and x.element_size() < torch.empty((), dtype=dtype).element_size()):
        return Upcast(x, dtype)
    return x.to(dtype)
