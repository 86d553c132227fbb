"""What this machine computes with, and how fast.

- ``cpu_model()``: the CPU's name, from /proc/cpuinfo (``platform.processor()`` elsewhere).
- ``cpu_flags()``: the instruction-set flags /proc/cpuinfo lists (``flags``; ``Features`` on Arm).
- ``cpu_capability(flags)``: the best x86 vector level of a flag set — ``"AMX"``, ``"AVX512-BF16"``,
  ``"AVX512"``, ``"AVX2"`` or ``"none"`` — with the flags behind it and torch's own dispatch level
  (``torch.backends.cpu.get_cpu_capability()``).
- ``native_bf16(device, flags)``: whether bf16 matmuls run natively: a CUDA device with bf16
  support, or a CPU with AMX or AVX512-BF16 (``PUREFINE_NATIVE_BF16=0`` / ``1`` overrides the CPU's answer). Elsewhere torch emulates bf16 on CPU, far slower than
  fp32 (0.8 GFLOP/s against ~160 for ``g @ w`` on an AVX2-only EPYC), so ``--dtype auto`` computes in
  fp32 there.
- ``matmul_peak(dtype)``: the best FLOP/s of square matmuls in ``dtype``, measured now, the
  denominator of MFU; the size adapts so that a slow (emulated) dtype still measures in about a second.
- ``machine(threads, device=...)``: the record printed beside every benchmark table (on CUDA: the GPU's
  name and memory too, and the peaks measured on it).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch

CPUINFO = "/proc/cpuinfo"
# Capability levels, best first: (name, the flags that must all be present).
LEVELS = (
    ("AMX", ("amx_bf16", "amx_tile")),
    ("AVX512-BF16", ("avx512_bf16",)),
    ("AVX512", ("avx512f",)),
    ("AVX2", ("avx2",)),
)
NATIVE_BF16_LEVELS = ("AMX", "AVX512-BF16")
# Set to 0 or 1 to override the CPU's detection (the test suite sets 0, so it runs alike on every CPU).
NATIVE_BF16_ENV = "PUREFINE_NATIVE_BF16"


def _cpuinfo_field(field: str) -> str | None:
    """The value of the first ``field : value`` line of /proc/cpuinfo, or None."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == field:
                    return value.strip()
    except OSError:
        return None
    return None


def cpu_model() -> str:
    """The CPU's marketing name ("Intel(R) Xeon(R) Platinum 8480+"), or the platform's best guess."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags as /proc/cpuinfo lists them (empty where it is unreadable)."""
    value = _cpuinfo_field("flags") or _cpuinfo_field("Features") or ""
    return frozenset(value.split())


def torch_cpu_capability() -> str:
    """torch's CPU kernel dispatch level ("AVX512", "AVX2", "DEFAULT", ...)."""
    return str(torch.backends.cpu.get_cpu_capability())


def cpu_capability(flags: frozenset[str] | set[str] | None = None) -> dict[str, Any]:
    """{"level": best of LEVELS the flags reach (or "none"), "avx2", "avx512", "avx512_bf16", "amx": bools,
    "torch": torch's dispatch level} for ``flags`` (default: this CPU's)."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    level = next((name for name, needed in LEVELS if all(f in flags for f in needed)), "none")
    return {"level": level, "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags and "amx_tile" in flags,
            "torch": torch_cpu_capability()}


def _override(flags: frozenset[str] | set[str] | None) -> str | None:
    """``PUREFINE_NATIVE_BF16`` ("0" or "1") when it decides for this CPU (no explicit ``flags``), else None."""
    value = os.environ.get(NATIVE_BF16_ENV, "").strip()
    return value if flags is None and value in ("0", "1") else None


def native_bf16(device: torch.device | str = "cpu", flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether ``device`` computes bf16 matmuls natively: CUDA with bf16 support, or a CPU whose flags
    (default: this CPU's) include AMX or AVX512-BF16. False for any other device."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        override = _override(flags)
        if override is not None:
            return override == "1"
        return cpu_capability(flags)["level"] in NATIVE_BF16_LEVELS
    return False


def bf16_support(device: torch.device | str = "cpu", flags: frozenset[str] | set[str] | None = None) -> str:
    """A phrase for run headers: "native bf16 (CPU with AMX)", "no native bf16 (CPU with AVX2 only)", "native bf16 (cuda)"."""
    kind = torch.device(device).type
    native = "native bf16" if native_bf16(device, flags) else "no native bf16"
    if kind != "cpu":
        return f"{native} ({kind})"
    level = cpu_capability(flags)["level"]
    override = _override(flags)
    if override is not None:
        return f"{native} ({NATIVE_BF16_ENV}={override}; the CPU has {level})"
    return f"{native} (CPU with {level}{'' if level in NATIVE_BF16_LEVELS else ' only'})"


def synchronize(device: torch.device | str) -> None:
    """Wait for ``device``'s queued work (CUDA kernels run asynchronously); nothing to wait for on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int, budget_s: float) -> float:
    """The fastest of up to ``repeats`` timed ``a @ b`` (stopping once ``budget_s`` is spent)."""
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        synchronize(a.device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(a.device)
        elapsed = time.perf_counter() - t0
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget_s:
            break
    return best


def matmul_peak(dtype: torch.dtype = torch.float32, *, max_n: int = 2048, repeats: int = 10,
                budget_s: float = 2.0, device: torch.device | str = "cpu") -> float:
    """Best FLOP/s of an (n, n) @ (n, n) matmul in ``dtype`` on ``device``, measured now.

    A (512, 512) probe sizes the run: n doubles up to ``max_n`` while one matmul stays under a quarter
    of ``budget_s``, so an emulated dtype measures on a smaller n instead of running for minutes.
    """
    def operands(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype))

    n = 512
    a, b = operands(n)
    torch.mm(a, b)  # first call: allocations, kernel selection
    probe = _best_seconds(a, b, 2, budget_s)
    while n < max_n and probe * 8 < budget_s / 4:  # doubling n costs 8x
        n, probe = 2 * n, probe * 8
    a, b = operands(n)
    torch.mm(a, b)
    return 2 * n**3 / _best_seconds(a, b, repeats, budget_s)


def machine(threads: int | None = None, *, peaks: bool = True, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The machine beside a benchmark: CPU model, capability, threads, torch version, the device the
    benchmark runs on, native bf16 there, and (with ``peaks``) the fp32 and bf16 matmul peaks measured
    on that device in GFLOP/s. On CUDA also ``gpu`` (its name) and ``gpu_memory_gib``; its peaks
    come from matmuls of up to 8192 x 8192, since a GPU finishes a 2048 one in microseconds."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    out: dict[str, Any] = {"cpu": cpu_model(), "capability": cpu_capability(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "device": device.type, "native_bf16": native_bf16(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1)}
    if peaks:
        max_n = 8192 if device.type == "cuda" else 2048
        out["peak_gflops"] = {name: round(matmul_peak(dtype, max_n=max_n, device=device) / 1e9, 1)
                              for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    return out


def describe(m: dict[str, Any]) -> str:
    """One line for a ``machine()`` record: "Intel Xeon ... | AMX (torch AVX512) | 2 threads | torch 2.13.0 |
    peak fp32 290 / bf16 1590 GFLOP/s"."""
    cap = m["capability"]
    native = f"native bf16: {'yes' if m['native_bf16'] else 'no'}"
    if "gpu" in m:
        parts = [f"{m['gpu']} ({m['gpu_memory_gib']:g} GiB; {native})",
                 f"host {m['cpu']} ({cap['level']}), {m['threads']} threads", f"torch {m['torch']}"]
    else:
        parts = [m["cpu"], f"{cap['level']} (torch {cap['torch']}; {native})", f"{m['threads']} threads",
                 f"torch {m['torch']}"]
    if "peak_gflops" in m:
        parts.append(f"matmul peak fp32 {m['peak_gflops']['fp32']:,.0f} / bf16 {m['peak_gflops']['bf16']:,.0f} GFLOP/s")
    return " | ".join(parts)
