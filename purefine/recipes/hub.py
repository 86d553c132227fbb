"""Download a model from, or upload an export to, the Hugging Face Hub (scripts/download.py, scripts/upload.py).

The token is a config field only so that ``--token`` exists: it is kept out of the config's repr
(so it never shows in logs or printed configs), falls back to ``HF_TOKEN``, and is never written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from purefine import hub


@dataclass(frozen=True)
class DownloadConfig:
    """Fetch a model repository's safetensors, configs and tokenizer files into a local directory."""

    repo_id: str
    """The repository, as owner/name (e.g. meta-llama/Llama-2-7b-hf)."""
    local_dir: str | None = None
    """Where to put the files (default: checkpoints/<name>)."""
    revision: str | None = None
    """A branch, tag or commit (default: the main branch)."""
    token: str | None = field(default=None, repr=False)
    """A Hugging Face token for private or gated repositories (default: the HF_TOKEN environment variable)."""
    allow_patterns: tuple[str, ...] = hub.DEFAULT_PATTERNS
    """Glob patterns of the files to fetch (pickled *.bin / *.pt weights are never fetched)."""
    repo_type: Literal["model", "dataset"] = "model"
    """The kind of repository."""
    endpoint: str | None = None
    """A hub mirror's URL (default: the HF_ENDPOINT environment variable, else huggingface.co)."""


@dataclass(frozen=True)
class UploadConfig:
    """Upload an exported HF checkpoint or PEFT adapter folder to a (new or existing) repository."""

    folder: str
    """The exported folder (config.json + safetensors, or adapter_config.json + adapter_model.safetensors)."""
    repo_id: str
    """The target repository, as owner/name; created if missing."""
    token: str | None = field(default=None, repr=False)
    """A Hugging Face token with write access (default: the HF_TOKEN environment variable)."""
    private: bool = False
    """Create the repository as private."""
    revision: str | None = None
    """The branch to commit to (created if missing; default: main)."""
    commit_message: str = "Upload with purefine"
    """The commit message."""
    endpoint: str | None = None
    """A hub mirror's URL (default: the HF_ENDPOINT environment variable, else huggingface.co)."""


def default_local_dir(repo_id: str) -> Path:
    """checkpoints/<name> for owner/name."""
    return Path("checkpoints") / repo_id.rstrip("/").split("/")[-1]


def download_main(cfg: DownloadConfig) -> Path:
    """Download ``cfg.repo_id`` and print where it went; returns the local directory."""
    local_dir = Path(cfg.local_dir) if cfg.local_dir else default_local_dir(cfg.repo_id)
    path = hub.download(cfg.repo_id, local_dir=local_dir, revision=cfg.revision, token=cfg.token,
                        allow_patterns=cfg.allow_patterns, repo_type=cfg.repo_type, endpoint=cfg.endpoint)
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
    print(f"downloaded {cfg.repo_id} ({len(files)} files) to {path}")
    return path


def upload_main(cfg: UploadConfig) -> str:
    """Upload ``cfg.folder`` to ``cfg.repo_id`` and print the commit URL; returns it."""
    kind = hub.check_upload_folder(cfg.folder)
    url = hub.upload(cfg.folder, cfg.repo_id, token=cfg.token, private=cfg.private, revision=cfg.revision,
                     commit_message=cfg.commit_message, endpoint=cfg.endpoint)
    print(f"uploaded {kind} {cfg.folder} to {cfg.repo_id}: {url}")
    return url
