"""Load a specialist's knowledge sources as a stream of `Document`s.

One loader per source kind of the schema (`cadre.config.knowledge`):

- `files`: a glob below a folder; txt/md/rst as text, html through the stdlib `html.parser`,
  pdf/docx only when a parser (`pypdf`, `python-docx`) is installed (else skipped as `unsupported`).
- `dataset`: JSONL/JSON, CSV, Parquet, or a folder saved with `datasets.save_to_disk`. JSONL and CSV
  are read line by line with the stdlib (each bad line is skipped and counted, where `datasets` fails
  the whole file on one malformed line, and is slower on files of this size: see `bench/`), Parquet in
  record batches through pyarrow, saved folders through `datasets.load_from_disk` (memory-mapped).
  JSONL goes through `cadre.jsonl.read_json_lines` (bytes, bounded per line); a skipped line is
  named `<source>:<file>:<line>` in the report.
- `sql`: a SELECT through SQLAlchemy, streamed; relative sqlite paths are read from the project
  folder; `url_env` names a variable holding the URL.
- `python`: `package.module:function(**options)` yielding dicts with id, text, title, metadata.

Every document gets a stable id (`<source>:<record id>`, files `<source>:<relative path>`) and a
content hash (sha256 of the normalised title, text and metadata). Bad records never stop a run: each
is skipped and counted by reason in a `SkipReport`. A source that cannot be read at all (missing
folder, unreachable database, failing import) raises `SourceError`, after retries where a retry can
help (connecting to a database).

Everything is a generator: documents are produced one at a time, so a large source streams.
"""

from __future__ import annotations

import csv
import datetime as _dt
import decimal
import enum
import hashlib
import html.parser
import importlib
import importlib.util
import inspect
import itertools
import json
import logging
import math
import os
import re
import sys
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cadre.config.knowledge import (
    DatasetSource,
    FilesSource,
    PythonSource,
    Source,
    SqlSource,
)
from cadre.jsonl import MAX_LINE_BYTES, read_json_lines, text_problem

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".markdown", ".rst"})
HTML_SUFFIXES = frozenset({".html", ".htm", ".xhtml"})
MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})


class SkipReason(enum.StrEnum):
    """Why a record was left out of the index."""

    EMPTY = "empty"
    BINARY = "binary"
    UNDECODABLE = "undecodable"
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    MISSING_ID = "missing_id"
    UNSUPPORTED = "unsupported"
    DUPLICATE_ID = "duplicate_id"


class SourceError(RuntimeError):
    """A source could not be read at all (as opposed to one bad record, which is skipped)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often to retry reaching a source before giving up with `SourceError`.

    Attributes:
        attempts: Tries in all (1 = no retry).
        backoff_s: Wait before the second try; doubles after each failure.
        max_backoff_s: Upper bound of one wait.
    """

    attempts: int = 3
    backoff_s: float = 2.0
    max_backoff_s: float = 30.0

    def waits(self) -> Iterator[float]:
        """Seconds to wait before each retry (`attempts - 1` values)."""
        wait = self.backoff_s
        for _ in range(max(self.attempts - 1, 0)):
            yield min(wait, self.max_backoff_s)
            wait *= 2


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class Document:
    """One document of a knowledge source, normalised and hashed.

    Attributes:
        id: Stable id, unique within the specialist: `<source>:<record id>`.
        source: Name of the source it came from.
        record_id: The id inside its source (a row id, a record id, a relative path).
        title: Title, possibly empty.
        text: Normalised text (NFC, `\\n` line ends, no trailing spaces); never empty.
        metadata: JSON-compatible metadata, kept for filtering and display.
        content_hash: sha256 (hex) of the normalised title, text and metadata.
    """

    id: str
    source: str
    record_id: str
    title: str
    text: str
    metadata: dict[str, Any]
    content_hash: str


@dataclass
class SkipReport:
    """Records skipped during loading, counted per reason, with a few examples of each.

    Attributes:
        counts: Skipped records per reason (`SkipReason` values).
        examples: Up to `max_examples` per reason, as `"<source>:<where>: <detail>"`.
        max_examples: How many examples to keep per reason.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: SkipReason, where: str, detail: str = "") -> None:
        """Count one skipped record."""
        key = str(reason)
        self.counts[key] = self.counts.get(key, 0) + 1
        shown = self.examples.setdefault(key, [])
        if len(shown) < self.max_examples:
            shown.append(f"{where}: {detail}" if detail else where)
        logger.debug("skipped %s (%s) %s", where, key, detail)

    @property
    def total(self) -> int:
        """Skipped records of every reason."""
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        """Counts and examples, JSON-ready (for MLflow and the run report)."""
        return {
            "total": self.total,
            "counts": dict(sorted(self.counts.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
        }


# --- normalisation and hashing --------------------------------------------------------------

_TRAILING_SPACE = re.compile(r"[ \t\f\v]+\n")


def normalise_text(value: str) -> str:
    """Unicode NFC, `\\n` line ends, no trailing spaces on lines, no outer whitespace."""
    if not unicodedata.is_normalized("NFC", value):
        value = unicodedata.normalize("NFC", value)
    if "\r" in value:
        value = value.replace("\r\n", "\n").replace("\r", "\n")
    return _TRAILING_SPACE.sub("\n", value).strip()


def jsonable(value: Any) -> Any:
    """A JSON-compatible copy of a metadata value (dates as ISO strings, NaN as None, others as str)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [jsonable(item) for item in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, uuid.UUID):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return jsonable(value.item())
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays
        return jsonable(value.tolist())
    return str(value)


def content_hash(title: str, text: str, metadata: Mapping[str, Any]) -> str:
    """sha256 (hex) of normalised title, text and metadata; key order of metadata does not matter."""
    payload = json.dumps([title, text, metadata], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class _RecordChecker:
    """Turns raw (title, text, metadata) into a `Document`, or counts why it cannot."""

    def __init__(self, source_name: str, max_document_bytes: int, skips: SkipReport):
        self.source_name = source_name
        self.max_document_bytes = max_document_bytes
        self.skips = skips

    def document(
        self, record_id: Any, title: Any, text_parts: Sequence[Any], metadata: Mapping[str, Any], where: str
    ) -> Document | None:
        if (
            record_id is None
            or (isinstance(record_id, float) and math.isnan(record_id))
            or str(record_id).strip() == ""
        ):
            self.skips.add(SkipReason.MISSING_ID, where)
            return None
        record_id = str(record_id).strip()
        # The record's id, and where it came from when that is not the id itself (a file and line).
        where = f"{self.source_name}:{record_id}" if where.endswith(f":{record_id}") else f"{where} (id {record_id})"
        clean_metadata = jsonable(dict(metadata))
        problem = text_problem([record_id, clean_metadata])
        if problem:
            # Lone surrogates (escaped in JSON, or left by `errors="surrogateescape"`) cannot be encoded:
            # in an id or in metadata they would break hashing and every writer downstream.
            self.skips.add(SkipReason.UNDECODABLE, where, f"id or metadata {problem}")
            return None
        pieces = []
        for part in (title, *text_parts):
            decoded = self._as_text(part, where)
            if decoded is None:
                return None
            pieces.append(decoded)
        title_text, *texts = pieces
        raw_text = "\n\n".join(piece for piece in texts if piece.strip())
        if "\x00" in raw_text or "\x00" in title_text:
            self.skips.add(SkipReason.BINARY, where, "contains NUL characters")
            return None
        try:
            # Strict encoding fails on the lone surrogates `errors="surrogateescape"` leaves where
            # bytes did not decode; it also gives the size.
            size = len(raw_text.encode("utf-8"))
            title_text.encode("utf-8")
        except UnicodeEncodeError:
            self.skips.add(SkipReason.UNDECODABLE, where, "bytes not valid in the declared encoding")
            return None
        if size > self.max_document_bytes:
            self.skips.add(SkipReason.OVERSIZED, where, f"{size} bytes > max_document_bytes {self.max_document_bytes}")
            return None
        text = normalise_text(raw_text)
        if not text:
            self.skips.add(SkipReason.EMPTY, where, "no text")
            return None
        clean_title = " ".join(normalise_text(title_text).split())
        return Document(
            id=f"{self.source_name}:{record_id}",
            source=self.source_name,
            record_id=record_id,
            title=clean_title,
            text=text,
            metadata=clean_metadata,
            content_hash=content_hash(clean_title, text, clean_metadata),
        )

    def _as_text(self, value: Any, where: str) -> str | None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, (bytes, bytearray, memoryview)):
            try:
                return bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                reason = SkipReason.BINARY if b"\x00" in bytes(value) else SkipReason.UNDECODABLE
                self.skips.add(reason, where, "text field holds bytes that are not UTF-8")
                return None
        return value if isinstance(value, str) else str(value)


# --- files ----------------------------------------------------------------------------------


class _HtmlText(html.parser.HTMLParser):
    """Visible text of an HTML page, with line breaks at block elements; the <title> kept apart."""

    BLOCK = frozenset(
        {
            "p",
            "div",
            "br",
            "li",
            "ul",
            "ol",
            "tr",
            "table",
            "section",
            "article",
            "header",
            "footer",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "pre",
            "blockquote",
            "dt",
            "dd",
            "hr",
        }
    )
    HIDDEN = frozenset({"script", "style", "noscript", "template", "head"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self._hidden = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in self.HIDDEN:
            self._hidden += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in self.HIDDEN:
            self._hidden = max(self._hidden - 1, 0)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)
        elif not self._hidden:
            self.parts.append(data)

    def result(self) -> tuple[str, str]:
        lines = (" ".join(line.split()) for line in "".join(self.parts).split("\n"))
        text = "\n".join(line for line in lines if line)
        return " ".join("".join(self.title_parts).split()), text


def html_to_text(markup: str) -> tuple[str, str]:
    """Title and visible text of an HTML document (stdlib `html.parser`; scripts and styles dropped)."""
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    return parser.result()


def _markdown_title(text: str) -> str:
    for line in text.splitlines():
        match = re.match(r"^#\s+(.+?)\s*#*\s*$", line)
        if match:
            return match.group(1)
    return ""


def _pdf_text(path: Path) -> str:
    import pypdf  # only reached when installed

    return "\n\n".join(page.extract_text() or "" for page in pypdf.PdfReader(str(path)).pages)


def _docx_text(path: Path) -> str:
    import docx  # python-docx; only reached when installed

    return "\n".join(paragraph.text for paragraph in docx.Document(str(path)).paragraphs)


_OPTIONAL_PARSERS: dict[str, tuple[str, Callable[[Path], str]]] = {
    ".pdf": ("pypdf", _pdf_text),
    ".docx": ("docx", _docx_text),
}


def _iter_files(source: FilesSource, root: Path, checker: _RecordChecker, skips: SkipReport) -> Iterator[Document]:
    folder = (root / source.path).resolve()
    if not folder.is_dir():
        raise SourceError(f"source {source.name!r}: folder {folder} does not exist")
    for path in sorted(folder.glob(source.glob)):
        relative = path.relative_to(folder).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        where = f"{source.name}:{relative}"
        suffix = path.suffix.lower()
        size = path.stat().st_size
        if size > checker.max_document_bytes:
            skips.add(SkipReason.OVERSIZED, where, f"{size} bytes > max_document_bytes {checker.max_document_bytes}")
            continue
        metadata = {"path": relative, "format": suffix.lstrip(".")}
        if suffix in _OPTIONAL_PARSERS:
            module, parse = _OPTIONAL_PARSERS[suffix]
            if importlib.util.find_spec(module) is None:
                skips.add(SkipReason.UNSUPPORTED, where, f"no {suffix} parser installed ({module})")
                continue
            try:
                text = parse(path)
            except Exception as error:  # noqa: BLE001 - any parser failure means this one file is bad
                skips.add(SkipReason.MALFORMED, where, f"{type(error).__name__}: {error}")
                continue
            document = checker.document(relative, path.stem, [text], metadata, where)
        elif suffix in TEXT_SUFFIXES or suffix in HTML_SUFFIXES:
            data = path.read_bytes()
            try:
                text = data.decode(source.encoding)
            except UnicodeDecodeError as error:
                reason = SkipReason.BINARY if b"\x00" in data else SkipReason.UNDECODABLE
                skips.add(reason, where, f"not {source.encoding}: {error.reason} at byte {error.start}")
                continue
            if "\x00" in text:
                skips.add(SkipReason.BINARY, where, "contains NUL characters")
                continue
            if suffix in HTML_SUFFIXES:
                title, text = html_to_text(text)
            else:
                title = _markdown_title(text) if suffix in MARKDOWN_SUFFIXES else ""
            document = checker.document(relative, title or path.stem, [text], metadata, where)
        else:
            skips.add(SkipReason.UNSUPPORTED, where, f"no reader for {suffix or 'files without a suffix'}")
            continue
        if document is not None:
            yield document


# --- datasets -------------------------------------------------------------------------------


def _record_fields(source: DatasetSource) -> tuple[str, list[str], str | None, list[str]]:
    return source.id_field, list(source.text_fields), source.title_field, list(source.metadata_fields)


def _check_columns(source_name: str, columns: Iterable[str], wanted: Iterable[str | None], kind: str) -> None:
    have = set(columns)
    missing = [name for name in wanted if name is not None and name not in have]
    if missing:
        raise SourceError(
            f"source {source_name!r}: {kind} has no column(s) {', '.join(map(repr, missing))}; columns: {', '.join(sorted(have))}"
        )


def _from_mapping(
    record: Any, fields: tuple[str, list[str], str | None, list[str]], checker: _RecordChecker, where: str
) -> Document | None:
    id_field, text_fields, title_field, metadata_fields = fields
    if not isinstance(record, Mapping):
        checker.skips.add(SkipReason.MALFORMED, where, f"expected an object, got {type(record).__name__}")
        return None
    metadata = {name: record.get(name) for name in metadata_fields if name in record}
    return checker.document(
        record.get(id_field),
        record.get(title_field) if title_field else None,
        [record.get(name) for name in text_fields],
        metadata,
        where,
    )


def _iter_jsonl(path: Path, source: DatasetSource, checker: _RecordChecker) -> Iterator[Document]:
    fields = _record_fields(source)
    # A line longer than this cannot hold a document within max_document_bytes, even with every character
    # JSON-escaped (at most 6 bytes each): it is skipped as oversized without being held in memory whole.
    longest = 6 * checker.max_document_bytes + MAX_LINE_BYTES
    for line in read_json_lines(path, max_line_bytes=longest):
        where = f"{source.name}:{source.path}:{line.line}"
        if line.problem:
            checker.skips.add(_jsonl_reason(line.problem), where, line.problem)
            continue
        document = _from_mapping(line.value, fields, checker, where)
        if document is not None:
            yield document


def _jsonl_reason(problem: str) -> SkipReason:
    if problem.startswith("line is "):
        return SkipReason.OVERSIZED
    if problem.startswith(("not UTF-8", "not text")):
        return SkipReason.UNDECODABLE
    return SkipReason.MALFORMED


def _iter_json_array(path: Path, source: DatasetSource, checker: _RecordChecker) -> Iterator[Document]:
    try:
        content = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(
            f"source {source.name!r}: {path} is not a JSON array of records nor JSON lines: {error}"
        ) from error
    records = content.get("data") if isinstance(content, Mapping) else content
    if not isinstance(records, list):
        raise SourceError(f"source {source.name!r}: {path} holds no list of records")
    fields = _record_fields(source)
    for position, record in enumerate(records):
        document = _from_mapping(record, fields, checker, f"{source.name}:record {position}")
        if document is not None:
            yield document


def _iter_csv(path: Path, source: DatasetSource, checker: _RecordChecker) -> Iterator[Document]:
    fields = _record_fields(source)
    csv.field_size_limit(max(checker.max_document_bytes * 2, 131072))
    # surrogateescape keeps one undecodable row from failing the whole file; the checker skips it.
    with path.open("r", encoding="utf-8", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle)
        _check_columns(source.name, reader.fieldnames or [], [fields[0], *fields[1], fields[2]], f"CSV {path.name}")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                checker.skips.add(SkipReason.MALFORMED, f"{source.name}:{source.path}:{reader.line_num}", str(error))
                continue
            where = f"{source.name}:{source.path}:{reader.line_num}"
            if None in row or any(value is None for value in row.values()):
                checker.skips.add(SkipReason.MALFORMED, where, "wrong number of fields")
                continue
            document = _from_mapping(row, fields, checker, where)
            if document is not None:
                yield document


def _iter_parquet(path: Path, source: DatasetSource, checker: _RecordChecker) -> Iterator[Document]:
    import pyarrow.parquet as pq

    fields = _record_fields(source)
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:
        raise SourceError(f"source {source.name!r}: cannot read Parquet file {path}: {error}") from error
    _check_columns(source.name, parquet.schema_arrow.names, [fields[0], *fields[1], fields[2]], f"Parquet {path.name}")
    columns = list(dict.fromkeys([fields[0], *fields[1], *([fields[2]] if fields[2] else []), *fields[3]]))
    columns = [name for name in columns if name in parquet.schema_arrow.names]
    row = 0
    for batch in parquet.iter_batches(batch_size=2048, columns=columns):
        for record in batch.to_pylist():
            row += 1
            document = _from_mapping(record, fields, checker, f"{source.name}:row {row}")
            if document is not None:
                yield document


def _iter_saved_dataset(path: Path, source: DatasetSource, checker: _RecordChecker) -> Iterator[Document]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:
        raise SourceError(
            f"source {source.name!r}: {path} is not a folder saved with datasets' save_to_disk: {error}"
        ) from error
    splits = (
        [(name, loaded[name]) for name in sorted(loaded)]
        if isinstance(loaded, datasets.DatasetDict)
        else [("", loaded)]
    )
    fields = _record_fields(source)
    for split_name, split in splits:
        _check_columns(
            source.name,
            split.column_names,
            [fields[0], *fields[1], fields[2]],
            f"dataset {path.name}{'/' + split_name if split_name else ''}",
        )
        for row, record in enumerate(split):
            where = f"{source.name}:{split_name + ' ' if split_name else ''}row {row}"
            document = _from_mapping(record, fields, checker, where)
            if document is not None:
                yield document


def _iter_dataset(source: DatasetSource, root: Path, checker: _RecordChecker) -> Iterator[Document]:
    path = (root / source.path).resolve()
    if path.is_dir():
        return _iter_saved_dataset(path, source, checker)
    if not path.is_file():
        raise SourceError(f"source {source.name!r}: {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _iter_jsonl(path, source, checker)
    if suffix == ".json":
        with path.open("rb") as handle:
            head = handle.read(4096).lstrip()
        return (
            _iter_json_array(path, source, checker)
            if head.startswith((b"[", b'{"data"'))
            else _iter_jsonl(path, source, checker)
        )
    if suffix == ".csv":
        return _iter_csv(path, source, checker)
    if suffix == ".parquet":
        return _iter_parquet(path, source, checker)
    raise SourceError(
        f"source {source.name!r}: {path.name}: expected .jsonl, .json, .csv, .parquet or a saved-dataset folder"
    )


# --- SQL ------------------------------------------------------------------------------------


def resolve_sql_url(source: SqlSource, root: Path) -> str:
    """The SQLAlchemy URL of a SQL source: `url_env` when that variable is set, relative sqlite paths made absolute.

    Args:
        source: The SQL source.
        root: The project folder (relative sqlite paths are read from it).

    Returns:
        The URL to connect to.
    """
    from sqlalchemy.engine import make_url

    url_text = source.url
    if source.url_env:
        from_env = os.environ.get(source.url_env)
        if from_env:
            url_text = from_env
        else:
            logger.warning(
                "source %r: environment variable %s is not set; using the url from pipelines.yaml",
                source.name,
                source.url_env,
            )
    url = make_url(url_text)
    database = url.database
    is_file = (
        url.get_backend_name() == "sqlite" and database and database != ":memory:" and not database.startswith("file:")
    )
    if is_file and not Path(database).is_absolute():
        url = url.set(database=str((root / database).resolve()))
    return url.render_as_string(hide_password=False)


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _iter_sql(source: SqlSource, root: Path, checker: _RecordChecker, retry: RetryPolicy) -> Iterator[Document]:
    import sqlalchemy
    from sqlalchemy.engine import make_url

    url = resolve_sql_url(source, root)
    parsed = make_url(url)
    is_sqlite_file = (
        parsed.get_backend_name() == "sqlite"
        and parsed.database not in (None, "", ":memory:")
        and not parsed.database.startswith("file:")
    )
    try:
        engine = sqlalchemy.create_engine(url)
    except Exception as error:
        raise SourceError(f"source {source.name!r}: cannot use database URL {_redacted(url)}: {error}") from error
    try:
        connection = None
        last_error: Exception | None = None
        for wait in itertools.chain(retry.waits(), [None]):
            try:
                # sqlite would silently create an empty database where the file is missing.
                if is_sqlite_file and not Path(parsed.database).is_file():
                    raise FileNotFoundError(f"database file {parsed.database} does not exist")
                connection = engine.connect()
                break
            except (sqlalchemy.exc.SQLAlchemyError, OSError) as error:
                last_error = error
                if wait is None:
                    break
                logger.warning(
                    "source %r: cannot reach %s (%s); retrying in %.3g s", source.name, _redacted(url), error, wait
                )
                time.sleep(wait)
        if connection is None:
            raise SourceError(
                f"source {source.name!r}: cannot reach database {_redacted(url)} after {retry.attempts} attempt(s): {last_error}"
            ) from last_error
        with connection:
            try:
                result = connection.execution_options(stream_results=True, yield_per=1000).execute(
                    sqlalchemy.text(source.query)
                )
            except sqlalchemy.exc.SQLAlchemyError as error:
                raise SourceError(f"source {source.name!r}: query failed on {_redacted(url)}: {error}") from error
            columns = list(result.keys())
            _check_columns(
                source.name,
                columns,
                [source.id_column, *source.text_columns, source.title_column, *source.metadata_columns],
                "query result",
            )
            for row in result.mappings():
                metadata = {name: row[name] for name in source.metadata_columns}
                document = checker.document(
                    row[source.id_column],
                    row[source.title_column] if source.title_column else None,
                    [row[name] for name in source.text_columns],
                    metadata,
                    f"{source.name}:{row[source.id_column]}",
                )
                if document is not None:
                    yield document
    finally:
        engine.dispose()


# --- Python entrypoints ---------------------------------------------------------------------


def _load_entrypoint(source: PythonSource, root: Path) -> Callable[..., Iterable[Any]]:
    module_name, function_name = source.entrypoint.split(":")
    # User loaders live in the project folder; make them importable without installing them.
    if str(root) not in sys.path:
        sys.path.append(str(root))
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise SourceError(
            f"source {source.name!r}: cannot import {module_name!r}: {type(error).__name__}: {error}"
        ) from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SourceError(f"source {source.name!r}: {module_name!r} has no function {function_name!r}")
    return function


def _accepts_limit(function: Callable[..., Any]) -> bool:
    return _accepts(function, "limit")


def _accepts(function: Callable[..., Any], name: str) -> bool:
    """Whether the loader takes keyword `name` (by name, or through **kwargs)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _iter_python(
    source: PythonSource, root: Path, checker: _RecordChecker, limit: int | None, priority_ids: Sequence[str] = ()
) -> Iterator[Document]:
    function = _load_entrypoint(source, root)
    options = dict(source.options)
    if limit is not None and _accepts_limit(function):
        options["limit"] = limit
        if priority_ids and "priority_ids" not in options and _accepts(function, "priority_ids"):
            options["priority_ids"] = list(priority_ids)  # a source's own `priority_ids` option wins
    try:
        records = iter(function(**options))
    except Exception as error:
        raise SourceError(
            f"source {source.name!r}: {source.entrypoint}(**{options}) failed: {type(error).__name__}: {error}"
        ) from error
    position = 0
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as error:
            raise SourceError(
                f"source {source.name!r}: {source.entrypoint} raised after {position} record(s): {type(error).__name__}: {error}"
            ) from error
        where = f"{source.name}:record {position}"
        position += 1
        if not isinstance(record, Mapping):
            checker.skips.add(SkipReason.MALFORMED, where, f"expected a dict, got {type(record).__name__}")
            continue
        metadata = record.get("metadata") or {}
        if not isinstance(metadata, Mapping):
            checker.skips.add(SkipReason.MALFORMED, where, "metadata is not a dict")
            continue
        document = checker.document(record.get("id"), record.get("title"), [record.get("text")], metadata, where)
        if document is not None:
            yield document


# --- public entry points --------------------------------------------------------------------


def iter_source(
    source: Source,
    *,
    root: Path,
    max_document_bytes: int,
    skips: SkipReport,
    limit: int | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    priority_ids: Sequence[str] = (),
) -> Iterator[Document]:
    """Documents of one source, in a stable order; bad records are skipped and counted in `skips`.

    Args:
        source: A source from the specialist's `sources`.
        root: Project folder; the source's relative paths are read from it.
        max_document_bytes: Larger documents are skipped as `oversized`.
        skips: Receives every skipped record.
        limit: Stop after this many documents (a python source receives it as `limit=` when it accepts one).
        retry: Retries for reaching a database.
        priority_ids: Under a `limit`, ids a python source should yield first when it accepts
            `priority_ids=` (the smoke budget passes the evaluation suite's relevant ids, so a capped
            index still holds the documents its test cases need).

    Yields:
        Valid documents.

    Raises:
        SourceError: The source cannot be read at all.
    """
    checker = _RecordChecker(source.name, max_document_bytes, skips)
    if isinstance(source, FilesSource):
        documents = _iter_files(source, root, checker, skips)
    elif isinstance(source, DatasetSource):
        documents = _iter_dataset(source, root, checker)
    elif isinstance(source, SqlSource):
        documents = _iter_sql(source, root, checker, retry)
    elif isinstance(source, PythonSource):
        documents = _iter_python(source, root, checker, limit, priority_ids)
    else:  # pragma: no cover - the schema admits no other kind
        raise SourceError(f"unknown source kind {type(source).__name__}")
    return itertools.islice(documents, limit) if limit is not None else documents


def load_documents(
    sources: Sequence[Source],
    *,
    root: Path,
    max_document_bytes: int,
    skips: SkipReport,
    limit_per_source: int | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    priority_ids: Sequence[str] = (),
) -> Iterator[Document]:
    """Documents of every source in order; a repeated document id is skipped as `duplicate_id`.

    Args:
        sources: The specialist's sources.
        root: Project folder.
        max_document_bytes: Larger documents are skipped as `oversized`.
        skips: Receives every skipped record.
        limit_per_source: Cap on documents taken from each source (the smoke budget); None = all.
        retry: Retries for reaching a database.
        priority_ids: Under a cap, ids python sources that accept them yield first (see `iter_source`).

    Yields:
        Valid documents with unique ids.

    Raises:
        SourceError: A source cannot be read at all.
    """
    seen: set[str] = set()
    for source in sources:
        for document in iter_source(
            source,
            root=root,
            max_document_bytes=max_document_bytes,
            skips=skips,
            limit=limit_per_source,
            retry=retry,
            priority_ids=priority_ids,
        ):
            if document.id in seen:
                skips.add(SkipReason.DUPLICATE_ID, document.id, "an earlier record has the same id")
                continue
            seen.add(document.id)
            yield document
