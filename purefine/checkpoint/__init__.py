"""Checkpoints in and out: Hugging Face directories (``hf``)."""

from purefine.checkpoint.hf import inspect, load_hf, read_config, save_hf, tensor_index
from purefine.checkpoint.peft import load_peft, save_peft  # noqa: F401

__all__ = ["inspect", "load_hf", "read_config", "save_hf", "tensor_index"]
