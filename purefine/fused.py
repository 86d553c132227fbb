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
- ``lora_linear(x, w, a, b, bias, scale)``: a LoRA projection over a frozen weight with the adapter
  accumulated inside the base matmul (``addmm_``) forward and backward; ``lora.LoRA.linear`` calls
  it where it applies (the adapter's sum is rounded once, so its values are not bit-equal to the
  composite's in half precision: closer to exact).

They take plain tensors in any float dtype; callers (``purefine.ops``, ``purefine.lora``) fall back
to the composite for tensor subclasses. Tests: ``tests/test_fused.py`` and ``tests/test_lora.py``
(values and gradients against the composites and PEFT, ``torch.autograd.gradcheck`` in float64).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


class _RMSNorm(torch.autograd.Function):
    """y = w * (x * r).to(x.dtype) with r = rsqrt(mean(x², -1) + eps) in float32 (Llama, HF's order), or
    y = ((x * r) * (1 + w)).to(x.dtype) all in float32 (``offset``: Gemma)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, eps: float, offset: bool) -> torch.Tensor:
        ctx.offset = offset
        if not offset and x.dtype in _FUSED_NORM_DTYPES and _FUSED_NORM is not None:
            # torch's one-pass kernel: (x * r).to(x.dtype) and r, bit-equal to the float32 composite
            normed, r = _FUSED_NORM(x, [x.shape[-1]], None, eps)
            r = r.to(_stat_dtype(x))  # float32 already on CPU; the backward relies on it everywhere
            ctx.save_for_backward(x, w, r)
            # scaled in place (the same product, no second activation-sized tensor) unless w's dtype promotes
            return normed.mul_(w) if w.dtype == normed.dtype else w * normed
        h = x.to(_stat_dtype(x))
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, w, r)
        if offset:
            return (h * r * (1.0 + w.to(h.dtype))).to(x.dtype)
        return w * (h * r).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        x, w, r = ctx.saved_tensors
        n = torch.mul(x, r)                                  # the normalized input, float32 (..., D), one pass
        need_x, need_w = ctx.needs_input_grad[:2]
        gw = gx = None
        if ctx.offset:
            scale = 1.0 + w.to(r.dtype)
            if need_w:
                gw = _sum_to(torch.mul(g, n), w).to(w.dtype)
            gn = torch.mul(g, scale)
        else:
            if need_w:
                gw = _sum_to(g * n.to(x.dtype), w).to(w.dtype)
            gn = torch.mul(g, w.to(r.dtype))                 # float32 from g's dtype in the same pass
        if need_x:
            # d/dx of x * r: r * (gn - n * mean(gn * n)), cast to x's dtype as it is written (in gn's
            # own memory when x is float32 like it)
            dot = (gn * n).mean(-1, keepdim=True)
            gn.addcmul_(n, dot, value=-1.0)
            gx = gn.mul_(r) if gn.dtype == x.dtype else torch.mul(gn, r, out=torch.empty_like(x))
        return gx, gw, None, None


# aten's fused RMSNorm forward (torch >= 2.8): the normalized input rounded once to x's dtype and the
# float32 reciprocal RMS, in one pass over x instead of six. Its backward has no CPU kernel; ours below.
_FUSED_NORM = getattr(torch.ops.aten, "_fused_rms_norm", None)
_FUSED_NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for the norm statistics (float64 stays float64, for gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _sum_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t (..., D) summed over its leading dims to like's shape (D,)."""
    return t.reshape(-1, t.shape[-1]).sum(0).reshape(like.shape)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, *, offset: bool = False) -> torch.Tensor:
    """x (..., D), w (D,) -> (..., D): RMSNorm in float32 with w (or 1 + w with ``offset``) as the scale."""
    return _RMSNorm.apply(x, w, eps, offset)


class _Rope(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1]; cos, sin (B, 1, T, Dh) constants."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotary(x, cos, sin, -1.0)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        cos, sin = ctx.saved_tensors
        # d/dx: g * cos + rotate_halfᵀ(g * sin), rotate_halfᵀ(y) = [y2, -y1]
        return _rotary(g, cos, sin, 1.0), None, None


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x * cos + rotate(x) * sin by halves, with rotate(x) = [-x2, x1] (sign -1, rotate_half) or
    [x2, -x1] (sign +1, its transpose): each product rounded, then summed, as the composite does (so
    the values are bit-equal), in three passes over x and a half-size temporary instead of four and
    two whole-size ones."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = x * cos
    if sign < 0:   # [x1 c1 - x2 s1, x2 c2 + x1 s2]
        tmp = x2 * sin[..., :half]
        out[..., :half].sub_(tmp)
        out[..., half:].add_(torch.mul(x1, sin[..., half:], out=tmp))
    else:          # [x1 c1 + x2 s2, x2 c2 - x1 s1]
        tmp = x2 * sin[..., half:]
        out[..., :half].add_(tmp)
        out[..., half:].sub_(torch.mul(x1, sin[..., :half], out=tmp))
    return out


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
        if ctx.act is F.silu:  # SwiGLU: silu's own backward kernel, in place; two activation-sized allocations
            g_gate = None
            if ctx.needs_input_grad[0]:
                g_gate = g * up
                torch.ops.aten.silu_backward.grad_input(g_gate, gate, grad_input=g_gate)
            g_up = F.silu(gate).mul_(g) if ctx.needs_input_grad[1] else None
            return g_gate, g_up, None
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_(ctx.needs_input_grad[0])
            a = ctx.act(leaf)
        g_up = g * a.detach() if ctx.needs_input_grad[1] else None
        g_gate = torch.autograd.grad(a, leaf, g * up)[0] if ctx.needs_input_grad[0] else None
        return g_gate, g_up, None


def glu(act: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., F) -> act(gate) * up (..., F): the gated MLP's product (SwiGLU with SiLU)."""
    return _GLU.apply(gate, up, act)


class _LoRALinear(torch.autograd.Function):
    """y = x Wᵀ + bias + s·(x Aᵀ) Bᵀ for a frozen W, the adapter accumulated inside the base matmul's
    output (``addmm_``) and, in backward, s·(g B) A accumulated into g W the same way: no activation-
    sized adapter output, scaled gradient or separate input-gradient sum (autograd's composite makes
    all three). Saves x and x Aᵀ, as the composite does; W is referenced, never copied."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                bias: torch.Tensor | None, scale: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ a.t()                                            # (N, r)
        y = x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())
        y.addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(x2, w, a, b, xa)
        ctx.scale, ctx.shape, ctx.has_bias = scale, x.shape, bias is not None
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        x2, w, a, b, xa = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gb = (g2 @ b).mul_(ctx.scale)                              # s·g B (N, r)
        gx = ga = gbb = gbias = None
        if ctx.needs_input_grad[0]:
            gx = (g2 @ w).addmm_(gb, a).view(ctx.shape)
        if ctx.needs_input_grad[2]:
            ga = gb.t() @ x2
        if ctx.needs_input_grad[3]:
            gbb = (g2.t() @ xa).mul_(ctx.scale)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            gbias = g2.sum(0)
        return gx, None, ga, gbb, gbias, None


def lora_linear(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
                scale: float) -> torch.Tensor:
    """x (..., in), frozen w (out, in), a (r, in), b (out, r), all in x's dtype -> x Wᵀ + bias + scale·(x Aᵀ) Bᵀ."""
    return _LoRALinear.apply(x, w, a, b, bias, scale)
