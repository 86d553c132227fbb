"""Checkpoints in and out: Hugging Face directories (``hf``), PEFT adapters (``peft``), resumable train state (``state``)."""

from purefine.checkpoint.hf import inspect, load_hf, read_config, save_hf, tensor_index
from purefine.checkpoint.peft import load_peft, save_peft

__all__ = ["inspect", "load_hf", "load_peft", "read_config", "save_hf", "save_peft", "tensor_index"]
