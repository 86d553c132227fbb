"""Weighted mixing (``data.mix``): the shares follow the weights, resume continues the same draw
sequence (batch by batch, and 10 + 10 training steps = 20), each source keeps its own format,
template and held-out split, and a weight <= 0 is one line naming the source."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from purefine.config import OptimConfig, TrainConfig, parse_train_args
from purefine.data import (
    DEMO_TRAIN, DataConfig, MixedDataset, MixSource, Sample, SamplerState, batches, build, build_eval, from_samples,
)
from purefine.data.config import check
from purefine.errors import ConfigError, DataError
from purefine.recipes.train import main
from tests.conftest import ROOT


def tagged(tag: int, n: int, length: int = 6):
    """n samples whose first token is tag * 1000 + i (which source and which sample)."""
    return from_samples([Sample([tag * 1000 + i] + [5] * (length - 1), [5] * (length - 1) + [-100]) for i in range(n)])


def first_tokens(batch) -> list[int]:
    return [int(t) for t in batch["tokens"][:, 0] if t >= 1000]


@pytest.mark.parametrize("seed", range(5))
def test_shares_of_200_samples_follow_the_weights(seed):
    mixed = MixedDataset([tagged(1, 50), tagged(2, 30)], names=["a", "b"], weights=[3.0, 1.0])  # 0.75 / 0.25
    stream = batches(mixed, batch_size=1, seq_len=16, packing=False, sampler_state=SamplerState(seed=seed))
    drawn, state = [], None
    for batch, state in itertools.islice(stream, 200):
        drawn += first_tokens(batch)
    share_a = sum(t // 1000 == 1 for t in drawn) / len(drawn)
    assert len(drawn) == 200 and abs(share_a - 0.75) <= 0.03, share_a
    assert mixed.samples_per_source(state) == {"a": round(share_a * 200), "b": 200 - round(share_a * 200)}
    a = [t % 1000 for t in drawn if t // 1000 == 1]
    assert sorted(a[:50]) == list(range(50))  # each source walks its own shuffled epochs


@pytest.mark.parametrize("packing", [True, False])
def test_resume_continues_the_same_draw_sequence(packing):
    mixed = MixedDataset([tagged(1, 13, 5), tagged(2, 7, 9), tagged(3, 5, 3)], names=["a", "b", "c"],
                         weights=[0.5, 0.3, 0.2])
    kw = dict(batch_size=3, seq_len=20, packing=packing)
    run = list(itertools.islice(batches(mixed, sampler_state=SamplerState(seed=4), **kw), 25))  # several epochs
    assert run[-1][1].sources[2].epoch >= 2
    for k in (0, 6, 17):
        saved = json.loads(json.dumps(run[k][1].to_dict()))  # through JSON, as a checkpoint stores it
        resumed = itertools.islice(batches(mixed, sampler_state=SamplerState.from_dict(saved), **kw), len(run) - k - 1)
        for (want, want_state), (got, got_state) in zip(run[k + 1:], resumed):
            assert all(torch.equal(want[n], got[n]) for n in want) and want_state == got_state


def test_a_saved_position_of_another_shape_is_an_error():
    mixed = MixedDataset([tagged(1, 4), tagged(2, 4)], names=["a", "b"], weights=[1, 1])
    kw = dict(batch_size=1, seq_len=16, packing=False)
    with pytest.raises(DataError, match="one dataset's, not a mix of 2 sources"):
        next(batches(mixed, sampler_state=SamplerState(seed=0, position=3), **kw))
    three = SamplerState(0, 0, 2, (SamplerState(), SamplerState(), SamplerState()))
    with pytest.raises(DataError, match="holds 3 sources, data.mix has 2"):
        next(batches(mixed, sampler_state=three, **kw))
    with pytest.raises(DataError, match="mixed sources, but the data is one dataset"):
        next(batches(tagged(1, 4), sampler_state=three, **kw))


@pytest.mark.parametrize("weight", [0, -0.5])
def test_a_weight_of_zero_or_less_names_the_source(weight):
    cfg = DataConfig(mix=(MixSource("a.jsonl", 0.5), MixSource("b.jsonl", weight)))
    with pytest.raises(ConfigError, match=rf"data.mix\[1\] \(b.jsonl\): weight must be a finite number > 0, found {weight}"):
        check(cfg)


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two directories with train / validation splits: alpaca rows, and chat rows (other questions)."""
    root = tmp_path_factory.mktemp("mix")
    demo = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()]
    chat = [{"messages": [{"role": "user", "content": f"{r['instruction']}\n{r['input']}"},
                          {"role": "assistant", "content": r["output"]}]} for r in demo[240:480]]
    write_jsonl(root / "alpaca" / "train.jsonl", demo[:200])
    write_jsonl(root / "alpaca" / "validation.jsonl", demo[200:240])
    write_jsonl(root / "chat" / "train.jsonl", chat[:200])
    write_jsonl(root / "chat" / "validation.jsonl", chat[200:])
    return root


def mix_yaml(root, path, weight_b=1.0) -> str:
    mix = [{"source": str(root / "alpaca"), "weight": 3.0, "name": "alpaca", "format": "alpaca"},
           {"source": str(root / "chat"), "weight": weight_b, "name": "chat", "format": "chat", "template": "chatml",
            "train_on": "last"}]
    path.write_text(yaml.safe_dump({"data": {"mix": mix, "cache_dir": str(root / "cache")}}))
    return str(path)


def test_each_source_keeps_its_format_template_and_eval_split(two_sources, tmp_path):
    cfg = parse_train_args(["--config", mix_yaml(two_sources, tmp_path / "mix.yaml")]).data
    assert [s.name for s in cfg.mix] == ["alpaca", "chat"] and cfg.mix[1].template == "chatml"
    from purefine.data import DEMO_TOKENIZER, load_tokenizer

    tok = load_tokenizer(DEMO_TOKENIZER)
    mixed, held_out = build(cfg, tok), build_eval(cfg, tok)
    assert isinstance(mixed, MixedDataset) and mixed.weights == (0.75, 0.25)
    assert [p.stats["format"] for p in mixed.parts] == ["alpaca", "chat"]
    assert tok.token_to_id("<|im_start|>") in mixed.parts[1].fetch([0])[0].tokens  # chatml, this source only
    assert tok.token_to_id("<|im_start|>") not in mixed.parts[0].fetch([0])[0].tokens
    assert sorted(held_out) == ["alpaca", "chat"] and [len(held_out[k]) for k in sorted(held_out)] == [40, 40]


def run_cfg(root, tmp_path, name, **overrides) -> TrainConfig:
    cfg = parse_train_args(["--config", mix_yaml(root, tmp_path / "mix.yaml"), "--max-steps", "20", "--batch-size", "2",
                            "--max-seq-len", "64", "--output-dir", str(tmp_path / name),
                            "--no-progress", "--no-plot", "--eval-batches", "1", "--log-every", "100", "--seed", "3"])
    return TrainConfig(**{**cfg.__dict__, "optim": OptimConfig(lr=1e-3, warmup_steps=2), **overrides})


def adapter(summary) -> dict:
    return load_file(os.path.join(summary["outputs"]["adapter"], "adapter_model.safetensors"))


def test_ten_plus_ten_resumed_steps_equal_twenty_with_a_mix(two_sources, tmp_path):
    whole = main(run_cfg(two_sources, tmp_path, "whole"))
    first = main(run_cfg(two_sources, tmp_path, "split", stop_after=10, save_every=10))
    second = main(run_cfg(two_sources, tmp_path, "split", save_every=10, resume="latest"))
    assert first["steps"] == 10 and second["steps"] == 20
    assert first["losses"] + second["losses"] == whole["losses"]
    a, b = adapter(whole), adapter(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    counts = whole["samples_per_source"]
    assert second["samples_per_source"] == counts and set(counts) == {"alpaca", "chat"}
    assert sum(first["samples_per_source"].values()) < sum(counts.values())
    assert 0.6 < counts["alpaca"] / sum(counts.values()) < 0.9  # ~0.75 of a few hundred packed samples
    saved = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert saved["samples_per_source"] == counts
    for name in ("alpaca", "chat"):
        assert whole[f"eval_loss/{name}_end"] is not None and whole[f"eval_loss/{name}_start"] is not None


def test_a_weight_of_zero_is_one_line_and_exit_2_through_the_cli(two_sources, tmp_path):
    config = mix_yaml(two_sources, tmp_path / "bad.yaml", weight_b=0)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", config, "--max-steps", "1",
                          "--output-dir", str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-800:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: data.mix[1] ({two_sources / 'chat'}): weight must be a finite number > 0, found 0.0"]
