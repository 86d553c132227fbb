"""The transformers + peft side of a benchmark case, as an HF user writes it (run in a child process).

- The fixture's weights through ``AutoModelForCausalLM.from_pretrained`` (SDPA attention), in the workload's
  storage dtype (bf16 for a frozen bf16 base, fp32 masters for full fine-tuning).
- QLoRA on CPU: bitsandbytes has no CPU kernels for training here, so every linear layer of the blocks
  (the layers purefine quantizes) holds a torchao ``NF4Tensor`` (blocks of 64, absmax scales quantized in
  groups of up to 256: QLoRA's scheme); ``F.linear`` on it dequantizes on the fly, forward and backward.
  Without torchao the case is n/a. On CUDA: bitsandbytes' 4-bit NF4 with double quantization through
  ``BitsAndBytesConfig`` (what HF's QLoRA recipes load), torchao's NF4Tensor where bitsandbytes is not
  installed (the record's ``library`` says which).
- LoRA: ``peft.get_peft_model`` with ``LoraConfig(r=8, lora_alpha=16, target_modules=[q_proj, v_proj])``,
  then the fixture's initial adapter through ``set_peft_model_state_dict`` (the same A and B as purefine's).
- bf16: matmuls under ``torch.autocast(device, bfloat16)`` (HF Trainer's ``bf16=True``) over bf16 frozen
  weights and fp32 trainable tensors (peft keeps adapters in fp32).
- The step: ``model(input_ids=tokens, labels=tokens).loss`` (transformers shifts the labels),
  ``backward``, fused ``torch.optim.AdamW`` (HF Trainer's default ``adamw_torch_fused``), ``zero_grad``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
from typing import Any

import torch

from purefine.recipes.bench_workload import RECIPE, Fixture, Unavailable, Workload, batches, child_result, \
    resident_bytes, run_steps, stored_bytes

NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256
NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"  # torchao >= 0.14
NF4_MODULE_OLD = "torchao.dtypes.nf4tensor"


def to_nf4() -> Any:
    """torchao's ``to_nf4(tensor, block_size, scaler_block_size)``; Unavailable without torchao."""
    for name in (NF4_MODULE, NF4_MODULE_OLD):
        try:
            return importlib.import_module(name).to_nf4
        except ImportError:
            continue
    raise Unavailable("QLoRA on the HF side needs torchao's NF4Tensor (bitsandbytes has no CPU training kernels "
                      "here): pip install torchao")


def quantize_blocks(model: torch.nn.Module) -> None:
    """Replace the weight (out, in) of every ``nn.Linear`` inside ``model.model.layers`` by a frozen NF4Tensor."""
    convert = to_nf4()
    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.detach()
            blocks = w.numel() // NF4_BLOCK
            scaler = math.gcd(blocks, NF4_SCALER_BLOCK)  # torchao needs groups that divide the block count
            module.weight = torch.nn.Parameter(convert(w, NF4_BLOCK, scaler), requires_grad=False)
            del w


def bitsandbytes_config(w: Workload, device: str) -> Any:
    """QLoRA's ``BitsAndBytesConfig`` (NF4, double quantization, compute in the workload's dtype) on CUDA
    when bitsandbytes is installed and imports; None otherwise (torchao's NF4Tensor is used instead)."""
    if w.mode != "qlora" or torch.device(device).type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        return None
    try:
        import bitsandbytes  # noqa: F401  (a build without kernels for this CUDA fails here: torchao instead)
    except Exception:
        return None
    import transformers

    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=w.dtype)


def load_model(w: Workload, fixture: Fixture, device: str = "cpu") -> torch.nn.Module:
    """The fixture as a transformers model on ``device`` with peft adapters (LoRA, QLoRA) or all weights
    trainable (full)."""
    try:
        import peft
        import transformers
        from safetensors.torch import load_file
    except ImportError as e:
        raise Unavailable(f"transformers and peft are needed: pip install 'purefine[bench]' ({e})") from None
    bnb = bitsandbytes_config(w, device)
    extra = {"quantization_config": bnb, "device_map": {"": torch.device(device)}} if bnb is not None else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(fixture.base, dtype=w.frozen_dtype,
                                                              attn_implementation="sdpa", **extra)
    if bnb is None:
        model = model.to(device)
        if w.mode == "qlora":
            quantize_blocks(model)
    if w.remat:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not w.adapters:
        return model
    config = peft.LoraConfig(r=RECIPE["lora_rank"], lora_alpha=RECIPE["lora_alpha"],
                             target_modules=list(RECIPE["lora_targets"]), lora_dropout=RECIPE["lora_dropout"],
                             bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    result = peft.set_peft_model_state_dict(model, load_file(fixture.adapter / "adapter_model.safetensors"))
    if result.unexpected_keys:
        raise RuntimeError(f"bench_hf: the fixture adapter has keys peft does not expect: {result.unexpected_keys[:3]}")
    return model


def library(w: Workload | None = None, device: str = "cpu") -> str:
    """"transformers X + peft Y" (the versions measured), "+ bitsandbytes Z" or "+ torchao NF4" for QLoRA."""
    import peft
    import transformers

    name = f"transformers {transformers.__version__} + peft {peft.__version__}"
    if w is not None and w.mode == "qlora":
        if bitsandbytes_config(w, device) is not None:
            import bitsandbytes

            return f"{name} + bitsandbytes {bitsandbytes.__version__}"
        return f"{name} + torchao NF4"
    return name


def run_hf(w: Workload, fixture: Fixture, steps: int, warmup: int, device: str = "cpu") -> dict[str, Any]:
    """Train ``warmup + steps`` steps of ``w`` through transformers + peft on ``device``; returns the child record."""
    model = load_model(w, fixture, device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = sum(stored_bytes(t) for t in model.state_dict().values())
    opt = torch.optim.AdamW(trainable, lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"], fused=True)
    kind = torch.device(device).type
    autocast = torch.autocast(kind, dtype=torch.bfloat16) if w.dtype == torch.bfloat16 else contextlib.nullcontext()
    data = batches(w, model.config.vocab_size, warmup + steps, device)
    setup_rss = resident_bytes()

    def one(batch: dict[str, torch.Tensor]) -> float:
        with autocast:
            loss = model(input_ids=batch["tokens"], labels=batch["tokens"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    losses, seconds = run_steps(one, data, warmup, device)
    return child_result(library(w, device), losses, seconds, weights_bytes=weights, setup_rss_bytes=setup_rss)
