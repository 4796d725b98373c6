"""Loading every source kind: valid records become documents with stable ids and hashes; bad records
are skipped and counted by reason; an unreadable source raises `SourceError`."""

from __future__ import annotations

import csv
import json
import sqlite3
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from cadre.config.knowledge import DatasetSource, FilesSource, PythonSource, SqlSource
from cadre.knowledge.sources import (
    RetryPolicy,
    SkipReport,
    SourceError,
    content_hash,
    html_to_text,
    iter_source,
    load_documents,
)

FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.01)
MAX_BYTES = 2_000


def load(source, root: Path, **options):
    skips = SkipReport()
    documents = list(
        iter_source(
            source,
            root=root,
            max_document_bytes=options.pop("max_document_bytes", MAX_BYTES),
            skips=skips,
            retry=options.pop("retry", FAST_RETRY),
            **options,
        )
    )
    return documents, skips


# --- files ----------------------------------------------------------------------------------


@pytest.fixture
def docs_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    (folder / "guides").mkdir(parents=True)
    (folder / "notes.txt").write_text("Typhoid fever is caused by Salmonella Typhi.\r\nIt spreads through food.  \n")
    (folder / "guides" / "coding.md").write_text("# Coding guide\n\nUse the most specific billable code.\n")
    (folder / "page.html").write_text(
        "<html><head><title>Appendicitis</title><style>p {color: red}</style><script>var x = 1;</script></head>"
        "<body><h1>Acute appendicitis</h1><p>With generalized <b>peritonitis</b> &amp; abscess.</p></body></html>"
    )
    (folder / "report.pdf").write_bytes(b"%PDF-1.4 not parsed here")
    (folder / "image.bin").write_bytes(b"\x89PNG\r\n")
    (folder / "nul.txt").write_bytes(b"text with a \x00 NUL byte")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (folder / "big.txt").write_text("x" * (MAX_BYTES + 1))
    (folder / "empty.md").write_text("   \n\n")
    (folder / ".hidden.txt").write_text("not a document")
    return folder


def test_files_become_documents_with_relative_path_ids(docs_folder: Path):
    source = FilesSource(kind="files", name="docs", path="docs")
    documents, skips = load(source, docs_folder.parent)
    by_id = {document.id: document for document in documents}
    assert sorted(by_id) == ["docs:guides/coding.md", "docs:notes.txt", "docs:page.html"]
    notes = by_id["docs:notes.txt"]
    assert notes.text == "Typhoid fever is caused by Salmonella Typhi.\nIt spreads through food."
    assert (notes.title, notes.record_id, notes.metadata) == (
        "notes",
        "notes.txt",
        {"path": "notes.txt", "format": "txt"},
    )
    assert by_id["docs:guides/coding.md"].title == "Coding guide"
    page = by_id["docs:page.html"]
    assert page.title == "Appendicitis"
    assert page.text == "Acute appendicitis\nWith generalized peritonitis & abscess."
    assert skips.counts == {"unsupported": 2, "binary": 1, "undecodable": 1, "oversized": 1, "empty": 1}
    assert any("report.pdf" in example and "pypdf" in example for example in skips.examples["unsupported"])


def test_files_glob_selects(docs_folder: Path):
    documents, skips = load(FilesSource(kind="files", name="docs", path="docs", glob="**/*.md"), docs_folder.parent)
    assert [document.id for document in documents] == ["docs:guides/coding.md"]
    assert skips.counts == {"empty": 1}


def test_files_missing_folder_is_a_source_error(tmp_path: Path):
    with pytest.raises(SourceError, match="does not exist"):
        load(FilesSource(kind="files", name="docs", path="nowhere"), tmp_path)


def test_html_to_text_drops_scripts_and_keeps_blocks():
    title, text = html_to_text(
        "<title>T</title><div>one</div><script>evil()</script><ul><li>two</li><li>three</li></ul>"
    )
    assert (title, text) == ("T", "one\ntwo\nthree")


# --- datasets -------------------------------------------------------------------------------


def write_jsonl(path: Path, lines: list) -> None:
    with path.open("wb") as handle:
        for line in lines:
            handle.write(
                line
                if isinstance(line, bytes)
                else (json.dumps(line) if not isinstance(line, str) else line).encode() + b"\n"
            )
            if isinstance(line, bytes):
                handle.write(b"\n")


def test_jsonl_records_and_bad_lines_counted_by_reason(tmp_path: Path):
    write_jsonl(
        tmp_path / "kb.jsonl",
        [
            {"id": "A01.0", "title": "Typhoid fever", "text": "Typhoid fever", "chapter": 1, "tags": ["infectious"]},
            {"id": 7, "text": "Integer ids become strings", "chapter": 2},
            "{not json",
            [1, 2, 3],
            {"title": "no id", "text": "x"},
            {"id": "", "text": "blank id"},
            {"id": "empty", "text": "   "},
            {"id": "nul", "text": "a\u0000b"},
            {"id": "big", "text": "y" * (MAX_BYTES + 1)},
            b'{"id": "latin", "text": "caf\xe9"}',
            "",
        ],
    )
    source = DatasetSource(
        kind="dataset", name="kb", path="kb.jsonl", title_field="title", metadata_fields=["chapter", "tags"]
    )
    documents, skips = load(source, tmp_path)
    assert [document.id for document in documents] == ["kb:A01.0", "kb:7"]
    assert documents[0].metadata == {"chapter": 1, "tags": ["infectious"]}
    assert documents[0].title == "Typhoid fever"
    assert skips.counts == {"malformed": 2, "missing_id": 2, "empty": 1, "binary": 1, "oversized": 1, "undecodable": 1}
    assert skips.total == 8


def test_csv_records_and_malformed_rows(tmp_path: Path):
    with (tmp_path / "kb.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "title", "body", "chapter"])
        writer.writerow(["J18.9", "Pneumonia", "Pneumonia, unspecified organism", "10"])
        writer.writerow(["K35.2", "Appendicitis", "Acute appendicitis with generalized peritonitis"])  # a field short
        writer.writerow(["", "No id", "text", "11"])
        writer.writerow(["K37", "Appendicitis", "Unspecified appendicitis", "11", "extra"])
    source = DatasetSource(
        kind="dataset", name="kb", path="kb.csv", text_fields=["body"], title_field="title", metadata_fields=["chapter"]
    )
    documents, skips = load(source, tmp_path)
    assert [(document.id, document.metadata) for document in documents] == [("kb:J18.9", {"chapter": "10"})]
    assert skips.counts == {"malformed": 2, "missing_id": 1}


def test_csv_without_the_id_column_is_a_source_error(tmp_path: Path):
    (tmp_path / "kb.csv").write_text("code,text\nA,b\n")
    with pytest.raises(SourceError, match="no column"):
        load(DatasetSource(kind="dataset", name="kb", path="kb.csv"), tmp_path)


def test_parquet_and_saved_dataset(tmp_path: Path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"id": ["a", "b", "c"], "text": ["alpha text", None, "gamma text"], "lang": ["en", "en", "fr"]}
    pq.write_table(pa.table(rows), tmp_path / "kb.parquet")
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    for path in ("kb.parquet", "saved"):
        documents, skips = load(DatasetSource(kind="dataset", name="kb", path=path, metadata_fields=["lang"]), tmp_path)
        assert [(document.id, document.text, document.metadata) for document in documents] == [
            ("kb:a", "alpha text", {"lang": "en"}),
            ("kb:c", "gamma text", {"lang": "fr"}),
        ]
        assert skips.counts == {"empty": 1}


def test_dataset_limit_stops_early(tmp_path: Path):
    write_jsonl(tmp_path / "kb.jsonl", [{"id": n, "text": f"record {n}"} for n in range(50)])
    documents, _ = load(DatasetSource(kind="dataset", name="kb", path="kb.jsonl"), tmp_path, limit=5)
    assert [document.record_id for document in documents] == ["0", "1", "2", "3", "4"]


# --- SQL ------------------------------------------------------------------------------------


def make_database(path: Path, rows: list[tuple]) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS codes (code TEXT PRIMARY KEY, title TEXT, description TEXT, chapter INTEGER)"
        )
        connection.executemany("INSERT INTO codes VALUES (?, ?, ?, ?)", rows)


SQL_ROWS = [(f"C{n:02d}", f"Title {n}", f"Description of condition {n}", n % 3) for n in range(10)]


def sql_source(**overrides) -> SqlSource:
    options = {
        "kind": "sql",
        "name": "db",
        "url": "sqlite:///data/kb.db",
        "query": "SELECT * FROM codes ORDER BY code",
        "id_column": "code",
        "text_columns": ["description"],
        "title_column": "title",
        "metadata_columns": ["chapter"],
    }
    return SqlSource(**{**options, **overrides})


def test_sqlite_relative_path_edits_adds_and_deletes(tmp_path: Path):
    (tmp_path / "data").mkdir()
    database = tmp_path / "data" / "kb.db"
    make_database(database, SQL_ROWS)
    before, skips = load(sql_source(), tmp_path)
    assert skips.total == 0
    assert [document.id for document in before] == [f"db:C{n:02d}" for n in range(10)]
    assert before[1].metadata == {"chapter": 1} and before[1].title == "Title 1"

    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE codes SET description = 'Edited description' WHERE code = 'C03'")
        connection.execute("UPDATE codes SET chapter = 9 WHERE code = 'C04'")
        connection.execute("DELETE FROM codes WHERE code IN ('C05', 'C06')")
        connection.execute("INSERT INTO codes VALUES ('C99', 'New', 'A new condition', 1)")
        connection.execute("INSERT INTO codes VALUES ('C98', 'Blank', '', 1)")
    after, skips = load(sql_source(), tmp_path)
    old = {document.id: document.content_hash for document in before}
    new = {document.id: document.content_hash for document in after}
    assert set(new) - set(old) == {"db:C99"}
    assert set(old) - set(new) == {"db:C05", "db:C06"}
    assert {doc_id for doc_id in set(old) & set(new) if old[doc_id] != new[doc_id]} == {"db:C03", "db:C04"}
    assert skips.counts == {"empty": 1}


def test_sql_url_env_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    database = tmp_path / "other.db"
    make_database(database, SQL_ROWS[:2])
    monkeypatch.setenv("CADRE_TEST_KB_URL", f"sqlite:///{database}")
    documents, _ = load(sql_source(url="sqlite:///data/missing.db", url_env="CADRE_TEST_KB_URL"), tmp_path)
    assert len(documents) == 2


def test_unreachable_database_raises_after_retries(tmp_path: Path):
    started = time.monotonic()
    with pytest.raises(SourceError, match="after 3 attempt"):
        load(sql_source(url="sqlite:///data/missing.db"), tmp_path)
    assert time.monotonic() - started < 5
    assert not (tmp_path / "data" / "missing.db").exists()  # never created by connecting
    # Whether the driver is missing or the port refuses, the error is clear and hides the password.
    with pytest.raises(SourceError, match=r"user:\*\*\*@127.0.0.1:1/kb") as error:
        load(
            sql_source(url="postgresql+psycopg2://user:secret@127.0.0.1:1/kb"), tmp_path, retry=RetryPolicy(attempts=1)
        )
    assert "secret" not in str(error.value)


def test_bad_query_and_missing_column_are_source_errors(tmp_path: Path):
    (tmp_path / "data").mkdir()
    make_database(tmp_path / "data" / "kb.db", SQL_ROWS)
    with pytest.raises(SourceError, match="query failed"):
        load(sql_source(query="SELECT * FROM nowhere"), tmp_path)
    with pytest.raises(SourceError, match="no column"):
        load(sql_source(text_columns=["summary"]), tmp_path)


# --- python entrypoints ---------------------------------------------------------------------


@pytest.fixture
def loader_module(tmp_path: Path) -> str:
    name = f"loader_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent("""
        CALLS = []

        def load(prefix="doc", limit=None):
            CALLS.append(limit)
            records = [
                {"id": f"{prefix}1", "title": "One", "text": "first text", "metadata": {"b": 2, "a": 1}},
                "not a dict",
                {"id": None, "text": "no id"},
                {"id": "bad-meta", "text": "x", "metadata": ["not", "a", "dict"]},
                {"id": f"{prefix}2", "text": "second text"},
                {"id": f"{prefix}3", "text": "third text"},
            ]
            return iter(records if limit is None else records[: limit + 4])

        def no_limit():
            yield {"id": "x", "text": "only one"}

        def prioritised(limit=None, priority_ids=()):
            ordered = list(priority_ids) + [f"d{n}" for n in range(10) if f"d{n}" not in priority_ids]
            for doc_id in ordered[:limit]:
                yield {"id": doc_id, "text": f"text of {doc_id}"}

        def broken():
            yield {"id": "ok", "text": "fine"}
            raise RuntimeError("database went away")
    """)
    )
    return name


def test_python_source_with_options_and_bad_records(tmp_path: Path, loader_module: str):
    source = PythonSource(kind="python", name="py", entrypoint=f"{loader_module}:load", options={"prefix": "r"})
    documents, skips = load(source, tmp_path)
    assert [document.id for document in documents] == ["py:r1", "py:r2", "py:r3"]
    assert documents[0].metadata == {"a": 1, "b": 2}
    assert skips.counts == {"malformed": 2, "missing_id": 1}


def test_python_source_receives_the_limit(tmp_path: Path, loader_module: str):
    import importlib

    documents, _ = load(PythonSource(kind="python", name="py", entrypoint=f"{loader_module}:load"), tmp_path, limit=1)
    assert [document.id for document in documents] == ["py:doc1"]
    assert importlib.import_module(loader_module).CALLS == [1]
    documents, _ = load(
        PythonSource(kind="python", name="py", entrypoint=f"{loader_module}:no_limit"), tmp_path, limit=1
    )
    assert len(documents) == 1


def test_under_a_cap_a_python_source_yields_the_priority_ids_first(tmp_path: Path, loader_module: str):
    source = PythonSource(kind="python", name="py", entrypoint=f"{loader_module}:prioritised")
    documents, _ = load(source, tmp_path, limit=3, priority_ids=["d7", "d9"])
    assert [document.id for document in documents] == ["py:d7", "py:d9", "py:d0"]
    own = PythonSource(
        kind="python", name="py", entrypoint=f"{loader_module}:prioritised", options={"priority_ids": ["d5"]}
    )
    documents, _ = load(own, tmp_path, limit=3, priority_ids=["d7", "d9"])  # the source's own option wins
    assert [document.id for document in documents] == ["py:d5", "py:d0", "py:d1"]
    documents, _ = load(source, tmp_path, priority_ids=["d7"])  # no cap: every document, priorities ignored
    assert [document.id for document in documents] == [f"py:d{n}" for n in range(10)]


def test_the_demo_suite_ids_lead_a_capped_icd10_index() -> None:
    from cadre.demo.icd10 import load_documents
    from cadre.knowledge.reindex import suite_relevant_ids

    needed = suite_relevant_ids(Path(__file__).resolve().parents[2] / "evals" / "suites" / "icd10-coder")
    assert len(needed) > 500  # distinct codes of the test and dev cases
    loaded = [d["id"] for d in load_documents(billable_only=True, limit=len(needed), priority_ids=needed)]

    def normal(code):
        return code.replace(".", "")

    assert {normal(c) for c in loaded} == {normal(c) for c in needed}


def test_a_smoke_index_reads_first_the_documents_of_the_cases_the_smoke_cycle_judges(tmp_path: Path) -> None:
    """Under a cap, the cases a smoke run evaluates, shows as demos or trains on come before the rest of the test
    split, so a cap smaller than the test split still answers the optimizer's dev cases and grounds its demos and
    the refresh's examples."""
    from cadre.config import load_config
    from cadre.config.budget import plan_reindex
    from cadre.demo.icd10 import load_documents
    from cadre.evaluation.results import load_cases
    from cadre.knowledge.reindex import smoke_priority_ids, suite_relevant_ids
    from cadre.tuning.finetune import plan_refresh
    from cadre.tuning.training_data import read_first

    for split, ids in (("test", "abcde"), ("dev", "xyz"), ("train", "mn")):
        lines = [json.dumps({"id": f"{split}{n}", "q": "?", "relevant_ids": [i]}) for n, i in enumerate(ids)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert suite_relevant_ids(tmp_path) == list("abcdexyz")
    assert suite_relevant_ids(tmp_path, first={"test": 1, "dev": 2, "train": 1}) == list("axymbcdez")
    then = [{"relevant_ids": ["n"]}]
    assert suite_relevant_ids(tmp_path, first={"test": 1}, then=then) == list("anbcdexyz")

    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "pipelines.yaml")
    coder = config.specialist("icd10-coder")
    plan = plan_reindex(coder, "smoke")
    assert plan_reindex(coder, "full").first_cases == {}
    assert plan.first_cases["test"] >= max(coder.smoke.max_eval_cases, coder.edge.cases)
    assert plan.first_cases["dev"] >= 8  # the smoke optimizer's dev cases
    suite = root / "evals" / "suites" / "icd10-coder"
    needed = smoke_priority_ids(config, coder, plan)
    loaded = {d["id"].replace(".", "") for d in load_documents(limit=plan.max_documents, priority_ids=needed)}
    judged = [case for split, count in plan.first_cases.items() for case in load_cases(suite, split)[:count]]
    assert plan.first_cases["train"] == 16  # the smoke optimizer's train cases: its demos must be grounded
    # The train cases the smoke refresh reads, in its own order: a program answering one of its candidates trains
    # only on cases whose answer the index holds.
    assert plan.refresh_cases == 2 * plan_refresh(coder, "smoke").max_examples > 0
    judged += read_first(load_cases(suite, "train"), ["phrase"], ["code"], coder.tuning.seed, plan.refresh_cases)
    assert len(loaded) == plan.max_documents < len(needed)  # the cap is smaller than the cases' codes
    assert all(code.replace(".", "") in loaded for case in judged for code in case["relevant_ids"])


def test_python_source_failures_are_source_errors(tmp_path: Path, loader_module: str):
    with pytest.raises(SourceError, match="cannot import"):
        load(PythonSource(kind="python", name="py", entrypoint="no_such_module_here:load"), tmp_path)
    with pytest.raises(SourceError, match="has no function"):
        load(PythonSource(kind="python", name="py", entrypoint=f"{loader_module}:missing"), tmp_path)
    with pytest.raises(SourceError, match="database went away"):
        load(PythonSource(kind="python", name="py", entrypoint=f"{loader_module}:broken"), tmp_path)


# --- identity and hashing -------------------------------------------------------------------


def test_content_hash_ignores_metadata_order_and_line_endings(tmp_path: Path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "line one\r\nline two  ", "x": 1, "y": 2}])
    write_jsonl(tmp_path / "b.jsonl", [{"id": 1, "y": 2, "x": 1, "text": "line one\nline two"}])
    hashes = []
    for name in ("a.jsonl", "b.jsonl"):
        documents, _ = load(DatasetSource(kind="dataset", name="kb", path=name, metadata_fields=["x", "y"]), tmp_path)
        hashes.append(documents[0].content_hash)
    assert hashes[0] == hashes[1] == content_hash("", "line one\nline two", {"x": 1, "y": 2})
    assert content_hash("", "line one\nline two", {"x": 2, "y": 2}) != hashes[0]
    assert content_hash("T", "line one\nline two", {"x": 1, "y": 2}) != hashes[0]


def test_duplicate_ids_across_records_are_skipped(tmp_path: Path):
    write_jsonl(
        tmp_path / "kb.jsonl", [{"id": 1, "text": "first"}, {"id": 1, "text": "second"}, {"id": 2, "text": "third"}]
    )
    skips = SkipReport()
    documents = list(
        load_documents(
            [DatasetSource(kind="dataset", name="kb", path="kb.jsonl")],
            root=tmp_path,
            max_document_bytes=MAX_BYTES,
            skips=skips,
        )
    )
    assert [(document.id, document.text) for document in documents] == [("kb:1", "first"), ("kb:2", "third")]
    assert skips.counts == {"duplicate_id": 1}


def test_skip_report_keeps_a_few_examples():
    report = SkipReport()
    for n in range(10):
        report.add("empty", f"kb:{n}")
    assert report.counts == {"empty": 10} and len(report.examples["empty"]) == 3
    assert report.as_dict()["total"] == 10
