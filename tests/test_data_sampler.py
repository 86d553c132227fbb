"""The resumable sampler: exact resume from any saved state, disjoint rank shards that cover each epoch,
and the packing plan's invariants."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from purefine.data import Sample, SamplerState, batches, epoch_order, from_samples, plan_rows, unpack
from purefine.errors import DataError


def make_dataset(n: int, seed: int = 0, max_len: int = 20):
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        length = rng.randint(2, max_len)
        tokens = [1000 + i] + [rng.randint(3, 999) for _ in range(length - 1)]  # first token identifies the sample
        samples.append(Sample(tokens, [*tokens[1:], -100]))
    return from_samples(samples, pad_id=0)


def sample_ids(batch) -> list[int]:
    """Which samples a batch holds, in order (their identifying first token)."""
    return [s.tokens[0] - 1000 for s in unpack(batch)] if "segment_ids" in batch else \
        [int(t) - 1000 for t in batch["tokens"][:, 0] if t >= 1000]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("packing", [True, False])
def test_resume_yields_exactly_the_remaining_batches(packing):
    ds = make_dataset(37)
    kw = dict(batch_size=3, seq_len=32, packing=packing)
    run = list(itertools.islice(batches(ds, sampler_state=SamplerState(seed=5), **kw), 30))  # crosses epochs
    assert run[-1][1].epoch >= 1
    for k in (0, 1, 7, len(run) - 2):
        saved = json.loads(json.dumps(run[k][1].to_dict()))  # through JSON, as a checkpoint stores it
        resumed = list(itertools.islice(batches(ds, sampler_state=SamplerState.from_dict(saved), **kw), len(run) - k - 1))
        assert len(resumed) == len(run) - k - 1
        for (want, want_state), (got, got_state) in zip(run[k + 1:], resumed):
            assert same(want, got) and want_state == got_state


@pytest.mark.parametrize("packing, world_size", [(True, 2), (False, 2), (True, 3)])
def test_ranks_see_disjoint_shards_that_cover_the_epoch(packing, world_size):
    ds = make_dataset(41)
    per_rank = []
    for rank in range(world_size):
        seen = [sample_ids(b) for b, _ in batches(ds, batch_size=2, seq_len=32, packing=packing, loop=False,
                                                   sampler_state=SamplerState(seed=1), rank=rank, world_size=world_size)]
        per_rank.append(seen)
    assert len({len(seen) for seen in per_rank}) == 1  # every rank takes the same number of steps
    flat = [i for seen in per_rank for b in seen for i in b]
    assert sorted(flat) == list(range(len(ds)))  # disjoint and covering


def test_epochs_are_reshuffled_deterministically():
    a, b = epoch_order(50, 3, 0), epoch_order(50, 3, 1)
    assert sorted(a) == sorted(b) == list(range(50)) and list(a) != list(b)
    assert list(epoch_order(50, 3, 1)) == list(b)
    assert list(epoch_order(50, 3, 0, shuffle=False)) == list(range(50))
    ds = make_dataset(10)
    ordered = [sample_ids(b) for b, _ in batches(ds, batch_size=1, seq_len=32, packing=False, shuffle=False, loop=False)]
    assert ordered == [[i] for i in range(10)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(1, 4), st.integers(8, 40), st.integers(0, 3))
def test_packing_plan_is_greedy_and_never_overflows(lengths, rows, seq_len, seed):
    state = SamplerState(seed=seed)
    placed = []
    while True:
        plan, state = plan_rows(lengths, state, rows=rows, seq_len=seq_len, packing=True, loop=False)
        if not plan:
            break
        assert 1 <= len(plan) <= rows
        for r, row in enumerate(plan):
            used = sum(min(lengths[i], seq_len) for i in row)
            assert used <= seq_len
            if r + 1 < len(plan):  # next-fit: the next row's first sample did not fit here
                assert used + min(lengths[plan[r + 1][0]], seq_len) > seq_len
        placed += [i for row in plan for i in row]
    assert placed == list(epoch_order(len(lengths), seed, 0))


def test_bad_states_are_errors():
    with pytest.raises(DataError, match="'position' must be a non-negative integer"):
        SamplerState.from_dict({"seed": 0, "epoch": 0, "position": "3"})
    with pytest.raises(DataError, match="outside the dataset's 5 samples"):
        plan_rows([3] * 5, SamplerState(position=9), rows=1, seq_len=8, packing=True)
    with pytest.raises(DataError, match="rank 2 is outside world_size 2"):
        next(batches(make_dataset(5), batch_size=1, seq_len=8, packing=True, rank=2, world_size=2))
