"""JSON lines at Cadre's boundary: read untrusted files line by line, check text, write datasets atomically.

Suite splits (`cadre.evaluation.results.read_split`), training data (`cadre.tuning.training_data.read_records`)
and JSONL knowledge sources (`cadre.knowledge.sources`) are written by people and tools Cadre does not
control. `read_json_lines` reads such a file as bytes, one line at a time, and says for each line either
the JSON object it holds or why it cannot be used:

- longer than `MAX_LINE_BYTES` (read in bounded pieces, so a 1 GB line never sits in memory whole);
- not UTF-8 (the byte and its position are named);
- not JSON, or JSON nested too deeply to parse;
- not a JSON object;
- text that is not text: a lone UTF-16 surrogate such as the escape `"\\ud800"` decodes in JSON but
  cannot be encoded again, so every writer downstream would fail on it.

Callers skip and count the bad lines, naming file and line, and keep the good ones.

Writers (`write_jsonl`) check every row the same way before a byte is written, write to a temporary file
beside the target and rename it into place: a reader sees the old file or the whole new one, never a
part, and a row that cannot be written is skipped and reported instead of stopping the export.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

MAX_LINE_BYTES = 64 * 1024
"""Longest line (in bytes) a JSONL file Cadre reads may have; a longer line is skipped and counted."""

_SURROGATE = re.compile("[\ud800-\udfff]")
# Control characters (Unicode category Cc) other than tab, line feed and carriage return.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def text_problem(value: Any, *, controls: bool = False) -> str | None:
    """Why a decoded JSON value is not clean text (in any string or key, however deeply nested), or None.

    Args:
        value: a string, number, bool, None, list or dict (as `json.loads` returns).
        controls: also refuse control characters other than tab, line feed and carriage return
            (NUL, escape, …): for free text people type, such as a correction.

    Returns:
        None when every string encodes as UTF-8 (and has no control characters, when asked), else a
        sentence naming the first offending character and where it is (`at 'field'[2], character 5`).
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return (
                    f"holds a lone UTF-16 surrogate (\\u{ord(found.group()):04x}){_at(where, found.start())}, "
                    "which is not text"
                )
            if controls:
                found = _CONTROL.search(item)
                if found:
                    return f"holds the control character \\u{ord(found.group()):04x}{_at(where, found.start())}"
        elif isinstance(item, dict):
            for key, member in reversed(list(item.items())):
                stack.append((member, f"{where}[{key!r}]" if where else repr(key)))
                stack.append((key, f"a key of {where}" if where else "a key"))
        elif isinstance(item, (list, tuple)):
            stack.extend((member, f"{where}[{index}]") for index, member in reversed(list(enumerate(item))))
    return None


def _at(where: str, position: int) -> str:
    return f" at {where}, character {position + 1}" if where else f" at character {position + 1}"


@dataclass(frozen=True)
class JsonLine:
    """One non-blank line of a JSONL file: the object it holds, or why it is unusable.

    Attributes:
        line: 1-based line number.
        value: the decoded JSON object; None when `problem` is set.
        problem: why the line cannot be used (not UTF-8, not JSON, not an object, too long, not text), or None.
    """

    line: int
    value: dict[str, Any] | None
    problem: str | None


def read_json_lines(path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[JsonLine]:
    """Every non-blank line of a JSONL file, decoded and checked; never raises for what a line holds.

    A UTF-8 byte order mark at the start of the file is ignored.

    Args:
        path: the file.
        max_line_bytes: longer lines are reported as too long without being parsed.

    Raises:
        OSError: the file cannot be opened or read (FileNotFoundError when it does not exist).
    """
    with Path(path).open("rb") as handle:
        for number, line, size in _lines(handle, max_line_bytes):
            if line is None:
                yield JsonLine(number, None, f"line is {size:,} bytes, longer than the {max_line_bytes:,}-byte limit")
                continue
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if line.strip():
                yield JsonLine(number, *_decode(line))


def _lines(handle: IO[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(number, the line without its line end, size) of each line; a line over the limit comes back as None."""
    limit = max_line_bytes + 2  # room for a "\r\n" line end
    number = 0
    while True:
        raw = handle.readline(limit)
        if not raw:
            return
        number += 1
        if raw[-1:] == b"\n" or len(raw) < limit:  # the whole line (the last one may lack its line end)
            line = _without_line_end(raw)
            yield number, (line if len(line) <= max_line_bytes else None), len(line)
            continue
        size = len(raw)
        while True:  # the rest of a long line, in bounded pieces
            piece = handle.readline(1 << 20)
            if not piece:
                break
            if piece[-1:] == b"\n":
                size += len(_without_line_end(piece))
                break
            size += len(piece)
        yield number, None, size


def _without_line_end(raw: bytes) -> bytes:
    raw = raw.removesuffix(b"\n")
    return raw.removesuffix(b"\r")


def _decode(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, f"not UTF-8: byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the line ({error.reason})"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"invalid JSON: {error.msg} at column {error.colno}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    except ValueError as error:  # e.g. an integer of more digits than Python converts
        return None, f"invalid JSON: {error}"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {_json_kind(value)}"
    # The bytes are valid UTF-8, so a lone surrogate can only come from a \\uD800-\\uDFFF escape: look only then.
    if b"\\ud" in raw or b"\\uD" in raw:
        problem = text_problem(value)
        if problem:
            return None, f"not text: the object {problem}"
    return value, None


def _json_kind(value: Any) -> str:
    return {list: "list", str: "str", int: "int", float: "float", bool: "bool", type(None): "null"}.get(
        type(value), type(value).__name__
    )


@dataclass(frozen=True)
class SkippedRow:
    """A row a writer left out, and why (its position among the rows given, 1-based)."""

    row: int
    reason: str


def jsonl_lines(rows: Iterable[Any]) -> tuple[list[str], list[SkippedRow]]:
    """Serialise rows as JSON lines, leaving out and reporting any that are not text.

    Non-ASCII text is kept as it is, except characters that some readers split lines on (U+0085, U+2028,
    U+2029) and C1 controls, which are written as `\\u` escapes: every row is exactly one line for any reader.
    """
    lines: list[str] = []
    skipped: list[SkippedRow] = []
    for number, row in enumerate(rows, start=1):
        problem = text_problem(row)
        if problem:
            skipped.append(SkippedRow(number, problem))
            continue
        try:
            line = json.dumps(row, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError) as error:
            skipped.append(SkippedRow(number, f"cannot be written as JSON: {error}"))
            continue
        lines.append(_LINE_SPLITTING.sub(_json_escape, line) + "\n")
    return lines, skipped


# Characters JSON may leave raw inside strings that some readers take for a line end (str.splitlines: NEL, the
# Unicode line and paragraph separators) or that terminals act on (C1 controls): written as \u escapes, the same
# JSON value on one unambiguous line.
_LINE_SPLITTING = re.compile("[\x7f-\x9f\u2028\u2029]")


def _json_escape(found: re.Match[str]) -> str:
    return f"\\u{ord(found.group()):04x}"


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> tuple[int, list[SkippedRow]]:
    """Write rows as a JSONL file atomically: a temporary file beside it, then a rename.

    Every row is checked and serialised before anything is written; a row that is not text or not
    JSON is left out and reported, never a reason to leave a partial file.

    Args:
        path: the file to write (its folder is created).
        rows: JSON-compatible values, one per line.

    Returns:
        (rows written, rows left out with why).
    """
    lines, skipped = jsonl_lines(rows)
    write_text_atomic(path, "".join(lines))
    return len(lines), skipped


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace a file with `text` (UTF-8) in one step: readers see the old content or the new, never a part."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Created like any new file (the umask decides its mode), under a name no other writer picks.
    temporary = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with temporary.open("x", encoding="utf-8", newline="") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
