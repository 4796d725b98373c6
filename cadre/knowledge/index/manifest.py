"""Where a specialist's index state lives, and the manifest written beside each index version.

    <state_dir>/index/
        live.json                         which version is live, per specialist (`cadre.knowledge.index.live`)
        <specialist>/
            lancedb/<version>.lance       the versions themselves (LanceDB backend)
            manifests/<version>.json      written once the version is complete (whole, or as a difference)
            builds/<version>.json         marker of a version under construction (removed when complete)
            rankers/<version>.json        its learned ranker, where one was fitted (`cadre.knowledge.ranker`)
            reindex.lock                  held by the one re-index run of this specialist

A manifest maps every document of a version to its content hash and its chunk ids, with the
identity of the index (embedding model, chunking) and a fingerprint of the corpus. It is written
*after* every chunk of the version is stored, so a version with a manifest is complete; the manifest
of a complete version is exactly what its table holds, and a later run reads it instead of scanning
the table.

A version built from another one whose manifest is here stores only its difference from it
(`documents_delta`: the documents added or changed, the ids deleted), so a 1 % change writes about 1 % of
a manifest, as the table does. A chain of differences is cut at `MAX_DELTA_CHAIN` versions, or when the
difference is past `MAX_DELTA_SHARE` of the documents: that version's manifest is written whole.
`read_manifest` always returns the whole content; `manifest_json` gives it as one self-contained file (the
registry and the edge bundle ship that). Removing a manifest (`remove_manifest`, pruning) first writes
whole every manifest that is a difference from it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cadre.knowledge.index.live import LivePointers, read_json, write_json_atomic

MANIFEST_FORMAT = 1
MAX_DELTA_CHAIN = 8
"""Most manifests read to rebuild one version's content (the version's own, and 7 bases)."""
MAX_DELTA_SHARE = 0.25
"""A difference touching more than this share of the documents is written as a whole manifest."""


class ManifestError(RuntimeError):
    """A manifest cannot be read whole: the version it is a difference from is gone."""


def utc_now() -> str:
    """Current time, ISO 8601, UTC, seconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def corpus_fingerprint(documents: Iterable[tuple[str, str]]) -> str:
    """sha256 over sorted `(doc_id, content_hash)` pairs: equal exactly when the corpora are equal."""
    digest = hashlib.sha256()
    for doc_id, content_hash in sorted(documents):
        digest.update(f"{doc_id}\x1f{content_hash}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class IndexKey:
    """What makes vectors comparable across versions: the same model and the same chunking.

    A run whose key differs from the live version's builds its new version from empty.

    Attributes:
        embedding_model: Model reference from `pipelines.yaml`.
        embedding_fingerprint: Hash of the model's files (`cadre.knowledge.embedding.model_fingerprint`).
        dimension: Vector length.
        max_tokens: Chunk size.
        overlap_tokens: Chunk overlap.
        embedding_precision: `fp32` (torch and ONNX fp32 give the same vectors) or `int8` (the `onnx-int8` runtime's
            vectors differ a little): a change of precision re-embeds from empty instead of mixing the two.
    """

    embedding_model: str
    embedding_fingerprint: str
    dimension: int
    max_tokens: int
    overlap_tokens: int
    embedding_precision: str = "fp32"

    @property
    def digest(self) -> str:
        """Short hash of the whole key."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        key = {
            "embedding_model": self.embedding_model,
            "embedding_fingerprint": self.embedding_fingerprint,
            "dimension": self.dimension,
            "max_tokens": self.max_tokens,
            "overlap_tokens": self.overlap_tokens,
        }
        if self.embedding_precision != "fp32":  # absent for fp32: keys (and digests) written before it stay equal
            key["embedding_precision"] = self.embedding_precision
        return key

    @classmethod
    def from_dict(cls, content: dict[str, Any]) -> IndexKey:
        return cls(
            **{
                name: content[name]
                for name in ("embedding_model", "embedding_fingerprint", "dimension", "max_tokens", "overlap_tokens")
            },
            embedding_precision=content.get("embedding_precision", "fp32"),
        )


@dataclass
class Manifest:
    """The content of one complete index version.

    Attributes:
        specialist: Whose index.
        version: Version name.
        base_version: The version it was built from (None: built from empty).
        index_key: Model and chunking identity.
        documents: doc_id → (content hash, chunk ids in order).
        created_at: When the build started.
        completed_at: When the manifest was written.
        corpus_fingerprint: `corpus_fingerprint` of the documents.
        stats: Free-form numbers of the run that built it.
        embedder: The model that embedded it (`Embedder.record()`: model, path, fingerprint, and the `embedder`
            registry version, set when a fine-tuned embedder is promoted); every query of this version is
            embedded with it. Empty for versions written before it was recorded (their `index_key` names it).
        ranking: The learned ranking declared when the version was built (`index.ranker` under
            `search_mode: learned`), None for the fused ranking: a re-index whose declared ranking differs builds
            a new version although no document changed, so that its ranker is fitted and gated.
    """

    specialist: str
    version: str
    base_version: str | None
    index_key: IndexKey
    documents: dict[str, tuple[str, list[str]]]
    created_at: str
    completed_at: str = ""
    corpus_fingerprint: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    embedder: dict[str, str] = field(default_factory=dict)
    ranking: dict[str, Any] | None = None

    @property
    def chunk_count(self) -> int:
        return sum(len(chunk_ids) for _, chunk_ids in self.documents.values())

    def difference(self, base: Manifest) -> ManifestDelta:
        """What this manifest adds, changes and deletes against `base` (the manifest of `base_version`)."""
        return ManifestDelta(
            base=base.version,
            changed={doc_id: entry for doc_id, entry in self.documents.items() if base.documents.get(doc_id) != entry},
            deleted=sorted(doc_id for doc_id in base.documents if doc_id not in self.documents),
        )

    def to_json(self, delta: ManifestDelta | None = None) -> dict[str, Any]:
        """The manifest as JSON: whole, or as `delta`, its difference from its base version (`difference`)."""
        header = {
            "format": MANIFEST_FORMAT,
            "specialist": self.specialist,
            "version": self.version,
            "base_version": self.base_version,
            "index_key": {**self.index_key.as_dict(), "digest": self.index_key.digest},
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "corpus_fingerprint": self.corpus_fingerprint,
            "counts": {"documents": len(self.documents), "chunks": self.chunk_count},
            "stats": self.stats,
            "embedder": self.embedder,
            "ranking": self.ranking,
        }
        if delta is None:
            return header | {"documents": _entries(self.documents)}
        return header | {
            "documents_delta": {"base": delta.base, "changed": _entries(delta.changed), "deleted": delta.deleted}
        }

    @classmethod
    def from_json(cls, content: dict[str, Any], base: Manifest | None = None) -> Manifest:
        """A manifest from `to_json`'s output; a difference needs `base`, the manifest it is a difference from."""
        if content.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {content.get('format')!r}")
        delta = content.get("documents_delta")
        if delta is None:
            documents = {doc_id: (entry[0], list(entry[1])) for doc_id, entry in content["documents"].items()}
        else:
            if base is None or base.version != delta["base"]:
                raise ValueError(f"the manifest of {content['version']} needs the manifest of {delta['base']}")
            documents = dict(base.documents)
            for doc_id in delta["deleted"]:
                documents.pop(doc_id, None)
            documents.update({doc_id: (entry[0], list(entry[1])) for doc_id, entry in delta["changed"].items()})
        return cls(
            specialist=content["specialist"],
            version=content["version"],
            base_version=content.get("base_version"),
            index_key=IndexKey.from_dict(content["index_key"]),
            documents=documents,
            created_at=content.get("created_at", ""),
            completed_at=content.get("completed_at", ""),
            corpus_fingerprint=content.get("corpus_fingerprint", ""),
            stats=content.get("stats", {}),
            embedder=content.get("embedder", {}),
            ranking=content.get("ranking"),
        )


@dataclass(frozen=True)
class ManifestDelta:
    """A manifest's documents as a difference from its base version's: added or changed entries, deleted ids."""

    base: str
    changed: dict[str, tuple[str, list[str]]]
    deleted: list[str]

    @property
    def size(self) -> int:
        return len(self.changed) + len(self.deleted)


def _entries(documents: dict[str, tuple[str, list[str]]]) -> dict[str, list]:
    return {doc_id: [content_hash, chunk_ids] for doc_id, (content_hash, chunk_ids) in sorted(documents.items())}


@dataclass(frozen=True)
class BuildMarker:
    """A version under construction.

    Attributes:
        version: Its name.
        base_version: The live version it started from (None: from empty).
        index_key_digest: `IndexKey.digest` of the run that started it.
        phase: `creating` until the version exists in the backend, then `building`.
        started_at: When the build started.
    """

    version: str
    base_version: str | None
    index_key_digest: str
    phase: str
    started_at: str


class IndexLayout:
    """Paths and small state files of one specialist's index under the state dir.

    Args:
        state_dir: The project's state dir.
        specialist: Specialist name.
    """

    def __init__(self, state_dir: Path, specialist: str):
        self.state_dir = Path(state_dir)
        self.specialist = specialist
        self.index_dir = self.state_dir / "index"
        self.root = self.index_dir / specialist
        self.lancedb_dir = self.root / "lancedb"
        self.manifests_dir = self.root / "manifests"
        self.builds_dir = self.root / "builds"
        self.embedders_dir = self.root / "embedders"
        self.rankers_dir = self.root / "rankers"
        self.pointers = LivePointers(self.index_dir)

    def manifest_path(self, version: str) -> Path:
        return self.manifests_dir / f"{version}.json"

    def ranker_path(self, version: str) -> Path:
        """The version's learned ranker (`cadre.knowledge.ranker`), when one was fitted for it."""
        return self.rankers_dir / f"{version}.json"

    def shipped_embedder(self, fingerprint: str) -> Path:
        """Where a version installed from the registry keeps the fine-tuned embedder that embedded it."""
        return self.embedders_dir / fingerprint

    def embedding_model(self, key: IndexKey) -> str:
        """The model that embeds a version's queries: the embedder it brought from the registry when it was installed
        here (the folder the key records is the builder's, on another machine), else the one the key records."""
        shipped = self.shipped_embedder(key.embedding_fingerprint)
        return str(shipped) if shipped.is_dir() else key.embedding_model

    def read_manifest(self, version: str) -> Manifest | None:
        """The whole manifest of a complete version (a difference is applied to its bases); None if incomplete.

        Raises:
            ManifestError: it is a difference from a version whose manifest is gone.
        """
        return self._read(version)[0]

    def _read(self, version: str) -> tuple[Manifest | None, int]:
        """The manifest and how many manifest files were read to rebuild it."""
        content = read_json(self.manifest_path(version))
        if not content:
            return None, 0
        delta = content.get("documents_delta")
        if delta is None:
            return Manifest.from_json(content), 1
        base, depth = self._read(delta["base"])
        if base is None:
            raise ManifestError(
                f"the manifest of index version {version} of {self.specialist} is a difference from {delta['base']}, "
                f"whose manifest is gone ({self.manifest_path(delta['base'])}); re-index to build a new version"
            )
        return Manifest.from_json(content, base), depth + 1

    def write_manifest(self, manifest: Manifest) -> Path:
        """Write a complete version's manifest: as its difference from its base version when that is small and the
        chain of differences short, else whole."""
        delta = None
        base, depth = self._read(manifest.base_version) if manifest.base_version else (None, 0)
        if base is not None and depth < MAX_DELTA_CHAIN:
            delta = manifest.difference(base)
            if delta.size > MAX_DELTA_SHARE * max(1, len(manifest.documents)):
                delta = None
        path = self.manifest_path(manifest.version)
        write_json_atomic(path, manifest.to_json(delta))
        return path

    def manifest_json(self, version: str) -> dict[str, Any]:
        """A complete version's manifest as one whole JSON document (to ship it without its bases).

        Raises:
            ValueError: the version is not complete.
        """
        manifest = self.read_manifest(version)
        if manifest is None:
            raise ValueError(f"index version {version!r} of {self.specialist!r} is not complete")
        return manifest.to_json()

    def record_embedder_version(self, version: str, registry_version: str) -> None:
        """Note on a complete version's manifest the `embedder` registry version that embedded it (after promotion).

        Raises:
            ValueError: The version is not complete.
        """
        manifest = self.read_manifest(version)
        if manifest is None:
            raise ValueError(f"index version {version!r} of {self.specialist!r} is not complete")
        manifest.embedder = {**manifest.embedder, "registry_version": registry_version}
        self.write_manifest(manifest)

    def embedded_by(self, version: str) -> str | None:
        """The model reference that embedded a complete version (its manifest's `embedder.model`; None where the
        manifest records none: such a version was embedded by the configured model)."""
        content = read_json(self.manifest_path(version)) or {}
        return (content.get("embedder") or {}).get("model") or None

    def complete_versions(self) -> list[str]:
        """Versions with a manifest, sorted by name (names start with their UTC creation time)."""
        return sorted(path.stem for path in self.manifests_dir.glob("*.json")) if self.manifests_dir.is_dir() else []

    def is_complete(self, version: str) -> bool:
        return self.manifest_path(version).is_file()

    def builds(self) -> list[BuildMarker]:
        """Markers of versions under construction, oldest first."""
        if not self.builds_dir.is_dir():
            return []
        markers = []
        for path in sorted(self.builds_dir.glob("*.json")):
            content = read_json(path)
            if content:
                markers.append(BuildMarker(**content))
        return markers

    def write_build(self, marker: BuildMarker) -> None:
        write_json_atomic(self.builds_dir / f"{marker.version}.json", marker.__dict__)

    def remove_build(self, version: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.builds_dir / f"{version}.json")

    def remove_manifest(self, version: str) -> None:
        """Remove a version's manifest; every manifest that is a difference from it is written whole first."""
        for other in self.complete_versions():
            content = read_json(self.manifest_path(other)) if other != version else None
            if content and (content.get("documents_delta") or {}).get("base") == version:
                write_json_atomic(self.manifest_path(other), self.manifest_json(other))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.manifest_path(version))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ranker_path(version))

    @contextlib.contextmanager
    def run_lock(self) -> Iterator[None]:
        """Exclusive lock of this specialist's index for one re-index run (released if the process dies).

        Raises:
            IndexBusy: Another run holds it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "reindex.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise IndexBusy(
                    f"another re-index of {self.specialist!r} is running (lock {self.root / 'reindex.lock'})"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class IndexBusy(RuntimeError):
    """Another re-index run of the same specialist holds the lock."""
