"""purefine: fine-tune large language models with a functional, JAX-style core on PyTorch.

Models are pure functions over explicit parameter trees; LoRA is a parameter transform; NF4 is a
tree mapping; a training step is composed from stateless grad, optimizer and sharding functions.

    import purefine as pf
    cfg, params = pf.checkpoint.load_hf(path)
    logits = pf.models.forward(cfg, params, tokens)

Submodules are imported on first use (``pf.lora``, ``pf.nf4``, ``pf.train``, ...), so importing
purefine stays cheap and a script pays only for what it touches.
"""

from __future__ import annotations

import importlib
from typing import Any

from purefine.errors import PurefineError

__version__ = "0.1.0"
__all__ = ["PurefineError", "__version__"]


def __getattr__(name: str) -> Any:
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        module = importlib.import_module(f"purefine.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"purefine.{name}":
            raise AttributeError(f"module 'purefine' has no attribute {name!r}") from None
        raise
    globals()[name] = module
    return module
