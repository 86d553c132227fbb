"""No pickle on any load path, no remote code, and no hub token in anything a run writes.

- A short training run of the bundled demo (LoRA, a few steps, ``--save-merged``, a resumable
  checkpoint) with ``HF_TOKEN`` set: no file under the output directory or the datasets cache it
  used holds the token or is a pickle (pickle protocol 2-5 magic, a torch.save zip archive,
  a .bin / .pt / .pkl name), and nothing it printed holds the token.
- A static scan of purefine/ and scripts/ (the syntax tree, so docstrings that say "pickle" do
  not count): no pickle / dill / joblib / marshal / shelve import, no ``torch.load`` without
  ``weights_only=True``, no ``trust_remote_code`` that is not False, no ``allow_pickle=True``,
  no ``read_pickle``. The scanner is itself checked on code that does each of these.
"""

from __future__ import annotations

import ast
import secrets
import zipfile
from pathlib import Path

import pytest

from purefine.config import TrainConfig
from purefine.data import DataConfig
from tests.conftest import ROOT

PICKLE_SUFFIXES = {".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".joblib"}
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def pickle_reason(path: Path) -> str | None:
    """Why ``path`` looks like a pickle, or None."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return f"a {path.suffix} file"
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"pickle protocol {head[1]} magic"
    if head == b"PK\x03\x04" and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pickled = [n for n in archive.namelist() if n.endswith((".pkl", ".pickle"))]
        if pickled:
            return f"a zip archive holding {pickled[:2]} (torch.save format)"
    return None


def files_under(*roots: Path) -> list[Path]:
    return sorted(p for root in roots if root.exists() for p in root.rglob("*") if p.is_file())


def test_a_training_run_writes_no_token_and_no_pickle(tmp_path, monkeypatch, capsys):
    from purefine.recipes.train import main

    token = "hf_SECRET" + secrets.token_hex(16)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", token)
    out, cache = tmp_path / "out", tmp_path / "datasets-cache"
    main(TrainConfig(max_steps=4, batch_size=2, max_seq_len=64, output_dir=str(out), progress=False, plot=False,
                     eval_batches=1, log_every=1, save_every=2, save_merged=True,
                     data=DataConfig(cache_dir=str(cache))))
    printed = capsys.readouterr()
    written = files_under(out, cache)
    names = {p.name for p in written}
    assert "config.yaml" in names and any(n.endswith(".safetensors") for n in names), sorted(names)
    assert any(p.suffix == ".arrow" for p in written), "the datasets cache was not under the directory given"
    for path in written:
        assert token.encode() not in path.read_bytes(), f"{path} holds the hub token"
        assert pickle_reason(path) is None, f"{path}: {pickle_reason(path)}"
    assert token not in printed.out + printed.err


def violations(source: str, name: str = "<source>") -> list[str]:
    """Unsafe loading patterns in Python ``source``: what each is and where."""
    found = []
    tree = ast.parse(source, name)
    torch_load_names = {"load"} if any(isinstance(n, ast.ImportFrom) and n.module == "torch"
                                       and any(a.name == "load" for a in n.names) for n in ast.walk(tree)) else set()
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in PICKLE_MODULES:
            found.append(f"{where}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr == "read_pickle":
            found.append(f"{where}: read_pickle")
        elif isinstance(node, ast.Call):
            found += _call_violations(node, where, torch_load_names)
    return found


def _call_violations(node: ast.Call, where: str, torch_load_names: set[str]) -> list[str]:
    found = []
    func = node.func
    keywords = {k.arg: k.value for k in node.keywords if k.arg}
    is_torch_load = (isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name)
                     and func.value.id == "torch") or (isinstance(func, ast.Name) and func.id in torch_load_names)
    if is_torch_load:
        weights_only = keywords.get("weights_only")
        if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            found.append(f"{where}: torch.load without weights_only=True")
    remote = keywords.get("trust_remote_code")
    if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
        found.append(f"{where}: trust_remote_code={ast.unparse(remote)}")
    allow = keywords.get("allow_pickle")
    if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
        found.append(f"{where}: allow_pickle={ast.unparse(allow)}")
    return found


@pytest.mark.parametrize("snippet", [
    "import pickle", "import dill as d", "from joblib import load", "x = pickle.loads(b)",
    "import torch\ntorch.load(f)", "import torch\ntorch.load(f, weights_only=False)", "from torch import load\nload(f)",
    "m = f(p, trust_remote_code=True)", "m = f(p, trust_remote_code=flag)", "np.load(p, allow_pickle=True)",
    "pd.read_pickle(p)",
])
def test_the_scanner_finds_each_unsafe_pattern(snippet):
    assert violations(snippet)


def test_the_scanner_accepts_safe_code():
    assert not violations('"""pickled .bin files are refused"""\nimport torch\n'
                          "torch.load(f, weights_only=True)\nm = f(p, trust_remote_code=False)\n# import pickle\n")


def test_no_pickle_torch_load_or_remote_code_in_the_package():
    files = sorted((ROOT / "purefine").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    assert len(files) > 20
    found = [v for f in files for v in violations(f.read_text(), str(f.relative_to(ROOT)))]
    assert not found, "\n".join(found)
