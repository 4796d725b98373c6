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


class RankerConfig(Strict):
    """The learned ranking of `search_mode: learned` (`cadre.knowledge.ranker`): fitted for every new index version
    on the suite's train split, from both rankings' scores and the documents' titles."""

    depth: int = Field(
        20, ge=2, le=100, description="Candidate documents taken from each ranking (vector and keyword) per query."
    )
    group_field: str | None = Field(
        None,
        min_length=1,
        description="A metadata field grouping documents (e.g. an ICD-10 category): how many of the best hits share "
        "a candidate's group becomes a feature. Null: no groups.",
    )
    title_words: int = Field(
        60, ge=0, le=1000, description="Indicator features for the most frequent words of the train answers' titles."
    )
    max_cases: int = Field(
        8000, ge=20, description="Train cases the ranker is fitted on (the first in the split's order); smoke: 200."
    )
    l2: float = Field(0.01, ge=0.0, le=10.0, description="L2 penalty of the listwise fit.")


class IndexSettings(Strict):
    """The specialist's vector index."""

    search_mode: Literal["vector", "hybrid", "learned"] = Field(
        "hybrid",
        description="Retrieval mode: `vector` (cosine), `hybrid` (vector and BM25 ranks fused) or `learned` (both "
        "rankings re-ordered by a ranker fitted for each index version on the train split; `ranker:`).",
    )
    ranker: RankerConfig | None = Field(
        None, description="Settings of the learned ranking (search_mode: learned; defaults when omitted)."
    )

    @model_validator(mode="after")
    def _ranker_needs_learned(self) -> IndexSettings:
        if self.ranker is not None and self.search_mode != "learned":
            raise FieldError(
                ("ranker",),
                f"ranker settings only apply to search_mode: learned (this index says {self.search_mode!r}); "
                "set search_mode: learned or remove ranker",
            )
        return self

    @property
    def ranking(self) -> RankerConfig | None:
        """The ranker's settings where the mode is `learned` (defaults when `ranker:` is omitted), else None."""
        if self.search_mode != "learned":
            return None
        return self.ranker or RankerConfig()

    retention: int = Field(3, ge=1, description="Index versions kept besides the live one (older ones are pruned).")
    max_documents: int | None = Field(None, ge=1, description="Cap on documents per run (for trials); null = all.")
