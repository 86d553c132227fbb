"""Fuzzed malformed dataset rows and files through ``purefine.data.build`` on local jsonl / json / csv /
parquet files: every bad row is a DataError naming its row index, and with ``skip_bad_rows`` it is
skipped and counted exactly, never a KeyError, TypeError, ArrowInvalid, StopIteration or a hang.

A case is a file of rows in one format (alpaca, chat, text, preference): good rows, and bad rows
each with one defect made on purpose (a missing field, a field of the wrong type, nested junk, a
blank instruction, an empty conversation, a non-object message, an unknown role, turns out of
order, no assistant turn, a string answer without a prompt). Without ``skip_bad_rows`` the build
must fail at the first bad row and name it; with it, the build must keep exactly the good rows and
count exactly the bad ones (or fail with "no usable samples" when every row is bad).
Files that cannot be read at all (empty, random bytes, invalid UTF-8, truncated parquet, JSON
scalars per line, a CSV without the format's columns) must be refused with a DataError. They are
built in a worker process: pyarrow's JSON reader segfaulted on a file whose first line is ``null``
(now refused before it is read), so a crash there must fail the test, not end the session.
"""

from __future__ import annotations

import csv
import io
import json
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest
from hypothesis import given
from hypothesis import strategies as st

from purefine.data import DEMO_TOKENIZER, DataConfig, build, load_tokenizer
from tests.fuzz_common import COUNTS, HANG_SECONDS, fuzz_settings, refuses, report, watchdog

MINIMUM = 500  # malformed rows and files this module must refuse
TOK = load_tokenizer(DEMO_TOKENIZER)
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=16)
WORDS = TEXT.filter(lambda s: s.strip() != "")
# values a JSON file can hold without breaking the reader: no NaN, no ints past int64, no surrogates
ROW_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**62), 2**62),
                        st.floats(allow_nan=False, allow_infinity=False), TEXT)
ROW_JUNK = st.recursive(ROW_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(TEXT, inner, max_size=3)), max_leaves=6)
NOT_STRING = ROW_JUNK.filter(lambda v: v is not None and not isinstance(v, str))


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    datasets.disable_progress_bars()
    yield
    report(request, "data", MINIMUM)


# ------------------------------------------------------------------ good rows
def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@st.composite
def conversation(draw: st.DrawFn) -> list[dict]:
    """An optional system message, then user/assistant pairs (ending with an assistant turn)."""
    turns = [m for _ in range(draw(st.integers(1, 2))) for m in (user(draw(TEXT)), assistant(draw(TEXT)))]
    return ([{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []) + turns


def good_row(fmt: str) -> st.SearchStrategy:
    if fmt == "alpaca":
        return st.fixed_dictionaries({"instruction": WORDS, "output": TEXT}, optional={"input": TEXT})
    if fmt == "text":
        return st.fixed_dictionaries({"text": TEXT})
    if fmt == "chat":
        return st.fixed_dictionaries({"messages": conversation()})
    return st.fixed_dictionaries({"prompt": WORDS, "chosen": TEXT, "rejected": TEXT})


# ------------------------------------------------------------------ bad rows
@st.composite
def bad_message_list(draw: st.DrawFn) -> list:
    """A list of messages with one defect: a non-object, a bad role or content, or turns out of order."""
    messages = draw(conversation())
    at = draw(st.integers(0, len(messages) - 1))
    kind = draw(st.sampled_from(["not_object", "role_missing", "role_type", "role_unknown", "content",
                                 "assistant_first", "two_users", "no_assistant", "late_system"]))
    if kind == "not_object":
        messages[at] = draw(NOT_STRING.filter(lambda v: not isinstance(v, dict)) | TEXT)
    elif kind == "role_missing":
        messages[at] = {"content": messages[at]["content"]}
    elif kind == "role_type":
        messages[at] = {"role": draw(NOT_STRING), "content": messages[at]["content"]}
    elif kind == "role_unknown":
        role = draw(TEXT.filter(lambda r: r not in ("system", "user", "assistant")))
        messages[at] = {"role": role, "content": messages[at]["content"]}
    elif kind == "content":
        messages[at] = {"role": messages[at]["role"], "content": draw(NOT_STRING | st.none())}
    elif kind == "assistant_first":
        messages = [assistant(draw(TEXT)), *messages]
    elif kind == "two_users":
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages.insert(first_user, user(draw(TEXT)))
    elif kind == "no_assistant":
        messages = [m for m in messages if m["role"] != "assistant"]
    else:
        messages.insert(draw(st.integers(1, len(messages))), {"role": "system", "content": draw(TEXT)})
    return messages


@st.composite
def bad_row(draw: st.DrawFn, fmt: str) -> dict:
    row = dict(draw(good_row(fmt)))
    if fmt == "alpaca":
        field = draw(st.sampled_from(["instruction", "output", "input"]))
        if field == "instruction":
            row[field] = draw(NOT_STRING | st.none() | st.text(" \t\n", max_size=3))
        else:
            row[field] = draw(NOT_STRING if field == "input" else NOT_STRING | st.none())
    elif fmt == "text":
        row["text"] = draw(NOT_STRING | st.none())
    elif fmt == "chat":
        row["messages"] = draw(st.sampled_from([None, []]) | NOT_STRING.filter(lambda v: not isinstance(v, list))
                               | TEXT | bad_message_list())
    else:
        kind = draw(st.sampled_from(["response_type", "response_missing", "no_prompt", "prompt_type", "bad_turns"]))
        field = draw(st.sampled_from(["chosen", "rejected"]))
        if kind == "response_type":
            row[field] = draw(NOT_STRING.filter(lambda v: not isinstance(v, list)))
        elif kind == "response_missing":
            row[field] = None
        elif kind == "no_prompt":
            row["prompt"] = None
        elif kind == "prompt_type":
            row["prompt"] = draw(NOT_STRING.filter(lambda v: not isinstance(v, (list, bool)) or v is True))
        else:
            row["prompt"], row[field] = None, draw(bad_message_list())
    if all(v is None for v in row.values()):
        row["unrelated"] = 1  # a row of nulls only would be no row at all in some readers
    return row


@st.composite
def row_file(draw: st.DrawFn) -> dict[str, Any]:
    fmt = draw(st.sampled_from(["alpaca", "chat", "text", "preference"]))
    n = draw(st.integers(1, 8))
    bad = sorted(draw(st.sets(st.integers(0, n - 1), min_size=1)))
    rows = [draw(bad_row(fmt)) if i in bad else draw(good_row(fmt)) for i in range(n)]
    return {"fmt": fmt, "rows": rows, "bad": bad, "kind": draw(st.sampled_from(["jsonl", "json", "parquet"])),
            "auto": draw(st.booleans())}


def write_rows(directory: Path, kind: str, rows: list[dict]) -> Path:
    """The rows as a file; parquet falls back to jsonl when Arrow cannot type a column."""
    if kind == "parquet":  # only when Arrow can type every column and reads back the same rows
        keys = list(dict.fromkeys(k for r in rows for k in r))
        try:
            datasets.Dataset.from_list(rows).to_parquet(directory / "rows.parquet")
            if datasets.Dataset.from_parquet(str(directory / "rows.parquet"), cache_dir=str(directory / "pq")).to_list() \
                    == [{k: r.get(k) for k in keys} for r in rows]:
                return directory / "rows.parquet"
        except Exception:  # noqa: BLE001 -- pyarrow's own error types: the rows cannot be a parquet file
            pass
        (directory / "rows.parquet").unlink(missing_ok=True)
        kind = "jsonl"
    if kind == "json":
        (directory / "rows.json").write_text(json.dumps(rows))
        return directory / "rows.json"
    (directory / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory / "rows.jsonl"


def config(path: Path, fmt: str, *, auto: bool, skip: bool) -> DataConfig:
    return DataConfig(source=str(path), format="auto" if auto else fmt, packing=fmt != "preference", max_seq_len=512,
                      skip_bad_rows=skip, cache_dir=str(path.parent / "cache"))


def check_bad_rows(path: Path, fmt: str, n: int, bad: list[int], auto: bool) -> None:
    """Without skipping, the first bad row is named; with skipping, exactly the bad rows go."""
    error = refuses("data.rows", lambda: build(config(path, fmt, auto=auto, skip=False), TOK), path.name)
    assert f"row {bad[0] + 1}," in str(error) and path.name in str(error), (bad, str(error))
    COUNTS["data.rows", "refused"] += len(bad) - 1  # every bad row of the file was a malformed case
    skipping = config(path, fmt, auto=auto, skip=True)
    if len(bad) == n:
        assert "no usable samples" in str(refuses("data.rows-skip", lambda: build(skipping, TOK), path.name))
        return
    try:
        with watchdog():
            stats = build(skipping, TOK).stats
    except Exception as e:  # noqa: BLE001 -- any failure here is the bug under test
        pytest.fail(f"skip_bad_rows failed on a file with good rows: {type(e).__name__}: {e}")
    COUNTS["data.rows-skip", "built, bad rows skipped and counted"] += 1
    assert (stats["skipped_bad_rows"], stats["samples"] + stats["dropped_unlabelled"]) == (len(bad), n - len(bad)), stats
    assert all(f"row {i + 1}," in e for i, e in zip(bad, stats["skipped_examples"])), stats["skipped_examples"]


@fuzz_settings(150)
@given(case=row_file())
def test_bad_rows_are_named_or_skipped_and_counted(tmp_path_factory, case):
    directory = tmp_path_factory.mktemp("rows")
    path = write_rows(directory, case["kind"], case["rows"])
    auto = case["auto"] and all(any(k in r for r in case["rows"]) for k in _format_columns(case["fmt"]))
    check_bad_rows(path, case["fmt"], len(case["rows"]), case["bad"], auto)


@pytest.mark.parametrize("kind", ["jsonl", "json"])
@pytest.mark.parametrize("keys", [("\x00", "\x00\x00"), ("\x00", "")])
def test_field_names_with_nul_characters_are_read_exactly(tmp_path, kind, keys):
    # found by the fuzz test above: Arrow cuts field names at NUL, so these columns did not read back
    # (a ValueError or KeyError from datasets); a one-row JSON Lines file included
    good = {"instruction": "a", "output": "b"}
    bad = {**good, "input": dict.fromkeys(keys, 1)}
    for rows, bad_rows in (([bad], [0]), ([good, bad], [1]), ([bad, good, good], [0])):
        directory = tmp_path / f"{len(rows)}-{bad_rows[0]}"
        directory.mkdir()
        check_bad_rows(write_rows(directory, kind, rows), "alpaca", len(rows), bad_rows, auto=True)


def _format_columns(fmt: str) -> tuple[str, ...]:
    return {"alpaca": ("instruction", "output"), "chat": ("messages",), "text": ("text",),
            "preference": ("chosen", "rejected")}[fmt]


@fuzz_settings(40)
@given(rows=st.lists(st.tuples(WORDS.filter(lambda s: "\x00" not in s), TEXT.filter(lambda s: "\x00" not in s))
                     | st.tuples(st.text(" \t", max_size=3), TEXT.filter(lambda s: "\x00" not in s)),
                     min_size=1, max_size=8))
def test_csv_rows_with_blank_instructions_are_named_or_skipped(tmp_path_factory, rows):
    bad = [i for i, (instruction, _) in enumerate(rows) if not instruction.strip()]
    if not bad:
        rows, bad = [*rows, ("", "x")], [len(rows)]
    text = io.StringIO()
    # every field quoted: a bare \r is a line break to CSV readers
    csv.writer(text, quoting=csv.QUOTE_ALL).writerows([("instruction", "output"), *rows])
    path = tmp_path_factory.mktemp("csv") / "rows.csv"
    path.write_bytes(text.getvalue().encode("utf-8"))
    check_bad_rows(path, "alpaca", len(rows), bad, auto=True)


# ------------------------------------------------------------------ files that cannot be read
WORKER = r"""
import json, sys
import datasets
from purefine.data import DEMO_TOKENIZER, DataConfig, build, load_tokenizer
from purefine.errors import PurefineError
datasets.disable_progress_bars()
tokenizer = load_tokenizer(DEMO_TOKENIZER)
for line in sys.stdin:
    try:
        build(DataConfig(**json.loads(line)), tokenizer)
        out = {"outcome": "accepted"}
    except PurefineError as e:
        out = {"outcome": "refused", "message": str(e)}
    except BaseException as e:
        out = {"outcome": "other exception", "message": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
"""


class BuildWorker:
    """A child process that runs ``data.build`` for one config at a time (a crash ends it, not pytest)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def build(self, **cfg: Any) -> dict:
        """{"outcome": accepted | refused | other exception | crash | hang, "message": ...}."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
        self.proc.stdin.write(json.dumps(cfg) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], HANG_SECONDS + 30)[0]:  # + the worker's start
            self.close()
            return {"outcome": "hang", "message": f"no result after {HANG_SECONDS + 30} s"}
        line = self.proc.stdout.readline()
        if not line:
            return {"outcome": "crash", "message": f"the worker died with exit status {self.proc.wait()}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def worker():
    w = BuildWorker()
    yield w
    w.close()


def refused_in_worker(worker: BuildWorker, category: str, path: Path, *, skip: bool) -> str:
    """Build ``path`` in the worker; it must be refused with a purefine error. Returns the message."""
    result = worker.build(source=str(path), skip_bad_rows=skip, cache_dir=str(path.parent / "cache"))
    what = path.read_bytes()[:120]
    assert result["outcome"] == "refused", f"{category}: {result['outcome']}: {result.get('message', '')[:300]} on {what}"
    COUNTS[category, "refused"] += 1
    return result["message"]

@st.composite
def unreadable_file(draw: st.DrawFn) -> tuple[str, bytes]:
    """(file name, bytes) that no build can read."""
    ext = draw(st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
    kind = draw(st.sampled_from(["empty", "blank", "random", "utf8", "scalars", "truncated_parquet", "no_columns"]))
    if kind == "empty":
        return "rows" + ext, b""
    if kind == "blank":
        return "rows" + ext, draw(st.text(" \n\t\r", min_size=1, max_size=10)).encode()
    if kind == "random":
        return "rows" + ext, b"\xff" + draw(st.binary(max_size=200))
    if kind == "utf8":  # bytes that are not UTF-8 in a value or a column name, after a valid row
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"]))
        return "rows.jsonl", b'{"text": "ok"}\n' + draw(st.sampled_from([b'{"text": "a' + bad + b'"}\n',
                                                                          b'{"te' + bad + b'xt": "a"}\n']))
    if kind == "scalars":  # (a JSON array of strings is a dataset of "text" rows to ``datasets``: not here)
        no_strings = ROW_SCALARS.filter(lambda v: not isinstance(v, str))
        values = draw(st.lists(ROW_SCALARS | st.lists(no_strings, max_size=2), min_size=1, max_size=4))
        return "rows.jsonl", "".join(json.dumps(v) + "\n" for v in values).encode()
    if kind == "truncated_parquet":
        buffer = io.BytesIO()
        datasets.Dataset.from_list([{"text": "hello"}] * 3).to_parquet(buffer)
        data = buffer.getvalue()
        return "rows.parquet", data[: draw(st.integers(0, len(data) - 1))]
    columns = draw(st.lists(st.from_regex(r"[a-z]{1,6}", fullmatch=True).filter(
        lambda c: c not in ("text", "messages", "conversations", "instruction", "output", "chosen", "rejected")),
        min_size=1, max_size=3, unique=True))
    return "rows.csv", (",".join(columns) + "\n" + ",".join("x" for _ in columns) + "\n").encode()


@fuzz_settings(60)
@given(case=unreadable_file())
def test_unreadable_files_are_refused(tmp_path_factory, worker, case):
    name, content = case
    path = tmp_path_factory.mktemp("file") / name
    path.write_bytes(content)
    for skip in (False, True):
        assert name in refused_in_worker(worker, "data.file", path, skip=skip)


@pytest.mark.parametrize("content", [
    b'{"text": NaN}\n', b'{"text": 1e999}\n', b'{"text": 123456789012345678901234567890}\n', b'{"text": "\\ud800"}\n',
    b'[' * 5000 + b']' * 5000 + b'\n', b'{"text": "a"}\n\n{"text": 1}\n', b'null\n', b'  null\n{"text": "a"}\n',
    b'{"text": "a"}\nnull\n',
])
def test_unusual_json_is_a_data_error(tmp_path, worker, content):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    refused_in_worker(worker, "data.file", path, skip=False)
    result = worker.build(source=str(path), skip_bad_rows=True, cache_dir=str(tmp_path / "cache"))
    assert result["outcome"] in ("accepted", "refused"), result


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "rows.txt").write_text('{"text": "a"}\n')
    unknown = config(tmp_path / "rows.txt", "text", auto=True, skip=True)
    assert "rows.txt" in str(refuses("data.file", lambda: build(unknown, TOK)))
    refuses("data.file", lambda: build(config(tmp_path / "missing.jsonl", "text", auto=True, skip=True), TOK))
