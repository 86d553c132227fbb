"""Metrics sinks: JSONL every step, stdout every N steps, TensorBoard, W&B, the loss curve PNG."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from purefine.errors import ConfigError
from purefine.logging import MetricsLogger, format_metrics, peak_memory_bytes


def test_jsonl_stdout_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    with MetricsLogger(tmp_path, every=2, total_steps=4, progress=False) as log:
        for step in range(1, 5):
            log.log(step, {"loss": 5.0 - step, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0, "peak_memory": 2**30})
        log.history[-1]["eval_loss"] = 1.5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[2]["loss"] == 2.0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in printed] == ["step 1/4", "step 2/4", "step 4/4"]
    assert "loss 3.0000" in printed[1] and "tok/s 100" in printed[1] and "mem 1.0GiB" in printed[1]
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_tensorboard_sink_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path, tensorboard=True, progress=False, plot=False, quiet=True) as log:
        log.log(1, {"loss": 2.0})
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss")] == [2.0]


def test_wandb_sink_logs_scalars_through_the_wandb_api(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLogger(tmp_path, wandb=True, progress=False, plot=False, quiet=True, config={"lr": 1}) as log:
        log.log(3, {"loss": 1.25, "note": "text is not a scalar", "bad": float("nan")})
    assert calls[0][0] == "init" and calls[0][1]["config"] == {"lr": 1} and calls[0][1]["project"] == "purefine"
    assert calls[1] == ("log", {"loss": 1.25}, 3) and calls[2] == ("finish",)


def test_missing_optional_sink_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"wandb is not installed: pip install 'purefine\[logging\]'"):
        MetricsLogger(tmp_path, wandb=True)


def test_format_and_memory():
    line = format_metrics(7, None, {"loss": 1.0, "eval_loss": None, "lr": 3e-4})
    assert line == "step 7 | loss 1.0000 | lr 3.00e-04"
    assert peak_memory_bytes() > 10 * 2**20


ALLOC_PROBE = """
import sys, torch
from purefine.logging import set_allocator
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
ok = set_allocator(sys.argv[1])
before = rss()
t = torch.empty(50_000_000).fill_(1.0)   # 200 MB, touched
del t
print(ok, (rss() - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and /proc: Linux only")
@pytest.mark.parametrize("policy,kept", [("fast", False), ("lean", False), ("reuse", True)])
def test_allocator_policies_keep_or_return_freed_memory(policy, kept):
    """reuse keeps a freed 200 MB block in the heap for the next step; fast (glibc's default, which maps
    anything that large) and lean return it to the OS at once."""
    out = subprocess.run([sys.executable, "-c", ALLOC_PROBE, policy], capture_output=True, text=True, check=True)
    ok, grown_mib = out.stdout.split()
    assert ok == "True"
    assert (int(grown_mib) > 150) == kept, out.stdout


def test_auto_allocator_reuses_for_full_fine_tuning_only():
    from purefine.logging import resolve_allocator

    assert resolve_allocator("auto", full=True) == "reuse"
    assert resolve_allocator("auto", full=False) == "fast"
    assert resolve_allocator("lean", full=True) == "lean"
