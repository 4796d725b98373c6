"""Token-aware chunking: window sizes, overlap, spans that are verbatim text, deterministic ids.

Uses the real tokenizer of the packaged embedding model (a local `tokenizer.json`, loaded in
milliseconds; no model weights).
"""

from __future__ import annotations

from itertools import pairwise

import pytest

from cadre.config.knowledge import ChunkingSettings
from cadre.knowledge.chunking import Chunker, chunk_id, load_tokenizer
from cadre.knowledge.embedding import resolve_model_path
from cadre.knowledge.sources import Document, content_hash


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("packaged:all-minilm-l6-v2"))


def make_document(text: str, title: str = "", doc_id: str = "kb:1", metadata: dict | None = None) -> Document:
    metadata = metadata or {}
    return Document(
        id=doc_id,
        source="kb",
        record_id=doc_id.split(":", 1)[1],
        title=title,
        text=text,
        metadata=metadata,
        content_hash=content_hash(title, text, metadata),
    )


LONG_TEXT = " ".join(
    f"Sentence {i} describes typhoid fever with heart involvement, endocarditis and myocarditis in adults."
    for i in range(40)
)


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def test_short_document_is_one_chunk_holding_the_whole_text(tokenizer):
    document = make_document("Typhoid fever with heart involvement", title="A01.02")
    chunks = Chunker(tokenizer, ChunkingSettings(max_tokens=64, overlap_tokens=8)).chunk(document)
    assert len(chunks) == 1
    chunk = chunks[0]
    assert (chunk.text, chunk.start, chunk.end, chunk.chunk_index, chunk.chunk_count) == (
        document.text,
        0,
        len(document.text),
        0,
        1,
    )
    assert chunk.content == "A01.02\nTyphoid fever with heart involvement"
    assert chunk.doc_hash == document.content_hash


def test_windows_fit_the_token_budget_and_cover_the_text(tokenizer):
    settings = ChunkingSettings(max_tokens=32, overlap_tokens=8)
    document = make_document(LONG_TEXT)
    chunks = Chunker(tokenizer, settings).chunk(document)
    assert len(chunks) > 5
    for chunk in chunks:
        assert token_count(tokenizer, chunk.content) <= settings.max_tokens
        assert document.text[chunk.start : chunk.end] == chunk.text
    assert chunks[0].start == 0 and chunks[-1].end == len(document.text)
    # Consecutive windows overlap, so no text between them is lost.
    for before, after in pairwise(chunks):
        assert after.start < before.end
    assert [chunk.chunk_index for chunk in chunks] == list(range(len(chunks)))
    assert {chunk.chunk_count for chunk in chunks} == {len(chunks)}


def test_overlap_repeats_about_overlap_tokens(tokenizer):
    document = make_document(LONG_TEXT)
    chunks = Chunker(tokenizer, ChunkingSettings(max_tokens=40, overlap_tokens=10)).chunk(document)
    shared = [token_count(tokenizer, document.text[after.start : before.end]) for before, after in pairwise(chunks)]
    # The cut moves back to a word start, so the overlap can grow by the few tokens of one word.
    assert all(8 <= tokens <= 16 for tokens in shared), shared


def test_no_overlap_tiles_the_text(tokenizer):
    document = make_document(LONG_TEXT)
    chunks = Chunker(tokenizer, ChunkingSettings(max_tokens=24, overlap_tokens=0)).chunk(document)
    for before, after in pairwise(chunks):
        assert after.start >= before.end
        assert document.text[before.end : after.start].strip() == ""


def test_cuts_fall_between_words(tokenizer):
    text = " ".join(["pneumonoultramicroscopicsilicovolcanoconiosis"] * 30)
    chunks = Chunker(tokenizer, ChunkingSettings(max_tokens=32, overlap_tokens=4)).chunk(make_document(text))
    for chunk in chunks:
        assert set(chunk.text.split()) == {"pneumonoultramicroscopicsilicovolcanoconiosis"}


def test_title_tokens_come_out_of_the_budget(tokenizer):
    settings = ChunkingSettings(max_tokens=48, overlap_tokens=8)
    title = "Typhoid fever with heart involvement and other complications"
    chunks = Chunker(tokenizer, settings).chunk(make_document(LONG_TEXT, title=title))
    assert all(chunk.content.startswith(title + "\n") for chunk in chunks)
    assert all(token_count(tokenizer, chunk.content) <= settings.max_tokens + 1 for chunk in chunks)


def test_ids_are_deterministic_and_depend_on_document_position_and_content(tokenizer):
    chunker = Chunker(tokenizer, ChunkingSettings(max_tokens=32, overlap_tokens=8))
    first = [chunk.id for chunk in chunker.chunk(make_document(LONG_TEXT))]
    again = [
        chunk.id
        for chunk in Chunker(tokenizer, ChunkingSettings(max_tokens=32, overlap_tokens=8)).chunk(
            make_document(LONG_TEXT)
        )
    ]
    assert first == again
    assert len(set(first)) == len(first)
    other_document = [chunk.id for chunk in chunker.chunk(make_document(LONG_TEXT, doc_id="kb:2"))]
    assert not set(first) & set(other_document)
    assert chunk_id("kb:1", 0, "x") != chunk_id("kb:1", 1, "x") != chunk_id("kb:1", 0, "y")


def test_an_edit_at_the_end_keeps_the_ids_of_earlier_chunks(tokenizer):
    chunker = Chunker(tokenizer, ChunkingSettings(max_tokens=32, overlap_tokens=8))
    before = [chunk.id for chunk in chunker.chunk(make_document(LONG_TEXT))]
    after = [chunk.id for chunk in chunker.chunk(make_document(LONG_TEXT + " One more sentence about myocarditis."))]
    assert before[:-2] == after[: len(before) - 2]
    assert before[-1] != after[-1]


def test_batch_chunking_equals_one_by_one(tokenizer):
    chunker = Chunker(tokenizer, ChunkingSettings(max_tokens=32, overlap_tokens=4))
    documents = [make_document(LONG_TEXT[: 80 * n], title=f"T{n}", doc_id=f"kb:{n}") for n in range(1, 8)]
    assert chunker.chunk_many(documents) == [chunker.chunk(document) for document in documents]
    assert chunker.chunk_many([]) == []
