"""Parameter trees: the dotted-path view, selection, partition and combine, on optree.

A params tree is nested dicts (and lists for the layer stack) whose dotted paths are exactly the
Hugging Face tensor names: ``model.layers.0.self_attn.q_proj.weight``. Leaves are tensors or
*leaf kinds*: small frozen dataclasses (``LoRA``, ``NF4``) registered here as optree nodes in the
``purefine`` namespace, so their tensors flatten to ``...q_proj.weight.a`` and so on.

A leaf kind implements a small protocol that ``ops.linear`` and ``materialize`` use, so that adding
a kind touches one file::

    leaf.linear(x, bias=None) -> y          # x (..., in) -> y (..., out)
    leaf.dense(dtype=None) -> Tensor        # the equivalent plain weight (out, in)
    leaf.shape, leaf.dtype                  # of the weight it stands for

Every function here is pure: it returns a new tree and never mutates its argument.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import optree
import torch

from purefine.errors import TreeError

NAMESPACE = "purefine"
Tree = Any
Filter = Callable[[str, Any], bool]

_LEAF_KINDS: set[type] = set()


def register_node(cls: type, children: tuple[str, ...], aux: tuple[str, ...] = (), *, kind: bool = True) -> type:
    """Register a dataclass as an optree node whose ``children`` are subtrees and ``aux`` static data.

    Children keep their field names as path entries (``...weight.codes``). With ``kind=True`` the
    class is a leaf kind: ``is_kind`` recognizes it and ``materialize`` calls its ``dense``.
    """

    def flatten(node):
        return tuple(getattr(node, c) for c in children), tuple(getattr(node, a) for a in aux), children

    def unflatten(aux_values, child_values):
        return cls(**dict(zip(children, child_values)), **dict(zip(aux, aux_values)))

    optree.register_pytree_node(cls, flatten, unflatten, namespace=NAMESPACE)
    if kind:
        _LEAF_KINDS.add(cls)
    return cls


def is_kind(x: Any) -> bool:
    """True for an instance of a registered leaf kind (LoRA, NF4, ...)."""
    return type(x) in _LEAF_KINDS


def is_leaf(x: Any) -> bool:
    """True for a tensor or a leaf kind: the unit a weight-level transform maps over."""
    return isinstance(x, torch.Tensor) or is_kind(x)


def path_name(path: Iterable[Any]) -> str:
    """Join an optree path tuple into a dotted name: ('model', 'layers', 0) -> 'model.layers.0'."""
    return ".".join(str(p) for p in path)


def leaves_with_paths(tree: Tree, *, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """[(dotted path, leaf)] in flattening order. ``is_leaf=tree.is_leaf`` stops at leaf kinds."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, is_leaf=is_leaf, namespace=NAMESPACE)
    return [(path_name(p), leaf) for p, leaf in zip(paths, leaves)]


def flatten(tree: Tree, *, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """{dotted path: leaf}. With the default ``is_leaf`` every value is a tensor."""
    return dict(leaves_with_paths(tree, is_leaf=is_leaf))


def paths(tree: Tree, *, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
    """The dotted paths of the leaves, in flattening order."""
    return [p for p, _ in leaves_with_paths(tree, is_leaf=is_leaf)]


def unflatten(flat: Mapping[str, Any]) -> Tree:
    """Build nested dicts from dotted names; a run of integer keys 0..n-1 becomes a list.

    ``unflatten(flatten(t)) == t`` for trees of dicts, lists and tensors (leaf kinds must be
    rebuilt by their own module, since a dotted name does not say which kind it was).
    """
    root: dict = {}
    for name, value in flat.items():
        parts = name.split(".")
        node = root
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise TreeError(f"path {name!r}: {part!r} is both a leaf and a subtree")
            node = child
        if parts[-1] in node:
            raise TreeError(f"path {name!r} appears twice")
        node[parts[-1]] = value
    return _lists_from_int_keys(root, "")


def _lists_from_int_keys(node: Any, prefix: str) -> Any:
    if not isinstance(node, dict):
        return node
    out = {k: _lists_from_int_keys(v, f"{prefix}{k}.") for k, v in node.items()}
    if out and all(k.isdigit() for k in out):
        indices = sorted(int(k) for k in out)
        if indices != list(range(len(indices))):
            raise TreeError(f"{prefix or '<root>'}: list indices {indices} are not 0..{len(indices) - 1}")
        return [out[str(i)] for i in indices]
    return out


def map_with_path(fn: Callable[..., Any], tree: Tree, *rest: Tree, is_leaf: Callable[[Any], bool] | None = None) -> Tree:
    """Map ``fn(path, leaf, *rest_leaves)`` over the leaves; returns a tree of the same structure."""
    return optree.tree_map_with_path(
        lambda p, x, *r: fn(path_name(p), x, *r), tree, *rest, is_leaf=is_leaf, namespace=NAMESPACE
    )


def map(fn: Callable[..., Any], tree: Tree, *rest: Tree, is_leaf: Callable[[Any], bool] | None = None) -> Tree:  # noqa: A001
    """Map ``fn(leaf, *rest_leaves)`` over the leaves (``None`` holes are skipped)."""
    return optree.tree_map(fn, tree, *rest, is_leaf=is_leaf, namespace=NAMESPACE)


def select(tree: Tree, pattern: str, *, is_leaf: Callable[[Any], bool] | None = is_leaf) -> list[str]:
    """Paths (of tensors or leaf kinds) that ``pattern`` matches in full (``re.fullmatch``)."""
    regex = re.compile(pattern)
    return [p for p in paths(tree, is_leaf=is_leaf) if regex.fullmatch(p)]


def regex_filter(pattern: str) -> Filter:
    """A (path, leaf) -> bool filter that is true where ``pattern`` matches the whole path."""
    regex = re.compile(pattern)
    return lambda path, _leaf: regex.fullmatch(path) is not None


def partition(tree: Tree, keep: Filter) -> tuple[Tree, Tree]:
    """Split into (kept, rest): two trees of the same shape with ``None`` where the other has a leaf.

    ``keep(path, tensor)`` sees every tensor, including the children of leaf kinds
    (``...q_proj.weight.a``). ``combine(kept, rest)`` rebuilds the original.
    """
    kept = map_with_path(lambda p, x: x if keep(p, x) else None, tree)
    rest = map_with_path(lambda p, x: None if keep(p, x) else x, tree)
    return kept, rest


def combine(*trees: Tree) -> Tree:
    """Merge trees of one shape with ``None`` holes, taking the first non-None leaf at each place."""
    flats = [optree.tree_flatten(t, none_is_leaf=True, namespace=NAMESPACE) for t in trees]
    spec = flats[0][1]
    for leaves, other in flats[1:]:
        if other != spec:
            raise TreeError("combine: the trees do not have the same structure")
    merged = [next((x for x in column if x is not None), None) for column in zip(*(f[0] for f in flats))]
    return optree.tree_unflatten(spec, merged)


def filtered(tree: Tree, keep: Filter) -> list[tuple[str, torch.Tensor]]:
    """[(path, tensor)] for the tensors that ``keep`` selects, in flattening order."""
    return [(p, x) for p, x in leaves_with_paths(tree) if keep(p, x)]


def materialize(tree: Tree, dtype: torch.dtype | None = None) -> Tree:
    """Replace every leaf kind by its plain weight (``leaf.dense()``): LoRA merged, NF4 dequantized."""

    def dense(x: Any) -> Any:
        if is_kind(x):
            return x.dense(dtype)
        return x if dtype is None or not isinstance(x, torch.Tensor) else x.to(dtype)

    return optree.tree_map(dense, tree, is_leaf=is_leaf, namespace=NAMESPACE)


def numel(tree: Tree) -> int:
    """Number of elements over all tensors of the tree (packed storage counts as stored)."""
    return sum(x.numel() for _, x in leaves_with_paths(tree) if isinstance(x, torch.Tensor))


def nbytes(tree: Tree) -> int:
    """Bytes held by all tensors of the tree."""
    return sum(x.numel() * x.element_size() for _, x in leaves_with_paths(tree) if isinstance(x, torch.Tensor))
