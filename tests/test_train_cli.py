"""The train CLI end to end on the bundled demo: the loss falls, outputs load in peft and
transformers, and every bad input is one line on stderr with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import purefine as pf
from purefine.config import TrainConfig, parse_train_args
from purefine.data import DataConfig
from purefine.recipes.train import main
from tests.conftest import ROOT


def demo(tmp_path, **overrides) -> TrainConfig:
    base = dict(max_steps=30, batch_size=4, max_seq_len=128, output_dir=str(tmp_path / "out"), progress=False,
                plot=False, eval_batches=2, log_every=100, data=DataConfig(cache_dir=str(tmp_path / "cache")))
    return TrainConfig(**(base | overrides))


def falls(summary: dict) -> bool:
    return summary["last_loss"] < summary["first_loss"]


def test_lora_run_lowers_the_loss_and_saves_a_peft_adapter(tmp_path):
    summary = main(demo(tmp_path, save_merged=True))
    assert falls(summary), summary["losses"]
    out = tmp_path / "out"
    assert {"adapter", "merged", "config.yaml", "metrics.jsonl", "summary.json"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31)) and all("grad_norm" in r and "lr" in r for r in rows)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = pf.recipes.setup.checkpoint_source(demo(tmp_path))
    cfg, base = pf.checkpoint.load_hf(base_dir, dtype=torch.float32)
    tuned = pf.checkpoint.load_peft(out / "adapter", base)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ours = pf.models.forward(cfg, tuned, tokens)
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).float(), out / "adapter").eval()
        assert (peft_model(tokens).logits - ours).abs().max().item() < 1e-4
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        assert (merged(tokens).logits - ours).abs().max().item() < 1e-4


def test_full_finetune_lowers_the_loss(tmp_path):
    summary = main(demo(tmp_path, peft="none", optim=pf.config.OptimConfig(lr=1e-3, warmup_steps=3)))
    assert falls(summary), summary["losses"]
    cfg, params = pf.checkpoint.load_hf(tmp_path / "out" / "model")
    assert cfg.model_type == "llama" and (tmp_path / "out" / "model" / "tokenizer.model").exists()


def test_dora_and_grad_accumulation_run(tmp_path):
    summary = main(demo(tmp_path, peft="dora", max_steps=4, grad_accum=2))
    assert summary["steps"] == 4
    meta = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert meta["use_dora"] is True


def test_yaml_preset_gives_defaults_and_flags_override(tmp_path):
    cfg = parse_train_args(["--config", "llama2-7b-qlora", "--max-steps", "3", "--lora.rank", "4"])
    assert (cfg.model, cfg.peft, cfg.max_steps, cfg.lora.rank, cfg.max_seq_len) == ("llama2-7b", "qlora", 3, 4, 2048)


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], capture_output=True, text=True)


@pytest.mark.parametrize("args", [
    ["--no-such-flag"], ["--model", "llama9"], ["--lora.rank", "0"], ["--lora.targets", "zzz_proj", "--max-steps", "1"],
    ["--batch-size", "0"], ["--output-dir", "/proc/purefine-cannot-write"], ["--config", "nope"], ["--peft", "bogus"],
])
def test_bad_input_is_one_line_and_exit_2(args, tmp_path):
    if "--output-dir" not in args:
        args = [*args, "--output-dir", str(tmp_path / "o")]
    out = run_cli(*args)
    assert out.returncode == 2, (args, out.stdout[-500:], out.stderr[-500:])
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and out.stderr.count("error:") == 1, out.stderr


def test_qlora_with_quantized_embeddings_trains_and_reloads(tmp_path):
    from purefine.recipes.loading import ModelSource, load_model

    summary = main(demo(tmp_path, peft="qlora", max_steps=12, lora=pf.config.LoraConfig(quantize_embeddings=True)))
    assert falls(summary), summary["losses"]
    loaded = load_model(ModelSource(run_dir=str(tmp_path / "out")), device=torch.device("cpu"))
    assert pf.nf4.is_nf4(loaded.params["model"]["embed_tokens"]["weight"]) and pf.nf4.is_nf4(loaded.params["lm_head"]["weight"])
    with pytest.raises(pf.errors.ConfigError, match="--lora.quantize-embeddings: only with --peft qlora"):
        pf.rules.validate(demo(tmp_path, peft="lora", lora=pf.config.LoraConfig(quantize_embeddings=True)))
    from purefine.shard.layout import Layout

    two_ranks = Layout({"dp_replicate": 1, "dp_shard": 2, "tp": 1, "pp": 1}, rank=0, world_size=2)
    with pytest.raises(pf.errors.ConfigError, match="--lora.quantize-embeddings: one process only"):
        pf.recipes.setup.load_model(demo(tmp_path, peft="qlora", lora=pf.config.LoraConfig(quantize_embeddings=True)),
                                    torch.device("cpu"), two_ranks)


def test_qlora_lowers_the_loss_as_lora_does(tmp_path):
    qlora = main(demo(tmp_path / "q", peft="qlora"))
    lora_run = main(demo(tmp_path / "l", peft="lora"))
    assert falls(qlora), qlora["losses"]
    # NF4 perturbs the frozen base a little; the adapters still learn about as much
    drop_q = qlora["first_loss"] - qlora["last_loss"]
    drop_l = lora_run["first_loss"] - lora_run["last_loss"]
    assert drop_q > 0.5 * drop_l
    cfg = json.loads((tmp_path / "q" / "out" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8


def test_a_one_process_run_never_loads_torch_distributed_tensor_checkpoint_or_pipelining(tmp_path):
    # ~50 MB of resident memory (torch.distributed.tensor pulls in sympy) that a run on one device
    # never uses: the sharding modules and DCP load on first use (a mesh, a resumable save).
    code = ("import sys\nfrom purefine.config import parse_train_args\nfrom purefine.recipes.train import main\n"
            f"main(parse_train_args(['--max-steps', '2', '--batch-size', '2', '--max-seq-len', '64', '--no-progress',"
            f" '--no-plot', '--output-dir', {str(tmp_path / 'out')!r}, '--data.cache-dir', {str(tmp_path / 'c')!r}]))\n"
            "heavy = ('torch.distributed.tensor', 'torch.distributed.checkpoint', 'torch.distributed.pipelining', 'sympy')\n"
            "print('LOADED', [m for m in heavy if m in sys.modules])\n"
            "import purefine.shard as s\nprint('LAZY', s.plan_for.__module__, s.make_reader.__module__)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED []" in done.stdout, done.stdout
    assert "LAZY purefine.shard.plan purefine.shard.checkpoint_io" in done.stdout, done.stdout
    assert (tmp_path / "out" / "adapter").is_dir()
