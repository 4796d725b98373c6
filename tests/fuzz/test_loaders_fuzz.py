"""Property-based tests (Hypothesis) of everything that reads files people write: never an exception, every
good line loaded, every bad line reported with its line number.

- suite loader (`read_split`) and training data (`read_records`): any bytes, split into lines;
- JSONL and CSV knowledge sources (`iter_source`): any bytes, and CSV text with any quoting;
- the config loader (`load_config`): the shipped-style file mutated at random, and any text: a config or a
  `ConfigError` whose every issue names file, line and column, never another exception;
- prompt rendering (`cadre.runtime.prompt`): any values render, and completions parse back to what was rendered.

Bounded by `max_examples` (the tier runs in well under two minutes on two shared cores); Hypothesis' own
counts are printed with `--hypothesis-show-statistics`. Run: `python -m pytest -m fuzz tests/fuzz -k "not server"`.
"""

from __future__ import annotations

import json
import os
import tempfile
import textwrap
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the `test` extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cadre.config import ConfigError, load_config  # noqa: E402
from cadre.config.knowledge import DatasetSource  # noqa: E402
from cadre.evaluation.results import read_split  # noqa: E402
from cadre.jsonl import text_problem  # noqa: E402
from cadre.knowledge.sources import SkipReport, iter_source  # noqa: E402
from cadre.runtime.prompt import FieldSpec, PromptSpec, parse_completion, render_completion, render_prompt  # noqa: E402
from cadre.tuning.training_data import read_records  # noqa: E402

pytestmark = [
    pytest.mark.fuzz,
    # mutated YAML reuses anchors (&a ... &a): ruamel warns and takes the later one, as a user's file would
    pytest.mark.filterwarnings("ignore::ruamel.yaml.error.ReusedAnchorWarning"),
]

SCALE = int(os.environ.get("CADRE_FUZZ_SCALE", "1"))
"""Multiplies every example count: `CADRE_FUZZ_SCALE=20` for a deeper run than CI's bounded one."""

FUZZ = settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=150 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- lines ----------------------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=()), max_size=40)  # any code point, lone surrogates included
json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text
json_value = st.recursive(
    json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=8
)


@st.composite
def good_case(draw, number: int) -> dict:
    """A case the loader must keep: a unique id, text values that encode."""
    printable = st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp"))
    phrase = draw(st.text(printable, min_size=1, max_size=30).filter(str.strip))
    return {"id": f"case-{number}", "phrase": phrase, "code": draw(st.sampled_from(["A01.02", "M10.9", "J45.909"]))}


def bad_line() -> st.SearchStrategy[bytes]:
    """Anything but a line end: random bytes, broken JSON, JSON that is not an object or holds a surrogate escape."""
    return st.one_of(
        st.binary(max_size=60),
        json_value.map(lambda v: json.dumps(v).encode()),
        st.text(max_size=30).map(lambda t: ('{"id": "' + t).encode("utf-8", "surrogatepass")),
        st.sampled_from(
            [b'{"id": "s", "phrase": "\\ud800"}', b"\xff\xfe{}", b"[1]", b"null", b"{" * 3000, b"[" * 3000]
        ),
    ).map(lambda raw: raw.replace(b"\n", b" "))


@st.composite
def jsonl_file(draw) -> tuple[bytes, dict[int, dict], set[int]]:
    """(file bytes, {line: good case}, lines that are bad or arbitrary); the file may lack its final newline."""
    kinds = draw(st.lists(st.sampled_from(["good", "bad", "blank"]), max_size=25))
    lines, good, other = [], {}, set()
    for number, kind in enumerate(kinds, start=1):
        if kind == "good":
            case = draw(good_case(number))
            good[number] = case
            lines.append(json.dumps(case, ensure_ascii=draw(st.booleans())).encode())
        elif kind == "bad":
            other.add(number)
            lines.append(draw(bad_line()))
        else:
            lines.append(draw(st.sampled_from([b"", b"  ", b"\t", b"\r"])))
    data = b"\n".join(lines) + (b"\n" if draw(st.booleans()) else b"")
    return data, good, other


def _non_blank(data: bytes) -> set[int]:
    lines = data.split(b"\n")
    lines[0] = lines[0].removeprefix(b"\xef\xbb\xbf")
    return {n for n, raw in enumerate(lines, start=1) if raw.strip()}


@FUZZ
@given(jsonl_file())
def test_the_suite_loader_keeps_every_good_line_and_reports_every_bad_one(file) -> None:
    data, good, other = file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "test.jsonl"
        path.write_bytes(data)
        read = read_split(folder, "test")
    loaded = {case["id"] for case in read.cases}
    assert {case["id"] for case in good.values()} <= loaded, "a good line was lost"
    reported = {s.line for s in read.skipped}
    assert all(s.file == str(path) and s.reason for s in read.skipped)
    # every non-blank line is either a case or a reported skip, never both, never neither
    assert len(read.cases) + len(reported) == len(_non_blank(data))
    assert reported <= other
    for case in read.cases:
        assert text_problem(case) is None
        json.dumps(case, ensure_ascii=False).encode("utf-8")  # whatever loads can be written again


@FUZZ
@given(jsonl_file())
def test_training_data_files_keep_every_good_line_and_report_every_bad_one(file) -> None:
    data, good, other = file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "extra.jsonl"
        path.write_bytes(data)
        records, skipped = read_records([path])
    assert {n: c for n, c in good.items()} == {r.line: r.values for r in records if r.line in good}
    assert {s.line for s in skipped} <= other
    assert len(records) + len(skipped) == len(_non_blank(data))


@FUZZ
@given(jsonl_file())
def test_a_jsonl_source_yields_documents_for_good_lines_and_counts_the_rest(file) -> None:
    data, good, _ = file
    source = DatasetSource(kind="dataset", name="kb", path="kb.jsonl", text_fields=["phrase"], metadata_fields=["code"])
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "kb.jsonl").write_bytes(data)
        skips = SkipReport()
        documents = list(iter_source(source, root=Path(folder), max_document_bytes=10_000, skips=skips))
    ids = [d.record_id for d in documents]
    assert {case["id"] for case in good.values()} <= set(ids), "a good line was lost"
    assert len(documents) + skips.total == len(_non_blank(data)), "every non-blank line is a document or a skip"
    for document in documents:
        json.dumps([document.text, document.title, document.metadata], ensure_ascii=False).encode("utf-8")


csv_cell = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=20),
    st.sampled_from(['"', '""', "a,b", "line\nbreak", "\r\n", "\x00", "'"]),
)


@FEW
@given(
    rows=st.lists(st.lists(csv_cell, min_size=0, max_size=5), max_size=15),
    junk=st.lists(st.binary(max_size=20), max_size=3),
)
def test_a_csv_source_never_raises_on_any_rows_or_bytes(rows, junk) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "text", "tag"])
    writer.writerows(rows)
    data = buffer.getvalue().encode("utf-8") + b"\n".join(junk)
    source = DatasetSource(kind="dataset", name="kb", path="kb.csv", metadata_fields=["tag"])
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "kb.csv").write_bytes(data)
        skips = SkipReport()
        documents = list(iter_source(source, root=Path(folder), max_document_bytes=10_000, skips=skips))
    for document in documents:
        assert text_problem([document.id, document.text, document.title, document.metadata]) is None


# --- config ---------------------------------------------------------------------------------------

VALID = textwrap.dedent(
    """\
    version: 1
    project:
      name: t
      lm: {port: 8088, n_threads: 1}
    defaults:
      tuning: {rank: 8, max_steps: 10}
      schedules:
        refresh: {cron: "0 1 1 * *", timezone: Europe/Berlin}
    specialists:
      - name: coder
        description: a test specialist
        sources:
          - kind: dataset
            name: kb
            path: data/kb.jsonl
        program:
          instruction: Answer the question.
          inputs: [{name: question}]
          outputs: [{name: answer}]
        evaluation:
          suite: evals/suite
        gates:
          program:
            - {metric: exact_match, at_least: 0.1}
        schedules:
          reindex: {cron: "0 3 * * *", timezone: UTC}
    """
)
YAML_PIECES = ["[", "]", "{", "}", ":", ": ", "- ", "#", "&a ", "*a", "!!str ", "'", '"', "\n", "  ", "\t", ",", "?", "|", ">",
               "31 2", "0", "-1", "1e9", "null", "true", "~", "\ud800", "\x00", "\ufeff", "…", "<<: *a"]  # fmt: skip


YAML_LINES = ["<<: *a", "<<: {project: 1}", "x: &a {b: 1}", "- &s {name: a, <<: *s}", "&a [*a]", "? [a, b]", ": 1",
              "schedules: {optimize: {cron: '0 3 31 2 *'}}", "cron: '0 3 30 2 1'", "timezone: Mars/Olympus", "name: [",
              "name: {", "- name: coder", "version: 2", "!!binary aGk=", "%YAML 1.1", "---", "...", "name: x\x00"]  # fmt: skip


@st.composite
def mutated_config(draw) -> str:
    text = VALID
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):  # a whole line, at some indentation, between two lines
            lines = text.split("\n")
            at = draw(st.integers(0, len(lines)))
            lines.insert(at, " " * draw(st.sampled_from([0, 2, 4, 6, 8])) + draw(st.sampled_from(YAML_LINES)))
            text = "\n".join(lines)
            continue
        position = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.sampled_from(YAML_PIECES) | st.text(max_size=4))
        end = min(len(text), position + draw(st.integers(1, 12)))
        if action == "insert":
            text = text[:position] + piece + text[position:]
        elif action == "delete":
            text = text[:position] + text[end:]
        else:
            text = text[:position] + piece + text[end:]
    return text


@pytest.fixture(scope="module")
def config_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-config")
    (root / "data").mkdir()
    (root / "data" / "kb.jsonl").write_text('{"id": "1", "text": "hello"}\n')
    (root / "evals" / "suite").mkdir(parents=True)
    return root


def _load_or_config_error(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as error:
        assert error.issues, "a ConfigError lists at least one issue"
        lines = data.count(b"\n") + 2
        for issue, rendered in zip(error.issues, str(error).splitlines(), strict=True):
            assert 1 <= issue.line <= lines and issue.column >= 1, issue
            assert rendered.startswith(f"{path}:{issue.line}:{issue.column}: "), rendered


@settings(
    max_examples=600 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(mutated_config())
def test_a_mutated_config_loads_or_names_file_line_and_column(config_project: Path, text: str) -> None:
    _load_or_config_error(config_project / "pipelines.yaml", text.encode("utf-8", "surrogatepass"))


@settings(
    max_examples=200 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_as_a_config_load_or_name_file_line_and_column(config_project: Path, data: bytes) -> None:
    _load_or_config_error(config_project / "pipelines.yaml", data)


# --- prompt rendering -------------------------------------------------------------------------------

SINGLE = PromptSpec(
    "Answer with the code.", (FieldSpec("context"), FieldSpec("phrase")), (FieldSpec("code"),), "context"
)
MULTI = PromptSpec(
    "Explain, then answer.", (FieldSpec("question"),), (FieldSpec("reasoning"), FieldSpec("answer_text"))
)
value = st.none() | st.integers() | text | st.text(max_size=40)


def _normalised(item) -> str | None:
    return " ".join(str(item).split()) or None if item is not None else None


@FUZZ
@given(spec=st.sampled_from([SINGLE, MULTI]), inputs=st.dictionaries(st.sampled_from(["phrase", "question", "context"]), value | st.lists(value, max_size=3)),
       outputs=st.dictionaries(st.sampled_from(["code", "reasoning", "answer_text"]), value),
       demos=st.lists(st.dictionaries(st.sampled_from(["phrase", "question", "code", "reasoning", "answer_text"]), value), max_size=2),
       instruction=st.none() | text)  # fmt: skip
def test_any_values_render_and_the_completion_parses_back(spec, inputs, outputs, demos, instruction) -> None:
    prompt = render_prompt(spec, inputs, demos, instruction=instruction)
    assert prompt.endswith(f"\n{spec.outputs[0].label}:")
    completion = render_completion(spec, outputs)
    assert completion.endswith(spec.stop[0])
    parsed = parse_completion(spec, completion)
    assert parsed == {f.name: _normalised(outputs.get(f.name)) for f in spec.outputs}


@FEW
@given(st.text(max_size=80))
def test_any_completion_text_parses_without_raising(completion: str) -> None:
    for spec in (SINGLE, MULTI):
        parsed = parse_completion(spec, completion)
        assert set(parsed) == {f.name for f in spec.outputs}
