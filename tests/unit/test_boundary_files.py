"""Hostile files at the boundary: suites, training data and JSONL/CSV sources load their good lines and name each bad one.

A bad byte, a 1 MB line, malformed JSON, a lone surrogate escape or a line that is not an object is skipped
with its file, line and reason; it never costs the rest of the file. Writers replace their file in one step.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from cadre.config.knowledge import DatasetSource
from cadre.evaluation.results import load_cases, read_split
from cadre.jsonl import MAX_LINE_BYTES, read_json_lines, text_problem, write_jsonl
from cadre.knowledge.sources import SkipReport, iter_source
from cadre.tuning.training_data import read_records

GOOD = [
    {"id": "c1", "phrase": "typhoid endocarditis", "code": "A01.02"},
    {"id": "c2", "phrase": "gout", "code": "M10.9"},
]


def _hostile(path: Path) -> Path:
    """Good lines around every kind of bad one; returns the path."""
    lines = [
        json.dumps(GOOD[0]).encode(),  # 1
        b'{"id": "latin", "phrase": "caf\xe9", "code": "X"}',  # 2: not UTF-8 (Latin-1 byte)
        json.dumps({"id": "huge", "phrase": "y" * 1_000_000, "code": "Y"}).encode(),  # 3: a 1 MB line
        b'{"id": "broken", "phrase": ',  # 4: malformed JSON
        b'{"id": "surrogate", "phrase": "\\ud800", "code": "Z"}',  # 5: a lone surrogate escape
        b"[1, 2, 3]",  # 6: not an object
        b"",  # 7: blank, ignored
        json.dumps(GOOD[1]).encode(),  # 8
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_a_suite_with_a_bad_byte_a_huge_line_and_malformed_json_loads_its_good_lines(tmp_path: Path, caplog) -> None:
    path = _hostile(tmp_path / "test.jsonl")
    read = read_split(tmp_path, "test")
    assert [case["id"] for case in read.cases] == ["c1", "c2"]
    assert [(s.file, s.line) for s in read.skipped] == [(str(path), n) for n in (2, 3, 4, 5, 6)]
    reasons = [s.reason for s in read.skipped]
    assert reasons[0].startswith("not UTF-8: byte 0xe9")
    assert reasons[1].startswith("line is 1,000,0") and f"{MAX_LINE_BYTES:,}-byte limit" in reasons[1]
    assert reasons[2].startswith("invalid JSON")
    assert "lone UTF-16 surrogate (\\ud800)" in reasons[3] and "'phrase'" in reasons[3]
    assert reasons[4] == "expected a JSON object, got list"
    assert str(read.skipped[0]).startswith(f"{path}:2: not UTF-8")

    with caplog.at_level(logging.WARNING, logger="cadre.evaluation"):
        assert [case["id"] for case in load_cases(tmp_path, "test")] == ["c1", "c2"]
    assert "skipped 5 malformed line(s), loaded 2 case(s)" in caplog.text
    for number in (2, 3, 4, 5, 6):
        assert f"{path}:{number}: " in caplog.text, caplog.text


def test_a_line_just_under_the_cap_loads_and_one_just_over_is_skipped(tmp_path: Path) -> None:
    filler = "x" * (MAX_LINE_BYTES - len(json.dumps({"id": "a", "phrase": ""})))
    fits = json.dumps({"id": "a", "phrase": filler})
    over = json.dumps({"id": "b", "phrase": filler + "x"})
    assert len(fits.encode()) == MAX_LINE_BYTES
    (tmp_path / "test.jsonl").write_text(fits + "\r\n" + over + "\n")
    read = read_split(tmp_path, "test")
    assert [case["id"] for case in read.cases] == ["a"]
    assert [s.line for s in read.skipped] == [2]


def test_a_byte_order_mark_and_a_missing_final_newline_are_fine(tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_bytes(
        b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode() + b"\n" + json.dumps(GOOD[1]).encode()
    )
    read = read_split(tmp_path, "test")
    assert [case["id"] for case in read.cases] == ["c1", "c2"] and read.skipped == []


def test_deep_nesting_and_huge_integers_are_bad_lines_not_crashes(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": ' + "[" * 30_000 + "]" * 30_000 + "}\n" + '{"n": ' + "9" * 5000 + "}\n" + '{"ok": 1}\n')
    lines = list(read_json_lines(path))
    assert [(line.line, line.value) for line in lines if line.problem is None] == [(3, {"ok": 1})]
    assert "nested too deeply" in lines[0].problem
    assert lines[1].problem.startswith("invalid JSON")


def test_training_data_files_skip_bad_lines_with_file_and_line(tmp_path: Path) -> None:
    path = _hostile(tmp_path / "extra.jsonl")
    records, skipped = read_records([path])
    assert [(r.line, r.values["id"]) for r in records] == [(1, "c1"), (8, "c2")]
    assert [(s.source, s.line) for s in skipped] == [(str(path), n) for n in (2, 3, 4, 5, 6)]
    assert skipped[0].reason.startswith("not UTF-8")


def _load(source: DatasetSource, root: Path, max_bytes: int = 10_000):
    skips = SkipReport(max_examples=10)
    return list(iter_source(source, root=root, max_document_bytes=max_bytes, skips=skips)), skips


def test_a_jsonl_source_names_file_and_line_of_each_bad_record(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "a", "text": "alpha"}).encode(),
        b'{"id": "latin", "text": "caf\xe9"}',
        json.dumps({"id": "huge", "text": "y" * 200_000}).encode(),  # past 6 x max_document_bytes + 64 KB
        b'{"id": "s", "text": "fine", "tag": "\\udfff"}',  # a lone surrogate in metadata: once a crash in hashing
        b"{oops",
        json.dumps({"id": "b", "text": "beta"}).encode(),
    ]
    (tmp_path / "kb.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    source = DatasetSource(kind="dataset", name="kb", path="kb.jsonl", metadata_fields=["tag"])
    documents, skips = _load(source, tmp_path)
    assert [d.id for d in documents] == ["kb:a", "kb:b"]
    assert skips.counts == {"undecodable": 2, "oversized": 1, "malformed": 1}
    shown = [example for examples in skips.examples.values() for example in examples]
    for number in (2, 3, 4, 5):
        assert any(example.startswith(f"kb:kb.jsonl:{number}") for example in shown), shown


def test_a_csv_source_with_a_bad_byte_in_metadata_or_id_skips_that_row_only(tmp_path: Path) -> None:
    path = tmp_path / "kb.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "tag"])
        writer.writerow(["a", "alpha", "x"])
    with path.open("ab") as handle:
        handle.write(b"b,beta,caf\xe9\r\n")  # a bad byte in a metadata field
        handle.write(b"c\xff,gamma,y\r\n")  # and in the id
        handle.write(b"d,delta,z\r\n")
    source = DatasetSource(kind="dataset", name="kb", path="kb.csv", metadata_fields=["tag"])
    documents, skips = _load(source, tmp_path)
    assert [d.id for d in documents] == ["kb:a", "kb:d"]
    assert skips.counts == {"undecodable": 2}
    assert any(example.startswith("kb:kb.csv:3") for example in skips.examples["undecodable"]), skips.examples


def test_text_problem_finds_surrogates_and_control_characters_anywhere() -> None:
    assert text_problem({"a": ["fine", {"b": "tab\tand\nnewline\r"}]}, controls=True) is None
    assert "\\ud800" in text_problem({"a": ["ok", "x\ud800"]}) and "'a'[1]" in text_problem({"a": ["ok", "x\ud800"]})
    assert "a key" in text_problem({"\udc80": 1})
    assert text_problem("nul\x00") is None, "control characters are only refused when asked"
    assert "\\u0000" in text_problem("nul\x00", controls=True)
    assert "\\u001b" in text_problem("escape\x1b[31m", controls=True)


def test_write_jsonl_skips_what_cannot_be_written_and_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "out" / "pairs.jsonl"
    path.parent.mkdir()
    path.write_text("old content\n")
    written, skipped = write_jsonl(path, [{"a": "fine"}, {"a": "bad \ud800"}, {"a": "ünïcode"}])
    assert written == 2 and [s.row for s in skipped] == [2]
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [
        {"a": "fine"},
        {"a": "ünïcode"},
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.jsonl"], "no temporary file left behind"


def test_an_interrupted_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"kept": true}\n')

    def rows():
        yield {"a": 1}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(path, rows())
    assert path.read_text() == '{"kept": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def test_every_row_is_one_line_for_any_reader_even_with_unicode_line_separators(tmp_path: Path) -> None:
    # Found by the fuzz tier: JSON leaves U+2028, U+0085 raw inside strings, and str.splitlines() (and other
    # readers) split a row there; they are written as \u escapes, the same value on one line.
    rows = [{"a": "one\u2028two"}, {"a": "nel\x85here"}, {"a": "para\u2029graph", "b": "ü"}]
    path = tmp_path / "rows.jsonl"
    assert write_jsonl(path, rows) == (3, [])
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 3
    assert [json.loads(line) for line in text.splitlines()] == rows
    assert "ü" in text, "other non-ASCII text stays readable"
