"""Run under ``torchrun --nproc-per-node 2``: the parallel scenarios of tests/test_shard_parallel.py.

    torchrun --standalone --nproc-per-node 2 tests/dist/parallel_worker.py OUT_DIR [SCENARIO ...] [--load CKPT QCKPT]

Each scenario trains 3 steps (2 accumulated micro-batches each) of a tiny model under one layout
and rank 0 writes ``OUT_DIR/<scenario>.safetensors`` (the full params after the steps and the
losses) and ``OUT_DIR/<scenario>.json`` (byte counts, gradient norms). The test runs the same
steps in one process (``reference``) and compares. Resharding scenarios save a DCP checkpoint
under one layout after 2 steps and take the third step under another (``resume_parallel``), or
start from a one-process checkpoint the test wrote (``resume_from``). ``generate`` writes each
rank's generated tokens from FSDP-sharded params. Nothing here runs on import.
"""

from __future__ import annotations

import dataclasses
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
LLAMA_4 = dataclasses.replace(models.preset("llama-debug"), num_hidden_layers=4)  # 2 ranks x 2 virtual stages
PP = dict(dp_shard=1, pp=2, microbatches=2)
SCENARIOS: dict[str, dict] = {
    "fsdp": dict(parallel=dict(dp_shard=2), peft="none"),
    "fsdp_adamw": dict(parallel=dict(dp_shard=2), peft="none", opt="adamw"),
    "dp": dict(parallel=dict(dp_replicate=2, dp_shard=1), peft="none"),
    "tp": dict(parallel=dict(dp_shard=1, tp=2), peft="none"),
    "tp_lora": dict(parallel=dict(dp_shard=1, tp=2), peft="lora"),
    "pp": dict(parallel=PP | dict(pp_schedule="1f1b"), peft="none", resume=True),
    "pp_gpipe": dict(parallel=PP | dict(pp_schedule="gpipe"), peft="none"),
    "pp_tied_gpipe": dict(model="qwen2-debug", parallel=PP | dict(pp_schedule="gpipe"), peft="none", resume=True),
    "pp_tied_1f1b": dict(model="qwen2-debug", parallel=PP | dict(pp_schedule="1f1b"), peft="none"),
    "pp_gpt2_1f1b": dict(model="gpt2-debug", parallel=PP | dict(pp_schedule="1f1b"), peft="none"),
    "pp_interleaved": dict(model=LLAMA_4, parallel=PP | dict(pp_schedule="interleaved"), peft="lora"),
    "pp_lora_remat": dict(parallel=PP, peft="lora", remat=True),
    "fsdp_lora": dict(parallel=dict(dp_shard=2), peft="lora", resume=True),
    "fsdp_qlora": dict(parallel=dict(dp_shard=2), peft="qlora"),
    "tp_qlora": dict(parallel=dict(dp_shard=1, tp=2), peft="qlora"),
    # DCP checkpoints resharded: saved under one layout after 2 steps, the third step under another
    "dcp_fsdp_to_tp": dict(parallel=dict(dp_shard=2), resume_parallel=dict(dp_shard=1, tp=2), peft="lora"),
    "dcp_tp_to_dp": dict(parallel=dict(dp_shard=1, tp=2), resume_parallel=dict(dp_replicate=2, dp_shard=1),
                         peft="lora", opt="adamw"),
    "dcp_one_to_fsdp": dict(parallel=dict(dp_shard=2), resume_from="one-ckpt", peft="lora"),
    "generate": dict(parallel=dict(dp_shard=2), peft="lora"),
    # 4 processes: the dimensions composed
    "hsdp": dict(parallel=dict(dp_replicate=2, dp_shard=2), peft="none"),
    "fsdp_tp": dict(parallel=dict(dp_shard=2, tp=2), peft="none"),
    "fsdp_tp_lora": dict(parallel=dict(dp_shard=2, tp=2), peft="lora"),
    "pp_fsdp": dict(parallel=dict(dp_shard=2, pp=2, microbatches=2, pp_schedule="gpipe"), peft="lora", resume=True),
    "pp_fsdp_1f1b": dict(parallel=dict(dp_shard=2, pp=2, microbatches=2, pp_schedule="1f1b"), peft="none"),
    "pp_fsdp_tied_gpipe": dict(model="qwen2-debug", parallel=dict(dp_shard=2, pp=2, microbatches=2, pp_schedule="gpipe"),
                               peft="none"),
    "pp_fsdp_tied_1f1b": dict(model="qwen2-debug", parallel=dict(dp_shard=2, pp=2, microbatches=2, pp_schedule="1f1b"),
                              peft="none", resume=True),
    "pp_tp": dict(parallel=dict(dp_shard=1, tp=2, pp=2, microbatches=2), peft="none"),
    "fsdp_tp_qlora": dict(parallel=dict(dp_shard=2, tp=2), peft="qlora"),
}
PROMPTS = [[1, 5, 9, 200], [1, 7], [1, 300, 301, 302, 303, 304]]
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9, seed=3)


def model_config(spec: dict) -> object:
    """A scenario's model config (llama-debug unless it names a preset or gives a config)."""
    if spec["peft"] == "qlora":
        return QLORA_CFG
    model = spec.get("model", "llama-debug")
    return models.preset(model) if isinstance(model, str) else model


def build(name: str) -> tuple[object, dict, train.Filter]:
    """(model config, full params, trainable filter) of a scenario: the same on every process."""
    spec = SCENARIOS[name]
    cfg = model_config(spec)
    hook = nf4.quantize_hook(QUANTIZE) if spec["peft"] == "qlora" else None
    params = models.init(cfg, seed=0, hook=hook)
    if spec["peft"] == "none":
        return cfg, params, train.all_floating
    return cfg, lora.apply(params, rank=4, alpha=8, where="all-linear", seed=0), lora.trainable


def batches(cfg: object, step: int) -> list[dict]:
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


def reference(name: str, steps: int = STEPS) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """One process: (losses, gradient norms, flat params after ``steps`` steps)."""
    state, losses, norms = reference_state(name, steps)
    return losses, norms, tree.flatten(state.params)


def reference_state(name: str, steps: int) -> tuple[train.TrainState, list[float], list[float]]:
    """One process: (the TrainState after ``steps`` steps, losses, gradient norms)."""
    cfg, params, trainable = build(name)
    state = train.init(params, optimizer(name), trainable=trainable)
    return continue_reference(name, state, 0, steps)


def continue_reference(name: str, state: train.TrainState, first: int, last: int) -> tuple[train.TrainState, list, list]:
    """Steps ``first`` .. ``last`` - 1 in one process from ``state``: (state, losses, gradient norms)."""
    cfg, _, trainable = build(name)
    step = train.make_step(models.loss_fn(cfg, remat=SCENARIOS[name].get("remat", False)), optimizer(name),
                           trainable=trainable, **STEP_OPTIONS)
    losses, norms = [], []
    for i in range(first, last):
        state, metrics = step(state, batches(cfg, i))
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
    return state, losses, norms


def make_layout(parallel: dict) -> object:
    from purefine import shard

    return shard.layout(SimpleNamespace(**{"dp_replicate": 1, "tp": 1, "pp": 1, **parallel}), "cpu")


def sharded_run(name: str, parallel: dict) -> tuple[object, object, train.TrainState, train.Filter]:
    """(layout, step, fresh sharded state, trainable filter) of a scenario under ``parallel``."""
    spec = SCENARIOS[name]
    layout = make_layout(parallel)
    cfg, params, trainable = build(name)
    params = layout.shard_params(cfg, params)
    step = layout.make_step(cfg, optimizer(name), trainable=trainable, remat=spec.get("remat", False), **STEP_OPTIONS)
    return layout, step, train.init(params, optimizer(name), trainable=trainable, copy=False), trainable


def take_steps(layout: object, step: object, state: train.TrainState, cfg: object, first: int, last: int,
               losses: list, norms: list) -> train.TrainState:
    for i in range(first, last):
        state, metrics = step(state, [rows_of(b, layout.dp_rank, layout.dp_size) for b in batches(cfg, i)])
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
    return state


def check_resume(out: Path, name: str, layout: object, step: object, state: train.TrainState,
                 batch: list[dict]) -> float:
    """Save a DCP checkpoint, load it into a freshly sharded state under the same layout, and take
    one more step from both: the largest difference of the full params."""
    from purefine.checkpoint import state as state_io

    cfg, params, trainable = build(name)
    fresh = train.init(layout.shard_params(cfg, params), optimizer(name), trainable=trainable, copy=False)
    path = state_io.save(out / f"{name}-same", state, trainable)
    resumed = state_io.load(path, fresh, trainable)
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
    cfg, params, _ = build(name)
    layout, step, state, trainable = sharded_run(name, spec["parallel"])
    opt_full = sum(x.numel() * x.element_size() for _, x in tree.leaves_with_paths(state.opt_state))
    losses, norms = [], []
    state = take_steps(layout, step, state, cfg, 0, STEPS, losses, norms)
    counts = {"params_local": shard.local_nbytes(state.params), "params_full": tree.nbytes(params),
              "opt_local": shard.local_nbytes(state.opt_state), "opt_full": opt_full, "grad_norms": norms}
    full = layout.full_params_for_save(state.params)
    counts["eval"] = evaluate(layout, cfg, state.params)
    if spec.get("resume"):
        batch = [rows_of(b, layout.dp_rank, layout.dp_size) for b in batches(cfg, STEPS)]
        counts["resume_diff"] = check_resume(out, name, layout, step, state, batch)
    return losses, full, counts


def evaluate(layout: object, cfg: object, params: object) -> list[float]:
    """[loss sum, labelled tokens] of the held-out batch through ``layout.loss_fn`` (each
    data-parallel rank its rows, the sums added; under pipelines, the stages' forward)."""
    loss_fn = layout.loss_fn(cfg)
    with torch.no_grad():
        loss_sum, count = loss_fn(params, rows_of(eval_batch(cfg), layout.dp_rank, layout.dp_size))[:2]
    return layout.sum_over_dp(torch.stack([loss_sum.double(), count.double()])).tolist()


def eval_batch(cfg: object) -> dict:
    """A held-out batch (ROWS x SEQ) unlike the training ones."""
    return batches(cfg, 1000)[0]


def run_resharded(name: str, out: Path) -> tuple[list[float], object, dict]:
    """2 steps under ``parallel`` (or a one-process checkpoint the test wrote), a DCP checkpoint,
    the third step under ``resume_parallel`` from it."""
    from purefine.checkpoint import state as state_io

    spec = SCENARIOS[name]
    cfg = model_config(spec)
    losses, norms = [], []
    path = out / spec["resume_from"] / "step-00000002" if "resume_from" in spec else None
    if path is None:
        layout, step, state, trainable = sharded_run(name, spec["parallel"])
        state = take_steps(layout, step, state, cfg, 0, STEPS - 1, losses, norms)
        path = state_io.save(out / f"{name}-ckpt", state, trainable)
    layout, step, fresh, trainable = sharded_run(name, spec.get("resume_parallel", spec["parallel"]))
    state = take_steps(layout, step, state_io.load(path, fresh, trainable), cfg, STEPS - 1, STEPS, losses, norms)
    return losses, layout.full_params_for_save(state.params), {"grad_norms": norms}


def run_generate(name: str, out: Path) -> None:
    """Greedy and sampled generation from FSDP-sharded params, through the gather hook: each rank
    writes its tokens."""
    from purefine import generate

    layout = make_layout(SCENARIOS[name]["parallel"])
    cfg, params, _ = build(name)
    params = layout.shard_params(cfg, params)
    got = {"greedy": generate.generate(cfg, params, PROMPTS, max_new_tokens=6, gather=layout.gather),
           "sampled": generate.generate(cfg, params, PROMPTS, max_new_tokens=6, gather=layout.gather, **SAMPLING),
           "sharded": all(type(x).__name__ == "DTensor" for _, x in tree.leaves_with_paths(params))}
    (out / f"{name}.rank{layout.rank}.json").write_text(json.dumps(got))


def save(out: Path, name: str, losses: list[float], params: object, info: dict) -> None:
    from safetensors.torch import save_file

    flat = {k: v.contiguous().clone() for k, v in tree.flatten(params).items()}
    if losses:
        flat["__losses__"] = torch.tensor(losses, dtype=torch.float64)
    save_file(flat, out / f"{name}.safetensors")
    (out / f"{name}.json").write_text(json.dumps(info))


def run_loads(out: Path, plain: str, quantized: str) -> None:
    """Sharded loading (dp_shard=2; NF4 also tp=2): which rows each rank read, and the full tensors it gives."""
    from purefine import checkpoint, shard
    from purefine.checkpoint import hf

    reads: list[list] = []
    original = hf.SafetensorsFile.read

    def logged(self, name, rows=None):
        t = original(self, name, rows)
        reads.append([name, list(self.shape(name)), None if rows is None else [rows.start, rows.stop]])
        return t

    hf.SafetensorsFile.read = logged
    fsdp, tp = dict(dp_shard=2), dict(dp_shard=1, tp=2)
    for tag, path, quantize, parallel in (("load", plain, None, fsdp), ("load_nf4", quantized, QUANTIZE, fsdp),
                                          ("load_nf4_tp", quantized, QUANTIZE, tp)):
        layout = make_layout(parallel)
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
            if name == "generate":
                run_generate(name, out)
                continue
            run = run_resharded if {"resume_parallel", "resume_from"} & set(SCENARIOS[name]) else run_sharded
            losses, full, counts = run(name, out)
            if rank == 0:
                save(out, name, losses, full, counts)
        except Exception:  # recorded for the test to show; the other scenarios still run
            (out / f"{name}.rank{rank}.error").write_text(traceback.format_exc())
            raise
    if loads:
        run_loads(out, *loads)


if __name__ == "__main__":
    main(sys.argv[1:])
