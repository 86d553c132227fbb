"""Loading a ~1B-parameter bf16 checkpoint peaks under 1.3x its size in resident memory (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import purefine as pf

MEASURE = r"""
import json, sys, torch
import purefine as pf

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
cfg, params = pf.checkpoint.load_hf(sys.argv[1])
print(json.dumps({"before": before, "peak": status("VmHWM"), "after": status("VmRSS"),
                  "bytes": pf.tree.nbytes(params)}))
"""


@pytest.mark.slow
def test_loading_1b_bf16_peaks_under_1_3x(tmp_path):
    cfg = pf.models.family("llama").config(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4,
    )
    assert cfg.num_params > 1.0e9
    pf.checkpoint.save_hf(tmp_path, cfg, pf.models.init(cfg, dtype=torch.bfloat16), max_shard_bytes=1 << 30)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout)
    size = cfg.num_params * 2
    assert m["bytes"] == size
    growth = m["peak"] - m["before"]
    print(f"checkpoint {size / 2**30:.2f} GiB; resident growth at peak {growth / 2**30:.2f} GiB "
          f"({growth / size:.3f}x); process peak {m['peak'] / 2**30:.2f} GiB")
    assert growth < 1.3 * size
