"""The eval recipe (scripts/eval.py): run lm-eval tasks on a trained model and print lm-eval's table.

    python scripts/eval.py --run-dir outputs/demo --tasks purefine_mc
    python scripts/eval.py --checkpoint-dir checkpoints/llama2-7b --adapter-dir out/adapter \\
        --quantize --tasks hellaswag arc_easy --limit 200

Tasks are looked up first in purefine's bundled offline tasks (purefine/assets/eval/) and the
``--include-path`` directories, without indexing lm-eval's thousands of built-in tasks; only a name
found nowhere there loads lm-eval's own index (hub tasks, whose datasets are downloaded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from purefine import fsutil
from purefine.errors import ConfigError
from purefine.recipes.loading import (
    DType, ModelSource, check_source, compute_dtype, load_model, pick_device, require_tokenizer,
)


@dataclass(frozen=True)
class EvalConfig(ModelSource):
    """Evaluate a model with EleutherAI's lm-eval harness (needs: pip install 'purefine[eval]')."""

    tasks: tuple[str, ...] = ()
    """lm-eval task, group or tag names, space- or comma-separated (e.g. purefine_mc, hellaswag arc_easy)."""
    include_path: tuple[str, ...] = ()
    """Extra directories of task YAML files (besides purefine's bundled ones)."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt (default: each task's own)."""
    limit: float | None = None
    """Evaluate only this many documents per task (a fraction if < 1); for quick checks, not for reporting."""
    batch_size: int = 16
    """Sequences per forward pass."""
    max_length: int | None = None
    """Longest input in tokens (default: the model's max_position_embeddings)."""
    add_bos: bool | None = None
    """Start every input with BOS (default: as the tokenizer's own encoding does)."""
    dtype: DType = "auto"
    """Compute dtype: auto = bf16 on CUDA or for an NF4 base, else fp32."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    seed: int = 0
    """Seed of lm-eval's few-shot sampling and of any sampled generation."""
    output: str | None = None
    """Write lm-eval's results (and per-sample logs with --log-samples) to this JSON file."""
    log_samples: bool = False
    """Keep every request and response in --output."""


def task_names(cfg: EvalConfig) -> tuple[str, ...]:
    """--tasks split on commas too (lm-eval's own CLI takes ``a,b``)."""
    return tuple(t.strip() for item in cfg.tasks for t in item.split(",") if t.strip())


def check(cfg: EvalConfig) -> None:
    """Flag errors before any model is loaded (ConfigError naming the flag)."""
    check_source(cfg)
    if not task_names(cfg):
        raise ConfigError("--tasks: give at least one lm-eval task (offline: purefine_mc)")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch-size: expected a positive integer, found {cfg.batch_size}")
    if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot: expected >= 0, found {cfg.num_fewshot}")
    if cfg.limit is not None and cfg.limit <= 0:
        raise ConfigError(f"--limit: expected a positive number, found {cfg.limit}")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise ConfigError(f"--max-length: expected at least 2, found {cfg.max_length}")
    for path in cfg.include_path:
        if not Path(path).is_dir():
            raise ConfigError(f"--include-path {path}: directory not found")


def task_manager(tasks: tuple[str, ...], include_path: tuple[str, ...]) -> Any:
    """An lm-eval TaskManager that knows ``tasks``: the local directories alone when they suffice."""
    from lm_eval.tasks import TaskManager

    from purefine.evaluate import local_tasks_dir

    paths = [str(local_tasks_dir()), *include_path]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not missing_tasks(manager, tasks):
        return manager
    manager = TaskManager(include_path=paths, include_defaults=True)
    missing = missing_tasks(manager, tasks)
    if missing:
        local = ", ".join(sorted(TaskManager(include_path=paths, include_defaults=False).all_tasks))
        raise ConfigError(f"--tasks: unknown lm-eval task(s) {missing} (local tasks: {local}; "
                          "list all with: lm-eval ls tasks)")
    return manager


def missing_tasks(manager: Any, tasks: tuple[str, ...]) -> list[str]:
    """The names (or patterns) in ``tasks`` that match no task, group or tag of ``manager``."""
    return [t for t in tasks if not manager.match_tasks([t])]


def build_lm(cfg: EvalConfig) -> Any:
    """The PurefineLM of the model ``cfg`` names."""
    from purefine.evaluate import PurefineLM

    device = pick_device(cfg.device)
    dtype = compute_dtype(cfg.dtype, device, cfg.quantize)
    loaded = load_model(cfg, device=device, dtype=dtype)
    tokenizer = require_tokenizer(loaded)
    return PurefineLM(loaded.cfg, loaded.params, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                      add_bos=cfg.add_bos, dtype=dtype, name=str(loaded.tokenizer_path))


def results_table(results: dict) -> str:
    """lm-eval's markdown tables of the results (tasks, then groups when there are any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def _no_git_probe() -> None:
    """lm-eval records the git commit of the working directory by running ``git describe``, whose
    "fatal: not a git repository" reaches the terminal outside a checkout; the commit of the user's
    directory means nothing to these results, so the probe answers None."""
    try:
        from lm_eval.loggers import utils as lm_eval_env
    except ImportError:
        return
    lm_eval_env.get_git_commit_hash = lambda: None


def main(cfg: EvalConfig) -> dict:
    """Evaluate, print lm-eval's results table, write --output; returns lm-eval's results dict."""
    from purefine.evaluate import require_lm_eval

    check(cfg)
    require_lm_eval()
    import lm_eval

    _no_git_probe()
    tasks = task_names(cfg)
    manager = task_manager(tasks, cfg.include_path)  # unknown tasks fail before the model loads
    lm = build_lm(cfg)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=cfg.num_fewshot,
                                          limit=cfg.limit, task_manager=manager, log_samples=cfg.log_samples,
                                          random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                                          fewshot_random_seed=cfg.seed)
    except ConnectionError as e:
        raise ConfigError(f"--tasks {' '.join(tasks)}: could not download a task's dataset ({e}); "
                          "check the network (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) or use a local task") from None
    print(results_table(results))
    if cfg.output is not None:
        fsutil.atomic_write(cfg.output, json.dumps(results, indent=2, default=str))
        print(f"wrote {cfg.output}")
    return results
