"""The side-by-side benchmark as an instrument: both sides run the same work on the same weights and
batches (their losses agree), the report carries sane numbers and the machine, the capability probe
reads flags right, and a missing extra or peer is one clear line. No test asserts a timing."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from purefine import hardware
from purefine.errors import ConfigError
from purefine.recipes import bench, bench_report
from purefine.ops import IGNORE_INDEX
from purefine.recipes.bench_workload import batches, parse

AVX2 = {"fpu", "sse2", "avx", "avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
AMX = AVX512_BF16 | {"amx_bf16", "amx_tile", "amx_int8"}


# ------------------------------------------------------------------------------------ capability probe

@pytest.mark.parametrize("flags, level, native", [
    (set(), "none", False), (AVX2, "AVX2", False), (AVX512, "AVX512", False),
    (AVX512_BF16, "AVX512-BF16", True), (AMX, "AMX", True), (AVX512 | {"amx_tile"}, "AVX512", False),
])
def test_capability_level_and_native_bf16_from_flags(flags: set, level: str, native: bool) -> None:
    cap = hardware.cpu_capability(flags)
    assert cap["level"] == level
    assert cap["avx2"] == ("avx2" in flags) and cap["amx"] == (level == "AMX")
    assert hardware.native_bf16("cpu", flags) is native


def test_probe_of_this_machine_matches_cpuinfo_and_torch() -> None:
    cap = hardware.cpu_capability()
    assert cap["torch"] == torch.backends.cpu.get_cpu_capability()
    flags = hardware.cpu_flags()
    assert cap["avx512"] == ("avx512f" in flags)
    assert hardware.native_bf16("cpu", flags) == (cap["level"] in ("AMX", "AVX512-BF16"))
    assert hardware.native_bf16("meta") is False
    m = hardware.machine(peaks=False)
    assert m["cpu"] and m["threads"] >= 1 and m["torch"] == torch.__version__ and "peak_gflops" not in m
    assert hardware.matmul_peak(torch.float32, max_n=512, repeats=2, budget_s=0.2) > 0


# -------------------------------------------------------------------------------------------- workloads

def test_cases_parse_and_bad_cases_name_the_flag() -> None:
    w = parse("llama-134m/qlora/fp32/remat")
    assert (w.preset, w.mode, w.dtype, w.remat, w.adapters, w.batch_size, w.seq_len) == \
        ("llama-134m", "qlora", torch.float32, True, True, 4, 512)
    assert parse("llama-tiny/full/bf16").frozen_dtype == torch.float32  # full fine-tuning keeps fp32 masters
    for bad in ("llama-tiny/lora", "llama-tiny/dora/fp32", "llama-tiny/lora/fp16", "llama-tiny/lora/fp32/fast"):
        with pytest.raises(ConfigError, match="--cases"):
            parse(bad)


def test_batches_are_fixed_and_labels_are_the_next_tokens() -> None:
    w = parse("llama-tiny/lora/fp32")
    a, b = batches(w, 1024, 2), batches(w, 1024, 2)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["tokens"], a[1]["tokens"])
    t, labels = a[0]["tokens"], a[0]["labels"]
    assert t.shape == (8, 256) and torch.equal(labels[:, :-1], t[:, 1:]) and (labels[:, -1] == IGNORE_INDEX).all()


def test_compare_takes_the_faster_and_the_leaner_peer() -> None:
    pf = {"tokens_per_s": 300.0, "peak_rss_bytes": 1000, "loss_first": 7.0, "loss_final": 6.5}
    hf = {"tokens_per_s": 400.0, "peak_rss_bytes": 4000, "loss_first": 7.0, "loss_final": 6.4}
    tt = {"tokens_per_s": 200.0, "peak_rss_bytes": 2000, "loss_first": 7.1, "loss_final": 6.5}
    c = bench_report.compare({"purefine": pf, "hf": hf, "torchtune": tt, "other": {"unavailable": "no"}})
    assert c["tokens_per_s"] == 0.75 and c["peak_memory"] == 0.5 and c["memory"] == "peak_rss_bytes"
    assert c["loss_diff"]["hf"]["final"] == pytest.approx(0.1) and c["loss_diff"]["torchtune"]["first"] == pytest.approx(0.1)
    assert bench_report.compare({"purefine": pf, "hf": {"unavailable": "x"}})["tokens_per_s"] is None


# ---------------------------------------------------------------------------------------- extras, peers

def _hide(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_missing_bench_extra_is_one_error_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from purefine.cli import main

    _hide(monkeypatch, "peft")
    with pytest.raises(SystemExit) as e:
        main(["bench", "--against", "hf", "--cases", "llama-tiny/lora/fp32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: --against hf needs peft") and "purefine[bench]" in err[0]


def test_missing_torchtune_is_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "torchtune")
    workloads, sides, notes = bench.check(bench.BenchConfig(against=("hf", "torchtune")))
    assert sides == ["purefine", "hf"] and [w.case for w in workloads] == list(bench.COMPARE_CASES)
    assert any("torchtune is not installed" in n for n in notes)


# ------------------------------------------------------------------------------------------ devices

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_flag_picks_the_cpu_here_and_refuses_what_torch_cannot_use(capsys: pytest.CaptureFixture) -> None:
    from purefine.cli import main

    assert bench.resolve_device("auto") == "cpu" and bench.resolve_device("cpu") == "cpu"
    workloads, _, _ = bench.check(bench.BenchConfig(against=("hf",), device="auto"))
    assert [w.case for w in workloads] == list(bench.COMPARE_CASES)  # the GPU cases only on a GPU
    for bad, why in (("tpu", "expected cpu, cuda"), ("nonsense:3", "expected cpu, cuda"), ("cuda", "no CUDA GPU")):
        with pytest.raises(ConfigError, match=f"--device {bad!r}|--device {bad}"):
            bench.resolve_device(bad)
        with pytest.raises(SystemExit) as e:
            main(["bench", "--device", bad, "--cases", "llama-tiny/lora/fp32"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and why in err[0], err


def test_the_larger_of_two_peak_probes_is_kept_and_mfu_follows_it() -> None:
    side = lambda mfu: {"mfu": mfu, "tokens_per_s": 1.0}  # noqa: E731
    report = {"machine": {"peak_gflops": {"fp32": 100.0, "bf16": 200.0}},
              "cases": [{"case": "llama-tiny/lora/fp32", "sides": {"purefine": side(1.2), "hf": side(0.9)}},
                        {"case": "llama-134m/full/bf16", "sides": {"purefine": side(0.5), "hf": {"error": "x"}}}]}
    bench_report.settle_peaks(report, {"fp32": 150.0, "bf16": 100.0})
    m = report["machine"]
    assert m["peak_gflops"] == {"fp32": 150.0, "bf16": 200.0}
    assert m["peak_probes_gflops"] == [{"fp32": 100.0, "bf16": 200.0}, {"fp32": 150.0, "bf16": 100.0}]
    fp32, bf16 = report["cases"]
    assert fp32["sides"]["purefine"]["mfu"] == pytest.approx(0.8) and fp32["sides"]["hf"]["mfu"] == pytest.approx(0.6)
    assert bf16["sides"]["purefine"]["mfu"] == 0.5 and bf16["sides"]["hf"] == {"error": "x"}


def test_gpu_cases_parse_and_a_gpu_report_compares_gpu_memory() -> None:
    assert [parse(c).batch_size * parse(c).seq_len for c in bench.GPU_CASES] == [2048, 4096, 4096, 4096]
    run = {"library": "x", "losses": [7.0, 6.9], "step_seconds": [0.5], "weights_bytes": 1, "setup_rss_bytes": 10,
           "peak_rss_bytes": 100}
    pf = bench_report.side_summary([run | {"peak_device_bytes": 2_000_000}], tokens=4096, trained=4092, flops=1e9, peak=1e12)
    hf = bench_report.side_summary([run | {"peak_device_bytes": 8_000_000, "step_seconds": [1.0]}], tokens=4096,
                                   trained=4092, flops=1e9, peak=1e12)
    c = bench_report.compare({"purefine": pf, "hf": hf}, bench_report.memory_key("cuda"))
    assert c["memory"] == "peak_device_bytes" and c["peak_memory"] == 0.25 and c["tokens_per_s"] == 2.0
    assert bench_report.compare({"purefine": pf, "hf": hf})["peak_memory"] == 1.0  # RSS: 100 and 100
    machine = {"cpu": "host", "capability": {"level": "AVX2", "torch": "AVX2"}, "threads": 16, "torch": "2.x",
               "device": "cuda", "native_bf16": True, "gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gib": 79.2}
    report = {"machine": machine, "sides": ["purefine", "hf"], "notes": [],
              "settings": {"steps": 5, "warmup": 2, "rounds": 1},
              "cases": [{"case": "llama3.2-1b/lora/bf16", "batch": [4, 1024], "sides": {"purefine": pf, "hf": hf},
                         "compare": c}]}
    out = bench_report.markdown(report)
    assert "| workload | purefine tok/s (peak GPU MB) | HF PEFT tok/s (peak GPU MB) | ratio tokens/s | ratio GPU |" in out
    assert "| llama3.2-1b/lora/bf16 (4×1024) | 8,192 (2) | 4,096 (8) | 2.00× | 0.25× |" in out
    assert "Machine: NVIDIA H100 80GB HBM3 (79.2 GiB; native bf16: yes) | host host (AVX2), 16 threads" in out
    assert "÷ leaner peer (GPU memory)" in out


@pytest.mark.slow
def test_gpu_bench_script_runs_its_plumbing_on_the_cpu(tmp_path: Path) -> None:
    """scripts/gpu_bench.sh end to end with its device, cases and model swapped for a CPU-sized run: the
    bench's JSON with both sides and the QLoRA run's per-step lines come back under $OUT."""
    pytest.importorskip("peft")
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"OUT": str(tmp_path), "GPU_BENCH_DEVICE": "cpu", "GPU_BENCH_CASES": "llama-tiny/lora/fp32",
                        "GPU_BENCH_MODEL": "llama-tiny", "GPU_BENCH_PYTHON": sys.executable, "GPU_BENCH_WHEELS": "none",
                        "GPU_BENCH_TIMEOUT": "100000", "GPU_BENCH_7B_TIMEOUT": "100000"}
    out = subprocess.run(["bash", str(root / "scripts" / "gpu_bench.sh")], cwd=root, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["machine"]["device"] == "cpu" and [c["case"] for c in report["cases"]] == ["llama-tiny/lora/fp32"]
    assert {"purefine", "hf"} <= set(report["cases"][0]["sides"]) and report["cases"][0]["compare"]["tokens_per_s"]
    steps = [line for line in (tmp_path / "qlora_7b.log").read_text().splitlines() if "QLoRA step" in line]
    assert len(steps) == 4 and steps[-1].startswith("llama-tiny QLoRA step 4: ")
    assert "torch " in (tmp_path / "env.txt").read_text()


@pytest.mark.skipif(importlib.util.find_spec("torchtune") is not None, reason="torchtune is installed here")
def test_torchtune_side_reports_unavailable_not_a_failure(tmp_path: Path) -> None:
    from purefine.recipes.bench_case import run

    out = run({"side": "torchtune", "case": "llama-tiny/lora/fp32", "base": str(tmp_path), "adapter": str(tmp_path),
               "steps": 1, "warmup": 0})
    assert "torchtune cannot be imported" in out["unavailable"]


# ------------------------------------------------------------------------------------- side by side

def _run(tmp_path: Path, capsys: pytest.CaptureFixture, *cases: str) -> tuple[dict, str]:
    pytest.importorskip("peft")
    cfg = bench.BenchConfig(against=("hf",), cases=cases, steps=1, warmup=1, rounds=1, threads=2,
                            json=str(tmp_path / "bench.json"))
    report = bench.main(cfg)
    assert json.loads((tmp_path / "bench.json").read_text())["cases"][0]["case"] == cases[0]
    return report, capsys.readouterr().out


def _check_sides(case: dict, first_tol: float, final_tol: float) -> None:
    pf, hf = case["sides"]["purefine"], case["sides"]["hf"]
    b, t = case["batch"]
    for side in (pf, hf):
        assert side["tokens_per_s"] > 0 and side["trained_tokens_per_s"] == pytest.approx(side["tokens_per_s"] * (t - 1) / t, rel=1e-3)
        assert side["tokens_per_s"] * side["seconds_per_step"] == pytest.approx(b * t, rel=1e-3)  # every position
        assert 0 < side["mfu"] and side["peak_rss_bytes"] >= side["setup_rss_bytes"] > 0
        assert len(side["runs"][0]["losses"]) == 2 and all(math.isfinite(x) for x in side["runs"][0]["losses"])
    assert hf["library"].startswith("transformers") and pf["library"].startswith("purefine")
    assert abs(pf["loss_first"] - hf["loss_first"]) <= first_tol  # same weights, same batch
    assert abs(pf["loss_final"] - hf["loss_final"]) <= final_tol
    assert case["compare"]["tokens_per_s"] == pytest.approx(pf["tokens_per_s"] / hf["tokens_per_s"], rel=1e-2)


def test_purefine_and_hf_peft_run_the_same_lora_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report, out = _run(tmp_path, capsys, "llama-tiny/lora/fp32")
    _check_sides(report["cases"][0], first_tol=1e-5, final_tol=1e-4)
    m = report["machine"]
    assert m["threads"] == 2 and m["peak_gflops"]["fp32"] > 0 and m["peak_gflops"]["bf16"] > 0
    before, after = m["peak_probes_gflops"]  # probed before and after the cases; the larger is kept
    assert m["peak_gflops"] == {k: max(before[k], after[k]) for k in before}
    assert "| workload | purefine tok/s (peak RSS MB) | HF PEFT tok/s (peak RSS MB) | ratio tokens/s |" in out
    assert "| llama-tiny/lora/fp32 (8×256) |" in out and f"Machine: {hardware.cpu_model()}" in out


@pytest.mark.slow
def test_qlora_and_bf16_sides_agree_within_their_precision(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("torchao")
    report, _ = _run(tmp_path, capsys, "llama-tiny/qlora/fp32", "llama-tiny/full/bf16")
    qlora, full = report["cases"]
    _check_sides(qlora, first_tol=1e-4, final_tol=1e-3)  # torchao's and purefine's double-quantized scales round apart
    _check_sides(full, first_tol=1e-3, final_tol=1e-3)  # bf16 matmuls, different kernels
