"""``scripts/data.py``: --preview marks exactly the trained tokens, --json writes tokens with aligned
labels (checked against transformers' assistant masks for a chat template), and the statistics
count lengths, truncation, packing and the trained share as the samples themselves say."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from purefine.cli import main as purefine
from purefine.data import DEMO_TOKENIZER, DEMO_TRAIN, load_tokenizer, plan_rows, tokenize_row
from purefine.data.sampler import SamplerState
from tests.conftest import ROOT
from tests.test_chat_template import CONVERSATIONS, QWEN_MARKED, SPECIALS, save_tokenizer

TOK = load_tokenizer(DEMO_TOKENIZER)
ROWS = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()]


def run(capsys, *args) -> str:
    capsys.readouterr()
    purefine(["data", *args])
    return capsys.readouterr().out


def test_preview_marks_the_answer_and_its_end_token(capsys):
    out = run(capsys, "--preview", "3")
    assert out.count("=== sample ") == 3
    for row in ROWS[:3]:
        assert f"### Response:\n[[{row['output']}</s>]]" in out  # the answer and EOS, nothing else
    assert out.count("[[") == 3 and out.startswith("=== sample 0 (builtin:demo (split train)):")


def test_json_labels_are_aligned_with_the_tokens(capsys, tmp_path):
    rows = ROWS[:5]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = run(capsys, "--preview", "5", "--json", "--data.source", str(tmp_path / "rows.jsonl"))
    objs = [json.loads(line) for line in lines.splitlines()]
    assert len(objs) == 5 and all(set(o) == {"tokens", "labels"} for o in objs)
    for row, o in zip(rows, objs):
        want = tokenize_row(row, 0, fmt="alpaca", template="alpaca", tokenizer=TOK)
        assert o["tokens"] == want.tokens and len(o["labels"]) == len(o["tokens"])
        assert o["labels"] == [-100, *want.labels[:-1]]  # the batch labels, unshifted
        trained = [t for t, label in zip(o["tokens"], o["labels"]) if label != -100]
        assert all(label in (token, -100) for token, label in zip(o["tokens"], o["labels"]))
        assert TOK.decode(trained) == row["output"] and trained[-1] == TOK.eos_id


def test_json_labels_match_transformers_assistant_masks(capsys, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path / "tok", QWEN_MARKED, **SPECIALS["qwen"])
    conversations = [CONVERSATIONS[k] for k in ("one turn", "system, three turns", "tools")]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    lines = run(capsys, "--preview", "3", "--json", "--tokenizer", str(tmp_path / "tok"), "--data.source",
                str(tmp_path / "chat.jsonl"), "--max-seq-len", "512")
    ref = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for messages, line in zip(conversations, lines.splitlines()):
        o = json.loads(line)
        want = ref.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert o["tokens"] == list(want["input_ids"])
        assert [label != -100 for label in o["labels"]][1:] == [bool(m) for m in want["assistant_masks"]][1:]


def test_statistics_count_what_the_samples_hold(capsys, tmp_path):
    rows = ROWS[:40]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ("--data.source", str(tmp_path / "rows.jsonl"), "--data.cache-dir", str(tmp_path / "cache"),
              "--max-seq-len", "50")
    report = json.loads(run(capsys, *common, "--json"))
    every = [tokenize_row(r, 0, fmt="alpaca", template="alpaca", tokenizer=TOK) for r in rows]
    samples = [s for s in every if any(x != -100 for x in s.labels[:49])]  # truncation leaves them a label
    lengths = [min(len(s.tokens), 50) for s in samples]
    trained = [sum(x != -100 for x in s.labels[:49]) for s in samples]
    assert report["dropped_unlabelled"] == 40 - len(samples) > 0
    assert report["samples"] == len(samples) and report["tokens"] == sum(lengths)
    assert report["truncated"] == sum(len(s.tokens) > 50 for s in samples) > 0
    assert report["lengths"]["max"] == 50 and report["lengths"]["min"] == min(lengths)
    assert report["trained_tokens"] == sum(trained)
    assert report["trained_share"] == pytest.approx(sum(trained) / sum(lengths))
    rows_planned, _ = plan_rows(lengths, SamplerState(), rows=100, seq_len=50, packing=True, loop=False)
    assert report["packing"]["rows"] == len(rows_planned) >= -(-sum(lengths) // 50)
    assert report["packing"]["efficiency"] == pytest.approx(sum(lengths) / (len(rows_planned) * 50))
    padded = json.loads(run(capsys, *common, "--json", "--data.no-packing", "--batch-size", "8"))["padding"]
    batches = [lengths[i:i + 8] for i in range(0, len(lengths), 8)]
    assert padded["efficiency"] == pytest.approx(sum(lengths) / sum(len(b) * max(b) for b in batches))
    text = run(capsys, *common)
    assert f"samples {len(samples)} | tokens {sum(lengths):,} | truncated {report['truncated']}" in text
    assert f"packing: {len(rows_planned)} rows" in text


def test_statistics_of_a_mix_preset_per_source_and_streamed(capsys, tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:30]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": r["output"]}) + "\n" for r in ROWS[30:50]))
    mix = [{"source": str(tmp_path / "a.jsonl"), "weight": 2.0}, {"source": str(tmp_path / "b.jsonl"), "weight": 1.0}]
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"max_seq_len": 64, "data": {"mix": mix}}))
    report = json.loads(run(capsys, "--config", str(tmp_path / "mix.yaml"), "--json"))
    a, b = report["sources"][str(tmp_path / "a.jsonl")], report["sources"][str(tmp_path / "b.jsonl")]
    assert (a["samples"], b["samples"], report["samples"]) == (30, 20, 50)
    assert a["weight"] == pytest.approx(2 / 3)
    assert b["trained_tokens"] == b["tokens"] - b["samples"]  # text: every token after BOS is a target
    streamed = json.loads(run(capsys, "--config", str(tmp_path / "mix.yaml"), "--json", "--data.streaming", "--rows", "10"))
    assert streamed["sources"][str(tmp_path / "a.jsonl")]["samples"] == 10
    assert streamed["sources"][str(tmp_path / "a.jsonl")]["rows_read"] <= 30


def test_the_script_runs_and_bad_flags_are_one_line(tmp_path):
    ok = subprocess.run([sys.executable, str(ROOT / "scripts" / "data.py"), "--preview", "1"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.count("[[") == 1, ok.stderr[-500:]
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "data.py"), "--preview", "-1"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --preview: must be >= 0, found -1"
