"""The encoder tasks: ``--task classify`` (sequence classification) and ``--task mlm`` (masked-LM)
of a BERT, with LoRA / DoRA or fully.

    summary = train.main(TrainConfig(model="bert-debug", task="classify", peft="lora", init="random"))
    summary["eval_accuracy_end"]     # held-out accuracy (classify) or masked-token accuracy (mlm)

- Model: a BERT preset or ``--checkpoint-dir``; its head becomes a fresh classifier of the right
  size (``bert.with_head``) unless it already is one, or the masked-LM head for ``mlm``.
- LoRA / DoRA: adapters on ``--lora.targets`` (``default``: query, value) of the encoder; a
  classifier's head (pooler + classifier, ``bert.HEAD_PATTERN``) is trained in full beside them,
  as peft's ``modules_to_save``, and saved in the adapter. QLoRA is not supported here.
- Loss and metric: cross-entropy per text (classify) or per masked token (mlm), and the accuracy
  of the same predictions; masked-LM logits are computed only at the masked positions.
- Data: see ``classify_data``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from purefine import data, losses, models, ops
from purefine.errors import ConfigError
from purefine.models import bert
from purefine.recipes.tasks.base import Task
from purefine.recipes.tasks.classify_data import (
    batches, column, encode, held_labels, is_class_id, label_ids, label_names, masking_of, read_splits, source_of,
    tokenizer_source,
)


def with_task_head(cfg: Any, model_cfg: Any, params: dict, rows: Any) -> tuple[Any, dict, list[int] | None]:
    """(model config with the task's head, params, training class ids or None for masked-LM)."""
    if model_cfg.model_type != "bert":
        raise ConfigError(f"--task {cfg.task}: needs a BERT encoder (--model bert-debug / bert-base-uncased or a BERT "
                          f"--checkpoint-dir), found model_type {model_cfg.model_type!r}")
    if cfg.task == "mlm":
        if model_cfg.head != "mlm":
            model_cfg, params = bert.with_head(model_cfg, params, "mlm", seed=cfg.seed)
        return model_cfg, params, None
    names = label_names(rows, cfg, model_cfg)
    values = column(rows, cfg.data.label_column, "--data.label-column", source_of(cfg))
    n = cfg.num_labels or (len(names) if names else 1 + max((int(v) for v in values if is_class_id(v)), default=0))
    if n < 2 or (names and len(names) > n):
        raise ConfigError(f"--num-labels {n}: the classes of --data.label-column {cfg.data.label_column!r} "
                          f"need at least {max(2, len(names or ()))}")
    ids = label_ids(values, names, n, data.sources.describe(source_of(cfg), cfg.data.split))
    names = tuple(names) + tuple(f"LABEL_{i}" for i in range(len(names), n)) if names else None
    if model_cfg.head != "classify" or model_cfg.num_labels != n or model_cfg.label_names not in (None, names):
        model_cfg, params = bert.with_head(model_cfg, params, "classify", num_labels=n, seed=cfg.seed, label_names=names)
    elif names is not None:
        model_cfg = dataclasses.replace(model_cfg, label_names=names)
    return model_cfg, params, ids


def loss(model_cfg: Any, gather: Any, remat: bool) -> Any:
    """(params, batch) -> (summed cross-entropy fp32, count, {"accuracy": correct predictions})."""
    g = gather or (lambda subtree: subtree)

    def fn(params: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        h, _ = models.hidden_states(model_cfg, params, batch["tokens"], mask=batch["mask"], remat=remat, gather=gather)
        head = bert.head_params(model_cfg, params, g)
        labels = batch["labels"]
        if model_cfg.head == "classify":
            logits = bert.classify(model_cfg, head, h)
            total, n = bert.classification_loss(model_cfg, logits, labels)
            if model_cfg.problem != "single_label_classification":
                return total, n
        else:
            picked = labels.reshape(-1) != ops.IGNORE_INDEX
            logits = bert.mlm_logits(model_cfg, head, h.reshape(-1, h.shape[-1])[picked])
            labels = labels.reshape(-1)[picked]
            total, n = losses.cross_entropy(logits, labels)
        correct = ((logits.detach().argmax(-1) == labels) & (labels != ops.IGNORE_INDEX)).sum()
        return total, n, {"accuracy": correct}

    return fn


def build(cfg: Any, model_cfg: Any, params: Any, layout: Any) -> Task:
    """The classify or mlm task: the encoder with its head, the encoded texts, batches and loss."""
    rows, held = read_splits(cfg)
    model_cfg, params, ids = with_task_head(cfg, model_cfg, params, rows)
    tok_path = tokenizer_source(cfg)
    tokenizer = data.load_tokenizer(tok_path, model_vocab_size=model_cfg.vocab_size)
    where = data.sources.describe(source_of(cfg), cfg.data.split)
    train_set = encode(rows, tokenizer, cfg, ids, where)
    eval_set = None if held is None else encode(held, tokenizer, cfg, held_labels(cfg, model_cfg, held), "held-out data")
    masking, pad_id = masking_of(cfg, tokenizer), tokenizer.pad_id

    def stream(dataset: Any, state: data.SamplerState, *, shuffle: bool, loop: bool, rank: int = 0,
               world_size: int = 1) -> Any:
        return batches(dataset, batch_size=cfg.batch_size, pad_id=pad_id, masking=masking, state=state,
                       shuffle=shuffle, loop=loop, rank=rank, world_size=world_size)

    classify = model_cfg.head == "classify"
    facts = {"num_labels": model_cfg.num_labels, "label_names": list(model_cfg.label_names or ())} if classify else {}
    return Task(cfg.task, model_cfg, params, tok_path, train_set, eval_set, stream,
                loss=lambda gather, remat: loss(model_cfg, gather, remat),
                full=bert.HEAD_PATTERN if classify else None, full_name="the classifier head",
                header=f"classify, {model_cfg.num_labels} labels" if classify else "mlm", facts=facts)

