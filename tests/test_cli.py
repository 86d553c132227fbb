"""The command line as a user meets it: no silent fallback (each is an error line or a notice), one
flag per setting, ``validate`` listing every problem, a full disk ending in one error line with the
previous checkpoint intact, one tokens/s definition, run directories accepted by info and check,
a hub id as --checkpoint-dir, generation with the tokenizer's own chat template."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from purefine.checkpoint import state as state_io
from purefine.config import TrainConfig, parse_train_args
from purefine.data import DataConfig
from purefine.errors import ConfigError, WriteError
from purefine.recipes import cli, setup
from purefine.recipes.train import main
from tests.conftest import ROOT, make_hf_llama


def demo(tmp_path: Path, name: str = "out", **overrides) -> TrainConfig:
    base = dict(max_steps=3, batch_size=2, max_seq_len=64, output_dir=str(tmp_path / name), progress=False,
                plot=False, eval_batches=1, log_every=100, data=DataConfig(cache_dir=str(tmp_path / "cache")))
    return TrainConfig(**(base | overrides))


def train_cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, env=env)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The run's stderr ends with exactly one ``error:`` line and it exited 2; returns that line."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert lines and lines[-1].startswith("error: ") and sum(ln.startswith("error:") for ln in lines) == 1, lines[-5:]
    return lines[-1]


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- no silent fallback

def test_a_checkpoint_without_a_tokenizer_is_refused(tmp_path):
    make_hf_llama(tmp_path / "hf", vocab_size=1024)  # weights and config.json, no tokenizer files
    with pytest.raises(ConfigError, match=r"no tokenizer.model or tokenizer.json beside the weights; pass --tokenizer"):
        main(demo(tmp_path, checkpoint_dir=str(tmp_path / "hf")))
    line = one_error_line(train_cli("--checkpoint-dir", str(tmp_path / "hf"), "--output-dir", str(tmp_path / "cli")))
    assert "--tokenizer" in line and str(tmp_path / "hf") in line
    ok = main(demo(tmp_path, "given", checkpoint_dir=str(tmp_path / "hf"), tokenizer=str(ROOT / "purefine/assets/demo")))
    assert ok["steps"] == 3  # an explicit --tokenizer is fine


def test_a_preset_without_weights_needs_init_random_which_says_so(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"--model llama-debug: the preset ships no weights.*--init random"):
        main(demo(tmp_path, model="llama-debug"))
    summary = main(demo(tmp_path, "random", model="llama-debug", init="random"))
    assert summary["steps"] == 3
    assert "note: --init random: llama-debug starts from random weights" in capsys.readouterr().out
    assert json.loads((tmp_path / "random" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] is None  # no base to load: not a name peft cannot resolve


def test_the_bundled_base_is_named_by_its_path_in_the_adapter(tmp_path):
    main(demo(tmp_path))
    base = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_dir() and (Path(base) / "config.json").exists()  # peft's from_pretrained can load it


def test_an_earlier_run_is_refused_overwrite_replaces_it_resume_continues(tmp_path):
    main(demo(tmp_path))
    with pytest.raises(ConfigError, match=r"holds an earlier run \(config.yaml.*--overwrite.*--resume latest"):
        main(demo(tmp_path))
    main(demo(tmp_path, overwrite=True, max_steps=2))
    assert steps(tmp_path / "out") == [1, 2]  # the earlier run's rows are gone, not appended to
    main(demo(tmp_path, "resumed", max_steps=6, save_every=2, stop_after=4))
    main(demo(tmp_path, "resumed", max_steps=6, save_every=2, resume="latest"))
    assert steps(tmp_path / "resumed") == [1, 2, 3, 4, 5, 6]


def test_the_default_output_directory_is_new_for_each_run(tmp_path):
    runs = [main(demo(tmp_path, output_dir=None, max_steps=1)) for _ in range(2)]
    first, second = (Path(r["outputs"]["adapter"]).parent for r in runs)
    assert first != second and first.parent == second.parent == Path("outputs")
    assert first.name.startswith("llama-tiny-causal_lm-lora-")
    for run in (first, second):
        assert (run / "config.yaml").exists()
        subprocess.run(["rm", "-rf", str(run)], check=True)


def test_epochs_or_max_steps_decide_and_the_header_says_which(tmp_path, capsys):
    assert parse_train_args(["--epochs", "2"]).max_steps is None
    assert parse_train_args(["--config", "tiny-demo", "--epochs", "2"]).max_steps is None  # the flag over the preset
    with pytest.raises(ConfigError, match="give one of them"):
        parse_train_args(["--epochs", "2", "--max-steps", "3"])
    data = DataConfig(cache_dir=str(tmp_path / "cache"), max_samples=24, packing=False)
    summary = main(demo(tmp_path, max_steps=None, epochs=2, data=data, batch_size=8))
    assert summary["steps"] == 6  # 24 samples / 8 per step, twice
    assert "6 steps (2 epochs)" in capsys.readouterr().out


def test_one_flag_per_setting_and_boolean_pairs(capsys):
    for flag, suggestion in (("--data.max-seq-len", "--max-seq-len"), ("--data.seed", "--seed")):
        with pytest.raises(ConfigError, match=rf"unrecognized argument '{flag}' \(did you mean {suggestion}\?\)"):
            parse_train_args([flag, "8"])
    assert parse_train_args(["--remat"]).remat is True
    assert parse_train_args(["--config", "llama2-7b-qlora", "--no-remat"]).remat is False
    assert parse_train_args(["--config", "llama2-7b-qlora"]).remat is True  # the QLoRA presets turn it on
    with pytest.raises(SystemExit):
        parse_train_args(["--help"])
    assert "--debug" in capsys.readouterr().out


def test_validate_lists_every_problem_of_a_yaml_at_once(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "bad.yaml").write_text(
        "checkpoint_dir: /nonexistent/llama\n"
        "data:\n  source: /nonexistent/rows.jsonl\n  template: alpacca\n"
        "lora:\n  rnk: 4\n"
        f"output_dir: {tmp_path / 'file' / 'out'}\n")
    done = subprocess.run([sys.executable, "-m", "purefine.cli", "validate", str(tmp_path / "bad.yaml")], cwd=ROOT,
                          capture_output=True, text=True)
    assert one_error_line(done).endswith("bad.yaml: 5 problems (listed above)")
    listed = done.stdout
    for expected in ("unknown key 'lora.rnk' (did you mean 'lora.rank'?)", "--checkpoint-dir /nonexistent/llama",
                     "--data.source /nonexistent/rows.jsonl: no such file", "unknown template 'alpacca'",
                     f"--output-dir {tmp_path / 'file' / 'out'}: cannot be created"):
        assert expected in listed, listed
    ok = subprocess.run([sys.executable, "-m", "purefine.cli", "validate", "tiny-demo"], cwd=ROOT, capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "tiny-demo: valid" in ok.stdout


# ------------------------------------------------------------------------------------- full disk

def test_a_full_disk_during_a_checkpoint_save_is_one_error_line_and_keeps_the_previous(tmp_path, monkeypatch, capsys):
    dcp = state_io._dcp()
    original, calls = dcp.save, []

    def filling_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second save: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(dcp, "save", filling_disk)
    args = ["--max-steps", "6", "--save-every", "2", "--batch-size", "2", "--max-seq-len", "64", "--no-progress",
            "--no-plot", "--output-dir", str(tmp_path / "out"), "--data.cache-dir", str(tmp_path / "cache")]
    from purefine.config import parse_train_args as parse

    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, TrainConfig, args, parse=parse)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("error: ") and "No space left on device" in err[-1]
    assert [p.name for p in state_io.complete_steps(tmp_path / "out" / "checkpoints")] == ["step-00000002"]
    monkeypatch.setattr(dcp, "save", original)
    resumed = main(parse([*args, "--resume", "latest"]))
    assert resumed["resumed_from"].endswith("step-00000002") and resumed["steps"] == 6


def test_a_full_disk_while_writing_the_adapter_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from purefine.checkpoint import peft

    def full(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(peft, "save_file", full)
    with pytest.raises(WriteError, match=r"adapter: cannot write \(No space left on device.*\); the previous"):
        main(demo(tmp_path))
    assert not any(p.name.startswith(".adapter") for p in (tmp_path / "out").iterdir())  # the temporary is gone


# ------------------------------------------------------------------------------------- throughput

def test_tokens_per_s_counts_every_position_and_trained_tokens_beside(tmp_path):
    summary = main(demo(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens"] == 2 * 64 for r in rows)  # batch x sequence length, packed rows
    assert all(0 < r["trained_tokens_per_s"] < r["tokens_per_s"] for r in rows)
    assert summary["tokens_per_s"] > summary["trained_tokens_per_s"] > 0 and summary["train_seconds"] > 0


# ------------------------------------------------------------------- run directories, hub ids, generation

def test_info_and_check_take_a_run_directory(tmp_path):
    main(demo(tmp_path, max_steps=2))
    info = subprocess.run([sys.executable, "-m", "purefine.cli", "info", "--run-dir", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True)
    assert info.returncode == 0 and "steps: 2" in info.stdout and "adapter" in info.stdout
    from purefine.recipes import check

    result = check.main(check.CheckConfig(run_dir=str(tmp_path / "out"), seq_len=8))
    assert result["ok"] and len(result["layers"]) == 4  # llama-tiny's 4 layers, the last included


def test_checkpoint_dir_takes_a_hub_id(tmp_path):
    from tests.test_hub import StubHub

    make_hf_llama(tmp_path / "hf", vocab_size=1024)
    for name in ("tokenizer.model",):
        (tmp_path / "hf" / name).write_bytes((ROOT / "purefine" / "assets" / "demo" / name).read_bytes())
    files = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir() if p.is_file()}
    stub = StubHub({"me/tiny-llama": files})
    try:
        env = {**os.environ, "HF_ENDPOINT": stub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
               "HF_TOKEN": ""}
        done = train_cli("--checkpoint-dir", "me/tiny-llama", "--max-steps", "2", "--batch-size", "2",
                         "--max-seq-len", "64", "--output-dir", str(tmp_path / "out"), "--no-progress", env=env)
    finally:
        stub.close()
    assert done.returncode == 0, done.stderr[-2000:]
    assert any((tmp_path / "hub-cache").rglob("model.safetensors"))  # through the hub cache
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "me/tiny-llama"
    missing = one_error_line(train_cli("--checkpoint-dir", "./no/such/dir", "--output-dir", str(tmp_path / "x")))
    assert "no such local directory, and not a hub id" in missing


def test_generate_defaults_to_the_tokenizers_chat_template_and_stops_at_the_end_of_a_turn(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from purefine import data
    from purefine.recipes import generate
    from tests.test_chat_template import CHATML, byte_level_bpe

    PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(), chat_template=CHATML, eos_token="<|im_end|>",
                            pad_token="<|endoftext|>").save_pretrained(tmp_path / "tok")
    tok = data.load_tokenizer(tmp_path / "tok")
    template = data.formats.resolve_template("tokenizer", tok)
    assert generate.end_of_turn_ids(template, tok) == [tok.token_to_id("<|im_end|>")]
    make_hf_llama(tmp_path / "hf", vocab_size=tok.vocab_size, eos_token_id=None)
    for f in (tmp_path / "tok").iterdir():
        (tmp_path / "hf" / f.name).write_bytes(f.read_bytes())
    cfg = generate.GenerateConfig(checkpoint_dir=str(tmp_path / "hf"), prompt=("hello",), max_new_tokens=3)
    from purefine.recipes.loading import load_model

    loaded = load_model(cfg, device=torch.device("cpu"))
    assert generate.default_template(cfg, loaded, tok) == "tokenizer"
    expected = data.prompt_ids([{"role": "user", "content": "hello"}], "tokenizer", tok)
    assert generate.prompt_tokens("hello", "tokenizer", tok) == expected
    assert expected.count(tok.token_to_id("<|im_start|>")) == 2 and tok.decode(expected).endswith("hello\nassistant\n")
    assert generate.main(cfg)[0]["prompt"] == "hello"


def test_the_adapter_of_a_run_directory_generates_with_the_runs_template(tmp_path):
    from purefine.recipes import generate
    from purefine.recipes.loading import load_model

    main(demo(tmp_path, max_steps=1, data=DataConfig(cache_dir=str(tmp_path / "cache"), template="chatml")))
    base = setup.bundled_checkpoint("llama-tiny")
    cfg = generate.GenerateConfig(checkpoint_dir=str(base), adapter_dir=str(tmp_path / "out" / "adapter"),
                                  prompt=("hi",), max_new_tokens=2)
    loaded = load_model(cfg, device=torch.device("cpu"))
    from purefine import data

    assert generate.default_template(cfg, loaded, data.load_tokenizer(loaded.tokenizer_path)) == "chatml"
