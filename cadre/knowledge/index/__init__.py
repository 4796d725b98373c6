"""Vector index backends (LanceDB embedded, Weaviate server), versioned blue/green, with a live pointer.

`open_backend(settings, state_dir, specialist)` returns the configured backend for one specialist.
The re-index engine (`cadre.knowledge.reindex`) builds versions; promotion moves the pointer in
`<state_dir>/index/live.json`.
"""

from __future__ import annotations

import os
from pathlib import Path

from cadre.config.project import IndexBackendSettings
from cadre.knowledge.index.base import (
    ChunkState,
    IndexBackend,
    IndexBackendError,
    IndexVersion,
    RetrievalMode,
    SearchHit,
    SearchMode,
    VersionNotFound,
    metadata_labels,
    parse_filters,
)
from cadre.knowledge.index.live import LivePointers, Promotion
from cadre.knowledge.index.manifest import BuildMarker, IndexBusy, IndexKey, IndexLayout, Manifest

__all__ = [
    "BuildMarker",
    "ChunkState",
    "IndexBackend",
    "IndexBackendError",
    "IndexBusy",
    "IndexKey",
    "IndexLayout",
    "IndexVersion",
    "LivePointers",
    "Manifest",
    "Promotion",
    "RetrievalMode",
    "SearchHit",
    "SearchMode",
    "VersionNotFound",
    "metadata_labels",
    "open_backend",
    "parse_filters",
]


def open_backend(
    settings: IndexBackendSettings, state_dir: Path, specialist: str, *, dimension: int | None = None
) -> IndexBackend:
    """The configured index backend for one specialist.

    Args:
        settings: `project.index`.
        state_dir: The project's state dir (LanceDB keeps its tables below it).
        specialist: Specialist name; each specialist has its own versions.
        dimension: Vector length (needed to create an empty version).

    Returns:
        A `LanceDBBackend` or a `WeaviateBackend`.
    """
    if settings.backend == "lancedb":
        from cadre.knowledge.index.lancedb_backend import LanceDBBackend

        return LanceDBBackend(IndexLayout(state_dir, specialist).lancedb_dir, dimension=dimension)
    from cadre.knowledge.index.weaviate_backend import WeaviateBackend

    url = settings.weaviate_url or os.environ.get("WEAVIATE_URL")
    if not url:
        raise IndexBackendError(
            "backend 'weaviate' needs project.index.weaviate_url or the WEAVIATE_URL environment variable"
        )
    api_key = os.environ.get(settings.weaviate_api_key_env) if settings.weaviate_api_key_env else None
    return WeaviateBackend(url, specialist=specialist, api_key=api_key)
