"""The incremental re-index engine against a real SQLite source, the real MiniLM model and LanceDB.

- a re-run without changes embeds nothing and creates no version;
- editing, adding and deleting rows changes exactly the chunks of those rows, in a new version,
  while the live version stays as it was;
- a re-index killed with SIGKILL mid-run (in a subprocess, paused between commits by the
  `CADRE_TEST_PAUSE_AFTER_WRITE_S` hook) converges when run again: exactly the expected chunk ids,
  no duplicates, none lost, and the same search results as a clean build.

Run: `python -m pytest -m integration tests/integration/test_reindex.py`
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cadre.config.knowledge import ChunkingSettings, SqlSource
from cadre.config.project import EmbeddingSettings, ThreadSettings
from cadre.knowledge.chunking import Chunker, load_tokenizer
from cadre.knowledge.embedding import Embedder
from cadre.knowledge.index import IndexBusy, IndexLayout, VersionNotFound
from cadre.knowledge.index.lancedb_backend import LanceDBBackend
from cadre.knowledge.reindex import (
    PAUSE_AT_ENV,
    PAUSE_ENV,
    IndexSearcher,
    configured_embedder_version,
    live_version,
    plan_and_apply,
    promote_version,
    prune_versions,
)
from cadre.knowledge.sources import SkipReport, load_documents
from cadre.platform.env import OFFLINE_ENV

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHUNKING = ChunkingSettings(max_tokens=48, overlap_tokens=8)
SOURCE = SqlSource(
    kind="sql",
    name="kb",
    url="sqlite:///data/kb.db",
    query="SELECT * FROM codes ORDER BY code",
    id_column="code",
    text_columns=["description"],
    title_column="title",
    metadata_columns=["chapter"],
)
SPECIALIST = "coder"
BATCH = 4

CONDITIONS = [
    "typhoid fever",
    "appendicitis",
    "pneumonia",
    "diabetes",
    "femur fracture",
    "asthma",
    "migraine",
    "gout",
    "psoriasis",
    "anemia",
    "glaucoma",
    "otitis media",
    "cystitis",
    "tonsillitis",
    "eczema",
]


def description(n: int, extra: str = "") -> str:
    condition = CONDITIONS[n % len(CONDITIONS)]
    # Every fifth row is long enough to need several chunks.
    repeat = 6 if n % 5 == 0 else 1
    return " ".join(
        f"Patients with {condition} variant {n} present with typical findings {extra}." for _ in range(repeat)
    )


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load(EmbeddingSettings(batch_size=32), ThreadSettings(embedding=1))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    with sqlite3.connect(tmp_path / "data" / "kb.db") as connection:
        connection.execute("CREATE TABLE codes (code TEXT PRIMARY KEY, title TEXT, description TEXT, chapter TEXT)")
        connection.executemany(
            "INSERT INTO codes VALUES (?, ?, ?, ?)",
            [(f"C{n:03d}", f"Code {n}", description(n), str(n % 4)) for n in range(30)],
        )
    return tmp_path


def run(project: Path, embedder: Embedder, state: str = ".cadre", **options):
    options.setdefault("write_batch_size", BATCH)
    return plan_and_apply(
        SPECIALIST,
        [SOURCE],
        options.pop("chunking", CHUNKING),
        root=project,
        state_dir=project / state,
        embedder=embedder,
        **options,
    )


def expected_chunks(project: Path, embedder: Embedder, chunking: ChunkingSettings = CHUNKING) -> dict[str, str]:
    """chunk id → doc id, computed straight from the source, without the engine."""
    documents = list(
        load_documents([SOURCE], root=project, max_document_bytes=chunking.max_document_bytes, skips=SkipReport())
    )
    chunker = Chunker(load_tokenizer(embedder.model_dir), chunking)
    return {chunk.id: chunk.doc_id for chunks in chunker.chunk_many(documents) for chunk in chunks}


def stored(project: Path, version: str, state: str = ".cadre") -> tuple[list[str], dict[str, str]]:
    """All chunk ids of a version as stored (a list: duplicates would show) and chunk id → doc hash."""
    table = LanceDBBackend(IndexLayout(project / state, SPECIALIST).lancedb_dir).open_version(version)
    states = table.chunk_states()
    return [row.id for row in states], {row.id: row.doc_hash for row in states}


def edit_source(project: Path) -> dict[str, set[str]]:
    """Edit 3 rows, change metadata of 1, add 5 (two long), delete 3; returns the doc ids per kind."""
    with sqlite3.connect(project / "data" / "kb.db") as connection:
        for n in (3, 10, 11):
            connection.execute(
                "UPDATE codes SET description = ? WHERE code = ?", (description(n, "after revision"), f"C{n:03d}")
            )
        connection.execute("UPDATE codes SET chapter = '9' WHERE code = 'C012'")
        connection.executemany(
            "INSERT INTO codes VALUES (?, ?, ?, ?)",
            [(f"C{n:03d}", f"Code {n}", description(n), str(n % 4)) for n in range(100, 105)],
        )
        connection.execute("DELETE FROM codes WHERE code IN ('C020', 'C021', 'C025')")

    def ids(numbers):
        return {f"kb:C{n:03d}" for n in numbers}

    return {
        "edited": ids([3, 10, 11]),
        "metadata": ids([12]),
        "added": ids(range(100, 105)),
        "deleted": ids([20, 21, 25]),
    }


def test_no_change_rerun_embeds_nothing(project: Path, embedder: Embedder):
    first = run(project, embedder)
    expected = expected_chunks(project, embedder)
    assert first.created_version and first.rebuilt_from_empty and first.base_version is None
    assert (first.documents_total, first.documents_added, first.chunks_total, first.chunks_embedded) == (
        30,
        30,
        len(expected),
        len(expected),
    )
    ids, _ = stored(project, first.version)
    assert sorted(ids) == sorted(expected)
    assert first.skipped == {}

    promote_version(project / ".cadre", SPECIALIST, first.version)
    again = run(project, embedder)
    assert not again.created_version and not again.changed
    assert again.version == first.version
    assert (again.chunks_embedded, again.chunks_deleted, again.documents_unchanged) == (0, 0, 30)
    assert again.corpus_fingerprint == first.corpus_fingerprint
    assert IndexLayout(project / ".cadre", SPECIALIST).complete_versions() == [first.version]


def test_sqlite_edits_adds_and_deletes_change_exactly_those_chunks(project: Path, embedder: Embedder):
    first = run(project, embedder)
    promote_version(project / ".cadre", SPECIALIST, first.version)
    before = expected_chunks(project, embedder)
    changed = edit_source(project)
    after = expected_chunks(project, embedder)

    second = run(project, embedder)
    assert second.created_version and not second.rebuilt_from_empty and second.base_version == first.version
    assert (second.documents_added, second.documents_updated, second.documents_deleted, second.documents_unchanged) == (
        5,
        4,
        3,
        23,
    )

    new_ids, new_hashes = stored(project, second.version)
    assert sorted(new_ids) == sorted(after)
    touched_docs = changed["edited"] | changed["added"] | changed["metadata"]
    # Embedded: every chunk of an added, edited or re-labelled document, nothing else.
    assert second.chunks_embedded == sum(1 for doc_id in after.values() if doc_id in touched_docs)
    assert set(after) - set(before) == {
        chunk for chunk, doc_id in after.items() if doc_id in changed["edited"] | changed["added"]
    }
    assert set(before) - set(after) == {
        chunk for chunk, doc_id in before.items() if doc_id in changed["edited"] | changed["deleted"]
    }
    assert second.chunks_deleted == len(set(before) - set(after))

    # Blue/green: the live version was only read.
    old_ids, old_hashes = stored(project, first.version)
    assert sorted(old_ids) == sorted(before)
    unchanged_chunks = [chunk for chunk, doc_id in after.items() if doc_id not in touched_docs]
    assert all(new_hashes[chunk] == old_hashes[chunk] for chunk in unchanged_chunks)

    retriever = IndexSearcher(
        SPECIALIST,
        project / ".cadre",
        LanceDBBackend(IndexLayout(project / ".cadre", SPECIALIST).lancedb_dir),
        embedder,
    )
    query = "patients with typhoid fever variant 105"
    assert "kb:C100" not in {hit.doc_id for hit in retriever.search(query, k=3)}  # live: not there yet
    assert retriever.search("otitis media variant 101", k=1, version=second.version)[0].doc_id == "kb:C101"
    assert retriever.search("findings", k=50, filters={"chapter": "9"}, version=second.version)[0].doc_id == "kb:C012"
    promote_version(project / ".cadre", SPECIALIST, second.version)
    assert retriever.search("otitis media variant 101", k=1)[0].doc_id == "kb:C101"
    assert run(project, embedder).chunks_embedded == 0


def test_chunking_change_rebuilds_from_empty(project: Path, embedder: Embedder):
    first = run(project, embedder)
    promote_version(project / ".cadre", SPECIALIST, first.version)
    smaller = ChunkingSettings(max_tokens=32, overlap_tokens=4)
    rebuilt = run(project, embedder, chunking=smaller)
    expected = expected_chunks(project, embedder, smaller)
    assert rebuilt.created_version and rebuilt.rebuilt_from_empty
    assert rebuilt.chunks_embedded == len(expected) and rebuilt.chunks_deleted == 0
    assert sorted(stored(project, rebuilt.version)[0]) == sorted(expected)


def test_smoke_cap_loads_only_max_documents(project: Path, embedder: Embedder):
    capped = run(project, embedder, max_documents=7)
    assert capped.documents_total == 7
    assert {doc_id for doc_id in stored(project, capped.version)[1]} <= set(expected_chunks(project, embedder))


def test_search_needs_a_live_version(project: Path, embedder: Embedder):
    retriever = IndexSearcher(
        SPECIALIST,
        project / ".cadre",
        LanceDBBackend(IndexLayout(project / ".cadre", SPECIALIST).lancedb_dir),
        embedder,
    )
    with pytest.raises(VersionNotFound, match="no index version"):
        retriever.search("anything")
    with pytest.raises(ValueError, match="not complete"):
        promote_version(project / ".cadre", SPECIALIST, "v_missing")


def test_prune_keeps_live_rollback_target_and_retention(project: Path, embedder: Embedder):
    state = project / ".cadre"
    versions = []
    for n in range(4):
        with sqlite3.connect(project / "data" / "kb.db") as connection:
            connection.execute(
                "UPDATE codes SET description = ? WHERE code = 'C001'", (f"Revision {n} of the first code",)
            )
        versions.append(run(project, embedder).version)
        if n < 2:
            promote_version(state, SPECIALIST, versions[-1])
    backend = LanceDBBackend(IndexLayout(state, SPECIALIST).lancedb_dir)
    result = prune_versions(state, SPECIALIST, retention=1, backend=backend)
    # live = versions[1], rollback target = versions[0], newest other = versions[3]; versions[2] goes.
    assert result.kept == [versions[1], versions[0], versions[3]]
    assert result.dropped == [versions[2]]
    assert backend.list_versions() == sorted([versions[0], versions[1], versions[3]])
    assert live_version(state, SPECIALIST) == versions[1]

    # A refreshed embedder's version live: the configured model's newest version is the retrieval baseline, kept
    # beyond `retention` (here 0) so the optimize flow can still score retrieval before the refresh.
    layout = IndexLayout(state, SPECIALIST)
    configured = embedder.model_ref
    assert configured_embedder_version(state, SPECIALIST, configured) is None  # the live version is configured's
    for version in (versions[0], versions[1]):
        manifest = layout.read_manifest(version)
        manifest.embedder = {**manifest.embedder, "model": "/models/refreshed"}
        layout.write_manifest(manifest)
    assert layout.embedded_by(versions[1]) == "/models/refreshed"
    assert configured_embedder_version(state, SPECIALIST, configured) == versions[3]
    kept = prune_versions(state, SPECIALIST, retention=0, backend=backend, configured_model=configured)
    assert kept.dropped == [] and kept.kept == [versions[1], versions[0], versions[3]]
    assert prune_versions(state, SPECIALIST, retention=0, backend=backend).dropped == [versions[3]]  # without it


# --- crash convergence ------------------------------------------------------------------------

RUNNER = textwrap.dedent("""
    import json, logging, sys
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    from cadre.config.knowledge import ChunkingSettings, SqlSource
    from cadre.config.project import EmbeddingSettings, ThreadSettings
    from cadre.knowledge.embedding import Embedder
    from cadre.knowledge.reindex import plan_and_apply
    args = json.loads(sys.argv[1])
    embedder = Embedder.load(EmbeddingSettings(batch_size=32), ThreadSettings(embedding=1))
    plan_and_apply(args["specialist"], [SqlSource(**args["source"])], ChunkingSettings(**args["chunking"]),
                   root=Path(args["root"]), state_dir=Path(args["state_dir"]), embedder=embedder, write_batch_size=args["batch"])
""")


def start_and_kill(project: Path, checkpoint: str, embedder: Embedder) -> None:
    """Start a real re-index in a subprocess, SIGKILL it while it pauses at `checkpoint`."""
    script = project / "runner.py"
    script.write_text(RUNNER)
    args = {
        "specialist": SPECIALIST,
        "source": SOURCE.model_dump(),
        "chunking": CHUNKING.model_dump(),
        "root": str(project),
        "state_dir": str(project / ".cadre"),
        "batch": BATCH,
    }
    env = {**os.environ, **OFFLINE_ENV, PAUSE_ENV: "120", PAUSE_AT_ENV: checkpoint, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(script), json.dumps(args)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    seen = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line and process.poll() is not None:
                pytest.fail(
                    f"re-index exited with {process.returncode} before checkpoint {checkpoint!r}:\n{''.join(seen[-30:])}"
                )
            seen.append(line)
            if line.strip() == f"reindex checkpoint: {checkpoint}":
                # The paused run holds the lock: a second run is refused, not interleaved.
                with pytest.raises(IndexBusy):
                    run(project, embedder)
                os.kill(process.pid, signal.SIGKILL)
                assert process.wait(timeout=30) == -signal.SIGKILL
                return
        pytest.fail(f"checkpoint {checkpoint!r} not reached:\n{''.join(seen[-30:])}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


@pytest.mark.parametrize(
    ("scenario", "checkpoint", "committed_before_kill"),
    [
        ("first build", "upsert 3", 3 * BATCH),
        ("update", "upsert 2", 2 * BATCH),
        ("update", "delete 1", None),
    ],
)
def test_killed_reindex_converges_when_run_again(
    project: Path, embedder: Embedder, scenario: str, checkpoint: str, committed_before_kill: int | None
):
    state = project / ".cadre"
    layout = IndexLayout(state, SPECIALIST)
    if scenario == "update":
        promote_version(state, SPECIALIST, run(project, embedder).version)
        edit_source(project)
    expected = expected_chunks(project, embedder)

    start_and_kill(project, checkpoint, embedder)
    (marker,) = layout.builds()
    assert marker.phase == "building" and not layout.is_complete(marker.version)
    partial_ids, _ = stored(project, marker.version)
    if committed_before_kill is not None:
        assert partial_ids and sorted(partial_ids) != sorted(expected)
    else:  # killed after the last write: all chunks are there, the version is just not finished
        assert sorted(partial_ids) == sorted(expected)

    resumed = run(project, embedder)
    assert resumed.resumed and resumed.created_version and resumed.version == marker.version
    ids, hashes = stored(project, resumed.version)
    assert len(ids) == len(set(ids)), "duplicate chunk ids"
    assert set(ids) == set(expected), "chunks lost or left over"
    documents = {
        d.id: d.content_hash
        for d in load_documents([SOURCE], root=project, max_document_bytes=10**6, skips=SkipReport())
    }
    assert all(hashes[chunk] == documents[doc_id] for chunk, doc_id in expected.items())
    assert layout.builds() == [] and layout.is_complete(resumed.version)

    # The work committed before the kill was kept, not redone.
    clean = run(project, embedder, state=".clean")
    if committed_before_kill is not None:
        changed_chunks = (
            clean.chunks_embedded if scenario == "first build" else resumed.chunks_embedded + committed_before_kill
        )
        assert resumed.chunks_embedded == changed_chunks - committed_before_kill
    else:
        assert resumed.chunks_embedded == 0

    # Same content as a build that was never interrupted, down to the search results.
    assert sorted(stored(project, clean.version, ".clean")[0]) == sorted(ids)
    for query in ("typhoid fever variant 3 after revision", "otitis media variant 101", "gout"):
        resumed_hits = IndexSearcher(SPECIALIST, state, LanceDBBackend(layout.lancedb_dir), embedder).search(
            query, k=5, version=resumed.version, mode="vector"
        )
        clean_hits = IndexSearcher(
            SPECIALIST,
            project / ".clean",
            LanceDBBackend(IndexLayout(project / ".clean", SPECIALIST).lancedb_dir),
            embedder,
        ).search(query, k=5, version=clean.version, mode="vector")
        assert [hit.id for hit in resumed_hits] == [hit.id for hit in clean_hits]
        assert [hit.score for hit in resumed_hits] == pytest.approx([hit.score for hit in clean_hits], abs=1e-5)
