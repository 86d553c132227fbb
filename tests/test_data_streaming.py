"""Streaming (``--data.streaming``): the stream gives the samples the tokenized dataset gives, resume
mid-stream yields exactly the remaining batches (JSON lines and datasets' IterableDataset alike),
only a bounded prefix of the source is read before step 1 (a 1M-row file, unreadable past row
900,000), and a streamed run without --max-steps is a clear error."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time

import datasets
import pytest
import torch

from purefine.checkpoint import state as state_io
from purefine.config import OptimConfig, TrainConfig
from purefine.data import (
    DEMO_TOKENIZER, DEMO_TRAIN, DataConfig, SamplerState, StreamingDataset, batches, build, build_eval,
    build_split, load_tokenizer,
)
from purefine.errors import ConfigError, DataError
from purefine.recipes.train import main

TOK = load_tokenizer(DEMO_TOKENIZER)
ROWS = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stream_cfg(tmp_path, source, **kw) -> DataConfig:
    return DataConfig(source=str(source), streaming=True, max_seq_len=128, cache_dir=str(tmp_path / "cache"), **kw)


def write_lines(path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("packing", [True, False])
def test_the_stream_in_file_order_gives_the_tokenized_datasets_batches(tmp_path, packing):
    cfg = stream_cfg(tmp_path, DEMO_TRAIN, max_samples=700, packing=packing)
    stream = build(cfg, TOK)
    assert isinstance(stream, StreamingDataset)
    kw = dict(batch_size=4, seq_len=128, packing=packing, shuffle=False, loop=False, sampler_state=SamplerState())
    want = list(batches(build_split(dataclasses.replace(cfg, streaming=False), TOK), **kw))
    got = list(batches(stream, **kw))
    assert len(got) == len(want) > 10
    assert all(same(a, b) for (a, _), (b, _) in zip(want, got))
    assert got[-1][1].position == 700 and stream.stats["rows_read"] == 700


def messy_rows(tmp_path):
    """Demo rows with a bad JSON line, a row missing its output and a null line among them."""
    lines = [json.dumps(r) for r in ROWS[:60]]
    lines[7], lines[20], lines[33] = "{not json", json.dumps({"instruction": "x"}), "null"
    write_lines(tmp_path / "messy.jsonl", lines)
    return tmp_path / "messy.jsonl"


def parquet_rows(tmp_path):
    datasets.Dataset.from_list(ROWS[:60]).to_parquet(tmp_path / "rows.parquet")
    return tmp_path / "rows.parquet"


@pytest.mark.parametrize("make", [messy_rows, parquet_rows])
def test_resume_mid_stream_yields_exactly_the_remaining_batches(tmp_path, make):
    cfg = stream_cfg(tmp_path, make(tmp_path), shuffle_buffer=7, skip_bad_rows=True)
    kw = dict(batch_size=3, seq_len=128, packing=True)
    run = list(itertools.islice(batches(build(cfg, TOK), sampler_state=SamplerState(seed=2), **kw), 40))
    assert run[-1][1].epoch >= 2  # several passes over the 60 rows, in blocks of 7
    for k in (0, 5, 13, 31):
        saved = json.loads(json.dumps(run[k][1].to_dict()))  # through JSON, as a checkpoint stores it
        fresh = build(cfg, TOK)  # a new process: nothing read yet
        resumed = list(itertools.islice(batches(fresh, sampler_state=SamplerState.from_dict(saved), **kw), 40 - k - 1))
        assert all(same(a, b) and sa == sb for (a, sa), (b, sb) in zip(run[k + 1:], resumed))
        assert fresh.stats["rows_read"] < 60 * (run[-1][1].epoch + 1)


def test_the_shuffled_stream_covers_every_row_once_per_epoch(tmp_path):
    write_lines(tmp_path / "t.jsonl", [json.dumps({"text": f"row {i}"}) for i in range(50)])
    stream = build(stream_cfg(tmp_path, tmp_path / "t.jsonl", shuffle_buffer=8), TOK)
    first = [TOK.decode(s.tokens) for s, _, _ in itertools.islice(stream.draws(SamplerState(seed=1)), 100)]
    assert sorted(first[:50]) == sorted(f"row {i}" for i in range(50)) == sorted(first[50:])
    assert first[:50] != first[50:] and first[:8] != [f"row {i}" for i in range(8)]  # shuffled, per epoch


def test_bad_lines_name_the_file_and_line(tmp_path):
    stream = build(stream_cfg(tmp_path, messy_rows(tmp_path), shuffle=False), TOK)
    with pytest.raises(DataError, match=r"messy.jsonl: line 8: not valid JSON"):
        list(batches(stream, batch_size=4, seq_len=128, packing=True, shuffle=False, loop=False))


def test_a_directory_streams_its_train_and_validation_splits(tmp_path):
    write_lines(tmp_path / "d" / "train.jsonl", [json.dumps(r) for r in ROWS[:40]])
    write_lines(tmp_path / "d" / "validation.jsonl", [json.dumps(r) for r in ROWS[40:50]])
    cfg = stream_cfg(tmp_path, tmp_path / "d")
    held_out = build_eval(cfg, TOK)
    assert isinstance(held_out, StreamingDataset)
    evals = list(batches(held_out, batch_size=4, seq_len=128, packing=False, shuffle=False, loop=False))
    assert len(evals) == 3 and held_out.stats["rows_read"] == 10
    assert build_eval(stream_cfg(tmp_path, tmp_path / "d" / "train.jsonl"), TOK) is None  # a file has one split


def train_cfg(tmp_path, name, source, **overrides) -> TrainConfig:
    data = DataConfig(source=str(source), streaming=True, shuffle_buffer=2000, cache_dir=str(tmp_path / "cache"))
    base = dict(max_steps=4, batch_size=2, max_seq_len=64, output_dir=str(tmp_path / name), progress=False, plot=False,
                eval_batches=0, log_every=100, seed=5, optim=OptimConfig(lr=1e-3, warmup_steps=1), data=data)
    return TrainConfig(**(base | overrides))


@pytest.fixture(scope="module")
def million_rows(tmp_path_factory):
    """A 1,000,000-row JSONL file whose row 900,000 is not JSON: a run that read it all would fail."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    with path.open("w") as f:
        for i in range(1_000_000):
            f.write('{not json\n' if i == 900_000 else
                    f'{{"instruction": "Add {i % 97} and {i % 89}.", "output": "{i % 97 + i % 89}"}}\n')
    return path


def test_a_million_row_file_reaches_step_one_reading_only_a_prefix(tmp_path, million_rows):
    with pytest.raises(DataError, match="big.jsonl"):  # the file is unreadable as a whole
        build_split(DataConfig(source=str(million_rows), cache_dir=str(tmp_path / "cache")), TOK)
    t0 = time.perf_counter()
    one = main(train_cfg(tmp_path, "one", million_rows, max_steps=1, save_every=1))
    seconds = time.perf_counter() - t0
    print(f"\n1M-row JSONL, streaming: step 1 done {seconds:.2f} s after main() started")
    position = state_io.read_meta(state_io.latest(tmp_path / "one" / "checkpoints"))["data_position"]
    assert one["steps"] == 1 and 0 < position["position"] <= 2000 and position["epoch"] == 0


def test_resume_mid_stream_equals_the_uninterrupted_run(tmp_path, million_rows):
    whole = main(train_cfg(tmp_path, "whole", million_rows))
    first = main(train_cfg(tmp_path, "split", million_rows, stop_after=2, save_every=2))
    second = main(train_cfg(tmp_path, "split", million_rows, save_every=2, resume="latest"))
    assert first["losses"] + second["losses"] == whole["losses"] and second["steps"] == 4


def test_streaming_without_max_steps_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--data.streaming: give --max-steps \(a stream is never counted"):
        main(train_cfg(tmp_path, "no-steps", DEMO_TRAIN, max_steps=None, epochs=2))
