"""The bridge from any ``nn.Module`` to a pure function of a plain params dict.

    params = params_of(module)                    # nested dict keyed by the module's own names
    fn = as_function(module)
    out = fn(params, *args, **kwargs)             # torch.func.functional_call under the hood

The parity tests use it to run a ``transformers`` model over purefine's params; a user can run
their own module the same way (the slower, generic fallback for architectures purefine does not
implement natively). Leaf kinds (LoRA, NF4) are materialized first: ``functional_call`` only
takes plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from purefine import tree


def params_of(module: nn.Module, *, buffers: bool = False) -> dict:
    """The module's parameters (and optionally buffers), detached, as a nested tree of its names."""
    flat = {name: p.detach() for name, p in module.named_parameters()}
    if buffers:
        flat.update({name: b for name, b in module.named_buffers()})
    return tree.unflatten(flat)


def as_function(module: nn.Module) -> Callable[..., Any]:
    """``fn(params, *args, **kwargs)``: the module's forward with ``params`` swapped in, statelessly."""

    def fn(params: Any, *args: Any, **kwargs: Any) -> Any:
        flat = tree.flatten(tree.materialize(params))
        return torch.func.functional_call(module, flat, args, kwargs, strict=False)

    return fn
