"""Token-aware chunking with overlap, measured in the embedding model's own tokens.

Each document's text is tokenized once (the fast Rust tokenizer, with character offsets); windows of
`max_tokens` tokens that overlap by `overlap_tokens` are sliced from the token list and mapped back to
character spans of the text, so a chunk is always a verbatim span of its document. A window that would
end inside a word is pulled back to the word's start. The title is prefixed to every chunk's
*content* (what is embedded and full-text indexed), so its tokens are taken from the window budget.

Chunk ids are deterministic: `hash(doc_id, chunk_index, sha256(content))`. Re-chunking the same
document with the same settings yields the same ids, which is what lets an interrupted re-index
converge (see `cadre.knowledge.reindex`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Encoding, Tokenizer

from cadre.config.knowledge import ChunkingSettings
from cadre.knowledge.sources import Document

TITLE_SEPARATOR = "\n"


@dataclass(frozen=True)
class Chunk:
    """A span of a document, the unit that is embedded and retrieved.

    Attributes:
        id: Deterministic id (32 hex chars): hash of doc id, position and content.
        doc_id: Id of the document (`<source>:<record id>`).
        record_id: The document's id inside its source.
        source: Name of the source.
        chunk_index: Position of the chunk in its document, from 0.
        chunk_count: Number of chunks of the document.
        title: The document's title.
        text: The span of the document's text.
        start: Character offset of `text` in the document's text.
        end: Character offset just past `text`.
        doc_hash: Content hash of the document this chunk was cut from.
        metadata: The document's metadata.
    """

    id: str
    doc_id: str
    record_id: str
    source: str
    chunk_index: int
    chunk_count: int
    title: str
    text: str
    start: int
    end: int
    doc_hash: str
    metadata: dict[str, Any]

    @property
    def content(self) -> str:
        """What is embedded and full-text indexed: the title, a newline, the span."""
        return f"{self.title}{TITLE_SEPARATOR}{self.text}" if self.title else self.text


def chunk_id(doc_id: str, chunk_index: int, content: str) -> str:
    """The deterministic id of a chunk: sha256 over doc id, position and the content's own sha256."""
    content_digest = hashlib.sha256(content.encode("utf-8")).hexdigest()
    return hashlib.sha256(f"{doc_id}\x1f{chunk_index}\x1f{content_digest}".encode()).hexdigest()[:32]


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The fast tokenizer of a sentence-transformers model folder, without padding or truncation."""
    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class Chunker:
    """Splits documents into overlapping token windows of the embedding model's tokenizer.

    Args:
        tokenizer: The embedding model's fast tokenizer (`load_tokenizer`).
        settings: Window size and overlap, in tokens.
    """

    def __init__(self, tokenizer: Tokenizer, settings: ChunkingSettings):
        self.tokenizer = tokenizer
        self.max_tokens = settings.max_tokens
        self.overlap_tokens = settings.overlap_tokens

    def chunk(self, document: Document) -> list[Chunk]:
        """Chunks of one document, in order."""
        return self.chunk_many([document])[0]

    def chunk_many(self, documents: Sequence[Document]) -> list[list[Chunk]]:
        """Chunks of several documents, tokenized in one batch call (faster than one by one).

        Args:
            documents: Documents to split.

        Returns:
            One list of chunks per document, in the same order.
        """
        if not documents:
            return []
        texts = [document.text for document in documents]
        titles = [document.title for document in documents]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        title_lengths = self._title_lengths(titles)
        return [
            self._split(document, encoding, title_lengths[document.title])
            for document, encoding in zip(documents, encodings)
        ]

    def _title_lengths(self, titles: Sequence[str]) -> dict[str, int]:
        distinct = sorted({title for title in titles if title})
        lengths = {"": 0}
        if distinct:
            # +1 for the separator that joins title and span.
            for title, encoding in zip(distinct, self.tokenizer.encode_batch(distinct, add_special_tokens=False)):
                lengths[title] = len(encoding.ids) + 1
        return lengths

    def _windows(self, encoding: Encoding, budget: int) -> list[tuple[int, int]]:
        count = len(encoding.ids)
        if count <= budget:
            return [(0, count)]
        overlap = min(self.overlap_tokens, budget - 1)
        word_ids = encoding.word_ids
        windows = []
        start = 0
        while True:
            end = min(start + budget, count)
            if end < count:
                # Pull the cut back to the start of the word it would split, unless the window would
                # shrink below half its size (one very long "word").
                cut = end
                while cut > start + budget // 2 and word_ids[cut] is not None and word_ids[cut] == word_ids[cut - 1]:
                    cut -= 1
                if cut > start + budget // 2:
                    end = cut
            windows.append((start, end))
            if end >= count:
                return windows
            next_start = max(end - overlap, start + 1)
            # Start the next window at a word start too: back to the start of its word (the overlap
            # grows by part of one word), or on to `end` when that word began in the previous window.
            while (
                next_start > start
                and word_ids[next_start] is not None
                and word_ids[next_start] == word_ids[next_start - 1]
            ):
                next_start -= 1
            start = next_start if next_start > start else end

    def _split(self, document: Document, encoding: Encoding, title_tokens: int) -> list[Chunk]:
        budget = max(self.max_tokens - title_tokens, self.max_tokens // 2)
        offsets = encoding.offsets
        windows = self._windows(encoding, budget)
        spans: list[tuple[int, int]] = []
        if len(windows) == 1:
            spans.append((0, len(document.text)))
        else:
            for first, last in windows:
                spans.append((offsets[first][0], offsets[last - 1][1]))
        chunks = []
        for index, (start, end) in enumerate(spans):
            text = document.text[start:end]
            title = document.title
            content = f"{title}{TITLE_SEPARATOR}{text}" if title else text
            chunks.append(
                Chunk(
                    id=chunk_id(document.id, index, content),
                    doc_id=document.id,
                    record_id=document.record_id,
                    source=document.source,
                    chunk_index=index,
                    chunk_count=len(spans),
                    title=title,
                    text=text,
                    start=start,
                    end=end,
                    doc_hash=document.content_hash,
                    metadata=document.metadata,
                )
            )
        return chunks
