"""The committed sense-tagger suite and the WordNet category documents it is evaluated against."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
from support import assert_rebuilt_identically, committed_manifest, committed_suite

from cadre.demo.wordnet import (
    LABELS,
    build_suite,
    find_word,
    load_documents,
    read_wordnet,
    wordnet_dir,
)
from cadre.demo.wordnet import _exceptions as exceptions
from cadre.demo.wordnet import _frequent_words as frequent_words


@pytest.fixture(scope="module")
def splits():
    return committed_suite("sense-tagger")


def test_held_out_splits_are_large_and_cover_every_label(splits):
    for split in ("dev", "test"):
        assert len(splits[split]) >= 300
        first = Counter(case["sense"] for case in splits[split][:300])  # what a 300-case evaluation sees
        assert set(first) == set(LABELS), set(LABELS) - set(first)
        assert max(first.values()) / 300 < 0.2, first.most_common(1)  # no label is most of the answers


def test_no_synset_and_no_sentence_is_in_two_splits(splits):
    for key in (lambda c: c["id"].split("#")[0], lambda c: (c["sentence"].casefold(), c["word"].casefold())):
        seen: dict[object, str] = {}
        for split, cases in splits.items():
            clashes = [k for k in {key(c) for c in cases} if seen.setdefault(k, split) != split]
            assert not clashes, clashes[:5]


def test_every_case_uses_its_word_and_names_a_label(splits):
    for cases in splits.values():
        for case in cases:
            assert set(case) == {"id", "word", "sentence", "sense", "relevant_ids", "slice"}
            assert case["sense"] in LABELS and case["relevant_ids"] == [case["sense"]] == [case["slice"]]
            assert case["word"] in case["sentence"]


def test_manifest_matches_the_files():
    manifest = committed_manifest("sense-tagger")
    assert manifest["labels"] == list(LABELS) and manifest["malformed"]["count"] == 0


def test_rebuilding_gives_identical_files(tmp_path):
    build_suite(tmp_path, seed=0)
    assert_rebuilt_identically("sense-tagger", tmp_path)


def _broken_copy(tmp_path: Path) -> Path:
    """WordNet's files with three damaged lines: a verb synset cut short, a noun synset without its gloss bar,
    and an index.sense line with a word for a count."""
    folder = tmp_path / "wordnet"
    shutil.copytree(wordnet_dir(), folder)
    for name, needle, damage in (
        ("data.verb", "00001740 29 v 04 breathe", lambda line: line[:30] + "\n"),
        ("data.noun", "02084071 05 n 03 dog", lambda line: line.replace(" | ", " ")),
        ("index.sense", "dog%1:05:00::", lambda line: line.rsplit(" ", 1)[0] + " many\n"),
    ):
        lines = (folder / name).read_text(encoding="utf-8").splitlines(keepends=True)
        [at] = [i for i, line in enumerate(lines) if line.startswith(needle)]
        lines[at] = damage(lines[at])
        (folder / name).write_text("".join(lines), encoding="utf-8")
    return folder


def test_malformed_lines_are_skipped_and_counted_with_file_and_line(tmp_path, caplog):
    folder = _broken_copy(tmp_path)
    clean, broken = read_wordnet(), read_wordnet(folder)
    assert [entry.split(":")[0] for entry in broken.malformed] == ["data.noun", "data.verb"]
    assert all(entry.split(":")[1].isdigit() for entry in broken.malformed)
    assert len(broken.synsets) == len(clean.synsets) - 2 and not clean.malformed
    with caplog.at_level(logging.WARNING, logger="cadre.demo.wordnet"):
        words = frequent_words(folder)
    assert "skipped 1 malformed line(s)" in caplog.text and "index.sense:" in caplog.text
    assert set(words) == set(LABELS)
    manifest = build_suite(tmp_path / "suite", folder=folder)
    assert manifest["malformed"]["count"] == 2 and manifest["malformed"]["lines"] == broken.malformed


def test_a_word_is_found_in_any_inflection_as_the_sentence_spells_it():
    read = read_wordnet()
    irregular = exceptions(wordnet_dir())
    by_first_word = {}
    for synset in read.synsets:
        by_first_word.setdefault((synset.words[0], synset.pos), synset)
    bank = by_first_word[("bank", "v")]
    assert find_word("The plane Banked sharply", bank, irregular["v"]) == "Banked"
    run = by_first_word[("run", "v")]
    assert find_word("she ran the meeting", run, irregular["v"]) == "ran"  # verb.exc: ran -> run
    assert find_word("a rerun of the show", run, irregular["v"]) is None  # not inside another word
    child = by_first_word[("child", "n")]
    assert find_word("the children played", child, irregular["n"]) == "children"


def test_one_document_per_label_describes_it_and_lists_frequent_words():
    documents = list(load_documents())
    assert [d["id"] for d in documents] == list(LABELS)
    artifact = documents[list(LABELS).index("noun.artifact")]
    assert artifact["title"] == LABELS["noun.artifact"] and artifact["metadata"] == {"pos": "noun"}
    assert artifact["text"].startswith("noun.artifact: nouns denoting man-made objects. Frequent words: ")
    assert "house" in artifact["text"]
    assert [d["id"] for d in load_documents(limit=3)] == list(LABELS)[:3]
