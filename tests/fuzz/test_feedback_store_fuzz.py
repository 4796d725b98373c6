"""Property-based tests (Hypothesis) of the feedback store: any text is either stored and exported round-trip,
or refused with `InvalidFeedback` with nothing stored; never stored-then-unexportable.

Run: `python -m pytest -m fuzz tests/fuzz/test_feedback_store_fuzz.py --hypothesis-show-statistics`
"""

from __future__ import annotations

import io
import itertools
import json
import os
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the `test` extra")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cadre.feedback.store import (  # noqa: E402
    FeedbackStore,
    InvalidFeedback,
    ServedResponse,
    UnstorableResponse,
    corrections,
    default_store_url,
    preference_pairs,
)
from cadre.jsonl import write_jsonl  # noqa: E402
from cadre.runtime.prompt import FieldSpec, PromptSpec  # noqa: E402

pytestmark = pytest.mark.fuzz

SCALE = int(os.environ.get("CADRE_FUZZ_SCALE", "1"))
"""Multiplies every example count: `CADRE_FUZZ_SCALE=20` for a deeper run than CI's bounded one."""

SPEC = PromptSpec("Answer.", (FieldSpec("phrase"),), (FieldSpec("code"),), None)
any_text = st.text(st.characters(exclude_categories=()), max_size=50) | st.sampled_from(
    ["A01.02", "\ud800", "a\udfffb", "nul\x00", "esc\x1b[0m", "tab\tnew\nline\r", "line\u2028sep", "nel\x85", "🦠", ""]
)  # any code point (lone surrogates, NUL, controls included), and the cases that matter most
long_text = st.builds(lambda unit, n: unit * n, st.sampled_from(["a", "é", "🦠", "\t"]), st.integers(3990, 4010))
valid_rating = st.sampled_from([-1, 0, 1])
rating = st.one_of(valid_rating, valid_rating, valid_rating, st.sampled_from([2, -2, True, False, 1.0, 0.0, "1", None]))
correction = st.none() | st.dictionaries(st.sampled_from(["code", "other", "\ud800"]), any_text | long_text, max_size=2)
comment = st.none() | any_text | long_text
_ids = itertools.count()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> FeedbackStore:
    return FeedbackStore(default_store_url(tmp_path_factory.mktemp("fuzz-store")))


def _served(response_id: str, phrase: str) -> ServedResponse:
    return ServedResponse(
        id=response_id,
        specialist=response_id,  # one specialist per example: each example reads and exports only its own rows
        requested_model="auto",
        program_version=None,
        index_version=None,
        adapter_version=None,
        inputs={"phrase": phrase},
        prompt=f"Phrase: {phrase}\nCode:",
        completion=" A00",
        answer="A00",
        outputs={"code": "A00"},
    )


@settings(max_examples=400 * SCALE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(phrase=any_text, rating=rating, correction=correction, comment=comment)
def test_feedback_is_stored_and_exported_round_trip_or_refused_with_nothing_stored(
    store: FeedbackStore, phrase, rating, correction, comment
) -> None:
    response_id = f"r{next(_ids)}"
    try:
        store.record_response(_served(response_id, phrase))
    except UnstorableResponse:
        assert store.get_response(response_id) is None
        event("response refused (not text)")
        return
    try:
        feedback_id = store.add_feedback(response_id, rating, correction, comment)
    except InvalidFeedback as error:
        assert str(error)
        event(f"feedback refused: {str(error).split()[0].split('[')[0]}")
        after = store.read_feedback(response_id)
        assert after.records == [] and after.skipped == [], "refused feedback left a row"
        return
    out = io.StringIO()
    exported = store.export_jsonl(out, specialist=response_id)
    assert exported.written == 1 and exported.skipped == [], f"stored but unusable: {exported.skipped}"
    out.getvalue().encode("utf-8")
    (line,) = out.getvalue().splitlines()
    row = json.loads(line)
    assert row["feedback_id"] == feedback_id
    event("stored and exported")
    assert (row["rating"], row["correction"], row["comment"]) == (rating, correction, comment)
    assert row["response"]["inputs"] == {"phrase": phrase}


def test_what_the_store_holds_after_fuzzing_trains(store: FeedbackStore, tmp_path: Path) -> None:
    """Everything the fuzzing left in the store becomes corrections, preference pairs and a written file."""
    read = store.read_feedback()
    found, counts = corrections(read.records, ["code"])
    pairs = preference_pairs(found, SPEC)
    written, skipped = write_jsonl(tmp_path / "pairs.jsonl", (vars(p) for p in pairs))
    assert read.skipped == [] and skipped == [] and written == len(pairs)
    print(f"store after fuzzing: {counts['records']} feedback records, {len(pairs)} preference pairs written")
