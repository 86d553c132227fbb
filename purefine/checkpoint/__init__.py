"""Checkpoints in and out: Hugging Face directories (``hf``)."""

from purefine.checkpoint.hf import inspect, load_hf, read_config, save_hf, tensor_index

__all__ = ["inspect", "load_hf", "read_config", "save_hf", "tensor_index"]
