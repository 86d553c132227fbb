"""scripts/info.py: prints a checkpoint's summary; bad input is one line on stderr and exit 2."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, make_hf_llama


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "info.py"), *args], capture_output=True, text=True)


def test_info_on_checkpoint_and_preset(tmp_path):
    make_hf_llama(tmp_path)
    out = run("--checkpoint-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "model_type: llama" in out.stdout and "parameters: 24,736" in out.stdout
    out = run("--model", "llama2-7b")
    assert out.returncode == 0 and "6,738,415,616" in out.stdout


def test_info_errors_are_one_line_exit_2(tmp_path):
    for args in (["--model", "llama9"], ["--checkpoint-dir", str(tmp_path / "nope")], ["--no-such-flag"]):
        out = run(*args)
        assert out.returncode == 2, (args, out)
        assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
