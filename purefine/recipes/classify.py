"""The encoder recipe: ``main(cfg)`` fine-tunes a BERT for sequence classification (``--task classify``,
labels from a dataset column) or masked-LM (``--task mlm``), with LoRA / DoRA or fully.

    summary = main(TrainConfig(model="bert-debug", task="classify", peft="lora", init="random"))
    summary["eval_accuracy_end"]     # held-out accuracy (classify) or masked-token accuracy (mlm)

- Data: ``--data.source`` rows with a text column (``--data.text-column``, default ``text``) and,
  to classify, a label column (``--data.label-column``, default ``label``) of class ids 0..C-1 or of
  names. Names map to ids by the checkpoint's ``id2label`` when it has them all, else in sorted
  order, and become the saved model's ``id2label``; ``--num-labels`` defaults to what the training
  data holds. ``builtin:demo`` (the default source) means the bundled topic set
  (``purefine/assets/classify``, made by ``scripts/make_classify_data.py``: 4 topics, 800 / 200
  rows) with its WordPiece tokenizer. Each text is ``[CLS] text [SEP]`` (the tokenizer's bos / eos,
  else cls / sep), cut to ``--max-seq-len``; batches are right-padded with a key mask.
- Model: a BERT preset or ``--checkpoint-dir``; its head becomes a fresh classifier of the right
  size (``bert.with_head``) unless it already is one, or the masked-LM head for ``mlm``.
- LoRA / DoRA: adapters on ``--lora.targets`` (``default``: query, value) of the encoder; a
  classifier's head (pooler + classifier, ``bert.HEAD_PATTERN``) is trained in full beside them,
  as peft's ``modules_to_save``, and saved in the adapter. QLoRA and ``torchrun`` are not supported here.
- Outputs as the train recipe's: ``adapter/`` (PEFT ``SEQ_CLS``) or ``model/``, ``merged/`` with
  ``--save-merged``, ``config.yaml``, ``metrics.jsonl``, ``summary.json`` with the held-out loss and
  accuracy (over the first ``--eval-batches`` batches) at the start and the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from purefine import data, fsutil, lora, models, train
from purefine.config import TrainConfig, to_yaml, uses_remat, validate
from purefine.configio import to_dict
from purefine.errors import ConfigError, DataError, PurefineError
from purefine.logging import MetricsLogger, peak_memory_bytes
from purefine.models import bert
from purefine.recipes import train as recipe

CLASSIFY_DIR = data.ASSETS_DIR / "classify"
BUILTIN_SOURCES = (data.BUILTIN_DEMO, "builtin:classify")
MASK_TOKENS = ("[MASK]", "<mask>")
MLM_PROBABILITY = 0.15  # BERT's: of the chosen tokens 80% become [MASK], 10% a random token, 10% stay


@dataclass(frozen=True)
class Encoded:
    """Tokenized texts: ``tokens`` (one id list per row), ``labels`` (a class id per row, or None
    for masked-LM), ``lengths`` (N,) for the sampler, and the split's ``name`` for messages."""

    tokens: list[list[int]]
    labels: list[int] | None
    lengths: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.tokens)


def source_of(cfg: TrainConfig) -> str:
    """The data source: the bundled topic set for ``builtin:demo`` / ``builtin:classify``."""
    return str(CLASSIFY_DIR) if cfg.data.source in BUILTIN_SOURCES else cfg.data.source


def tokenizer_source(cfg: TrainConfig) -> Path:
    """--tokenizer, else the checkpoint's tokenizer files, else the bundled WordPiece tokenizer for
    the bundled data and the demo SentencePiece tokenizer for any other data."""
    if cfg.tokenizer is not None:
        return Path(cfg.tokenizer)
    if cfg.checkpoint_dir is not None and recipe.tokenizer_files(Path(cfg.checkpoint_dir)):
        return Path(cfg.checkpoint_dir)
    return CLASSIFY_DIR if cfg.data.source in BUILTIN_SOURCES else data.DEMO_TOKENIZER


def read_splits(cfg: TrainConfig) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(training rows, held-out rows or None) of --data.source / --data.eval-source."""
    d, source = cfg.data, source_of(cfg)
    rows = data.load_split(source, d.split, subset=d.subset, revision=d.revision, cache_dir=d.cache_dir)
    if d.max_samples is not None:
        rows = rows.select(range(min(d.max_samples, len(rows))))
    eval_source = d.eval_source if d.eval_source is not None else source
    if d.eval_source is None and data.sources.is_single_file(source):
        return rows, None
    held = data.load_split(eval_source, d.eval_split, subset=d.subset, revision=d.revision, cache_dir=d.cache_dir,
                           missing_ok=d.eval_source is None)
    return rows, held


def column(rows: datasets.Dataset, name: str, flag: str, source: str) -> list[Any]:
    """The values of column ``name``, or a DataError naming the source, the flag and the columns."""
    if name not in rows.column_names:
        raise DataError(f"{source}: no column {name!r} ({flag}); the columns are {rows.column_names}")
    return rows[name]


def label_names(rows: datasets.Dataset, cfg: TrainConfig, model_cfg: Any) -> tuple[str, ...] | None:
    """The class names the label column uses, or None when it holds class ids: a ClassLabel's
    names, else the checkpoint's names if they cover the column, else the sorted distinct names."""
    name = cfg.data.label_column
    feature = rows.features.get(name)
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names)
    values = column(rows, name, "--data.label-column", source_of(cfg))
    if not all(isinstance(v, str) for v in values) or all(v.strip().isdigit() for v in values):
        return None
    known = getattr(model_cfg, "label_names", None) if getattr(model_cfg, "head", None) == "classify" else None
    return tuple(known) if known and set(values) <= set(known) else tuple(sorted(set(values)))


def is_class_id(value: Any) -> bool:
    """A label value that is a class id: a non-negative int, or such an int written as text (CSV)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0 or isinstance(value, str) and value.strip().isdigit()


def label_ids(values: list[Any], names: tuple[str, ...] | None, num_labels: int, where: str) -> list[int]:
    """Class ids in [0, num_labels) for the label column's values; a bad one is a DataError naming its row."""
    index = {n: i for i, n in enumerate(names or ())}
    out = []
    for row, v in enumerate(values):
        if isinstance(v, str) and v in index:
            out.append(index[v])
            continue
        if not is_class_id(v) or not 0 <= int(v) < num_labels:
            expected = f"one of {list(names)}" if names else f"a class id in [0, {num_labels})"
            raise DataError(f"{where}: row {row}: label {v!r}: expected {expected} (--data.label-column, --num-labels)")
        out.append(int(v))
    return out


def encode(rows: datasets.Dataset, tokenizer: Any, cfg: TrainConfig, labels: list[int] | None, name: str) -> Encoded:
    """Rows -> ``[CLS] text [SEP]`` ids cut to --max-seq-len (the last id kept), with their labels."""
    tokens = []
    for row, text in enumerate(column(rows, cfg.data.text_column, "--data.text-column", name)):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{name}: row {row}: column {cfg.data.text_column!r}: expected non-empty text, found {text!r}")
        ids = tokenizer.encode(text, bos=True, eos=True)
        tokens.append(ids if len(ids) <= cfg.max_seq_len else [*ids[: cfg.max_seq_len - 1], ids[-1]])
    return Encoded(tokens, labels, np.array([len(t) for t in tokens], dtype=np.int64), name)


def mask_tokens(tokens: torch.Tensor, real: torch.Tensor, special: list[int], mask_id: int, vocab: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of tokens (B, T): (inputs, labels (B, T), -100 where not chosen). At least one
    non-special token per row is chosen (15% on average), never padding or special tokens."""
    candidates = real & ~torch.isin(tokens, torch.tensor(special, dtype=tokens.dtype))
    draw = torch.rand(tokens.shape, generator=gen)
    chosen = candidates & (draw < MLM_PROBABILITY)
    first = torch.where(candidates, draw, 2.0).argmin(-1, keepdim=True)  # the row's lowest draw, if none was chosen
    chosen |= torch.zeros_like(chosen).scatter_(1, first, True) & candidates & ~chosen.any(-1, keepdim=True)
    how = torch.rand(tokens.shape, generator=gen)
    inputs = torch.where(chosen & (how < 0.8), mask_id, tokens)
    random_ids = torch.randint(0, vocab, tokens.shape, generator=gen)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
    return inputs, torch.where(chosen, tokens, -100)


def collate(enc: Encoded, indices: list[int], pad_id: int, masking: dict | None, seed: int) -> dict[str, torch.Tensor]:
    """The rows ``indices`` right-padded: tokens (B, T), mask (B, T) bool (True = real), labels (B,)
    class ids, or for masked-LM (``masking``) masked tokens and labels (B, T) drawn from ``seed``."""
    t = max(int(enc.lengths[i]) for i in indices)
    tokens = torch.full((len(indices), t), pad_id, dtype=torch.long)
    for r, i in enumerate(indices):
        tokens[r, : enc.lengths[i]] = torch.tensor(enc.tokens[i])
    real = torch.arange(t)[None, :] < torch.as_tensor(enc.lengths[indices])[:, None]
    if masking is None:
        return {"tokens": tokens, "mask": real, "labels": torch.tensor([enc.labels[i] for i in indices])}
    inputs, labels = mask_tokens(tokens, real, gen=torch.Generator().manual_seed(seed), **masking)
    return {"tokens": inputs, "mask": real, "labels": labels}


def batches(enc: Encoded, *, batch_size: int, pad_id: int, masking: dict | None, state: data.SamplerState,
            shuffle: bool, loop: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of one text per row, in the sampler's order (``loop``: epoch after epoch); masked-LM
    masks are drawn from the batch's place in the stream, so a run is repeatable."""
    while True:
        rows, after = data.plan_rows(enc.lengths, state, rows=batch_size, seq_len=int(enc.lengths.max()),
                                     packing=False, shuffle=shuffle, loop=loop)
        if not rows:
            return
        yield collate(enc, [r[0] for r in rows], pad_id, masking, seed=lora.path_seed(state.seed, f"mlm:{state.epoch}:{state.position}"))
        state = after


def masking_of(cfg: TrainConfig, tokenizer: Any) -> dict | None:
    """The masked-LM options (``mask_tokens`` keywords) for --task mlm, else None."""
    if cfg.task != "mlm":
        return None
    mask_id = next((i for t in MASK_TOKENS if (i := tokenizer.token_to_id(t)) is not None), None)
    if mask_id is None:
        raise ConfigError(f"--task mlm: the tokenizer {tokenizer!r} has no mask token ({' or '.join(MASK_TOKENS)})")
    special = {*tokenizer.special_tokens.values(), tokenizer.pad_id}
    special |= {i for i in (getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)) if i is not None}
    return {"special": sorted(special), "mask_id": mask_id, "vocab": tokenizer.vocab_size}


def prepare_model(cfg: TrainConfig, rows: datasets.Dataset, device: torch.device) -> tuple[Any, dict, list[int] | None]:
    """(model config with the task's head, params, training class ids or None for masked-LM)."""
    if cfg.peft == "qlora":
        raise ConfigError("--peft qlora: not supported with --task classify / mlm; use lora, dora or none")
    model_cfg, params = recipe.load_model(cfg, device)
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


def apply_peft(cfg: TrainConfig, model_cfg: Any, params: dict) -> tuple[dict, Any]:
    """(params with adapters on the encoder, trainable filter): adapters, plus a classifier's head in full."""
    if cfg.peft == "none":
        return params, train.all_floating
    head = re.compile(bert.HEAD_PATTERN)
    chosen = [p for p in lora.select_targets(params, models.lora_targets(model_cfg, cfg.lora.targets))
              if not (model_cfg.head == "classify" and head.fullmatch(p))]
    if not chosen:
        raise ConfigError(f"--lora.targets {list(cfg.lora.targets)}: selects only the classifier head, which is "
                          "trained in full; name encoder layers (query, key, value, dense)")
    params = lora.apply(params, rank=cfg.lora.rank, alpha=cfg.lora.alpha, where="|".join(map(re.escape, chosen)),
                        dropout=cfg.lora.dropout, seed=cfg.seed, rslora=cfg.lora.rslora, dora=cfg.peft == "dora")
    return params, lora.trainable_with(bert.HEAD_PATTERN if model_cfg.head == "classify" else None)


def evaluate(model_cfg: Any, params: dict, enc: Encoded | None, cfg: TrainConfig, pad_id: int, masking: dict | None,
             device: torch.device, dtype: torch.dtype) -> dict[str, float] | None:
    """{"loss", "accuracy"} over the first --eval-batches batches of the held-out set: per text for
    classify, per masked token for mlm (the same masks every time); None without held-out data."""
    if enc is None or cfg.eval_batches == 0:
        return None
    loss, correct, count = 0.0, 0, 0
    it = batches(enc, batch_size=cfg.batch_size, pad_id=pad_id, masking=masking,
                 state=data.SamplerState(seed=cfg.seed), shuffle=False, loop=False)
    with torch.no_grad():
        compute = train.cast_params(params, dtype)
        for _, batch in zip(range(cfg.eval_batches), it):
            batch = recipe.to_device(batch, device)
            logits = models.forward(model_cfg, compute, batch["tokens"], mask=batch["mask"]).float()
            picked = batch["labels"] != -100
            logits, labels = logits[picked], batch["labels"][picked]
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct, count = correct + int((logits.argmax(-1) == labels).sum()), count + int(picked.sum())
    return {"loss": loss / count, "accuracy": correct / count} if count else None


def main(cfg: TrainConfig) -> dict:
    """Fine-tune an encoder for --task classify or mlm; returns the summary (losses, eval loss and
    accuracy at start and end, outputs) also written to ``summary.json``."""
    cfg = validate(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"--task {cfg.task}: runs in one process; torchrun layouts are for --task causal_lm")
    out = recipe.prepare_output_dir(cfg.output_dir)
    fsutil.atomic_write(out / "config.yaml", to_yaml(cfg))
    device, dtype = recipe.pick_device(cfg.device), recipe.compute_dtype(cfg)
    torch.manual_seed(cfg.seed)
    rows, held = read_splits(cfg)
    model_cfg, params, ids = prepare_model(cfg, rows, device)
    tok_path = tokenizer_source(cfg)
    tokenizer = data.load_tokenizer(tok_path, model_vocab_size=model_cfg.vocab_size)
    where = data.sources.describe(source_of(cfg), cfg.data.split)
    train_set = encode(rows, tokenizer, cfg, ids, where)
    eval_set = None if held is None else encode(held, tokenizer, cfg, held_labels(cfg, model_cfg, held), "held-out data")
    params, trainable = apply_peft(cfg, model_cfg, params)
    total_steps = recipe.count_steps(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=False)),
                                     train_set, world_size=1)
    opt, schedule = recipe.make_optimizer(cfg.optim, total_steps)
    step_fn = train.make_step(models.loss_fn(model_cfg, remat=uses_remat(cfg)), opt, trainable=trainable,
                              clip_norm=cfg.optim.clip_norm or None, compute_dtype=None if dtype == torch.float32 else dtype,
                              skip_nonfinite=cfg.nan_policy == "skip")
    state = train.init(params, opt, trainable=trainable, seed=cfg.seed, copy=False)
    run = Run(cfg, model_cfg, step_fn, schedule, total_steps, tokenizer.pad_id, masking_of(cfg, tokenizer), device, dtype)
    summary, params = run.loop(state, train_set, eval_set, out)
    summary["outputs"] = recipe.save_outputs(out, cfg, model_cfg, params, tok_path)
    fsutil.atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    print(f"saved {', '.join(f'{k}: {v}' for k, v in summary['outputs'].items())}")
    return summary


def held_labels(cfg: TrainConfig, model_cfg: Any, held: datasets.Dataset) -> list[int] | None:
    """The held-out rows' class ids under the trained head's names (None for masked-LM)."""
    if cfg.task == "mlm":
        return None
    values = column(held, cfg.data.label_column, "--data.label-column", "held-out data")
    feature = held.features.get(cfg.data.label_column)
    names = model_cfg.label_names if not isinstance(feature, datasets.ClassLabel) else tuple(feature.names)
    return label_ids(values, names, model_cfg.num_labels, "held-out data")


def check_finite(metrics: dict, step: int) -> None:
    """Stop on a non-finite loss or gradient norm (unless --nan-policy skip already skipped the step)."""
    if not metrics.get("skipped") and not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
        raise PurefineError(f"step {step}: non-finite loss {metrics['loss']} or grad norm {metrics['grad_norm']}; "
                            "lower --optim.lr, check the data, or pass --nan-policy skip")


@dataclass
class Run:
    """What the training loop needs besides the state and the data."""

    cfg: TrainConfig
    model_cfg: Any
    step_fn: Any
    schedule: Any
    total_steps: int
    pad_id: int
    masking: dict | None
    device: torch.device
    dtype: torch.dtype

    def evaluate(self, params: dict, eval_set: Encoded | None) -> dict[str, float] | None:
        return evaluate(self.model_cfg, params, eval_set, self.cfg, self.pad_id, self.masking, self.device, self.dtype)

    def loop(self, state: train.TrainState, train_set: Encoded, eval_set: Encoded | None, out: Path) -> tuple[dict, dict]:
        """Step to ``total_steps``, logging every step; returns (summary, final params)."""
        cfg = self.cfg
        stream = batches(train_set, batch_size=cfg.batch_size, pad_id=self.pad_id, masking=self.masking,
                         state=data.SamplerState(seed=cfg.seed), shuffle=cfg.data.shuffle, loop=True)
        losses: list[float] = []
        with MetricsLogger(out, every=cfg.log_every, total_steps=self.total_steps, tensorboard=cfg.tensorboard,
                           wandb=cfg.wandb, progress=cfg.progress, plot=cfg.plot, config=to_dict(cfg)) as logger:
            task = f"classify, {self.model_cfg.num_labels} labels" if cfg.task == "classify" else cfg.task
            logger.write(f"model bert ({task}) | {cfg.peft} | {len(train_set)} samples | {self.total_steps} steps | "
                         f"{self.dtype} on {self.device}")
            start = self.evaluate(state.params, eval_set)
            self.report(logger, "at start", start)
            while state.step < self.total_steps:
                micro = [recipe.to_device(next(stream), self.device) for _ in range(cfg.grad_accum)]
                t0, lr = time.perf_counter(), self.schedule(state.step)
                state, metrics = self.step_fn(state, micro)
                check_finite(metrics, state.step)
                metrics |= {"lr": lr, "seconds": time.perf_counter() - t0, "peak_memory": peak_memory_bytes(self.device)}
                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < self.total_steps:
                    metrics |= {f"eval_{k}": v for k, v in (self.evaluate(state.params, eval_set) or {}).items()}
                losses.append(metrics["loss"])
                logger.log(state.step, metrics)
            end = self.evaluate(state.params, eval_set)
            if end is not None and logger.history:
                logger.history[-1] |= {f"eval_{k}": v for k, v in end.items()}
            self.report(logger, "at end", end)
        k = min(5, len(losses))
        summary = {"task": cfg.task, "steps": state.step, "losses": losses, "first_loss": sum(losses[:k]) / k,
                   "last_loss": sum(losses[-k:]) / k, "peak_memory": peak_memory_bytes(self.device),
                   "num_labels": getattr(self.model_cfg, "num_labels", None) if cfg.task == "classify" else None,
                   "label_names": list(self.model_cfg.label_names or ()) if cfg.task == "classify" else None}
        for when, result in (("start", start), ("end", end)):
            summary |= {f"eval_loss_{when}": result and result["loss"], f"eval_accuracy_{when}": result and result["accuracy"]}
        return summary, state.params

    @staticmethod
    def report(logger: Any, when: str, result: dict[str, float] | None) -> None:
        if result is not None:
            logger.write(f"eval_loss {when} {result['loss']:.4f} | eval_accuracy {result['accuracy']:.3f}")
