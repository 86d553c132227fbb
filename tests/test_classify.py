"""BERT through the train CLI: ``--task classify`` on the bundled topic set (4 classes, chance 25%)
reaches well above chance held-out accuracy by full fine-tuning; LoRA with a fresh head trained in
full exports a peft ``SEQ_CLS`` adapter that transformers + peft run with equal logits; ``--task
mlm`` lowers the masked-LM loss; labels from any column, and bad labels or models fail in one line."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import purefine as pf
from purefine.config import LoraConfig, OptimConfig, TrainConfig
from purefine.data import DataConfig
from purefine.errors import ConfigError, DataError
from purefine.recipes.tasks import classify_data as classify
from purefine.recipes.train import main
from tests.conftest import ROOT

CHANCE = 0.25


def run_cfg(out, cache, **overrides) -> TrainConfig:
    base = dict(model="bert-debug", task="classify", init="random", batch_size=16, max_seq_len=64, max_steps=100,
                output_dir=str(out), progress=False, plot=False, log_every=1000, eval_batches=100,
                optim=OptimConfig(lr=3e-3, warmup_steps=5), data=DataConfig(cache_dir=str(cache)))
    return TrainConfig(**(base | overrides))


def texts_and_labels(split="validation", n=12):
    rows = [json.loads(line) for line in (classify.CLASSIFY_DIR / f"{split}.jsonl").read_text().splitlines()]
    return [r["text"] for r in rows[:n]], [r["label"] for r in rows[:n]]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A full fine-tune of a random-init BERT on the bundled topics: (output dir, summary)."""
    root = tmp_path_factory.mktemp("classify")
    return root / "full", main(run_cfg(root / "full", root / "cache", peft="none", max_steps=80))


def test_full_finetune_classifies_held_out_text_well_above_chance(full_run):
    out, summary = full_run
    assert summary["label_names"] == ["animal", "food", "home", "nature"]
    assert summary["eval_accuracy_start"] < 0.4 and summary["eval_accuracy_end"] >= 0.6, summary
    assert summary["last_loss"] < summary["first_loss"] and summary["eval_loss_end"] < summary["eval_loss_start"]
    assert json.loads((out / "summary.json").read_text())["eval_accuracy_end"] == summary["eval_accuracy_end"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 80

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    hf_tok = AutoTokenizer.from_pretrained(out / "model")  # the bundled WordPiece files travel with the model
    assert model.config.id2label == {0: "animal", 1: "food", 2: "home", 3: "nature"}
    texts, labels = texts_and_labels()
    inputs = hf_tok(texts, padding=True, return_tensors="pt")
    cfg, params = pf.checkpoint.load_hf(out / "model")
    with torch.no_grad():
        theirs = model(**inputs).logits
        ours = pf.models.forward(cfg, params, inputs["input_ids"], mask=inputs["attention_mask"].bool())
    assert (theirs - ours).abs().max().item() < 1e-4
    assert sum(model.config.id2label[int(i)] == y for i, y in zip(theirs.argmax(-1), labels)) > CHANCE * len(labels)


def test_lora_with_a_fresh_head_over_a_fine_tuned_encoder_exports_a_peft_adapter(full_run, tmp_path):
    """LoRA over the encoder fine-tuned above (the stand-in for a pretrained encoder: LoRA on a random
    one learns slowly), with a fresh head (another seed) for the classes under new names, trained in
    full as peft's modules_to_save: from chance to well above it, and the adapter runs in peft over
    the transformers model with purefine's logits."""
    out, _ = full_run
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for split in ("train", "validation"):  # the same texts, the classes renamed: the old head does not fit
        rows = [json.loads(line) for line in (classify.CLASSIFY_DIR / f"{split}.jsonl").read_text().splitlines()]
        (data_dir / f"{split}.jsonl").write_text("".join(json.dumps({"sentence": r["text"], "topic": r["label"].upper()})
                                                         + "\n" for r in rows))
    cfg = run_cfg(tmp_path / "lora", tmp_path / "cache", peft="lora", init="auto", checkpoint_dir=str(out / "model"), max_steps=30,
                  seed=1,
                  optim=OptimConfig(lr=1e-2, warmup_steps=3), lora=LoraConfig(rank=4, alpha=8),
                  data=DataConfig(source=str(data_dir), text_column="sentence", label_column="topic",
                                  cache_dir=str(tmp_path / "cache")))
    summary = main(cfg)
    assert summary["label_names"] == ["ANIMAL", "FOOD", "HOME", "NATURE"]
    assert summary["eval_accuracy_start"] < 0.4 and summary["eval_accuracy_end"] >= 0.6, summary
    assert summary["last_loss"] < summary["first_loss"]
    adapter = tmp_path / "lora" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and sorted(config["target_modules"]) == ["query", "value"]

    from peft import PeftModel
    from transformers import AutoTokenizer, BertForSequenceClassification

    base_cfg, base = pf.checkpoint.load_hf(out / "model")
    tuned = pf.checkpoint.load_peft(adapter, base)
    assert not torch.equal(tuned["classifier"]["weight"], base["classifier"]["weight"])  # the head trained too
    texts, _ = texts_and_labels()
    inputs = AutoTokenizer.from_pretrained(out / "model")(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = pf.models.forward(base_cfg, tuned, inputs["input_ids"], mask=inputs["attention_mask"].bool())
        peft_model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(out / "model"), adapter).eval()
        assert (peft_model(**inputs).logits - ours).abs().max().item() < 1e-4


def test_masked_lm_fine_tuning_lowers_the_loss_and_saves_a_transformers_model(tmp_path):
    summary = main(run_cfg(tmp_path / "mlm", tmp_path / "cache", task="mlm", peft="none", max_steps=40))
    assert summary["eval_loss_end"] < summary["eval_loss_start"] - 1.0, summary
    assert summary["eval_accuracy_end"] > summary["eval_accuracy_start"]
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(tmp_path / "mlm" / "model").eval()
    cfg, params = pf.checkpoint.load_hf(tmp_path / "mlm" / "model")
    tokens = torch.randint(5, 150, (2, 9))
    with torch.no_grad():
        assert (model(tokens).logits - pf.models.forward(cfg, params, tokens)).abs().max().item() < 1e-4


def test_masking_follows_bert():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 100, (64, 40), generator=gen)
    tokens[:, 0], tokens[:, -1] = 2, 3
    real = torch.ones_like(tokens, dtype=torch.bool)
    real[::2, 30:] = False
    inputs, labels = classify.mask_tokens(tokens, real, [2, 3], mask_id=4, vocab=100, gen=gen)
    chosen = labels != -100
    assert torch.equal(labels[chosen], tokens[chosen]) and not chosen[~real].any()
    assert not chosen[:, 0].any() and not chosen[:, -1].any() and chosen.any(-1).all()
    rate = chosen.float().sum() / (real.sum() - 2 * 64)
    assert 0.12 < rate < 0.19
    masked = (inputs == 4) & chosen
    assert 0.7 < masked.sum() / chosen.sum() < 0.9
    assert torch.equal(inputs[~chosen], tokens[~chosen])


def test_labels_from_ids_names_and_class_label_columns():
    import datasets

    assert classify.label_ids([0, 2, "1"], None, 3, "x") == [0, 2, 1]
    assert classify.label_ids(["b", "a"], ("a", "b"), 2, "x") == [1, 0]
    with pytest.raises(DataError, match=r"x: row 2: label 'c': expected one of \['a', 'b'\]"):
        classify.label_ids(["a", "c"], ("a", "b"), 2, "x")
    with pytest.raises(DataError, match=r"row 1: label 5: expected a class id in \[0, 3\)"):
        classify.label_ids([5], None, 3, "x")
    rows = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]},
                                      features=datasets.Features({"text": datasets.Value("string"),
                                                                  "label": datasets.ClassLabel(names=["neg", "pos"])}))
    cfg = TrainConfig(task="classify")
    assert classify.label_names(rows, cfg, pf.models.preset("bert-debug")) == ("neg", "pos")


def test_bad_models_columns_and_labels_are_errors_naming_the_flag(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a cat", "label": "animal"}\n{"text": "", "label": "food"}\n')
    data = DataConfig(source=str(tmp_path / "d.jsonl"), cache_dir=str(tmp_path / "cache"))
    cases = [
        (dict(model="llama-debug"), ConfigError, "needs a BERT encoder"),
        (dict(peft="qlora"), ConfigError, "--peft qlora"),
        (dict(num_labels=1), ConfigError, "--num-labels"),
        (dict(data=dataclasses.replace(data, label_column="topic")), DataError, "no column 'topic' (--data.label-column)"),
        (dict(data=data), DataError, "row 2: column 'text': expected non-empty text"),
        (dict(peft="lora", lora=LoraConfig(targets=("classifier",))), ConfigError, "selects only the classifier head"),
    ]
    for i, (overrides, error, message) in enumerate(cases):
        with pytest.raises(error) as info:
            main(run_cfg(tmp_path / f"out{i}", tmp_path / "cache", max_steps=1, **overrides))
        assert message in str(info.value), (overrides, str(info.value))
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--task", "classify", "--model", "bert-debug",
                             "--init", "random", "--data.source", str(tmp_path / "d.jsonl"), "--data.label-column",
                             "topic", "--output-dir", str(tmp_path / "out-cli")], capture_output=True, text=True)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1 and "--data.label-column" in lines[0], result.stderr[-2000:]
