"""The train recipe under torchrun on the bundled demo: two "nodes" on localhost (``--nnodes 2``,
c10d rendezvous, gloo, 1 process each, FSDP) resume a one-process run's DCP checkpoint (1 -> 2),
and their own checkpoint resumes in one process (2 -> 1): both equal an uninterrupted one-process
run (the two nodes save in the background, --async-save); the held-out loss the 2 ranks compute
(each its rows) equals one process's from the saved adapter; the layout's one-process defaults
and errors."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from safetensors.torch import load_file

from purefine import checkpoint, data, models, shard
from purefine.checkpoint import state as state_io
from purefine.config import TrainConfig
from purefine.errors import ConfigError
from purefine.recipes import setup
from purefine.recipes import train as recipe
from tests.conftest import ROOT
from tests.test_shard_parallel import one_thread

STEPS = 4
FLAGS = dict(max_steps=STEPS, eval_batches=2, max_seq_len=128, log_every=1, progress=False, plot=False)
TOLERANCE = 1e-5


def flags(**values: object) -> list[str]:
    """Command-line flags for keyword values (False -> --no-NAME)."""
    out = []
    for key, value in values.items():
        name = key.replace("_", "-")
        out += [f"--no-{name}"] if value is False else [f"--{name}", str(value)]
    return out


def eval_set(cfg: TrainConfig, model_cfg: object) -> data.TokenizedDataset:
    """The held-out set exactly as the recipe builds it."""
    tokenizer = data.load_tokenizer(setup.tokenizer_path(cfg), model_vocab_size=model_cfg.vocab_size)
    return data.build_eval(dataclasses.replace(cfg.data, max_seq_len=cfg.max_seq_len, seed=cfg.seed), tokenizer)


def eval_logits(cfg: TrainConfig, model_cfg: object, params: dict) -> torch.Tensor:
    """Logits (B, T, V) of the first held-out batch."""
    batch, _ = next(data.batches(eval_set(cfg, model_cfg), batch_size=4, seq_len=cfg.max_seq_len, packing=True,
                                 shuffle=False, loop=False))
    return models.forward(model_cfg, params, batch["tokens"], positions=batch["positions"],
                          mask=models.batch_mask(batch))


def eval_loss(cfg: TrainConfig, model_cfg: object, params: dict) -> float:
    """The mean held-out loss over the first ``--eval-batches`` batches, as the loop computes it."""
    total, count = 0.0, 0
    stream = data.batches(eval_set(cfg, model_cfg), batch_size=cfg.batch_size, seq_len=cfg.max_seq_len,
                          packing=cfg.data.packing, shuffle=False, loop=False)
    with torch.no_grad():
        for _, (batch, _) in zip(range(cfg.eval_batches), stream):
            loss_sum, n = models.loss_fn(model_cfg)(params, batch)
            total, count = total + float(loss_sum), count + int(n)
    return total / count


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def torchrun_two_nodes(args: list[str], timeout: int = 600) -> None:
    """Two torchrun agents ("nodes", 1 process each) meeting at a c10d rendezvous on localhost, as
    on two machines (docs/distributed.md); fail with their output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
                               "--rdzv-id", f"purefine-test-{port}", *args],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outputs = [node.communicate(timeout=timeout) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, f"torchrun node failed ({node.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}"


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(got: Path, want: Path) -> float:
    """The two runs' adapters agree within the tolerance; returns the largest difference."""
    a, b = adapter(got), adapter(want)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=TOLERANCE, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def one_process_cfg(out: Path, **overrides: object) -> TrainConfig:
    return TrainConfig(batch_size=4, output_dir=str(out), **(FLAGS | overrides))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """4 uninterrupted steps in one process (global batch 4)."""
    out = tmp_path_factory.mktemp("recipe-one") / "one"
    with one_thread():
        return out, recipe.main(one_process_cfg(out))


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steps 1-2 in one process (saved at step 2), steps 3-4 on two nodes of 1 process each (FSDP,
    2 rows per rank) resumed from it, saving a checkpoint after every step in the background."""
    out = tmp_path_factory.mktemp("recipe") / "two"
    with one_thread():
        recipe.main(one_process_cfg(out, stop_after=2, save_every=2))
    torchrun_two_nodes(["scripts/train.py", "--parallel.dp-shard", "2", "--batch-size", "2", "--output-dir", str(out),
                        "--resume", "latest", "--save-every", "1", "--async-save", "--keep-last", "3", *flags(**FLAGS)])
    return out


def test_two_nodes_resume_a_one_process_checkpoint_and_equal_one_process(two_node_run: Path,
                                                                         one_process_run: tuple[Path, dict]) -> None:
    two = json.loads((two_node_run / "summary.json").read_text())
    one_dir, one = one_process_run
    assert two["resumed_from"].endswith("step-00000002") and two["steps"] == STEPS
    assert two["losses"] == pytest.approx(one["losses"][2:], abs=TOLERANCE, rel=0)
    print(f"1 -> 2 processes: max |adapter difference| {assert_same_adapter(two_node_run, one_dir):.2e}")
    cfg = one_process_cfg(one_dir)
    with one_thread():
        model_cfg, base = setup.load_model(cfg, torch.device("cpu"))
        logits_one = eval_logits(cfg, model_cfg, checkpoint.load_peft(one_dir / "adapter", base))
        logits_two = eval_logits(cfg, model_cfg, checkpoint.load_peft(two_node_run / "adapter", base))
    torch.testing.assert_close(logits_two, logits_one, atol=TOLERANCE, rtol=0)


def test_a_two_process_dcp_checkpoint_resumes_in_one_process(two_node_run: Path, one_process_run: tuple[Path, dict],
                                                             tmp_path: Path) -> None:
    saved = two_node_run / "checkpoints" / "step-00000003"
    assert sorted(p.suffix for p in saved.iterdir()) == [".json", ".safetensors", ".safetensors"]  # one shard per rank
    assert state_io.read_meta(saved)["world_size"] == 2
    with one_thread():
        resumed = recipe.main(one_process_cfg(tmp_path / "resumed", resume=str(saved)))
    assert resumed["resumed_from"] == str(saved) and len(resumed["losses"]) == 1
    assert resumed["steps"] == STEPS and resumed["losses"] == pytest.approx(one_process_run[1]["losses"][3:], abs=TOLERANCE)
    print(f"2 -> 1 process: max |adapter difference| {assert_same_adapter(tmp_path / 'resumed', one_process_run[0]):.2e}")


def test_two_ranks_evaluate_the_held_out_set_as_one_process_does(two_node_run: Path,
                                                                 one_process_run: tuple[Path, dict]) -> None:
    """Under FSDP each rank takes its rows of every held-out batch and the sums are added: the
    loss equals one process's on the saved adapter."""
    summary = json.loads((two_node_run / "summary.json").read_text())
    cfg = TrainConfig(batch_size=2, output_dir=str(two_node_run), **FLAGS)
    with one_thread():
        model_cfg, base = setup.load_model(cfg, torch.device("cpu"))
        params = checkpoint.load_peft(two_node_run / "adapter", base)
        again = eval_loss(dataclasses.replace(cfg, batch_size=4), model_cfg, params)  # the global eval batch
    assert again == pytest.approx(summary["eval_loss_end"], abs=1e-6)
    assert summary["eval_loss_end"] == pytest.approx(one_process_run[1]["eval_loss_end"], abs=TOLERANCE)
    assert summary["eval_loss_end"] != pytest.approx(one_process_run[1]["eval_loss_start"], abs=1e-4)


def test_one_process_layout_changes_nothing() -> None:
    layout = shard.layout(SimpleNamespace(dp_replicate=1, dp_shard=-1, tp=1, pp=1, microbatches=0), "cpu")
    assert not layout.distributed and layout.is_main and (layout.dp_rank, layout.dp_size) == (0, 1)
    cfg = models.preset("llama-debug")
    params = models.init(cfg, seed=0)
    assert layout.shard_params(cfg, params) is params and layout.gather is None
    assert layout.full_params_for_save(params) is params and layout.checkpoint_reader(cfg) is None


@pytest.mark.parametrize("sizes, world, message", [
    (dict(tp=2), 1, "launch with torchrun"),
    (dict(dp_shard=3), 2, "dp-shard 3"),
    (dict(tp=3), 4, "does not divide"),
])
def test_sizes_that_do_not_fit_the_processes_name_the_flags(sizes: dict, world: int, message: str) -> None:
    parallel = SimpleNamespace(**{"dp_replicate": 1, "dp_shard": -1, "tp": 1, "pp": 1, **sizes})
    with pytest.raises(ConfigError, match=message):
        shard.resolve_sizes(parallel, world)


def test_resolve_sizes_fills_dp_shard() -> None:
    parallel = SimpleNamespace(dp_replicate=2, dp_shard=-1, tp=2, pp=1)
    assert shard.resolve_sizes(parallel, 16) == {"pp": 1, "dp_replicate": 2, "dp_shard": 4, "tp": 2}
