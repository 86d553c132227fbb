"""The train recipe: ``main(cfg)`` composes model, task, PEFT transform, optimizer and the pure step,
hands them to the one loop, and writes what users need.

Outputs in ``cfg.output_dir``: ``adapter/`` (HF PEFT format) for LoRA / QLoRA / DoRA, or
``model/`` (an HF checkpoint) for full fine-tuning; ``merged/`` with ``--save-merged``;
``config.yaml`` (the resolved config); ``metrics.jsonl``; ``loss.png``; ``summary.json``;
``checkpoints/step-N/`` resumable states with ``--save-every``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from purefine import checkpoint, fsutil, lora, shard, train
from purefine.config import TrainConfig, to_yaml, uses_remat, validate
from purefine.logging import resolve_allocator, set_allocator
from purefine.recipes import loop, setup, tasks


def save_outputs(out: Path, cfg: TrainConfig, model_cfg: Any, params: dict, tok_path: Path) -> dict[str, str]:
    """Write the adapter (or the full model), the merged model if asked, and the tokenizer files."""
    tok_files = setup.tokenizer_files(tok_path)
    written = {}
    if cfg.peft == "none":
        written["model"] = str(checkpoint.save_hf(out / "model", model_cfg, params, extra_files=tok_files))
    else:
        written["adapter"] = str(checkpoint.save_peft(out / "adapter", model_cfg, params,
                                                      base_model=setup.base_model_name(cfg)))
    if cfg.save_merged and cfg.peft != "none":
        merged = lora.merge(params)
        dtype = torch.bfloat16 if cfg.peft == "qlora" else None
        written["merged"] = str(checkpoint.save_hf(out / "merged", model_cfg, merged, dtype=dtype, extra_files=tok_files))
    return written


def main(cfg: TrainConfig) -> dict:
    """Run the fine-tune described by ``cfg``; returns a summary (losses, throughput, outputs)."""
    cfg = validate(cfg)
    set_allocator(resolve_allocator(cfg.allocator, full=cfg.peft == "none"))
    device = setup.pick_device(cfg.device)
    setup.check_compile(cfg, device)
    layout = shard.layout(cfg.parallel, device)  # torchrun: process group and mesh
    if cfg.output_dir is None:  # rank 0 names the new run's directory, every rank uses it
        cfg = dataclasses.replace(cfg, output_dir=setup.same_on_every_rank(setup.default_output_dir(cfg)))
    out = setup.claim_output_dir(cfg) if layout.is_main else Path(cfg.output_dir)
    if layout.is_main:
        fsutil.atomic_write(out / "config.yaml", to_yaml(cfg))
        if cfg.init == "random":
            print(f"note: --init random: {cfg.model} starts from random weights (seed {cfg.seed}), not a pretrained model")
    device, prec = layout.device, setup.precision(cfg, layout.device)
    dtype = prec.compute
    if layout.is_main and cfg.dtype == "bf16" and dtype != torch.bfloat16:
        print(f"notice: {prec.why}")
    torch.manual_seed(cfg.seed)
    model_cfg, params = setup.load_model(cfg, device, layout)
    task = tasks.build(cfg, model_cfg, params, layout)
    del params
    params, trainable = setup.apply_peft(cfg, task.model_cfg, task.params, full=task.full, full_name=task.full_name)
    params = layout.shard_params(task.model_cfg, params)
    total_steps, decided_by = loop.count_steps(cfg, task, world_size=layout.dp_size)
    opt, schedule = setup.make_optimizer(cfg.optim, total_steps)
    step_fn = layout.make_step(task.model_cfg, opt, trainable=trainable, remat=uses_remat(cfg),
                               clip_norm=cfg.optim.clip_norm or None, compute_dtype=prec.step_dtype,
                               skip_nonfinite=cfg.nan_policy == "skip", loss=task.loss, count=task.count,
                               compile=cfg.compile)
    state = train.init(params, opt, trainable=trainable, seed=cfg.seed, copy=False)
    del params
    summary = loop.run(cfg, task, layout, state, step_fn, schedule, total_steps, out, device, dtype, trainable,
                       decided_by, prec.why)
    full_params = layout.full_params_for_save(summary.pop("state").params)  # every rank takes part
    if not layout.is_main:
        return summary
    summary["outputs"] = save_outputs(out, cfg, task.model_cfg, full_params, task.tokenizer_path)
    fsutil.atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    print(f"saved {', '.join(f'{k}: {v}' for k, v in summary['outputs'].items())}")
    return summary
