"""A specialist's knowledge: where documents come from, how they are chunked and indexed."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from cadre.config.base import ExistingProjectPath, FieldError, Strict

_ENTRYPOINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class FilesSource(Strict):
    """Local files matched by a glob: txt, md, html, pdf, docx."""

    kind: Literal["files"] = Field(description="Local files.")
    name: str = Field(min_length=1, description="Name of this source (unique within the specialist).")
    path: ExistingProjectPath = Field(description="Folder to search, relative to pipelines.yaml.")
    glob: str = Field("**/*", description="Glob below `path`, e.g. `**/*.md`.")
    encoding: str = Field("utf-8", description="Text encoding of plain-text files.")


class DatasetSource(Strict):
    """Records from JSONL, CSV or Parquet files, or a `datasets` folder saved with `save_to_disk`."""

    kind: Literal["dataset"] = Field(description="Tabular records read through `datasets`.")
    name: str = Field(min_length=1, description="Name of this source (unique within the specialist).")
    path: ExistingProjectPath = Field(description="File (.jsonl/.json/.csv/.parquet) or saved-dataset folder.")
    id_field: str = Field("id", description="Field with a stable record id.")
    text_fields: list[str] = Field(["text"], min_length=1, description="Fields joined into the document text.")
    title_field: str | None = Field(None, description="Field used as the document title.")
    metadata_fields: list[str] = Field([], description="Fields kept as filterable metadata.")


class SqlSource(Strict):
    """Rows of a SQL query through SQLAlchemy (SQLite in the demo; Postgres works the same)."""

    kind: Literal["sql"] = Field(description="A database query.")
    name: str = Field(min_length=1, description="Name of this source (unique within the specialist).")
    url: str = Field(
        description="SQLAlchemy URL; a relative sqlite path is read from the project folder, e.g. sqlite:///data/kb.db."
    )
    url_env: str | None = Field(
        None, description="Environment variable holding the URL instead (keeps passwords out of the file)."
    )
    query: str = Field(min_length=1, description="SELECT returning one row per document.")
    id_column: str = Field("id", description="Column with a stable row id.")
    text_columns: list[str] = Field(["text"], min_length=1, description="Columns joined into the document text.")
    title_column: str | None = Field(None, description="Column used as the document title.")
    metadata_columns: list[str] = Field([], description="Columns kept as filterable metadata.")

    @field_validator("query")
    @classmethod
    def _select_only(cls, value: str) -> str:
        if not value.lstrip().lower().startswith(("select", "with")):
            raise ValueError("query must be a SELECT (or WITH … SELECT); Cadre only reads sources")
        return value


class PythonSource(Strict):
    """A Python function that yields documents (dicts with id, text, optional title and metadata)."""

    kind: Literal["python"] = Field(description="A custom loader.")
    name: str = Field(min_length=1, description="Name of this source (unique within the specialist).")
    entrypoint: str = Field(description="`package.module:function` returning an iterable of documents.")
    options: dict[str, Any] = Field({}, description="Keyword arguments passed to the function.")

    @field_validator("entrypoint")
    @classmethod
    def _module_colon_function(cls, value: str) -> str:
        if not _ENTRYPOINT.match(value):
            raise ValueError(f"entrypoint {value!r} must look like 'package.module:function'")
        return value


Source = Annotated[FilesSource | DatasetSource | SqlSource | PythonSource, Field(discriminator="kind")]


class ChunkingSettings(Strict):
    """How documents are split before embedding."""

    max_tokens: int = Field(200, ge=16, le=8192, description="Chunk size in embedding-model tokens.")
    overlap_tokens: int = Field(32, ge=0, description="Tokens shared by neighbouring chunks.")
    max_document_bytes: int = Field(
        2_000_000, ge=1, description="Documents larger than this are skipped (counted as oversized)."
    )

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingSettings:
        if self.overlap_tokens >= self.max_tokens:
            raise FieldError(
                ("overlap_tokens",),
                f"overlap_tokens ({self.overlap_tokens}) must be smaller than max_tokens ({self.max_tokens})",
            )
        return self


class IndexSettings(Strict):
    """The specialist's vector index."""

    search_mode: Literal["vector", "hybrid"] = Field("hybrid", description="Default retrieval mode.")
    retention: int = Field(3, ge=1, description="Index versions kept besides the live one (older ones are pruned).")
    max_documents: int | None = Field(None, ge=1, description="Cap on documents per run (for trials); null = all.")
