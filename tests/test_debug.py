"""Debugging tools: per-layer statistics against transformers' own activations and gradients, the
numerics check on a tiny HF checkpoint (and on a deliberately broken forward), the memory
breakdown against an independent heap measurement, and --profile / --debug-stats /
--memory-report through the train recipe."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import purefine as pf
from purefine import debug
from purefine.config import TrainConfig
from purefine.data import DataConfig
from purefine.errors import ConfigError
from purefine.recipes import check
from tests.conftest import ROOT, make_hf_llama


def random_batch(vocab: int, b: int, t: int, seed: int = 0) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    return {"tokens": tokens, "labels": labels}


# ------------------------------------------------------------------------------------------- layer stats

@pytest.mark.parametrize("name", ["llama-debug", "mistral-debug", "qwen2-debug", "gpt2-debug"])
def test_observe_sees_every_layer_output(name: str) -> None:
    cfg = pf.models.preset(name)
    params = pf.models.init(cfg, seed=0)
    seen: list[tuple[int, tuple[int, ...]]] = []
    tokens = random_batch(cfg.vocab_size, 2, 8)["tokens"]
    h, _ = pf.models.hidden_states(cfg, params, tokens, observe=lambda i, x: seen.append((i, tuple(x.shape))))
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    assert seen == [(i, tuple(h.shape)) for i in range(layers)]
    torch.testing.assert_close(h, pf.models.hidden_states(cfg, params, tokens)[0], rtol=0, atol=0)  # observing changes nothing


def test_layer_stats_match_transformers_activations_and_gradients(tmp_path) -> None:
    model = make_hf_llama(tmp_path / "hf", num_hidden_layers=3)
    cfg, params = pf.checkpoint.load_hf(tmp_path / "hf")
    batch = random_batch(cfg.vocab_size, 2, 16)
    stats = debug.layer_stats(cfg, params, batch)

    out = model(batch["tokens"], output_hidden_states=True)
    for h in out.hidden_states:
        h.retain_grad()
    loss = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), batch["labels"].reshape(-1), ignore_index=-100)
    loss.backward()
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for i in range(2):  # transformers' last hidden state is after the final norm: layers 0 and 1 compare
        ref = out.hidden_states[i + 1].detach()
        row = stats["layers"][i]
        assert row["act_rms"] == pytest.approx(float(ref.pow(2).mean().sqrt()), rel=1e-5)
        assert row["act_max_abs"] == pytest.approx(float(ref.abs().max()), rel=1e-5)
        assert row["act_grad_rms"] == pytest.approx(float(out.hidden_states[i + 1].grad.pow(2).mean().sqrt()), rel=1e-4)
    for i in range(3):
        ref_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for n, p in model.named_parameters() if f"layers.{i}." in n))
        assert stats["layers"][i]["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
        assert stats["layers"][i]["act_nonfinite"] == 0 == stats["layers"][i]["grad_nonfinite"]
    other = {r["name"]: r["grad_norm"] for r in stats["other"]}
    assert set(other) == {"model.embed_tokens", "model.norm", "lm_head"}
    assert other["lm_head"] == pytest.approx(float(model.lm_head.weight.grad.norm()), rel=1e-4)
    assert stats["first_nonfinite_layer"] is None
    table = debug.format_layer_stats(stats)
    assert "grad norm" in table and len(table.splitlines()) == 2 + 3 + 3


def test_layer_stats_name_the_first_layer_with_nonfinite_activations() -> None:
    cfg = pf.models.preset("llama-debug")
    flat = pf.tree.flatten(pf.models.init(cfg, seed=0))
    flat["model.layers.1.mlp.up_proj.weight"] = flat["model.layers.1.mlp.up_proj.weight"].clone()
    flat["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")
    params = pf.lora.apply(pf.tree.unflatten(flat), rank=4, alpha=8, where=["q_proj", "v_proj"])
    stats = debug.layer_stats(cfg, params, random_batch(cfg.vocab_size, 2, 8), trainable=pf.lora.trainable)
    assert stats["first_nonfinite_layer"] == 1
    assert stats["layers"][0]["act_nonfinite"] == 0 and stats["layers"][1]["act_nonfinite"] > 0
    assert stats["layers"][0]["grad_nonfinite"] > 0  # NaN flows back into the adapters of layer 0
    assert "first non-finite after layer 1" in debug.format_layer_stats(stats)


def test_layer_stats_refuse_an_encoder() -> None:
    cfg = pf.models.preset("bert-debug")
    with pytest.raises(ConfigError, match="bert"):
        debug.layer_stats(cfg, pf.models.init(cfg, seed=0), random_batch(cfg.vocab_size, 1, 4))


# ------------------------------------------------------------------------------------------ numerics check

def test_check_reports_the_max_logit_difference_on_a_tiny_hf_checkpoint(tmp_path, capsys) -> None:
    make_hf_llama(tmp_path / "hf", num_hidden_layers=3)
    result = check.main(check.CheckConfig(checkpoint_dir=str(tmp_path / "hf"), seq_len=16))
    out = capsys.readouterr().out
    assert result["ok"] and result["max_logit_diff"] < 1e-4 and result["argmax_agreement"] == 1.0
    assert len(result["layers"]) == 3 and max(result["layers"]) < 1e-4  # every layer, the last one included
    assert "max logit difference" in out and out.count("layer ") == 3


def test_check_flags_a_broken_forward_at_its_first_layer(tmp_path, capsys, monkeypatch) -> None:
    make_hf_llama(tmp_path / "hf", num_hidden_layers=3)
    monkeypatch.setattr(pf.ops, "apply_rope", lambda x, cos, sin: x)  # a "bug": rotary positions dropped
    with pytest.raises(SystemExit) as exit_info:
        check.main(check.CheckConfig(checkpoint_dir=str(tmp_path / "hf"), seq_len=16))
    out = capsys.readouterr().out
    assert exit_info.value.code == 1 and "MISMATCH" in out
    first_layer = float(out.split("layer 0")[1].split("|diff|")[1].split()[0])
    assert first_layer > 1e-5  # the healthy forward matches to ~1e-7: the departure shows from layer 0 on


def test_check_cli_prints_the_report(tmp_path) -> None:
    make_hf_llama(tmp_path / "hf")
    done = subprocess.run([sys.executable, "scripts/check.py", "--checkpoint-dir", str(tmp_path / "hf"), "--seq-len", "8"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok: max logit difference" in done.stdout and "layer 0" in done.stdout
    with pytest.raises(ConfigError, match="give one of --checkpoint-dir"):
        check.main(check.CheckConfig())


def test_check_without_transformers_is_a_one_line_error(tmp_path, monkeypatch) -> None:
    make_hf_llama(tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ConfigError, match="transformers is not installed"):
        check.main(check.CheckConfig(checkpoint_dir=str(tmp_path / "hf")))


# ----------------------------------------------------------------------------------------------- memory

def lora_step(cfg: object, mode: str) -> tuple:
    params = pf.models.init(cfg, seed=0)
    trainable = pf.train.all_floating
    if mode == "lora":
        params = pf.lora.apply(params, rank=8, alpha=16, where=["q_proj", "v_proj"], seed=0)
        trainable = pf.lora.trainable
    opt = pf.optim.adamw(1e-3)
    step = pf.train.make_step(pf.models.loss_fn(cfg), opt, trainable=trainable, clip_norm=1.0)
    return step, pf.train.init(params, opt, trainable=trainable, copy=False)


@pytest.mark.skipif(debug.memory._heap_reader() is None, reason="needs glibc's mallinfo2 for the independent measurement")
@pytest.mark.parametrize("mode,batch", [("lora", (8, 128)), ("full", (2, 32))])
def test_memory_breakdown_sums_to_the_measured_peak(mode: str, batch: tuple[int, int]) -> None:
    cfg = pf.models.preset("llama-debug")
    step, state = lora_step(cfg, mode)
    data = random_batch(cfg.vocab_size, *batch)
    for _ in range(2):  # the first measured step also fills kernel caches: report the second
        state, metrics, report = debug.memory_breakdown(step, state, data)
    assert state.step == 2 and math.isfinite(metrics["loss"])
    assert abs(report.total - report.measured_peak) <= 0.10 * report.measured_peak, debug.format_memory(report)
    # the static parts, counted independently from the config's shapes
    n_weights = sum(math.prod(s) for s in pf.models.param_shapes(cfg).values())
    assert report.weights == 4 * n_weights
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    n_adapter = cfg.num_hidden_layers * 8 * ((d + d) + (d + kv)) if mode == "lora" else 0
    assert report.adapters == 4 * n_adapter
    n_trained = n_adapter or n_weights
    assert 2 * 4 * n_trained <= report.optimizer_state <= 2 * 4 * n_trained + 4 * 64
    if mode == "lora":  # a big batch: the activations dominate
        assert report.activations > report.weights and report.gradients < report.activations
    else:  # a small batch of a full fine-tune: every gradient is alive at once in the update, so the peak
        # holds at least weights + optimizer state + one gradient per weight
        assert report.measured_peak >= report.weights + report.optimizer_state + 4 * n_weights
    assert "sum of parts" in debug.format_memory(report)


# ------------------------------------------------------------------------------------- recipe flags

def test_profile_debug_stats_and_memory_report_through_the_train_recipe(tmp_path, capsys) -> None:
    from purefine.recipes.train import main

    out = tmp_path / "run"
    cfg = TrainConfig(max_steps=6, batch_size=2, max_seq_len=64, eval_batches=1, log_every=100, output_dir=str(out),
                      progress=False, plot=False, profile=True, debug_stats=3, memory_report=True,
                      data=DataConfig(cache_dir=str(tmp_path / "cache")))
    summary = main(cfg)
    printed = capsys.readouterr().out
    assert summary["steps"] == 6
    trace = json.loads((out / "profile" / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"aten::mm", "ProfilerStep#3"} <= names or {"aten::addmm", "ProfilerStep#3"} <= names
    assert "Self CPU" in printed and "aten::" in printed and "profile: top 15 ops" in printed
    assert "Self CPU" in (out / "profile" / "top_ops.txt").read_text()
    rows = [json.loads(line) for line in (out / "debug_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and len(rows[0]["layers"]) == 4
    assert "layer stats at step 3" in printed
    memory = json.loads((out / "memory.json").read_text())
    assert memory["weights"] > 0 and memory["adapters"] > 0 and memory["measured_peak"] > 0
    assert "step 2: memory at the step's peak" in printed


def test_debug_flags_refuse_bad_values() -> None:
    cfg = pf.models.preset("llama-debug")
    args = (cfg, pf.lora.trainable, torch.float32, torch.device("cpu"))
    with pytest.raises(ConfigError, match="--debug-stats"):
        debug.TrainHooks(TrainConfig(debug_stats=-1), "/tmp/unused", *args)
    with pytest.raises(ConfigError, match="--memory-report: runs in one process"):
        debug.TrainHooks(TrainConfig(memory_report=True), "/tmp/unused", *args, world_size=2)
