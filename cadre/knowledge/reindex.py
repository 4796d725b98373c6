"""The incremental re-index engine: load sources, embed only what changed, build a new index version
beside the live one, and search the live one.

How a run works (`plan_and_apply`):

1. Take the specialist's run lock (one run at a time; the OS releases it if the process dies).
2. Decide where the run starts. If an unfinished build of a previous run exists, was started from
   the version that is still live and with the same model and chunking, the run *resumes* it and reads
   what that version actually holds from the index itself (`chunk_states`). Otherwise the run starts
   from the live version's manifest (or from empty when there is no live version or the model or
   chunking changed), and the new version will be a copy of the live one.
3. Stream the documents. A document whose chunks are all stored with its current content hash is
   left alone: it is neither re-chunked nor re-embedded. Every other document is chunked; its chunks
   that are not stored with the current hash are embedded and upserted in batches, into the new
   version only (created on the first write, so a run that changes nothing creates nothing).
4. Delete every stored chunk that no current document produced (deleted documents, old chunks of
   changed documents).
5. Build or refresh the indexes, check the row count, write the manifest, remove the build marker.

Under a wall-time cap (`max_wall_seconds`, the smoke budget's) the run stops reading documents at the first
document past it, embeds and writes what it read, and stops there: no deletions, no manifest, the build
marker stays. The version is an unfinished build, which `promote_version` refuses, so it never goes live
half-built; the next run resumes it like a killed one (`ReindexResult.wall_capped` says which happened).

Why a run killed at any point converges when run again: chunk ids are a pure function of the
document (`hash(doc_id, chunk_index, content)`), each upsert and delete is one atomic commit keyed
by id, and every row carries the content hash and chunk count of its document. Whatever subset of
commits landed before the kill, the resumed run reads the rows that are really there, keeps exactly
the chunks that match the current documents, writes the missing or stale ones and deletes the rest;
nothing depends on the manifest of an unfinished version (it is written last). The live version is
never written, so serving is untouched at every instant, and a version becomes live only through
`promote_version`.

Test hook: with `CADRE_TEST_PAUSE_AFTER_WRITE_S` set, the run logs `reindex checkpoint: <what>` after
every committed write (`upsert N`, `delete N`, `indexes`) and sleeps that long there, or only at the
checkpoint named by `CADRE_TEST_PAUSE_AT`, so a test can kill it with SIGKILL at a known point.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadre.config.budget import ReindexPlan, RunBudget, plan_reindex
from cadre.config.knowledge import ChunkingSettings, Source
from cadre.config.project import EngineSettings, IndexBackendSettings
from cadre.knowledge.chunking import Chunk, Chunker, load_tokenizer
from cadre.knowledge.embedding import Embedder
from cadre.knowledge.index import (
    IndexBackend,
    IndexVersion,
    RetrievalMode,
    SearchHit,
    VersionNotFound,
    open_backend,
)
from cadre.knowledge.index.live import Promotion
from cadre.knowledge.index.manifest import (
    BuildMarker,
    IndexKey,
    IndexLayout,
    Manifest,
    corpus_fingerprint,
    utc_now,
)
from cadre.knowledge.ranker import LearnedRanker, Rankings
from cadre.knowledge.sources import (
    DEFAULT_RETRY,
    Document,
    RetryPolicy,
    SkipReport,
    load_documents,
)

if TYPE_CHECKING:
    import numpy as np

    from cadre.config import CadreConfig, Specialist
    from cadre.knowledge.shards import ShardEngine, ShardResult

logger = logging.getLogger(__name__)

PAUSE_ENV = "CADRE_TEST_PAUSE_AFTER_WRITE_S"
PAUSE_AT_ENV = "CADRE_TEST_PAUSE_AT"
CHUNKING_BATCH_DOCUMENTS = 256


class ReindexError(RuntimeError):
    """The index does not hold what the run wrote (a bug, or someone else wrote the version)."""


@dataclass(frozen=True)
class ReindexResult:
    """What a re-index run did.

    Attributes:
        specialist: Whose index.
        version: The version holding the result: the new version, or the live one when nothing changed.
        created_version: Whether the run produced a new version (a challenger to evaluate and promote).
        base_version: The live version the run compared against (None: none was live).
        resumed: Whether the run continued an interrupted build.
        rebuilt_from_empty: Whether the new version started empty (no compatible live version:
            first run, or the embedding model or chunking changed).
        documents_total: Documents in the sources now (after skips and the cap).
        documents_added: New since the live version.
        documents_updated: Changed content hash since the live version.
        documents_deleted: In the live version, gone from the sources.
        documents_unchanged: Same content hash as in the live version.
        chunks_total: Chunks in the resulting version.
        chunks_embedded: Chunks embedded by this run.
        chunks_deleted: Chunks deleted from the new version (it starts as a copy of the live one).
        skipped: Skipped records per reason.
        skip_examples: A few skipped records per reason.
        durations_s: Seconds per phase: load (read, normalise, hash), plan, chunk, embed, write,
            delete, indexes, manifest, total.
        corpus_fingerprint: sha256 over the sorted (doc_id, content hash) pairs of the corpus.
        index_key: Digest of the embedding model and chunking settings.
        manifest_path: The manifest of `version`.
        wall_capped: The run stopped reading documents at the wall-time cap; `version` (if any) is an
            unfinished build that the next run resumes, never promoted.
        max_wall_seconds: The wall-time cap of the run (None: none).
    """

    specialist: str
    version: str | None
    created_version: bool
    base_version: str | None
    resumed: bool
    rebuilt_from_empty: bool
    documents_total: int
    documents_added: int
    documents_updated: int
    documents_deleted: int
    documents_unchanged: int
    chunks_total: int
    chunks_embedded: int
    chunks_deleted: int
    skipped: dict[str, int]
    skip_examples: dict[str, list[str]]
    durations_s: dict[str, float]
    corpus_fingerprint: str
    index_key: str
    manifest_path: str | None
    wall_capped: bool = False
    max_wall_seconds: float | None = None

    @property
    def wall_cap_note(self) -> str:
        """What a wall-capped run did, in one sentence (empty when the cap was not reached)."""
        if not self.wall_capped:
            return ""
        kept = (
            f"version {self.version} stays an unfinished build, neither evaluated nor made live; the next re-index "
            "resumes it"
            if self.version
            else "what it read was in the live version already; nothing was built, evaluated or promoted"
        )
        return (
            f"the re-index stopped reading documents at the wall-time cap ({self.max_wall_seconds:.0f} s) after "
            f"{self.documents_total} document(s), {self.chunks_embedded} chunk(s) embedded: {kept}"
        )

    @property
    def changed(self) -> bool:
        """Whether the corpus differs from the live version's."""
        return bool(self.documents_added or self.documents_updated or self.documents_deleted) or self.rebuilt_from_empty

    @property
    def embed_chunks_per_second(self) -> float:
        """Embedding throughput of this run (0 when nothing was embedded)."""
        seconds = self.durations_s.get("embed", 0.0)
        return self.chunks_embedded / seconds if seconds > 0 else 0.0

    @property
    def documents_per_second(self) -> float:
        """Documents processed per second of the whole run."""
        seconds = self.durations_s.get("total", 0.0)
        return self.documents_total / seconds if seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics (for MLflow)."""
        numbers: dict[str, float] = {
            "documents_total": self.documents_total,
            "documents_added": self.documents_added,
            "documents_updated": self.documents_updated,
            "documents_deleted": self.documents_deleted,
            "documents_unchanged": self.documents_unchanged,
            "documents_skipped": sum(self.skipped.values()),
            "chunks_total": self.chunks_total,
            "chunks_embedded": self.chunks_embedded,
            "chunks_deleted": self.chunks_deleted,
            "embed_chunks_per_second": self.embed_chunks_per_second,
            "documents_per_second": self.documents_per_second,
        }
        numbers.update({f"skipped_{reason}": count for reason, count in self.skipped.items()})
        numbers.update({f"seconds_{phase}": seconds for phase, seconds in self.durations_s.items()})
        return numbers

    def as_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        return asdict(self)


@dataclass(frozen=True)
class PruneResult:
    """What `prune_versions` kept and dropped.

    Attributes:
        kept: Versions kept (the live one first).
        dropped: Versions deleted from the index with their manifests.
    """

    kept: list[str]
    dropped: list[str]


# --- what a version holds -----------------------------------------------------------------------


@dataclass
class _StoredDocument:
    chunk_hashes: dict[str, str]  # chunk id -> content hash of the document version it was cut from
    chunk_count: int

    def is_current(self, content_hash: str) -> bool:
        return len(self.chunk_hashes) == self.chunk_count and all(
            stored == content_hash for stored in self.chunk_hashes.values()
        )


@dataclass
class _StoredState:
    documents: dict[str, _StoredDocument] = field(default_factory=dict)
    duplicate_ids: set[str] = field(default_factory=set)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> _StoredState:
        documents = {
            doc_id: _StoredDocument({chunk: content_hash for chunk in chunk_ids}, len(chunk_ids))
            for doc_id, (content_hash, chunk_ids) in manifest.documents.items()
        }
        return cls(documents)

    @classmethod
    def from_version(cls, version: IndexVersion) -> _StoredState:
        state = cls()
        seen: set[str] = set()
        for row in version.chunk_states():
            if row.id in seen:
                state.duplicate_ids.add(row.id)
            seen.add(row.id)
            stored = state.documents.setdefault(row.doc_id, _StoredDocument({}, 0))
            stored.chunk_hashes[row.id] = row.doc_hash
            stored.chunk_count = max(stored.chunk_count, row.chunk_count)
        if state.duplicate_ids:
            # The caller deletes every row of a duplicated id first; its document is then simply incomplete.
            for stored in state.documents.values():
                for chunk_id in state.duplicate_ids & stored.chunk_hashes.keys():
                    del stored.chunk_hashes[chunk_id]
        return state

    def all_ids(self) -> Iterator[str]:
        for stored in self.documents.values():
            yield from stored.chunk_hashes


class _PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def timed(self, name: str, items: Iterator[Any]) -> Iterator[Any]:
        """Yield from `items`, counting the time spent producing them as phase `name`."""
        while True:
            with self.phase(name):
                try:
                    item = next(items)
                except StopIteration:
                    return
            yield item


def _checkpoint(what: str) -> None:
    pause = os.environ.get(PAUSE_ENV)
    if not pause:
        return
    logger.info("reindex checkpoint: %s", what)
    for handler in logging.getLogger().handlers:
        handler.flush()
    only_at = os.environ.get(PAUSE_AT_ENV)
    if not only_at or only_at == what:
        time.sleep(float(pause))


def new_version_name() -> str:
    """A fresh version name, `vYYYYMMDD_HHMMSS_mmm_<hex>` in UTC: names sort by creation time."""
    now = time.time()
    return time.strftime("v%Y%m%d_%H%M%S", time.gmtime(now)) + f"_{int(now * 1000) % 1000:03d}_{secrets.token_hex(3)}"


def _index_key(embedder: Embedder, chunking: ChunkingSettings) -> IndexKey:
    return IndexKey(
        embedding_model=embedder.model_ref,
        embedding_fingerprint=embedder.fingerprint,
        dimension=embedder.dimension,
        max_tokens=chunking.max_tokens,
        overlap_tokens=chunking.overlap_tokens,
        embedding_precision=embedder.precision,
    )


# --- the run ------------------------------------------------------------------------------------


class _Run:
    """State of one `plan_and_apply` call and its steps (numbered as in the module docstring)."""

    def __init__(
        self,
        specialist: str,
        layout: IndexLayout,
        backend: IndexBackend,
        embedder: Embedder,
        chunking: ChunkingSettings,
        write_batch_size: int,
        engine: EngineSettings,
        resources: ExitStack,
    ):
        self.specialist = specialist
        self.layout = layout
        self.backend = backend
        self.embedder = embedder
        self.chunking = chunking
        self.write_batch_size = write_batch_size
        self.engine_settings = engine
        self.resources = resources  # closed when the run ends: a local Dask cluster stops there
        self.engine: ShardEngine | None = None  # started on the first shard: a run that changes nothing starts none
        self.in_flight: deque[tuple[list[Chunk], ShardResult]] = deque()
        self.timer = _PhaseTimer()
        self.key = _index_key(embedder, chunking)
        self.chunker: Chunker | None = None
        self.target: IndexVersion | None = None
        self.target_started_at = ""
        self.copy_from: str | None = None
        self.pending: list[Chunk] = []
        self.document_chunks: dict[str, tuple[str, list[str]]] = {}
        self.chunks_embedded = 0
        self.chunks_deleted = 0
        self.batches_written = 0
        self.progress: Any = None

    # 2. where the run starts
    def choose_start(self) -> tuple[str | None, Manifest | None, _StoredState, bool]:
        live = self.layout.pointers.get(self.specialist)
        live_manifest = self.layout.read_manifest(live) if live else None
        if live and live_manifest is None:
            logger.warning(
                "live version %s of %s has no manifest; the new version starts from empty", live, self.specialist
            )
        compatible = live_manifest is not None and live_manifest.index_key == self.key
        if live_manifest is not None and not compatible:
            logger.info("embedding model or chunking changed since %s: building %s from empty", live, self.specialist)
        self.copy_from = live if compatible else None
        resumed = False
        for marker in self.layout.builds():
            if self.layout.is_complete(marker.version):
                self.layout.remove_build(marker.version)
                continue
            resumable = (
                not resumed
                and marker.phase == "building"
                and marker.base_version == self.copy_from
                and marker.index_key_digest == self.key.digest
            )
            if resumable:
                try:
                    self.target = self.backend.open_version(marker.version)
                    self.target_started_at = marker.started_at
                    resumed = True
                    logger.info("resuming the interrupted build %s of %s", marker.version, self.specialist)
                    continue
                except VersionNotFound:
                    pass
            logger.info("dropping the abandoned build %s of %s", marker.version, self.specialist)
            self.backend.drop_version(marker.version)
            self.layout.remove_build(marker.version)
        if resumed:
            state = _StoredState.from_version(self.target)
            if state.duplicate_ids:
                logger.warning(
                    "%d chunk ids of %s are stored twice; rewriting them", len(state.duplicate_ids), self.specialist
                )
                self.target.delete(state.duplicate_ids)
        elif compatible:
            state = _StoredState.from_manifest(live_manifest)
        else:
            state = _StoredState()
        return live, live_manifest, state, resumed

    def ensure_target(self) -> IndexVersion:
        if self.target is None:
            name = new_version_name()
            self.target_started_at = utc_now()
            marker = BuildMarker(name, self.copy_from, self.key.digest, "creating", self.target_started_at)
            self.layout.write_build(marker)
            with self.timer.phase("copy"):
                self.target = self.backend.create_version(name, from_version=self.copy_from)
            self.layout.write_build(
                BuildMarker(name, self.copy_from, self.key.digest, "building", self.target_started_at)
            )
            logger.info(
                "building index version %s of %s%s",
                name,
                self.specialist,
                f" from {self.copy_from}" if self.copy_from else " from empty",
            )
        return self.target

    # 3. changed documents: chunk, embed, upsert
    def chunk_documents(self, documents: list[Document], state: _StoredState) -> None:
        if not documents:
            return
        if self.chunker is None:
            self.chunker = Chunker(load_tokenizer(self.embedder.model_dir), self.chunking)
        with self.timer.phase("chunk"):
            chunked = self.chunker.chunk_many(documents)
        for document, chunks in zip(documents, chunked):
            self.document_chunks[document.id] = (document.content_hash, [chunk.id for chunk in chunks])
            stored = state.documents.get(document.id)
            for chunk in chunks:
                # A chunk already stored with this content hash was written by an interrupted run.
                if stored is None or stored.chunk_hashes.get(chunk.id) != document.content_hash:
                    self.pending.append(chunk)
            if len(self.pending) >= self.write_batch_size:
                self.write_pending()

    def write_pending(self, final: bool = False) -> None:
        """Send full shards of pending chunks to the engine and upsert the oldest results while more than its
        `in_flight` wait; with `final`, the last partial shard too, and every result."""
        while len(self.pending) >= self.write_batch_size or (final and self.pending):
            batch, self.pending = self.pending[: self.write_batch_size], self.pending[self.write_batch_size :]
            engine = self.start_engine()
            with self.timer.phase("embed"):
                self.in_flight.append((batch, engine.submit([chunk.content for chunk in batch])))
            while len(self.in_flight) >= engine.in_flight:
                self.write_oldest()
        while final and self.in_flight:
            self.write_oldest()

    def start_engine(self) -> ShardEngine:
        if self.engine is None:
            from cadre.knowledge.shards import open_engine

            self.engine = self.resources.enter_context(open_engine(self.engine_settings, self.embedder))
        return self.engine

    def write_oldest(self) -> None:
        batch, shard = self.in_flight.popleft()
        target = self.ensure_target()
        with self.timer.phase("embed"):  # (with a cluster: the wait for the shard's result)
            vectors = shard.result()
        with self.timer.phase("write"):
            target.upsert(batch, vectors)
        if self.progress is not None:
            self.progress.update(len(batch))
        self.chunks_embedded += len(batch)
        self.batches_written += 1
        _checkpoint(f"upsert {self.batches_written}")

    # 4. chunks no current document produced
    def delete_stale(self, state: _StoredState) -> None:
        wanted = {chunk_id for _, chunk_ids in self.document_chunks.values() for chunk_id in chunk_ids}
        stale = {chunk_id for chunk_id in state.all_ids() if chunk_id not in wanted}
        if not stale:
            return
        target = self.ensure_target()
        with self.timer.phase("delete"):
            ordered = sorted(stale)
            for start in range(0, len(ordered), 5000):
                target.delete(ordered[start : start + 5000])
                _checkpoint(f"delete {start // 5000 + 1}")
        self.chunks_deleted = len(stale)


def plan_and_apply(
    specialist: str,
    sources: Sequence[Source],
    chunking: ChunkingSettings,
    *,
    root: Path,
    state_dir: Path,
    embedder: Embedder,
    backend: IndexBackend | None = None,
    max_documents: int | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    write_batch_size: int = 1024,
    show_progress: bool = False,
    priority_ids: Sequence[str] = (),
    max_wall_seconds: float | None = None,
    engine: EngineSettings | None = None,
    ranking: Mapping[str, Any] | None = None,
) -> ReindexResult:
    """Bring a specialist's index up to date with its sources, as a new version beside the live one.

    Only new and changed documents are chunked and embedded; chunks of deleted and changed documents
    are deleted; nothing else is touched. The live version is only read. When nothing changed no
    version is created and the result names the live version. The new version is not promoted:
    evaluate it, then call `promote_version`.

    Args:
        specialist: Specialist name.
        sources: Its knowledge sources.
        chunking: Its chunking settings (`max_document_bytes` also applies to loading).
        root: Project folder (relative source paths are read from it).
        state_dir: The project's state dir (manifests, build markers, live pointer, LanceDB tables).
        embedder: The embedding model.
        backend: Index backend (default: LanceDB under `state_dir`).
        max_documents: Cap on documents per source (the smoke budget); documents past it are not
            loaded and a python source receives it as `limit=`.
        retry: Retries for reaching sources.
        write_batch_size: Chunks embedded and written per commit: one shard.
        show_progress: Show a progress bar of chunks embedded.
        priority_ids: Under `max_documents`, ids that python sources accepting `priority_ids=` load first.
        max_wall_seconds: Stop reading documents at the first one past this many seconds; the version then
            stays an unfinished build (`wall_capped`) that the next run resumes. None: no cap.
        engine: Where the shards are embedded (`project.engine`; default: inline, in this process).
        ranking: The learned ranking declared for the specialist (`IndexSettings.ranking`, as a dict; None: the
            fused ranking), recorded in the manifest. Where it differs from the live version's, a new version is
            built although no document changed (a copy: nothing is embedded), so that its ranker is fitted and the
            change is evaluated and gated like any other.

    Returns:
        What the run did.

    Raises:
        SourceError: A source cannot be read; the run stops, nothing is promoted, and the next run
            resumes the partial version.
        IndexBusy: Another run of this specialist is in progress.
    """
    if write_batch_size < 1:
        raise ValueError("write_batch_size must be at least 1")
    layout = IndexLayout(state_dir, specialist)
    if backend is None:
        backend = open_backend(IndexBackendSettings(), state_dir, specialist, dimension=embedder.dimension)
    if chunking.max_tokens + 2 > embedder.max_seq_length:
        logger.warning(
            "chunks of %d tokens exceed what %s embeds (%d with special tokens); their ends are truncated",
            chunking.max_tokens,
            embedder.model_ref,
            embedder.max_seq_length,
        )
    with layout.run_lock(), ExitStack() as resources:
        run = _Run(
            specialist, layout, backend, embedder, chunking, write_batch_size, engine or EngineSettings(), resources
        )
        started = time.perf_counter()
        with run.timer.phase("plan"):
            live, live_manifest, state, resumed = run.choose_start()
        live_hashes = (
            {doc_id: content_hash for doc_id, (content_hash, _) in live_manifest.documents.items()}
            if live_manifest
            else {}
        )
        skips = SkipReport()
        deadline = started + max_wall_seconds if max_wall_seconds is not None else None
        wall_capped = False
        added = updated = unchanged = 0
        waiting: list[Document] = []
        documents = load_documents(
            sources,
            root=root,
            max_document_bytes=chunking.max_document_bytes,
            skips=skips,
            limit_per_source=max_documents,
            retry=retry,
            priority_ids=priority_ids,
        )
        from tqdm.auto import tqdm

        with tqdm(desc=f"embedding {specialist}", unit="chunk", disable=not show_progress, leave=False) as run.progress:
            for document in run.timer.timed("load", documents):
                with run.timer.phase("plan"):
                    previous = live_hashes.get(document.id)
                    if previous is None:
                        added += 1
                    elif previous != document.content_hash:
                        updated += 1
                    else:
                        unchanged += 1
                    stored = state.documents.get(document.id)
                    current = stored is not None and stored.is_current(document.content_hash)
                    if current:
                        run.document_chunks[document.id] = (document.content_hash, list(stored.chunk_hashes))
                    else:
                        waiting.append(document)
                if len(waiting) >= CHUNKING_BATCH_DOCUMENTS:
                    run.chunk_documents(waiting, state)
                    waiting = []
                    # The source is streamed, so the chunk total is unknown; the documents read so far tell how far it got.
                    run.progress.set_postfix(documents=added + updated + unchanged, unchanged=unchanged, refresh=False)
                if deadline is not None and time.perf_counter() >= deadline:
                    wall_capped = True
                    break
            run.chunk_documents(waiting, state)
            run.write_pending(final=True)
        # Capped: the documents not read are unknown, not deleted; the build stays unfinished and resumable.
        deleted = 0 if wall_capped else sum(1 for doc_id in live_hashes if doc_id not in run.document_chunks)
        if not wall_capped:
            run.delete_stale(state)
        fingerprint = corpus_fingerprint(
            (doc_id, content_hash) for doc_id, (content_hash, _) in run.document_chunks.items()
        )
        chunks_total = sum(len(chunk_ids) for _, chunk_ids in run.document_chunks.values())
        common: dict[str, Any] = {
            "specialist": specialist,
            "base_version": live,
            "resumed": resumed,
            "rebuilt_from_empty": live is None or run.copy_from is None,
            "documents_total": len(run.document_chunks),
            "documents_added": added,
            "documents_updated": updated,
            "documents_deleted": deleted,
            "documents_unchanged": unchanged,
            "chunks_total": chunks_total,
            "chunks_embedded": run.chunks_embedded,
            "chunks_deleted": run.chunks_deleted,
            "skipped": dict(skips.counts),
            "skip_examples": {reason: list(examples) for reason, examples in skips.examples.items()},
            "corpus_fingerprint": fingerprint,
            "index_key": run.key.digest,
            "max_wall_seconds": max_wall_seconds,
        }
        if wall_capped:
            run.timer.seconds["total"] = time.perf_counter() - started
            result = ReindexResult(
                version=run.target.name if run.target is not None else None,
                created_version=False,
                durations_s=_rounded(run.timer.seconds),
                manifest_path=None,
                wall_capped=True,
                **common,
            )
            logger.info("%s: %s", specialist, result.wall_cap_note)
            return result
        ranking = dict(ranking) if ranking is not None else None
        if run.target is None and run.copy_from is not None:  # no document changed (copy_from: live_manifest is set)
            if live_manifest.ranking == ranking:
                run.timer.seconds["total"] = time.perf_counter() - started
                logger.info("%s: no change since %s (%d documents)", specialist, live, len(run.document_chunks))
                return ReindexResult(
                    version=live,
                    created_version=False,
                    durations_s=_rounded(run.timer.seconds),
                    manifest_path=str(layout.manifest_path(live)),
                    **common,
                )
            logger.info(
                "%s: no document changed since %s, but the declared ranking did: building a copy to fit and gate it",
                specialist,
                live,
            )
        target = run.ensure_target()
        with run.timer.phase("indexes"):
            target.ensure_indexes()
        _checkpoint("indexes")
        stored_rows = target.count()
        if stored_rows != chunks_total:
            raise ReindexError(
                f"index version {target.name} of {specialist} holds {stored_rows} chunks, expected {chunks_total}"
            )
        with run.timer.phase("manifest"):
            run.timer.seconds["total"] = time.perf_counter() - started
            manifest = Manifest(
                specialist=specialist,
                version=target.name,
                base_version=run.copy_from,
                index_key=run.key,
                documents=run.document_chunks,
                created_at=run.target_started_at,
                completed_at=utc_now(),
                corpus_fingerprint=fingerprint,
                stats={
                    "documents_added": added,
                    "documents_updated": updated,
                    "documents_deleted": deleted,
                    "chunks_embedded": run.chunks_embedded,
                    "chunks_deleted": run.chunks_deleted,
                    "skipped": dict(skips.counts),
                },
                embedder=embedder.record(),
                ranking=ranking,
            )
            manifest_path = layout.write_manifest(manifest)
            layout.remove_build(target.name)
        run.timer.seconds["total"] = time.perf_counter() - started
        logger.info(
            "%s: version %s complete: +%d ~%d -%d documents, %d chunks embedded, %d deleted",
            specialist,
            target.name,
            added,
            updated,
            deleted,
            run.chunks_embedded,
            run.chunks_deleted,
        )
        return ReindexResult(
            version=target.name,
            created_version=True,
            durations_s=_rounded(run.timer.seconds),
            manifest_path=str(manifest_path),
            **common,
        )


def _rounded(seconds: Mapping[str, float]) -> dict[str, float]:
    return {phase: round(value, 4) for phase, value in seconds.items()}


# --- versions -----------------------------------------------------------------------------------


def live_version(state_dir: Path, specialist: str) -> str | None:
    """The live (champion) index version of a specialist, or None before its first promotion."""
    return IndexLayout(state_dir, specialist).pointers.get(specialist)


def configured_embedder_version(state_dir: Path, specialist: str, configured_model: str) -> str | None:
    """The newest complete version embedded by the configured model (`project.embedding.model`) while the live one
    was embedded by another (a refreshed embedder): the version "retrieval only, configured embedder" is measured
    on, beside the live one. None where the live version is the configured model's own or none of its is kept.

    `prune_versions` keeps it, so the comparison outlives the `retention` newest versions.
    """
    layout = IndexLayout(state_dir, specialist)

    def configured(version: str) -> bool:
        return (layout.embedded_by(version) or configured_model) == configured_model

    live = layout.pointers.get(specialist)
    if live is None or configured(live):
        return None
    return next((version for version in reversed(layout.complete_versions()) if configured(version)), None)


def promote_version(state_dir: Path, specialist: str, version: str) -> Promotion:
    """Make a complete index version live (also how to roll back: promote the previous one).

    Args:
        state_dir: The project's state dir.
        specialist: Specialist name.
        version: A version with a manifest.

    Returns:
        The promotion, with the version it replaced.

    Raises:
        ValueError: The version is unknown or unfinished.
    """
    layout = IndexLayout(state_dir, specialist)
    if not layout.is_complete(version):
        raise ValueError(
            f"index version {version!r} of {specialist!r} is not complete (no manifest in {layout.manifests_dir})"
        )
    promotion = layout.pointers.set(specialist, version)
    logger.info("%s: index version %s is live (was %s)", specialist, version, promotion.previous)
    return promotion


def prune_versions(
    state_dir: Path, specialist: str, retention: int, *, backend: IndexBackend, configured_model: str | None = None
) -> PruneResult:
    """Delete old index versions: keep the live one, the `retention` newest complete others, the previous live
    version (the rollback target) even when it is older, and, while a refreshed embedder's version is live, the
    newest version of the configured embedder (`configured_embedder_version`: the retrieval baseline).

    Unfinished builds are dropped unless they can still be resumed (started from the live version).
    Takes the run lock, so it never races a re-index.

    Args:
        state_dir: The project's state dir.
        specialist: Specialist name.
        retention: Complete versions kept besides the live one (`index.retention`).
        backend: The specialist's index backend.
        configured_model: `project.embedding.model` (None: no baseline version is kept beyond the others).

    Returns:
        Kept and dropped versions.
    """
    if retention < 0:
        raise ValueError("retention must be >= 0")
    layout = IndexLayout(state_dir, specialist)
    with layout.run_lock():
        live = layout.pointers.get(specialist)
        history = layout.pointers.history(specialist)
        complete = layout.complete_versions()
        others = [version for version in complete if version != live]
        keep = set(others[-retention:]) if retention else set()
        rollback = next((version for version in history if version in complete and version != live), None)
        if rollback:
            keep.add(rollback)
        baseline = configured_embedder_version(state_dir, specialist, configured_model) if configured_model else None
        if baseline:
            keep.add(baseline)
        if live:
            keep.add(live)
        resumable = {
            marker.version
            for marker in layout.builds()
            if marker.base_version == live and not layout.is_complete(marker.version)
        }
        dropped = []
        for version in sorted(set(backend.list_versions()) | set(complete)):
            if version in keep or version in resumable:
                continue
            backend.drop_version(version)
            layout.remove_manifest(version)
            layout.remove_build(version)
            dropped.append(version)
        for marker in layout.builds():
            if marker.version not in resumable:
                layout.remove_build(marker.version)
        kept = ([live] if live else []) + sorted(keep - {live})
        return PruneResult(kept=kept, dropped=dropped)


# --- retrieval ----------------------------------------------------------------------------------


class IndexSearcher:
    """Searches a specialist's index: the live version by default, or a named one (a challenger).

    The live pointer is read on every call, so a promotion takes effect without a restart; opened
    versions are cached (a complete version never changes). Each version's queries are embedded with the
    model its manifest records (`embedder_for`): a version re-embedded by a fine-tuned embedder is searched
    with that embedder, whatever `embedder` is.

    Args:
        specialist: Specialist name.
        state_dir: The project's state dir.
        backend: The specialist's index backend.
        embedder: The configured embedding model (versions that record no other model are searched with it).
        default_mode: Search mode when a call names none.
    """

    def __init__(
        self,
        specialist: str,
        state_dir: Path,
        backend: IndexBackend,
        embedder: Embedder,
        default_mode: RetrievalMode = "hybrid",
    ):
        self.specialist = specialist
        self.layout = IndexLayout(state_dir, specialist)
        self.backend = backend
        self.embedder = embedder
        self.default_mode = default_mode
        self._versions: dict[str, IndexVersion] = {}
        self._embedders: dict[str, Embedder] = {}
        self._rankers: dict[str, LearnedRanker | None] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: CadreConfig, specialist: str) -> IndexSearcher:
        """A searcher for one specialist of a validated `pipelines.yaml`."""
        settings = config.specialist(specialist)
        embedder = Embedder.load(config.project.embedding, config.project.threads, root=config.root)
        backend = open_backend(config.project.index, config.state_dir, specialist, dimension=embedder.dimension)
        return cls(specialist, config.state_dir, backend, embedder, settings.index.search_mode)

    def _version(self, name: str) -> IndexVersion:
        with self._lock:
            if name not in self._versions:
                self._versions[name] = self.backend.open_version(name)
            return self._versions[name]

    def embedder_for(self, version: str) -> Embedder:
        """The model that embedded `version`, as its manifest records it (the configured one when it records none).

        Raises:
            ValueError: The recorded model is not on this machine or its files changed.
        """
        with self._lock:
            found = self._embedders.get(version)
        if found is not None:
            return found
        manifest = self.layout.read_manifest(version)
        found = self.embedder
        if manifest is not None:
            key = manifest.index_key
            try:
                found = self.embedder.with_model(self.layout.embedding_model(key), key.embedding_fingerprint)
            except ValueError as error:
                raise ValueError(f"index version {version} of {self.specialist}: {error}") from None
            if manifest.embedder.get("registry_version"):
                found = replace(found, registry_version=manifest.embedder["registry_version"])
        with self._lock:
            self._embedders[version] = found
        return found

    def ranker_for(self, version: str) -> LearnedRanker | None:
        """The learned ranker fitted for `version` (`IndexLayout.ranker_path`), or None where none was fitted.

        Raises:
            ValueError: its file is there but unreadable (naming the file).
        """
        with self._lock:
            if version in self._rankers:
                return self._rankers[version]
        path = self.layout.ranker_path(version)
        found = LearnedRanker.read(path) if path.is_file() else None
        with self._lock:
            self._rankers[version] = found
        return found

    def _ordered(
        self, handle: IndexVersion, name: str, vector: np.ndarray, query: str, k: int, filters: Any, mode: RetrievalMode
    ) -> list[SearchHit]:
        ranker = self.ranker_for(name) if mode == "learned" else None
        if ranker is None:
            return handle.search(vector, query, k, filters=filters, mode="vector" if mode == "vector" else "hybrid")
        by_vector, by_keyword = handle.rankings(vector, query, ranker.settings.fetch_depth, filters=filters)
        return ranker.rank(query, Rankings(by_vector, by_keyword))[:k]

    def _name(self, version: str | None) -> str:
        name = version or self.layout.pointers.get(self.specialist)
        if name is None:
            raise VersionNotFound(f"no index version of {self.specialist!r} is live yet; run a re-index and promote it")
        return name

    def search(
        self,
        query: str,
        k: int = 5,
        filters: Mapping[str, Any] | None = None,
        mode: RetrievalMode | None = None,
        version: str | None = None,
    ) -> list[SearchHit]:
        """Ranked chunks for a query, best first.

        Args:
            query: The user's text.
            k: How many hits.
            filters: Metadata equality filters (`{"key": value or [values]}`; `source`, `doc_id`,
                `record_id` filter those fields).
            mode: `vector`, `hybrid` or `learned` (default: the specialist's `index.search_mode`).
            version: Search this version instead of the live one (e.g. a challenger under evaluation).

        Raises:
            VersionNotFound: No version is live yet and none was named.
        """
        name = self._name(version)
        handle = self._version(name)
        vector = self.embedder_for(name).embed_query(query)
        return self._ordered(handle, name, vector, query, k, filters, mode or self.default_mode)

    def search_many(
        self, queries: Sequence[str], k: int = 5, mode: RetrievalMode | None = None, version: str | None = None
    ) -> list[list[SearchHit]]:
        """`search` for many queries, their vectors embedded in batches (mining hard negatives for a whole split)."""
        name = self._name(version)
        handle = self._version(name)
        vectors = self.embedder_for(name).embed(list(queries))
        return [
            self._ordered(handle, name, vector, query, k, None, mode or self.default_mode)
            for vector, query in zip(vectors, queries, strict=True)
        ]

    def rankings_many(self, queries: Sequence[str], depth: int, version: str | None = None) -> list[Rankings]:
        """Both rankings (`IndexVersion.rankings`) of many queries, embedded in batches: what a ranker is fitted on."""
        name = self._name(version)
        handle = self._version(name)
        vectors = self.embedder_for(name).embed(list(queries))
        return [
            Rankings(*handle.rankings(vector, query, depth)) for vector, query in zip(vectors, queries, strict=True)
        ]


def reindex_specialist(
    config: CadreConfig,
    specialist: str,
    *,
    budget: RunBudget = "full",
    show_progress: bool = True,
    retry: RetryPolicy = DEFAULT_RETRY,
    embedder: Embedder | None = None,
) -> ReindexResult:
    """`plan_and_apply` for one specialist of a validated `pipelines.yaml`.

    Args:
        config: The validated configuration.
        specialist: Specialist name.
        budget: `smoke` caps documents per source at `smoke.max_documents` and the build's wall time at
            `smoke.max_wall_seconds`; `full` documents at `index.max_documents` (null = no cap).
        show_progress: Show a progress bar.
        retry: Retries for reaching sources.
        embedder: The model to embed with: the champion embedder, or a candidate whose index is built to judge it
            (default: `project.embedding`). A model other than the live version's builds the new version from empty.
    """
    settings = config.specialist(specialist)
    if embedder is None:
        embedder = Embedder.load(config.project.embedding, config.project.threads, root=config.root)
    backend = open_backend(config.project.index, config.state_dir, specialist, dimension=embedder.dimension)
    plan = plan_reindex(settings, budget)
    cap = plan.max_documents
    return plan_and_apply(
        specialist,
        settings.sources,
        settings.chunking,
        root=config.root,
        state_dir=config.state_dir,
        embedder=embedder,
        backend=backend,
        max_documents=cap,
        retry=retry,
        show_progress=show_progress,
        priority_ids=smoke_priority_ids(config, settings, plan) if cap else (),
        max_wall_seconds=plan.max_wall_seconds,
        engine=config.project.engine,
        write_batch_size=config.project.engine.shard_chunks,
        ranking=settings.index.ranking.model_dump() if settings.index.ranking else None,
    )


def smoke_priority_ids(config: CadreConfig, settings: Specialist, plan: ReindexPlan) -> list[str]:
    """The ids a capped index reads first: the cases the plan names (`ReindexPlan.first_cases`), then those of the
    records the refresh reads (`ReindexPlan.refresh_cases`, from its own files and in its order), then the rest of
    the test and dev cases'."""
    from cadre.tuning.training_data import read_first, read_records, training_sources

    suite = config.resolve(settings.evaluation.suite)
    refresh: list[Mapping[str, Any]] = []
    if plan.refresh_cases:
        tuning, program = settings.tuning, settings.program
        files = training_sources(suite, [config.resolve(f) for f in tuning.data], tuning.from_eval_train)
        records, _ = read_records(path for path in files if Path(path).exists())
        refresh = read_first(
            [record.values for record in records],
            [item.name for item in program.inputs],
            [item.name for item in program.outputs],
            tuning.seed,
            plan.refresh_cases,
        )
    return suite_relevant_ids(suite, first=plan.first_cases, then=refresh)


def suite_relevant_ids(
    suite_dir: Path,
    splits: Sequence[str] = ("test", "dev"),
    first: Mapping[str, int] | None = None,
    then: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """The document ids the suite's cases need (test first), so a capped index can still answer them.

    `first` names how many leading cases of a split (of `splits` or another, e.g. train) come before every other
    case (`ReindexPlan.first_cases`): the ids of those cases, then those of the cases `then`, then the rest of the
    test cases', then the rest of the dev cases'."""
    from cadre.evaluation.results import load_cases

    first = first or {}
    cases = {  # a split only named in `first` is read only that far
        split: load_cases(suite_dir, split, None if split in splits else first[split])
        for split in dict.fromkeys([*splits, *first])
        if (Path(suite_dir) / f"{split}.jsonl").exists()
    }
    ordered = [case for split in first if split in cases for case in cases[split][: first[split]]]
    ordered += then
    ordered += [case for split in splits if split in cases for case in cases[split]]
    ids: dict[str, None] = {}
    for case in ordered:
        ids.update(dict.fromkeys(case.get("relevant_ids", [])))
    return list(ids)
