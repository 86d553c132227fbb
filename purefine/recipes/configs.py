"""List, copy and validate the YAML presets shipped in purefine/configs/ (torchtune's ``tune ls / cp / validate``).

    python scripts/configs.py ls
    python scripts/configs.py cp llama2-7b-qlora my-run.yaml
    python scripts/configs.py validate my-run.yaml
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from purefine import fsutil
from purefine.config import list_presets, load_preset, resolve_preset
from purefine.errors import ConfigError
from purefine.recipes import preflight


@dataclass(frozen=True)
class Ls:
    """List the presets with their model and method."""


@dataclass(frozen=True)
class Cp:
    """Copy a preset to a file you can edit."""

    name: Annotated[str, tyro.conf.Positional]
    """Preset name (see ls)."""
    dest: Annotated[str, tyro.conf.Positional]
    """Destination file (or directory)."""
    force: bool = False
    """Overwrite an existing destination."""


@dataclass(frozen=True)
class Validate:
    """Check a config file without running it: every key, type, range, path, template and the output
    directory, all problems at once."""

    path: Annotated[str, tyro.conf.Positional]
    """A preset name or a YAML file."""


Command = (Annotated[Ls, tyro.conf.subcommand("ls")] | Annotated[Cp, tyro.conf.subcommand("cp")]
           | Annotated[Validate, tyro.conf.subcommand("validate")])


def main(cmd: Ls | Cp | Validate) -> object:
    """Run one subcommand; returns what it printed (for tests)."""
    if isinstance(cmd, Ls):
        rows = []
        for name in list_presets():
            cfg = load_preset(name)
            rows.append(f"{name:<22} model={cfg.model:<12} peft={cfg.peft:<6} max_seq_len={cfg.max_seq_len}")
        print("\n".join(rows))
        return rows
    if isinstance(cmd, Cp):
        src = resolve_preset(cmd.name)
        dest = Path(cmd.dest)
        dest = dest / src.name if dest.is_dir() else dest
        if dest.exists() and not cmd.force:
            raise ConfigError(f"cp: {dest} exists (pass --force to overwrite)")
        fsutil.atomic_write(dest, src.read_bytes())
        print(f"copied {src} -> {dest}")
        return dest
    cfg, found = preflight.check_file(cmd.path)
    if found:
        for line in found:
            print(f"  {line}")
        raise ConfigError(f"{cmd.path}: {len(found)} problem{'s' * (len(found) > 1)} (listed above)")
    print(f"{cmd.path}: valid ({cfg.model}, task={cfg.task}, peft={cfg.peft})")
    return cfg


__all__ = ["Command", "main"]
