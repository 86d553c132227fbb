"""Hub download/upload against a local stand-in for the Hugging Face Hub API.

``StubHub`` is a tiny HTTP server speaking the part of the hub protocol that huggingface_hub's
``snapshot_download``, ``create_repo``, ``create_branch`` and ``upload_folder`` use, so the real
library code runs end to end (no network). It records every request and its Authorization header.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

import purefine as pf
from purefine import hub
from purefine.recipes import hub as hub_recipe
from tests.conftest import ROOT, make_hf_llama

TOKEN = "hf_TESTsecret0123456789abcdef"
SHA = "a" * 40
REPO_FILES = {
    "config.json": b'{"model_type": "llama"}', "model-00001-of-00002.safetensors": b"w1" * 50,
    "model-00002-of-00002.safetensors": b"w2" * 50, "model.safetensors.index.json": b"{}",
    "tokenizer.model": b"sp", "tokenizer_config.json": b"{}", "tokenizer.json": b"{}", "README.md": b"# card",
    "pytorch_model.bin": b"pickle", "original/consolidated.00.pth": b"pickle", "original/params.json": b"{}",
}
DOWNLOADED = set(REPO_FILES) - {"README.md", "pytorch_model.bin", "original/consolidated.00.pth"}


class StubHub:
    """A local hub: ``repos`` maps owner/name -> {path: bytes}; ``token`` (if set) is required."""

    def __init__(self, repos: dict[str, dict[str, bytes]], token: str | None = None):
        self.repos, self.token, self.requests, self.created = repos, token, [], []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                stub.handle(self, send_body=True)

            def do_HEAD(self):
                stub.handle(self, send_body=False)

            def do_POST(self):
                stub.handle(self, send_body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def reply(h, status, data=b"{}", headers=(), send_body=True):
        h.send_response(status)
        for key, value in (("Content-Type", "application/json"), *headers):
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if send_body:
            h.wfile.write(data)

    def handle(self, h, send_body):
        path = unquote(urlparse(h.path).path).strip("/").split("/")
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if h.command == "POST" else b""
        auth = h.headers.get("Authorization")
        self.requests.append((h.command, "/".join(path), auth))
        reply = lambda status, data=b"{}", headers=(): self.reply(h, status, data, headers, send_body)  # noqa: E731
        if self.token and auth != f"Bearer {self.token}":
            return reply(401, b'{"error": "Invalid credentials in Authorization header"}')
        if path[:3] == ["api", "repos", "create"]:
            return self.create(json.loads(body), reply)
        api = path[0] == "api"
        repo, rest = "/".join(path[2:4] if api else path[0:2]), path[4:] if api else path[2:]
        if repo not in self.repos:
            return reply(404, b'{"error": "Repository not found"}', [("X-Error-Code", "RepoNotFound")])
        files = self.repos[repo]
        if api and rest[0] == "revision":
            if rest[1] not in ("main", SHA):
                return reply(404, b'{"error": "Invalid rev id"}', [("X-Error-Code", "RevisionNotFound")])
            return reply(200, json.dumps({"id": repo, "sha": SHA, "siblings": [{"rfilename": f} for f in files]}).encode())
        if api and rest[0] == "tree":
            entries = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for f, d in files.items()]
            return reply(200, json.dumps(entries).encode())
        if api and rest[0] == "preupload":
            listed = json.loads(body)["files"]
            return reply(200, json.dumps({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                    for f in listed]}).encode())
        if api and rest[0] == "commit":
            return self.commit(repo, rest[1], body, reply)
        if api and rest[0] == "branch":
            return reply(200)
        if rest[0] == "resolve":
            data = files["/".join(rest[2:])]
            return reply(200, data, [("X-Repo-Commit", SHA), ("ETag", f'"{hashlib.sha1(data).hexdigest()}"')])
        return reply(400)

    def create(self, payload, reply):
        repo = f"{payload['organization']}/{payload['name']}"
        self.created.append(payload)
        if repo in self.repos:
            return reply(409, json.dumps({"error": "You already created this model repo", "url": f"{self.url}/{repo}"}).encode())
        self.repos[repo] = {}
        return reply(200, json.dumps({"url": f"{self.url}/{repo}"}).encode())

    def commit(self, repo, revision, body, reply):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        self.last_commit = {"revision": revision, "summary": lines[0]["value"].get("summary")}
        for item in lines[1:]:
            assert item["key"] == "file", item  # everything was announced as a regular (inline) upload
            self.repos[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        return reply(200, json.dumps({"commitUrl": f"{self.url}/{repo}/commit/{SHA}", "commitOid": SHA}).encode())


@pytest.fixture
def online(monkeypatch, tmp_path):
    """huggingface_hub online (conftest sets HF_HUB_OFFLINE=1), with no token in the environment or on disk."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))


@pytest.fixture
def stub(online):
    server = StubHub({"me/model": dict(REPO_FILES)}, token=TOKEN)
    yield server
    server.close()


def files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts}


def assert_token_nowhere(root: Path, *texts: str) -> None:
    for text in texts:
        assert TOKEN not in text
    for p in root.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p


# --- download -------------------------------------------------------------------------------------

def test_download_fetches_safetensors_configs_and_tokenizer_only(stub, tmp_path):
    out = hub.download("me/model", local_dir=tmp_path / "dl", token=TOKEN, endpoint=stub.url)
    assert out == (tmp_path / "dl").resolve() or out == tmp_path / "dl"
    assert files_under(out) == DOWNLOADED
    assert all((out / f).read_bytes() == REPO_FILES[f] for f in DOWNLOADED)
    assert {auth for _, _, auth in stub.requests} == {f"Bearer {TOKEN}"}
    assert ("GET", "api/models/me/model/revision/main", f"Bearer {TOKEN}") in stub.requests
    assert_token_nowhere(tmp_path)


def test_download_revision_and_patterns(stub, tmp_path):
    out = hub.download("me/model", local_dir=tmp_path / "dl", token=TOKEN, endpoint=stub.url, revision=SHA,
                       allow_patterns=["*"])
    assert files_under(out) == set(REPO_FILES) - {"pytorch_model.bin", "original/consolidated.00.pth"}
    assert not any("revision/main" in path for _, path, _ in stub.requests)
    out = hub.download("me/model", local_dir=tmp_path / "json", token=TOKEN, endpoint=stub.url, allow_patterns=["*.json"])
    assert files_under(out) == {f for f in REPO_FILES if f.endswith(".json")}


def test_download_takes_the_token_from_hf_token(stub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.download("me/model", local_dir=tmp_path / "a", endpoint=stub.url)
    assert {auth for _, _, auth in stub.requests} == {f"Bearer {TOKEN}"}
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(hub.HubError):  # the environment's token is used (and refused)...
        hub.download("me/model", local_dir=tmp_path / "b", endpoint=stub.url)
    hub.download("me/model", local_dir=tmp_path / "c", endpoint=stub.url, token=TOKEN)  # ...the argument wins


def test_download_passes_its_arguments_to_snapshot_download(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append((repo_id, kw)) or kw["local_dir"])
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = hub.download("owner/name", local_dir=tmp_path, revision="v1", repo_type="model")
    (repo_id, kw), = calls
    assert out == tmp_path and repo_id == "owner/name" and kw["revision"] == "v1" and kw["token"] == TOKEN
    assert kw["allow_patterns"] == list(hub.DEFAULT_PATTERNS) and "*.bin" in kw["ignore_patterns"]
    assert kw["local_dir"] == str(tmp_path) and kw["repo_type"] == "model"


@pytest.mark.parametrize("repo_id, token, revision, expected", [
    ("me/missing", TOKEN, None, "repository not found.*check the repo id.*HF_TOKEN"),
    ("me/model", "hf_wrong_token", None, "HTTP 401.*--token or set HF_TOKEN"),
    ("me/model", None, None, "HTTP 401.*--token or set HF_TOKEN"),
    ("me/model", TOKEN, "v9", "revision 'v9' not found"),
    ("not a repo id!", TOKEN, None, "not a valid repo id"),
])
def test_download_hub_refusals_are_purefine_errors(stub, tmp_path, repo_id, token, revision, expected):
    with pytest.raises(hub.HubError, match=expected) as info:
        hub.download(repo_id, local_dir=tmp_path / "dl", token=token, revision=revision, endpoint=stub.url)
    assert isinstance(info.value, pf.PurefineError) and TOKEN not in str(info.value)


def test_download_offline_and_unreachable_say_what_to_do(monkeypatch, tmp_path, online):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(hub.HubError, match="could not reach.*pass its local directory") as info:
        hub.download("me/model", local_dir=tmp_path / "a", token=TOKEN, endpoint=closed)
    assert TOKEN not in str(info.value)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="could not reach.*HF_HUB_OFFLINE"):
        hub.download("me/model", local_dir=tmp_path / "b", token=TOKEN)


# --- upload ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny HF checkpoint folder, plus a hidden temporary file and a pickle that must not be uploaded."""
    path = tmp_path_factory.mktemp("export") / "merged"
    make_hf_llama(path)
    (path / ".model.safetensors.tmp-1234").write_bytes(b"partial")
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    return path


def test_upload_creates_the_repo_and_uploads_the_export(stub, export_dir, tmp_path):
    url = hub.upload(export_dir, "me/new-model", token=TOKEN, private=True, commit_message="first", endpoint=stub.url)
    assert url == f"{stub.url}/me/new-model/commit/{SHA}"
    assert stub.created == [{"name": "new-model", "organization": "me", "visibility": "private", "type": "model"}]
    assert set(stub.repos["me/new-model"]) == {"config.json", "generation_config.json", "model.safetensors"}
    assert all(stub.repos["me/new-model"][f] == (export_dir / f).read_bytes() for f in stub.repos["me/new-model"])
    assert stub.last_commit == {"revision": "main", "summary": "first"}
    assert {auth for _, _, auth in stub.requests} == {f"Bearer {TOKEN}"}
    # the round trip: download what was uploaded and load it
    back = hub.download("me/new-model", local_dir=tmp_path / "back", token=TOKEN, endpoint=stub.url)
    _, params = pf.checkpoint.load_hf(back)
    _, ref = pf.checkpoint.load_hf(export_dir)
    assert all(torch.equal(a, b) for a, b in zip(pf.tree.flatten(params).values(), pf.tree.flatten(ref).values()))


def test_upload_to_an_existing_repo_and_a_branch(stub, export_dir):
    hub.upload(export_dir, "me/model", token=TOKEN, revision="dev", endpoint=stub.url)  # exists: 409 is fine
    assert ("POST", "api/models/me/model/branch/dev", f"Bearer {TOKEN}") in stub.requests
    assert stub.last_commit["revision"] == "dev"


def test_upload_accepts_a_peft_adapter(stub, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(8, 4)}, adapter / "adapter_model.safetensors")
    assert hub.check_upload_folder(adapter) == "adapter"
    hub.upload(adapter, "me/adapter", token=TOKEN, endpoint=stub.url)
    assert set(stub.repos["me/adapter"]) == {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize("files, expected", [
    ({}, "no config.json or adapter_config.json"),
    ({"weights.safetensors": b""}, "no config.json or adapter_config.json.*weights.safetensors"),
    ({"config.json": b"{}"}, "config.json but no safetensors"),
    ({"adapter_config.json": b"{}", "adapter_model.bin": b""}, "adapter_config.json but no safetensors"),
    ({"config.json": b"{not json", "model.safetensors": b""}, "config.json: expected a JSON object"),
])
def test_upload_refuses_a_folder_that_is_not_an_export(stub, tmp_path, files, expected):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with pytest.raises(hub.HubError, match=expected):
        hub.upload(folder, "me/x", token=TOKEN, endpoint=stub.url)
    with pytest.raises(hub.HubError, match="no such directory"):
        hub.upload(tmp_path / "missing", "me/x", token=TOKEN, endpoint=stub.url)
    assert stub.requests == []


def test_upload_without_a_valid_token_says_what_to_do(stub, export_dir):
    for token in (None, "hf_wrong_token"):
        with pytest.raises(hub.HubError, match="HTTP 401.*HF_TOKEN to a token with write access"):
            hub.upload(export_dir, "me/new", token=token, endpoint=stub.url)


# --- recipes and scripts: the token never shows ----------------------------------------------------

def test_recipe_configs_keep_the_token_out_of_their_repr():
    for cfg in (hub_recipe.DownloadConfig(repo_id="me/model", token=TOKEN),
                hub_recipe.UploadConfig(folder="x", repo_id="me/model", token=TOKEN)):
        assert TOKEN not in repr(cfg) and TOKEN not in str(cfg) and "me/model" in repr(cfg)


def test_recipes_print_no_token_and_write_none(stub, export_dir, tmp_path, capfd, caplog):
    caplog.set_level("DEBUG")
    path = hub_recipe.download_main(hub_recipe.DownloadConfig(repo_id="me/model", local_dir=str(tmp_path / "dl"),
                                                              token=TOKEN, endpoint=stub.url))
    url = hub_recipe.upload_main(hub_recipe.UploadConfig(folder=str(export_dir), repo_id="me/up", token=TOKEN,
                                                         endpoint=stub.url))
    out, err = capfd.readouterr()
    assert f"downloaded me/model ({len(DOWNLOADED)} files)" in out and url in out
    assert files_under(path) == DOWNLOADED
    assert_token_nowhere(tmp_path, out, err, caplog.text)


def run_script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | env
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          env=environ, cwd=ROOT, timeout=120)


def test_scripts_download_through_a_mirror_without_leaking_the_token(tmp_path, online):
    server = StubHub({"me/model": dict(REPO_FILES)}, token=TOKEN)
    try:
        result = run_script("download.py", "--repo-id", "me/model", "--local-dir", str(tmp_path / "dl"),
                            "--endpoint", server.url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0")
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path / "dl") == DOWNLOADED
    assert_token_nowhere(tmp_path, result.stdout, result.stderr)


def test_scripts_exit_2_with_one_line(tmp_path):
    offline = run_script("download.py", "--repo-id", "me/model", "--local-dir", str(tmp_path / "dl"),
                         "--token", TOKEN, HF_HUB_OFFLINE="1")
    not_export = run_script("upload.py", "--folder", str(tmp_path), "--repo-id", "me/model", "--token", TOKEN)
    for result, expected in ((offline, "could not reach the Hugging Face Hub"), (not_export, "expected an HF checkpoint")):
        assert result.returncode == 2
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and expected in result.stderr
        assert TOKEN not in result.stdout + result.stderr
