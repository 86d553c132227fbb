"""Optimizers against torch.optim bit for bit: AdamW (fused and not), SGD, clipping, masks, state I/O, DTensors."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from purefine import optim, schedules, tree
from purefine.errors import ConfigError, TreeError

STEPS = 10


def random_tree(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A flat trainable dict of assorted shapes, insertion-ordered like a params partition."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.layers.0.self_attn.q_proj.weight.lora_a": (4, 12), "model.layers.0.self_attn.q_proj.weight.lora_b": (12, 4),
              "model.layers.10.mlp.up_proj.weight": (7, 5), "model.layers.2.input_layernorm.weight": (5,),
              "model.norm.weight": (5,), "lm_head.bias": (3,), "scalar": ()}
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def grad_sequence(params: dict, seed: int, steps: int = STEPS) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 1000)
    return [{k: torch.randn(p.shape, generator=g).to(p.dtype) * 3 for k, p in params.items()} for _ in range(steps)]


def run_ours(opt: optim.Optimizer, params: dict, grads: list[dict]) -> tuple[dict, object]:
    params = {k: p.clone() for k, p in params.items()}
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(g, state, params)
    return params, state


def run_torch(make_opt, params: dict, grads: list[dict], *, groups=None, schedule=None, clip=None) -> dict:
    tensors = {k: torch.nn.Parameter(p.clone()) for k, p in params.items()}
    opt = make_opt(groups(tensors) if groups else list(tensors.values()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule else None
    for g in grads:
        for k, t in tensors.items():
            t.grad = g[k].clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(tensors.values()), clip)
        opt.step()
        if sched:
            sched.step()
    return {k: t.detach() for k, t in tensors.items()}


def assert_bitwise(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), (k, (ours[k] - theirs[k]).abs().max())


FLAGS = {True: dict(fused=True), False: dict(foreach=False)}


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**20), fused=st.booleans(), weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
       betas=st.sampled_from([(0.9, 0.999), (0.8, 0.95)]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_adamw_equals_torch_bit_for_bit(seed, fused, weight_decay, betas, dtype):
    params = random_tree(seed, dtype)
    grads = grad_sequence(params, seed)
    ours, state = run_ours(optim.adamw(1e-2, b1=betas[0], b2=betas[1], weight_decay=weight_decay, fused=fused), params, grads)
    theirs = run_torch(lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=betas, weight_decay=weight_decay, **FLAGS[fused]),
                       params, grads)
    assert_bitwise(ours, theirs)
    assert state["step"].item() == STEPS and list(state["exp_avg"]) == list(params)


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_with_schedule_equals_torch_lambda_lr(fused):
    params = random_tree(3)
    grads = grad_sequence(params, 3)
    sched = schedules.warmup_cosine(3e-2, warmup=3, total=8, final=1e-3)
    ours, _ = run_ours(optim.adamw(sched, weight_decay=0.05, fused=fused), params, grads)
    theirs = run_torch(lambda ps: torch.optim.AdamW(ps, lr=1.0, weight_decay=0.05, **FLAGS[fused]), params, grads,
                       schedule=sched)  # base lr 1.0: LambdaLR's lr is exactly sched(step)
    assert_bitwise(ours, theirs)


def test_default_picks_fused_on_cpu_and_reuses_buffers_while_reference_path_is_pure():
    params = random_tree(0)
    grads = grad_sequence(params, 0, 1)[0]
    snapshot = {k: p.clone() for k, p in params.items()}
    opt = optim.adamw(1e-2, fused=False)
    new, _ = opt.update(grads, opt.init(params), params)
    assert all(torch.equal(params[k], snapshot[k]) for k in params)  # untouched
    fused = optim.adamw(1e-2)  # fused=None -> fused kernel on CPU
    new_fused, _ = fused.update(grads, fused.init(params), params)
    assert all(new_fused[k] is params[k] for k in params)  # the donated buffers, updated in place
    assert_bitwise(new_fused, new)


@pytest.mark.parametrize("make", [lambda: optim.adamw(1e-2), lambda: optim.adamw(1e-2, fused=False),
                                  lambda: optim.sgd(0.1, momentum=0.9)])
def test_update_accepts_leaves_that_require_grad_and_builds_no_graph(make):
    params = {k: p.requires_grad_() for k, p in random_tree(1).items()}
    opt = make()
    new, state = opt.update(grad_sequence(params, 1, 1)[0], opt.init(params), params)
    assert all(p.grad_fn is None for p in new.values())
    assert all(t.grad_fn is None for t in tree.flatten(state).values())


@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.9, False, 0.01), (0.9, True, 0.1),
                                                            (0.5, False, 0.0)])
def test_sgd_equals_torch_bit_for_bit(momentum, nesterov, weight_decay):
    params = random_tree(5)
    grads = grad_sequence(params, 5)
    ours, _ = run_ours(optim.sgd(0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay), params, grads)
    theirs = run_torch(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=momentum, nesterov=nesterov,
                                                  weight_decay=weight_decay, foreach=False), params, grads)
    assert_bitwise(ours, theirs)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_by_global_norm_equals_clip_grad_norm(max_norm):
    params = random_tree(7)
    grads = grad_sequence(params, 7, 1)[0]
    tensors = [torch.nn.Parameter(p.clone()) for p in params.values()]
    for t, g in zip(tensors, grads.values()):
        t.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    assert torch.equal(optim.global_norm(grads), total)
    clipped, _ = optim.clip_by_global_norm(max_norm).update(grads, {}, params)
    assert_bitwise(clipped, {k: t.grad for k, t in zip(params, tensors)})


@pytest.mark.parametrize("fused", [True, False])
def test_chain_clip_then_adamw_equals_torch(fused):
    params = random_tree(9)
    grads = grad_sequence(params, 9)
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, fused=fused))
    ours, state = run_ours(opt, params, grads)
    theirs = run_torch(lambda ps: torch.optim.AdamW(ps, lr=1e-2, **FLAGS[fused]), params, grads, clip=1.0)
    assert_bitwise(ours, theirs)
    assert isinstance(state, list) and len(state) == 2


def test_masked_parallel_equals_torch_param_groups():
    params = random_tree(11)
    grads = grad_sequence(params, 11)
    no_decay = [k for k in params if not optim.decays(k)]
    assert sorted(no_decay) == ["lm_head.bias", "model.layers.2.input_layernorm.weight", "model.norm.weight"]
    opt = optim.parallel(optim.masked(optim.adamw(1e-2, weight_decay=0.1), optim.decays),
                         optim.masked(optim.adamw(1e-2, weight_decay=0.0), lambda k: not optim.decays(k)))
    ours, state = run_ours(opt, params, grads)
    groups = lambda t: [{"params": [t[k] for k in t if optim.decays(k)], "weight_decay": 0.1},  # noqa: E731
                        {"params": [t[k] for k in t if not optim.decays(k)], "weight_decay": 0.0}]
    # ours defaults to the fused kernel on CPU: bit-equality holds against the same kernel path (torch's
    # single-tensor loop vectorizes differently on AVX2 and AVX-512 CPUs and may differ by an ulp there)
    theirs = run_torch(lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True), params, grads, groups=groups)
    assert_bitwise(ours, theirs)
    plain = optim.parallel(optim.masked(optim.adamw(1e-2, weight_decay=0.1, fused=False), optim.decays),
                           optim.masked(optim.adamw(1e-2, weight_decay=0.0, fused=False), lambda k: not optim.decays(k)))
    ours_plain, _ = run_ours(plain, params, grads)
    assert_bitwise(ours_plain, run_torch(lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), params, grads,
                                         groups=groups))
    assert set(state[1]["exp_avg"]) == set(no_decay)  # state only for the leaves it was given


def test_masked_transform_leaves_other_grads_alone():
    params = random_tree(12)
    grads = {k: g * 100 for k, g in grad_sequence(params, 12, 1)[0].items()}
    clip = optim.masked(optim.clip_by_global_norm(1.0), lambda k: "lora" in k)
    out, _ = clip.update(grads, clip.init(params), params)
    lora_norm = optim.global_norm({k: g for k, g in out.items() if "lora" in k})
    torch.testing.assert_close(lora_norm, torch.tensor(1.0), rtol=1e-5, atol=0)
    assert all(out[k] is grads[k] for k in grads if "lora" not in k)


@pytest.mark.parametrize("make", [lambda: optim.adamw(1e-2, fused=False), lambda: optim.sgd(0.1, momentum=0.9),
                                  lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2))])
def test_state_round_trips_through_safetensors(tmp_path, make):
    params = random_tree(13)
    grads = grad_sequence(params, 13)
    opt = make()
    straight, _ = run_ours(opt, params, grads)
    p, state = run_ours(opt, params, grads[:4])
    save_file(tree.flatten(state), tmp_path / "state.safetensors")
    flat = load_file(tmp_path / "state.safetensors")
    assert all(isinstance(v, torch.Tensor) for v in tree.flatten(state).values())
    state = optim.load_state(opt.init(params), flat)
    for g in grads[4:]:
        p, state = opt.update(g, state, p)
    assert_bitwise(p, straight)


def test_unflattened_state_of_a_lora_partition_works_as_is():
    from purefine import lora, models

    params = lora.apply(models.init(models.preset("llama-debug")), rank=2, alpha=4, where="all-linear", dora=True)
    leaves = dict(tree.filtered(params, lora.trainable))
    grads = grad_sequence(leaves, 0, 2)
    opt = optim.adamw(1e-2, fused=False)
    p, state = opt.update(grads[0], opt.init(leaves), leaves)
    nested = tree.unflatten(tree.flatten(state))  # what a plain safetensors round trip gives back
    assert isinstance(nested["exp_avg"]["model"]["layers"], list)
    assert_bitwise(opt.update(grads[1], nested, p)[0], opt.update(grads[1], state, p)[0])


def test_errors_name_the_problem():
    params = random_tree(0)
    opt = optim.adamw(1e-3)
    state = opt.init(params)
    grads = grad_sequence(params, 0, 1)[0]
    with pytest.raises(TreeError, match="missing state for"):
        opt.update({**grads, "extra.weight": torch.zeros(2)}, state, {**params, "extra.weight": torch.zeros(2)})
    with pytest.raises(TreeError, match="no matching params"):
        optim.sgd(0.1).update({"nope": torch.zeros(1)}, optim.sgd(0.1).init({}), {})
    with pytest.raises(TreeError, match="unexpected"):
        optim.load_state(state, {**tree.flatten(state), "bogus": torch.zeros(1)})
    for make in (lambda: optim.adamw(1e-3, b1=1.0), lambda: optim.adamw(1e-3, weight_decay=-1),
                 lambda: optim.sgd(0.1, nesterov=True), lambda: optim.clip_by_global_norm(0.0),
                 lambda: optim.chain(optim.clip_by_global_norm(1.0))):
        with pytest.raises(ConfigError):
            make()


# --- DTensor shards: 2 processes on CPU/gloo against the unsharded run -----------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        full = {k: torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i, k in enumerate(["a", "b"])}
        grads = grad_sequence(full, 1, 3)
        results = {}
        for fused in (True, False):
            params = {k: distribute_tensor(p, mesh, [Shard(0)]) for k, p in full.items()}
            opt = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, fused=fused))
            state = opt.init(params)
            for g in grads:
                params, state = opt.update({k: distribute_tensor(x, mesh, [Shard(0)]) for k, x in g.items()}, state, params)
            assert state[1]["exp_avg"]["a"].placements == (Shard(0),)
            results.update({f"{k}.{fused}": p.full_tensor() for k, p in params.items()})
        if rank == 0:
            save_file(results, os.path.join(out_dir, "sharded.safetensors"))
    finally:
        dist.destroy_process_group()


def test_adamw_on_one_rank_dtensors_matches_plain_tensors(tmp_path):
    """In-process (a 1-rank gloo mesh): both paths accept DTensors and give the plain-tensor bits."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        full = {k: torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i, k in enumerate(["a", "b"])}
        grads = grad_sequence(full, 2, 3)
        for fused in (True, False):
            opt = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, fused=fused))
            params = {k: distribute_tensor(p.clone(), mesh, [Shard(0)]) for k, p in full.items()}
            state = opt.init(params)
            for g in grads:
                params, state = opt.update({k: distribute_tensor(x, mesh, [Shard(0)]) for k, x in g.items()}, state, params)
            assert isinstance(params["a"], DTensor) and isinstance(state[1]["exp_avg"]["a"], DTensor)
            plain, _ = run_ours(opt, full, grads)
            assert_bitwise({k: p.full_tensor() for k, p in params.items()}, plain)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_adamw_on_dtensor_shards_matches_unsharded(tmp_path):
    torch.multiprocessing.spawn(_sharded_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    sharded = load_file(tmp_path / "sharded.safetensors")
    full = {k: torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i, k in enumerate(["a", "b"])}
    grads = grad_sequence(full, 1, 3)
    for fused in (True, False):
        ours, _ = run_ours(optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, fused=fused)), full, grads)
        for k in full:  # the global norm is reduced across ranks in another order: last-bit differences
            torch.testing.assert_close(sharded[f"{k}.{fused}"], ours[k], rtol=1e-6, atol=1e-7)
