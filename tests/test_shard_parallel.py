"""2 processes on CPU/gloo (torchrun) against one process: FSDP, data, tensor and pipeline parallel,
FSDP + LoRA and FSDP + QLoRA; per-rank bytes under FSDP; sharded checkpoint loading.

One torchrun launch runs every scenario of tests/dist/parallel_worker.py (module fixture); each
test compares one scenario's losses, gradient norms and updated parameters with the same 3 steps
run here in one process (``parallel_worker.reference``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from purefine import checkpoint, tree
from tests.conftest import ROOT, make_hf_llama
from tests.dist import parallel_worker as worker

CORE = ["fsdp", "dp", "tp", "pp", "fsdp_lora", "fsdp_qlora"]
EXTRA = ["fsdp_adamw", "tp_lora", "pp_lora_remat"]
FOUR = ["hsdp", "fsdp_tp", "fsdp_tp_lora", "pp_fsdp", "pp_tp"]  # on 4 processes
TOLERANCE = 1e-5


def torchrun(args: list[str], out: Path, timeout: int = 300, nproc: int = 2) -> None:
    """Run ``torchrun --standalone --nproc-per-node N <args>`` (a free port each time); fail with its output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    errors = "\n".join(p.read_text() for p in sorted(out.glob("*.error")))
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{errors}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


@pytest.fixture(scope="module")
def core_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parallel")
    plain, quantized = out / "ckpt", out / "ckpt-nf4"
    make_hf_llama(plain, seed=1, vocab_size=97)  # 97 embedding rows: 49 on rank 0, 48 on rank 1
    make_hf_llama(quantized, seed=2, hidden_size=128, intermediate_size=256, num_attention_heads=4)
    torchrun(["tests/dist/parallel_worker.py", str(out), *CORE, "--load", str(plain), str(quantized)], out)
    return out


@pytest.fixture(scope="module")
def extra_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parallel-extra")
    torchrun(["tests/dist/parallel_worker.py", str(out), *EXTRA], out)
    return out


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: a second intra-op thread only waits (up to 50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def four_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parallel-four")
    torchrun(["tests/dist/parallel_worker.py", str(out), *FOUR], out, timeout=600, nproc=4)
    return out


def check_scenario(out: Path, name: str) -> dict:
    got = load_file(out / f"{name}.safetensors")
    losses = got.pop("__losses__").tolist()
    info = json.loads((out / f"{name}.json").read_text())
    with one_thread():
        ref_losses, ref_norms, ref_params = worker.reference(name)
    assert losses == pytest.approx(ref_losses, abs=TOLERANCE, rel=0)
    assert info["grad_norms"] == pytest.approx(ref_norms, abs=TOLERANCE, rel=0)
    assert got.keys() == ref_params.keys()
    for path, ref in ref_params.items():
        torch.testing.assert_close(got[path], ref, atol=TOLERANCE, rtol=0, msg=lambda m, p=path: f"{p}: {m}")
    moved = max(float((ref_params[p].double() - v.double()).abs().max()) for p, v in _initial(name).items())
    assert moved > 50 * TOLERANCE  # the steps changed the params: the comparison is not vacuous
    return info


def _initial(name: str) -> dict[str, torch.Tensor]:
    _, params, trainable = worker.build(name)
    return dict(tree.filtered(params, trainable))


@pytest.mark.parametrize("name", CORE)
def test_two_processes_match_one_process(core_runs: Path, name: str) -> None:
    check_scenario(core_runs, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXTRA)
def test_more_layouts_match_one_process(extra_runs: Path, name: str) -> None:
    """AdamW state as DTensors, LoRA under tensor parallel (partial A/B gradients), pipeline with
    LoRA and activation checkpointing."""
    check_scenario(extra_runs, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", FOUR)
def test_composed_layouts_on_four_processes_match_one_process(four_process_runs: Path, name: str) -> None:
    """HSDP (replicate x shard), FSDP x TP (FSDP on the dim TP leaves), PP x FSDP, PP x TP."""
    info = check_scenario(four_process_runs, name)
    if name == "pp_fsdp":
        assert info["resume_diff"] == 0.0


@pytest.mark.parametrize("name", ["fsdp", "fsdp_lora"])
def test_fsdp_rank_holds_half_the_params_and_optimizer_state(core_runs: Path, name: str) -> None:
    info = json.loads((core_runs / f"{name}.json").read_text())
    assert info["params_local"] * 2 == info["params_full"]
    step_counter = 4  # the optimizer's float32 step count is replicated
    assert (info["opt_local"] - step_counter) * 2 == info["opt_full"] - step_counter


@pytest.mark.parametrize("name", ["fsdp_lora", "pp"])
def test_resume_from_per_rank_files_under_the_same_mesh_continues_exactly(core_runs: Path, name: str) -> None:
    """Each rank saves its local params and optimizer state (``shard.local_flat``), a fresh sharded
    state takes them back (``shard.from_local_flat``): the next step gives the same bits."""
    info = json.loads((core_runs / f"{name}.json").read_text())
    assert info["resume_diff"] == 0.0


def test_fsdp_qlora_shards_aligned_nf4_weights(core_runs: Path) -> None:
    """MLP weights (2 double-quantization groups) are split in halves; q/k/v/o (1 group) and the
    scalar scale means are replicated; every plain tensor is split."""
    info = json.loads((core_runs / "fsdp_qlora.json").read_text())
    _, params, _ = worker.build("fsdp_qlora")

    def replicated(path: str) -> bool:
        return (".self_attn." in path and ".base." in path) or path.endswith(".scale_mean")

    sizes = {p: x.numel() * x.element_size() for p, x in tree.flatten(params).items()}
    kept = sum(n for p, n in sizes.items() if replicated(p))
    split = sum(n for p, n in sizes.items() if not replicated(p))
    assert info["params_full"] == kept + split
    assert info["params_local"] == kept + split // 2
    assert (info["opt_local"] - 4) * 2 == info["opt_full"] - 4


def _reads(out: Path, tag: str) -> list[list]:
    return [json.loads((out / f"{tag}.rank{r}.json").read_text())["reads"] for r in range(2)]


def test_sharded_load_reads_each_rank_its_own_rows(core_runs: Path) -> None:
    reads = _reads(core_runs, "load")
    names = {name for name, _, _ in reads[0]}
    assert names == {name for name, _, _ in reads[1]} and "model.layers.0.mlp.up_proj.weight" in names
    for name in names:
        (_, shape, r0), = [r for r in reads[0] if r[0] == name]
        (_, _, r1), = [r for r in reads[1] if r[0] == name]
        assert r0 is not None and r1 is not None, name  # never the whole tensor
        assert r0[0] == 0 and r0[1] == r1[0] and r1[1] == shape[0] and r0[1] == -(-shape[0] // 2), (name, r0, r1)
    _, ref = checkpoint.load_hf(core_runs / "ckpt")
    got = load_file(core_runs / "load.safetensors")
    assert got.keys() == tree.flatten(ref).keys()
    for path, x in tree.flatten(ref).items():
        assert torch.equal(got[path], x), path


def test_sharded_nf4_load_equals_quantizing_the_whole_tensor(core_runs: Path) -> None:
    _, ref = checkpoint.load_hf(core_runs / "ckpt-nf4", dtype=torch.float32, quantize=worker.QUANTIZE)
    got = load_file(core_runs / "load_nf4.safetensors")
    flat = tree.flatten(ref)
    assert got.keys() == flat.keys()
    for path, x in flat.items():
        assert torch.equal(got[path], x), path
    placements = json.loads((core_runs / "load_nf4.rank0.json").read_text())["placements"]
    assert placements["model.layers.0.mlp.up_proj.weight.codes"][1] == "S(0)"
    assert placements["model.layers.0.self_attn.q_proj.weight.codes"][1] == "R"
    up_reads = [r for r in _reads(core_runs, "load_nf4")[1] if r[0] == "model.layers.0.mlp.up_proj.weight"]
    assert [r[2] for r in up_reads] == [[128, 256]]  # rank 1 read only its half of the rows
