"""BERT encoder as pure functions, with a sequence-classification head and the masked-LM head.

- ``BertConfig``: the fields of Hugging Face's ``BertConfig`` plus ``head``: ``"classify"``
  (``BertForSequenceClassification``) or ``"mlm"`` (``BertForMaskedLM``), read from
  ``architectures`` in config.json.
- ``PRESETS``: bert-base-uncased, bert-large-uncased (masked-LM, as published), bert-debug (tests).
- ``embed`` / ``block``: a bidirectional post-norm encoder run by the shared decoder loop
  (``Family.causal`` False); ``token_type_ids`` come in the forward's ``extra`` inputs.
- ``head``: class logits (B, C) or masked-LM logits (B, T, V); ``loss``: classification (labels
  (B,)) or masked-LM (labels (B, T), -100 = unmasked).
- ``with_head``: swap heads (a pretrained masked-LM checkpoint -> a fresh classifier).
- ``peft_fields``: the adapter fields ``save_peft`` writes (``SEQ_CLS``, the head in ``modules_to_save``).
- ``checkpoint_name``: reads legacy names (``LayerNorm.gamma``/``beta``, no ``bert.`` prefix) and
  skips what a head does not use (next-sentence head, the pooler for masked-LM, tied copies).

The forward is the eval-mode model: no dropout. Params layout (the names transformers saves)::

    bert.embeddings.{word,position,token_type}_embeddings.weight   (V, D), (P, D), (types, D)
    bert.embeddings.LayerNorm.{weight,bias}
    bert.encoder.layer.{i}.attention.self.{query,key,value}.{weight,bias}
    bert.encoder.layer.{i}.attention.output.{dense,LayerNorm}.{weight,bias}
    bert.encoder.layer.{i}.intermediate.dense.{weight,bias}        (F, D)
    bert.encoder.layer.{i}.output.{dense,LayerNorm}.{weight,bias}  (D, F)
    classify: bert.pooler.dense.{weight,bias}, classifier.{weight,bias} (C, D)
    mlm:      cls.predictions.transform.{dense,LayerNorm}.{weight,bias}, cls.predictions.bias (V,)
              (the decoder weight is the word embedding: tied)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from purefine import losses, ops, tree
from purefine.errors import ConfigError, DataError
from purefine.models import decoder
from purefine.models.family import Context, Family, Gather, ModelConfig, hf_fields, normal_tensor

HEADS = {"classify": "BertForSequenceClassification", "mlm": "BertForMaskedLM"}
ARCHITECTURE_HEADS = {**{v: k for k, v in HEADS.items()}, "BertForPreTraining": "mlm"}
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
ENCODER_PREFIXES = ("embeddings.", "encoder.", "pooler.")
# The classification head, trained in full alongside LoRA adapters (peft's ``modules_to_save``).
HEAD_PATTERN = r"(classifier|bert\.pooler\.dense)\.(weight|bias)"
HEAD_MODULES = ("classifier", "bert.pooler.dense")


@dataclass(frozen=True)
class BertConfig(ModelConfig):
    """A BERT architecture; field names are those of Hugging Face's ``BertConfig``."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True
    head: str = "mlm"
    num_labels: int = 2
    label_names: tuple[str, ...] | None = field(default=None)
    problem_type: str | None = None

    model_type: ClassVar[str] = "bert"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "num_labels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"bert config: {name} must be a positive integer, found {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"bert config: hidden_size ({self.hidden_size}) must be a multiple of "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.head not in HEADS:
            raise ConfigError(f"bert config: head: expected one of {sorted(HEADS)}, found {self.head!r}")
        if self.head == "mlm" and not self.tie_word_embeddings:
            raise ConfigError("bert config: the masked-LM head needs tie_word_embeddings=true (its decoder is "
                              "the word embedding), found false")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"bert config: problem_type: expected one of {PROBLEM_TYPES}, found {self.problem_type!r}")
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            raise ConfigError(f"bert config: {len(self.label_names)} label names for num_labels={self.num_labels}")
        ops.activation(self.hidden_act, "bert config: hidden_act")

    @property
    def architecture(self) -> str:
        """The transformers class of this head (``BertForSequenceClassification`` / ``BertForMaskedLM``)."""
        return HEADS[self.head]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def problem(self) -> str:
        """The classification loss, by transformers' rule: regression for one label, else single-label."""
        if self.problem_type is not None:
            return self.problem_type
        return "regression" if self.num_labels == 1 else "single_label_classification"

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF tensor name: shape} of the encoder and the config's head, in the order ``init`` creates them."""
        d, f = self.hidden_size, self.intermediate_size
        e = "bert.embeddings."
        shapes = {e + "word_embeddings.weight": (self.vocab_size, d),
                  e + "position_embeddings.weight": (self.max_position_embeddings, d),
                  e + "token_type_embeddings.weight": (self.type_vocab_size, d), **_norm_shapes(e + "LayerNorm", d)}
        for i in range(self.num_hidden_layers):
            p = f"bert.encoder.layer.{i}."
            for name in ("query", "key", "value"):
                shapes.update(_linear_shapes(p + "attention.self." + name, d, d))
            shapes.update(_linear_shapes(p + "attention.output.dense", d, d))
            shapes.update(_norm_shapes(p + "attention.output.LayerNorm", d))
            shapes.update(_linear_shapes(p + "intermediate.dense", f, d))
            shapes.update(_linear_shapes(p + "output.dense", d, f))
            shapes.update(_norm_shapes(p + "output.LayerNorm", d))
        shapes.update(head_shapes(self))
        return shapes

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> BertConfig:
        """Read a Hugging Face config dict; the head comes from ``architectures`` (default masked-LM)."""
        arch = (d.get("architectures") or ["BertForMaskedLM"])[0]
        if arch not in ARCHITECTURE_HEADS:
            raise ConfigError(f"{source}: architectures: purefine's bert reads {sorted(ARCHITECTURE_HEADS)}, found {arch!r}")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ConfigError(f"{source}: is_decoder / add_cross_attention: purefine's bert is an encoder only")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"{source}: position_embedding_type: expected 'absolute', found {d['position_embedding_type']!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"head", "label_names", "num_labels"}
        kwargs = hf_fields(cls, d, names)
        id2label = d.get("id2label")
        if isinstance(id2label, dict) and id2label:
            kwargs["label_names"] = tuple(str(id2label.get(str(i), id2label.get(i))) for i in range(len(id2label)))
            kwargs["num_labels"] = len(id2label)
        elif d.get("num_labels") is not None:
            kwargs["num_labels"] = d["num_labels"]
        try:
            return cls(**kwargs, head=ARCHITECTURE_HEADS[arch])
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self, dtype: torch.dtype | None = None) -> dict:
        """A Hugging Face ``config.json`` dict for the head's transformers class."""
        d = {"architectures": [self.architecture], "model_type": self.model_type, **dataclasses.asdict(self)}
        for key in ("head", "label_names", "num_labels"):
            d.pop(key)
        names = self.label_names or tuple(f"LABEL_{i}" for i in range(self.num_labels))
        d["id2label"] = {str(i): n for i, n in enumerate(names)}
        d["label2id"] = {n: i for i, n in enumerate(names)}
        if dtype is not None:
            d["torch_dtype"] = str(dtype).removeprefix("torch.")
        return d


PRESETS: dict[str, BertConfig] = {
    "bert-base-uncased": BertConfig(),
    "bert-large-uncased": BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096),
    "bert-debug": BertConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=128, head="classify"),
}


def _linear_shapes(prefix: str, out: int, inp: int) -> dict[str, tuple[int, ...]]:
    return {prefix + ".weight": (out, inp), prefix + ".bias": (out,)}


def _norm_shapes(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    return {prefix + ".weight": (d,), prefix + ".bias": (d,)}


def head_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape} of the head alone (pooler + classifier, or the masked-LM transform)."""
    d = cfg.hidden_size
    if cfg.head == "classify":
        return {**_linear_shapes("bert.pooler.dense", d, d), **_linear_shapes("classifier", cfg.num_labels, d)}
    return {**_linear_shapes("cls.predictions.transform.dense", d, d),
            **_norm_shapes("cls.predictions.transform.LayerNorm", d), "cls.predictions.bias": (cfg.vocab_size,)}


def init_tensor(cfg: BertConfig, name: str, shape: tuple[int, ...], gen: torch.Generator,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """HF's init: N(0, initializer_range) matrices and embeddings (the padding row zero), LayerNorm
    weights one, biases zero."""
    if "LayerNorm.weight" in name:
        return torch.ones(shape, dtype=dtype)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    t = normal_tensor(shape, cfg.initializer_range, gen, dtype)
    if name.endswith("word_embeddings.weight") and cfg.pad_token_id is not None:
        t[cfg.pad_token_id] = 0  # as nn.Embedding(padding_idx=...) in transformers' init
    return t


def with_head(cfg: BertConfig, params: dict, head: str, *, num_labels: int = 2, seed: int = 0,
              label_names: tuple[str, ...] | None = None) -> tuple[BertConfig, dict]:
    """(config, params) with ``head`` in place of the current one: the encoder is kept, the old
    head's tensors dropped and the new head's initialized (seeded) in the encoder's dtype.
    E.g. ``with_head(*load_hf("bert-base-uncased"), "classify", num_labels=3)``."""
    new = dataclasses.replace(cfg, head=head, num_labels=num_labels, label_names=label_names)
    flat = {n: t for n, t in tree.flatten(params, is_leaf=tree.is_leaf).items() if n not in head_shapes(cfg)}
    word = flat["bert.embeddings.word_embeddings.weight"]
    gen = torch.Generator().manual_seed(seed)
    flat.update({n: init_tensor(new, n, s, gen).to(word.dtype).to(word.device) for n, s in head_shapes(new).items()})
    return new, tree.unflatten({n: flat[n] for n in new.param_shapes()})


def checkpoint_name(cfg: BertConfig, name: str) -> str | None:
    """The params name of a checkpoint tensor, or None to skip one this head does not use."""
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))
    if name.startswith(ENCODER_PREFIXES):
        name = "bert." + name
    skip = (name == "bert.embeddings.position_ids" or name.startswith("cls.seq_relationship.")
            or name.startswith("cls.predictions.decoder.")  # tied to the word embedding and cls.predictions.bias
            or (cfg.head == "mlm" and name.startswith("bert.pooler.")))
    return None if skip else name


def embed(cfg: BertConfig, params: dict, tokens: torch.Tensor, ctx: Context, g: Gather, extra: dict) -> torch.Tensor:
    """tokens (B, T) -> LayerNorm(word + token type + position rows) (B, T, D); ``extra`` may hold
    ``token_type_ids`` (B, T) (default 0)."""
    emb = g(params["bert"]["embeddings"])
    types = extra.get("token_type_ids")
    types = torch.zeros_like(tokens) if types is None else types
    x = (ops.embedding(tokens, emb["word_embeddings"]["weight"]) + ops.embedding(types, emb["token_type_embeddings"]["weight"])
         + ops.embedding(ctx.positions, emb["position_embeddings"]["weight"]))
    return ops.layer_norm(x, emb["LayerNorm"]["weight"], emb["LayerNorm"]["bias"], cfg.layer_norm_eps)


def block(cfg: BertConfig, p: dict, x: torch.Tensor, ctx: Context, i: int) -> torch.Tensor:
    """One post-norm layer: LN(x + attn(x)), then LN(. + mlp(.)). x (B, T, D) -> (B, T, D)."""
    b, t, _ = x.shape
    a = p["attention"]
    q, k, v = (ops.linear(x, a["self"][n]["weight"], a["self"][n]["bias"]).view(b, t, -1, cfg.head_dim).transpose(1, 2)
               for n in ("query", "key", "value"))
    o = ops.attention(q, k, v, mask=ctx.masks[i]).transpose(1, 2).reshape(b, t, -1)
    out = a["output"]
    x = ops.layer_norm(x + ops.linear(o, out["dense"]["weight"], out["dense"]["bias"]),
                       out["LayerNorm"]["weight"], out["LayerNorm"]["bias"], cfg.layer_norm_eps)
    up, down = p["intermediate"]["dense"], p["output"]["dense"]
    h = ops.dense_mlp(x, up["weight"], up["bias"], down["weight"], down["bias"], ops.activation(cfg.hidden_act))
    norm = p["output"]["LayerNorm"]
    return ops.layer_norm(x + h, norm["weight"], norm["bias"], cfg.layer_norm_eps)


def final(cfg: BertConfig, params: dict, x: torch.Tensor, g: Gather) -> torch.Tensor:
    """A post-norm encoder ends normalized: the last layer's output as it is."""
    return x


def classify(cfg: BertConfig, params: dict, h: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, T, D) -> class logits (B, C): tanh pooler over the first ([CLS]) token."""
    pooler = params["bert"]["pooler"]["dense"]
    pooled = torch.tanh(ops.linear(h[:, 0], pooler["weight"], pooler["bias"]))
    return ops.linear(pooled, params["classifier"]["weight"], params["classifier"]["bias"])


def mlm_logits(cfg: BertConfig, params: dict, h: torch.Tensor) -> torch.Tensor:
    """Hidden states (..., D) -> vocabulary logits (..., V) through the transform and tied decoder."""
    pred = params["cls"]["predictions"]
    t = ops.activation(cfg.hidden_act)(ops.linear(h, pred["transform"]["dense"]["weight"], pred["transform"]["dense"]["bias"]))
    t = ops.layer_norm(t, pred["transform"]["LayerNorm"]["weight"], pred["transform"]["LayerNorm"]["bias"], cfg.layer_norm_eps)
    return ops.linear(t, output_weight(cfg, params), pred["bias"])


def output_weight(cfg: BertConfig, params: dict) -> Any:
    """The head's output projection: the classifier (C, D), or the tied word embedding (V, D)."""
    if cfg.head == "classify":
        return params["classifier"]["weight"]
    return params["bert"]["embeddings"]["word_embeddings"]["weight"]


def head_params(cfg: BertConfig, params: dict, g: Gather) -> dict:
    """The subtree the head reads (``classify`` / ``mlm_logits`` take it as params), each part
    passed through ``g`` (the FSDP gather) just before use."""
    if cfg.head == "classify":
        return {"bert": {"pooler": g(params["bert"]["pooler"])}, "classifier": g(params["classifier"])}
    word = g(params["bert"]["embeddings"]["word_embeddings"])
    return {"bert": {"embeddings": {"word_embeddings": word}}, "cls": g(params["cls"])}


def head(cfg: BertConfig, params: dict, h: torch.Tensor, g: Gather) -> torch.Tensor:
    """Hidden states (B, T, D) -> class logits (B, C) for ``head="classify"``, vocabulary logits (B, T, V) for ``"mlm"``."""
    p = head_params(cfg, params, g)
    return classify(cfg, p, h) if cfg.head == "classify" else mlm_logits(cfg, p, h)


def peft_fields(cfg: BertConfig) -> dict:
    """adapter_config.json fields of an adapter over this BERT: a classifier is peft's ``SEQ_CLS``
    with its head (pooler + classifier, ``HEAD_MODULES``) saved in full; a masked-LM has no task type."""
    if cfg.head == "classify":
        return {"task_type": "SEQ_CLS", "modules_to_save": list(HEAD_MODULES)}
    return {"task_type": None}


def classification_loss(cfg: BertConfig, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, C), labels -> (summed loss fp32, count). Single-label: labels (B,) int, -100 skipped;
    regression: labels (B,) float, squared error; multi-label: labels (B, C) in [0, 1], BCE per entry."""
    problem = cfg.problem
    if problem == "single_label_classification":
        if labels.dim() != 1 or labels.is_floating_point():
            raise DataError(f"bert classify: labels must be (B,) integers, found {labels.dtype} {tuple(labels.shape)}")
        if ((labels >= cfg.num_labels) | (labels < 0) & (labels != ops.IGNORE_INDEX)).any():
            raise DataError(f"bert classify: labels must be in [0, {cfg.num_labels}) or -100, found "
                            f"{sorted(set(labels.tolist()))[:5]}")
        return losses.cross_entropy(logits, labels)
    if problem == "regression":
        loss = F.mse_loss(logits.float().reshape(-1), labels.float().reshape(-1), reduction="sum")
        return loss, torch.tensor(labels.numel(), device=labels.device)
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum")
    return loss, torch.tensor(labels.numel(), device=labels.device)


def loss(cfg: BertConfig, *, chunk_size: int = 1024, remat: bool = False,
         gather: Gather | None = None) -> Callable[[dict, dict], tuple[torch.Tensor, torch.Tensor]]:
    """(params, batch) -> (summed loss fp32, number of labelled items), the protocol of ``models.loss_fn``.

    batch: ``tokens`` (B, T), optional ``mask`` (B, T) bool (True = real token), ``token_type_ids``
    and ``positions`` (B, T), and ``labels``: (B,) class ids for ``head="classify"`` (see
    ``classification_loss`` for regression / multi-label), or (B, T) target ids for ``"mlm"``
    (-100 at unmasked positions; not shifted). Masked-LM logits are computed only at labelled
    positions, so ``chunk_size`` is unused.
    """
    g = gather or (lambda subtree: subtree)

    def fn(params: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        extra = {"token_type_ids": batch["token_type_ids"]} if batch.get("token_type_ids") is not None else {}
        h, _ = decoder.hidden_states(FAMILY, cfg, params, batch["tokens"], positions=batch.get("positions"),
                                     mask=batch.get("mask"), remat=remat, gather=gather, extra=extra)
        p = head_params(cfg, params, g)
        if cfg.head == "classify":
            return classification_loss(cfg, classify(cfg, p, h), batch["labels"])
        labels = batch["labels"].reshape(-1)
        picked = labels != ops.IGNORE_INDEX
        return losses.cross_entropy(mlm_logits(cfg, p, h.reshape(-1, h.shape[-1])[picked]), labels[picked])

    return fn


FAMILY = Family(
    name="bert", model_types=("bert",), config=BertConfig, presets=PRESETS, embed=embed, block=block, final=final,
    output_weight=output_weight, layers="bert.encoder.layer", first_stage=("bert.embeddings",),
    last_stage=("bert.pooler", "classifier", "cls"), causal=False, rotary=False, lora_targets=("query", "value"),
    linear_layers=("query", "key", "value", "dense"), init_tensor=init_tensor, checkpoint_name=checkpoint_name,
    peft_fields=peft_fields, head=head, loss=loss,
)
