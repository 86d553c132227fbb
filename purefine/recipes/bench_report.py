"""From the children's records to the numbers and the table of a benchmark.

- ``flops_per_token(cfg, seq_len, frozen)``: PaLM's accounting of a training step's FLOPs per position.
- ``side_summary(...)``: one library's runs of a case -> tokens/s (every position computed, B x T per
  step, ``loop.batch_tokens``), trained tokens/s (``loop.trained_tokens``), seconds per step (the
  median over runs of each run's median timed step), MFU, peak RSS and, on CUDA, peak GPU memory
  (each the largest over runs), the first and final loss.
- ``compare(case, memory)``: purefine's ratios to its peers: tokens/s over the faster peer's, peak memory
  (RSS on CPU, GPU memory on CUDA) over the leaner peer's, and the loss differences on the same
  batches (first step, final step).
- ``markdown(report)``: the table, then the machine line, the settings and the notes (n/a, errors).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

from purefine.hardware import describe
from purefine.recipes.bench_workload import parse

NAMES = {"purefine": "purefine", "hf": "HF PEFT", "torchtune": "torchtune"}
MB = 1e6


def flops_per_token(cfg: Any, seq_len: int, frozen: bool) -> float:
    """Training FLOPs per position: (6 or 4)·N_matmul + 12·L·T·d (attention scores and values). 6N when
    every weight trains (forward, input and weight gradients), 4N when the base is frozen (no weight
    gradients); N counts the matmul weights (the output head included, the embedding lookup not)."""
    import purefine as pf

    shapes = pf.models.param_shapes(cfg)
    n_matmul = sum(torch.Size(s).numel() for name, s in shapes.items() if len(s) == 2 and "embed_tokens" not in name)
    if cfg.tie_word_embeddings:
        n_matmul += cfg.vocab_size * cfg.hidden_size
    attn = 12 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim
    return (4 if frozen else 6) * n_matmul + attn


def side_summary(runs: list[dict[str, Any]], *, tokens: int, trained: int, flops: float, peak: float) -> dict[str, Any]:
    """One library's ``runs`` (child records) of a case, with ``tokens`` / ``trained`` positions per step,
    ``flops`` per position and the matmul ``peak`` (FLOP/s) of the case's dtype. A side with no
    successful run is {"unavailable": why} or {"error": last stderr line}."""
    done = [r for r in runs if "losses" in r]
    if not done:
        first = runs[0] if runs else {"error": "no run"}
        return {k: first[k] for k in ("unavailable", "error") if k in first} | {"runs": runs}
    seconds = statistics.median(statistics.median(r["step_seconds"]) for r in done)
    tokens_per_s = tokens / seconds
    out = {"library": done[0]["library"], "seconds_per_step": round(seconds, 5),
           "tokens_per_s": round(tokens_per_s, 1), "trained_tokens_per_s": round(trained / seconds, 1),
           "mfu": round(flops * tokens_per_s / peak, 4), "peak_rss_bytes": max(r["peak_rss_bytes"] for r in done),
           "setup_rss_bytes": max(r["setup_rss_bytes"] for r in done), "weights_bytes": done[0]["weights_bytes"],
           "loss_first": done[0]["losses"][0], "loss_final": done[0]["losses"][-1], "runs": runs}
    if all("peak_device_bytes" in r for r in done):
        out["peak_device_bytes"] = max(r["peak_device_bytes"] for r in done)
    return out


def settle_peaks(report: dict[str, Any], later: dict[str, float]) -> None:
    """Keep the larger of the machine's matmul peaks probed before the cases and ``later`` ({dtype name:
    GFLOP/s}, probed after them), in place, and rescale every side's MFU to it: a probe that fell in a
    slow stretch of a shared machine would otherwise read low and put MFU above 100%. Both readings
    stay in ``machine["peak_probes_gflops"]``."""
    machine = report["machine"]
    before = dict(machine["peak_gflops"])
    machine["peak_probes_gflops"] = [before, dict(later)]
    machine["peak_gflops"] = {k: max(v, later.get(k, 0.0)) for k, v in before.items()}
    for case in report["cases"]:
        dtype = parse(case["case"]).dtype_name
        scale = before[dtype] / machine["peak_gflops"][dtype]
        for side in case["sides"].values():
            if "mfu" in side:
                side["mfu"] = round(side["mfu"] * scale, 4)


def memory_key(device: str) -> str:
    """The peak memory a case is compared on: GPU memory on CUDA, the process's RSS elsewhere."""
    return "peak_device_bytes" if device == "cuda" else "peak_rss_bytes"


def compare(sides: dict[str, dict[str, Any]], memory: str = "peak_rss_bytes") -> dict[str, Any]:
    """purefine's ratios to the peers that ran: {"tokens_per_s": pf / fastest peer, "memory": the field
    compared (``memory_key``), "peak_memory": pf / leanest peer on it, "loss_diff": {peer: {"first": |Δ|,
    "final": |Δ|}}} (None where a side did not run or did not report that memory)."""
    pf = sides.get("purefine", {})
    peers = {k: v for k, v in sides.items() if k != "purefine" and "tokens_per_s" in v}
    if "tokens_per_s" not in pf or not peers:
        return {"tokens_per_s": None, "memory": memory, "peak_memory": None, "loss_diff": {}}
    fastest = max(v["tokens_per_s"] for v in peers.values())
    known = [v[memory] for v in peers.values() if memory in v]
    ratio = round(pf[memory] / min(known), 3) if known and memory in pf else None
    diff = {k: {"first": abs(pf["loss_first"] - v["loss_first"]), "final": abs(pf["loss_final"] - v["loss_final"])}
            for k, v in peers.items()}
    return {"tokens_per_s": round(pf["tokens_per_s"] / fastest, 3), "memory": memory, "peak_memory": ratio,
            "loss_diff": diff}


def _cell(s: dict[str, Any], memory: str) -> str:
    if "tokens_per_s" in s:
        return f"{s['tokens_per_s']:,.0f} ({s[memory] / MB:,.0f})" if memory in s else f"{s['tokens_per_s']:,.0f}"
    return "n/a" if "unavailable" in s else "failed"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _row(case: dict[str, Any], sides: list[str], memory: str) -> str:
    s, c = case["sides"], case["compare"]
    label = f"{case['case']} ({case['batch'][0]}×{case['batch'][1]})"
    cells = [label, *(_cell(s[k], memory) for k in sides)]
    if len(sides) == 1:
        pf = s["purefine"]
        extra = [f"{pf['seconds_per_step']:.3f}", f"{pf['mfu']:.1%}", f"{pf['loss_final']:.4f}"] \
            if "tokens_per_s" in pf else ["—"] * 3
        return "| " + " | ".join(cells + extra) + " |"
    mfu = " / ".join(f"{s[k]['mfu']:.1%}" if "mfu" in s[k] else "—" for k in sides)
    diffs = " · ".join(f"{d['first']:.1e} / {d['final']:.1e}" for d in c["loss_diff"].values()) or "—"
    return "| " + " | ".join(cells + [_ratio(c["tokens_per_s"]), _ratio(c["peak_memory"]), mfu, diffs]) + " |"


def header(sides: list[str], memory: str = "peak_rss_bytes") -> list[str]:
    """The table's header and rule lines for ``sides`` (purefine first), memory as ``memory`` names it."""
    what = "GPU" if memory == "peak_device_bytes" else "RSS"
    cols = ["workload", *(f"{NAMES[k]} tok/s (peak {what} MB)" for k in sides)]
    if len(sides) == 1:
        cols += ["s/step", "MFU", "final loss"]
    else:
        peers = " / ".join(NAMES[k] for k in sides)
        cols += ["ratio tokens/s", f"ratio {what}", f"MFU ({peers})", "loss Δ first / final"]
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def notes(report: dict[str, Any]) -> list[str]:
    """Why a cell says n/a or failed, one line each."""
    out = list(report.get("notes", []))
    for case in report["cases"]:
        for side, s in case["sides"].items():
            if "unavailable" in s:
                out.append(f"{NAMES[side]} n/a for {case['case']}: {s['unavailable']}")
            elif "error" in s:
                out.append(f"{NAMES[side]} failed on {case['case']}: {s['error']}")
    return out


def markdown(report: dict[str, Any]) -> str:
    """The benchmark as Markdown: the table, the machine, the settings and the notes."""
    sides = report["sides"]
    memory = memory_key(report["machine"].get("device", "cpu"))
    lines = [*header(sides, memory), *(_row(c, sides, memory) for c in report["cases"]), ""]
    lines.append(f"Machine: {describe(report['machine'])}")
    st = report["settings"]
    alternating = f" alternating {' / '.join(NAMES[k] for k in sides)}" if len(sides) > 1 else ""
    what = "GPU memory" if memory == "peak_device_bytes" else "RSS"
    ratios = f"; ratios: purefine ÷ faster peer (tok/s), ÷ leaner peer ({what})" if len(sides) > 1 else ""
    memory_policy = "" if memory == "peak_device_bytes" else f"; purefine's --allocator {st.get('allocator', 'fast')}"
    lines.append(f"Settings: {st['steps']} timed steps after {st['warmup']} warm-up, {st['rounds']} round(s)"
                 f"{alternating}, each run in a fresh process; tok/s = batch x seq_len per step{ratios}"
                 f"{memory_policy}.")
    lines += [f"- {n}" for n in notes(report)]
    return "\n".join(lines)
