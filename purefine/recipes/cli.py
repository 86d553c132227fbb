"""The command-line layer shared by every command: parse with tyro, run ``main(cfg)``, report errors.

A purefine error (bad config, data, checkpoint, tokenizer or flag) prints one line,
``error: <message>``, on stderr as the last thing printed and exits with status 2; ``--debug``
(or ``PUREFINE_DEBUG=1``) shows the traceback instead. Argument errors come from tyro's structured
parse-error events (the flag, the value, the choices), never from its printed box, and name the
closest known flag for a misspelled one.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import logging
import os
import sys
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import tyro

from purefine.errors import ConfigError, PurefineError

T = TypeVar("T")
EXIT_USAGE = 2
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)
DEBUG_HELP = "Errors print one line; --debug (or PUREFINE_DEBUG=1) shows the full traceback."

try:  # tyro's parse-error hook (tyro >= 1.0); without it tyro prints its own error and exits 2
    from tyro import _errors as tyro_errors
except ImportError:  # pragma: no cover - older tyro
    tyro_errors = None


def fail(message: str) -> None:
    """Print ``error: message`` on one line to stderr and exit with status 2."""
    sys.stdout.flush()
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def flag_names(config_type: type, prefix: str = "--") -> Iterator[str]:
    """Every flag a (nested) config dataclass accepts: ``--max-steps``, ``--lora.rank``, ``--no-plot``..."""
    hints = typing.get_type_hints(config_type, include_extras=True)
    for f in dataclasses.fields(config_type):
        name = prefix + f.name.replace("_", "-")
        annotated = typing.get_origin(hints[f.name]) is typing.Annotated
        if annotated and tyro.conf.Suppress in typing.get_args(hints[f.name])[1:]:
            continue  # not a flag (e.g. --data.max-seq-len: the one flag is --max-seq-len)
        tp = typing.get_args(hints[f.name])[0] if annotated else hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from flag_names(tp, name + ".")
        else:
            yield name
            if tp is bool:
                yield "--no-" + name[2:] if prefix == "--" else prefix + "no-" + f.name.replace("_", "-")


def _flag(argument: Any) -> str:
    try:
        return argument.lowered.name_or_flags[0]
    except (AttributeError, IndexError, TypeError):
        return str(argument)


def event_message(event: Any, config_type: type | None) -> str | None:
    """The one-line message of a tyro parse-error event, or None for a kind not handled here."""
    name = type(event).__name__
    if name == "UnrecognizedArgs":
        token = event.tokens[0]
        known = list(flag_names(config_type)) if dataclasses.is_dataclass(config_type) else []
        flag = token.split("=")[0]
        leaf = "--" + flag.rsplit(".", 1)[-1].lstrip("-")  # --data.seed -> --seed, the one flag for it
        close = [leaf] if "." in flag and leaf in known else \
            difflib.get_close_matches(flag, known, n=1) if flag.startswith("--") else []
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unrecognized argument {token!r}{hint}; see --help"
    if name == "InvalidChoice":
        return f"{_flag(event.argument)}: expected one of {', '.join(event.choices)}; found {event.value!r}"
    if name == "BadValue":
        reason = {"too_few_values": "expects a value"}.get(event.reason, event.reason.replace("_", " "))
        found = f"; found {event.offending_value!r}" if event.offending_value is not None else ""
        return f"{_flag(event.argument)}: {reason}{found}"
    if name == "InstantiationFailure":
        where = f"{_flag(event.argument)}: " if event.argument is not None else ""
        return where + " ".join(str(event.message).split())
    if name == "MissingArgs":
        return "missing argument(s): " + ", ".join(_flag(a.arg) for a in event.missing_arguments)
    return None


def parse(config_type: type[T] | Any, args: Sequence[str] | None = None, *, default: T | None = None,
          description: str | None = None, prog: str | None = None) -> T:
    """``tyro.cli`` with argument errors raised as one-line ``ConfigError``s (``run`` prints them and
    exits with status 2); ``--help`` prints tyro's help, with the ``--debug`` note."""
    args = list(sys.argv[1:] if args is None else args)
    doc = description or (config_type.__doc__ if isinstance(config_type, type) else None) or ""
    kwargs = {"args": args, "description": f"{doc.strip()}\n\n{DEBUG_HELP}".strip(), "prog": prog}
    if default is not None:
        kwargs["default"] = default
    if tyro_errors is None:
        return tyro.cli(config_type, **kwargs)

    def hook(event: Any) -> None:
        message = event_message(event, config_type)
        if message is not None:
            raise ConfigError(message)

    with tyro_errors.on_parse_error(hook):
        return tyro.cli(config_type, **kwargs)


def quiet_libraries() -> None:
    """Keep a command's output to purefine's own lines: the libraries' import-time warnings
    (torchao's optional kernels, torch's pytree notices), their INFO logs and the datasets progress
    bars are silenced; a purefine error stays the last line printed."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torchao", "torch.utils._pytree", "datasets", "transformers", "huggingface_hub", "lm_eval", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(torchao|transformers|datasets|lm_eval|peft|huggingface_hub)(\.|$)")
    if "datasets" in sys.modules:  # imported before this (the env var is read at import)
        sys.modules["datasets"].disable_progress_bars()


def run(main: Callable[[T], Any], config_type: type[T] | Any, args: Sequence[str] | None = None, *,
        default: T | None = None, description: str | None = None,
        parse: Callable[[list[str]], T] | None = None, prog: str | None = None) -> Any:
    """Parse ``config_type`` from the command line (or with ``parse(args)``) and call ``main``;
    purefine errors, in parsing or in the run, print one line and exit 2; Ctrl-C exits 130."""
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args or os.environ.get("PUREFINE_DEBUG") == "1"
    if not debug:
        quiet_libraries()
    args = [a for a in args if a != "--debug"]
    try:
        cfg = parse(args) if parse is not None else globals()["parse"](config_type, args, default=default,
                                                                           description=description, prog=prog)
        return main(cfg)
    except PurefineError as e:
        if debug:
            raise
        fail(str(e))
    except OSError as e:  # a write the library did not wrap: a full disk is still one line
        if debug or e.errno not in WRITE_ERRNOS:
            raise
        fail(f"{e.filename or 'a write'}: {e.strerror}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
