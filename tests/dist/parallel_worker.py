"""Run under ``torchrun --nproc-per-node 2``: the parallel scenarios of tests/test_shard_parallel.py.

    torchrun --standalone --nproc-per-node 2 tests/dist/parallel_worker.py OUT_DIR [SCENARIO ...] [--load CKPT QCKPT]

Each scenario trains 3 steps (2 accumulated micro-batches each) of a tiny Llama under one layout
and rank 0 writes ``OUT_DIR/<scenario>.safetensors`` (the full params after the steps and the
losses) and ``OUT_DIR/<scenario>.json`` (byte counts, or the error). The test runs the same steps
in one process (``reference``) and compares. Nothing here runs on import.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from purefine import lora, models, nf4, optim, train, tree
from purefine.models.llama import LlamaConfig

STEPS, ROWS, SEQ, MICRO = 3, 4, 16, 2
QUANTIZE = r".*\.(self_attn|mlp)\.\w+_proj\.weight"
# MLP weights of 256 x 128 = 2 groups of 64*256 elements: NF4 shards over 2 ranks; q/k/v/o stay replicated.
QLORA_CFG = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
SCENARIOS: dict[str, dict] = {
    "fsdp": dict(parallel=dict(dp_shard=2), peft="none"),
    "fsdp_adamw": dict(parallel=dict(dp_shard=2), peft="none", opt="adamw"),
    "dp": dict(parallel=dict(dp_replicate=2, dp_shard=1), peft="none"),
    "tp": dict(parallel=dict(dp_shard=1, tp=2), peft="none"),
    "tp_lora": dict(parallel=dict(dp_shard=1, tp=2), peft="lora"),
    "pp": dict(parallel=dict(dp_shard=1, pp=2, microbatches=2), peft="none", resume=True),
    "pp_lora_remat": dict(parallel=dict(dp_shard=1, pp=2, microbatches=2), peft="lora", remat=True),
    "fsdp_lora": dict(parallel=dict(dp_shard=2), peft="lora", resume=True),
    "fsdp_qlora": dict(parallel=dict(dp_shard=2), peft="qlora"),
    # 4 processes: the dimensions composed
    "hsdp": dict(parallel=dict(dp_replicate=2, dp_shard=2), peft="none"),
    "fsdp_tp": dict(parallel=dict(dp_shard=2, tp=2), peft="none"),
    "fsdp_tp_lora": dict(parallel=dict(dp_shard=2, tp=2), peft="lora"),
    "pp_fsdp": dict(parallel=dict(dp_shard=2, pp=2, microbatches=2), peft="lora", resume=True),
    "pp_tp": dict(parallel=dict(dp_shard=1, tp=2, pp=2, microbatches=2), peft="none"),
}


def build(name: str) -> tuple[LlamaConfig, dict, train.Filter]:
    """(model config, full params, trainable filter) of a scenario: the same on every process."""
    spec = SCENARIOS[name]
    cfg = QLORA_CFG if spec["peft"] == "qlora" else models.preset("llama-debug")
    hook = nf4.quantize_hook(QUANTIZE) if spec["peft"] == "qlora" else None
    params = models.init(cfg, seed=0, hook=hook)
    if spec["peft"] == "none":
        return cfg, params, train.all_floating
    return cfg, lora.apply(params, rank=4, alpha=8, where="all-linear", seed=0), lora.trainable


def batches(cfg: LlamaConfig, step: int) -> list[dict]:
    """The step's micro-batches (ROWS x SEQ each), with unlabelled positions so that the ranks'
    token counts differ."""
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(MICRO):
        tokens = torch.randint(0, cfg.vocab_size, (ROWS, SEQ), generator=gen)
        labels = torch.randint(0, cfg.vocab_size, (ROWS, SEQ), generator=gen)
        labels[torch.rand(ROWS, SEQ, generator=gen) < 0.3] = -100
        out.append({"tokens": tokens, "labels": labels})
    return out


def rows_of(batch: dict, rank: int, size: int) -> dict:
    per = ROWS // size
    return {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}


def optimizer(name: str) -> optim.Optimizer:
    """SGD with momentum by default: unlike Adam it is not invariant to the gradients' scale, so a
    missing or doubled reduction shows in the params. Adam divides by sqrt(v) + eps, which turns
    last-bit differences of near-zero gradients into visible ones: a small lr and eps=1e-6 keep
    them below 1e-5."""
    if SCENARIOS[name].get("opt") == "adamw":
        return optim.adamw(3e-4, eps=1e-6, weight_decay=0.01)
    return optim.sgd(0.5, momentum=0.9, weight_decay=0.01)


STEP_OPTIONS = dict(clip_norm=1.0)


def reference(name: str) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """One process: (losses, gradient norms, flat params after the steps)."""
    cfg, params, trainable = build(name)
    opt = optimizer(name)
    step = train.make_step(models.loss_fn(cfg, remat=SCENARIOS[name].get("remat", False)), opt,
                           trainable=trainable, **STEP_OPTIONS)
    state, losses, norms = train.init(params, opt, trainable=trainable), [], []
    for i in range(STEPS):
        state, metrics = step(state, batches(cfg, i))
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
    return losses, norms, tree.flatten(state.params)


def check_resume(out: Path, name: str, layout: object, step: object, state: train.TrainState,
                 batch: list[dict]) -> float:
    """Save this rank's local params and optimizer state, restore them into a freshly sharded
    state, and take one more step from both: the largest difference of the full params."""
    from safetensors.torch import load_file, save_file

    from purefine import shard

    files = {k: out / f"{name}.rank{layout.rank}.{k}.safetensors" for k in ("params", "opt")}
    save_file(shard.local_flat(state.params), files["params"])
    save_file(shard.local_flat(state.opt_state), files["opt"])
    cfg, params, trainable = build(name)
    fresh = train.init(layout.shard_params(cfg, params), optimizer(name), trainable=trainable, copy=False)
    resumed = fresh.replace(step=state.step, rng=state.rng,
                            params=shard.from_local_flat(fresh.params, load_file(files["params"])),
                            opt_state=shard.from_local_flat(fresh.opt_state, load_file(files["opt"])))
    a = layout.full_params_for_save(step(resumed, batch)[0].params)
    b = layout.full_params_for_save(step(state, batch)[0].params)
    if not layout.is_main:
        return 0.0
    return max(float((x - y).abs().max()) for x, y in zip(tree.flatten(a).values(), tree.flatten(b).values()))


def run_sharded(name: str, out: Path) -> tuple[list[float], object, dict]:
    """This rank's run of a scenario: (losses, full params on rank 0 else None, byte counts and
    gradient norms)."""
    from purefine import shard

    spec = SCENARIOS[name]
    layout = shard.layout(SimpleNamespace(**{"dp_replicate": 1, "tp": 1, "pp": 1, **spec["parallel"]}), "cpu")
    cfg, params, trainable = build(name)
    full_bytes = tree.nbytes(params)
    params = layout.shard_params(cfg, params)
    opt = optimizer(name)
    step = layout.make_step(cfg, opt, trainable=trainable, remat=spec.get("remat", False), **STEP_OPTIONS)
    state, losses, norms = train.init(params, opt, trainable=trainable, copy=False), [], []
    opt_full = sum(x.numel() * x.element_size() for _, x in tree.leaves_with_paths(state.opt_state))
    for i in range(STEPS):
        state, metrics = step(state, [rows_of(b, layout.dp_rank, layout.dp_size) for b in batches(cfg, i)])
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
    counts = {"params_local": shard.local_nbytes(state.params), "params_full": full_bytes,
              "opt_local": shard.local_nbytes(state.opt_state), "opt_full": opt_full, "grad_norms": norms}
    full = layout.full_params_for_save(state.params)
    if spec.get("resume"):
        batch = [rows_of(b, layout.dp_rank, layout.dp_size) for b in batches(cfg, STEPS)]
        counts["resume_diff"] = check_resume(out, name, layout, step, state, batch)
    return losses, full, counts


def save(out: Path, name: str, losses: list[float], params: object, info: dict) -> None:
    from safetensors.torch import save_file

    flat = {k: v.contiguous().clone() for k, v in tree.flatten(params).items()}
    if losses:
        flat["__losses__"] = torch.tensor(losses, dtype=torch.float64)
    save_file(flat, out / f"{name}.safetensors")
    (out / f"{name}.json").write_text(json.dumps(info))


def run_loads(out: Path, plain: str, quantized: str) -> None:
    """Sharded loading (dp_shard=2): which rows each rank read, and the full tensors it gives."""
    from purefine import checkpoint, shard
    from purefine.checkpoint import hf

    reads: list[list] = []
    original = hf.SafetensorsFile.read

    def logged(self, name, rows=None):
        t = original(self, name, rows)
        reads.append([name, list(self.shape(name)), None if rows is None else [rows.start, rows.stop]])
        return t

    hf.SafetensorsFile.read = logged
    layout = shard.layout(SimpleNamespace(dp_replicate=1, dp_shard=2, tp=1, pp=1), "cpu")
    for tag, path, quantize in (("load", plain, None), ("load_nf4", quantized, QUANTIZE)):
        reads.clear()
        cfg = checkpoint.read_config(path)[0]
        _, params = checkpoint.load_hf(path, reader=layout.checkpoint_reader(cfg, dtype=torch.float32, quantize=quantize))
        placements = {p: [str(pl) for pl in x.placements] for p, x in tree.leaves_with_paths(params)}
        full = layout.full_params_for_save(params)
        info = {"reads": reads, "placements": placements, "local_bytes": shard.local_nbytes(params)}
        (out / f"{tag}.rank{layout.rank}.json").write_text(json.dumps(info))
        if layout.is_main:
            save(out, tag, [], full, {})
    hf.SafetensorsFile.read = original


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    out = Path(argv[0])
    loads = argv[argv.index("--load") + 1:] if "--load" in argv else []
    names = [a for a in argv[1:len(argv) - len(loads) - (1 if loads else 0)]] or list(SCENARIOS)
    rank = int(os.environ.get("RANK", "0"))
    for name in names:
        try:
            losses, full, counts = run_sharded(name, out)
            if rank == 0:
                save(out, name, losses, full, counts)
        except Exception:  # recorded for the test to show; the other scenarios still run
            (out / f"{name}.rank{rank}.error").write_text(traceback.format_exc())
            raise
    if loads:
        run_loads(out, *loads)


if __name__ == "__main__":
    main(sys.argv[1:])
