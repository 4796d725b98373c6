"""The demo medical-coding specialist's data: ICD-10-CM documents and its evaluation suite.

Everything comes from the PyPI package `simple-icd-10-cm` (public-domain ICD-10-CM), so
nothing is downloaded at run time.

- `load_documents` yields one document per billable code (code, description and the titles
  of its parents); pipelines.yaml names it as the ``icd10cm`` python source.
- `build_suite` writes the specialist's evaluation suite: *inclusion terms* (the alternative
  clinical phrasings ICD-10-CM lists under a code, e.g. "Typhoid endocarditis" under A01.02
  "Typhoid fever with heart involvement") as queries, the code as the answer. Inclusion terms
  are therefore kept out of the document text, or retrieval would be a string lookup.

Regenerate the committed suite with::

    python -m cadre.demo.icd10 build-suite evals/suites/icd10-coder
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import simple_icd_10_cm as icd

from cadre.demo.suite import SPLITS, build_suite_command, deal, order_splits, slice_counts, write_suite

SUITE_NAME = "icd10-coder"
SUITE_VERSION = 1
MIN_PHRASE_CHARS = 3

_RANGE_IN_TITLE = re.compile(r"\(([A-Z0-9]{3}-[A-Z0-9]{3})\)\s*$")


# --- the classification ----------------------------------------------------------------------


@lru_cache(maxsize=1)
def _all_codes() -> tuple[str, ...]:
    """Every chapter, block and code once, in the classification's order (the package lists a few twice)."""
    return tuple(dict.fromkeys(icd.get_all_codes(with_dots=True)))


def _is_code(item: str) -> bool:
    return icd.is_category_or_subcategory(item) or icd.is_extended_subcategory(item)


def _is_billable(item: str) -> bool:
    # The package marks a few empty blocks (C00-C96) as leaves; only codes are billable.
    return icd.is_leaf(item) and _is_code(item)


@lru_cache(maxsize=1)
def billable_codes() -> tuple[str, ...]:
    """All billable ICD-10-CM codes (leaves of the classification), dotted, in classification order."""
    return tuple(item for item in _all_codes() if _is_billable(item))


def chapter_range(chapter: str) -> str:
    """The code range of a chapter, e.g. ``"A00-B99"`` for chapter ``"1"``."""
    match = _RANGE_IN_TITLE.search(icd.get_description(chapter))
    return match.group(1) if match else chapter


def _title(item: str) -> str:
    return _RANGE_IN_TITLE.sub("", icd.get_description(item)).strip()


def _place(code: str) -> dict[str, str]:
    """Chapter range, block and category of a code."""
    ancestors = icd.get_ancestors(code)
    chapter = ancestors[-1]
    block = next((item for item in ancestors[:-1] if icd.is_block(item) and "-" in item), ancestors[-2])
    category = next(item for item in [*reversed(ancestors[:-1]), code] if icd.is_category(item))
    return {"chapter": chapter_range(chapter), "block": block, "category": category}


def describe_code(code: str) -> str:
    """Readable text of a code: its description, then each parent from nearest to chapter."""
    lines = [f"{code}: {icd.get_description(code)}"]
    for ancestor in icd.get_ancestors(code):
        if ancestor == code:  # a few categories share their name with their block (B20)
            continue
        if icd.is_chapter(ancestor):
            lines.append(f"Chapter {ancestor} ({chapter_range(ancestor)}): {_title(ancestor)}")
        elif "-" in ancestor:
            lines.append(f"Block {ancestor}: {_title(ancestor)}")
        elif icd.is_category(ancestor):
            lines.append(f"Category {ancestor}: {_title(ancestor)}")
        else:
            lines.append(f"Subcategory {ancestor}: {_title(ancestor)}")
    return "\n".join(lines)


def _document(code: str) -> dict[str, Any]:
    return {"id": code, "title": icd.get_description(code), "text": describe_code(code), "metadata": _place(code)}


def _known_code(item: str, billable_only: bool) -> str:
    dotted = icd.add_dot(item.strip()) if icd.is_valid_item(item.strip()) else None
    if dotted is None or not _is_code(dotted):
        raise ValueError(f"priority id {item!r} is not an ICD-10-CM code")
    if billable_only and not _is_billable(dotted):
        raise ValueError(f"priority id {item!r} is not a billable code, and billable_only is set")
    return dotted


def load_documents(
    billable_only: bool = True, limit: int | None = None, priority_ids: Iterable[str] = ()
) -> Iterator[dict[str, Any]]:
    """Yield ICD-10-CM codes as documents for the specialist's index.

    Each document is ``{"id": "A01.02", "title": description, "text": code, description and
    parent titles, "metadata": {"chapter": "A00-B99", "block": "A00-A09", "category": "A01"}}``.
    Inclusion terms are left out of the text: they are the evaluation queries.

    Args:
        billable_only: Only billable codes (the leaves, ~74.7k); otherwise every category and
            subcategory too (chapters and blocks are never documents).
        limit: Stop after this many documents (smoke runs); None for all.
        priority_ids: Codes to yield first, in the given order (dotted or not), so that a
            limited run still holds every code an evaluation case needs. The rest follow in
            classification order.

    Yields:
        Documents in a deterministic order.

    Raises:
        ValueError: If a priority id is not a code (or not billable while `billable_only`).
    """
    first = list(dict.fromkeys(_known_code(item, billable_only) for item in priority_ids))
    rest = billable_codes() if billable_only else tuple(item for item in _all_codes() if _is_code(item))
    chosen = set(first)
    ordered = [*first, *(code for code in rest if code not in chosen)]
    for code in ordered[:limit] if limit is not None else ordered:
        yield _document(code)


# --- the evaluation suite ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One evaluation case: a clinical phrase and the billable code that classifies it."""

    id: str
    phrase: str
    code: str
    relevant_ids: list[str]
    slice: str


@dataclass(frozen=True)
class CaseHarvest:
    """The usable cases of the classification, and how many inclusion terms were left out and why."""

    cases: list[Case]
    dropped: dict[str, int]


def normalize_phrase(text: str) -> str:
    """Casefolded words without punctuation, for comparing phrases with each other and with descriptions."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    words = "".join(ch if not unicodedata.category(ch).startswith(("P", "S")) else " " for ch in folded)
    return " ".join(words.split())


def harvest_cases() -> CaseHarvest:
    """Every inclusion term of a billable code that makes a fair query.

    Left out (counted in `CaseHarvest.dropped`): a term that normalises to its own code's
    description (no rephrasing), to any code's description (it would name another code), or to
    fewer than `MIN_PHRASE_CHARS` characters; a term listed under more than one code (ambiguous);
    a repeat of a term under the same code.
    """
    codes = billable_codes()
    descriptions = {normalize_phrase(icd.get_description(item)) for item in _all_codes() if _is_code(item)}
    terms = [(code, term) for code in codes for term in icd.get_inclusion_term(code)]
    codes_per_phrase: dict[str, set[str]] = defaultdict(set)
    for code, term in terms:
        codes_per_phrase[normalize_phrase(term)].add(code)

    dropped: Counter[str] = Counter()
    cases: list[Case] = []
    seen: set[str] = set()
    cases_per_code: Counter[str] = Counter()
    for code, term in terms:
        phrase = normalize_phrase(term)
        reason = (
            "same_as_own_description" if phrase == normalize_phrase(icd.get_description(code))
            else "same_as_a_description" if phrase in descriptions
            else "too_short" if len(phrase) < MIN_PHRASE_CHARS
            else "under_several_codes" if len(codes_per_phrase[phrase]) > 1
            else "repeated" if phrase in seen
            else None
        )  # fmt: skip
        if reason:
            dropped[reason] += 1
            continue
        seen.add(phrase)
        cases_per_code[code] += 1
        cases.append(
            Case(f"{code}#{cases_per_code[code]}", " ".join(term.split()), code, [code], _place(code)["chapter"])
        )
    return CaseHarvest(cases, dict(sorted(dropped.items())))


def split_cases(cases: list[Case], seed: int = 0) -> dict[str, list[Case]]:
    """Assign cases to train/dev/test by code, stratified by chapter; each split in seeded random order.

    A code's phrases all land in one split, so no split learns a code another split tests.
    Case order within a split is shuffled so that the first N cases (``max_cases``) are a fair
    sample of every chapter.
    """
    codes_by_chapter: dict[str, list[str]] = defaultdict(list)
    for code in dict.fromkeys(case.code for case in cases):
        codes_by_chapter[_place(code)["chapter"]].append(code)
    split_of = deal(codes_by_chapter, SUITE_NAME, seed)
    splits: dict[str, list[Case]] = {split: [] for split in SPLITS}
    for case in cases:
        splits[split_of[case.code]].append(case)
    return order_splits(splits, SUITE_NAME, seed)


def build_suite(out_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Write the icd10-coder suite: train/dev/test JSONL and a manifest, byte-for-byte reproducible.

    Each line is ``{"id", "phrase", "code", "relevant_ids", "slice"}``: an inclusion term, its
    billable code, the code as the one relevant document id, and the code's chapter range as the
    slice. The manifest records the seed, the source package version, counts per split and
    slice, what was dropped and the sha256 of every split file.

    Args:
        out_dir: Folder to write (created if missing; the four files are overwritten).
        seed: Seed of the split assignment and case order.

    Returns:
        The manifest that was written.

    Raises:
        RuntimeError: If dev or test would hold fewer than `MIN_HELD_OUT_CASES` cases.
    """
    harvest = harvest_cases()
    splits = split_cases(harvest.cases, seed)
    return write_suite(out_dir, splits, _manifest(splits, harvest.dropped, seed))


def _manifest(splits: dict[str, list[Case]], dropped: dict[str, int], seed: int) -> dict[str, Any]:
    return {
        "suite": SUITE_NAME,
        "version": SUITE_VERSION,
        "seed": seed,
        "source": {"package": "simple-icd-10-cm", "version": version("simple-icd-10-cm")},
        "built_by": f"python -m cadre.demo.icd10 build-suite <dir> --seed {seed}",
        "how": (
            "Cases are the inclusion terms of billable ICD-10-CM codes (alternative clinical phrasings), "
            "the code being the answer and the one relevant document. Dropped: terms equal to a code's "
            "description after normalising case and punctuation, terms under several codes, terms under "
            f"{MIN_PHRASE_CHARS} characters, repeats. Codes are dealt to splits per chapter after a seeded "
            "shuffle (1 test, 1 dev, 8 train in every 10), so all phrases of a code share a split; the "
            "cases of each split are in seeded random order. Slices are chapter ranges."
        ),
        "fields": {
            "id": "code#n, unique across splits",
            "phrase": "input: a clinical phrase",
            "code": "output: the billable code",
            "relevant_ids": "document ids retrieval should find",
            "slice": "chapter range",
        },
        "counts": {split: len(cases) for split, cases in splits.items()},
        "codes": {split: len({case.code for case in cases}) for split, cases in splits.items()},
        "slices": slice_counts(splits),
        "dropped": dropped,
    }


main = build_suite_command(
    "cadre.demo.icd10", __doc__, build_suite, lambda manifest: f"dropped {sum(manifest['dropped'].values())} terms"
)


if __name__ == "__main__":
    raise SystemExit(main())
