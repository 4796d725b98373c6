"""The shared prompt format: what inference sends is exactly what fine-tuning trains on."""

from __future__ import annotations

from cadre.runtime.prompt import (
    FieldSpec,
    PromptSpec,
    parse_completion,
    render_completion,
    render_prompt,
)

ICD = PromptSpec(
    instruction="Answer with the ICD-10-CM code.",
    inputs=(FieldSpec("candidates"), FieldSpec("phrase")),
    outputs=(FieldSpec("code"),),
    context_field="candidates",
)
DEMO = {
    "candidates": ["A01.02 — Typhoid fever with heart involvement", "A01.03 — Typhoid pneumonia"],
    "phrase": "typhoid endocarditis",
    "code": "A01.02",
}


def test_prompt_ends_where_the_answer_starts() -> None:
    prompt = render_prompt(
        ICD, {"candidates": ["K35.20 — Acute appendicitis"], "phrase": "appendicitis\nacute"}, [DEMO]
    )
    assert prompt.startswith("Answer with the ICD-10-CM code.\n\n---\n\n")
    assert prompt.endswith("Candidates:\n[1] K35.20 — Acute appendicitis\nPhrase: appendicitis acute\nCode:")
    assert "Phrase: typhoid endocarditis\nCode: A01.02" in prompt
    assert prompt.count("\n---\n") == 2


def test_prompt_plus_target_equals_a_rendered_demo() -> None:
    """Training text (prompt + completion) is the same text the model sees as a demo at inference."""
    question = {k: DEMO[k] for k in ("candidates", "phrase")}
    trained = render_prompt(ICD, question) + render_completion(ICD, {"code": "A01.02"})
    as_demo = render_prompt(ICD, {"candidates": [], "phrase": "x"}, [DEMO])
    demo_block = as_demo.split("\n\n---\n\n")[1]
    assert trained.split("\n\n---\n\n")[1] == demo_block + "\n"
    assert ICD.stop == ["\n"]


def test_parse_single_and_multiple_outputs() -> None:
    assert parse_completion(ICD, " A01.02\nPhrase: junk") == {"code": "A01.02"}
    assert parse_completion(ICD, "") == {"code": None}
    assert parse_completion(ICD, "\n\n") == {"code": None}
    two = PromptSpec("Classify.", (FieldSpec("text"),), (FieldSpec("label"), FieldSpec("reason_text")))
    completion = render_completion(two, {"label": "spam", "reason_text": "sells pills"})
    assert completion == " spam\nReason text: sells pills\n\n"
    assert parse_completion(two, completion) == {"label": "spam", "reason_text": "sells pills"}
    assert parse_completion(two, " spam") == {"label": "spam", "reason_text": None}
    assert two.stop == ["\n\n", "\n---"]


def test_unicode_and_empty_context() -> None:
    prompt = render_prompt(ICD, {"candidates": [], "phrase": "Ménière’s disease"})
    assert "Candidates: (none)\nPhrase: Ménière’s disease\nCode:" in prompt
