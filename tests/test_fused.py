"""purefine.fused: the same forward values as the composites they replace, and exact gradients."""

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from purefine import fused


def composite_rms_norm(x, w, eps, offset=False):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (1.0 + w.float())).to(x.dtype)
    return w * h.to(x.dtype)


def composite_rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def composite_glu(act, gate, up):
    return act(gate) * up


def _grads(fn, *xs):
    xs = [x.detach().requires_grad_() for x in xs]
    out = fn(*xs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return out, torch.autograd.grad(out, xs, g)


def _rope_inputs(dtype, b=2, h=3, t=5, d=8):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, t, h, d, generator=gen).to(dtype).transpose(1, 2)  # a transposed view, as heads() gives
    ang = torch.randn(b, 1, t, d // 2, generator=gen)
    ang = torch.cat((ang, ang), -1)
    return x, ang.cos().to(dtype), ang.sin().to(dtype)


CASES = {
    "rms_norm": (lambda x, w: fused.rms_norm(x, w, 1e-5), lambda x, w: composite_rms_norm(x, w, 1e-5),
                 lambda dt: (torch.randn(3, 4, 16).to(dt), (1 + 0.1 * torch.randn(16)).to(dt))),
    "rms_norm_offset": (lambda x, w: fused.rms_norm(x, w, 1e-6, offset=True),
                        lambda x, w: composite_rms_norm(x, w, 1e-6, True),
                        lambda dt: (torch.randn(3, 4, 16).to(dt), (0.1 * torch.randn(16)).to(dt))),
    "swiglu": (functools.partial(fused.glu, F.silu), functools.partial(composite_glu, F.silu),
               lambda dt: (torch.randn(3, 4, 24).to(dt), torch.randn(3, 4, 24).to(dt))),
    "geglu_tanh": (functools.partial(fused.glu, lambda z: F.gelu(z, approximate="tanh")),
                   functools.partial(composite_glu, lambda z: F.gelu(z, approximate="tanh")),
                   lambda dt: (torch.randn(3, 4, 24).to(dt), torch.randn(3, 4, 24).to(dt))),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_bit_equal_and_gradients_match(name, dtype):
    new, old, make = CASES[name]
    torch.manual_seed(0)
    xs = make(dtype)
    out_new, g_new = _grads(new, *xs)
    out_old, g_old = _grads(old, *xs)
    assert torch.equal(out_new, out_old)  # the same ops in the same order: bit-equal values
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for a, b in zip(g_new, g_old):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_composite(dtype):
    x, cos, sin = _rope_inputs(dtype)
    out_new, (g_new,) = _grads(lambda x: fused.rope(x, cos, sin), x)
    out_old, (g_old,) = _grads(lambda x: composite_rope(x, cos, sin), x)
    assert torch.equal(out_new, out_old)
    torch.testing.assert_close(g_new, g_old, **({} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}))


@settings(max_examples=10, deadline=None)
@given(d=st.sampled_from([2, 4, 8]), t=st.integers(1, 4), offset=st.booleans(), seed=st.integers(0, 2**16))
def test_gradcheck_float64(d, t, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, t, d, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: fused.rms_norm(x, w, 1e-6, offset=offset), (x, w))
    up = torch.randn(2, t, d, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(functools.partial(fused.glu, F.silu), (x, up))
    ang = torch.randn(1, 1, t, d // 2, generator=gen, dtype=torch.float64)
    ang = torch.cat((ang, ang), -1)
    xr = torch.randn(1, 2, t, d, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: fused.rope(z, ang.cos(), ang.sin()), (xr,))


def test_only_needed_gradients():
    """A frozen weight gets no gradient computed; a frozen input neither (LoRA's frozen paths)."""
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.ones(8)
    (g,) = torch.autograd.grad(fused.rms_norm(x, w, 1e-6).sum(), [x])
    assert g.shape == x.shape
    gate, up = torch.randn(2, 5), torch.randn(2, 5, requires_grad=True)
    (gu,) = torch.autograd.grad(fused.glu(F.silu, gate, up).sum(), [up])
    torch.testing.assert_close(gu, F.silu(gate))
