"""The train recipe under torchrun: 2 processes (FSDP, gloo) on the bundled demo, its saved adapter
loaded in one process; the same run in one process; the layout's one-process defaults and errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from purefine import checkpoint, data, models, shard
from purefine.config import TrainConfig
from purefine.errors import ConfigError
from purefine.recipes import setup
from purefine.recipes import train as recipe
from tests.test_shard_parallel import one_thread, torchrun

FLAGS = dict(max_steps=3, eval_batches=2, max_seq_len=128, log_every=1, progress=False, plot=False)


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


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recipe") / "two"
    torchrun(["scripts/train.py", "--parallel.dp-shard", "2", "--batch-size", "2", "--output-dir", str(out),
              *flags(**FLAGS)], out.parent)
    return out


def test_torchrun_run_saves_an_adapter_that_one_process_loads_with_the_same_results(two_process_run: Path) -> None:
    summary = json.loads((two_process_run / "summary.json").read_text())
    assert summary["steps"] == 3 and (two_process_run / "adapter" / "adapter_model.safetensors").exists()
    cfg = TrainConfig(batch_size=2, output_dir=str(two_process_run), **FLAGS)
    with one_thread():
        model_cfg, base = setup.load_model(cfg, torch.device("cpu"))
        params = checkpoint.load_peft(two_process_run / "adapter", base)
        again = eval_loss(dataclasses.replace(cfg, batch_size=4), model_cfg, params)  # the global eval batch
    # the held-out loss the 2 ranks computed (each its half of every eval batch) = one process from the files
    assert again == pytest.approx(summary["eval_loss_end"], abs=1e-6)
    assert summary["eval_loss_end"] != pytest.approx(summary["eval_loss_start"], abs=1e-6)


def test_torchrun_run_equals_a_one_process_run_of_the_same_global_batch(two_process_run: Path, tmp_path: Path) -> None:
    two = json.loads((two_process_run / "summary.json").read_text())
    cfg = TrainConfig(batch_size=4, output_dir=str(tmp_path / "one"), **FLAGS)
    with one_thread():
        one = recipe.main(cfg)
        model_cfg, base = setup.load_model(cfg, torch.device("cpu"))
        logits_one = eval_logits(cfg, model_cfg, checkpoint.load_peft(tmp_path / "one" / "adapter", base))
        logits_two = eval_logits(cfg, model_cfg, checkpoint.load_peft(two_process_run / "adapter", base))
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5, rel=0)
    torch.testing.assert_close(logits_two, logits_one, atol=1e-5, rtol=0)


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
