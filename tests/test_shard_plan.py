"""Sharding plans as data, in one process: placements per style and mesh, LoRA / NF4 children,
NF4 slices for tensor parallelism, shard regions against torch.chunk, the sliced double
quantization, pipeline stage ranges, owners and tied weights."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import Replicate, Shard

from purefine import lora, models, nf4, shard, tree
from purefine.errors import ConfigError
from purefine.shard import checkpoint_io, nf4_tp, plan, stages

R = Replicate()
SIZES = {"dp_replicate": 1, "dp_shard": 2, "tp": 2}


@pytest.mark.parametrize("shape, style, sizes, expected", [
    ((8, 4), None, dict(dp_shard=2, tp=1), (R, Shard(0), R)),          # FSDP alone: Shard(0)
    ((8, 4), "colwise", dict(dp_shard=2, tp=1), (R, Shard(0), R)),     # tp = 1: the style does nothing
    ((8, 4), "colwise", dict(dp_shard=2, tp=2), (R, Shard(1), Shard(0))),  # FSDP takes the dim tp leaves
    ((8, 4), "rowwise", dict(dp_shard=2, tp=2), (R, Shard(0), Shard(1))),
    ((8,), "colwise", dict(dp_shard=2, tp=2), (R, R, Shard(0))),       # a colwise bias: tp only
    ((8,), "rowwise", dict(dp_shard=2, tp=2), (R, Shard(0), R)),       # a rowwise bias: added after the sum
    ((), None, dict(dp_shard=2, tp=2), (R, R, R)),
    ((8, 4), None, dict(dp_replicate=2, dp_shard=1, tp=1), (R, R, R)),  # data parallel: replicas
])
def test_tensor_placements(shape, style, sizes, expected) -> None:
    assert plan.tensor_placements(shape, style, {"dp_replicate": 1, **sizes}) == expected


def test_llama_plan_names_the_projections() -> None:
    cfg = models.preset("llama-debug")
    table = shard.plan_for(cfg)
    styles = {p: plan.style_of(p, table) for p in models.param_shapes(cfg)}
    assert styles["model.layers.1.self_attn.q_proj.weight"] == "colwise"
    assert styles["model.layers.1.mlp.up_proj.weight"] == "colwise"
    assert styles["model.layers.1.self_attn.o_proj.weight"] == "rowwise"
    assert styles["model.layers.1.mlp.down_proj.weight"] == "rowwise"
    assert {p for p, s in styles.items() if s is None} == {
        p for p in styles if "norm" in p or "embed" in p or p.startswith("lm_head")}
    assert shard.plan_for(models.preset("bert-debug")) == shard.GENERIC_PLAN


def _lora_leaf(dora: bool = False) -> lora.LoRA:
    params = {"w": {"weight": torch.randn(16, 8)}}
    return lora.apply(params, rank=4, alpha=8, where=r"w\.weight", dora=dora)["w"]["weight"]


def test_lora_children_follow_the_tp_style() -> None:
    col = plan.leaf_placements(_lora_leaf(dora=True), "q_proj.weight", "colwise", SIZES)
    assert (col.base, col.lora_a, col.lora_b, col.magnitude) == (
        (R, Shard(1), Shard(0)), (R, Shard(0), R), (R, Shard(1), Shard(0)), (R, R, Shard(0)))
    row = plan.leaf_placements(_lora_leaf(), "o_proj.weight", "rowwise", SIZES)
    assert (row.base, row.lora_a, row.lora_b) == ((R, Shard(0), Shard(1)), (R, Shard(0), Shard(1)), (R, Shard(0), R))
    with pytest.raises(ConfigError, match="DoRA on a row-parallel weight"):
        plan.leaf_placements(_lora_leaf(dora=True), "o_proj.weight", "rowwise", SIZES)


@pytest.mark.parametrize("shape, ranks, split", [
    ((256, 128), 2, True),    # 2 groups of 64*256 elements: one per rank
    ((128, 128), 2, False),   # 1 group: not divisible, kept whole
    ((256, 128), 1, False),   # no dp_shard
    ((512, 128), 4, True),
])
def test_nf4_children_shard_only_whole_groups(shape, ranks, split) -> None:
    q = nf4.quantize_tensor(torch.randn(shape))
    placed = plan.leaf_placements(q, "mlp.up_proj.weight", None, {"dp_replicate": 1, "dp_shard": ranks, "tp": 1})
    fsdp = Shard(0) if split else R
    assert placed.codes == placed.scale_codes == placed.scale_factors == (R, fsdp, R)
    assert placed.scale_mean == (R, R, R)


def test_nf4_weights_split_over_tensor_parallel_in_the_row_block_layout() -> None:
    q = nf4_tp.to_tp_layout(nf4.quantize_tensor(torch.randn(256, 128)))
    assert tuple(q.codes.shape) == (256, 64) and tuple(q.scale_codes.shape) == (256, 2)
    col = plan.leaf_placements(q, "model.layers.0.mlp.up_proj.weight", "colwise", SIZES)
    assert col.codes == col.scale_codes == (R, Shard(1), Shard(0)) and col.scale_factors == col.scale_mean == (R, R, R)
    row = plan.leaf_placements(q, "model.layers.0.mlp.down_proj.weight", "rowwise", SIZES)
    assert row.codes == row.scale_codes == (R, Shard(0), Shard(1))


@pytest.mark.parametrize("shape, style, tp, message", [
    ((256, 96), "colwise", 2, "rows are whole blocks of 64"),
    ((255, 128), "colwise", 2, "row count divisible by 2"),
    ((256, 192), "rowwise", 2, r"columns per rank \(in / 2\) a multiple of 64"),
])
def test_nf4_weights_that_cannot_split_over_tp_are_named(shape, style, tp, message) -> None:
    q = nf4.quantize_tensor(torch.randn(shape))
    path, sizes = "model.layers.0.mlp.up_proj.weight", {"dp_replicate": 1, "dp_shard": 1, "tp": tp}
    with pytest.raises(ConfigError, match=f"{path}: an NF4 weight split over {tp} .*{message}"):
        plan.leaf_placements(q, path, style, sizes)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 12), blocks=st.integers(1, 6), tp=st.sampled_from([1, 2, 4]), rowwise=st.booleans(),
       seed=st.integers(0, 2**16))
def test_nf4_tensor_parallel_slices_dequantize_to_the_whole_weights_slices(rows, blocks, tp, rowwise, seed) -> None:
    """Each rank's ``local_leaf`` (its rows or columns of the row-block layout, the whole weight's
    group factors) dequantizes bit for bit to its slice of the whole weight; the layout round-trips."""
    shape = (rows * (1 if rowwise else tp), blocks * nf4.BLOCK_SIZE * (tp if rowwise else 1))
    q = nf4.quantize_tensor(torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3)
    layout, whole = nf4_tp.to_tp_layout(q), q.dense()
    back = nf4_tp.from_tp_layout(layout)
    for child in ("codes", "scale_codes", "scale_factors", "scale_mean"):
        assert torch.equal(getattr(back, child), getattr(q, child)), child
    dim = 1 if rowwise else 0
    for rank in range(tp):
        codes, scale_codes = layout.codes.chunk(tp, dim)[rank], layout.scale_codes.chunk(tp, dim)[rank]
        piece = nf4.NF4(codes, scale_codes, layout.scale_factors, layout.scale_mean, q.shape, q.dtype)
        size = whole.shape[dim] // tp
        local = nf4_tp.local_leaf(piece, 0 if rowwise else rank * size, rank * size if rowwise else 0)
        assert torch.equal(local.dense(), whole.narrow(dim, rank * size, size)), (rank, shape)


def _fake_mesh(sizes: tuple[int, ...], coord: tuple[int, ...]) -> SimpleNamespace:
    return SimpleNamespace(mesh=torch.empty(sizes), get_coordinate=lambda: list(coord))


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), data=st.data())
def test_local_region_is_the_torch_chunk_dtensor_gives(shape, data) -> None:
    """Shard regions (a sharded read's rows) equal nested torch.chunk, empty trailing shards included."""
    sizes = tuple(data.draw(st.integers(1, 4)) for _ in range(3))
    dims = data.draw(st.permutations(range(len(shape))))
    placements = tuple(Shard(dims[i]) if i < len(dims) and data.draw(st.booleans()) else R for i in range(3))
    full = torch.arange(torch.Size(shape).numel()).reshape(shape)
    for coord in torch.cartesian_prod(*[torch.arange(n) for n in sizes]).reshape(-1, 3).tolist():
        region = checkpoint_io.local_region(tuple(shape), _fake_mesh(sizes, tuple(coord)), placements)
        got = full
        for d, (start, length) in enumerate(region):
            got = got.narrow(d, start, length)
        want = full
        for i, p in enumerate(placements):
            if isinstance(p, Shard):
                chunks = want.chunk(sizes[i], dim=p.dim)
                want = chunks[coord[i]] if coord[i] < len(chunks) else want.narrow(p.dim, 0, 0)
        assert torch.equal(got, want), (shape, sizes, placements, coord)


@settings(max_examples=10, deadline=None)
@given(groups=st.integers(1, 4), ranks=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_double_quantization_by_slices_equals_the_whole(groups, ranks, seed) -> None:
    """Each rank's slice of whole groups, with the mean over all ranks, gives the same bits."""
    blocks = groups * ranks * nf4.GROUP_SIZE
    absmax = torch.rand(blocks, generator=torch.Generator().manual_seed(seed)) * 3
    codes, factors, mean = nf4.double_quantize(absmax)
    pieces = [checkpoint_io.double_quantize_with_mean(part, absmax.mean()) for part in absmax.chunk(ranks)]
    assert torch.equal(torch.cat([c for c, _ in pieces]), codes)
    assert torch.equal(torch.cat([f for _, f in pieces]), factors)


def test_stage_ranges_and_owners() -> None:
    assert shard.stage_ranges(5, 2) == [range(0, 3), range(3, 5)]
    assert shard.stage_ranges(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ConfigError, match="only 2 layers"):
        shard.stage_ranges(2, 3)
    ranges = shard.stage_ranges(2, 2)
    cfg = models.preset("llama-debug")
    assert stages.owner_stage(cfg, "model.embed_tokens.weight", ranges) == 0
    assert stages.owner_stage(cfg, "model.layers.1.mlp.up_proj.weight.lora_a", ranges) == 1
    assert stages.owner_stage(cfg, "lm_head.weight", ranges) == 1
    gpt2 = models.preset("gpt2-debug")
    assert stages.owner_stage(gpt2, "transformer.wpe.weight", ranges) == 0
    assert stages.owner_stage(gpt2, "transformer.h.1.attn.c_attn.weight", ranges) == 1
    assert stages.owner_stage(gpt2, "transformer.ln_f.bias", ranges) == 1
    rank1 = shard.plan_stages(cfg, 2).rank_params(models.init(cfg, seed=0), 1)
    assert rank1["model"]["embed_tokens"]["weight"] is None and rank1["model"]["layers"][0]["mlp"]["up_proj"]["weight"] is None
    assert rank1["model"]["layers"][1]["mlp"]["up_proj"]["weight"] is not None and rank1["lm_head"]["weight"] is not None


@pytest.mark.parametrize("preset, tied", [("qwen2-debug", "model.embed_tokens.weight"),
                                          ("gpt2-debug", "transformer.wte.weight"), ("llama-debug", None)])
def test_a_tied_embedding_is_held_by_the_first_and_the_last_stage(preset, tied) -> None:
    cfg = models.preset(preset)
    stage_plan = shard.plan_stages(cfg, 2)
    assert stage_plan.tied == ((tied,) if tied else ())
    params = models.init(cfg, seed=0)
    last = stage_plan.rank_params(params, 1)
    held = {p for p, _ in tree.leaves_with_paths(last)}
    assert (tied in held) if tied else not any("embed" in p or ".wte." in p for p in held)


def test_virtual_stages_alternate_over_the_ranks() -> None:
    """Interleaved schedules: 4 stages on 2 ranks, stage s on rank s mod 2 (torch's loop placement)."""
    cfg4 = dataclasses.replace(models.preset("llama-debug"), num_hidden_layers=4)
    stage_plan = shard.plan_stages(cfg4, 2, stages_per_rank=2)
    assert stage_plan.ranges == tuple(range(i, i + 1) for i in range(4))
    assert stage_plan.stages_of(0) == [0, 2] and stage_plan.stages_of(1) == [1, 3] and stage_plan.last_rank == 1
    assert stage_plan.holders("model.layers.2.mlp.up_proj.weight") == {0}
    assert stage_plan.holders("lm_head.weight") == {1}


def test_pipeline_refuses_what_it_cannot_split() -> None:
    with pytest.raises(ConfigError, match="causal language models"):
        shard.plan_stages(models.preset("bert-debug"), 2)
    with pytest.raises(ConfigError, match="only 2 layers to split into 4 stages"):
        shard.plan_stages(models.preset("llama-debug"), 2, stages_per_rank=2)
