"""Shared fixtures: tiny random Hugging Face checkpoints built on the spot (nothing from a hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# --dtype auto follows the CPU (bf16 only where it is native): the suite runs as on a CPU without native
# bf16, so it behaves alike on every machine; tests of the bf16 paths ask for them explicitly.
os.environ.setdefault("PUREFINE_NATIVE_BF16", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama_kwargs(**overrides) -> dict:
    """Keyword arguments of a tiny transformers LlamaConfig (GQA, 2 layers)."""
    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=False)
    kw.update(overrides)
    return kw


def make_hf_llama(path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """Save a random transformers LlamaForCausalLM to ``path``; return the model (eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**tiny_llama_kwargs(**overrides))).to(dtype).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture
def hf_llama(tmp_path):
    """(directory, transformers model) of a tiny random Llama checkpoint."""
    path = tmp_path / "hf-llama"
    return path, make_hf_llama(path)
