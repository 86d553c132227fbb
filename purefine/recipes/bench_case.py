"""One measurement in a fresh process, so its peak resident memory is its own:

    python -m purefine.recipes.bench_case '{"side": "purefine", "case": "llama-tiny/lora/fp32", "base": DIR,
        "adapter": DIR, "steps": 5, "warmup": 2, "threads": 2, "allocator": "auto", "compile": false, "device": "cpu"}'

``side`` is ``purefine``, ``hf`` (transformers + peft, ``bench_hf``) or ``torchtune`` (``bench_torchtune``).
Prints one JSON line: ``bench_workload.child_result``'s record, or ``{"unavailable": why}`` when the
side cannot run here. ``run_purefine`` is purefine's side: the fixture loaded with
``checkpoint.load_hf`` (NF4 for QLoRA) and ``load_peft``, the step from ``train.make_step``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from purefine.recipes.bench_workload import RECIPE, Fixture, Unavailable, Workload, batches, child_result, parse, \
    resident_bytes, run_steps


def run_purefine(w: Workload, fixture: Fixture, steps: int, warmup: int, allocator: str = "auto",
                 compile: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Train ``warmup + steps`` steps of ``w`` through purefine on ``device`` (train's ``--allocator``
    policy, the loss compiled with ``compile``); returns the child record."""
    import purefine as pf
    from purefine.logging import resolve_allocator, set_allocator

    allocator = resolve_allocator(allocator, full=w.mode == "full")
    set_allocator(allocator)
    cfg = pf.checkpoint.read_config(fixture.base)[0]
    quantize = pf.models.quantize_pattern(cfg) if w.mode == "qlora" else None
    cfg, params = pf.checkpoint.load_hf(fixture.base, dtype=w.frozen_dtype, quantize=quantize, device=device)
    trainable = pf.train.all_floating
    if w.adapters:
        params = pf.checkpoint.load_peft(fixture.adapter, params)
        trainable = pf.lora.trainable
    weights = pf.tree.nbytes(params)
    opt = pf.optim.adamw(RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    loss_fn = pf.models.loss_fn(cfg, remat=w.remat)
    step = pf.train.make_step(torch.compile(loss_fn) if compile else loss_fn, opt, trainable=trainable,
                              compute_dtype=w.dtype if w.dtype != torch.float32 else None)
    state = pf.train.init(params, opt, trainable=trainable, copy=False)
    del params
    data = batches(w, cfg.vocab_size, warmup + steps, device)
    setup_rss = resident_bytes()

    def one(batch: dict[str, torch.Tensor]) -> float:
        nonlocal state
        state, metrics = step(state, batch)
        return metrics["loss"]

    losses, seconds = run_steps(one, data, warmup, device)
    result = child_result(f"purefine {pf.__version__}", losses, seconds, weights_bytes=weights, setup_rss_bytes=setup_rss)
    return {**result, "allocator": allocator}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """The measurement ``spec`` asks for (see the module doc), or {"unavailable": why}."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    w, fixture = parse(spec["case"]), Fixture.from_dict(spec)
    steps, warmup, device = int(spec["steps"]), int(spec["warmup"]), spec.get("device", "cpu")
    try:
        if spec["side"] == "purefine":
            return run_purefine(w, fixture, steps, warmup, spec.get("allocator", "auto"), bool(spec.get("compile")),
                                device)
        if spec["side"] == "hf":
            from purefine.recipes.bench_hf import run_hf

            return run_hf(w, fixture, steps, warmup, device)
        if spec["side"] == "torchtune":
            from purefine.recipes.bench_torchtune import run_torchtune

            if device != "cpu":
                raise Unavailable(f"the torchtune side runs on CPU only here (asked: {device})")
            return run_torchtune(w, fixture, steps, warmup)
    except Unavailable as e:
        return {"unavailable": str(e)}
    raise ValueError(f"bench_case: unknown side {spec['side']!r} (expected purefine, hf or torchtune)")


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
