"""Download from and upload to the Hugging Face Hub, with errors that say what to do.

- ``download(repo_id, local_dir=...)``: ``huggingface_hub.snapshot_download`` of the weights
  (safetensors), configs and tokenizer files into a local directory; pickled weights (``*.bin``,
  ``*.pt``, ...) are never fetched, whatever the allow-patterns say.
- ``upload(folder, repo_id)``: create the repository if needed (``HfApi.create_repo``,
  ``exist_ok=True``) and upload an exported HF checkpoint or PEFT adapter (``upload_folder``).
- ``HubError``: what both raise when the hub cannot be reached, refuses the token, or has no such
  repository or revision; the message names the repo and says what to do next.

The token comes from the ``token`` argument or the ``HF_TOKEN`` environment variable (otherwise
huggingface_hub's stored login). It is passed to huggingface_hub only: never printed, logged, or
written anywhere, and scrubbed from any error message.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import huggingface_hub
from huggingface_hub import errors as hf_errors

from purefine.errors import PurefineError

DEFAULT_PATTERNS: tuple[str, ...] = (
    "*.safetensors", "*.json", "tokenizer.model", "tokenizer*", "*.tiktoken", "merges.txt", "vocab.txt",
)
PICKLE_PATTERNS: tuple[str, ...] = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.h5", "*.msgpack")
UPLOAD_IGNORE: tuple[str, ...] = (".*", "*/.*", *PICKLE_PATTERNS)  # hidden files include fsutil's temporaries

AUTH_HINT = "pass --token or set HF_TOKEN to a token with {access} access (huggingface.co/settings/tokens)"
OFFLINE_HINT = {
    "download": "check the network and that HF_HUB_OFFLINE is not set, or download the model on a machine with "
                "access and pass its local directory instead",
    "upload": "check the network and that HF_HUB_OFFLINE is not set (uploading needs the hub)",
}
NOT_EXPORTED = ("{folder}: expected an HF checkpoint (config.json + *.safetensors) or a PEFT adapter "
                "(adapter_config.json + adapter_model.safetensors); found {found}. Export first (scripts/export.py)")


class HubError(PurefineError):
    """The hub is unreachable, refused the token, or lacks the repository, revision or file."""


def resolve_token(token: str | None) -> str | None:
    """The token to use: the argument, else ``HF_TOKEN``, else None (huggingface_hub's stored login)."""
    return token or os.environ.get("HF_TOKEN") or None


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport-level failures of the HTTP clients huggingface_hub may use."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError, hf_errors.OfflineModeIsEnabled,
                                        hf_errors.LocalEntryNotFoundError]
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


HUB_FAILURES: tuple[type[BaseException], ...] = (
    hf_errors.HfHubHTTPError, hf_errors.HFValidationError, hf_errors.LocalTokenNotFoundError,
    hf_errors.EntryNotFoundError, OSError, *_network_errors(),
)


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def explain(e: BaseException, repo_id: str, *, action: str, revision: str | None = None) -> str:
    """A one-paragraph message for a huggingface_hub failure: what went wrong with which repo, what to do."""
    access = "write" if action == "upload" else "read"
    auth = AUTH_HINT.format(access=access)
    status = _status(e)
    if isinstance(e, hf_errors.GatedRepoError):
        return f"{action} {repo_id!r}: the repository is gated; accept its terms on huggingface.co/{repo_id}, then {auth}"
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return (f"{action} {repo_id!r}: repository not found, or private and the token was missing or invalid; "
                f"check the repo id (owner/name), and for a private repository {auth}")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return f"{action} {repo_id!r}: revision {revision!r} not found; check the branch, tag or commit"
    if isinstance(e, hf_errors.LocalTokenNotFoundError) or status == 401:
        return f"{action} {repo_id!r}: the hub needs a valid token (HTTP 401); {auth}"
    if status == 403:
        return f"{action} {repo_id!r}: the token may not {access} this repository (HTTP 403); {auth}"
    if isinstance(e, hf_errors.HFValidationError):
        return f"{action}: {repo_id!r} is not a valid repo id; expected 'owner/name' ({_first_line(e)})"
    if isinstance(e, _network_errors()):
        return f"{action} {repo_id!r}: could not reach the Hugging Face Hub ({_first_line(e)}); {OFFLINE_HINT[action]}"
    if isinstance(e, hf_errors.HfHubHTTPError):
        return f"{action} {repo_id!r}: the hub answered HTTP {status}: {_first_line(e)}"
    return f"{action} {repo_id!r}: {type(e).__name__}: {_first_line(e)}"


def _hub_error(e: BaseException, repo_id: str, token: str | None, *, action: str, revision: str | None) -> HubError:
    message = explain(e, repo_id, action=action, revision=revision)
    if token:
        message = message.replace(token, "***")
    return HubError(message)


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the shape of a hub repository id (``org/name``) rather than a path."""
    return REPO_ID.fullmatch(name) is not None and not name.startswith((".", "/")) and ".." not in name


def resolve_model_dir(path_or_id: str, *, flag: str = "--checkpoint-dir", revision: str | None = None,
                      token: str | None = None) -> Path:
    """A local model directory for ``path_or_id``: the directory itself, or a hub id (``org/name``,
    as TRL and transformers take) downloaded through the Hugging Face cache with the token from the
    environment (``HF_TOKEN``). Anything else is a HubError that says which it is not."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise HubError(f"{flag} {path_or_id}: expected a directory (config.json + safetensors), found a file")
    if not is_repo_id(path_or_id):
        raise HubError(f"{flag} {path_or_id}: no such local directory, and not a hub id of the form org/name")
    return download(path_or_id, local_dir=None, revision=revision, token=token)


def download(repo_id: str, *, local_dir: str | os.PathLike | None, revision: str | None = None, token: str | None = None,
             allow_patterns: Sequence[str] = DEFAULT_PATTERNS, repo_type: str = "model",
             endpoint: str | None = None) -> Path:
    """Snapshot-download ``repo_id`` (at ``revision``) into ``local_dir`` (None: the Hugging Face
    cache); returns the directory holding the files.

    Only files matching ``allow_patterns`` are fetched (by default safetensors, JSON configs and
    tokenizer files); pickled weights never are. Files already present are not fetched again.
    """
    token = resolve_token(token)
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, repo_type=repo_type, revision=revision, local_dir=None if local_dir is None else str(local_dir),
            token=token,
            allow_patterns=list(allow_patterns), ignore_patterns=list(PICKLE_PATTERNS), endpoint=endpoint,
        )
    except HUB_FAILURES as e:
        raise _hub_error(e, repo_id, token, action="download", revision=revision) from e
    return Path(path)


def check_upload_folder(folder: str | os.PathLike) -> str:
    """'checkpoint' or 'adapter' for a folder that is an exported HF checkpoint or PEFT adapter; else HubError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(NOT_EXPORTED.format(folder=folder, found="no such directory"))
    if (folder / "adapter_config.json").is_file():
        kind, config, weights = "adapter", folder / "adapter_config.json", ["adapter_model.safetensors"]
    elif (folder / "config.json").is_file():
        kind, config, weights = "checkpoint", folder / "config.json", [p.name for p in folder.glob("*.safetensors")]
    else:
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:5]) or "an empty directory"
        raise HubError(NOT_EXPORTED.format(folder=folder, found=f"no config.json or adapter_config.json ({found})"))
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise HubError(f"{config}: expected a JSON object, found unreadable JSON ({e})") from None
    if not any((folder / w).is_file() for w in weights):
        raise HubError(NOT_EXPORTED.format(folder=folder, found=f"{config.name} but no safetensors weights"))
    return kind


def upload(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
           revision: str | None = None, commit_message: str = "Upload with purefine",
           endpoint: str | None = None) -> str:
    """Upload an exported checkpoint or adapter ``folder`` to ``repo_id``; returns the commit URL.

    Creates the repository (``private`` if asked) and the ``revision`` branch when missing. Hidden
    files and pickled weights in the folder are not uploaded.
    """
    check_upload_folder(folder)
    token = resolve_token(token)
    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, repo_type="model",
                                 commit_message=commit_message, ignore_patterns=list(UPLOAD_IGNORE))
    except HUB_FAILURES as e:
        raise _hub_error(e, repo_id, token, action="upload", revision=revision) from e
    return str(getattr(info, "commit_url", None) or info)
