"""`cadre validate` finds, with file and line, the mistakes the schema cannot see and a run would fail on."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cadre.config import load_config
from cadre.config.checks import check_config

CADRE = [sys.executable, "-m", "cadre.cli"]


def _project(root: Path, entrypoint: str = "pyhelp_data:load_documents", output: str = "topic") -> Path:
    """A tiny specialist over Python's help topics with a python source, as the issue's user wrote it."""
    (root / "pyhelp_data.py").write_text(
        "def load_documents(limit=None):\n"
        "    for i, topic in enumerate(['lists', 'dicts', 'sets']):\n"
        "        yield {'id': topic, 'text': f'About {topic}.', 'title': topic}\n"
    )
    suite = root / "evals" / "pyhelp"
    suite.mkdir(parents=True)
    for split, topics in {"train": ["lists"], "dev": ["dicts"], "test": ["sets", "lists"]}.items():
        (suite / f"{split}.jsonl").write_text(
            "".join(
                json.dumps({"question": f"how do {t} work ({split} {n})", "topic": t, "relevant_ids": [t]}) + "\n"
                for n, t in enumerate(topics)
            )
        )
    path = root / "pipelines.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            version: 1
            project: {{name: pyhelp, state_dir: state}}
            specialists:
              - name: pyhelp
                description: Names the Python help topic of a question.
                sources:
                  - {{kind: python, name: topics, entrypoint: "{entrypoint}"}}
                program:
                  instruction: Name the help topic.
                  inputs: [{{name: question}}]
                  outputs: [{{name: {output}}}]
                evaluation: {{suite: evals/pyhelp}}
            """
        )
    )
    return path


def _validate(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CADRE, "validate", "-c", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",  # -c alone names the file: nothing is read from the current folder
    )


def test_a_sound_project_is_valid_and_validate_writes_nothing(tmp_path: Path) -> None:
    path = _project(tmp_path)
    assert check_config(load_config(path), deep=True) == []
    result = _validate(path, "--deep")
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stderr
    assert not (tmp_path / "state").exists()


def test_an_entrypoint_that_does_not_import_is_named_with_its_line(tmp_path: Path) -> None:
    path = _project(tmp_path, entrypoint="pyhelp_dta:load_documents")
    result = _validate(path)
    assert result.returncode == 2
    assert f"{path}:7:" in result.stderr, result.stderr
    assert "cannot import 'pyhelp_dta'" in result.stderr


def test_an_entrypoint_naming_no_function_is_found(tmp_path: Path) -> None:
    path = _project(tmp_path, entrypoint="pyhelp_data:load_docs")
    [finding] = check_config(load_config(path))
    assert finding.line == 7 and "has no function 'load_docs'" in finding.message


def test_an_output_field_no_case_has_is_found_at_its_line(tmp_path: Path) -> None:
    path = _project(tmp_path, output="topc")
    result = _validate(path)
    assert result.returncode == 2
    assert f"{path}:11:" in result.stderr and "'topc'" in result.stderr and "every case" in result.stderr


def test_a_missing_split_and_a_malformed_line_are_named(tmp_path: Path) -> None:
    path = _project(tmp_path)
    (tmp_path / "evals" / "pyhelp" / "dev.jsonl").unlink()
    with (tmp_path / "evals" / "pyhelp" / "test.jsonl").open("a") as handle:
        handle.write("{not json\n")
    findings = check_config(load_config(path))
    rendered = [f.render() for f in findings]
    assert any(f.severity == "error" and "dev.jsonl does not exist" in f.message and f.line == 12 for f in findings)
    assert any(f.file.name == "test.jsonl" and f.line == 3 and f.severity == "warning" for f in findings), rendered
    assert _validate(path).returncode == 2


@pytest.mark.parametrize("deep", [False, True])
def test_relevant_ids_no_document_holds_are_found_where_cheap_or_deep(tmp_path: Path, deep: bool) -> None:
    path = _project(tmp_path)
    with (tmp_path / "evals" / "pyhelp" / "test.jsonl").open("a") as handle:
        handle.write(json.dumps({"question": "what is a tuple", "topic": "tuples", "relevant_ids": ["tuples"]}) + "\n")
    findings = check_config(load_config(path), deep=deep)
    if not deep:  # a python source is read only with --deep
        assert findings == []
        return
    [finding] = findings
    assert finding.file.name == "test.jsonl" and finding.line == 3 and "'tuples'" in finding.message
    assert finding.severity == "warning"


def test_train_cases_that_are_documents_need_the_flag_and_the_flag_needs_them(tmp_path: Path) -> None:
    """A train case whose id is a document's would retrieve its own answer in training (no served request does):
    `--deep` says to set `evaluation.train_cases_in_corpus`, and says when the flag is set but leaves nothing out."""
    path = _project(tmp_path)
    train = tmp_path / "evals" / "pyhelp" / "train.jsonl"
    train.write_text(
        json.dumps({"id": "lists", "question": "lists", "topic": "lists", "relevant_ids": ["lists"]}) + "\n"
    )
    [finding] = check_config(load_config(path), deep=True)
    assert finding.field == "specialists.pyhelp.evaluation.train_cases_in_corpus"
    assert finding.file == path and finding.line == 12 and finding.severity == "warning"
    assert "1 of 1 train case ids" in finding.message and "train_cases_in_corpus: true" in finding.message

    path.write_text(
        path.read_text().replace(
            "evaluation: {suite: evals/pyhelp}", "evaluation: {suite: evals/pyhelp, train_cases_in_corpus: true}"
        )
    )
    assert check_config(load_config(path), deep=True) == []

    train.write_text(json.dumps({"id": "t1", "question": "lists", "topic": "lists", "relevant_ids": ["lists"]}) + "\n")
    [finding] = check_config(load_config(path), deep=True)
    assert "leaves nothing out" in finding.message and finding.severity == "warning"


def test_a_learned_ranking_needs_train_cases_with_relevant_ids(tmp_path: Path) -> None:
    path = _project(tmp_path)
    path.write_text(
        path.read_text().replace(
            "evaluation: {suite: evals/pyhelp}", "evaluation: {suite: evals/pyhelp}\n    index: {search_mode: learned}"
        )
    )
    assert check_config(load_config(path)) == []
    train = tmp_path / "evals" / "pyhelp" / "train.jsonl"
    train.write_text(json.dumps({"question": "how do lists work", "topic": "lists"}) + "\n")
    findings = check_config(load_config(path))
    assert [(f.field, f.line) for f in findings] == [("specialists.pyhelp.index.search_mode", 13)]
    assert "fits its ranker on train cases with relevant_ids" in findings[0].message


@pytest.mark.parametrize(
    ("index", "project", "expected"),
    [
        ("{search_mode: hybrid, ranker: {depth: 10}}", "", "ranker settings only apply to search_mode: learned"),
        ("{search_mode: learned, ranker: {depth: 1}}", "", "depth"),
        (
            "{search_mode: learned}",
            ", index: {backend: weaviate, weaviate_url: 'http://localhost:8080'}",
            "needs project.index.backend: lancedb",
        ),
    ],
)
def test_bad_ranking_settings_name_their_line(tmp_path: Path, index: str, project: str, expected: str) -> None:
    path = _project(tmp_path)
    text = path.read_text().replace(
        "evaluation: {suite: evals/pyhelp}", f"evaluation: {{suite: evals/pyhelp}}\n    index: {index}"
    )
    path.write_text(text.replace("state_dir: state}", f"state_dir: state{project}}}"))
    result = _validate(path)
    assert result.returncode == 2, result.stderr
    assert f"{path}:" in result.stderr and expected in result.stderr, result.stderr
