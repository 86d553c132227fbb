"""Shared pieces of the fuzz tests (tests/test_fuzz_*.py).

- ``refuses(category, fn)``: call ``fn`` on a malformed input; it must raise a ``PurefineError``
  with a non-empty message: any other exception, a silent success or a hang (a SIGALRM watchdog)
  fails the test. ``tolerates(category, fn)`` is the same for mutated inputs that may happen to be
  valid (a bit flip in a name, a truncation at a field boundary): success is allowed, any
  exception but a ``PurefineError`` is not.
- ``COUNTS``: refused / tolerated cases per category for the whole session; each fuzz module's
  ``summary`` fixture prints its counts and checks its minimum number of refused cases.
- ``Blob``: bytes whose repr stays short.
- ``junk()``: a hypothesis strategy of arbitrary JSON/YAML-like values (unicode, huge and
  negative numbers, NaN, nesting); ``deep_json(n)``: text nested ``n`` levels deep.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from purefine.errors import PurefineError

COUNTS: Counter = Counter()
HANG_SECONDS = 60  # a hang guard, far above any case's normal time; not a timing assertion


def fuzz_settings(max_examples: int) -> settings:
    """Hypothesis settings of the fuzz tests: no deadline, no example database in the repository, and
    the same examples on every run (a CI run must not fail on a case no earlier run drew);
    ``PUREFINE_FUZZ_EXPLORE=1`` draws fresh ones, to hunt for new failures."""
    return settings(max_examples=max_examples, deadline=None, database=None,
                    derandomize=os.environ.get("PUREFINE_FUZZ_EXPLORE") != "1",
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


class Hang(Exception):
    """A fuzz case ran past the watchdog."""


@contextlib.contextmanager
def watchdog(seconds: int = HANG_SECONDS) -> Iterator[None]:
    """Raise ``Hang`` in the main thread if the block runs longer than ``seconds``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _outcome(category: str, fn: Callable[[], Any], what: str) -> PurefineError | None:
    try:
        with watchdog():
            fn()
    except PurefineError as e:
        assert str(e).strip(), f"{category}: {type(e).__name__} with an empty message for {what}"
        return e
    except Hang as e:
        pytest.fail(f"{category}: hang ({e}) on {what}")
    except BaseException as e:  # noqa: BLE001 -- the point: nothing but a purefine error may escape
        if isinstance(e, KeyboardInterrupt):
            raise
        pytest.fail(f"{category}: {type(e).__name__}: {str(e)[:300]} (not a PurefineError) on {what}")
    return None


def refuses(category: str, fn: Callable[[], Any], what: Any = "") -> PurefineError:
    """``fn()`` must raise a PurefineError; returns it (for checks on the message)."""
    what = str(what)[:300]
    error = _outcome(category, fn, what)
    if error is None:
        pytest.fail(f"{category}: accepted a malformed input: {what}")
    COUNTS[category, "refused"] += 1
    return error


def tolerates(category: str, fn: Callable[[], Any], what: Any = "") -> PurefineError | None:
    """``fn()`` may succeed or raise a PurefineError; nothing else."""
    error = _outcome(category, fn, str(what)[:300])
    COUNTS[category, "mutations refused" if error is not None else "mutations accepted"] += 1
    return error


def refused(prefix: str) -> int:
    """Malformed cases refused so far (as required, not counting mutations) in the categories
    starting with ``prefix``."""
    return sum(n for (cat, kind), n in COUNTS.items() if cat.startswith(prefix) and kind == "refused")


def report(request: pytest.FixtureRequest, prefix: str, minimum: int) -> None:
    """Print this module's counts; check that at least ``minimum`` malformed cases were refused
    (only when the whole module ran: a ``-k`` selection runs fewer)."""
    groups: Counter = Counter()
    for (cat, kind), n in COUNTS.items():
        if cat.startswith(prefix):
            groups[".".join(cat.split(".")[:2]), kind] += n
    rows = sorted((cat, kind, n) for (cat, kind), n in groups.items())
    total = refused(prefix)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            for cat, kind, n in rows:
                reporter.write_line(f"fuzz {cat}: {n} {kind}")
            reporter.write_line(f"fuzz {prefix}*: {total} malformed cases refused with a purefine error "
                                f"(all fuzz categories so far: {refused('')})")
    selected = {item.name.split("[")[0] for item in request.session.items if item.module is request.module}
    ran_all = all(name in selected for name in dir(request.module) if name.startswith("test_"))
    if ran_all and request.session.testsfailed == 0:
        assert total >= minimum, f"only {total} malformed {prefix}* cases were refused, expected >= {minimum}"


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from([0, -1, 2**63, -(2**63) - 1, 10**100, math.nan, math.inf, -math.inf, "", "\x00", "\udcff",
                     "NaN", "1e400", "🚀" * 3, "null", "[", "{}"]),
)


def junk(max_leaves: int = 8) -> st.SearchStrategy:
    """Arbitrary nested values: scalars, lists and string-keyed dicts."""
    return st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=max_leaves)


class Blob(bytes):
    """File contents with a short repr (hypothesis prints the inputs of a failing case)."""

    def __repr__(self) -> str:
        return f"Blob({bytes(self[:120])!r}{'...' if len(self) > 120 else ''}, {len(self)} bytes)"


def deep_json(depth: int) -> str:
    """JSON (and YAML) text of a list nested ``depth`` levels deep: past Python's recursion limit
    when ``depth`` is large."""
    return "[" * depth + "1" + "]" * depth
