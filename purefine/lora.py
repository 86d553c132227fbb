"""LoRA and DoRA as a parameter transform: wrap targeted weights in a ``LoRA`` leaf, train its adapters.

A short tour::

    import purefine as pf
    params = pf.lora.apply(params, rank=8, alpha=16, where=["q_proj", "v_proj"], seed=0)
    params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]
    # LoRA(base=<(out, in) tensor or NF4 leaf>, lora_a=(8, in), lora_b=(out, 8), magnitude=None, ...)
    trainable, frozen = pf.tree.partition(params, pf.lora.trainable)   # only lora_a / lora_b
    logits = pf.models.forward(cfg, params, tokens)                     # the model never knows
    merged = pf.lora.merge(params)                                      # plain tensors again

**Nothing in the model changes.** ``ops.linear(x, w)`` calls ``w.linear(x)`` for any leaf kind, and a
``LoRA`` leaf computes on the activation side, ``x Wᵀ + s·(dropout(x) Aᵀ) Bᵀ``, never ``x (W + s·BA)ᵀ``
(the merged form costs a full weight-gradient matmul and a merged copy of each weight).

**Paths.** A leaf's tensors flatten below the weight it replaces; these names are the trainable filter:

    model.layers.0.self_attn.q_proj.weight.base       the frozen weight (``.base.<child>`` when NF4)
    model.layers.0.self_attn.q_proj.weight.lora_a     A (rank, in): Kaiming-uniform, a=√5 (as PEFT)
    model.layers.0.self_attn.q_proj.weight.lora_b     B (out, rank): zeros, so training starts at W
    model.layers.0.self_attn.q_proj.weight.magnitude  DoRA only: m (out,), the row norms of W

**Scale** s = alpha / rank, or alpha / √rank with ``rslora=True``. **Dropout** on the adapter's input
runs only while gradients are enabled (training), from torch's global RNG, so the train step seeds
it and ``torch.utils.checkpoint`` replays it.

**DoRA** (``dora=True``) follows PEFT exactly: ``W' = m · (W + s·BA) / ‖W + s·BA‖`` per output row, the
norm computed without gradient (the DoRA paper, section 4.3), on the activation side:
``y = (m/‖·‖) ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias``; with dropout active, PEFT's
``y = x Wᵀ + bias + (m/‖·‖ − 1) ⊙ x̃ Wᵀ + (m/‖·‖) ⊙ s·(x̃ Aᵀ) Bᵀ`` with x̃ = dropout(x).
The base may be any leaf kind: ``LoRA(base=NF4(...))`` is QLoRA, and with ``dora=True`` QDoRA;
this module only calls ``ops.linear`` and ``dense`` on it.

Adapters are created seeded per path (a generator from ``seed`` and the path name), so every process
makes the same adapters, and in float32 when the base is half precision (PEFT's default); they are
cast to the activation dtype inside ``linear``, so gradients arrive in the adapters' own dtype.
Apply LoRA before sharding: the adapters are created on the base's device as plain tensors.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optree
import torch
import torch.nn.functional as F

from purefine import fused, ops, tree, upcast
from purefine.errors import ConfigError

ADAPTER_CHILDREN = ("lora_a", "lora_b", "magnitude")
DEFAULT_TARGETS = ("q_proj", "v_proj")  # Llama's; each model family names its own (models.lora_targets)
# Every linear layer but the output head, as PEFT's "all-linear": the module names of every 2-D
# weight of the params, embedding tables and output heads left out (any family, see linear_modules).
ALL_LINEAR = "all-linear"
# Module names of embedding tables across HF families (embed_tokens, word_embeddings, embed_in, wte, wpe).
EMBEDDING = re.compile(r".*embed.*|wte|wpe")
OUTPUT_HEADS = ("lm_head", "embed_out")

ERR_RANK = "lora rank: expected a positive integer, found {!r}"
ERR_NO_MATCH = "lora target {!r} matches no weight in the params (linear modules here: {})"
ERR_TIED = ("lora target {!r} asks for lm_head, but this model ties lm_head to {} "
            "(tie_word_embeddings=true), so the params hold no separate lm_head.weight; LoRA on a tied "
            "lm_head is not supported: drop lm_head from the targets or untie the embeddings")
ERR_NOT_2D = "lora target {!r}: {} has shape {}, expected a 2-D (out, in) weight"
ERR_EMBED = "lora target {!r}: {} is an embedding table; LoRA targets linear layers (projections, lm_head)"
ERR_TWICE = "lora target {!r}: {} already has a LoRA adapter"


@dataclass(frozen=True)
class LoRA:
    """A frozen weight (out, in) with a low-rank adapter, and for DoRA a magnitude vector.

    ``base`` is a tensor or another leaf kind (NF4); ``lora_a`` (r, in), ``lora_b`` (out, r),
    ``magnitude`` (out,) or None. ``alpha``, ``rslora`` and ``dropout`` are static (optree aux data).
    """

    base: Any
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    magnitude: torch.Tensor | None = None
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0

    @property
    def rank(self) -> int:
        """The adapter rank r: ``lora_a`` is (r, in), ``lora_b`` (out, r)."""
        return self.lora_a.shape[0]

    @property
    def scale(self) -> float:
        """s = alpha / rank (rsLoRA: alpha / √rank)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def shape(self) -> torch.Size:
        """(out, in): the shape of the weight the leaf stands for."""
        return torch.Size(self.base.shape)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the base weight (what ``dense`` returns by default)."""
        return self.base.dtype

    @property
    def is_dora(self) -> bool:
        """True for a DoRA leaf (it carries a magnitude vector (out,))."""
        return self.magnitude is not None

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (x Aᵀ) Bᵀ (..., out), without the scale; adapters cast to x's dtype."""
        return F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, training=True) if self.dropout > 0 and torch.is_grad_enabled() else x

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) -> (..., out): x Wᵀ + s·(dropout(x) Aᵀ) Bᵀ + bias (DoRA: see the module doc)."""
        if self.is_dora:
            return self._dora_linear(x, bias)
        if self._fusable(x, bias):
            return fused.lora_linear(x, self.base, self.lora_a.to(x.dtype), self.lora_b.to(x.dtype), bias, self.scale)
        y = ops.linear(x, self.base, bias)
        z = self._adapter(self._dropout(x))
        if type(y) is torch.Tensor and y.dtype == z.dtype and not torch.compiler.is_compiling():
            return y.add_(z, alpha=self.scale)  # y is the base matmul's fresh output, saved by nothing
        return y + self.scale * z

    def _fusable(self, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """True when ``fused.lora_linear`` computes this leaf: a frozen plain-tensor base in x's dtype, no
        dropout while training, plain tensors, outside torch.compile and torch.func."""
        base = self.base
        return (type(base) is torch.Tensor and not base.requires_grad and base.dtype == x.dtype
                and (self.dropout == 0 or not torch.is_grad_enabled())
                and ops._plain(x, self.lora_a, self.lora_b, *(() if bias is None else (bias,))))

    def _merge_dtype(self) -> torch.dtype:
        """What W + s·BA is formed in: float32, or float64 for a float64 model (float32 would round it)."""
        return torch.promote_types(self.dtype, torch.float32)

    def _merge_base(self, dtype: torch.dtype) -> torch.Tensor:
        return self.base.to(dtype) if isinstance(self.base, torch.Tensor) else self.base.dense(dtype)

    def weight_norm(self) -> torch.Tensor:
        """‖W + s·BA‖ per output row (out,) in float32 (float64 for a float64 model), without gradient
        (DoRA section 4.3)."""
        dtype = self._merge_dtype()
        with torch.no_grad():
            delta = self.lora_b.detach().to(dtype) @ self.lora_a.detach().to(dtype)
            return torch.linalg.vector_norm(self._merge_base(dtype) + self.scale * delta, dim=1)

    def _dora_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        factor = (self.magnitude / self.weight_norm().to(self.magnitude.dtype)).to(x.dtype)  # (out,)
        x_drop = self._dropout(x)
        if x_drop is x:
            y = factor * (ops.linear(x, self.base) + self.scale * self._adapter(x))
            return y if bias is None else y + bias
        dropped = (factor - 1) * ops.linear(x_drop, self.base) + factor * self.scale * self._adapter(x_drop)
        return ops.linear(x, self.base, bias) + dropped

    def astype(self, dtype: torch.dtype) -> LoRA:
        """The leaf prepared for compute in ``dtype`` (differentiably): base, A and B cast (a leaf-kind
        base through its own ``astype``); the DoRA magnitude keeps its dtype, the norm ratio is formed
        in it and only the result is cast."""
        base = self.base
        if isinstance(base, torch.Tensor):
            base = upcast.cast(base, dtype)
        elif hasattr(base, "astype"):
            base = base.astype(dtype)
        return LoRA(base, self.lora_a.to(dtype), self.lora_b.to(dtype), self.magnitude, self.alpha, self.rslora,
                    self.dropout)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The merged weight (out, in): W + s·BA, or for DoRA (m/‖W + s·BA‖) ⊙ (W + s·BA); differentiable."""
        math = self._merge_dtype()
        merged = self._merge_base(math) + self.scale * (self.lora_b.to(math) @ self.lora_a.to(math))
        if self.is_dora:
            merged = (self.magnitude.to(math) / self.weight_norm())[:, None] * merged
        return merged.to(dtype or self.dtype)


tree.register_node(LoRA, ("base", "lora_a", "lora_b", "magnitude"), ("alpha", "rslora", "dropout"))


def is_lora(x: Any) -> bool:
    """True for a LoRA (or DoRA) leaf."""
    return isinstance(x, LoRA)


def trainable(path: str, leaf: Any) -> bool:
    """The LoRA filter: true for adapter tensors (``...lora_a``, ``...lora_b``, DoRA ``...magnitude``)."""
    return path.rsplit(".", 1)[-1] in ADAPTER_CHILDREN


def trainable_with(include: str | None = None) -> tree.Filter:
    """A filter true for the adapters and for any tensor whose path ``include`` matches in full.

    ``trainable_with(r".*norm\\.weight")`` also trains the norms; ``trainable_with(".*")`` trains
    every floating tensor (full fine-tuning of a plain or LoRA tree; non-floating tensors such as
    packed codes are never selected, but do not use it on a quantized tree, whose scales are floats).
    """
    regex = re.compile(include) if include is not None else None

    def keep(path: str, leaf: Any) -> bool:
        if trainable(path, leaf):
            return True
        floating = isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
        return regex is not None and floating and regex.fullmatch(path) is not None

    return keep


def target_regex(where: str | Sequence[str]) -> str:
    """The weight-path regex for ``where``: a regex (kept as is) or module names.

    ``["q_proj", "v_proj"]`` -> ``(?:.*\\.)?(?:q_proj|v_proj)\\.weight``: any module of that name.
    ``"all-linear"`` depends on the params: ``select_targets`` expands it with ``linear_modules``.
    """
    if isinstance(where, str):
        return where
    names = list(where)
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", name):
            raise ConfigError(f"lora target {name!r}: expected a module name such as q_proj (Llama), c_attn "
                              f"(GPT-2) or query (BERT), or a regex string")
    if not names:
        raise ConfigError("lora targets: expected at least one module name, found an empty list")
    return r"(?:.*\.)?(?:" + "|".join(re.escape(n) for n in names) + r")\.weight"


def _module_name(path: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``q_proj``."""
    parts = path.rsplit(".", 2)
    return parts[-2] if len(parts) > 1 else ""


def is_embedding(path: str) -> bool:
    """True for a weight path whose module is an embedding table (``embed_tokens``, ``wte``, ...)."""
    return EMBEDDING.fullmatch(_module_name(path)) is not None


def linear_modules(params: tree.Tree) -> list[str]:
    """The module names ``"all-linear"`` stands for in ``params``: every module holding a 2-D
    ``weight`` that is not an embedding table or an output head (lm_head), in flattening order.
    Llama: q/k/v/o_proj, gate/up/down_proj; GPT-2: c_attn, c_proj, c_fc; BERT: query, key, value, dense
    (and a classifier head's ``classifier``)."""
    names: dict[str, None] = {}
    for path, leaf in tree.leaves_with_paths(params, is_leaf=tree.is_leaf):
        name = _module_name(path)
        if (path.endswith(".weight") and len(getattr(leaf, "shape", ())) == 2 and not is_embedding(path)
                and name not in OUTPUT_HEADS):
            names[name] = None
    return list(names)


def _named_regexes(where: str | Sequence[str], params: tree.Tree) -> list[tuple[str, str]]:
    """[(what the user wrote, its regex)]: one per module name so each can fail alone."""
    if isinstance(where, str) and where == ALL_LINEAR:
        names = linear_modules(params)
        if not names:
            raise ConfigError(f"lora target {ALL_LINEAR!r}: the params hold no 2-D linear weight")
        return [(ALL_LINEAR, target_regex(names))]
    if isinstance(where, str):
        return [(where, target_regex(where))]
    return [(name, target_regex([name])) for name in where]


def _tied_embedding(leaves: dict[str, Any]) -> str | None:
    """The token embedding a tied lm_head reuses: the embedding table with the most rows, or None."""
    tables = [p for p, x in leaves.items() if p.endswith(".weight") and is_embedding(p) and len(getattr(x, "shape", ())) == 2]
    return max(tables, key=lambda p: leaves[p].shape[0], default=None)


def select_targets(params: tree.Tree, where: str | Sequence[str]) -> list[str]:
    """The weight paths ``where`` selects, checked: each pattern must match, targets must be 2-D weights."""
    leaves = dict(tree.leaves_with_paths(params, is_leaf=tree.is_leaf))
    chosen: dict[str, None] = {}
    for label, pattern in _named_regexes(where, params):
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"lora target {label!r}: not a valid regex ({e})") from None
        found = [p for p in leaves if regex.fullmatch(p)]
        if not found:
            tied = _tied_embedding(leaves)
            if regex.fullmatch("lm_head.weight") and tied is not None:
                raise ConfigError(ERR_TIED.format(label, tied))
            raise ConfigError(ERR_NO_MATCH.format(label, ", ".join(linear_modules(params)) or "none"))
        for p in found:
            _check_target(label, p, leaves[p])
            chosen[p] = None
    return list(chosen)


def _check_target(label: str, path: str, leaf: Any) -> None:
    if is_lora(leaf):
        raise ConfigError(ERR_TWICE.format(label, path))
    if is_embedding(path):
        raise ConfigError(ERR_EMBED.format(label, path))
    if len(leaf.shape) != 2:
        raise ConfigError(ERR_NOT_2D.format(label, path, tuple(leaf.shape)))


def path_seed(seed: int, path: str) -> int:
    """A 63-bit seed from (seed, path), the same on every process and Python run."""
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def device_of(leaf: Any) -> torch.device:
    """The device of a tensor, or of the first tensor inside a leaf kind."""
    if isinstance(leaf, torch.Tensor):
        return leaf.device
    tensors = optree.tree_leaves(leaf, namespace=tree.NAMESPACE)
    return tensors[0].device if tensors else torch.device("cpu")


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters are at least float32 (PEFT's autocast_adapter_dtype): bf16/fp16 bases get fp32 adapters."""
    return torch.promote_types(base_dtype, torch.float32) if base_dtype.is_floating_point else torch.float32


def init_adapter(path: str, base: Any, *, rank: int, alpha: float, seed: int, rslora: bool, dropout: float,
                 dora: bool, dtype: torch.dtype | None) -> LoRA:
    """The LoRA leaf for one weight (out, in): A (rank, in) Kaiming-uniform from a per-path generator,
    B (out, rank) zeros, DoRA magnitude (out,) = ‖W‖ per row."""
    out_features, in_features = base.shape
    device, dtype = device_of(base), dtype or adapter_dtype(base.dtype)
    a = torch.empty(rank, in_features, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=torch.Generator().manual_seed(path_seed(seed, path)))
    leaf = LoRA(base, a.to(device=device, dtype=dtype), torch.zeros(out_features, rank, dtype=dtype, device=device),
                None, float(alpha), bool(rslora), float(dropout))
    if dora:
        leaf = LoRA(base, leaf.lora_a, leaf.lora_b, leaf.weight_norm().to(dtype), leaf.alpha, leaf.rslora, leaf.dropout)
    return leaf


def apply(params: tree.Tree, *, rank: int, alpha: float, where: str | Sequence[str] = DEFAULT_TARGETS,
          dropout: float = 0.0, seed: int = 0, rslora: bool = False, dora: bool = False,
          dtype: torch.dtype | None = None) -> tree.Tree:
    """Wrap the weights ``where`` selects in LoRA leaves; returns a new tree (the input is untouched).

    ``where``: a regex over weight paths (full match, e.g. ``r".*\\.(q|v)_proj\\.weight"``), a list of
    module names (``["q_proj", "v_proj"]``, the default; a family's names: ``c_attn`` for GPT-2,
    ``query`` for BERT, see ``models.lora_targets``), or ``"all-linear"`` (see ``linear_modules``).
    A pattern or name matching nothing, rank <= 0, dropout outside [0, 1) or a tied lm_head raise
    ConfigError. ``dtype`` of the adapters defaults to float32 for half bases.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(ERR_RANK.format(rank))
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"lora dropout: expected a probability in [0, 1), found {dropout!r}")
    if not math.isfinite(float(alpha)) or float(alpha) <= 0:
        raise ConfigError(f"lora alpha: expected a positive number, found {alpha!r}")
    targets = set(select_targets(params, where))

    def wrap(path: str, leaf: Any) -> Any:
        if path not in targets:
            return leaf
        return init_adapter(path, leaf, rank=rank, alpha=alpha, seed=seed, rslora=rslora, dropout=dropout,
                            dora=dora, dtype=dtype)

    return tree.map_with_path(wrap, params, is_leaf=tree.is_leaf)


def merge(params: tree.Tree, dtype: torch.dtype | None = None) -> tree.Tree:
    """Replace every LoRA leaf by its merged weight (out, in) (an NF4 base is dequantized by its dense()).

    Other leaves are kept as they are; the result has the dtype of each base unless ``dtype`` is given.
    """
    return tree.map(lambda x: x.dense(dtype) if is_lora(x) else x, params, is_leaf=tree.is_leaf)


def base_only(params: tree.Tree) -> tree.Tree:
    """Every LoRA / DoRA leaf replaced by its frozen base (a tensor (out, in) or an NF4 leaf, not a copy):
    the model with its adapters removed, e.g. DPO's reference. Other leaves are kept as they are."""
    return tree.map(lambda x: x.base if is_lora(x) else x, params, is_leaf=tree.is_leaf)


def adapters(params: tree.Tree) -> dict[str, LoRA]:
    """{weight path: LoRA leaf} for every LoRA leaf of the tree, in flattening order."""
    return {p: x for p, x in tree.leaves_with_paths(params, is_leaf=tree.is_leaf) if is_lora(x)}

