"""purefine.tree: dotted paths, unflatten, select, partition/combine, leaf kinds."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from purefine import tree
from purefine.errors import TreeError


@dataclass(frozen=True)
class Scaled:
    """A toy leaf kind: weight = base * factor."""

    base: torch.Tensor
    extra: torch.Tensor
    factor: float

    def dense(self, dtype=None):
        w = self.base * self.factor
        return w if dtype is None else w.to(dtype)

    def linear(self, x, bias=None):
        return torch.nn.functional.linear(x, self.dense(), bias)

    @property
    def shape(self):
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype


tree.register_node(Scaled, ("base", "extra"), ("factor",))


def params(n_layers: int = 3) -> dict:
    layers = [{"q": {"weight": torch.full((2, 2), float(i))}, "norm": {"weight": torch.ones(2)}} for i in range(n_layers)]
    return {"model": {"embed": {"weight": torch.zeros(4, 2)}, "layers": layers}, "lm_head": {"weight": torch.ones(4, 2)}}


def test_paths_are_dotted_hf_names():
    names = tree.paths(params())
    assert "model.layers.0.q.weight" in names and "lm_head.weight" in names
    assert len(names) == 2 + 3 * 2


@settings(max_examples=25, deadline=None)
@given(n_layers=st.integers(1, 12))
def test_unflatten_inverts_flatten(n_layers):
    p = params(n_layers)
    back = tree.unflatten(tree.flatten(p))
    assert tree.paths(back) == tree.paths(p)
    assert isinstance(back["model"]["layers"], list) and len(back["model"]["layers"]) == n_layers
    for (a, x), (b, y) in zip(tree.leaves_with_paths(p), tree.leaves_with_paths(back)):
        assert a == b and torch.equal(x, y)


def test_layer_order_survives_more_than_ten_layers():
    p = params(12)
    layers = tree.unflatten(tree.flatten(p))["model"]["layers"]
    assert [int(layer["q"]["weight"][0, 0]) for layer in layers] == list(range(12))


def test_unflatten_rejects_gaps_and_conflicts():
    with pytest.raises(TreeError, match="list indices"):
        tree.unflatten({"layers.0.w": torch.ones(1), "layers.2.w": torch.ones(1)})
    with pytest.raises(TreeError, match="both a leaf and a subtree"):
        tree.unflatten({"a": torch.ones(1), "a.b": torch.ones(1)})


def test_select_full_match():
    p = params()
    assert tree.select(p, r".*\.q\.weight") == [f"model.layers.{i}.q.weight" for i in range(3)]
    assert tree.select(p, r"q\.weight") == []


def test_partition_combine_round_trip():
    p = params()
    keep = tree.regex_filter(r".*norm.*")
    kept, rest = tree.partition(p, keep)
    assert [n for n, _ in tree.leaves_with_paths(kept)] == [f"model.layers.{i}.norm.weight" for i in range(3)]
    assert all("norm" not in n for n, _ in tree.leaves_with_paths(rest))
    assert tree.paths(tree.combine(kept, rest)) == tree.paths(p)
    assert tree.combine(rest, kept)["model"]["layers"][1]["q"]["weight"] is p["model"]["layers"][1]["q"]["weight"]


def test_leaf_kinds_flatten_to_children_and_materialize():
    p = params()
    p["model"]["layers"][0]["q"]["weight"] = Scaled(torch.ones(2, 2), torch.zeros(1), 3.0)
    names = tree.paths(p)
    assert "model.layers.0.q.weight.base" in names and "model.layers.0.q.weight.extra" in names
    assert "model.layers.0.q.weight" in tree.paths(p, is_leaf=tree.is_leaf)
    dense = tree.materialize(p)
    assert torch.equal(dense["model"]["layers"][0]["q"]["weight"], torch.full((2, 2), 3.0))
    kept, rest = tree.partition(p, lambda path, _: path.endswith(".extra"))
    assert tree.combine(kept, rest)["model"]["layers"][0]["q"]["weight"].factor == 3.0


def test_map_with_path_is_pure():
    p = params()
    doubled = tree.map_with_path(lambda path, x: x * 2 if path.startswith("lm_head") else x, p)
    assert torch.equal(doubled["lm_head"]["weight"], torch.full((4, 2), 2.0))
    assert torch.equal(p["lm_head"]["weight"], torch.ones(4, 2))
    assert tree.numel(p) == 8 + 8 + 3 * 6 and tree.nbytes(p) == 4 * tree.numel(p)
