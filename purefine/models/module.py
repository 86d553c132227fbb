"""The bridge from any ``nn.Module`` to a pure function of a plain params dict: the generic path.

    params = params_of(module)                    # nested dict keyed by the module's own names
    fn = as_function(module)
    out = fn(params, *args, **kwargs)             # torch.func.functional_call under the hood
    loss_sum, n = loss_fn(module)(params, batch)  # next-token loss of a causal LM, purefine's protocol

The parity tests use it to run a ``transformers`` model over purefine's params; a user runs any
architecture purefine does not implement natively the same way (a ``transformers`` model of
another family, their own module). Full fine-tuning differentiates ``loss_fn(module)`` with
``torch.autograd.grad`` over the params' tensors, exactly as for a native family.

LoRA here is **weight-side**, the slower fallback: ``functional_call`` takes plain tensors only, so
every leaf kind is materialized first (``LoRA`` -> W + s·BA, differentiably; ``NF4`` ->
dequantized), which costs a merged copy of each adapted weight and a full-size weight-gradient
matmul per step. Native families compute LoRA on the activation side instead. Tied parameters
(e.g. a tied lm_head) appear once in ``params_of`` and stay tied in the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from purefine import losses, tree
from purefine.errors import ConfigError


def params_of(module: nn.Module, *, buffers: bool = False) -> dict:
    """The module's parameters (and optionally buffers), detached, as a nested tree of its names."""
    flat = {name: p.detach() for name, p in module.named_parameters()}
    if buffers:
        flat.update({name: b for name, b in module.named_buffers()})
    return tree.unflatten(flat)


def as_function(module: nn.Module) -> Callable[..., Any]:
    """``fn(params, *args, **kwargs)``: the module's forward with ``params`` swapped in, statelessly.

    Parameters missing from ``params`` keep the module's own values; leaf kinds are materialized
    (differentiably, so gradients reach LoRA adapters through W + s·BA).
    """

    def fn(params: Any, *args: Any, **kwargs: Any) -> Any:
        flat = tree.flatten(tree.materialize(params))
        return torch.func.functional_call(module, flat, args, kwargs, strict=False)

    return fn


def causal_lm_inputs(batch: dict) -> dict:
    """A purefine batch -> ``transformers`` keyword arguments: ``input_ids``, and ``attention_mask``
    (B, T) / ``position_ids`` (B, T) when the batch has them. Packed batches pass their restarting
    positions; transformers builds the block-causal mask from them."""
    kwargs: dict[str, Any] = {"input_ids": batch["tokens"]}
    mask = batch.get("mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ConfigError(f"module loss: batch 'mask' must be a (B, T) padding mask for a generic module, "
                              f"found shape {tuple(mask.shape)}")
        kwargs["attention_mask"] = mask.long()
    if batch.get("positions") is not None:
        kwargs["position_ids"] = batch["positions"]
    return kwargs


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a module's output: a tensor, or an object / dict with ``logits``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if logits is None:
        raise ConfigError(f"module loss: the module returned {type(output).__name__} without 'logits'")
    return logits


def loss_fn(module: nn.Module, *, inputs: Callable[[dict], dict] = causal_lm_inputs
            ) -> Callable[[dict, dict], tuple[torch.Tensor, torch.Tensor]]:
    """(params, batch) -> (summed next-token cross-entropy fp32, number of labelled tokens).

    The batch is purefine's (``tokens`` (B, T), ``labels`` (B, T) already shifted, -100 = no
    loss, optional ``mask`` / ``positions``); ``inputs(batch)`` builds the module's keyword
    arguments (default: ``causal_lm_inputs`` for ``transformers`` causal LMs). The module's full
    (B, T, V) logits exist at once, unlike the chunked loss of native families.
    """
    fn = as_function(module)

    def loss(params: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits_of(fn(params, **inputs(batch)))
        return losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))

    return loss
