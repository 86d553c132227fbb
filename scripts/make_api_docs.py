#!/usr/bin/env python
"""Generate docs/api.md, the API reference, from the docstrings of purefine's public surface.

    python scripts/make_api_docs.py            # rewrite docs/api.md
    python scripts/make_api_docs.py --check    # exit 1 if docs/api.md is stale or a docstring is missing

The surface is ``SURFACE``: for each module, the names of ``__all__`` (or, without one, every public
function and class the module defines), plus any names listed. Every function, class and public
method there needs a docstring; one whose arguments or result are tensors needs their shapes in
it (``(B, T)``, ``(out, in)``, ``(N,)``, ...). ``problems()`` lists what is missing;
tests/test_docs.py fails on any, and on a docs/api.md that differs from a fresh build.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"

# module -> extra names (besides its __all__ / public definitions) that belong to the surface.
SURFACE: dict[str, tuple[str, ...]] = {
    "purefine.models": (),
    "purefine.checkpoint": ("save_peft", "load_peft"),
    "purefine.lora": (),
    "purefine.nf4": (),
    "purefine.optim": (),
    "purefine.schedules": (),
    "purefine.train": (),
    "purefine.tree": (),
    "purefine.ops": (),
    "purefine.losses": (),
    "purefine.preference": (),
    "purefine.generate": (),
    "purefine.shard": (),
    "purefine.data": (),
    "purefine.debug": (),
}
# A shape in a docstring: a parenthesized tuple of short dimension names or numbers with at least
# one comma, e.g. (B, T), (N,), (out, in), (..., D); or () for a scalar.
_DIM = r"(?:\.\.\.|[\w·*/+ -]{1,14})"
SHAPE = re.compile(rf"\({_DIM}(?:,\s*{_DIM})+\)|\({_DIM},\)|\(\)")


def members(module_name: str) -> list[tuple[str, Any]]:
    """[(name, function or class)] of a module's public surface, in order (constants left out)."""
    module = importlib.import_module(module_name)
    names = list(getattr(module, "__all__", None) or [
        n for n, v in vars(module).items()
        if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
        and getattr(v, "__module__", "") == module_name])
    names += [n for n in SURFACE.get(module_name, ()) if n not in names]
    return [(n, getattr(module, n)) for n in names if inspect.isfunction(getattr(module, n))
            or inspect.isclass(getattr(module, n))]


def methods(cls: type) -> list[tuple[str, Callable[..., Any]]]:
    """Public methods and properties a class defines itself (dataclass machinery left out)."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_") or name in fields:
            continue
        fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        fn = fn.fget if isinstance(fn, property) else fn
        if inspect.isfunction(fn):
            out.append((name, fn))
    return out


def _default(value: Any) -> str:
    if callable(value) and hasattr(value, "__qualname__"):
        return value.__qualname__  # never a memory address: the page must be reproducible
    text = repr(value)
    return re.sub(r" at 0x[0-9a-f]+", "", text)


def signature(fn: Callable[..., Any]) -> str:
    """``(a: int, *, b: str = 'x') -> T`` with annotations as written and reproducible defaults."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return "(...)"
    parts, star_done = [], False
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
        star_done = star_done or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {_default(p.default)}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY:
            parts.append("/")
    ret = sig.return_annotation
    ret_text = "" if ret is sig.empty else f" -> {ret if isinstance(ret, str) else inspect.formatannotation(ret)}"
    return f"({', '.join(parts)}){ret_text}"


def involves_tensors(fn: Callable[..., Any]) -> bool:
    """True when an argument or the result is annotated as a tensor."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    notes = [p.annotation for p in sig.parameters.values()] + [sig.return_annotation]
    return any("Tensor" in (n if isinstance(n, str) else repr(n)) for n in notes)


def walk() -> Iterator[tuple[str, str, Any]]:
    """(module, qualified name, object) of every documented function, class and method."""
    for module_name in SURFACE:
        for name, obj in members(module_name):
            yield module_name, name, obj
            if inspect.isclass(obj):
                for method_name, fn in methods(obj):
                    yield module_name, f"{name}.{method_name}", fn


def problems() -> list[str]:
    """'module.name: what is missing' for each surface item without a docstring, or without shapes
    where it takes or returns tensors."""
    out = []
    for module_name, name, obj in walk():
        doc = inspect.getdoc(obj) if not inspect.isclass(obj) else obj.__dict__.get("__doc__")
        if not doc or not doc.strip():
            out.append(f"{module_name}.{name}: no docstring")
        elif inspect.isfunction(obj) and involves_tensors(obj) and not SHAPE.search(doc):
            out.append(f"{module_name}.{name}: takes or returns tensors but its docstring gives no shapes")
    return out


def render() -> str:
    """The Markdown of docs/api.md."""
    lines = ["# purefine API reference", "",
             "Generated from the docstrings by `python scripts/make_api_docs.py`; do not edit by hand",
             "(tests/test_docs.py checks it is up to date). Shapes: B batch, T sequence length, S key length,",
             "D model width, V vocabulary, H heads, K key/value heads, Dh head width, N tokens or elements.", ""]
    lines += [f"- [`{m}`](#{m.replace('.', '')})" for m in SURFACE] + [""]
    for module_name in SURFACE:
        module = importlib.import_module(module_name)
        lines += [f"## {module_name}", "", inspect.cleandoc(module.__doc__ or "").strip(), ""]
        for name, obj in members(module_name):
            kind = "class" if inspect.isclass(obj) else "def"
            sig = signature(obj) if inspect.isfunction(obj) or dataclasses.is_dataclass(obj) else ""
            sig = sig.removesuffix(" -> None") if kind == "class" else sig
            lines += [f"### `{module_name.removeprefix('purefine.')}.{name}`", "", "```python",
                      f"{kind} {name}{sig}", "```", "", (inspect.getdoc(obj) or "").strip(), ""]
            if inspect.isclass(obj):
                for method_name, fn in methods(obj):
                    lines += [f"- `{method_name}{signature(fn)}`: " + " ".join((inspect.getdoc(fn) or "").split()), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text, missing = render(), problems()
    if "--check" in argv:
        stale = not OUT.exists() or OUT.read_text() != text
        for p in missing:
            print(f"missing: {p}")
        if stale:
            print(f"{OUT.relative_to(ROOT)} is stale: run python scripts/make_api_docs.py")
        return 1 if stale or missing else 0
    from purefine import fsutil

    fsutil.atomic_write(OUT, text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines); {len(missing)} docstring problems")
    for p in missing:
        print(f"missing: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
