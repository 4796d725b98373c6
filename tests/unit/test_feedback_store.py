"""The feedback store: responses and feedback survive a reopen, export as a dataset, and become pairs and cases."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cadre.feedback.store import (
    FEEDBACK_SLICE,
    FeedbackStore,
    InvalidFeedback,
    ServedResponse,
    UnknownResponse,
    corrections,
    default_store_url,
    feedback_cases,
    preference_pairs,
)
from cadre.runtime.prompt import FieldSpec, PromptSpec, render_completion, render_prompt

SPEC = PromptSpec(
    "Answer with the ICD-10-CM code.",
    (FieldSpec("context", "retrieved passages"), FieldSpec("phrase")),
    (FieldSpec("code"),),
    "context",
)


def _served(response_id: str, phrase: str, code: str | None, specialist: str = "coder") -> ServedResponse:
    return ServedResponse(
        id=response_id,
        specialist=specialist,
        requested_model="auto",
        program_version="3",
        index_version="v1",
        adapter_version=None,
        inputs={"phrase": phrase},
        prompt=f"Phrase: {phrase}\nCode:",
        completion=f" {code}",
        answer=code or "",
        outputs={"code": code},
        retrieved_ids=["A01.02"],
        prompt_tokens=10,
        completion_tokens=3,
        latency_ms=12.5,
    )


def test_responses_and_feedback_survive_reopening_the_store(tmp_path: Path) -> None:
    url = default_store_url(tmp_path)
    store = FeedbackStore(url)
    store.record_response(_served("chatcmpl-1", "typhoid endocarditis", "A01.0"))
    first = store.add_feedback("chatcmpl-1", -1, {"code": "A01.02"}, comment="the heart one")
    store.close()

    reopened = FeedbackStore(url)
    served = reopened.get_response("chatcmpl-1")
    assert served is not None and served.outputs == {"code": "A01.0"} and served.index_version == "v1"
    assert served.created_at.tzinfo is not None
    records = reopened.feedback()
    assert [(r.feedback_id, r.rating, r.correction, r.comment) for r in records] == [
        (first, -1, {"code": "A01.02"}, "the heart one")
    ]
    assert records[0].response["inputs"] == {"phrase": "typhoid endocarditis"}
    assert records[0].response["program_version"] == "3"
    assert Path(url.removeprefix("sqlite:///")).is_file()


def test_feedback_for_an_unknown_response_or_with_bad_values_is_refused(tmp_path: Path) -> None:
    store = FeedbackStore(default_store_url(tmp_path))
    store.record_response(_served("chatcmpl-1", "x", "A00"))
    with pytest.raises(UnknownResponse):
        store.add_feedback("chatcmpl-unknown", -1)
    with pytest.raises(InvalidFeedback, match="rating"):
        store.add_feedback("chatcmpl-1", 5)
    with pytest.raises(InvalidFeedback, match="'reason'"):
        store.add_feedback("chatcmpl-1", -1, {"reason": "x"})
    assert store.feedback() == []


def test_export_writes_one_json_line_per_feedback_filtered_by_specialist(tmp_path: Path) -> None:
    store = FeedbackStore(default_store_url(tmp_path))
    store.record_response(_served("r1", "a", "A00", specialist="coder"))
    store.record_response(_served("r2", "b", "B00", specialist="other"))
    store.add_feedback("r1", 1)
    store.add_feedback("r2", -1, {"code": "B01"})
    out = io.StringIO()
    assert store.export_jsonl(out, specialist="coder").written == 1
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["response_id"], r["rating"], r["response"]["specialist"]) for r in rows] == [("r1", 1, "coder")]
    everything = io.StringIO()
    assert store.export_jsonl(everything).written == 2


def test_cli_export_writes_the_dataset_file(tmp_path: Path) -> None:
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
    store = FeedbackStore(default_store_url(tmp_path / "state"))
    store.record_response(_served("r1", "a", "A00"))
    store.add_feedback("r1", -1, {"code": "A01"})
    store.close()
    out = tmp_path / "feedback.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cadre.cli",
            "feedback",
            "export",
            "-c",
            str(tmp_path / "pipelines.yaml"),
            "--specialist",
            "coder",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 1 feedback record" in done.stderr
    row = json.loads(out.read_text())
    assert row["correction"] == {"code": "A01"} and row["response"]["answer"] == "A00"


def _records(tmp_path: Path, feedback: list[tuple[str, str, str | None, int, dict | None]]):
    store = FeedbackStore(default_store_url(tmp_path))
    for response_id, phrase, answer, rating, correction in feedback:
        if store.get_response(response_id) is None:
            store.record_response(_served(response_id, phrase, answer))
        store.add_feedback(response_id, rating, correction)
    return store.feedback()


def test_corrections_keep_the_latest_per_input_and_skip_what_teaches_nothing(tmp_path: Path) -> None:
    records = _records(
        tmp_path,
        [
            ("r1", "typhoid endocarditis", "A01.0", -1, {"code": "A01.09"}),
            ("r2", "acute appendicitis", "K35.80", 1, None),  # a rating without correction
            ("r3", "cholera", "A00.9", -1, {"code": "A00.9"}),  # the correction equals the answer
            ("r4", "typhoid endocarditis", "A01.0", -1, {"code": "A01.02"}),  # same input corrected later: wins
            ("r5", "gout", None, -1, {"code": "M10.9"}),  # the model produced nothing
        ],
    )
    found, counts = corrections(records, ["code"])
    assert [(c.response_id, c.inputs["phrase"], c.corrected["code"]) for c in found] == [
        ("r4", "typhoid endocarditis", "A01.02"),
        ("r5", "gout", "M10.9"),
    ]
    assert counts == {"records": 5, "without_correction": 1, "same_as_answer": 1, "superseded": 1, "incomplete": 0}
    assert found[0].versions == {"program": "3", "index": "v1", "adapter": None}


def test_pairs_use_the_shared_prompt_format_and_cases_form_the_feedback_slice(tmp_path: Path) -> None:
    records = _records(
        tmp_path,
        [("r1", "typhoid endocarditis", "A01.0", -1, {"code": "A01.02"}), ("r2", "gout", None, -1, {"code": "M10.9"})],
    )
    found, _ = corrections(records, ["code"])
    demos = [{"context": ["A00.0 — Cholera"], "phrase": "cholera", "code": "A00.0"}]
    passages = {
        "typhoid endocarditis": ["A01.02 — Typhoid fever with heart involvement"],
        "gout": ["M10.9 — Gout, unspecified"],
    }
    pairs = preference_pairs(
        found, SPEC, retrieve=lambda inputs: passages[inputs["phrase"]], demos=demos, instruction="Code it."
    )
    first = pairs[0]
    assert first.prompt == render_prompt(
        SPEC,
        {"context": passages["typhoid endocarditis"], "phrase": "typhoid endocarditis"},
        demos,
        instruction="Code it.",
    )
    assert first.chosen == render_completion(SPEC, {"code": "A01.02"}) == " A01.02\n"
    assert first.rejected == " A01.0\n"
    assert pairs[1].rejected == render_completion(SPEC, {"code": ""})
    with pytest.raises(ValueError, match="retriever"):
        preference_pairs(found, SPEC)

    cases = feedback_cases(found, ["code"])
    assert cases == [
        {"id": "feedback:r1", "slice": FEEDBACK_SLICE, "phrase": "typhoid endocarditis", "code": "A01.02"},
        {"id": "feedback:r2", "slice": FEEDBACK_SLICE, "phrase": "gout", "code": "M10.9"},
    ]
