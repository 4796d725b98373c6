"""The server index: Weaviate through `weaviate-client` v4, one collection per index version.

Collections are named `Cadre_<specialist>__<version>` (dashes of the specialist become `_`).
Objects carry their chunk id as a property and a uuid5 of it as their Weaviate id
(`generate_uuid5`), so writing a chunk twice replaces it. Vectors are provided by Cadre (no server
vectorizer), indexed with HNSW, cosine distance. Hybrid search fuses BM25 over `content` with the
vector search by ranks (`HybridFusion.RANKED`, the same reciprocal-rank idea as LanceDB's RRF).

Writes use dynamic batching; any `failed_objects` after a batch raise `IndexBackendError` (a batch is
not atomic in Weaviate, but each object is, and the re-index engine's convergence works per chunk).
Weaviate has no collection copy: `create_version(from_version=...)` streams the source collection's
objects with their vectors into the new one.

The server is found at `WEAVIATE_URL` (or `project.index.weaviate_url`); gRPC at the same host on
`WEAVIATE_GRPC_PORT` (default 50051). Weaviate keeps its indexes current as objects arrive, so
`ensure_indexes` has nothing to build.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Self
from urllib.parse import urlparse

import numpy as np

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

COLLECTION_PREFIX = "Cadre"
_DELETE_BATCH = 1000
_VALID_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")
_PROPERTIES_RETURNED = ["chunk_id", "doc_id", "record_id", "source", "chunk_index", "title", "text", "metadata_json"]


def _properties() -> list[Any]:
    from weaviate.classes.config import DataType, Property, Tokenization

    def exact(name: str) -> Property:
        return Property(
            name=name,
            data_type=DataType.TEXT,
            tokenization=Tokenization.FIELD,
            index_searchable=False,
            index_filterable=True,
        )

    def stored(name: str, data_type: Any = DataType.TEXT) -> Property:
        return Property(
            name=name,
            data_type=data_type,
            index_searchable=False if data_type == DataType.TEXT else None,
            index_filterable=False,
        )

    return [
        exact("chunk_id"),
        exact("doc_id"),
        exact("record_id"),
        exact("source"),
        exact("doc_hash"),
        stored("chunk_index", DataType.INT),
        stored("chunk_count", DataType.INT),
        stored("title"),
        stored("text"),
        Property(
            name="content",
            data_type=DataType.TEXT,
            tokenization=Tokenization.WORD,
            index_searchable=True,
            index_filterable=False,
        ),
        stored("metadata_json"),
        Property(
            name="labels",
            data_type=DataType.TEXT_ARRAY,
            tokenization=Tokenization.FIELD,
            index_searchable=False,
            index_filterable=True,
        ),
    ]


def _filters(filters: Mapping[str, Any] | None) -> Any:
    from weaviate.classes.query import Filter

    parsed = parse_filters(filters)
    clauses = [Filter.by_property(name).contains_any(values) for name, values in parsed.fields.items()]
    clauses += [Filter.by_property("labels").contains_any(group) for group in parsed.label_groups]
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else Filter.all_of(clauses)


class WeaviateVersion:
    """One index version: a Weaviate collection.

    Args:
        collection: The client's collection handle.
        name: Version name.
    """

    def __init__(self, collection: Any, name: str):
        self.collection = collection
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def upsert(self, chunks: Sequence[Chunk], vectors: np.ndarray) -> int:
        """Write chunks with their vectors (replacing objects with the same chunk id)."""
        from weaviate.util import generate_uuid5

        if not chunks:
            return 0
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape[0] != len(chunks):
            raise IndexBackendError(f"{len(chunks)} chunks but {vectors.shape[0]} vectors")
        with self.collection.batch.dynamic() as batch:
            for chunk, vector in zip(chunks, vectors):
                batch.add_object(
                    properties={
                        "chunk_id": chunk.id,
                        "doc_id": chunk.doc_id,
                        "record_id": chunk.record_id,
                        "source": chunk.source,
                        "doc_hash": chunk.doc_hash,
                        "chunk_index": chunk.chunk_index,
                        "chunk_count": chunk.chunk_count,
                        "title": chunk.title,
                        "text": chunk.text,
                        "content": chunk.content,
                        "metadata_json": json.dumps(chunk.metadata, ensure_ascii=False, sort_keys=True),
                        "labels": metadata_labels(chunk.metadata),
                    },
                    uuid=generate_uuid5(chunk.id),
                    vector=vector.tolist(),
                )
        failed = self.collection.batch.failed_objects
        if failed:
            raise IndexBackendError(
                f"weaviate rejected {len(failed)} of {len(chunks)} chunks in {self._name}; first: {failed[0].message}"
            )
        return len(chunks)

    def delete(self, ids: Collection[str]) -> int:
        """Delete chunks by id, up to 1000 per request."""
        from weaviate.classes.query import Filter
        from weaviate.util import generate_uuid5

        ordered = sorted(ids)
        for start in range(0, len(ordered), _DELETE_BATCH):
            uuids = [generate_uuid5(chunk_id) for chunk_id in ordered[start : start + _DELETE_BATCH]]
            result = self.collection.data.delete_many(where=Filter.by_id().contains_any(uuids))
            if result.failed:
                raise IndexBackendError(f"weaviate failed to delete {result.failed} chunks from {self._name}")
        return len(ordered)

    def _iterate(self, properties: list[str], include_vector: bool = False) -> Any:
        return self.collection.iterator(include_vector=include_vector, return_properties=properties)

    def ids(self) -> set[str]:
        return {item.properties["chunk_id"] for item in self._iterate(["chunk_id"])}

    def chunk_states(self) -> list[ChunkState]:
        return [
            ChunkState(
                item.properties["chunk_id"],
                item.properties["doc_id"],
                item.properties["doc_hash"],
                int(item.properties["chunk_count"]),
            )
            for item in self._iterate(["chunk_id", "doc_id", "doc_hash", "chunk_count"])
        ]

    def count(self) -> int:
        return int(self.collection.aggregate.over_all(total_count=True).total_count or 0)

    def rankings(
        self, query_vector: np.ndarray, query_text: str, depth: int, filters: Mapping[str, Any] | None = None
    ) -> tuple[list[SearchHit], list[SearchHit]]:
        """Not offered: Weaviate fuses its rankings on the server (`cadre validate` refuses `search_mode: learned`
        with this backend)."""
        raise IndexBackendError("search_mode: learned needs the LanceDB backend; Weaviate fuses its rankings itself")

    def search(
        self,
        query_vector: np.ndarray,
        query_text: str,
        k: int,
        filters: Mapping[str, Any] | None = None,
        mode: SearchMode = "vector",
    ) -> list[SearchHit]:
        """The `k` best chunks: cosine similarity (vector) or rank fusion of BM25 and vector (hybrid)."""
        from weaviate.classes.query import HybridFusion, MetadataQuery

        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if mode not in ("vector", "hybrid"):
            raise ValueError(f"unknown search mode {mode!r}; expected 'vector' or 'hybrid'")
        vector = np.asarray(query_vector, dtype=np.float32).reshape(-1).tolist()
        where = _filters(filters)
        hybrid = mode == "hybrid" and bool(query_text.strip())
        if hybrid:
            response = self.collection.query.hybrid(
                query=query_text,
                vector=vector,
                alpha=0.5,
                query_properties=["content"],
                fusion_type=HybridFusion.RANKED,
                limit=k,
                filters=where,
                return_metadata=MetadataQuery(score=True),
                return_properties=_PROPERTIES_RETURNED,
            )
        else:
            response = self.collection.query.near_vector(
                near_vector=vector,
                limit=k,
                filters=where,
                return_metadata=MetadataQuery(distance=True),
                return_properties=_PROPERTIES_RETURNED,
            )
        hits = []
        for item in response.objects:
            properties = item.properties
            score = item.metadata.score if hybrid else 1.0 - (item.metadata.distance or 0.0)
            hits.append(
                SearchHit(
                    id=properties["chunk_id"],
                    doc_id=properties["doc_id"],
                    record_id=properties.get("record_id") or "",
                    source=properties.get("source") or "",
                    chunk_index=int(properties.get("chunk_index") or 0),
                    title=properties.get("title") or "",
                    text=properties.get("text") or "",
                    score=float(score or 0.0),
                    metadata=json.loads(properties["metadata_json"]) if properties.get("metadata_json") else {},
                )
            )
        return hits

    def ensure_indexes(self) -> None:
        """Nothing to do: Weaviate indexes (HNSW, BM25, filters) every object as it is written."""


class WeaviateBackend:
    """Index versions of one specialist as Weaviate collections.

    Args:
        url: HTTP URL of the server, e.g. http://localhost:8080.
        specialist: Specialist name (part of every collection name).
        api_key: API key, if the server wants one.
        grpc_port: gRPC port (default: `WEAVIATE_GRPC_PORT` or 50051).
    """

    def __init__(self, url: str, *, specialist: str, api_key: str | None = None, grpc_port: int | None = None):
        import weaviate
        from weaviate.classes.init import AdditionalConfig, Auth, Timeout

        parsed = urlparse(url)
        if not parsed.hostname:
            raise IndexBackendError(f"WEAVIATE_URL {url!r} has no host")
        secure = parsed.scheme == "https"
        http_port = parsed.port or (443 if secure else 8080)
        grpc = grpc_port or int(os.environ.get("WEAVIATE_GRPC_PORT", "50051"))
        try:
            self.client = weaviate.connect_to_custom(
                http_host=parsed.hostname,
                http_port=http_port,
                http_secure=secure,
                grpc_host=parsed.hostname,
                grpc_port=grpc,
                grpc_secure=secure,
                auth_credentials=Auth.api_key(api_key) if api_key else None,
                additional_config=AdditionalConfig(timeout=Timeout(init=10, query=60, insert=120)),
            )
        except Exception as error:
            raise IndexBackendError(f"cannot connect to Weaviate at {url} (gRPC port {grpc}): {error}") from error
        self.prefix = f"{COLLECTION_PREFIX}_{specialist.replace('-', '_')}__"

    def close(self) -> None:
        """Close the connection."""
        self.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def collection_name(self, version: str) -> str:
        if not _VALID_VERSION.match(version) or "__" in version:
            raise ValueError(f"invalid index version name {version!r} for Weaviate: use letters, digits and single '_'")
        return f"{self.prefix}{version}"

    def open_version(self, name: str) -> WeaviateVersion:
        collection_name = self.collection_name(name)
        if not self.client.collections.exists(collection_name):
            raise VersionNotFound(f"no index version {name!r} (collection {collection_name}) in Weaviate")
        return WeaviateVersion(self.client.collections.use(collection_name), name)

    def create_version(self, name: str, from_version: str | None = None) -> WeaviateVersion:
        """A new collection; with `from_version`, every object of that version copied with its vector."""
        from weaviate.classes.config import Configure, VectorDistances

        collection_name = self.collection_name(name)
        if self.client.collections.exists(collection_name):
            raise IndexBackendError(f"index version {name!r} (collection {collection_name}) already exists")
        source = self.open_version(from_version) if from_version is not None else None
        collection = self.client.collections.create(
            collection_name,
            properties=_properties(),
            vector_config=Configure.Vectors.self_provided(
                vector_index_config=Configure.VectorIndex.hnsw(distance_metric=VectorDistances.COSINE)
            ),
        )
        if source is not None:
            with collection.batch.dynamic() as batch:
                for item in source.collection.iterator(include_vector=True):
                    batch.add_object(properties=item.properties, uuid=item.uuid, vector=item.vector)
            failed = collection.batch.failed_objects
            if failed:
                raise IndexBackendError(
                    f"copying {from_version} to {name}: weaviate rejected {len(failed)} objects; first: {failed[0].message}"
                )
        return WeaviateVersion(collection, name)

    def list_versions(self) -> list[str]:
        names = self.client.collections.list_all(simple=True)
        return sorted(
            name[len(self.prefix) :]
            for name in names
            if name.startswith(self.prefix) and "__" not in name[len(self.prefix) :]
        )

    def drop_version(self, name: str) -> None:
        collection_name = self.collection_name(name)
        if self.client.collections.exists(collection_name):
            self.client.collections.delete(collection_name)
