"""HF checkpoint directories: round trips with transformers, sharding, and every bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import purefine as pf
from purefine.errors import CheckpointError
from tests.conftest import make_hf_llama


def leaves(params):
    return pf.tree.leaves_with_paths(params)


def test_load_save_transformers_round_trip(tmp_path):
    model = make_hf_llama(tmp_path / "src")
    cfg, params = pf.checkpoint.load_hf(tmp_path / "src")
    pf.checkpoint.save_hf(tmp_path / "out", cfg, params)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)
        assert torch.equal(pf.models.forward(cfg, params, tokens), again(tokens).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_is_bit_exact_with_shards(tmp_path, dtype):
    cfg = pf.models.preset("llama-debug")
    params = pf.models.init(cfg, seed=4, dtype=dtype)
    pf.checkpoint.save_hf(tmp_path / "ck", cfg, params, max_shard_bytes=200_000)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    cfg2, back = pf.checkpoint.load_hf(tmp_path / "ck")
    assert cfg2 == cfg
    assert [n for n, _ in leaves(back)] == [n for n, _ in leaves(params)]
    assert all(torch.equal(a, b) and a.dtype == dtype for (_, a), (_, b) in zip(leaves(back), leaves(params)))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_tied_embeddings_round_trip(tmp_path):
    model = make_hf_llama(tmp_path / "src", tie_word_embeddings=True)
    cfg, params = pf.checkpoint.load_hf(tmp_path / "src")
    assert cfg.tie_word_embeddings and "lm_head" not in params
    pf.checkpoint.save_hf(tmp_path / "out", cfg, params)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, model(tokens).logits)


def test_dtype_conversion_on_load(tmp_path):
    make_hf_llama(tmp_path)
    _, params = pf.checkpoint.load_hf(tmp_path, dtype=torch.bfloat16)
    assert {x.dtype for _, x in leaves(params)} == {torch.bfloat16}


def test_hook_sees_every_tensor_once(tmp_path):
    make_hf_llama(tmp_path)
    seen = []
    pf.checkpoint.load_hf(tmp_path, hook=lambda name, t: seen.append(name) or t)
    assert sorted(seen) == sorted(pf.models.param_shapes(pf.checkpoint.read_config(tmp_path)[0]))


# --- bad input: every case names the file or key, what was expected and what was found ---


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="directory not found"):
        pf.checkpoint.load_hf(tmp_path / "nope")
    make_hf_llama(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        pf.checkpoint.load_hf(tmp_path / "a")
    make_hf_llama(tmp_path / "b")
    (tmp_path / "b" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        pf.checkpoint.load_hf(tmp_path / "b")


def test_pickle_only_checkpoint_is_refused(tmp_path):
    make_hf_llama(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        pf.checkpoint.load_hf(tmp_path)


def test_truncated_safetensors(tmp_path):
    make_hf_llama(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors"):
        pf.checkpoint.load_hf(tmp_path)


def test_garbage_config(tmp_path):
    make_hf_llama(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        pf.checkpoint.load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    with pytest.raises(CheckpointError, match="model_type"):
        pf.checkpoint.load_hf(tmp_path)


def rewrite(tmp_path, edit):
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_unexpected_tensors(tmp_path):
    make_hf_llama(tmp_path)
    rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing, e.g. \['model.layers.1.mlp.up_proj.weight'\]"):
        pf.checkpoint.load_hf(tmp_path)
    shutil.rmtree(tmp_path)
    make_hf_llama(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor.*model.layers.0.extra.weight"):
        pf.checkpoint.load_hf(tmp_path)


def test_shape_disagreeing_with_config(tmp_path):
    make_hf_llama(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(31)}))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \[31\], config.json implies \[32\]"):
        pf.checkpoint.load_hf(tmp_path)


def test_index_pointing_at_missing_shard(tmp_path):
    cfg = pf.models.preset("llama-debug")
    pf.checkpoint.save_hf(tmp_path, cfg, pf.models.init(cfg), max_shard_bytes=200_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="model-00002.*file not found"):
        pf.checkpoint.load_hf(tmp_path)


def test_save_refuses_params_that_disagree_with_config(tmp_path):
    cfg = pf.models.preset("llama-debug")
    params = pf.models.init(cfg)
    del params["lm_head"]
    with pytest.raises(CheckpointError, match="missing"):
        pf.checkpoint.save_hf(tmp_path / "x", cfg, params)
    assert not (tmp_path / "x").exists()


def test_inspect_reads_headers_only(tmp_path):
    make_hf_llama(tmp_path)
    info = pf.checkpoint.inspect(tmp_path)
    assert info["model_type"] == "llama" and info["dtypes"] == {"float32": info["num_params"]}
    assert info["bytes"] == 4 * info["num_params"]
