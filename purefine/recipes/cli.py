"""The command-line layer shared by every script: parse with tyro, run ``main(cfg)``, report errors.

A purefine error (bad config, data, checkpoint, tokenizer or flag) prints one line,
``error: <message>``, on stderr and exits with status 2; ``--debug`` (or ``PUREFINE_DEBUG=1``)
shows the traceback instead. Argument errors from tyro are folded to one line the same way.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import tyro

from purefine.errors import ConfigError, PurefineError

T = TypeVar("T")
EXIT_USAGE = 2


def fail(message: str) -> None:
    """Print ``error: message`` on one line to stderr and exit with status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _tyro_message(text: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [ln.strip(" │╭╮╰╯─┃━┏┓┗┛|") for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not set(ln) <= set("─━-= ")]
    keep = [ln for ln in lines if not ln.lower().startswith(("usage", "for full helptext", "see --help"))]
    return " ".join(keep)[:400] or "invalid arguments (see --help)"


def parse(config_type: type[T], args: Sequence[str] | None = None, *, default: T | None = None,
          description: str | None = None) -> T:
    """tyro.cli with usage errors folded to one line as a ``ConfigError`` (``run`` prints it and exits
    with status 2; ``--help`` still works)."""
    args = list(sys.argv[1:] if args is None else args)
    kwargs = {"args": args, "description": description} | ({"default": default} if default is not None else {})
    if any(a in ("-h", "--help") for a in args):
        return tyro.cli(config_type, **kwargs)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            return tyro.cli(config_type, **kwargs)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise ConfigError(_tyro_message(buf.getvalue())) from None


def run(main: Callable[[T], Any], config_type: type[T], args: Sequence[str] | None = None, *,
        default: T | None = None, description: str | None = None,
        parse: Callable[[list[str]], T] | None = None) -> Any:
    """Parse ``config_type`` from the command line (or with ``parse(args)``) and call ``main``;
    purefine errors, in parsing or in the run, print one line and exit 2."""
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args or os.environ.get("PUREFINE_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        cfg = parse(args) if parse is not None else globals()["parse"](config_type, args, default=default,
                                                                           description=description)
        return main(cfg)
    except PurefineError as e:
        if debug:
            raise
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
