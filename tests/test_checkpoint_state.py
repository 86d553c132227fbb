"""Training-state checkpoints (DCP): round trip, the directory's format, atomic commit, pruning,
a failing disk, async saves, bad files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

import purefine as pf
from purefine.checkpoint import state as ckpt
from purefine.errors import CheckpointError


def lora_state(seed: int = 0, steps: int = 2):
    cfg = pf.models.preset("llama-debug")
    params = pf.lora.apply(pf.models.init(cfg, seed=seed), rank=4, alpha=8, seed=seed)
    opt = pf.optim.adamw(1e-2)
    step = pf.train.make_step(pf.models.loss_fn(cfg), opt, trainable=pf.lora.trainable)
    state = pf.train.init(params, opt, trainable=pf.lora.trainable, seed=seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        state, _ = step(state, {"tokens": tokens, "labels": tokens})
    return cfg, params, opt, state.replace(data_position={"seed": 0, "epoch": 0, "position": 7})


def test_round_trip_restores_trainable_leaves_optimizer_rng_and_position(tmp_path):
    _, params, opt, state = lora_state()
    path = ckpt.save(tmp_path, state, pf.lora.trainable)
    assert path.name == "step-00000002" and ckpt.latest(tmp_path) == path
    template = pf.train.init(params, opt, trainable=pf.lora.trainable, seed=5)
    back = ckpt.load(path, template, pf.lora.trainable)
    assert back.step == 2 and back.data_position == state.data_position and torch.equal(back.rng, state.rng)
    for (p, x), (_, y) in zip(pf.tree.leaves_with_paths(back.params), pf.tree.leaves_with_paths(state.params)):
        assert torch.equal(x, y), p
    for (p, x), (_, y) in zip(pf.tree.leaves_with_paths(back.opt_state), pf.tree.leaves_with_paths(state.opt_state)):
        assert torch.equal(x, y), p
    saved = set(json.loads((path / "meta.json").read_text())["tensors"])
    assert not any(".base" in name for name in saved)  # frozen weights are rebuilt, not saved


def test_a_checkpoint_is_a_dcp_checkpoint_that_torch_reads(tmp_path):
    _, _, _, state = lora_state()
    path = ckpt.save(tmp_path, state, pf.lora.trainable)
    files = sorted(p.name for p in path.iterdir())
    assert files[0] == "meta.json" and len(files) == 2 and files[1].endswith(".safetensors")
    assert all(not p.read_bytes().startswith(b"\x80") for p in path.iterdir())  # no pickle: no .metadata
    index = dcp.HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata
    name = "params.model.layers.1.self_attn.v_proj.weight.lora_b"
    assert tuple(index[name].size) == tuple(state.params["model"]["layers"][1]["self_attn"]["v_proj"]["weight"].lora_b.shape)
    got = {name: torch.zeros(index[name].size), "rng": torch.zeros_like(state.rng)}
    dcp.load(got, storage_reader=dcp.HuggingFaceStorageReader(str(path)))  # torch's own reader, no purefine code
    assert torch.equal(got[name], state.params["model"]["layers"][1]["self_attn"]["v_proj"]["weight"].lora_b)
    assert torch.equal(got["rng"], state.rng)


def test_async_save_writes_what_the_state_held_when_it_was_called(tmp_path):
    _, params, opt, state = lora_state()
    leaf = state.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"].lora_a
    before = leaf.clone()
    pending = ckpt.save(tmp_path, state, pf.lora.trainable, async_save=True)
    leaf.add_(1.0)  # the next optimizer step updates the leaves in place
    path = pending.wait()
    assert path == tmp_path / "step-00000002" and ckpt.latest(tmp_path) == path
    back = ckpt.load(path, pf.train.init(params, opt, trainable=pf.lora.trainable, seed=5), pf.lora.trainable)
    assert torch.equal(back.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"].lora_a, before)


def test_prune_keeps_the_last_k_and_ignores_partial_directories(tmp_path):
    _, _, _, state = lora_state()
    for step in (2, 4, 6):
        ckpt.save(tmp_path, state.replace(step=step), pf.lora.trainable)
    (tmp_path / ".step-00000008.tmp").mkdir()
    (tmp_path / "step-00000009").mkdir()  # no meta.json: never taken for a checkpoint
    assert ckpt.latest(tmp_path).name == "step-00000006"
    ckpt.prune(tmp_path, 2)
    assert [p.name for p in ckpt.complete_steps(tmp_path)] == ["step-00000004", "step-00000006"]
    assert not (tmp_path / ".step-00000008.tmp").exists()


class FullDisk(dcp.FileSystemWriter):
    """A DCP writer whose disk is full: every data write fails as the OS would report it."""

    def write_data(self, plan, planner):
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failing_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, async_save):
    _, params, opt, state = lora_state()
    good = ckpt.save(tmp_path, state, pf.lora.trainable)
    monkeypatch.setattr(ckpt, "writer", lambda path: FullDisk(path))
    message = r"\(No space left on device\); the previous checkpoint .*step-00000002 is intact"
    with pytest.raises(CheckpointError, match=message):
        result = ckpt.save(tmp_path, state.replace(step=3), pf.lora.trainable, async_save=async_save)
        result.wait() if async_save else None
    monkeypatch.undo()
    assert ckpt.latest(tmp_path) == good and not list(tmp_path.glob(".step-*"))
    ckpt.load(good, pf.train.init(params, opt, trainable=pf.lora.trainable), pf.lora.trainable)


def test_mismatched_or_corrupt_checkpoints_are_errors(tmp_path):
    cfg, params, opt, state = lora_state()
    path = ckpt.save(tmp_path, state, pf.lora.trainable)
    full = pf.train.init(pf.models.init(cfg), opt)
    with pytest.raises(CheckpointError, match="does not match this run's trainable state"):
        ckpt.load(path, full, pf.train.all_floating)
    other = pf.train.init(pf.lora.apply(pf.models.init(cfg), rank=8, alpha=8), opt, trainable=pf.lora.trainable)
    with pytest.raises(CheckpointError, match=r"lora_a has shape \[4, 64\], this run expects \[8, 64\]"):
        ckpt.load(path, other, pf.lora.trainable)
    (path / "meta.json").write_text("{")
    with pytest.raises(CheckpointError, match="meta.json: not valid JSON"):
        ckpt.load(path, state, pf.lora.trainable)
    with pytest.raises(CheckpointError, match="no meta.json"):
        ckpt.load(tmp_path / "nowhere", state, pf.lora.trainable)
