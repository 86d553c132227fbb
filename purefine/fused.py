"""Elementwise hot spots of a decoder block with hand-derived backward passes.

Autograd's default for ``rms_norm``, rotary embeddings and the gated MLP keeps several activation-
sized temporaries alive per layer (the float32 copy of the input, the normalized product, the
activation's output, the rotated halves) and allocates a new tensor for every elementwise op. Each
function here computes exactly the same forward values as the composite it replaces (same ops, same
roundings) but saves only what its backward needs and recomputes the rest:

- ``rms_norm(x, w, eps, offset=False)``: saves x (the residual stream, alive anyway) and the
  (..., 1) float32 reciprocal RMS. ``offset=True`` is Gemma's ``(1 + w)`` scaling in float32.
- ``rope(x, cos, sin)``: saves nothing activation-sized (cos and sin are shared by every layer).
- ``glu(act, gate, up)``: ``act(gate) * up``, saving gate and up only; ``act(gate)`` is recomputed
  in backward (one elementwise pass) instead of being stored.

They take plain tensors in any float dtype; callers (``purefine.ops``) fall back to the composite
for tensor subclasses. Tests: ``tests/test_fused.py`` (values and gradients against the composites,
``torch.autograd.gradcheck`` in float64).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class _RMSNorm(torch.autograd.Function):
    """y = w * (x * r).to(x.dtype) with r = rsqrt(mean(x², -1) + eps) in float32 (Llama, HF's order), or
    y = ((x * r) * (1 + w)).to(x.dtype) all in float32 (``offset``: Gemma)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, eps: float, offset: bool) -> torch.Tensor:
        h = x.to(_stat_dtype(x))
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, w, r)
        ctx.offset = offset
        if offset:
            return (h * r * (1.0 + w.to(h.dtype))).to(x.dtype)
        return w * (h * r).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        x, w, r = ctx.saved_tensors
        n = x.to(r.dtype) * r                                # the normalized input, float32 (..., D)
        need_x, need_w = ctx.needs_input_grad[:2]
        gw = gx = None
        if ctx.offset:
            scale = 1.0 + w.to(r.dtype)
            if need_w:
                gw = _sum_to(g.to(r.dtype) * n, w).to(w.dtype)
            gn = g.to(r.dtype) * scale
        else:
            if need_w:
                gw = _sum_to(g * n.to(x.dtype), w).to(w.dtype)
            gn = (g * w).to(r.dtype)
        if need_x:
            # d/dx of x * r: r * (gn - n * mean(gn * n))
            dot = (gn * n).mean(-1, keepdim=True)
            gx = gn.sub_(n.mul_(dot)).mul_(r).to(x.dtype)
        return gx, gw, None, None


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for the norm statistics (float64 stays float64, for gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _sum_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t (..., D) summed over its leading dims to like's shape (D,)."""
    return t.reshape(-1, t.shape[-1]).sum(0).reshape(like.shape)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, *, offset: bool = False) -> torch.Tensor:
    """x (..., D), w (D,) -> (..., D): RMSNorm in float32 with w (or 1 + w with ``offset``) as the scale."""
    return _RMSNorm.apply(x, w, eps, offset)


def _rotate(x: torch.Tensor, sign: float) -> torch.Tensor:
    """The half-split rotation [-x2, x1] (sign -1) or its transpose [x2, -x1] (sign +1), one allocation."""
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    if sign < 0:
        torch.neg(x[..., half:], out=out[..., :half])
        out[..., half:] = x[..., :half]
    else:
        out[..., :half] = x[..., half:]
        torch.neg(x[..., :half], out=out[..., half:])
    return out


class _Rope(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1]; cos, sin (B, 1, T, Dh) constants."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        rotated = _rotate(x, -1.0).mul_(sin)
        return (x * cos).add_(rotated)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        cos, sin = ctx.saved_tensors
        # d/dx: g * cos + rotate_halfᵀ(g * sin), rotate_halfᵀ(y) = [y2, -y1]
        return (g * cos).add_(_rotate(g * sin, 1.0)), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh), cos and sin broadcastable to it (no gradient) -> x rotated in the half-split layout."""
    return _Rope.apply(x, cos, sin)


class _GLU(torch.autograd.Function):
    """act(gate) * up, saving gate and up; act's derivative comes from autograd on a recomputed act(gate)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return act(gate).mul_(up)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_(ctx.needs_input_grad[0])
            a = ctx.act(leaf)
        g_up = g * a.detach() if ctx.needs_input_grad[1] else None
        g_gate = torch.autograd.grad(a, leaf, g * up)[0] if ctx.needs_input_grad[0] else None
        return g_gate, g_up, None


def glu(act: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., F) -> act(gate) * up (..., F): the gated MLP's product (SwiGLU with SiLU)."""
    return _GLU.apply(gate, up, act)
