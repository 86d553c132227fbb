"""Exact resume, crash safety (SIGKILL at random moments and inside a save), Ctrl-C saves, the NaN guard;
checkpoints are DCP directories, also written in the background (--async-save)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from purefine.checkpoint import state as state_io
from purefine.config import OptimConfig, TrainConfig
from purefine.data import DataConfig
from purefine.errors import PurefineError
from purefine.recipes.train import main
from tests.conftest import ROOT


def run_cfg(tmp_path, name: str, **overrides) -> TrainConfig:
    base = dict(max_steps=20, batch_size=2, grad_accum=2, max_seq_len=64, output_dir=str(tmp_path / name),
                progress=False, plot=False, eval_batches=0, log_every=100, seed=3,
                optim=OptimConfig(lr=1e-3, warmup_steps=2), data=DataConfig(cache_dir=str(tmp_path / "cache")))
    return TrainConfig(**(base | overrides))


def final_tensors(summary: dict) -> dict[str, torch.Tensor]:
    out = summary["outputs"]
    path = out.get("adapter") or out.get("model")
    name = "adapter_model.safetensors" if "adapter" in out else "model.safetensors"
    return load_file(os.path.join(path, name))


@pytest.mark.parametrize("peft, async_save", [("none", False), ("lora", False), ("qlora", False), ("lora", True)])
def test_ten_plus_ten_steps_equal_twenty_bit_for_bit(tmp_path, peft, async_save):
    whole = main(run_cfg(tmp_path, "whole", peft=peft))
    first = main(run_cfg(tmp_path, "split", peft=peft, stop_after=10, save_every=4, async_save=async_save))
    assert first["steps"] == 10
    saved = state_io.complete_steps(tmp_path / "split" / "checkpoints")
    assert [p.name for p in saved] == ["step-00000008", "step-00000010"]  # --keep-last 2
    assert any(saved[-1].glob("*.safetensors")) and state_io.read_meta(saved[-1])["step"] == 10
    second = main(run_cfg(tmp_path, "split", peft=peft, save_every=10, resume="latest"))
    assert second["resumed_from"].endswith("step-00000010") and second["steps"] == 20
    assert first["losses"] + second["losses"] == whole["losses"]
    a, b = final_tensors(whole), final_tensors(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


WRAPPER = r"""
import os, signal, sys
import purefine.checkpoint.state as state_io
mode = os.environ.get("KILL_IN_SAVE")
if mode:
    original = state_io._commit
    calls = []
    def dying_commit(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(mode):   # DCP's shards are on disk, meta.json and the rename are not
            os.kill(os.getpid(), signal.SIGKILL)
        original(*args, **kwargs)
    state_io._commit = dying_commit
sys.argv = ["train.py", *sys.argv[1:]]
from purefine.config import TrainConfig, parse_train_args
from purefine.recipes import run
from purefine.recipes.train import main
run(main, TrainConfig, parse=parse_train_args)
"""


def cli_args(tmp_path, out, *extra):
    return ["--output-dir", str(out), "--max-steps", "12", "--save-every", "2", "--keep-last", "3", "--batch-size", "2",
            "--max-seq-len", "64", "--eval-batches", "0", "--no-progress", "--no-plot", "--seed", "3",
            "--data.cache-dir", str(tmp_path / "cache"), *extra]


def start(tmp_path, out, *extra, env=None):
    return subprocess.Popen([sys.executable, "-c", WRAPPER, *cli_args(tmp_path, out, *extra)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def assert_resumable(tmp_path, out):
    """The newest complete checkpoint loads, and a resumed run finishes all 12 steps."""
    ckpts = state_io.complete_steps(out / "checkpoints")
    for p in ckpts:
        assert (p / "meta.json").exists() and state_io.read_meta(p)["step"] == int(p.name.split("-")[1])
    again = ["--resume", "latest"] if ckpts else ["--overwrite"]  # killed before its first save: start over
    done = subprocess.run([sys.executable, "-c", WRAPPER, *cli_args(tmp_path, out, *again)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-800:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


def test_sigkill_inside_a_save_never_leaves_a_checkpoint_that_looks_valid(tmp_path):
    out = tmp_path / "killed"
    proc = start(tmp_path, out, env={"KILL_IN_SAVE": "2"})  # dies inside the second save (step 4)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in state_io.complete_steps(out / "checkpoints")] == ["step-00000002"]
    partial = out / "checkpoints" / ".step-00000004.tmp"
    assert any(partial.glob("*.safetensors")) and not (partial / "meta.json").exists()  # written, not committed: ignored
    assert_resumable(tmp_path, out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_moments(tmp_path, seed):
    out = tmp_path / f"random-{seed}"
    proc = start(tmp_path, out)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, 2.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert_resumable(tmp_path, out)


def logged_steps(out: Path) -> int:
    return len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0


@pytest.mark.parametrize("busy", [0, 2], ids=["idle", "two-busy-processes"])
def test_ctrl_c_saves_when_asked(tmp_path, busy):
    """Ctrl-C after two logged steps saves and exits 130, however busy the machine (``busy`` processes
    spinning on the CPU meanwhile). The test waits on events (rows logged, the process ending), not
    on a clock."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        out = tmp_path / "interrupted"
        proc = start(tmp_path, out, "--save-every", "0", "--save-on-interrupt", "--max-steps", "100000")
        while proc.poll() is None and logged_steps(out) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-800:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert proc.returncode == 130, err[-500:]
    saved = state_io.latest(out / "checkpoints")
    assert saved is not None and state_io.read_meta(saved)["step"] >= 2


def test_nan_guard_names_the_step_the_leaves_and_the_last_checkpoint(tmp_path):
    cfg = run_cfg(tmp_path, "nan", peft="none", max_steps=6, save_every=1, grad_accum=1,
                  optim=OptimConfig(name="sgd", lr=1e25, warmup_steps=0, clip_norm=None))
    with pytest.raises(PurefineError, match=r"step \d+: non-finite .*non-finite gradients in .*the last good checkpoint is .*step-"):
        main(cfg)
    skipped = main(run_cfg(tmp_path, "skip", peft="none", max_steps=6, grad_accum=1, nan_policy="skip",
                           optim=OptimConfig(name="sgd", lr=1e25, warmup_steps=0, clip_norm=None)))
    assert skipped["steps"] == 6
    rows = [json.loads(r) for r in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["skipped"] for r in rows)
