"""The numerics check (scripts/check.py): purefine's forward on a checkpoint against ``transformers``.

    python scripts/check.py --checkpoint-dir checkpoints/llama2-7b
    python scripts/check.py --checkpoint-dir checkpoints/llama2-7b --dtype bf16 --seq-len 256 --atol 0.1

Both run the same seeded random tokens (B, T); the report gives, for each layer, the largest
difference of its output (the residual stream after layer i, ``hidden_states[i + 1]`` in
``transformers``), so the first layer that departs points at the bug, then the largest and mean
logit difference and how often the two argmaxes agree. Exit status 1 when the largest logit
difference exceeds ``--atol``. purefine runs first and is freed before ``transformers`` loads, so
the peak is one model, not two. ``trust_remote_code`` is never set: a checkpoint whose
architecture needs custom code is refused by ``transformers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from purefine import checkpoint, models, ops
from purefine.errors import ConfigError
from purefine.recipes.loading import pick_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_ATOL = {"fp32": 1e-3, "bf16": 0.25}


@dataclass(frozen=True)
class CheckConfig:
    """Compare purefine's logits (and each layer's output) on a checkpoint with transformers'."""

    checkpoint_dir: str | None = None
    """An HF causal-LM directory (config.json + safetensors) to check (required)."""
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
    if cfg.checkpoint_dir is None:
        raise ConfigError("--checkpoint-dir: required (the HF checkpoint to check)")
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
    with torch.no_grad():
        out = model(tokens.to(device), output_hidden_states=True)
    return [h.float().cpu() for h in out.hidden_states[1:]], out.logits.float().cpu()


def compare(ours: tuple[list[torch.Tensor], torch.Tensor], ref: tuple[list[torch.Tensor], torch.Tensor]) -> dict:
    """Largest layer-output differences (the last layer's output is compared through the logits:
    transformers' last hidden state is after the final norm) and logit statistics."""
    (our_layers, our_logits), (ref_layers, ref_logits) = ours, ref
    layers = [float((a - b).abs().max()) for a, b in zip(our_layers[:-1], ref_layers[:-1])]
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
    model_cfg, params = checkpoint.load_hf(cfg.checkpoint_dir, dtype=dtype, device=device)
    if not models.family(model_cfg).causal:
        raise ConfigError(f"--checkpoint-dir {cfg.checkpoint_dir}: a {model_cfg.model_type} checkpoint; "
                          "the check compares causal language models")
    tokens = torch.randint(0, model_cfg.vocab_size, (cfg.batch_size, cfg.seq_len),
                           generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    ours = purefine_outputs(model_cfg, params, tokens)
    del params  # one model in memory at a time
    result = compare(ours, transformers_outputs(cfg.checkpoint_dir, dtype, tokens, device))
    atol = cfg.atol if cfg.atol is not None else DEFAULT_ATOL[cfg.dtype]
    result |= {"checkpoint": cfg.checkpoint_dir, "model_type": model_cfg.model_type, "dtype": cfg.dtype,
               "batch": cfg.batch_size, "seq_len": cfg.seq_len, "seed": cfg.seed, "atol": atol,
               "transformers": transformers.__version__, "ok": result["max_logit_diff"] <= atol}
    print("\n".join(report_lines(result)))
    if not result["ok"]:
        raise SystemExit(1)
    return result
