"""The contract every index backend keeps, run against each real backend.

LanceDB always runs (twice: flat search, and with the ANN index built from the first row). Weaviate
runs only where a server is reachable at `WEAVIATE_URL`; otherwise it is skipped with that reason.
Chunks are real chunks of a small corpus, embedded with the real packaged MiniLM model.

Run: `python -m pytest -m integration tests/integration/test_index_contract.py`
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from cadre.config.knowledge import ChunkingSettings
from cadre.config.project import EmbeddingSettings, ThreadSettings
from cadre.knowledge.chunking import Chunk, Chunker, load_tokenizer
from cadre.knowledge.embedding import Embedder
from cadre.knowledge.index import IndexBackend, IndexBackendError, IndexVersion, VersionNotFound
from cadre.knowledge.sources import Document, content_hash

pytestmark = pytest.mark.integration

WEAVIATE_URL = os.environ.get("WEAVIATE_URL")

TOPICS = {
    "A01.02": (
        "Typhoid fever with heart involvement",
        "Typhoid endocarditis. Typhoid myocarditis.",
        {"chapter": "01", "billable": True},
    ),
    "K35.20": (
        "Acute appendicitis with generalized peritonitis",
        "Appendicitis with perforation and diffuse peritonitis.",
        {"chapter": "11", "billable": True},
    ),
    "E11.21": (
        "Type 2 diabetes mellitus with diabetic nephropathy",
        "Kimmelstiel-Wilson disease in type 2 diabetes.",
        {"chapter": "04", "billable": True},
    ),
    "J18.9": (
        "Pneumonia, unspecified organism",
        "Lung infection without a named organism.",
        {"chapter": "10", "billable": True},
    ),
    "S72.0": (
        "Fracture of head and neck of femur",
        "Hip fracture. Broken femoral neck after a fall.",
        {"chapter": "19", "billable": False},
    ),
    "I21.9": (
        "Acute myocardial infarction, unspecified",
        "Heart attack. Myocardial infarction, acute.",
        {"chapter": "09", "billable": True},
    ),
    "F32.9": (
        "Major depressive disorder, single episode",
        "Depression NOS. Depressive episode.",
        {"chapter": "05", "billable": True, "tags": ["mental", "mood"]},
    ),
    "Z00.00": (
        "General adult medical examination",
        "Routine check-up without abnormal findings.",
        {"chapter": "21", "billable": True, "tags": ["encounter"]},
    ),
}
LONG = " ".join(f"Paragraph {n} on xylophonist occupational injuries of the wrist and tendons." for n in range(20))


def _corpus() -> list[Document]:
    documents = []
    for code, (title, text, metadata) in TOPICS.items():
        documents.append(
            Document(f"icd:{code}", "icd", code, title, text, metadata, content_hash(title, text, metadata))
        )
    metadata = {"chapter": "19", "billable": False}
    documents.append(
        Document(
            "notes:long",
            "notes",
            "long",
            "Occupational injuries",
            LONG,
            metadata,
            content_hash("Occupational injuries", LONG, metadata),
        )
    )
    return documents


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load(EmbeddingSettings(batch_size=32), ThreadSettings(embedding=1))


@pytest.fixture(scope="module")
def corpus(embedder: Embedder) -> tuple[list[Chunk], np.ndarray]:
    chunker = Chunker(load_tokenizer(embedder.model_dir), ChunkingSettings(max_tokens=32, overlap_tokens=4))
    chunks = [chunk for chunks in chunker.chunk_many(_corpus()) for chunk in chunks]
    return chunks, embedder.embed([chunk.content for chunk in chunks])


BACKENDS = [
    pytest.param("lancedb", id="lancedb"),
    pytest.param("lancedb-ann", id="lancedb-ann"),
    pytest.param(
        "weaviate",
        id="weaviate",
        marks=pytest.mark.skipif(not WEAVIATE_URL, reason="WEAVIATE_URL not set: no Weaviate server to test against"),
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path, embedder: Embedder):
    if request.param == "weaviate":
        from cadre.knowledge.index.weaviate_backend import WeaviateBackend

        weaviate = WeaviateBackend(WEAVIATE_URL, specialist=f"contract-{uuid.uuid4().hex[:8]}")
        yield weaviate
        for version in weaviate.list_versions():
            weaviate.drop_version(version)
        weaviate.close()
        return
    from cadre.knowledge.index.lancedb_backend import LanceDBBackend

    yield LanceDBBackend(
        tmp_path / "lancedb", dimension=embedder.dimension, ann_min_rows=1 if request.param == "lancedb-ann" else 20_000
    )


@pytest.fixture
def filled(backend: IndexBackend, corpus) -> IndexVersion:
    chunks, vectors = corpus
    version = backend.create_version("v1")
    assert version.upsert(chunks, vectors) == len(chunks)
    version.ensure_indexes()
    return version


def search(version: IndexVersion, embedder: Embedder, query: str, k: int = 5, **options):
    return version.search(embedder.embed_query(query), query, k, **options)


def test_upsert_then_count_ids_and_states(filled: IndexVersion, corpus):
    chunks, _ = corpus
    assert filled.count() == len(chunks)
    assert filled.ids() == {chunk.id for chunk in chunks}
    states = {state.id: state for state in filled.chunk_states()}
    assert len(states) == len(chunks)
    for chunk in chunks:
        assert (states[chunk.id].doc_id, states[chunk.id].doc_hash, states[chunk.id].chunk_count) == (
            chunk.doc_id,
            chunk.doc_hash,
            chunk.chunk_count,
        )


def test_upsert_replaces_by_id(filled: IndexVersion, corpus, embedder: Embedder):
    chunks, vectors = corpus
    changed = [
        dataclasses.replace(chunk, doc_hash="new-hash", metadata={**chunk.metadata, "chapter": "99"})
        for chunk in chunks[:3]
    ]
    filled.upsert(changed, vectors[:3])
    assert filled.count() == len(chunks)
    states = {state.id: state.doc_hash for state in filled.chunk_states()}
    assert [states[chunk.id] for chunk in changed] == ["new-hash"] * 3
    hits = search(filled, embedder, chunks[0].content, k=3, filters={"chapter": "99"}, mode="vector")
    assert {hit.id for hit in hits} == {chunk.id for chunk in changed}


def test_delete_by_id_ignores_unknown_ids(filled: IndexVersion, corpus):
    chunks, _ = corpus
    gone = {chunks[0].id, chunks[-1].id}
    filled.delete(gone | {"no-such-chunk"})
    assert filled.count() == len(chunks) - 2
    assert filled.ids() == {chunk.id for chunk in chunks} - gone
    filled.delete(set())
    assert filled.count() == len(chunks) - 2


@pytest.mark.parametrize("mode", ["vector", "hybrid"])
def test_search_ranks_the_matching_chunk_first(filled: IndexVersion, embedder: Embedder, mode: str):
    hits = search(filled, embedder, "typhoid endocarditis", mode=mode)
    assert hits[0].doc_id == "icd:A01.02"
    assert hits[0].record_id == "A01.02" and hits[0].source == "icd"
    assert hits[0].title == "Typhoid fever with heart involvement"
    assert hits[0].metadata == {"chapter": "01", "billable": True}
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    assert len(hits) == 5 and len({hit.id for hit in hits}) == 5


def test_vector_score_is_cosine_similarity(filled: IndexVersion, corpus):
    chunks, vectors = corpus
    hits = filled.search(vectors[4], chunks[4].content, 3, mode="vector")
    assert hits[0].id == chunks[4].id
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[1].score == pytest.approx(
        float(vectors[4] @ vectors[[c.id for c in chunks].index(hits[1].id)]), abs=1e-4
    )


def test_hybrid_search_uses_exact_keywords(filled: IndexVersion, embedder: Embedder):
    # A made-up word has no meaning for the embedding model; BM25 finds it.
    hits = search(filled, embedder, "xylophonist", k=3, mode="hybrid")
    assert hits[0].doc_id == "notes:long"


def test_filters_on_metadata_and_chunk_fields(filled: IndexVersion, embedder: Embedder):
    for mode in ("vector", "hybrid"):
        hits = search(filled, embedder, "heart", k=20, filters={"billable": False}, mode=mode)
        assert {hit.doc_id for hit in hits} == {"icd:S72.0", "notes:long"}
        hits = search(filled, embedder, "heart", k=20, filters={"chapter": ["01", "09"]}, mode=mode)
        assert {hit.doc_id for hit in hits} == {"icd:A01.02", "icd:I21.9"}
        hits = search(filled, embedder, "heart", k=20, filters={"tags": "mood", "billable": True}, mode=mode)
        assert {hit.doc_id for hit in hits} == {"icd:F32.9"}
        hits = search(filled, embedder, "heart", k=20, filters={"source": "notes"}, mode=mode)
        assert {hit.doc_id for hit in hits} == {"notes:long"}
        hits = search(filled, embedder, "heart", k=20, filters={"record_id": "J18.9"}, mode=mode)
        assert [hit.doc_id for hit in hits] == ["icd:J18.9"]
        assert search(filled, embedder, "heart", k=20, filters={"chapter": "nope"}, mode=mode) == []


def test_k_bounds(filled: IndexVersion, embedder: Embedder, corpus):
    chunks, _ = corpus
    assert len(search(filled, embedder, "disease", k=1000, mode="vector")) == len(chunks)
    with pytest.raises(ValueError):
        search(filled, embedder, "disease", k=0)


def test_ensure_indexes_is_idempotent(filled: IndexVersion, embedder: Embedder, corpus):
    chunks, vectors = corpus
    filled.ensure_indexes()
    extra = [dataclasses.replace(chunks[0], id="extra-chunk")]
    filled.upsert(extra, vectors[:1])
    # Rows written after the indexes were built are found before the next ensure_indexes.
    assert "extra-chunk" in {hit.id for hit in filled.search(vectors[0], chunks[0].content, 3, mode="vector")}
    filled.ensure_indexes()
    assert filled.count() == len(chunks) + 1
    assert search(filled, embedder, "typhoid endocarditis", mode="hybrid")[0].doc_id == "icd:A01.02"


def test_a_copy_is_independent_of_its_source(backend: IndexBackend, filled: IndexVersion, corpus, embedder: Embedder):
    chunks, vectors = corpus
    copy = backend.create_version("v2", from_version="v1")
    assert copy.ids() == filled.ids()
    copy.delete({chunks[0].id})
    copy.upsert([dataclasses.replace(chunks[1], id="only-in-copy")], vectors[1:2])
    assert filled.ids() == {chunk.id for chunk in chunks}
    assert copy.ids() == {chunk.id for chunk in chunks} - {chunks[0].id} | {"only-in-copy"}
    copy.ensure_indexes()
    assert "icd:A01.02" not in {hit.doc_id for hit in search(copy, embedder, "typhoid endocarditis")}
    assert search(filled, embedder, "typhoid endocarditis")[0].doc_id == "icd:A01.02"
    assert search(copy, embedder, "heart attack")[0].doc_id == "icd:I21.9"
    reopened = backend.open_version("v1")
    assert reopened.count() == len(chunks)


def test_versions_are_listed_opened_and_dropped(backend: IndexBackend, filled: IndexVersion):
    backend.create_version("v2")
    assert backend.list_versions() == ["v1", "v2"]
    with pytest.raises(IndexBackendError):
        backend.create_version("v2")
    backend.drop_version("v2")
    backend.drop_version("v2")
    assert backend.list_versions() == ["v1"]
    with pytest.raises(VersionNotFound):
        backend.open_version("v2")
    with pytest.raises(VersionNotFound):
        backend.create_version("v3", from_version="v2")
    assert backend.open_version("v1").count() == filled.count()


def _inodes(table: Path) -> dict[int, int]:
    """Inode → size of every file of a LanceDB table folder."""
    return {path.stat().st_ino: path.stat().st_size for path in table.rglob("*") if path.is_file()}


def test_a_lancedb_copy_shares_its_sources_files_writes_only_the_change_and_outlives_the_source(
    tmp_path: Path, corpus, embedder: Embedder
):
    """Re-index cost follows the change: a new version links the live one's data, deletion and index files (no
    bytes), a small change adds a fragment without compacting or re-indexing the table, and dropping the source
    leaves the copy whole."""
    from cadre.knowledge.index.lancedb_backend import FOLD_SHARE, LanceDBBackend

    chunks, vectors = corpus
    backend = LanceDBBackend(tmp_path / "lancedb", dimension=embedder.dimension)
    source = backend.create_version("v1")
    source.upsert(chunks, vectors)
    source.ensure_indexes()
    v1, v2 = tmp_path / "lancedb" / "v1.lance", tmp_path / "lancedb" / "v2.lance"
    copy = backend.create_version("v2", from_version="v1")
    before = _inodes(v1)
    written = sum(size for inode, size in _inodes(v2).items() if inode not in before)
    assert written < 0.2 * sum(before.values()), f"the copy wrote {written} bytes of {sum(before.values())}"
    assert {p.stat().st_ino for p in (v1 / "data").iterdir()} == {p.stat().st_ino for p in (v2 / "data").iterdir()}

    small = max(1, int(FOLD_SHARE * len(chunks)))
    copy.upsert([dataclasses.replace(chunk, id=f"new-{i}") for i, chunk in enumerate(chunks[:small])], vectors[:small])
    copy.ensure_indexes()
    shared = {p.stat().st_ino for p in (v1 / "data").iterdir()}
    assert shared <= {p.stat().st_ino for p in (v2 / "data").iterdir()}, "a small change rewrote the table"
    assert copy.table.index_stats("content_idx").num_unindexed_rows == small  # searched flat until the next fold
    assert f"new-{small - 1}" in {hit.id for hit in search(copy, embedder, chunks[small - 1].content, k=10)}

    holder = backend.open_version("v1")  # a reader holding the source when retention drops it
    backend.drop_version("v1")
    assert backend.list_versions() == ["v2"]
    with pytest.raises(VersionNotFound):
        backend.open_version("v1")
    assert holder.count() == len(chunks), "dropping a version broke a reader that held it"
    assert search(holder, embedder, "typhoid endocarditis", mode="hybrid")[0].doc_id == "icd:A01.02"
    LanceDBBackend(tmp_path / "lancedb", drop_grace_s=0).drop_version("no-such-version")  # grace over: purged
    assert not v1.exists() and not list((tmp_path / "lancedb").glob("v1.lance*"))
    survivor = backend.open_version("v2")
    assert survivor.count() == len(chunks) + small
    assert search(survivor, embedder, "typhoid endocarditis", mode="hybrid")[0].doc_id == "icd:A01.02"

    many = len(chunks)  # past FOLD_SHARE: one optimize compacts the table and folds every new row in
    survivor.upsert([dataclasses.replace(chunk, id=f"more-{i}") for i, chunk in enumerate(chunks)], vectors)
    survivor.ensure_indexes()
    assert survivor.table.index_stats("content_idx").num_unindexed_rows == 0
    assert survivor.count() == 2 * many + small
