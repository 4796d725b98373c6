"""The shape every vector index backend has (`IndexBackend`, `IndexVersion`), and the data it moves.

A backend holds *versions* of one specialist's index side by side (blue/green): a re-index builds a
new version while the live one keeps serving, and promotion only moves a pointer
(`cadre.knowledge.index.live`). A version is written by exactly one re-index run; once complete it is never
written again.

Metadata filters are equality filters that every backend answers the same way: each document's
metadata is stored as labels `key=value` (one label per list element), and a filter
`{"chapter": "1", "kind": ["a", "b"]}` keeps chunks whose chapter is 1 and whose kind is a or b.
The keys `source`, `doc_id` and `record_id` filter on those fields of the chunk itself.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from cadre.knowledge.chunking import Chunk

SearchMode = Literal["vector", "hybrid"]
SEARCH_MODES: tuple[SearchMode, ...] = ("vector", "hybrid")
RetrievalMode = Literal["vector", "hybrid", "learned"]
"""How `IndexSearcher` orders hits: a backend's own mode, or `learned` (the version's fitted ranker over both of
the backend's rankings; `hybrid` where the version has none)."""
CHUNK_FIELD_FILTERS = ("source", "doc_id", "record_id")


class IndexBackendError(RuntimeError):
    """The index cannot do what was asked (server unreachable, version missing, bad request)."""


class VersionNotFound(IndexBackendError, KeyError):
    """No index version of that name."""


@dataclass(frozen=True)
class SearchHit:
    """One retrieved chunk.

    Attributes:
        id: Chunk id.
        doc_id: Document id (`<source>:<record id>`).
        record_id: The document's id inside its source (e.g. an ICD-10-CM code).
        source: Source name.
        chunk_index: Position of the chunk in its document.
        title: The document's title.
        text: The chunk's text (a span of the document).
        score: Higher is better. Vector mode: cosine similarity; hybrid: the fused rank score.
        metadata: The document's metadata.
    """

    id: str
    doc_id: str
    record_id: str
    source: str
    chunk_index: int
    title: str
    text: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkState:
    """What a stored chunk says about itself: enough to tell whether it is current.

    Attributes:
        id: Chunk id.
        doc_id: Its document.
        doc_hash: Content hash of the document version it was cut from.
        chunk_count: How many chunks that document version has.
    """

    id: str
    doc_id: str
    doc_hash: str
    chunk_count: int


@runtime_checkable
class IndexVersion(Protocol):
    """One version of a specialist's index: chunks with vectors, searchable."""

    @property
    def name(self) -> str:
        """The version's name."""
        ...

    def upsert(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> int:
        """Insert chunks, replacing any with the same id; returns how many were written."""
        ...

    def delete(self, ids: Collection[str]) -> int:
        """Delete chunks by id (unknown ids are ignored); returns how many were asked to go."""
        ...

    def ids(self) -> set[str]:
        """Ids of every stored chunk."""
        ...

    def chunk_states(self) -> list[ChunkState]:
        """`ChunkState` of every stored chunk (one row each, duplicates included if any)."""
        ...

    def count(self) -> int:
        """Number of stored chunks (rows)."""
        ...

    def search(
        self,
        query_vector: np.ndarray,
        query_text: str,
        k: int,
        filters: Mapping[str, Any] | None = None,
        mode: SearchMode = "vector",
    ) -> list[SearchHit]:
        """The `k` best chunks for a query, best first; `hybrid` fuses vector and full-text (BM25) ranks."""
        ...

    def rankings(
        self, query_vector: np.ndarray, query_text: str, depth: int, filters: Mapping[str, Any] | None = None
    ) -> tuple[list[SearchHit], list[SearchHit]]:
        """The `depth` best chunks by cosine (score: cosine) and by BM25 (score: BM25), each best first (the
        learned ranking's input). Raises `IndexBackendError` where the backend cannot give both."""
        ...

    def ensure_indexes(self) -> None:
        """Build or refresh the vector, full-text and filter indexes over everything stored."""
        ...


@runtime_checkable
class IndexBackend(Protocol):
    """A store of index versions for one specialist."""

    def open_version(self, name: str) -> IndexVersion:
        """An existing version. Raises `VersionNotFound`."""
        ...

    def create_version(self, name: str, from_version: str | None = None) -> IndexVersion:
        """A new version: empty, or a copy of `from_version` (which is only read)."""
        ...

    def list_versions(self) -> list[str]:
        """Names of every version this backend holds, sorted."""
        ...

    def drop_version(self, name: str) -> None:
        """Delete a version and its data (no error if it does not exist)."""
        ...


# --- metadata as labels ----------------------------------------------------------------------


def _label_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def metadata_labels(metadata: Mapping[str, Any]) -> list[str]:
    """Labels `key=value` for a document's metadata (one per element of a list value), sorted."""
    labels = set()
    for key, value in metadata.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        labels.update(f"{key}={_label_value(item)}" for item in values)
    return sorted(labels)


@dataclass(frozen=True)
class ParsedFilters:
    """A filter mapping split into what backends apply.

    Attributes:
        fields: Chunk field → accepted values (`source`, `doc_id`, `record_id`).
        label_groups: One group per metadata key; a chunk must carry at least one label of every group.
    """

    fields: dict[str, list[str]]
    label_groups: list[list[str]]


def parse_filters(filters: Mapping[str, Any] | None) -> ParsedFilters:
    """Split `{"key": value | [values]}` into chunk-field filters and metadata label groups."""
    fields: dict[str, list[str]] = {}
    groups: list[list[str]] = []
    for key, value in (filters or {}).items():
        values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
        if not values:
            raise ValueError(f"filter {key!r} has no values")
        if key in CHUNK_FIELD_FILTERS:
            fields[key] = [str(item) for item in values]
        else:
            groups.append(sorted({f"{key}={_label_value(item)}" for item in values}))
    return ParsedFilters(fields=fields, label_groups=groups)
