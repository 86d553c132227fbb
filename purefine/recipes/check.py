"""The numerics check (scripts/check.py): purefine's forward on a checkpoint against ``transformers``.

    python scripts/check.py --checkpoint-dir checkpoints/llama2-7b
    python scripts/check.py --checkpoint-dir checkpoints/llama2-7b --dtype bf16 --seq-len 256 --atol 0.1

Both run the same seeded random tokens (B, T); the report gives, for every layer, the largest
difference of its output (the residual stream after layer i, caught with a forward hook on
``transformers``' layer i), so the first layer that departs points at the bug, then the largest and
mean logit difference and how often the two argmaxes agree. ``--run-dir`` checks a trained model:
the run's base with its adapter merged, written to a temporary HF directory that both load. Exit status 1 when the largest logit
difference exceeds ``--atol``. purefine runs first and is freed before ``transformers`` loads, so
the peak is one model, not two. ``trust_remote_code`` is never set: a checkpoint whose
architecture needs custom code is refused by ``transformers``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from purefine import checkpoint, lora, models
from purefine.errors import ConfigError
from purefine.recipes.loading import ModelSource, load_model, pick_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_ATOL = {"fp32": 1e-3, "bf16": 0.25}


@dataclass(frozen=True)
class CheckConfig:
    """Compare purefine's logits (and each layer's output) on a checkpoint with transformers'."""

    checkpoint_dir: str | None = None
    """An HF causal-LM directory (config.json + safetensors) to check."""
    run_dir: str | None = None
    """A training output directory (scripts/train.py --output-dir): its model, adapter merged, is checked."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Weights and compute dtype of both models."""
    batch_size: int = 2
    """Sequences of random tokens."""
    seq_len: int = 32
    """Tokens per sequence."""
    seed: int = 0
    """Seed of the random tokens."""
    atol: float | None = None
    """Largest acceptable logit difference (default: 1e-3 in fp32, 0.25 in bf16); above it the exit status is 1."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto."""


def check_flags(cfg: CheckConfig) -> None:
    """ConfigError naming the flag for a missing checkpoint or a bad size."""
    if (cfg.checkpoint_dir is None) == (cfg.run_dir is None):
        raise ConfigError("give one of --checkpoint-dir (an HF checkpoint) or --run-dir (a training output) to check")
    for flag, value in (("--batch-size", cfg.batch_size), ("--seq-len", cfg.seq_len)):
        if value < 1:
            raise ConfigError(f"{flag}: expected a positive integer, found {value}")
    if cfg.atol is not None and not cfg.atol > 0:
        raise ConfigError(f"--atol: expected a positive number, found {cfg.atol}")


def purefine_outputs(model_cfg: Any, params: dict, tokens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """tokens (B, T) -> ([layer i's output (B, T, D) float32 per layer], logits (B, T, V) float32)."""
    layers: list[torch.Tensor] = []
    with torch.no_grad():
        h, _ = models.hidden_states(model_cfg, params, tokens, observe=lambda i, x: layers.append(x.float().cpu()))
        logits = models.logits(model_cfg, params, h).float().cpu()
    return layers, logits


def transformers_outputs(path: str, dtype: torch.dtype, tokens: torch.Tensor,
                         device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same from ``transformers``: (hidden_states[1:] (B, T, D) each, logits (B, T, V)), float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False).to(device).eval()
    n = model.config.num_hidden_layers
    stack = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)
    layers: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: layers.append(
        (out[0] if isinstance(out, tuple) else out).float().cpu())) for layer in stack]
    with torch.no_grad():
        logits = model(tokens.to(device)).logits.float().cpu()
    for hook in hooks:
        hook.remove()
    return layers, logits


def compare(ours: tuple[list[torch.Tensor], torch.Tensor], ref: tuple[list[torch.Tensor], torch.Tensor]) -> dict:
    """Largest difference of every layer's output, and logit statistics."""
    (our_layers, our_logits), (ref_layers, ref_logits) = ours, ref
    if len(our_layers) != len(ref_layers):
        raise ConfigError(f"check: purefine ran {len(our_layers)} layers, transformers {len(ref_layers)}")
    layers = [float((a - b).abs().max()) for a, b in zip(our_layers, ref_layers)]
    diff = (our_logits - ref_logits).abs()
    agree = (our_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()
    return {"layers": layers, "max_logit_diff": float(diff.max()), "mean_logit_diff": float(diff.mean()),
            "argmax_agreement": float(agree)}


def report_lines(result: dict) -> list[str]:
    """The printed report, one line per layer then the logits and the verdict."""
    lines = [f"purefine vs transformers {result['transformers']} on {result['checkpoint']} "
             f"({result['model_type']}, {result['dtype']}, {result['batch']}x{result['seq_len']} random tokens, "
             f"seed {result['seed']})"]
    lines += [f"  layer {i:<3} output  max |diff| {d:.3e}" for i, d in enumerate(result["layers"])]
    lines.append(f"  logits            max |diff| {result['max_logit_diff']:.3e} (mean {result['mean_logit_diff']:.3e}, "
                 f"argmax agrees on {100 * result['argmax_agreement']:.1f}% of positions)")
    verdict = "ok" if result["ok"] else "MISMATCH"
    lines.append(f"{verdict}: max logit difference {result['max_logit_diff']:.3e} "
                 f"{'<=' if result['ok'] else '>'} atol {result['atol']:.1e}")
    return lines


def main(cfg: CheckConfig) -> dict:
    """Run both models, print the report; exit status 1 on a mismatch. Returns the result dict."""
    check_flags(cfg)
    try:
        import transformers
    except ImportError:
        raise ConfigError("check: transformers is not installed (pip install transformers); it is the reference") from None
    device, dtype = pick_device(cfg.device), DTYPES[cfg.dtype]
    with tempfile.TemporaryDirectory(prefix="purefine-check-") as tmp:
        path = cfg.checkpoint_dir if cfg.run_dir is None else str(merged_run(cfg.run_dir, Path(tmp) / "merged", device))
        return _check(cfg, path, device, dtype, transformers.__version__)


def merged_run(run_dir: str, out: Path, device: torch.device) -> Path:
    """A training run's model (its base with the adapter merged, NF4 dequantized) as an HF directory."""
    loaded = load_model(ModelSource(run_dir=run_dir), device=device)
    return checkpoint.save_hf(out, loaded.cfg, lora.merge(loaded.params), dtype=torch.float32)


def _check(cfg: CheckConfig, path: str, device: torch.device, dtype: torch.dtype, version: str) -> dict:
    model_cfg, params = checkpoint.load_hf(path, dtype=dtype, device=device)
    if not models.family(model_cfg).causal:
        raise ConfigError(f"{cfg.run_dir or cfg.checkpoint_dir}: a {model_cfg.model_type} model; "
                          "the check compares causal language models")
    tokens = torch.randint(0, model_cfg.vocab_size, (cfg.batch_size, cfg.seq_len),
                           generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    ours = purefine_outputs(model_cfg, params, tokens)
    del params  # one model in memory at a time
    result = compare(ours, transformers_outputs(path, dtype, tokens, device))
    atol = cfg.atol if cfg.atol is not None else DEFAULT_ATOL[cfg.dtype]
    result |= {"checkpoint": cfg.run_dir or cfg.checkpoint_dir, "model_type": model_cfg.model_type, "dtype": cfg.dtype,
               "batch": cfg.batch_size, "seq_len": cfg.seq_len, "seed": cfg.seed, "atol": atol,
               "transformers": version, "ok": result["max_logit_diff"] <= atol}
    print("\n".join(report_lines(result)))
    if not result["ok"]:
        raise SystemExit(1)
    return result
