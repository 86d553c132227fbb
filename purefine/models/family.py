"""What a model family declares: the ``Family`` record, the ``ModelConfig`` base, the block ``Context``.

A family is one file of differences plus a line in ``registry.py``. It defines a frozen config
dataclass (a ``ModelConfig``: ``from_hf`` / ``to_hf`` / ``param_shapes`` and the per-layer attributes
the shared forward reads), its presets, the pure functions that differ (``embed``, ``block``,
``final``), and one ``Family`` record naming them with everything else the house needs: LoRA
targets, the tensor-parallel plan, the pipeline split points, checkpoint quirks. ``decoder.py``
runs every family through the same prologue, layer loop and epilogue; nothing outside the family
file probes it (no ``hasattr``): what it can do is a field here.

    FAMILY = Family(name="llama", model_types=("llama",), config=LlamaConfig, presets=PRESETS,
                    embed=embed, block=block, final=final, output_weight=output_weight)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from purefine import ops

Gather = Callable[[Any], Any]


class ModelConfig:
    """What the shared forward reads of every family's config (frozen dataclasses inherit it).

    Field names stay the HF ones; a family whose HF names differ (GPT-2's ``n_layer``) adds the
    properties ``num_hidden_layers``, ``hidden_size``, ``num_key_value_heads`` and ``head_dim``.
    """

    model_type: ClassVar[str]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF tensor name: shape} in the order ``init`` creates them (purefine's (out, in) layout)."""
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        """Parameter count, from shapes alone."""
        return sum(math.prod(s) for s in self.param_shapes().values())

    def layer_window(self, layer: int) -> int | None:
        """The sliding attention window of layer ``layer`` (None: every earlier key)."""
        return None

    @property
    def logit_softcap(self) -> float | None:
        """The final logit soft-cap (Gemma-2's ``final_logit_softcapping``), or None."""
        return None

    def to_hf(self, dtype: torch.dtype | None = None) -> dict:
        """A Hugging Face ``config.json`` dict."""
        raise NotImplementedError


@dataclass(frozen=True)
class Context:
    """What every block of one forward shares: positions (B, T), the rotary cos / sin (B, T, R) or
    None, one prepared attention mask per layer (None = plain causal), and the KV cache or None."""

    positions: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    masks: tuple[torch.Tensor | None, ...]
    cache: ops.KVCache | None = None


def hf_fields(cls: type, d: dict, names: set[str]) -> dict:
    """The config.json values of ``names`` for the dataclass ``cls``: missing keys are left to the
    defaults; an explicit null is kept where the field admits None (``"eos_token_id": null`` means
    none, not the default) and left to the default elsewhere."""
    nullable = {f.name for f in dataclasses.fields(cls) if "None" in str(f.type)}
    return {k: d[k] for k in names if k in d and (d[k] is not None or k in nullable)}


# Rows of a low-precision tensor drawn at a time (float32 elements): the float32 draw never exists whole.
INIT_BLOCK = 1 << 22


def normal_tensor(shape: tuple[int, ...], std: float, gen: torch.Generator,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, std) of ``shape`` in ``dtype`` (CPU): drawn in float32 from ``gen`` (the same values as one
    float32 draw, rounded), a block of rows at a time for a lower-precision ``dtype``."""
    if dtype == torch.float32 or len(shape) < 2 or math.prod(shape) <= INIT_BLOCK:
        return torch.empty(shape).normal_(0.0, std, generator=gen).to(dtype)
    out = torch.empty(shape, dtype=dtype)
    row = math.prod(shape[1:])
    rows = max(16, INIT_BLOCK // row // 16 * 16)  # whole multiples of 16 values: torch draws normals 16 at a time
    for i in range(0, shape[0], rows):
        block = out[i : i + rows]
        block.copy_(torch.empty(block.shape).normal_(0.0, std, generator=gen))
    return out


def normal_init(cfg: Any, name: str, shape: tuple[int, ...], gen: torch.Generator,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """HF's init (CPU, in ``dtype``): ones for norm weights, zeros for biases, N(0, initializer_range) else."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    return normal_tensor(shape, cfg.initializer_range, gen, dtype)


def same_name(cfg: Any, name: str) -> str | None:
    """A checkpoint tensor's params name: itself (no legacy names to read)."""
    return name


def no_fields(cfg: Any) -> dict:
    """No adapter_config.json fields of the family's own."""
    return {}


@dataclass(frozen=True)
class Family:
    """A model family, declared.

    - ``name``, ``model_types`` (the HF ``model_type`` values it reads), ``config`` (its
      ``ModelConfig`` dataclass with ``from_hf(dict, source)``), ``presets`` (name -> config).
    - ``embed(cfg, params, tokens, ctx, gather, extra) -> x (B, T, D)``; ``block(cfg, p, x, ctx, i)
      -> x`` (one layer, pure; per-layer attributes from the config); ``final(cfg, params, x, gather)
      -> h`` (the final norm); ``output_weight(cfg, params)`` (the (V, D) head, tied or not).
    - ``layers``: dotted path of the list of layer params; ``first_stage`` / ``last_stage``: the
      top-level modules the first and last pipeline stage hold (the split points are between layers).
    - ``causal`` (False: bidirectional, BERT), ``rotary`` (the context carries RoPE cos / sin).
    - ``lora_targets`` (peft's default), ``linear_layers`` (``all-linear`` and QLoRA's NF4 set),
      ``tp_plan`` ({weight regex: colwise | rowwise}; empty: data parallel and FSDP only).
    - ``init_tensor(cfg, name, shape, generator, dtype)``; ``hf_transposed`` (regex of weights HF files
      store (in, out): GPT-2's Conv1D); ``checkpoint_name(cfg, file name) -> params name or None``
      (legacy names, skipped buffers); ``peft_fields(cfg)`` (adapter_config fields of its own).
    - ``head(cfg, params, h, gather) -> logits`` and ``loss(cfg, chunk_size, remat, gather)``:
      None for language models; an encoder's task heads (BERT) replace them.
    """

    name: str
    model_types: tuple[str, ...]
    config: type
    presets: Mapping[str, Any]
    embed: Callable[..., torch.Tensor]
    block: Callable[..., torch.Tensor]
    final: Callable[..., torch.Tensor]
    output_weight: Callable[[Any, dict], Any]
    layers: str = "model.layers"
    first_stage: tuple[str, ...] = ("model.embed_tokens",)
    last_stage: tuple[str, ...] = ("model.norm", "lm_head")
    causal: bool = True
    rotary: bool = True
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    linear_layers: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    tp_plan: Mapping[str, str] = field(default_factory=dict)
    init_tensor: Callable[..., torch.Tensor] = normal_init
    hf_transposed: str | None = None
    checkpoint_name: Callable[[Any, str], str | None] = same_name
    peft_fields: Callable[[Any], dict] = no_fields
    head: Callable[..., torch.Tensor] | None = None
    loss: Callable[..., Any] | None = None

    def layer_list(self, params: dict) -> list:
        """The list of per-layer params trees at ``self.layers``."""
        node: Any = params
        for part in self.layers.split("."):
            node = node[part]
        return node
