"""Schedules against their closed forms and Hugging Face's LambdaLR schedules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from purefine import schedules
from purefine.errors import ConfigError


def hf_lrs(make, peak: float, steps: int, **kwargs) -> list[float]:
    """Learning rates a transformers scheduler gives at steps 0..steps-1 (LambdaLR on a dummy optimizer)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = make(opt, **kwargs)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


shapes = dict(peak=st.floats(1e-6, 1.0), warmup=st.integers(0, 20), extra=st.integers(1, 40))


@settings(max_examples=15, deadline=None)
@given(**shapes)
def test_warmup_cosine_matches_transformers(peak, warmup, extra):
    from transformers import get_cosine_schedule_with_warmup

    total = warmup + extra
    sched = schedules.warmup_cosine(peak, warmup=warmup, total=total)
    ref = hf_lrs(get_cosine_schedule_with_warmup, peak, total + 1, num_warmup_steps=warmup, num_training_steps=total)
    assert [sched(s) for s in range(total + 1)] == pytest.approx(ref, rel=1e-12, abs=1e-15)


@settings(max_examples=15, deadline=None)
@given(**shapes)
def test_warmup_linear_and_constant_match_transformers(peak, warmup, extra):
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    total = warmup + extra
    linear = schedules.warmup_linear(peak, warmup=warmup, total=total)
    ref = hf_lrs(get_linear_schedule_with_warmup, peak, total + 5, num_warmup_steps=warmup, num_training_steps=total)
    assert [linear(s) for s in range(total + 5)] == pytest.approx(ref, rel=1e-12, abs=1e-15)
    constant = schedules.constant(peak, warmup=warmup)
    ref = hf_lrs(get_constant_schedule_with_warmup, peak, total, num_warmup_steps=warmup)
    assert [constant(s) for s in range(total)] == pytest.approx(ref, rel=1e-12, abs=1e-15)


@settings(max_examples=25, deadline=None)
@given(final_frac=st.floats(0.0, 1.0), step=st.integers(0, 200), **shapes)
def test_closed_forms_with_a_floor(peak, warmup, extra, final_frac, step):
    total, final = warmup + extra, peak * final_frac
    cos = schedules.warmup_cosine(peak, warmup=warmup, total=total, final=final)
    lin = schedules.warmup_linear(peak, warmup=warmup, total=total, final=final)
    if step < warmup:
        expected_cos = expected_lin = peak * step / warmup
    else:
        p = min(1.0, (step - warmup) / (total - warmup))
        expected_cos = final + (peak - final) * 0.5 * (1 + math.cos(math.pi * p))
        expected_lin = final + (peak - final) * (1 - p)
    assert cos(step) == pytest.approx(expected_cos, rel=1e-12, abs=1e-15)
    assert lin(step) == pytest.approx(expected_lin, rel=1e-12, abs=1e-15)
    assert cos(warmup) == pytest.approx(peak) and cos(total) == pytest.approx(final) and lin(total + 7) == pytest.approx(final)
    assert min(cos(step), lin(step)) >= min(final, peak * step / max(1, warmup)) - 1e-15


def test_bad_arguments():
    for make in (lambda: schedules.constant(-1.0), lambda: schedules.constant(1.0, warmup=-1),
                 lambda: schedules.warmup_cosine(1.0, warmup=10, total=5),
                 lambda: schedules.warmup_linear(1.0, warmup=1, total=5, final=-0.1),
                 lambda: schedules.warmup_cosine(float("nan"), warmup=0, total=5)):
        with pytest.raises(ConfigError):
            make()
