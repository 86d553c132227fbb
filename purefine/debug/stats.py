"""Per-layer statistics of one forward and backward: where a NaN starts, whether gradients
vanish or explode with depth.

- ``layer_stats(cfg, params, batch)``: per layer, the RMS, max and NaN/inf count of its output
  activations (B, T, D) and of their gradients, and the norm and NaN/inf count of its parameters'
  gradients (causal language models: the decoder's ``observe`` hook).
- ``format_layer_stats``: the table.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from purefine import losses, models, train
from purefine.errors import ConfigError

LAYER_PATH = re.compile(r"(?:^|\.)(?:layers|h|layer)\.(\d+)\.")


def _stats(x: torch.Tensor) -> dict[str, float]:
    """x (any shape) -> rms, max_abs over its finite values, and nonfinite (NaN/inf count)."""
    x = x.detach().float()
    finite = torch.isfinite(x)
    values = x[finite]
    n = max(values.numel(), 1)
    return {"rms": float(values.norm() / math.sqrt(n)), "max_abs": float(values.abs().max()) if values.numel() else 0.0,
            "nonfinite": int((~finite).sum())}


def _group(path: str) -> str:
    """The layer index of a param path (``model.layers.3.mlp...`` -> '3'), else its module
    (``model.embed_tokens.weight`` -> 'model.embed_tokens', ``lm_head.weight.lora_a`` -> 'lm_head')."""
    m = LAYER_PATH.search(path)
    return m.group(1) if m else re.sub(r"\.(weight|bias)(\..*)?$", "", path)


def _grad_groups(grads: dict[str, torch.Tensor], leaves: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """{group: grad_norm, grad_nonfinite, param_norm} summed over the group's trainable tensors."""
    out: dict[str, dict[str, float]] = {}
    for path, g in grads.items():
        row = out.setdefault(_group(path), {"grad_norm": 0.0, "grad_nonfinite": 0, "param_norm": 0.0})
        g = g.detach().float()
        row["grad_norm"] += float(g.pow(2).sum())
        row["grad_nonfinite"] += int((~torch.isfinite(g)).sum())
        row["param_norm"] += float(leaves[path].detach().float().pow(2).sum())
    for row in out.values():
        row["grad_norm"], row["param_norm"] = math.sqrt(row["grad_norm"]), math.sqrt(row["param_norm"])
    return out


def layer_stats(cfg: Any, params: Any, batch: dict[str, torch.Tensor], *, trainable: train.Filter = train.all_floating,
                compute_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Per-layer activation and gradient statistics of one forward and backward (params unchanged).

    ``batch``: ``tokens`` (B, T), ``labels`` (B, T) already shifted, optional ``positions`` (B, T)
    and ``segment_ids`` (B, T) or ``mask``, as for ``models.loss_fn``. Gradients are those of the
    mean token loss for the leaves ``trainable`` selects. Returns ``{"loss", "tokens", "layers":
    [{layer, act_rms, act_max_abs, act_nonfinite, act_grad_rms, act_grad_max_abs, act_grad_nonfinite,
    grad_norm, grad_nonfinite, param_norm}], "other": [{name, grad_norm, grad_nonfinite, param_norm}]}``
    (``other``: embeddings, final norm, head). Causal language models.
    """
    if not models.family(cfg).causal:
        raise ConfigError(f"layer_stats: the {cfg.model_type} family is not a causal language model")
    acts: dict[int, dict] = {}
    act_grads: dict[int, dict] = {}

    def observe(i: int, x: torch.Tensor) -> None:
        acts[i] = _stats(x)
        if x.requires_grad:
            x.register_hook(lambda g, i=i: act_grads.__setitem__(i, _stats(g)))

    leaves = {p: x.detach().requires_grad_() for p, x in train.trainable_leaves(params, trainable).items()}
    p = train.cast_params(train.with_leaves(params, leaves), compute_dtype)
    h, _ = models.hidden_states(cfg, p, batch["tokens"], positions=batch.get("positions"),
                                mask=models.batch_mask(batch), observe=observe)
    loss_sum, n = losses.chunked_cross_entropy(h.reshape(-1, h.shape[-1]), models.output_weight(cfg, p),
                                               batch["labels"].reshape(-1), softcap=cfg.logit_softcap)
    loss = loss_sum / n.clamp(min=1)
    raw = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = {path: torch.zeros_like(x) if g is None else g for (path, x), g in zip(leaves.items(), raw)}
    groups = _grad_groups(grads, leaves)
    empty = {"grad_norm": 0.0, "grad_nonfinite": 0, "param_norm": 0.0}
    layers = [{"layer": i, **{f"act_{k}": v for k, v in acts[i].items()},
               **{f"act_grad_{k}": v for k, v in act_grads.get(i, {"rms": 0.0, "max_abs": 0.0, "nonfinite": 0}).items()},
               **groups.get(str(i), empty)} for i in sorted(acts)]
    other = [{"name": k, **v} for k, v in groups.items() if not k.isdigit()]
    bad = [r["layer"] for r in layers if r["act_nonfinite"]]
    return {"loss": float(loss.detach()), "tokens": int(n), "first_nonfinite_layer": bad[0] if bad else None,
            "layers": layers, "other": other}


def format_layer_stats(stats: dict[str, Any]) -> str:
    """The table of ``layer_stats``: one row per layer, then the other parameter groups."""
    w = max([5, *(len(r["name"]) for r in stats["other"])])
    rows = [f"loss {stats['loss']:.4f} over {stats['tokens']} tokens"
            + (f"; activations first non-finite after layer {stats['first_nonfinite_layer']}"
               if stats["first_nonfinite_layer"] is not None else ""),
            f"{'layer':<{w}} {'act rms':>10} {'act max':>10} {'act nan/inf':>11} {'dL/dact rms':>11} {'grad norm':>10} "
            f"{'grad nan/inf':>12} {'param norm':>10}"]
    for r in stats["layers"]:
        rows.append(f"{r['layer']:<{w}} {r['act_rms']:>10.4g} {r['act_max_abs']:>10.4g} {r['act_nonfinite']:>11} "
                    f"{r['act_grad_rms']:>11.4g} {r['grad_norm']:>10.4g} {r['grad_nonfinite']:>12} {r['param_norm']:>10.4g}")
    for r in stats["other"]:
        rows.append(f"{r['name']:<{w}} {'':>10} {'':>10} {'':>11} {'':>11} {r['grad_norm']:>10.4g} "
                    f"{r['grad_nonfinite']:>12} {r['param_norm']:>10.4g}")
    return "\n".join(rows)
