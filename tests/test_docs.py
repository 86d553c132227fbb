"""The documentation runs and stays true.

- Every tutorial under docs/tutorials/ is executed: its ``bash`` blocks as shell commands and its
  ``python`` blocks in one namespace, in order, in a fresh directory with a ``scripts/`` link
  (blocks marked ``no-test`` are the hub / GPU commands and are only parsed, below).
- Every ``python scripts/NAME.py ...`` command in the README, the tutorials and the FAQ, run or
  not, parses: its flags exist and its values are valid (so a renamed flag breaks the docs' test).
- docs/api.md is what scripts/make_api_docs.py generates, and every public function of the surface
  has a docstring with shapes where it takes or returns tensors.
- The README keeps its first two commands (CI runs them) and links only to files that exist.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.S | re.M)
FIRST_COMMANDS = [
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e . && python scripts/train.py',
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q',
]
SLOW_TUTORIALS = {"03-full-finetune-fsdp.md",  # two torchrun processes: about a minute on 2 cores
                  "07-dpo-and-distillation.md"}  # two training runs: about 40 s on 2 cores


def blocks(path: Path) -> list[tuple[str, str, bool]]:
    """[(language, code, runs)] of the fenced blocks of a Markdown file, in order."""
    out = []
    for m in FENCE.finditer(path.read_text()):
        info = m.group(1).split()
        out.append((info[0] if info else "", m.group(2), "no-test" not in info[1:]))
    return out


def make_api_docs():
    spec = importlib.util.spec_from_file_location("make_api_docs", ROOT / "scripts" / "make_api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -------------------------------------------------------------------------------------------- tutorials

@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One datasets cache for every tutorial (the demo data is tokenized once)."""
    return tmp_path_factory.mktemp("hf-datasets-cache")


def tutorial_env(cache: Path) -> dict[str, str]:
    """The environment the tutorial commands run in: this Python first on PATH, offline hub."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return dict(os.environ, PATH=path, PYTHONPATH=str(ROOT), HF_DATASETS_CACHE=str(cache), HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")


SCRIPT_LINE = re.compile(r"python scripts/(\w+)\.py(?: [^$|&;<>`]*)?")


def run_script(line: str, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python scripts/NAME.py ARGS`` run in this process (the script's ``__main__`` with that argv):
    the command exactly, without paying a fresh interpreter's imports for each one."""
    import runpy

    words = shlex.split(line)
    with monkeypatch.context() as m:
        m.setattr(sys, "argv", words[1:])
        try:
            runpy.run_path(words[1], run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), f"{where}: {line} exited with {e.code}"


def run_shell(code: str, where: str, workdir: Path, env: dict[str, str]) -> None:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{where} failed:\n{code}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def run_blocks(path: Path, workdir: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Execute the runnable blocks of ``path`` in ``workdir``; returns how many ran. A shell block
    runs line by line (a heredoc block whole, in bash); plain ``python scripts/...`` lines in-process."""
    import datasets

    (workdir / "scripts").symlink_to(ROOT / "scripts")
    monkeypatch.chdir(workdir)
    for key in ("HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(env["HF_DATASETS_CACHE"]))
    namespace: dict = {"__name__": f"tutorial_{path.stem.replace('-', '_')}"}
    ran = 0
    for i, (lang, code, runs) in enumerate(blocks(path)):
        if not runs or lang not in ("bash", "python"):
            continue
        ran, where = ran + 1, f"{path.name} block {i}"
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 (our own docs)
        elif "<<" in code:
            run_shell(code, where, workdir, env)
        else:
            for line in code.replace("\\\n", " ").splitlines():
                line = " ".join(line.split(" #")[0].split())
                if SCRIPT_LINE.fullmatch(line):
                    run_script(line, where, monkeypatch)
                elif line:
                    run_shell(line, where, workdir, env)
    return ran


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW_TUTORIALS
                                               else []) for p in TUTORIALS])
def test_tutorial_runs(path: Path, tmp_path: Path, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    threads = torch.get_num_threads()
    try:
        assert run_blocks(path, tmp_path, tutorial_env(hf_cache), monkeypatch) >= 2
    finally:
        torch.set_num_threads(threads)


def test_faq_code_runs(tmp_path: Path, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_blocks(DOCS / "faq.md", tmp_path, tutorial_env(hf_cache), monkeypatch) >= 3


def test_there_are_seven_tutorials_indexed_from_the_readme() -> None:
    assert len(TUTORIALS) == 7
    readme = (ROOT / "README.md").read_text()
    assert all(f"docs/tutorials/{p.name}" in readme for p in TUTORIALS)


# ------------------------------------------------------------------------------------ commands parse

def parsers() -> dict:
    """script name -> a function that parses its argument list (raising on a bad flag)."""
    from purefine.config import parse_train_args
    from purefine.recipes import bench, check, configs, data_preview, evaluate, export, generate, hub, inspect
    from purefine.recipes.cli import parse

    types = {"generate": generate.GenerateConfig, "eval": evaluate.EvalConfig, "export": export.ExportConfig,
             "download": hub.DownloadConfig, "upload": hub.UploadConfig, "info": inspect.InspectConfig,
             "bench": bench.BenchConfig, "check": check.CheckConfig, "configs": configs.Command,
             "data": data_preview.DataPreviewConfig}
    out = {name: (lambda args, t=t: parse(t, args)) for name, t in types.items()}
    out["train"] = parse_train_args
    return out


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(file, script name, arguments) of every ``scripts/NAME.py`` or ``purefine NAME`` command in the
    docs' shell blocks (``purefine ls | cp | validate`` are the configs script's subcommands)."""
    found = []
    for path in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for lang, code, _ in blocks(path):
            if lang not in ("bash", "sh"):
                continue
            for line in code.replace("\\\n", " ").splitlines():
                for command in re.split(r"&&|;|\||>", line.split(" #")[0]):
                    words = shlex.split(command)
                    at = next((i for i, w in enumerate(words) if re.fullmatch(r"scripts/\w+\.py", w)), None)
                    if at is not None and "make_" not in words[at]:
                        found.append((path.name, words[at][len("scripts/"):-3], words[at + 1:]))
                    elif len(words) > 1 and words[0] == "purefine" and not words[1].startswith("-"):
                        script = "configs" if words[1] in ("ls", "cp", "validate") else words[1]
                        found.append((path.name, script, words[1:] if script == "configs" else words[2:]))
    return found


def test_every_documented_command_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = documented_commands()
    table = parsers()
    monkeypatch.chdir(tmp_path)  # YAML files the docs copy from a preset before using them exist here
    for _, _, args in commands:
        for name in args:
            if name.endswith(".yaml") and "/" not in name:
                (tmp_path / name).write_bytes((ROOT / "purefine" / "configs" / "tiny-demo.yaml").read_bytes())
    assert len(commands) >= 30 and {s for _, s, _ in commands} >= set(table)
    for source, script, args in commands:
        if script not in table or "--help" in args:
            continue
        try:
            table[script](args)
        except SystemExit as e:  # a positional-only subcommand printing usage
            raise AssertionError(f"{source}: scripts/{script}.py {' '.join(args)}: exit {e.code}") from None
        except Exception as e:
            raise AssertionError(f"{source}: scripts/{script}.py {' '.join(args)}: {e}") from None


# ----------------------------------------------------------------------------------------- API docs

def test_api_reference_is_generated_and_current() -> None:
    module = make_api_docs()
    assert (DOCS / "api.md").read_text() == module.render(), "docs/api.md is stale: python scripts/make_api_docs.py"


def test_every_public_function_has_a_docstring_with_shapes() -> None:
    module = make_api_docs()
    assert module.problems() == []
    surface = {name for _, name, _ in module.walk()}
    design = {"preset", "init", "forward", "load_hf", "save_hf", "save_peft", "load_peft", "apply", "merge", "trainable",
              "quantize", "dequantize", "adamw", "make_step", "value_and_grad", "generate", "layout", "layer_stats",
              "memory_breakdown"}
    assert design <= surface


def test_the_docstring_check_catches_a_missing_docstring_and_missing_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    module = make_api_docs()

    def undocumented(x: torch.Tensor) -> torch.Tensor:
        return x

    def no_shapes(x: torch.Tensor) -> torch.Tensor:
        """Doubles x."""
        return 2 * x

    def with_shapes(x: torch.Tensor) -> torch.Tensor:
        """x (B, T) -> 2x (B, T)."""
        return 2 * x

    monkeypatch.setattr(module, "members", lambda name: [("undocumented", undocumented), ("no_shapes", no_shapes),
                                                         ("with_shapes", with_shapes)])
    monkeypatch.setattr(module, "SURFACE", {"purefine.fake": ()})
    assert module.problems() == ["purefine.fake.undocumented: no docstring",
                                 "purefine.fake.no_shapes: takes or returns tensors but its docstring gives no shapes"]


# ------------------------------------------------------------------------------------------- README

def test_readme_keeps_its_first_two_commands() -> None:
    code = [c.strip() for lang, c, _ in blocks(ROOT / "README.md") if lang == "bash"]
    assert code[:2] == FIRST_COMMANDS


def slugs(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    heads = re.findall(r"^#+ (.+)$", FENCE.sub("", path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_readme_and_docs_link_only_to_files_and_headings_that_exist() -> None:
    for path in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", path.read_text()):
            if re.match(r"https?://", target):
                continue
            file = (path.parent / target) if target else path
            assert file.exists(), f"{path.name}: broken link {target}"
            if anchor and file.suffix == ".md":
                assert anchor in slugs(file), f"{path.name}: no heading #{anchor} in {file.name}"
