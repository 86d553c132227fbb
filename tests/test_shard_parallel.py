"""2 processes on CPU/gloo (torchrun) against one process: FSDP, data, tensor and pipeline parallel
(torch.distributed.pipelining: GPipe, 1F1B, interleaved; tied and untied embeddings), FSDP + LoRA,
FSDP + QLoRA and tensor-parallel QLoRA; DCP checkpoints resharded between layouts and process
counts; generation from sharded params; per-rank bytes under FSDP; sharded checkpoint loading.

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

from purefine import checkpoint, generate, models, train, tree
from purefine.checkpoint import state as state_io
from tests.conftest import ROOT, make_hf_llama
from tests.dist import parallel_worker as worker

PIPELINES = ["pp", "pp_gpipe", "pp_tied_gpipe", "pp_tied_1f1b"]  # Llama (untied) and Qwen2 (tied) x GPipe, 1F1B
RESHARDED = ["dcp_fsdp_to_tp", "dcp_tp_to_dp", "dcp_one_to_fsdp"]
CORE = ["fsdp", "dp", "tp", *PIPELINES, "fsdp_lora", "fsdp_qlora", "tp_qlora", *RESHARDED]
EXTRA = ["fsdp_adamw", "tp_lora", "pp_lora_remat", "pp_gpt2_1f1b", "pp_interleaved"]
FOUR = ["hsdp", "fsdp_tp", "fsdp_tp_lora", "pp_fsdp", "pp_fsdp_1f1b", "pp_fsdp_tied_gpipe", "pp_fsdp_tied_1f1b",
        "pp_tp", "fsdp_tp_qlora"]  # on 4 processes
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
    with one_thread():  # the checkpoint "dcp_one_to_fsdp" resumes on 2 processes: 2 steps in this one
        state, _, _ = worker.reference_state("dcp_one_to_fsdp", worker.STEPS - 1)
    state_io.save(out / "one-ckpt", state, worker.build("dcp_one_to_fsdp")[2])
    torchrun(["tests/dist/parallel_worker.py", str(out), *CORE, "generate", "--load", str(plain), str(quantized)], out)
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
        ref_state, ref_losses, ref_norms = worker.reference_state(name, worker.STEPS)
    ref_params = tree.flatten(ref_state.params)
    ran = len(losses)  # a run resumed from a one-process checkpoint took the last step only
    assert ran == (1 if "resume_from" in worker.SCENARIOS[name] else worker.STEPS)
    assert losses == pytest.approx(ref_losses[-ran:], abs=TOLERANCE, rel=0)
    assert info["grad_norms"] == pytest.approx(ref_norms[-ran:], abs=TOLERANCE, rel=0)
    assert got.keys() == ref_params.keys()
    for path, ref in ref_params.items():
        torch.testing.assert_close(got[path], ref, atol=TOLERANCE, rtol=0, msg=lambda m, p=path: f"{p}: {m}")
    moved = max(float((ref_params[p].double() - v.double()).abs().max()) for p, v in _initial(name).items())
    assert moved > 50 * TOLERANCE  # the steps changed the params: the comparison is not vacuous
    if "eval" in info:  # the held-out loss through the layout's loss_fn, from the trained params
        cfg = worker.model_config(worker.SCENARIOS[name])
        with one_thread(), torch.no_grad():
            loss_sum, count = models.loss_fn(cfg)(ref_state.params, worker.eval_batch(cfg))
        assert info["eval"] == pytest.approx([float(loss_sum), float(count)], abs=TOLERANCE * float(count), rel=0)
    return info


def _initial(name: str) -> dict[str, torch.Tensor]:
    _, params, trainable = worker.build(name)
    return dict(tree.filtered(params, trainable))


@pytest.mark.parametrize("name", [n for n in CORE if n not in PIPELINES + RESHARDED])
def test_two_processes_match_one_process(core_runs: Path, name: str) -> None:
    check_scenario(core_runs, name)


@pytest.mark.parametrize("name", PIPELINES)
def test_two_pipeline_stages_match_one_process(core_runs: Path, name: str) -> None:
    """torch.distributed.pipelining stages of Llama (untied) and Qwen2 (tied embedding: stage 0 and
    stage 1 hold a copy, their gradients summed) under GPipe and 1F1B, full fine-tuning."""
    check_scenario(core_runs, name)


@pytest.mark.parametrize("name", RESHARDED)
def test_dcp_checkpoints_resume_under_another_layout(core_runs: Path, name: str) -> None:
    """Saved after 2 steps under FSDP / TP / one process, the third step under TP / DP / FSDP: the
    params equal 3 uninterrupted steps in one process."""
    check_scenario(core_runs, name)


@pytest.mark.parametrize("name, saved", [("dcp_fsdp_to_tp", "dcp_fsdp_to_tp-ckpt/step-00000002"),
                                         ("pp_tied_gpipe", "pp_tied_gpipe-same/step-00000003")])
def test_a_checkpoint_saved_by_two_processes_resumes_in_one(core_runs: Path, name: str, saved: str) -> None:
    """A DCP checkpoint written by 2 ranks (FSDP shards; or 2 pipeline stages, a tied embedding on
    both) loads into one process's state; one more step there equals the uninterrupted run."""
    path = core_runs / saved
    assert sorted(p.suffix for p in path.iterdir()) == [".json", ".safetensors", ".safetensors"]  # one shard per rank
    assert state_io.read_meta(path)["world_size"] == 2
    _, params, trainable = worker.build(name)
    with one_thread():
        state = state_io.load(path, train.init(params, worker.optimizer(name), trainable=trainable), trainable)
        step = state.step
        state, losses, _ = worker.continue_reference(name, state, step, step + 1)
        ref_state, ref_losses, _ = worker.reference_state(name, step + 1)
    assert losses == pytest.approx(ref_losses[-1:], abs=TOLERANCE, rel=0)
    want = dict(tree.filtered(ref_state.params, trainable))
    for p, x in tree.filtered(state.params, trainable):
        torch.testing.assert_close(x, want[p], atol=TOLERANCE, rtol=0, msg=lambda m, p=p: f"{p}: {m}")


def test_two_ranks_generate_the_tokens_of_one_process(core_runs: Path) -> None:
    """Greedy and sampled generation from FSDP-sharded params (gathered per block) on each rank."""
    cfg, params, _ = worker.build("generate")
    with one_thread():
        greedy = generate.generate(cfg, params, worker.PROMPTS, max_new_tokens=6)
        sampled = generate.generate(cfg, params, worker.PROMPTS, max_new_tokens=6, **worker.SAMPLING)
    for rank in range(2):
        got = json.loads((core_runs / f"generate.rank{rank}.json").read_text())
        assert got == {"greedy": greedy, "sampled": sampled, "sharded": True}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXTRA)
def test_more_layouts_match_one_process(extra_runs: Path, name: str) -> None:
    """AdamW state as DTensors, LoRA under tensor parallel (partial A/B gradients), pipeline with
    LoRA and activation checkpointing, GPT-2 (tied) under 1F1B, interleaved 1F1B (2 stages per rank)."""
    check_scenario(extra_runs, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", FOUR)
def test_composed_layouts_on_four_processes_match_one_process(four_process_runs: Path, name: str) -> None:
    """HSDP (replicate x shard), FSDP x TP (FSDP on the dim TP leaves; QLoRA too), PP x FSDP (GPipe
    and 1F1B, tied and untied), PP x TP."""
    info = check_scenario(four_process_runs, name)
    if worker.SCENARIOS[name].get("resume"):
        assert info["resume_diff"] == 0.0


@pytest.mark.parametrize("name", ["fsdp", "fsdp_lora"])
def test_fsdp_rank_holds_half_the_params_and_optimizer_state(core_runs: Path, name: str) -> None:
    info = json.loads((core_runs / f"{name}.json").read_text())
    assert info["params_local"] * 2 == info["params_full"]
    step_counter = 4  # the optimizer's float32 step count is replicated
    assert (info["opt_local"] - step_counter) * 2 == info["opt_full"] - step_counter


@pytest.mark.parametrize("name", ["fsdp_lora", "pp", "pp_tied_gpipe"])
def test_resume_from_a_dcp_checkpoint_under_the_same_mesh_continues_exactly(core_runs: Path, name: str) -> None:
    """Every rank saves its shards (``checkpoint.state.save``, DCP), a fresh sharded state loads
    them: the next step gives the same bits."""
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


def test_tensor_parallel_nf4_load_splits_blocks_and_equals_the_whole_tensor(core_runs: Path) -> None:
    """tp=2: NF4 weights quantized whole, their row-block codes split by rows (colwise) or columns
    (rowwise); gathered back they are the whole tensor's quantization, bit for bit."""
    _, ref = checkpoint.load_hf(core_runs / "ckpt-nf4", dtype=torch.float32, quantize=worker.QUANTIZE)
    got = load_file(core_runs / "load_nf4_tp.safetensors")
    flat = tree.flatten(ref)
    assert got.keys() == flat.keys()
    for path, x in flat.items():
        assert torch.equal(got[path], x), path
    placements = json.loads((core_runs / "load_nf4_tp.rank0.json").read_text())["placements"]
    for name, split in (("mlp.up_proj", "S(0)"), ("self_attn.k_proj", "S(0)"), ("mlp.down_proj", "S(1)"),
                        ("self_attn.o_proj", "S(1)")):
        for child in ("codes", "scale_codes"):
            assert placements[f"model.layers.1.{name}.weight.{child}"] == ["R", "R", split], (name, child)
        assert placements[f"model.layers.1.{name}.weight.scale_factors"] == ["R", "R", "R"]
