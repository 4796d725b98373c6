"""The committed icd10-coder suite and the ICD-10-CM documents it is evaluated against."""

from __future__ import annotations

import json

import pytest
import simple_icd_10_cm as icd
from support import SUITE_SPLITS as SPLITS
from support import assert_rebuilt_identically, committed_manifest, committed_suite, suite_folder

from cadre.demo.icd10 import (
    billable_codes,
    build_suite,
    chapter_range,
    load_documents,
    normalize_phrase,
)

SUITE = suite_folder("icd10-coder")


@pytest.fixture(scope="module")
def splits():
    return committed_suite("icd10-coder")


def test_held_out_splits_are_large_enough(splits):
    assert len(splits["dev"]) >= 300 and len(splits["test"]) >= 300
    assert len(splits["train"]) > len(splits["test"])


def test_splits_share_no_case_phrase_or_code(splits):
    for field in ("id", "phrase", "code"):
        seen: dict[str, str] = {}
        for split, cases in splits.items():
            values = {normalize_phrase(c[field]) if field == "phrase" else c[field] for c in cases}
            clashes = [value for value in values if seen.setdefault(value, split) != split]
            assert not clashes, f"{field} shared across splits: {clashes[:5]}"


def test_no_phrase_repeats_within_a_split(splits):
    for cases in splits.values():
        phrases = [normalize_phrase(c["phrase"]) for c in cases]
        assert len(phrases) == len(set(phrases))


def test_cases_are_well_formed_rephrasings_of_billable_codes(splits):
    billable = set(billable_codes())
    for cases in splits.values():
        for case in cases:
            assert set(case) == {"id", "phrase", "code", "relevant_ids", "slice"}
            assert case["relevant_ids"] == [case["code"]] and case["code"] in billable
            assert normalize_phrase(case["phrase"]) != normalize_phrase(icd.get_description(case["code"]))
            assert case["phrase"] in [" ".join(term.split()) for term in icd.get_inclusion_term(case["code"])]
            assert case["slice"] == chapter_range(icd.get_ancestors(case["code"])[-1])


def test_every_held_out_split_covers_most_chapters(splits):
    for split in ("dev", "test"):
        assert len({c["slice"] for c in splits[split]}) >= 20


def test_manifest_matches_the_files():
    manifest = committed_manifest("icd10-coder")
    for split in SPLITS:
        assert sum(manifest["slices"][split].values()) == manifest["counts"][split]


def test_rebuilding_gives_identical_files(tmp_path):
    build_suite(tmp_path, seed=0)
    assert_rebuilt_identically("icd10-coder", tmp_path)


def test_another_seed_gives_another_split(tmp_path):
    manifest = build_suite(tmp_path, seed=1)
    committed = json.loads((SUITE / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["sha256"]["test.jsonl"] != committed["sha256"]["test.jsonl"]
    assert sum(manifest["counts"].values()) == sum(committed["counts"].values())


def test_priority_documents_come_first_so_a_small_index_holds_every_eval_code(splits):
    needed = [case["code"] for case in splits["test"][:40]]
    documents = list(load_documents(limit=len(set(needed)) + 5, priority_ids=needed))
    ids = [doc["id"] for doc in documents]
    assert ids[: len(set(needed))] == list(dict.fromkeys(needed))
    assert len(ids) == len(set(ids)) == len(set(needed)) + 5


def test_documents_leave_out_the_inclusion_terms_that_are_queries(splits):
    cases = splits["test"][:200]
    documents = {doc["id"]: doc for doc in load_documents(priority_ids=[c["code"] for c in cases], limit=len(cases))}
    leaked = []
    for case in cases:
        document = documents[case["code"]]
        titles = " ".join(icd.get_description(item) for item in [case["code"], *icd.get_ancestors(case["code"])])
        phrase = normalize_phrase(case["phrase"])
        # A phrase may overlap a title by nature ("Tuberculosis of larynx" in A15.5's); it must not be added.
        if phrase in normalize_phrase(document["text"]) and phrase not in normalize_phrase(titles):
            leaked.append(case["id"])
        assert document["metadata"]["chapter"] == case["slice"]
    assert not leaked


def test_a_document_reads_as_code_description_and_parents():
    document = next(load_documents(limit=1, priority_ids=["A0102"]))
    assert document["id"] == "A01.02"
    assert document["title"] == "Typhoid fever with heart involvement"
    assert document["text"].splitlines() == [
        "A01.02: Typhoid fever with heart involvement",
        "Subcategory A01.0: Typhoid fever",
        "Category A01: Typhoid and paratyphoid fevers",
        "Block A00-A09: Intestinal infectious diseases",
        "Chapter 1 (A00-B99): Certain infectious and parasitic diseases",
    ]
    assert document["metadata"] == {"chapter": "A00-B99", "block": "A00-A09", "category": "A01"}


def test_documents_are_billable_codes_in_a_stable_order():
    first = [doc["id"] for doc in load_documents(limit=5)]
    assert first == [doc["id"] for doc in load_documents(limit=5)] == list(billable_codes()[:5])
    assert len(billable_codes()) > 74_000


def test_unknown_or_non_billable_priority_ids_are_rejected():
    with pytest.raises(ValueError, match="not an ICD-10-CM code"):
        next(load_documents(priority_ids=["XYZ"]))
    with pytest.raises(ValueError, match="not a billable code"):
        next(load_documents(priority_ids=["A01"]))
    assert next(load_documents(billable_only=False, priority_ids=["A01"]))["id"] == "A01"
