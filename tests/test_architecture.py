"""The house rules the layout depends on: no import cycle (imports inside functions and through
``importlib`` included), every module under 400 lines, the layers of docs/internals.md respected,
and no duck typing of model families."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "purefine"
MAX_LINES = 400

# docs/internals.md: a module imports only from its own layer or below.
LAYERS = {
    "errors": 1, "fsutil": 1, "schema": 1, "tree": 1, "ops": 1, "fused": 1, "losses": 1, "preference": 1, "hardware": 1,
    "nf4_codec": 2, "nf4": 2, "lora": 2, "upcast": 2,
    "models": 3,
    "optim": 4, "schedules": 4, "train": 4, "shard": 4,
    "checkpoint": 5, "data": 5,
    "generate": 6, "evaluate": 6, "hub": 6, "logging": 6, "debug": 6,
    "configio": 7, "config": 7, "rules": 7, "recipes": 7, "cli": 8,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts}


def resolve(name: str, known: set[str]) -> str | None:
    """The longest purefine module that ``name`` (a dotted import target) names or lies inside."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def imports_of(path: Path, this: str, known: set[str]) -> set[str]:
    """Every purefine module ``path`` imports: top-level, inside functions, relative, and string
    literals passed to ``importlib.import_module``. ``from pkg import name`` counts the submodule
    ``pkg.name`` when there is one, else ``pkg``. Parent packages Python imports implicitly are not
    edges (every package's ``__init__`` would otherwise form a cycle with its submodules)."""
    tree = ast.parse(path.read_text(), str(path))
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                targets = [arg.value]
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                targets = [str(arg.values[0].value).rstrip(".")]
        for t in targets:
            target = resolve(t, known)
            if target is not None and target != this:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, name, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_graph_sees_function_level_and_importlib_imports(tmp_path):
    pkg = tmp_path / "purefine"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from purefine import b\n")
    (pkg / "b.py").write_text("import importlib\nimportlib.import_module('purefine.a')\n")
    known = {"purefine.a", "purefine.b"}
    assert imports_of(pkg / "a.py", "purefine.a", known) == {"purefine.b"}
    assert imports_of(pkg / "b.py", "purefine.b", known) == {"purefine.a"}
    assert cycles({"purefine.a": {"purefine.b"}, "purefine.b": {"purefine.a"}}) == [["purefine.a", "purefine.b"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_modules_import_only_their_layer_or_below():
    wrong = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
             for m, targets in import_graph().items() for t in targets
             if layer(m) is not None and layer(t) is not None and layer(t) > layer(m)]
    assert wrong == []


def test_every_package_module_has_a_layer():
    missing = sorted({m.split(".")[1] for m in modules() if m != "purefine" and layer(m) is None})
    assert missing == []


def test_no_module_over_400_lines():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "scripts").glob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_duck_typing_of_families():
    """What a family can do is declared in its ``Family`` record, never probed."""
    probe = re.compile(r"(hasattr|getattr)\((fam|family|models\.family)\b")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in PACKAGE.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if probe.search(line)]
    assert found == []
