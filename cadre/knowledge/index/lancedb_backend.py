"""The embedded index: LanceDB on local disk, one table per index version.

Layout: `<state_dir>/index/<specialist>/lancedb/<version>.lance`. A new version made from the live one
is a copy of the live table's folder that shares its bulk: Lance never rewrites a data fragment, a
deletion file or an index file once written, so those are hard links (no bytes written), and only the
small manifests and transaction files are copied (LanceDB stores relative paths, so the copy is a valid
table). It is made under a temporary name and renamed into place, so a crash mid-copy leaves no half
table behind; dropping the source later only unlinks its names, the copy keeps its files. LanceDB's
shallow `clone_table` would share files too, but it reads them through the source's folder and breaks
once the source version is pruned. On a file system without hard links the files are copied.

A small change stays small (`ensure_indexes`): while the rows the indexes do not cover are at most
`FOLD_SHARE` of the table and it has at most `FOLD_FRAGMENTS` fragments, nothing is compacted or
re-indexed (LanceDB's optimize would rewrite the whole table and fold every index for a 1 % change);
those rows are searched flat, full-text and vector alike. Past either bound, one optimize compacts the
table and folds everything in.

Dropping a version (retention, an abandoned build) leaves a tombstone `<version>.lance.dropped` beside it:
it is no longer listed or opened, but a reader that already holds it keeps reading. Its folder is removed by
a later drop once `drop_grace_s` (an hour by default) has passed.

Indexes (`ensure_indexes`): full-text (`FTS`) on `content`, a `LabelList` on the metadata labels,
a `BTree` on `id` (upserts and deletes by id), and an `IvfFlat` cosine vector index once the table
has `ann_min_rows` rows (a flat scan of 75k 384-d vectors takes ~100 ms on 2 cores; IvfFlat answers in
a few ms without the recall loss of product quantisation). Rows added after an index was built are
still searched (flat) until the next `ensure_indexes` folds them in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cadre.knowledge.chunking import Chunk
from cadre.knowledge.index.base import (
    ChunkState,
    IndexBackendError,
    SearchHit,
    SearchMode,
    VersionNotFound,
    metadata_labels,
    parse_filters,
)

TABLE_SUFFIX = ".lance"
_PARTIAL_MARK = ".partial-"
_TOMBSTONE = ".dropped"

DROP_GRACE_S = 3600.0
"""How long a dropped version's files stay for readers that still hold it."""
_VALID_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_DELETE_BATCH = 2000
RRF_K = 60
"""Reciprocal-rank fusion constant (LanceDB's `RRFReranker` default)."""

_RESULT_COLUMNS = ["id", "doc_id", "record_id", "source", "chunk_index", "title", "text", "metadata"]


def chunk_schema(dimension: int) -> pa.Schema:
    """Arrow schema of a version's table."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("doc_id", pa.string(), nullable=False),
            pa.field("record_id", pa.string()),
            pa.field("source", pa.string()),
            pa.field("chunk_index", pa.int32()),
            pa.field("chunk_count", pa.int32()),
            pa.field("title", pa.string()),
            pa.field("text", pa.string()),
            pa.field("content", pa.string()),
            pa.field("doc_hash", pa.string()),
            pa.field("metadata", pa.string()),
            pa.field("labels", pa.list_(pa.string())),
            pa.field("vector", pa.list_(pa.float32(), dimension)),
        ]
    )


def _hit(row: Mapping[str, Any], score: float) -> SearchHit:
    return SearchHit(
        id=row["id"],
        doc_id=row["doc_id"],
        record_id=row["record_id"],
        source=row["source"],
        chunk_index=row["chunk_index"],
        title=row["title"],
        text=row["text"],
        score=float(score),
        metadata=json.loads(row["metadata"]) if row["metadata"] else {},
    )


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _where(filters: Mapping[str, Any] | None) -> str | None:
    parsed = parse_filters(filters)
    clauses = [f"{name} IN ({', '.join(_quote(value) for value in values)})" for name, values in parsed.fields.items()]
    clauses += [
        f"array_has_any(labels, [{', '.join(_quote(label) for label in group)}])" for group in parsed.label_groups
    ]
    return " AND ".join(clauses) or None


FOLD_SHARE = 0.05
"""Largest share of a version's rows left outside its indexes (searched flat) before `ensure_indexes` folds them in."""

FOLD_FRAGMENTS = 24
"""Most data fragments (each change adds about one) before `ensure_indexes` compacts the table."""

IMMUTABLE_PARTS = ("data", "_deletions", "_indices")
"""Folders of a Lance table whose files are written once and never changed (named by a UUID: one name, one
content): a copy links them, and a registered version stores only those an earlier version did not
(`cadre.registry.models`)."""


class LanceDBVersion:
    """One index version: a LanceDB table.

    Args:
        table: The open LanceDB table.
        name: Version name.
        ann_min_rows: Row count from which `ensure_indexes` builds a vector index.
        nprobes: IVF partitions probed per query (None = LanceDB's default).
    """

    def __init__(self, table: Any, name: str, *, ann_min_rows: int, nprobes: int | None):
        self.table = table
        self._name = name
        self.ann_min_rows = ann_min_rows
        self.nprobes = nprobes
        self._dimension = table.schema.field("vector").type.list_size
        self._indexed_columns: dict[str, str] | None = None

    @property
    def name(self) -> str:
        return self._name

    def _arrow(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> pa.Table:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(chunks), self._dimension):
            raise IndexBackendError(
                f"expected vectors of shape ({len(chunks)}, {self._dimension}), got {vectors.shape}"
            )
        return pa.table(
            {
                "id": [chunk.id for chunk in chunks],
                "doc_id": [chunk.doc_id for chunk in chunks],
                "record_id": [chunk.record_id for chunk in chunks],
                "source": [chunk.source for chunk in chunks],
                "chunk_index": pa.array([chunk.chunk_index for chunk in chunks], pa.int32()),
                "chunk_count": pa.array([chunk.chunk_count for chunk in chunks], pa.int32()),
                "title": [chunk.title for chunk in chunks],
                "text": [chunk.text for chunk in chunks],
                "content": [chunk.content for chunk in chunks],
                "doc_hash": [chunk.doc_hash for chunk in chunks],
                "metadata": [json.dumps(chunk.metadata, ensure_ascii=False, sort_keys=True) for chunk in chunks],
                "labels": [metadata_labels(chunk.metadata) for chunk in chunks],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self._dimension),
            },
            schema=self.table.schema,
        )

    def upsert(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> int:
        """Insert or replace chunks by id in one commit (a crash leaves all of them or none)."""
        if not chunks:
            return 0
        data = self._arrow(chunks, vectors)
        self.table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)
        return len(chunks)

    def delete(self, ids: Collection[str]) -> int:
        """Delete chunks by id, in commits of up to 2000 ids."""
        ordered = sorted(ids)
        for start in range(0, len(ordered), _DELETE_BATCH):
            batch = ordered[start : start + _DELETE_BATCH]
            self.table.delete(f"id IN ({', '.join(_quote(value) for value in batch)})")
        return len(ordered)

    def _scan(self, columns: list[str]) -> pa.Table:
        return self.table.search().select(columns).limit(None).to_arrow()

    def ids(self) -> set[str]:
        return set(self._scan(["id"]).column("id").to_pylist())

    def chunk_states(self) -> list[ChunkState]:
        scanned = self._scan(["id", "doc_id", "doc_hash", "chunk_count"]).to_pydict()
        return [
            ChunkState(*row)
            for row in zip(scanned["id"], scanned["doc_id"], scanned["doc_hash"], scanned["chunk_count"])
        ]

    def count(self) -> int:
        return self.table.count_rows()

    def _index_names(self) -> dict[str, str]:
        if self._indexed_columns is None:
            self._indexed_columns = {config.columns[0]: config.index_type for config in self.table.list_indices()}
        return self._indexed_columns

    def search(
        self,
        query_vector: np.ndarray,
        query_text: str,
        k: int,
        filters: Mapping[str, Any] | None = None,
        mode: SearchMode = "vector",
    ) -> list[SearchHit]:
        """The `k` best chunks. Vector mode scores by cosine similarity; hybrid fuses vector and BM25 ranks (RRF).

        Hybrid falls back to vector search where there is no full-text index yet (a version whose
        `ensure_indexes` has not run) or the query has no text.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if mode not in ("vector", "hybrid"):
            raise ValueError(f"unknown search mode {mode!r}; expected 'vector' or 'hybrid'")
        vector = np.asarray(query_vector, dtype=np.float32).reshape(-1)
        where = _where(filters)
        hybrid = mode == "hybrid" and bool(query_text.strip()) and "content" in self._index_names()
        if hybrid:
            rows = self._hybrid_rows(vector, query_text, k, where)
        else:
            query = self.table.search(vector, vector_column_name="vector").distance_type("cosine")
            # Naming the score column keeps LanceDB from warning that it will stop adding it.
            query = query.select([*_RESULT_COLUMNS, "_distance"])
            if self.nprobes:
                query = query.nprobes(self.nprobes)
            if where:
                query = query.where(where, prefilter=True)
            rows = query.limit(k).to_arrow().to_pylist()
            for row in rows:
                row["_relevance_score"] = 1.0 - row["_distance"]
        return [_hit(row, row["_relevance_score"]) for row in rows]

    def rankings(
        self, query_vector: np.ndarray, query_text: str, depth: int, filters: Mapping[str, Any] | None = None
    ) -> tuple[list[SearchHit], list[SearchHit]]:
        """The `depth` best chunks by cosine (score: cosine similarity) and by BM25 (score: BM25), each best first,
        ties by chunk id; the second is empty where the query has no text or there is no full-text index yet."""
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        vector = np.asarray(query_vector, dtype=np.float32).reshape(-1)
        by_vector, by_text = self._ranked_rows(vector, query_text, depth, _where(filters))
        return (
            [_hit(row, 1.0 - row["_distance"]) for row in by_vector],
            [_hit(row, row["_score"]) for row in by_text],
        )

    def _ranked_rows(
        self, vector: np.ndarray, query_text: str, depth: int, where: str | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        semantic = (
            self.table.search(vector, vector_column_name="vector")
            .distance_type("cosine")
            .select([*_RESULT_COLUMNS, "_distance"])
        )
        if self.nprobes:
            semantic = semantic.nprobes(self.nprobes)
        if where:
            semantic = semantic.where(where, prefilter=True)
        by_vector = sorted(semantic.limit(depth).to_arrow().to_pylist(), key=lambda row: (row["_distance"], row["id"]))
        if not query_text.strip() or "content" not in self._index_names():
            return by_vector, []
        lexical = self.table.search(query_text, query_type="fts", fts_columns="content").select(
            [*_RESULT_COLUMNS, "_score"]
        )
        if where:
            lexical = lexical.where(where, prefilter=True)
        by_text = sorted(lexical.limit(depth).to_arrow().to_pylist(), key=lambda row: (-row["_score"], row["id"]))
        return by_vector, by_text

    def _hybrid_rows(self, vector: np.ndarray, query_text: str, k: int, where: str | None) -> list[dict[str, Any]]:
        """Reciprocal-rank fusion of the vector and BM25 rankings, computed here so that it is deterministic.

        BM25 scores tie often (codes and titles share words), and LanceDB returns tied rows in no fixed
        order, so its own hybrid query can rank the same query differently in two processes; prompts,
        training-data fingerprints and DSPy's cache depend on the same query getting the same passages.
        Each ranking orders ties by chunk id; fused ties too.
        """
        by_vector, by_text = self._ranked_rows(vector, query_text, k * 3 + 10, where)
        fused: dict[str, float] = {}
        rows: dict[str, dict[str, Any]] = {}
        for ranking in (by_vector, by_text):
            for rank, row in enumerate(ranking):
                fused[row["id"]] = fused.get(row["id"], 0.0) + 1.0 / (RRF_K + rank + 1)
                rows.setdefault(row["id"], row)
        best = sorted(fused, key=lambda chunk_id: (-fused[chunk_id], chunk_id))[:k]
        return [{**rows[chunk_id], "_relevance_score": fused[chunk_id]} for chunk_id in best]

    def ensure_indexes(self) -> None:
        """Build missing indexes; past `FOLD_SHARE` unindexed rows or `FOLD_FRAGMENTS` fragments, compact the table,
        fold new rows into the indexes and drop superseded table versions. A smaller change costs nothing here."""
        from lancedb.index import FTS, BTree, IvfFlat, LabelList

        self._indexed_columns = None
        if self._change_is_small():
            return
        self._optimize()
        existing = self._index_names()
        rows = self.count()
        if rows == 0:
            return
        created = False
        if "content" not in existing:
            self.table.create_index("content", config=FTS(with_position=False), name="content_idx")
            created = True
        if "labels" not in existing:
            self.table.create_index("labels", config=LabelList(), name="labels_idx")
            created = True
        if "id" not in existing:
            self.table.create_index("id", config=BTree(), name="id_idx")
            created = True
        if "vector" not in existing and rows >= self.ann_min_rows:
            self.table.create_index("vector", config=IvfFlat(distance_type="cosine"), name="vector_idx")
            created = True
        if created:
            self._indexed_columns = None
            self._optimize()

    def _change_is_small(self) -> bool:
        """Every index is there, few rows are outside them and the table has few fragments."""
        existing = self._index_names()
        rows = self.count()
        wanted = {"content", "labels", "id"} | ({"vector"} if rows >= self.ann_min_rows else set())
        if not rows or not wanted <= set(existing):
            return False
        stats = [self.table.index_stats(f"{column}_idx") for column in wanted]  # the names ensure_indexes gives
        if any(stat is None for stat in stats):
            return False
        unindexed = max(stat.num_unindexed_rows for stat in stats)
        fragments = self.table.stats()["fragment_stats"]["num_fragments"]
        return unindexed <= FOLD_SHARE * rows and fragments <= FOLD_FRAGMENTS

    def _optimize(self) -> None:
        # Only the re-index run holding this version's lock uses it, so older table versions can go
        # at once (LanceDB warns about concurrent readers, which a version under construction has none of).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*cleanup_older_than.*")
            self.table.optimize(cleanup_older_than=timedelta(0))


class LanceDBBackend:
    """Index versions of one specialist as LanceDB tables in one folder.

    Args:
        path: Folder of the LanceDB database (created if missing).
        dimension: Vector length; needed only to create an empty version.
        ann_min_rows: Row count from which a vector (ANN) index is built.
        nprobes: IVF partitions probed per query (None = LanceDB's default).
        drop_grace_s: How long a dropped version's files stay for readers that still hold it.
    """

    def __init__(
        self,
        path: Path,
        *,
        dimension: int | None = None,
        ann_min_rows: int = 20_000,
        nprobes: int | None = None,
        drop_grace_s: float = DROP_GRACE_S,
    ):
        import lancedb

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.dimension = dimension
        self.drop_grace_s = drop_grace_s
        self.ann_min_rows = ann_min_rows
        self.nprobes = nprobes
        self._db = lancedb.connect(str(self.path))

    def _folder(self, name: str) -> Path:
        if not _VALID_NAME.match(name):
            raise ValueError(f"invalid index version name {name!r}: use letters, digits, '_' and '-'")
        return self.path / f"{name}{TABLE_SUFFIX}"

    def _version(self, table: Any, name: str) -> LanceDBVersion:
        return LanceDBVersion(table, name, ann_min_rows=self.ann_min_rows, nprobes=self.nprobes)

    def _tombstone(self, name: str) -> Path:
        return self.path / f"{name}{TABLE_SUFFIX}{_TOMBSTONE}"

    def _exists(self, name: str) -> bool:
        """A version is there: its folder, and no tombstone."""
        return self._folder(name).is_dir() and not self._tombstone(name).exists()

    def open_version(self, name: str) -> LanceDBVersion:
        if not self._exists(name):
            raise VersionNotFound(f"no index version {name!r} in {self.path}")
        try:
            table = self._db.open_table(name)
        except Exception as error:
            raise IndexBackendError(f"index version {name!r} in {self.path} cannot be opened: {error}") from error
        return self._version(table, name)

    def create_version(self, name: str, from_version: str | None = None) -> LanceDBVersion:
        """A new version: empty, or a copy of `from_version`'s folder (the source is only read)."""
        target = self._folder(name)
        self._remove_partials(name)
        if self._tombstone(name).exists():  # the name is used again: its dropped files go now
            self._purge(name)
        if target.exists():
            raise IndexBackendError(f"index version {name!r} already exists in {self.path}")
        if from_version is None:
            if self.dimension is None:
                raise IndexBackendError("creating an empty index version needs the vector dimension")
            table = self._db.create_table(name, schema=chunk_schema(self.dimension))
            return self._version(table, name)
        source = self._folder(from_version)
        if not self._exists(from_version):
            raise VersionNotFound(f"no index version {from_version!r} to copy in {self.path}")
        partial = self.path / f"{name}{TABLE_SUFFIX}{_PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
        _share_tree(source, partial)
        os.replace(partial, target)
        return self.open_version(name)

    def _remove_partials(self, name: str) -> None:
        for leftover in self.path.glob(f"{name}{TABLE_SUFFIX}{_PARTIAL_MARK}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def list_versions(self) -> list[str]:
        names = (path.name.removesuffix(TABLE_SUFFIX) for path in self.path.glob(f"*{TABLE_SUFFIX}") if path.is_dir())
        return sorted(name for name in names if not self._tombstone(name).exists())

    def drop_version(self, name: str) -> None:
        """No longer list or open `name`; its files stay `drop_grace_s` for readers holding it, then go on a later
        drop (each drop removes the versions whose grace has passed)."""
        self._remove_partials(name)
        if self._folder(name).exists() and not self._tombstone(name).exists():
            self._tombstone(name).write_text(f"{time.time():.3f}\n")
        for tombstone in self.path.glob(f"*{TABLE_SUFFIX}{_TOMBSTONE}"):
            try:
                dropped_at = float(tombstone.read_text().strip() or 0)
            except (OSError, ValueError):
                dropped_at = 0.0
            if time.time() - dropped_at >= self.drop_grace_s:
                self._purge(tombstone.name.removesuffix(f"{TABLE_SUFFIX}{_TOMBSTONE}"))

    def _purge(self, name: str) -> None:
        """Remove a dropped version's folder, then its tombstone (a crash between the two leaves a tombstone that the
        next drop finishes)."""
        shutil.rmtree(self._folder(name), ignore_errors=True)
        self._tombstone(name).unlink(missing_ok=True)


def _share_tree(source: Path, target: Path) -> None:
    """`target` as a copy of the table folder `source`: files Lance never changes are hard links, the rest copies."""
    for folder, _, files in os.walk(source):
        relative = Path(folder).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            origin, copy = Path(folder) / name, target / relative / name
            if relative.parts and relative.parts[0] in IMMUTABLE_PARTS:
                link_or_copy(origin, copy)
            else:
                shutil.copy2(origin, copy)


def link_or_copy(origin: Path, copy: Path) -> None:
    """`copy` as a hard link to `origin` (no bytes written), or a copy on another file system or where links are not
    allowed. Only for files nobody will change in place: both names share the content."""
    try:
        os.link(origin, copy)
    except OSError:
        shutil.copy2(origin, copy)
