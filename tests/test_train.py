"""The stateless train step: accumulation equals one big batch, remat changes nothing, only
trainable leaves move, bf16 compute keeps fp32 masters, non-finite steps can be skipped."""

from __future__ import annotations

import copy

import pytest
import torch

import purefine as pf


def setup(peft: bool, seed: int = 0):
    cfg = pf.models.preset("llama-debug")
    params = pf.models.init(cfg, seed=seed)
    trainable = pf.train.all_floating
    if peft:
        params = pf.lora.apply(params, rank=4, alpha=8, where=["q_proj", "v_proj", "down_proj"], seed=seed)
        params = pf.tree.map_with_path(lambda p, x: x + 0.01 if p.endswith("lora_b") else x, params)
        trainable = pf.lora.trainable
    return cfg, params, trainable


def batch(cfg, n: int, t: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (n, t), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (n, t), generator=g)
    labels[torch.rand(n, t, generator=g) < 0.3] = -100  # uneven label counts per micro-batch
    return {"tokens": tokens, "labels": labels}


def params_equal(a, b, atol):
    for (pa, x), (pb, y) in zip(pf.tree.leaves_with_paths(a), pf.tree.leaves_with_paths(b)):
        assert pa == pb
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=pa)


@pytest.mark.parametrize("peft", [False, True])
def test_accumulation_equals_one_big_batch(peft):
    cfg, params, trainable = setup(peft)
    opt = pf.optim.sgd(0.5)
    big = batch(cfg, 6, 10, seed=1)
    micro = [{k: v[i : i + 2] for k, v in big.items()} for i in range(0, 6, 2)]
    step = pf.train.make_step(pf.models.loss_fn(cfg), opt, trainable=trainable)
    s_big, m_big = step(pf.train.init(params, opt, trainable=trainable), big)
    s_acc, m_acc = step(pf.train.init(params, opt, trainable=trainable), micro)
    assert m_big["count"] == m_acc["count"] == int((big["labels"] != -100).sum())
    assert abs(m_big["loss"] - m_acc["loss"]) < 1e-5 and abs(m_big["grad_norm"] - m_acc["grad_norm"]) < 1e-5
    params_equal(s_big.params, s_acc.params, atol=1e-5)


def test_remat_changes_results_by_at_most_1e_6():
    cfg, params, trainable = setup(True)
    opt = pf.optim.adamw(1e-3)
    b = batch(cfg, 2, 12, seed=2)
    outs = []
    for remat in (False, True):
        step = pf.train.make_step(pf.models.loss_fn(cfg, remat=remat), opt, trainable=trainable)
        state = pf.train.init(params, opt, trainable=trainable)
        for _ in range(2):
            state, metrics = step(state, b)
        outs.append((state, metrics))
    assert abs(outs[0][1]["loss"] - outs[1][1]["loss"]) < 1e-6
    params_equal(outs[0][0].params, outs[1][0].params, atol=1e-6)


def test_only_trainable_leaves_move_and_state_is_pure():
    cfg, params, trainable = setup(True)
    before = copy.deepcopy(params)
    opt = pf.optim.adamw(1e-2)
    state = pf.train.init(params, opt, trainable=trainable)
    new, _ = pf.train.make_step(pf.models.loss_fn(cfg), opt, trainable=trainable)(state, batch(cfg, 2, 8, 3))
    assert new.step == 1 and state.step == 0
    for (p, x), (_, y) in zip(pf.tree.leaves_with_paths(before), pf.tree.leaves_with_paths(new.params)):
        moved = not torch.equal(x, y)
        assert moved == trainable(p, x), p
    assert set(pf.tree.flatten(new.opt_state["exp_avg"])) == {p for p, x in pf.tree.leaves_with_paths(params) if trainable(p, x)}


def test_value_and_grad_matches_autograd_on_the_full_tree():
    cfg, params, _ = setup(False)
    b = batch(cfg, 2, 8, 4)
    loss = pf.models.loss_fn(cfg)
    (value, n), grads = pf.train.value_and_grad(loss, pf.train.all_floating, has_aux=True)(params, b)
    leaves = {p: x.detach().clone().requires_grad_() for p, x in pf.tree.leaves_with_paths(params)}
    ref = loss(pf.tree.unflatten(leaves), b)[0]
    ref_grads = torch.autograd.grad(ref, list(leaves.values()))
    assert torch.equal(value, ref)
    for (p, g), r in zip(grads.items(), ref_grads):
        torch.testing.assert_close(g, r, msg=p)


def test_bf16_compute_keeps_fp32_masters():
    cfg, params, trainable = setup(True)
    params = pf.tree.map_with_path(lambda p, x: x if trainable(p, x) else x.to(torch.bfloat16), params)
    opt = pf.optim.adamw(1e-3)
    step = pf.train.make_step(pf.models.loss_fn(cfg), opt, trainable=trainable, compute_dtype=torch.bfloat16)
    state, metrics = step(pf.train.init(params, opt, trainable=trainable), batch(cfg, 2, 8, 5))
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    for p, x in pf.tree.leaves_with_paths(state.params):
        assert x.dtype == (torch.float32 if trainable(p, x) else torch.bfloat16), p


def test_clipping_bounds_the_update_and_nonfinite_steps_are_skipped():
    cfg, params, trainable = setup(False)
    opt = pf.optim.sgd(1.0)
    b = batch(cfg, 2, 8, 6)
    state = pf.train.init(params, opt, trainable=trainable)
    new, m = pf.train.make_step(pf.models.loss_fn(cfg), opt, trainable=trainable, clip_norm=0.01)(state, b)
    delta = [(y - x).flatten() for (_, x), (_, y) in zip(pf.tree.leaves_with_paths(params), pf.tree.leaves_with_paths(new.params))]
    assert m["grad_norm"] > 0.01 and abs(torch.cat(delta).norm().item() - 0.01) < 1e-4
    bad = pf.tree.map_with_path(lambda p, x: x * float("nan") if p == "model.norm.weight" else x, params)
    step = pf.train.make_step(pf.models.loss_fn(cfg), opt, trainable=trainable, skip_nonfinite=True)
    same, m = step(pf.train.init(bad, opt, trainable=trainable), b)
    assert m["skipped"] == 1 and same.step == 1
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(pf.tree.flatten(same.params)[q], pf.tree.flatten(bad)[q])


def test_dropout_is_reproducible_from_the_state_rng():
    cfg = pf.models.preset("llama-debug")
    params = pf.lora.apply(pf.models.init(cfg), rank=4, alpha=8, dropout=0.5, seed=0)
    opt = pf.optim.adamw(1e-2)
    step = pf.train.make_step(pf.models.loss_fn(cfg), opt, trainable=pf.lora.trainable)
    b = batch(cfg, 2, 8, 7)
    runs = []
    for _ in range(2):
        state = pf.train.init(params, opt, trainable=pf.lora.trainable, seed=3)
        torch.manual_seed(123 + len(runs))  # the global RNG must not matter
        for _ in range(2):
            state, m = step(state, b)
        runs.append((state, m))
    assert runs[0][1]["loss"] == runs[1][1]["loss"]
    params_equal(runs[0][0].params, runs[1][0].params, atol=0)
