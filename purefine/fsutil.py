"""Crash-safe file writes: everything goes to a temporary path first and is renamed into place.

- ``atomic_write(path, data)``: one file, written beside its target, fsynced, then ``os.replace``d.
- ``read_json_object(path, error, what=...)``: a JSON object from a file, or ``error`` naming the
  file and what was wrong (missing, unreadable, not JSON, not an object).
- ``atomic_dir(path)``: a context manager yielding a fresh temporary directory; on success it
  replaces ``path`` (the old directory is moved aside first and removed after); on error the
  temporary directory is removed and ``path`` is untouched.

A write that fails for lack of space or permission (``OSError``, or safetensors' ``SafetensorError``
from its own writer) is raised as ``WriteError`` naming the path and the reason, so a full disk
ends in one error line, never a traceback, with the previous file or directory intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from purefine.errors import WriteError

WRITE_FAILURES = (OSError, SafetensorError)


def write_error(path: Path, e: BaseException) -> WriteError:
    """The WriteError for a failed write of ``path`` (the reason: strerror, or the writer's message)."""
    reason = getattr(e, "strerror", None) or " ".join(str(e).split()) or type(e).__name__
    return WriteError(f"{path}: cannot write ({reason}); the previous version, if any, is untouched")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, WRITE_FAILURES) and not isinstance(e, WriteError):
            raise write_error(path, e) from e
        raise
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that becomes ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    try:
        tmp.mkdir()
    except OSError as e:
        raise write_error(path, e) from e
    try:
        yield tmp
        mode = 0o666 & ~_umask()
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, mode)  # some writers create 0600 files; give them the usual permissions
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WRITE_FAILURES) and not isinstance(e, WriteError):
            raise write_error(path, e) from e
        raise
    old = path.with_name(f".{path.name}.old-{tag}")
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_json_object(path: str | os.PathLike, error: type[Exception], *, what: str = "file") -> dict[str, Any]:
    """The JSON object in ``path``; any other outcome raises ``error`` with the path and the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
