"""The pipeline end to end: local files, the hub while offline, bad rows, packing round trips, and packed
forward passes that equal each sample's own forward pass (the model is the reference)."""

from __future__ import annotations

import dataclasses
import json
import logging

import datasets
import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from purefine import models, ops
from purefine.data import (
    DEMO_TOKENIZER, DataConfig, Sample, SamplerState, SentencePieceTokenizer, batches, build, build_eval,
    collate_packed, from_samples, load_tokenizer, unpack,
)
from purefine.errors import ConfigError, DataError

TOK = load_tokenizer(DEMO_TOKENIZER)
ROWS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)} for a, b in [(1, 2), (30, 4), (7, 7), (12, 9)]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def cfg(tmp_path):
    """A DataConfig whose datasets cache lives in the test's temporary directory."""
    return DataConfig(cache_dir=str(tmp_path / "cache"), max_seq_len=128)


def replace(cfg, **kw):
    return dataclasses.replace(cfg, **kw)


def all_samples(ds):
    return ds.fetch(range(len(ds)))


def test_local_jsonl_csv_parquet_give_the_same_samples(tmp_path, cfg):
    jsonl = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    datasets.Dataset.from_list(ROWS).to_csv(tmp_path / "rows.csv")
    datasets.Dataset.from_list(ROWS).to_parquet(tmp_path / "rows.parquet")
    want = all_samples(build(replace(cfg, source=str(jsonl)), TOK))
    assert len(want) == 4 and TOK.decode([x for x in want[1].labels if x != -100]) == "34"
    for name in ("rows.csv", "rows.parquet"):
        got = build(replace(cfg, source=str(tmp_path / name)), TOK)
        assert all_samples(got) == want and got.stats["format"] == "alpaca"
    assert (tmp_path / "cache").is_dir()


def test_tokenization_is_cached_per_data_tokenizer_and_options(tmp_path, cfg):
    class Counting(SentencePieceTokenizer):
        calls = 0

        def encode(self, text, **kw):
            Counting.calls += 1
            return super().encode(text, **kw)

    c = replace(cfg, source=str(write_jsonl(tmp_path / "rows.jsonl", ROWS)))
    first = build(c, Counting(DEMO_TOKENIZER))
    calls = Counting.calls
    assert calls >= len(ROWS)
    assert all_samples(build(c, Counting(DEMO_TOKENIZER))) == all_samples(first) and Counting.calls == calls  # cached
    build(replace(c, train_on="all"), Counting(DEMO_TOKENIZER))
    assert Counting.calls > calls  # other options: tokenized again


def test_directory_with_split_files_and_eval(tmp_path, cfg):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "data" / "validation.jsonl", ROWS[:2])
    c = replace(cfg, source=str(tmp_path / "data"))
    assert len(build(c, TOK)) == 4 and len(build_eval(c, TOK)) == 2
    single = replace(cfg, source=str(tmp_path / "data" / "train.jsonl"))
    assert build_eval(single, TOK) is None  # one file has no held-out split
    assert len(build_eval(replace(single, eval_source=str(tmp_path / "data" / "validation.jsonl")), TOK)) == 2
    with pytest.raises(DataError, match="no split 'test'"):
        build_eval(replace(c, eval_source=str(tmp_path / "data"), eval_split="test"), TOK)


def test_demo_is_the_default(cfg):
    train, held_out = build(cfg, TOK), build_eval(cfg, TOK)
    assert len(train) == 3000 and len(held_out) == 200
    assert train.stats["skipped_bad_rows"] == train.stats["truncated"] == 0
    assert train.lengths.max() < 128


@pytest.mark.parametrize("rows, match", [
    ([ROWS[0], {"instruction": "x", "input": ""}], r"rows.jsonl: row 2, field 'output': missing"),
    ([ROWS[0], {"instruction": "x", "input": "", "output": 5}], r"row 2, field 'output': expected a string, found int"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, {"messages": []}],
     r"row 2, field 'messages': empty conversation"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}],
     r"row 1, field 'messages\[1\]\.role': unknown role 'robot'"),
])
def test_bad_rows_in_files_name_the_file_row_and_field(tmp_path, cfg, rows, match):
    with pytest.raises(DataError, match=match):
        build(replace(cfg, source=str(write_jsonl(tmp_path / "rows.jsonl", rows))), TOK)


def test_missing_file_and_unreadable_file(tmp_path, cfg):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file or directory not found"):
        build(replace(cfg, source=str(tmp_path / "nope.jsonl")), TOK)
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl: cannot"):
        build(replace(cfg, source=str(tmp_path / "broken.jsonl")), TOK)
    (tmp_path / "rows.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown data file type '.txt'"):
        build(replace(cfg, source=str(tmp_path / "rows.txt")), TOK)


def test_hub_name_while_offline_says_what_to_do(cfg, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"someone/no-such-dataset: cannot reach the Hugging Face Hub.*--data.source DIR"):
        build(replace(cfg, source="someone/no-such-dataset"), TOK)


def test_skip_bad_rows_counts_and_reports(tmp_path, cfg, caplog):
    rows = [ROWS[0], {"instruction": "x", "input": ""}, ROWS[1], {"instruction": "", "input": "", "output": "y"}, ROWS[2]]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match=r"row 2, field 'output'.*\(2 bad rows in all; --data.skip-bad-rows"):
        build(replace(cfg, source=str(path)), TOK)
    with caplog.at_level(logging.WARNING, logger="purefine.data"):
        ds = build(replace(cfg, source=str(path), skip_bad_rows=True), TOK)
    assert len(ds) == 3 and ds.stats["skipped_bad_rows"] == 2 and ds.stats["rows"] == 5
    assert "row 2, field 'output'" in ds.stats["skipped_examples"][0] and "row 4" in ds.stats["skipped_examples"][1]
    assert "skipped 2 bad row(s) of 5" in caplog.text
    assert [s.tokens for s in all_samples(ds)] == [s.tokens for s in all_samples(build(replace(
        cfg, source=str(write_jsonl(tmp_path / "good.jsonl", [ROWS[0], ROWS[1], ROWS[2]]))), TOK))]


def test_truncation_drops_samples_left_without_labels(tmp_path, cfg, caplog):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    with caplog.at_level(logging.WARNING, logger="purefine.data"):
        with pytest.raises(DataError, match="no usable samples"):
            build(replace(cfg, source=str(path), max_seq_len=8), TOK)  # the prompt alone is longer
    ds = build(replace(cfg, source=str(path), max_seq_len=8, train_on="all"), TOK)
    assert ds.stats["truncated"] == 4 and all(len(s.tokens) == 8 and s.labels[-1] == -100 for s in all_samples(ds))
    assert list(ds.lengths) == [8] * 4  # the sampler plans with the truncated lengths


samples_strategy = st.lists(
    st.lists(st.integers(1, 1023), min_size=2, max_size=24).flatmap(
        lambda toks: st.lists(st.booleans(), min_size=len(toks), max_size=len(toks)).map(
            lambda mask: Sample(toks, [t if m else -100 for t, m in zip(toks[1:], mask[1:])] + [-100]))
    ).filter(lambda s: any(x != -100 for x in s.labels)),
    min_size=1, max_size=12)


@settings(max_examples=30, deadline=None)
@given(samples_strategy, st.integers(1, 3), st.sampled_from([24, 40]))
def test_packing_then_unpacking_returns_every_sample(samples, batch_size, seq_len):
    ds = from_samples(samples, pad_id=0)
    got, order = [], []
    for batch, _ in batches(ds, batch_size=batch_size, seq_len=seq_len, packing=True, shuffle=False, loop=False):
        assert all(v.dtype == torch.int64 and v.shape == (batch_size, seq_len) for v in batch.values())
        assert (batch["positions"][:, 0] == 0).all()
        got += unpack(batch)
    assert got == samples  # shuffle off: same order, tokens and labels unchanged


def test_packed_batch_layout():
    a, b = Sample([1, 5, 6], [5, 6, -100]), Sample([1, 7], [-100, -100])
    batch = collate_packed([[a, b], []], seq_len=8, pad_id=0)
    assert batch["tokens"].tolist() == [[1, 5, 6, 1, 7, 0, 0, 0], [0] * 8]
    assert batch["labels"].tolist() == [[5, 6, -100, -100, -100, -100, -100, -100], [-100] * 8]
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], list(range(8))]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0] * 8]  # padding: its own segment


def test_unpacked_batches_pad_to_the_longest_sample(cfg):
    ds = from_samples([Sample([1, 2, 3], [2, 3, -100]), Sample([1, 9], [9, -100])], pad_id=0)
    batch, state = next(batches(ds, batch_size=2, seq_len=16, packing=False, shuffle=False))
    assert "segment_ids" not in batch and batch["tokens"].tolist() == [[1, 2, 3], [1, 9, 0]]
    assert batch["labels"].tolist() == [[2, 3, -100], [9, -100, -100]] and state == SamplerState(seed=0, epoch=1, position=0)


def test_packed_forward_equals_each_samples_own_forward():
    cfg = models.preset("llama-debug")
    params = models.init(cfg, seed=0, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for n in (5, 11, 3, 9):
        toks = torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist()
        samples.append(Sample(toks, [*toks[1:], -100]))
    batch = collate_packed([samples[:2], samples[2:]], seq_len=20, pad_id=0)
    with torch.no_grad():
        packed = models.forward(cfg, params, batch["tokens"], positions=batch["positions"],
                                mask=ops.block_causal_mask(batch["segment_ids"]))
        start, loss_ref = {0: 0, 1: 0}, torch.zeros((), dtype=torch.float64)
        for k, s in enumerate(samples):
            row = k // 2
            alone = models.forward(cfg, params, torch.tensor([s.tokens]))[0]
            torch.testing.assert_close(packed[row, start[row]:start[row] + len(s.tokens)], alone, atol=1e-5, rtol=0)
            start[row] += len(s.tokens)
            loss_ref += F.cross_entropy(alone[:-1].double(), torch.tensor(s.tokens[1:]), reduction="sum")
        loss_sum, n_tokens = models.loss_fn(cfg)(params, batch)
    assert int(n_tokens) == sum(len(s.tokens) - 1 for s in samples)
    torch.testing.assert_close(loss_sum.double(), loss_ref, atol=1e-3, rtol=1e-5)


def test_preference_batches_pair_chosen_and_rejected(tmp_path, cfg):
    rows = [{"prompt": "Capital of Peru?", "chosen": "Lima", "rejected": "The capital is Paris"},
            {"prompt": "2 plus 2?", "chosen": "4", "rejected": "5"}]
    c = replace(cfg, source=str(write_jsonl(tmp_path / "pref.jsonl", rows)), packing=False)
    ds = build(c, TOK)
    assert ds.preference and ds.stats["format"] == "preference"
    batch, _ = next(batches(ds, batch_size=2, seq_len=64, packing=False, shuffle=False))
    assert batch["chosen"]["tokens"].shape == batch["rejected"]["tokens"].shape
    assert TOK.decode([x for x in batch["rejected"]["labels"][0].tolist() if x != -100]) == "The capital is Paris"
    with pytest.raises(ConfigError, match="preference pairs cannot be packed; pass --data.no-packing"):
        build(replace(c, packing=True), TOK)


def test_data_config_parses_with_tyro():
    import tyro
    c = tyro.cli(DataConfig, args=["--source", "x.jsonl", "--column-map", "instruction", "q", "output", "a",
                                   "--no-packing", "--train-on", "last", "--template", "chatml"])
    assert c.column_map == {"instruction": "q", "output": "a"} and not c.packing and c.train_on == "last"
