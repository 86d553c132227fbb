"""--task distill: the chunked loss equals a hand-written KL + cross-entropy mix (values and
gradients), a run lowers the held-out KL to the teacher, an NF4 teacher and a LoRA student save a
PEFT adapter, a teacher of another vocabulary is refused (exit 2), resume is exact, and two
processes (FSDP, gloo) equal one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from purefine import checkpoint, data, losses, models, shard, tree
from purefine.config import DistillConfig, OptimConfig, TrainConfig
from purefine.data import DataConfig
from purefine.errors import ConfigError
from purefine.recipes import setup
from purefine.recipes.tasks import distill
from purefine.recipes.train import main
from tests.conftest import ROOT, make_hf_llama
from tests.test_shard_parallel import one_thread, torchrun

TEACHER = setup.bundled_checkpoint("llama-tiny")  # the bundled pretrained tiny model (an HF directory)


def batch(seed: int, b: int = 3, t: int = 12, vocab: int = 1024) -> dict:
    """Random tokens (B, T) with shifted labels, a few positions unlabelled."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, t), generator=g)
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    labels[0, :4] = -100
    return {"tokens": tokens, "labels": labels, "positions": torch.arange(t).expand(b, t)}


def hand_written(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL, CE) sums over the labelled tokens from whole (N, V) logits, written out in full."""
    keep = labels != -100
    s, t, y = student_logits[keep].float(), teacher_logits[keep].float(), labels[keep]
    p_teacher = torch.softmax(t / temperature, -1)
    kl = (p_teacher * (torch.log_softmax(t / temperature, -1) - torch.log_softmax(s / temperature, -1))).sum()
    ce = -torch.log_softmax(s, -1).gather(1, y[:, None]).sum()
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("alpha, temperature", [(0.5, 1.0), (0.8, 2.0), (1.0, 0.7)])
def test_task_loss_equals_a_hand_written_kl_and_cross_entropy_mix(alpha: float, temperature: float) -> None:
    student_cfg, teacher_cfg = models.preset("llama-debug"), models.preset("llama-tiny")  # a smaller student
    student, teacher = models.init(student_cfg, seed=1), models.init(teacher_cfg, seed=2)
    b = batch(0)
    fn = distill.loss(student_cfg, teacher_cfg, teacher, DistillConfig(alpha=alpha, temperature=temperature), None, False)
    total, n, sums = fn(student, b)
    want = hand_written(models.forward(student_cfg, student, b["tokens"]).reshape(-1, 1024),
                        models.forward(teacher_cfg, teacher, b["tokens"]).reshape(-1, 1024), b["labels"].reshape(-1),
                        alpha, temperature)
    assert int(n) == int((b["labels"] != -100).sum())
    for got, expected in zip((total, sums["kl"], sums["ce"]), want):
        assert float(got) == pytest.approx(float(expected), abs=1e-5 * max(1.0, abs(float(expected))))
    assert float(sums["kl"]) > 0


def test_chunks_give_the_whole_logits_values_and_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(37, 16, generator=g, requires_grad=True), torch.randn(50, 16, generator=g, requires_grad=True)
    h_t, w_t = torch.randn(37, 24, generator=g), torch.randn(50, 24, generator=g)
    labels = torch.randint(0, 50, (37,), generator=g)
    chunked = losses.chunked_distillation(h, w, h_t, w_t, labels, alpha=0.6, temperature=1.5, chunk_size=8, softcap=5.0)
    whole = hand_written(losses.softcap(h @ w.t(), 5.0), h_t @ w_t.t(), labels, 0.6, 1.5)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    grads = torch.autograd.grad(chunked[0], [h, w])
    expected = torch.autograd.grad(whole[0], [h, w])
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def run_cfg(out: Path, **overrides: object) -> TrainConfig:
    """A small distillation of the bundled tiny model into a random llama-debug (full fine-tuning)."""
    base = dict(task="distill", teacher=str(TEACHER), model="llama-debug", init="random", peft="none", max_steps=30,
                batch_size=4, max_seq_len=96, output_dir=str(out), progress=False, plot=False, log_every=10,
                eval_batches=4, optim=OptimConfig(lr=3e-3, warmup_steps=3), data=DataConfig(cache_dir=str(out.parent / "cache")))
    return TrainConfig(**(base | overrides))


def test_distillation_lowers_the_held_out_kl_to_the_teacher(tmp_path: Path) -> None:
    with one_thread():
        summary = main(run_cfg(tmp_path / "full"))
    assert summary["eval_kl_end"] < 0.8 * summary["eval_kl_start"], summary
    assert summary["teacher_model_type"] == "llama" and summary["alpha"] == 0.5
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert {"kl", "ce"} <= rows[0].keys()
    assert (tmp_path / "full" / "model" / "model.safetensors").exists()
    # the run directory is a teacher in turn: its model/ as saved
    teacher_cfg, teacher = distill.load_teacher(run_cfg(tmp_path / "next", teacher=str(tmp_path / "full")),
                                                models.preset("llama-debug"), data.DEMO_TOKENIZER, shard.layout(None))
    saved = tree.flatten(checkpoint.load_hf(tmp_path / "full" / "model")[1])
    assert teacher_cfg.hidden_size == 64 and all(torch.equal(x, saved[k]) for k, x in tree.flatten(teacher).items())


def test_lora_student_with_an_nf4_teacher_saves_a_peft_adapter(tmp_path: Path) -> None:
    with one_thread():
        summary = main(run_cfg(tmp_path / "lora", peft="lora", max_steps=12, distill=DistillConfig(quantize_teacher=True)))
    assert summary["eval_kl_end"] < summary["eval_kl_start"]
    adapter = Path(summary["outputs"]["adapter"])
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # a LoRA run directory as the teacher: its base rebuilt as trained, the adapter folded in
    cfg = run_cfg(tmp_path / "next", teacher=str(tmp_path / "lora"))
    teacher_cfg, teacher = distill.load_teacher(cfg, models.preset("llama-debug"), data.DEMO_TOKENIZER, shard.layout(None))
    student_cfg, base = setup.load_model(run_cfg(tmp_path / "lora", peft="lora"), torch.device("cpu"))
    trained = checkpoint.load_peft(adapter, base)
    tokens = batch(1)["tokens"]
    torch.testing.assert_close(models.forward(teacher_cfg, teacher, tokens), models.forward(student_cfg, trained, tokens),
                               atol=1e-5, rtol=1e-5)


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path: Path) -> None:
    make_hf_llama(tmp_path / "other", vocab_size=96)
    with pytest.raises(ConfigError, match=r"--teacher .*other: its vocabulary has 96 tokens, the student's 1024"):
        main(run_cfg(tmp_path / "out", teacher=str(tmp_path / "other")))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--task", "distill", "--teacher",
                           str(tmp_path / "other"), "--model", "llama-debug", "--init", "random", "--output-dir",
                           str(tmp_path / "cli")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: --teacher"), done.stderr
    with pytest.raises(ConfigError, match="--teacher: only used with --task distill"):
        main(run_cfg(tmp_path / "out", task="causal_lm"))


def test_ten_plus_ten_steps_equal_twenty(tmp_path: Path) -> None:
    with one_thread():
        whole = main(run_cfg(tmp_path / "whole", max_steps=20, eval_batches=0))
        first = main(run_cfg(tmp_path / "split", max_steps=20, eval_batches=0, stop_after=10, save_every=10))
        second = main(run_cfg(tmp_path / "split", max_steps=20, eval_batches=0, save_every=10, resume="latest"))
    assert second["resumed_from"].endswith("step-00000010") and second["steps"] == 20
    assert first["losses"] + second["losses"] == whole["losses"]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path: Path) -> None:
    flags = ["--task", "distill", "--teacher", str(TEACHER), "--model", "llama-debug", "--init", "random", "--peft",
             "lora", "--max-steps", "4", "--max-seq-len", "96", "--eval-batches", "2", "--no-progress", "--no-plot"]
    torchrun(["scripts/train.py", *flags, "--parallel.dp-shard", "2", "--batch-size", "2", "--output-dir",
              str(tmp_path / "two")], tmp_path)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    with one_thread():
        one = main(run_cfg(tmp_path / "one", peft="lora", max_steps=4, batch_size=4, eval_batches=2,
                           optim=OptimConfig()))
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5, rel=0)
    assert two["eval_kl_end"] == pytest.approx(one["eval_kl_end"], abs=1e-5)
