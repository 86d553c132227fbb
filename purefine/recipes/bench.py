"""Benchmarks: purefine's train step side by side with HF PEFT (and torchtune), tokens/s, MFU, peak memory.

    purefine bench --against hf                          # every workload, purefine vs transformers + peft
    purefine bench --against hf torchtune --json bench.json
    purefine bench --against hf --cases llama-tiny/lora/fp32 --steps 1 --warmup 1 --rounds 1   # smoke
    purefine bench                                       # purefine alone on the train cases
    purefine bench --suite parallel                      # 2 processes under torchrun against 1
    purefine bench --suite all                           # + data pipeline, generation and parallel
    purefine bench --against hf --device cuda            # on a GPU: ~1B Llama LoRA / QLoRA / full bf16 and 134M

Every workload (``bench_workload``) trains on one fixture — a random Llama written once with
``checkpoint.save_hf`` and its initial adapter with ``save_peft`` — that every side loads, on the same
seeded batches, with the same recipe. Each measurement is a fresh child process
(``python -m purefine.recipes.bench_case``), so its peak RSS is its own; the sides alternate within
each round (purefine, HF, purefine, HF, ...) so drift hits both. ``bench_report`` turns the children's
records into tokens/s (one definition with training: every position computed, ``loop.batch_tokens``),
MFU against the matmul peak measured here (``hardware.matmul_peak``, probed before and after the cases,
the larger kept), ratios and the Markdown table, printed with the machine (``hardware.machine``) beside
it; ``--json PATH`` writes the whole report.
``--device cuda`` (``auto`` picks it when torch sees a GPU) runs every side on the GPU, compares peak
GPU memory (``torch.cuda.max_memory_allocated``) instead of RSS, and measures the peaks on the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from purefine.errors import ConfigError
from purefine.recipes.bench_workload import RECIPE, Fixture, Workload, batches, parse

TRAIN_CASES = (
    "llama-tiny/full/fp32", "llama-tiny/lora/fp32",
    "llama-134m/full/fp32", "llama-134m/lora/fp32", "llama-134m/lora/fp32/remat", "llama-134m/lora/bf16",
)
COMPARE_CASES = tuple(f"{preset}/{w}" for preset in ("llama-tiny", "llama-134m")
                      for w in ("lora/fp32", "lora/bf16", "qlora/fp32", "full/bf16"))
# On a GPU: the ~1B model of issue 15's item 6 (Llama-3.2-1B's shape, random weights) and the 134M one.
GPU_CASES = ("llama-134m/lora/bf16", "llama3.2-1b/lora/bf16", "llama3.2-1b/qlora/bf16", "llama3.2-1b/full/bf16")
EXTRAS = {"hf": ("transformers", "peft"), "torchtune": ("torchtune",)}
ERR_EXTRA = "--against hf needs {} (not installed): pip install 'purefine[bench]'"


@dataclass(frozen=True)
class BenchConfig:
    """What to measure."""

    suite: Literal["train", "parallel", "all"] = "train"
    """train: the train-step cases; parallel: 2 processes (torchrun, gloo) against 1; all: train, parallel, data pipeline and generation."""
    against: tuple[Literal["hf", "torchtune"], ...] = ()
    """Peers to run the same workloads through: hf (transformers + peft, the bench extra), torchtune (when installed)."""
    cases: tuple[str, ...] = ()
    """Cases preset/mode/dtype[/remat]: mode full, lora or qlora (NF4 base), dtype fp32 or bf16. Default: LoRA fp32
    and bf16, QLoRA and full bf16 at llama-tiny and llama-134m with --against, else the train cases; on CUDA:
    134M LoRA bf16 and llama3.2-1b LoRA, QLoRA and full in bf16."""
    device: str = "auto"
    """Where every side runs: cpu, cuda (or cuda:N), or auto (cuda when torch sees a GPU, else cpu)."""
    steps: int = 5
    """Timed steps per run (after the warm-up steps)."""
    warmup: int = 2
    """Untimed steps first in each run."""
    rounds: int = 2
    """Runs per side and case, alternating between the sides; tokens/s is the median over rounds."""
    threads: int = 0
    """torch threads in every run (0: torch's default)."""
    json: str | None = None
    """Write the whole report (machine, settings, every run) to this JSON file."""
    allocator: Literal["auto", "fast", "reuse", "lean"] = "auto"
    """purefine's allocator policy, as train's --allocator (auto: reuse for full fine-tuning, else fast;
    fast: glibc's defaults, as the peers run; reuse: the heap keeps freed memory below 1 GiB for the
    next step; lean: mmap from 1 MiB, memory back to the OS at once)."""
    compile: bool = False
    """Run purefine's loss through torch.compile (the warm-up steps absorb the compile time)."""


def resolve_device(name: str) -> str:
    """``--device`` as torch names it: auto -> cuda when available, else cpu; a device torch cannot use
    here is a ConfigError naming the flag."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}, "
                          f"CUDA {torch.version.cuda or 'none: a CPU-only build'})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return str(device)


def check(cfg: BenchConfig) -> tuple[list[Workload], list[str], list[str]]:
    """(workloads, sides, notes): the flags validated, a missing bench extra as one ConfigError, a peer
    that is not installed left out with a note."""
    for flag, value, least in (("--steps", cfg.steps, 1), ("--warmup", cfg.warmup, 0), ("--rounds", cfg.rounds, 1)):
        if value < least:
            raise ConfigError(f"{flag}: expected an integer >= {least}, found {value}")
    import purefine as pf

    default = GPU_CASES if resolve_device(cfg.device).startswith("cuda") else \
        (COMPARE_CASES if cfg.against else TRAIN_CASES)
    workloads = [parse(c) for c in (cfg.cases or default)]
    for w in workloads:
        try:
            pf.models.preset(w.preset)  # an unknown preset fails here, before any run
        except ConfigError as e:
            raise ConfigError(f"--cases {w.case!r}: {e}") from None
    sides, notes = ["purefine"], []
    for peer in dict.fromkeys(cfg.against):
        missing = [m for m in EXTRAS[peer] if importlib.util.find_spec(m) is None]
        if missing and peer == "hf":
            raise ConfigError(ERR_EXTRA.format(" and ".join(missing)))
        if missing:
            notes.append("torchtune is not installed (pip install torchtune): its runs are skipped")
            continue
        sides.append(peer)
    return workloads, sides, notes


def write_fixture(root: Path, w: Workload) -> Fixture:
    """The checkpoint ``w`` trains from, written under ``root`` once per preset: random weights (seed 0) as an
    HF directory (for QLoRA, the weights NF4 holds: quantized and dequantized, so every side starts from
    the same values) and the initial LoRA adapter of RECIPE as a PEFT directory."""
    import purefine as pf

    base = root / (w.preset + ("-nf4" if w.mode == "qlora" else ""))
    adapter = root / f"{w.preset}-adapter"
    if base.exists() and adapter.exists():
        return Fixture(base, adapter)
    cfg = pf.models.preset(w.preset)
    params = pf.models.init(cfg, seed=0)
    if not adapter.exists():
        with_lora = pf.lora.apply(params, rank=RECIPE["lora_rank"], alpha=RECIPE["lora_alpha"],
                                  where=list(RECIPE["lora_targets"]), seed=0)
        pf.checkpoint.save_peft(adapter, cfg, with_lora)
    if not base.exists():
        if w.mode == "qlora":
            params = pf.nf4.quantize(params, where=pf.models.quantize_pattern(cfg))
        pf.checkpoint.save_hf(base, cfg, params)  # NF4 leaves are written dequantized
    return Fixture(base, adapter)


def measure(side: str, w: Workload, fixture: Fixture, cfg: BenchConfig) -> dict[str, Any]:
    """One run of ``w`` through ``side`` in a fresh process, on ``cfg.device`` as ``resolve_device`` names it:
    its record, or {"error": last stderr line}."""
    spec = {"side": side, "case": w.case, **fixture.to_dict(), "steps": cfg.steps, "warmup": cfg.warmup,
            "threads": cfg.threads, "allocator": cfg.allocator, "compile": cfg.compile, "device": cfg.device}
    out = subprocess.run([sys.executable, "-m", "purefine.recipes.bench_case", json.dumps(spec)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_case(w: Workload, sides: list[str], fixture: Fixture, cfg: BenchConfig, peak_gflops: dict,
             memory: str = "peak_rss_bytes") -> dict[str, Any]:
    """Every side's runs of ``w`` (alternating, ``cfg.rounds`` each) summarized and compared."""
    import purefine as pf
    from purefine.recipes import bench_report as report
    from purefine.recipes.loop import batch_tokens, trained_tokens

    model_cfg = pf.models.preset(w.preset)
    batch = batches(w, model_cfg.vocab_size, 1)[0]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(cfg.rounds):
        for side in sides:
            runs[side].append(measure(side, w, fixture, cfg))
            last = runs[side][-1]
            what = f"{batch_tokens(batch) / statistics.median(last['step_seconds']):,.0f} tok/s" \
                if "step_seconds" in last else (last.get("unavailable") or last.get("error"))
            print(f"bench: {w.case} {side} round {r + 1}/{cfg.rounds}: {what}", file=sys.stderr, flush=True)
    flops = report.flops_per_token(model_cfg, w.seq_len, frozen=w.adapters)
    peak = peak_gflops[w.dtype_name] * 1e9
    sides_out = {side: report.side_summary(rs, tokens=batch_tokens(batch), trained=trained_tokens(batch), flops=flops,
                                           peak=peak) for side, rs in runs.items()}
    return {"case": w.case, "params": model_cfg.num_params, "batch": [w.batch_size, w.seq_len],
            "flops_per_token": flops, "sides": sides_out, "compare": report.compare(sides_out, memory)}


def suites(cfg: BenchConfig) -> dict[str, Any]:
    """The parallel, data pipeline and generation results the suite asks for."""
    out: dict[str, Any] = {}
    if cfg.suite == "all":
        from purefine.data.bench import bench_pipeline
        from purefine.generate import bench_generate

        out["data"] = bench_pipeline()
        out["generate"] = [bench_generate("llama-tiny"), bench_generate("llama-134m")]
    if cfg.suite in ("parallel", "all"):
        from purefine.shard.bench import BenchArgs, compare

        out["parallel"] = compare(BenchArgs(nproc=2))
    return out


def main(cfg: BenchConfig) -> dict:
    """Run the benchmark, print the table (and the suites' JSON), write ``--json``; returns the report."""
    from purefine import fsutil, hardware
    from purefine.recipes.bench_report import markdown, memory_key, settle_peaks

    workloads, sides, notes = check(cfg)
    cfg = replace(cfg, device=resolve_device(cfg.device))  # what every run and the report use
    machine = hardware.machine(cfg.threads, device=cfg.device)
    report: dict[str, Any] = {"machine": machine, "sides": sides, "settings": asdict(cfg) | {"recipe": RECIPE},
                              "notes": notes, "cases": []}
    if cfg.suite != "parallel":
        with tempfile.TemporaryDirectory(prefix="purefine-bench-") as tmp:
            for w in workloads:
                fixture = write_fixture(Path(tmp), w)
                report["cases"].append(run_case(w, sides, fixture, cfg, machine["peak_gflops"],
                                                memory_key(machine["device"])))
        settle_peaks(report, hardware.machine(cfg.threads, device=cfg.device)["peak_gflops"])  # probed again
        print(markdown(report), flush=True)
    else:
        print(f"Machine: {hardware.describe(machine)}")
    extra = suites(cfg)
    if extra:
        report |= extra
        print(json.dumps(extra, indent=2), flush=True)
    if cfg.json:
        fsutil.atomic_write(cfg.json, json.dumps(report, indent=2, default=str))
    return report
