"""Feedback captured at serving time, and what the learn-from-feedback flow makes of it.

`cadre serve` records every response it sends (`record_response`): the id it gave the client
(`chatcmpl-…`), the specialist and the versions that answered (program, index, adapter), the
program's inputs, the exact prompt and completion, and the parsed outputs. A client then posts a
rating and, optionally, a correction for that id (`add_feedback`); feedback for an id that was
never served is refused (`UnknownResponse`). Both live in one SQL database through SQLAlchemy:
SQLite under the state dir by default (`<state_dir>/feedback/feedback.db`, WAL mode, so the server
writes while a flow reads), or the specialist's `feedback.store_url` (any SQLAlchemy URL, e.g.
Postgres).

The flow reads the corrections back (`corrections`) and turns each one into

- a preference pair (`preference_pairs`): the program's prompt rendered with the shared prompt
  format (`cadre.runtime.prompt`), chosen = the correction, rejected = the model's answer, both
  rendered as the completion the model is trained to produce; and
- an evaluation case in the `feedback` slice (`feedback_cases`), so the gate can check that the
  candidate now answers these prompts correctly while the regular suite does not regress.

`cadre feedback export` writes the same records as a JSONL dataset (`export_jsonl`).

Text is checked at the door (`check_feedback`): a rating is the integer -1, 0 or 1 (not `true`); a
correction maps output names to text and a comment is text, each at most `MAX_TEXT_CHARS` characters,
with no lone UTF-16 surrogate (it cannot be encoded, so every export would fail on it) and no control
character but tab, line feed and carriage return. Refused feedback raises `InvalidFeedback` before
anything is written. Reading applies the same rules to every row (`read_feedback`): a row that got in
before them, or by another way into the database, is skipped and counted with its id and why, so
neither an export nor the learn-from-feedback flow can be broken by one row.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
    type_coerce,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from cadre.jsonl import jsonl_lines, text_problem
from cadre.runtime.prompt import PromptSpec, render_completion, render_prompt

if TYPE_CHECKING:
    from cadre.config import CadreConfig

log = logging.getLogger(__name__)

FEEDBACK_SLICE = "feedback"
"""The slice of the evaluation cases made from corrections."""

RATINGS = (-1, 0, 1)
"""A rating is -1 (bad), 0 (neutral) or 1 (good)."""

MAX_TEXT_CHARS = 4000
"""Longest comment, and longest value of a correction, in characters."""


class UnknownResponse(KeyError):
    """Feedback names a response id this store has never recorded."""


class InvalidFeedback(ValueError):
    """Feedback that cannot be stored as given; the message says why."""


class UnstorableResponse(ValueError):
    """A served response holds text that cannot be stored and exported (a lone UTF-16 surrogate)."""


# --------------------------------------------------------------------------------------- tables


class _Base(DeclarativeBase):
    pass


class ResponseRow(_Base):
    """One response as it was served."""

    __tablename__ = "cadre_responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    specialist: Mapped[str] = mapped_column(String(64), index=True)
    requested_model: Mapped[str] = mapped_column(String(64))
    program_version: Mapped[str | None] = mapped_column(String(64))
    index_version: Mapped[str | None] = mapped_column(String(128))
    adapter_version: Mapped[str | None] = mapped_column(String(64))
    inputs: Mapped[dict] = mapped_column(JSON)
    prompt: Mapped[str] = mapped_column(Text)
    completion: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    outputs: Mapped[dict] = mapped_column(JSON)
    retrieved_ids: Mapped[list] = mapped_column(JSON)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)


class FeedbackRow(_Base):
    """One rating (and correction) a client sent about a response."""

    __tablename__ = "cadre_feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    response_id: Mapped[str] = mapped_column(ForeignKey("cadre_responses.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    rating: Mapped[int] = mapped_column(Integer)
    correction: Mapped[dict | None] = mapped_column(JSON)
    comment: Mapped[str | None] = mapped_column(Text)


# ---------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class ServedResponse:
    """What `cadre serve` records about a response before the client sees its end.

    Attributes:
        id: the response id given to the client (`chatcmpl-…`).
        specialist: who answered.
        requested_model: the `model` of the request (a specialist name, or `auto`).
        program_version: registry version of the champion program; None for the declared program.
        index_version: the live index version searched; None when the program does not retrieve.
        adapter_version: registry version of the champion adapter; None for the base model.
        inputs: the program's input values.
        prompt: the exact prompt the model completed.
        completion: the model's raw completion.
        answer: the message content sent to the client.
        outputs: the program's output fields, parsed from the completion.
        retrieved_ids: ids of the passages shown to the model.
        prompt_tokens: tokens of the prompt.
        completion_tokens: tokens generated.
        latency_ms: time from admission to the last token.
        created_at: when it was served (UTC).
    """

    id: str
    specialist: str
    requested_model: str
    program_version: str | None
    index_version: str | None
    adapter_version: str | None
    inputs: dict[str, Any]
    prompt: str
    completion: str
    answer: str
    outputs: dict[str, Any]
    retrieved_ids: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class FeedbackRecord:
    """A stored piece of feedback together with the response it is about (one exported dataset row).

    Attributes:
        feedback_id: the store's id of the feedback.
        response_id: the response it is about.
        created_at: when the feedback arrived (UTC, ISO 8601).
        rating: -1, 0 or 1.
        correction: the corrected output fields, or None.
        comment: free text, or None.
        response: the response as served (`ServedResponse` fields; `created_at` in ISO 8601).
    """

    feedback_id: int
    response_id: str
    created_at: str
    rating: int
    correction: dict[str, Any] | None
    comment: str | None
    response: dict[str, Any]

    @property
    def specialist(self) -> str:
        return str(self.response["specialist"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------- store


def default_store_url(state_dir: Path) -> str:
    """The SQLite database under the state dir that holds feedback when `feedback.store_url` is not set."""
    return f"sqlite:///{Path(state_dir).resolve() / 'feedback' / 'feedback.db'}"


def store_url_for(config: CadreConfig, specialist: str) -> str:
    """The feedback store of one specialist: its `feedback.store_url`, else the default SQLite file."""
    return config.specialist(specialist).feedback.store_url or default_store_url(config.state_dir)


class FeedbackStore:
    """Responses and feedback in one SQL database (thread-safe; one instance per process and URL)."""

    def __init__(self, url: str):
        """Open (and create, if needed) the store.

        Args:
            url: a SQLAlchemy URL; for `sqlite:///FILE` the folder is created.
        """
        self.url = url
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(
            url,
            future=True,
            pool_pre_ping=True,
            connect_args={"timeout": 30, "check_same_thread": False} if url.startswith("sqlite") else {},
        )
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        _Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()

    # -- writing ----------------------------------------------------------------------------

    def record_response(self, response: ServedResponse) -> None:
        """Store a served response (before its last byte reaches the client, so feedback can name it).

        Raises:
            UnstorableResponse: a field holds a lone UTF-16 surrogate; nothing is stored.
        """
        problem = text_problem(asdict(response) | {"created_at": None})
        if problem:
            raise UnstorableResponse(f"response {response.id!r} {problem}")
        with self._session() as session:
            session.add(ResponseRow(**{**asdict(response), "created_at": response.created_at}))

    def add_feedback(
        self, response_id: str, rating: int, correction: Mapping[str, Any] | None = None, comment: str | None = None
    ) -> int:
        """Store feedback about a served response.

        Args:
            response_id: the `id` of a response this store recorded.
            rating: -1 (bad), 0 (neutral) or 1 (good).
            correction: the output fields as they should have been (names of the program's outputs).
            comment: free text.

        Returns:
            The feedback's id.

        Raises:
            UnknownResponse: no response with that id was recorded.
            InvalidFeedback: a rating that is not the integer -1, 0 or 1; a correction or comment that is not
                text within `MAX_TEXT_CHARS` (see `check_feedback`); a correction naming fields the response does
                not have. Nothing is stored.
        """
        problem = check_feedback(rating, correction, comment)
        if problem:
            raise InvalidFeedback(problem)
        if not isinstance(response_id, str):
            raise UnknownResponse(response_id)
        with self._session() as session:
            served = session.get(ResponseRow, response_id)
            if served is None:
                raise UnknownResponse(response_id)
            if correction is not None:
                unknown = sorted(set(correction) - set(served.outputs))
                if unknown:
                    raise InvalidFeedback(
                        f"correction names {', '.join(map(repr, unknown))}, which this response's program does not "
                        f"output; its outputs are {', '.join(map(repr, served.outputs))}"
                    )
            row = FeedbackRow(
                response_id=response_id,
                created_at=datetime.now(UTC),
                rating=rating,
                correction=dict(correction) if correction is not None else None,
                comment=comment,
            )
            session.add(row)
            session.flush()
            return int(row.id)

    # -- reading ----------------------------------------------------------------------------

    def get_response(self, response_id: str) -> ServedResponse | None:
        """A recorded response, or None."""
        with self._session() as session:
            row = session.get(ResponseRow, response_id)
            return _served(row) if row is not None else None

    def count_responses(self, specialist: str | None = None) -> int:
        with self._session() as session:
            query = select(func.count()).select_from(ResponseRow)
            if specialist:
                query = query.where(ResponseRow.specialist == specialist)
            return int(session.scalar(query) or 0)

    def feedback(self, specialist: str | None = None, since: datetime | None = None) -> list[FeedbackRecord]:
        """Every usable piece of feedback with its response, oldest first (unusable rows are logged and left out).

        Args:
            specialist: only feedback about this specialist's responses.
            since: only feedback that arrived at or after this time.
        """
        return self.read_feedback(specialist, since).records

    def read_feedback(self, specialist: str | None = None, since: datetime | None = None) -> FeedbackRead:
        """Every piece of feedback with its response, oldest first, and the rows that cannot be used.

        Each row is read on its own and checked with the rules `add_feedback` applies (`check_feedback`; the
        response's text must encode): a row that breaks them, or whose stored JSON or time does not parse,
        is skipped with its id and the reason, and logged as a warning.

        Args:
            specialist: only feedback about this specialist's responses.
            since: only feedback that arrived at or after this time.
        """
        # Raw column values (no JSON or date parsing in the driver): one malformed row must not fail the query.
        columns = [
            (type_coerce(column, Text) if column.name in _PARSED else column).label(key)
            for column, key in zip(_COLUMNS, _KEYS, strict=True)
        ]
        with self._session() as session:
            query = select(*columns).join(ResponseRow, FeedbackRow.response_id == ResponseRow.id)
            if specialist:
                query = query.where(ResponseRow.specialist == specialist)
            if since is not None:
                query = query.where(FeedbackRow.created_at >= since)
            rows = session.execute(query.order_by(FeedbackRow.created_at, FeedbackRow.id)).all()
        records: list[FeedbackRecord] = []
        skipped: list[SkippedFeedback] = []
        for row in rows:
            values = dict(zip(_KEYS, row, strict=True))
            checked = _checked_record(values)
            if isinstance(checked, str):
                skipped.append(SkippedFeedback(values["f_id"], values["f_response_id"], checked))
            else:
                records.append(checked)
        if skipped:
            log.warning(
                "feedback store %s: skipped %d unusable feedback row(s):\n%s",
                _redacted(self.url),
                len(skipped),
                "\n".join(f"  {skip}" for skip in skipped[:20]),
            )
        return FeedbackRead(records, skipped)

    def export_jsonl(self, out: IO[str], specialist: str | None = None) -> FeedbackExport:
        """Write every usable feedback record (with its response) as one JSON line; unusable rows are skipped.

        Every line is serialised before the first is written, so `out` receives all of them or none.

        Returns:
            How many records were written, and the rows left out with why.
        """
        read = self.read_feedback(specialist)
        lines, unwritable = jsonl_lines(record.to_dict() for record in read.records)
        out.write("".join(lines))
        skipped = list(read.skipped)
        for item in unwritable:
            record = read.records[item.row - 1]
            skipped.append(SkippedFeedback(record.feedback_id, record.response_id, item.reason))
        return FeedbackExport(len(lines), skipped)


@dataclass(frozen=True)
class SkippedFeedback:
    """A stored feedback row that cannot be used (exported, learned from), and why; `str()` says both."""

    feedback_id: Any
    response_id: Any
    reason: str

    def __str__(self) -> str:
        return f"feedback {self.feedback_id} (response {self.response_id!r}): {self.reason}"


@dataclass(frozen=True)
class FeedbackRead:
    """The usable feedback records of a read, and the rows skipped."""

    records: list[FeedbackRecord]
    skipped: list[SkippedFeedback]


@dataclass(frozen=True)
class FeedbackExport:
    """What `FeedbackStore.export_jsonl` wrote: records written and rows skipped."""

    written: int
    skipped: list[SkippedFeedback]


def check_feedback(rating: Any, correction: Mapping[str, Any] | None, comment: Any) -> str | None:
    """Why feedback cannot be stored (the rules of `add_feedback`, also applied to every row read), or None.

    A rating is the integer -1, 0 or 1 (a bool is not a rating); a correction is a mapping of output names
    to text; a comment is text. Every text is at most `MAX_TEXT_CHARS` characters, with no lone UTF-16
    surrogate and no control character other than tab, line feed and carriage return.
    """
    if isinstance(rating, bool) or not isinstance(rating, int) or rating not in RATINGS:
        return f"rating must be one of {', '.join(map(str, RATINGS))} (bad, neutral, good), got {_shown(rating)}"
    if correction is not None:
        if not isinstance(correction, Mapping):
            return f"correction must be an object of output fields, got {type(correction).__name__}"
        for name, value in correction.items():
            if not isinstance(name, str) or not isinstance(value, str):
                return f"correction[{_shown(name)}] must be text, got {_shown(value)}"
            if len(value) > MAX_TEXT_CHARS:
                return f"correction[{name!r}] is {len(value):,} characters; at most {MAX_TEXT_CHARS:,} are kept"
        problem = text_problem(dict(correction), controls=True)
        if problem:
            return f"correction {problem}"
    if comment is not None:
        if not isinstance(comment, str):
            return f"comment must be text, got {_shown(comment)}"
        if len(comment) > MAX_TEXT_CHARS:
            return f"comment is {len(comment):,} characters; at most {MAX_TEXT_CHARS:,} are kept"
        problem = text_problem(comment, controls=True)
        if problem:
            return f"comment {problem}"
    return None


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True, default=repr) if not isinstance(value, str) else ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _redacted(url: str) -> str:
    # A store URL may carry a password (postgresql://user:secret@host/db).
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    # WAL: the server keeps writing while a flow (another process) reads the corrections.
    # Text that is not UTF-8 (written into the file by another tool) comes back with surrogate escapes instead of
    # failing the whole query; the row's checks then skip it.
    connection.text_factory = _lenient_text
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _served(row: ResponseRow) -> ServedResponse:
    return ServedResponse(
        id=row.id,
        specialist=row.specialist,
        requested_model=row.requested_model,
        program_version=row.program_version,
        index_version=row.index_version,
        adapter_version=row.adapter_version,
        inputs=dict(row.inputs),
        prompt=row.prompt,
        completion=row.completion,
        answer=row.answer,
        outputs=dict(row.outputs),
        retrieved_ids=list(row.retrieved_ids or []),
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        latency_ms=row.latency_ms,
        created_at=_utc(row.created_at),
    )


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


_SERVED_FIELDS = [name for name in ServedResponse.__dataclass_fields__]
_COLUMNS = [
    *(getattr(FeedbackRow, name) for name in ("id", "response_id", "created_at", "rating", "correction", "comment")),
    *(getattr(ResponseRow, name) for name in _SERVED_FIELDS),
]
_KEYS = [
    *(f"f_{name}" for name in ("id", "response_id", "created_at", "rating", "correction", "comment")),
    *_SERVED_FIELDS,
]
_PARSED = {"created_at", "correction", "inputs", "outputs", "retrieved_ids"}
"""Columns read raw and parsed per row (JSON and times)."""


def _checked_record(values: dict[str, Any]) -> FeedbackRecord | str:
    """A raw feedback+response row as a record, or why it cannot be used."""
    try:
        served = {name: values[name] for name in _SERVED_FIELDS}
        for name in ("inputs", "outputs", "retrieved_ids"):
            served[name] = _json_value(served[name])
        served["created_at"] = _moment(served["created_at"]).isoformat()
        record = FeedbackRecord(
            feedback_id=values["f_id"],
            response_id=values["f_response_id"],
            created_at=_moment(values["f_created_at"]).isoformat(),
            rating=values["f_rating"],
            correction=_json_value(values["f_correction"]),
            comment=values["f_comment"],
            response=served,
        )
    except (ValueError, TypeError) as error:
        return f"unreadable row: {error}"
    if not isinstance(served["inputs"], dict) or not isinstance(served["outputs"], dict):
        return "unreadable row: the response's inputs or outputs are not JSON objects"
    problem = check_feedback(record.rating, record.correction, record.comment)
    if problem:
        return problem
    problem = text_problem(served)
    if problem:
        return f"the response it rates {problem}"
    return record


def _json_value(value: Any) -> Any:
    # SQLite hands back the stored JSON text; drivers with a JSON type (psycopg) hand back the value.
    return json.loads(value) if isinstance(value, str) else value


def _moment(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"expected a time, got {type(value).__name__}")
    return _utc(value)


def _utc(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; every time Cadre stores is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


_STORES: dict[str, FeedbackStore] = {}
_STORES_LOCK = threading.Lock()


def open_store(url: str) -> FeedbackStore:
    """The process-wide store for a URL (one engine and connection pool per database)."""
    with _STORES_LOCK:
        store = _STORES.get(url)
        if store is None:
            store = _STORES[url] = FeedbackStore(url)
        return store


# ------------------------------------------------------------------------- corrections → learning


@dataclass(frozen=True)
class Correction:
    """The latest correction of one served response that differs from what the model answered.

    Attributes:
        response_id: the response corrected.
        inputs: the program's inputs of that request.
        answer: the model's output fields (what it said).
        corrected: the output fields as they should be (the model's, overridden by the correction).
        versions: program, index and adapter versions that produced the answer.
    """

    response_id: str
    inputs: dict[str, Any]
    answer: dict[str, Any]
    corrected: dict[str, Any]
    versions: dict[str, str | None]


def corrections(
    records: Iterable[FeedbackRecord], output_names: Sequence[str]
) -> tuple[list[Correction], dict[str, int]]:
    """The usable corrections among feedback records, and how many records were left out and why.

    The latest correction of a response wins; a correction equal to the model's own answer teaches
    nothing and is left out; when several responses with the same inputs were corrected, the latest
    correction wins (one pair and one case per distinct input).

    Args:
        records: feedback records, oldest first (`FeedbackStore.feedback`).
        output_names: the program's output fields, in order.

    Returns:
        (corrections in the order they arrived, counts: `records`, `without_correction`,
        `same_as_answer`, `superseded`, `incomplete`).
    """
    counts = {"records": 0, "without_correction": 0, "same_as_answer": 0, "superseded": 0, "incomplete": 0}
    by_input: dict[str, Correction] = {}
    for record in records:
        counts["records"] += 1
        if not record.correction:
            counts["without_correction"] += 1
            continue
        answer = {name: record.response["outputs"].get(name) for name in output_names}
        corrected = {name: _text(record.correction.get(name, answer.get(name))) for name in output_names}
        if any(value is None for value in corrected.values()):
            counts["incomplete"] += 1
            continue
        if all(_same(corrected[name], answer.get(name)) for name in output_names):
            counts["same_as_answer"] += 1
            continue
        key = json.dumps(record.response["inputs"], sort_keys=True, ensure_ascii=False)
        if key in by_input:
            counts["superseded"] += 1
            del by_input[key]  # re-inserted below, so the order follows the latest correction
        by_input[key] = Correction(
            response_id=record.response_id,
            inputs=dict(record.response["inputs"]),
            answer=answer,
            corrected=corrected,
            versions={kind: record.response.get(f"{kind}_version") for kind in ("program", "index", "adapter")},
        )
    return list(by_input.values()), counts


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def _same(first: Any, second: Any) -> bool:
    return (_text(first) or "") == (_text(second) or "")


@dataclass(frozen=True)
class PreferencePair:
    """One DPO example in trl's format: the prompt, the preferred and the rejected completion."""

    prompt: str
    chosen: str
    rejected: str
    response_id: str


def preference_pairs(
    found: Sequence[Correction],
    spec: PromptSpec,
    *,
    retrieve: Callable[[Mapping[str, Any]], list[str]] | None = None,
    demos: Sequence[Mapping[str, Any]] = (),
    instruction: str | None = None,
) -> list[PreferencePair]:
    """Corrections as preference pairs, rendered exactly as the serving program prompts.

    The prompt is `render_prompt` of the champion program (its instruction and demos) with the
    passages the program retrieves now, the same text the refresh flow trains on and the server
    sends; chosen and rejected are `render_completion` of the corrected and of the model's output
    fields, so both end with the stop sequence the model is meant to emit.

    Args:
        found: the corrections (`corrections`).
        spec: the program's prompt spec (`PromptSpec.from_settings`).
        retrieve: the passages for one request's inputs (required when the spec has a context field).
        demos: the serving program's demos.
        instruction: the serving program's instruction (None: the declared one).
    """
    if spec.context_field and retrieve is None:
        raise ValueError(
            f"the program retrieves into {spec.context_field!r}; pass its retriever to render the prompts it serves"
        )
    pairs = []
    for item in found:
        values = dict(item.inputs)
        if spec.context_field:
            values[spec.context_field] = list(retrieve(item.inputs))
        prompt = render_prompt(spec, values, demos, instruction=instruction)
        rejected = {name: value if value is not None else "" for name, value in item.answer.items()}
        pairs.append(
            PreferencePair(
                prompt=prompt,
                chosen=render_completion(spec, item.corrected),
                rejected=render_completion(spec, rejected),
                response_id=item.response_id,
            )
        )
    return pairs


def feedback_cases(found: Sequence[Correction], output_names: Sequence[str]) -> list[dict[str, Any]]:
    """Corrections as evaluation cases of the `feedback` slice (the program's fields; id `feedback:<response id>`).

    They carry no `relevant_ids`: a correction says what the answer is, not which passage holds it.
    """
    return [
        {
            "id": f"feedback:{item.response_id}",
            "slice": FEEDBACK_SLICE,
            **item.inputs,
            **{name: item.corrected[name] for name in output_names},
        }
        for item in found
    ]
