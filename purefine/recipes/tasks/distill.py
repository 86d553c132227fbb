"""``--task distill --teacher DIR``: knowledge distillation of a teacher into the trained model (the
student: LoRA / QLoRA / DoRA or full), in the one loop.

    summary = train.main(TrainConfig(task="distill", teacher="outputs/dpo/merged", model="llama-debug",
                                     init="random", peft="none"))
    summary["eval_kl_start"], summary["eval_kl_end"]     # held-out KL(teacher || student) per token

- Loss per labelled token (Hinton et al.'s soft targets, the common Hugging Face formulation):
  ``alpha * T² * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, label)``, t and s the
  teacher's and student's logits, ``--distill.alpha`` and ``--distill.temperature`` (T). torchtune's
  knowledge-distillation recipe is the case T = 1 with ``kd_ratio`` = alpha: its "forward KL" omits
  the teacher's entropy, a constant, so the gradients are the same and only the reported value
  differs. Logged per token: ``loss``, ``kl`` (the full KL at T), ``ce``; held-out ``eval_kl``.
- Data and batches: the causal-LM task's (supervised rows, templates, loss masks, packing); the
  teacher runs over the same tokens, positions and mask.
- The teacher: an HF model directory, or a training output (its ``merged/`` or ``model/``, or its
  ``adapter/`` folded into the base), loaded without gradients in the compute dtype, its projections
  in NF4 with ``--distill.quantize-teacher``, sharded like the student under FSDP (the same gather
  hook). It may be another size or family; its vocabulary must be the student's: the config's
  ``vocab_size`` and, when the teacher has its own tokenizer, the tokenization of a probe text.
- The KL is computed in token chunks (``losses.chunked_distillation``): neither model's
  (tokens x vocab) logits exist whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from purefine import checkpoint, data, lora, losses, models, nf4, ops, train
from purefine.errors import ConfigError
from purefine.recipes import loading, setup
from purefine.recipes.tasks import causal_lm
from purefine.recipes.tasks.base import Task

PROBE = "The quick brown fox jumps over the lazy dog: 0123456789, ### Response:\n"


def check_vocabulary(teacher_cfg: Any, model_cfg: Any, where: str) -> None:
    """The teacher's vocabulary size must be the student's (the KL compares their token distributions)."""
    if teacher_cfg.vocab_size != model_cfg.vocab_size:
        raise ConfigError(f"--teacher {where}: its vocabulary has {teacher_cfg.vocab_size} tokens, the student's "
                          f"{model_cfg.vocab_size}; distillation compares the two models' distributions over the same "
                          "tokens, so teacher and student need the same tokenizer")


def check_tokenizer(teacher_tok: Path | None, student_tok: Path, vocab_size: int, where: str) -> None:
    """When the teacher comes with a tokenizer, it must split a probe text into the student's ids."""
    if teacher_tok is None or Path(teacher_tok).resolve() == Path(student_tok).resolve():
        return
    theirs = data.load_tokenizer(teacher_tok, model_vocab_size=vocab_size).encode(PROBE)
    ours = data.load_tokenizer(student_tok, model_vocab_size=vocab_size).encode(PROBE)
    if theirs != ours:
        raise ConfigError(f"--teacher {where}: its tokenizer ({teacher_tok}) splits text differently from the "
                          f"student's ({student_tok}); distillation needs one vocabulary (same ids for same tokens)")


def _from_run(path: Path, layout: Any, dtype: torch.dtype) -> tuple[Any, dict, Path | None]:
    """A training output: its full model, or its base with the adapter folded in, in ``dtype``."""
    loaded = loading.load_run(path, device=layout.device)
    params = train.cast_params(lora.merge(loaded.params), dtype)
    return loaded.cfg, params, loaded.tokenizer_path


def load_teacher(cfg: Any, model_cfg: Any, tok_path: Path, layout: Any) -> tuple[Any, dict]:
    """(teacher config, teacher params) for --teacher, in the compute dtype (NF4 projections with
    --distill.quantize-teacher), sharded like the student, vocabulary checked against the student."""
    path, dtype = Path(cfg.teacher), setup.compute_dtype(cfg)
    if not path.is_dir():
        raise ConfigError(f"--teacher {path}: directory not found")
    if (path / "config.json").is_file():
        teacher_cfg = checkpoint.read_config(path)[0]
        check_vocabulary(teacher_cfg, model_cfg, str(path))
        quantize = models.quantize_pattern(teacher_cfg) if cfg.distill.quantize_teacher else None
        reader = layout.checkpoint_reader(teacher_cfg, dtype=dtype, quantize=quantize)
        teacher_cfg, params = checkpoint.load_hf(path, dtype=dtype, quantize=quantize, device=layout.device,
                                                 reader=reader)
        check_tokenizer(path if setup.has_tokenizer(path) else None, tok_path, model_cfg.vocab_size, str(path))
        return teacher_cfg, (params if reader is not None else layout.shard_params(teacher_cfg, params))
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"--teacher {path}: expected an HF model directory (config.json) or a training output "
                          "directory (config.yaml with adapter/ or model/)")
    teacher_cfg, params, teacher_tok = _from_run(path, layout, dtype)
    check_vocabulary(teacher_cfg, model_cfg, str(path))
    check_tokenizer(teacher_tok, tok_path, model_cfg.vocab_size, str(path))
    if cfg.distill.quantize_teacher:
        params = nf4.quantize(params, where=models.quantize_pattern(teacher_cfg))
    return teacher_cfg, layout.shard_params(teacher_cfg, params)


def loss(model_cfg: Any, teacher_cfg: Any, teacher: dict, opts: Any, gather: Callable[[Any], Any] | None,
         remat: bool) -> Callable[[Any, dict], tuple]:
    """(params, batch) -> (summed distillation loss, labelled tokens, {"kl": sum, "ce": sum})."""
    g = gather or (lambda subtree: subtree)

    def fn(params: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        tokens, positions, mask = batch["tokens"], batch.get("positions"), models.batch_mask(batch)
        h, _ = models.hidden_states(model_cfg, params, tokens, positions=positions, mask=mask, remat=remat, gather=gather)
        labels = batch["labels"].reshape(-1)
        picked = labels != ops.IGNORE_INDEX
        with torch.no_grad():
            h_teacher, _ = models.hidden_states(teacher_cfg, teacher, tokens, positions=positions, mask=mask, gather=gather)
            h_teacher = h_teacher.reshape(-1, h_teacher.shape[-1])[picked]
            w_teacher = g(models.output_weight(teacher_cfg, teacher))
        total, kl, ce = losses.chunked_distillation(
            h.reshape(-1, h.shape[-1])[picked], g(models.output_weight(model_cfg, params)), h_teacher, w_teacher,
            labels[picked], alpha=opts.alpha, temperature=opts.temperature, softcap=model_cfg.logit_softcap,
            teacher_softcap=teacher_cfg.logit_softcap)
        return total, picked.sum(), {"kl": kl, "ce": ce}

    return fn


def build(cfg: Any, model_cfg: Any, params: Any, layout: Any) -> Task:
    """The distillation task: the causal-LM task's data and batches with the teacher's soft targets."""
    if not models.family(model_cfg).causal:
        raise ConfigError(f"--task distill: needs a causal language model; {model_cfg.model_type} is an encoder")
    task = causal_lm.build(cfg, model_cfg, params, layout)
    teacher_cfg, teacher = load_teacher(cfg, model_cfg, task.tokenizer_path, layout)
    if not models.family(teacher_cfg).causal:
        raise ConfigError(f"--teacher {cfg.teacher}: needs a causal language model; {teacher_cfg.model_type} is an encoder")
    opts = cfg.distill
    facts = {"teacher": str(cfg.teacher), "teacher_model_type": teacher_cfg.model_type,
             "teacher_params": teacher_cfg.num_params, "alpha": opts.alpha, "temperature": opts.temperature}
    return dataclasses.replace(
        task, name="distill", loss=lambda gather, remat: loss(model_cfg, teacher_cfg, teacher, opts, gather, remat),
        header=f"distill from {cfg.teacher} ({teacher_cfg.model_type}), alpha {opts.alpha:g}, T {opts.temperature:g}",
        facts=facts)
