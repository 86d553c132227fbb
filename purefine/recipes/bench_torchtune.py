"""The torchtune side of a benchmark case, through torchtune's public API (run in a child process).

- The model from ``torchtune.models.llama3.llama3`` / ``lora_llama3`` (the builder that takes the
  fixture's ``rope_theta`` as ``rope_base``; LoRA r=8 alpha=16 on q_proj, v_proj; QLoRA through
  ``quantize_base=True``: every linear layer of the blocks in torchao NF4, as torchtune does it), built
  with the frozen weights' dtype (``training.set_default_dtype``), the adapters in fp32.
- The fixture's HF weights through ``convert_weights.hf_to_tune`` (``load_state_dict``; NF4 weights
  quantize on copy), the fixture's initial adapter copied into ``lora_a`` / ``lora_b``.
- Trainable tensors: ``peft.get_adapter_params`` + ``set_trainable_params`` (LoRA) or every weight (full).
- The step as torchtune's recipes write it: chunked output with ``CEWithChunkedOutputLoss`` (8 chunks)
  on the shifted labels, ``backward``, fused ``torch.optim.AdamW``; bf16 matmuls under
  ``torch.autocast("cpu", bfloat16)``; ``--remat`` cases through ``training.set_activation_checkpointing``.

Not installed, or not importable with this torch / torchao: the case is n/a, with the reason.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import torch

from purefine.recipes.bench_workload import RECIPE, Fixture, Unavailable, Workload, batches, child_result, \
    resident_bytes, run_steps, stored_bytes

OUTPUT_CHUNKS = 8
NF4_GROUP = 64 * 256  # torchao's NF4Tensor: blocks of 64, their scales quantized in groups of 256
PEFT_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.weight")


def import_torchtune() -> Any:
    """The torchtune package; Unavailable (with the reason) when it is missing or fails to import."""
    try:
        import torchtune
        import torchtune.models.convert_weights  # noqa: F401
        import torchtune.models.llama3  # noqa: F401
        import torchtune.modules.loss  # noqa: F401
        import torchtune.modules.peft  # noqa: F401
        import torchtune.training  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"torchtune cannot be imported here ({type(e).__name__}: {e})") from None
    return torchtune


def hf_config(fixture: Fixture) -> dict[str, Any]:
    """The fixture's config.json, with ``rope_theta`` found where transformers 4 or 5 puts it."""
    c = json.loads((fixture.base / "config.json").read_text())
    c.setdefault("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return c


def check_nf4_shapes(c: dict[str, Any]) -> None:
    """Unavailable when a linear layer of the blocks cannot be a torchao NF4Tensor with torchtune's fixed
    block sizes (its element count must be a multiple of 64 x 256)."""
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim, d, i = c.get("head_dim") or c["hidden_size"] // heads, c["hidden_size"], c["intermediate_size"]
    shapes = {"q_proj": (heads * head_dim, d), "k_proj": (kv * head_dim, d), "o_proj": (d, heads * head_dim),
              "gate_proj": (i, d), "down_proj": (d, i)}
    bad = {name: shape for name, shape in shapes.items() if shape[0] * shape[1] % NF4_GROUP}
    if bad:
        raise Unavailable(f"torchtune's NF4 (torchao, blocks of 64 in scale groups of 256) needs weights of a multiple "
                          f"of {NF4_GROUP} elements; {', '.join(f'{k} {list(v)}' for k, v in bad.items())} are not")


def build(tt: Any, w: Workload, c: dict[str, Any]) -> torch.nn.Module:
    """The torchtune decoder for config ``c`` (a dict of HF config fields) and workload ``w``."""
    shape = {"vocab_size": c["vocab_size"], "num_layers": c["num_hidden_layers"], "num_heads": c["num_attention_heads"],
             "num_kv_heads": c.get("num_key_value_heads") or c["num_attention_heads"], "embed_dim": c["hidden_size"],
             "max_seq_len": c["max_position_embeddings"], "intermediate_dim": c["intermediate_size"],
             "norm_eps": c["rms_norm_eps"], "rope_base": c["rope_theta"]}
    with tt.training.set_default_dtype(w.frozen_dtype):
        if not w.adapters:
            return tt.models.llama3.llama3(**shape)
        return tt.models.llama3.lora_llama3(list(RECIPE["lora_targets"]), **shape, lora_rank=RECIPE["lora_rank"],
                                            lora_alpha=RECIPE["lora_alpha"], lora_dropout=RECIPE["lora_dropout"],
                                            quantize_base=w.mode == "qlora")


def load_weights(tt: Any, model: torch.nn.Module, w: Workload, fixture: Fixture, c: dict[str, Any]) -> None:
    """Copy the fixture's base weights (and, for LoRA, its initial adapter) into ``model``."""
    from safetensors.torch import load_file

    hf: dict[str, torch.Tensor] = {}
    for file in sorted(fixture.base.glob("*.safetensors")):
        hf |= load_file(file)
    state = tt.models.convert_weights.hf_to_tune(hf, num_heads=c["num_attention_heads"],
                                                 num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                                                 dim=c["hidden_size"])
    del hf
    if w.adapters:
        for key, t in load_file(fixture.adapter / "adapter_model.safetensors").items():
            m = PEFT_KEY.fullmatch(key)
            if m is None:
                raise RuntimeError(f"bench_torchtune: unexpected adapter key {key!r}")
            # lora_b rows would follow hf_to_tune's q/k row permutation; the initial B is zero, so no reorder.
            state[f"layers.{m[1]}.attn.{m[2]}.lora_{m[3].lower()}.weight"] = t
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lora_" not in k]:
        raise RuntimeError(f"bench_torchtune: weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")


def run_torchtune(w: Workload, fixture: Fixture, steps: int, warmup: int) -> dict[str, Any]:
    """Train ``warmup + steps`` steps of ``w`` through torchtune; returns the child record."""
    tt = import_torchtune()
    c = hf_config(fixture)
    if c.get("model_type") != "llama":
        raise Unavailable(f"this side builds torchtune's Llama; {w.preset} is a {c.get('model_type')} model")
    if w.mode == "qlora":
        check_nf4_shapes(c)
    model = build(tt, w, c)
    load_weights(tt, model, w, fixture, c)
    if w.adapters:
        adapter = tt.modules.peft.get_adapter_params(model)
        tt.modules.peft.set_trainable_params(model, adapter)
        for p in adapter.values():
            p.data = p.data.float()  # fp32 adapters over a bf16 base, as on the other sides
    if w.remat:
        from torchtune.modules import TransformerSelfAttentionLayer

        tt.training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    model.set_num_output_chunks(OUTPUT_CHUNKS)
    loss_fn = tt.modules.loss.CEWithChunkedOutputLoss(num_output_chunks=OUTPUT_CHUNKS)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"], fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if w.dtype == torch.bfloat16 else contextlib.nullcontext()
    weights = sum(stored_bytes(t) for t in model.state_dict().values())
    data = batches(w, c["vocab_size"], warmup + steps)
    setup_rss = resident_bytes()

    def one(batch: dict[str, torch.Tensor]) -> float:
        with autocast:
            loss = loss_fn(model(batch["tokens"]), batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    losses, seconds = run_steps(one, data, warmup)
    return child_result(f"torchtune {tt.__version__}", losses, seconds, weights_bytes=weights, setup_rss_bytes=setup_rss)
