"""End-to-end flows (train, generate, evaluate, export, inspect), each a ``main(cfg)`` over the
library, and ``run``: the one error layer every script goes through."""

from purefine.recipes.cli import run

__all__ = ["run"]
