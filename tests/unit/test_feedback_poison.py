"""One request must not poison the feedback store: bad text is refused before anything is written, and rows
that got in before the checks (or by raw SQL) are skipped and counted by export and by the learning flow."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cadre.feedback.store import (
    MAX_TEXT_CHARS,
    FeedbackStore,
    InvalidFeedback,
    ServedResponse,
    UnstorableResponse,
    corrections,
    default_store_url,
    feedback_cases,
    preference_pairs,
)
from cadre.jsonl import write_jsonl
from cadre.runtime.prompt import FieldSpec, PromptSpec

SPEC = PromptSpec("Answer with the ICD-10-CM code.", (FieldSpec("phrase"),), (FieldSpec("code"),), None)


def _served(response_id: str, phrase: str = "typhoid endocarditis", code: str = "A01.0") -> ServedResponse:
    return ServedResponse(
        id=response_id,
        specialist="coder",
        requested_model="auto",
        program_version="3",
        index_version=None,
        adapter_version=None,
        inputs={"phrase": phrase},
        prompt=f"Phrase: {phrase}\nCode:",
        completion=f" {code}",
        answer=code,
        outputs={"code": code},
    )


def _rows(url: str) -> int:
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        return db.execute("SELECT count(*) FROM cadre_feedback").fetchone()[0]


@pytest.mark.parametrize(
    ("rating", "correction", "comment", "words"),
    [
        (-1, {"code": "\ud800"}, None, "lone UTF-16 surrogate (\\ud800)"),
        (-1, {"code": "A01\x00"}, None, "control character \\u0000"),
        (-1, {"code": "\x1b[31mA01"}, None, "control character \\u001b"),
        (-1, {"code": "A" * (MAX_TEXT_CHARS + 1)}, None, "at most 4,000"),
        (-1, {"code": 5}, None, "must be text"),
        (-1, "A01.02", None, "must be an object"),
        (-1, None, "x" * 60_000, "comment is 60,000 characters"),
        (-1, None, "bad \udfff", "comment holds a lone UTF-16 surrogate"),
        (-1, None, "bell\x07", "control character \\u0007"),
        (True, None, None, "got true"),
        (1.0, None, None, "got 1.0"),
        ("1", None, None, "rating must be one of -1, 0, 1"),
    ],
)
def test_poisoning_feedback_is_refused_and_nothing_is_stored(
    tmp_path: Path, rating, correction, comment, words
) -> None:
    url = default_store_url(tmp_path)
    store = FeedbackStore(url)
    store.record_response(_served("r1"))
    with pytest.raises(InvalidFeedback) as refused:
        store.add_feedback("r1", rating, correction, comment)
    assert words in str(refused.value)
    assert _rows(url) == 0
    assert store.read_feedback().records == [] and store.read_feedback().skipped == []


def test_plain_text_with_tabs_newlines_and_any_script_is_kept(tmp_path: Path) -> None:
    store = FeedbackStore(default_store_url(tmp_path))
    store.record_response(_served("r1"))
    text = "A01.02\tтиф 伤寒 🦠\r\nsecond line"
    store.add_feedback("r1", -1, {"code": text}, comment="x" * MAX_TEXT_CHARS)
    assert store.feedback()[0].correction == {"code": text}


def test_a_response_with_unencodable_text_is_refused_before_it_is_stored(tmp_path: Path) -> None:
    store = FeedbackStore(default_store_url(tmp_path))
    with pytest.raises(UnstorableResponse, match="surrogate"):
        store.record_response(_served("r1", phrase="bad \ud800"))
    assert store.get_response("r1") is None


def _poisoned_store(tmp_path: Path) -> tuple[str, dict[int, str]]:
    """A store with two good corrections and rows that break every rule, written with raw SQL as an old
    Cadre (or another tool) could have; returns the URL and what each bad row holds."""
    url = default_store_url(tmp_path)
    store = FeedbackStore(url)
    for number, phrase in enumerate(["typhoid endocarditis", "gout", "asthma", "cholera", "pneumonia", "sepsis"], 1):
        store.record_response(_served(f"r{number}", phrase))
    store.add_feedback("r1", -1, {"code": "A01.02"})
    store.close()
    bad = {
        2: "a lone surrogate in the correction (stored JSON-escaped)",
        3: "NUL and a 60 KB correction",
        4: "rating stored as text 'true'",
        5: "a correction that is not JSON",
        6: "a comment that is not UTF-8",
    }
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        insert = (
            "INSERT INTO cadre_feedback (response_id, created_at, rating, correction, comment) VALUES (?, ?, ?, ?, ?)"
        )
        now = "2026-01-01 10:00:00.000000"
        db.execute(insert, ("r2", now, -1, '{"code": "\\ud800"}', None))
        db.execute(insert, ("r3", now, -1, json.dumps({"code": "M10\x00" + "9" * 60_000}), None))
        db.execute(insert, ("r4", now, "true", None, None))
        db.execute(insert, ("r5", now, -1, "{not json", None))
        db.execute(
            "INSERT INTO cadre_feedback (response_id, created_at, rating, correction, comment) "
            "VALUES ('r6', ?, -1, NULL, CAST(x'ff41' AS TEXT))",
            (now,),
        )
    store = FeedbackStore(url)
    store.add_feedback("r2", -1, {"code": "M10.9"})  # a good correction after the bad rows
    store.close()
    return url, bad


def test_an_existing_poisoned_store_reads_its_good_rows_and_counts_the_bad(tmp_path: Path) -> None:
    url, bad = _poisoned_store(tmp_path)
    read = FeedbackStore(url).read_feedback("coder")
    assert [(r.response_id, r.correction) for r in read.records] == [
        ("r1", {"code": "A01.02"}),
        ("r2", {"code": "M10.9"}),
    ]
    assert [s.response_id for s in read.skipped] == ["r2", "r3", "r4", "r5", "r6"]
    reasons = [s.reason for s in read.skipped]
    assert "surrogate" in reasons[0]
    assert "control character \\u0000" in reasons[1] or "at most 4,000" in reasons[1]
    assert "rating" in reasons[2]
    assert reasons[3].startswith("unreadable row")
    assert "surrogate" in reasons[4]
    for skip in read.skipped:
        str(skip).encode("utf-8")  # every reason prints


def test_a_poisoned_store_still_trains_the_bad_row_counted_and_skipped(tmp_path: Path) -> None:
    url, _ = _poisoned_store(tmp_path)
    read = FeedbackStore(url).read_feedback("coder")
    found, counts = corrections(read.records, ["code"])
    pairs = preference_pairs(found, SPEC)
    folder = tmp_path / "data"
    written, unwritable = write_jsonl(folder / "preference_pairs.jsonl", (vars(p) for p in pairs))
    cases_written, _ = write_jsonl(folder / "feedback_cases.jsonl", feedback_cases(found, ["code"]))
    assert (counts["records"], len(read.skipped), written, cases_written, unwritable) == (2, 5, 2, 2, [])
    chosen = [json.loads(line)["chosen"] for line in (folder / "preference_pairs.jsonl").read_text().splitlines()]
    assert chosen == [" A01.02\n", " M10.9\n"]


def test_cli_export_of_a_poisoned_store_writes_the_good_rows_atomically_and_names_the_bad(tmp_path: Path) -> None:
    (tmp_path / "suite").mkdir()
    (tmp_path / "pipelines.yaml").write_text(
        textwrap.dedent("""\
        version: 1
        project: {name: fbtest, state_dir: state}
        specialists:
          - name: coder
            description: codes phrases
            program: {instruction: Answer., inputs: [{name: phrase}], outputs: [{name: code}], retrieve_k: 0}
            evaluation: {suite: suite}
        """)
    )
    _poisoned_store(tmp_path / "state")
    out = tmp_path / "feedback.jsonl"
    out.write_text("the previous export\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cadre.cli",
            "feedback",
            "export",
            "-c",
            str(tmp_path / "pipelines.yaml"),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 2 feedback record(s)" in done.stderr and "skipped 5 unusable feedback row(s)" in done.stderr
    assert done.stderr.count("feedback 2 (response 'r2')") == 1, "each skipped row is named once"
    assert "feedback 2 (response 'r2'): correction holds a lone UTF-16 surrogate (\\ud800)" in done.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["response_id"], r["correction"]) for r in rows] == [
        ("r1", {"code": "A01.02"}),
        ("r2", {"code": "M10.9"}),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feedback.jsonl", "pipelines.yaml", "state", "suite"]


def test_an_export_has_one_line_per_record_even_with_unicode_line_separators(tmp_path: Path) -> None:
    # Found by the fuzz tier (tests/fuzz/test_feedback_store_fuzz.py): U+2028 is text, so it is stored, and the
    # export wrote it raw, which split the record in two for line-based readers.
    import io

    store = FeedbackStore(default_store_url(tmp_path))
    store.record_response(_served("r1", phrase="line\u2028separator\x85"))
    store.add_feedback("r1", -1, {"code": "A01\u2029.02"})
    out = io.StringIO()
    assert store.export_jsonl(out).written == 1
    (line,) = out.getvalue().splitlines()
    row = json.loads(line)
    assert row["correction"] == {"code": "A01\u2029.02"} and row["response"]["inputs"] == {
        "phrase": "line\u2028separator\x85"
    }
