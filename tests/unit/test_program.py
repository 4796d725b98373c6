"""The specialist program's DSPy pieces on the real packaged model (llama.cpp in-process, 1 thread).

What a user would notice: the prompt DSPy sends is exactly the shared prompt format (what the
adapter is fine-tuned on), an unreadable answer is a wrong answer and not a crash, a re-run with the
same inputs makes no LM call, and a budget stops the run before the call that would break it, with
the best program found so far.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import dspy
import pytest

from cadre.config import EvaluationSettings, ProgramSettings, load_config
from cadre.prompts.optimize import compile_program, grounded_train_examples, plan_optimization
from cadre.prompts.program import (
    Budget,
    BudgetExhausted,
    CompletionAdapter,
    CompletionLM,
    LMUnreachable,
    SpecialistProgram,
    load_program,
    make_signature,
    program_context,
    program_fingerprint,
    save_program,
    use_disk_cache,
)
from cadre.runtime.lm import EndpointClient, LlamaCppClient
from cadre.runtime.prompt import PromptSpec, parse_completion, render_prompt

ROOT = Path(__file__).resolve().parents[2]
# DSPy 3.4 warns on every BaseLM.forward subclass (the interface goes in 3.5); CompletionLM is one on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Implementing custom LMs through BaseLM.forward:DeprecationWarning")

ICD = ProgramSettings(
    instruction="Given a clinical phrase and candidate ICD-10-CM codes, answer with the single billable code.",
    inputs=[{"name": "phrase", "description": "a diagnosis as a clinician writes it"}],
    outputs=[{"name": "code", "description": "one ICD-10-CM code"}],
    retrieve_k=3,
    max_tokens=8,
)
NO_RETRIEVAL = ICD.model_copy(update={"retrieve_k": 0})
CANDIDATES = [
    "A01.02 — Typhoid fever with heart involvement",
    "A01.03 — Typhoid pneumonia",
    "A01.09 — Typhoid fever with other complications",
]
DEMO = {"context": CANDIDATES, "phrase": "typhoid endocarditis", "code": "A01.02"}
TRAIN = [
    {"id": "t1", "phrase": "Cholera due to Vibrio cholerae 01, biovar cholerae", "code": "A00.0"},
    {"id": "t2", "phrase": "Typhoid fever, unspecified", "code": "A01.00"},
    {"id": "t3", "phrase": "Typhoid meningitis", "code": "A01.01"},
    {"id": "t4", "phrase": "Paratyphoid fever A", "code": "A01.1"},
    {"id": "t5", "phrase": "Salmonella enteritis", "code": "A02.0"},
    {"id": "t6", "phrase": "Shigellosis due to Shigella dysenteriae", "code": "A03.0"},
]
DEV = [
    {"id": "d1", "phrase": "Typhoid pneumonia", "code": "A01.03"},
    {"id": "d2", "phrase": "Salmonella sepsis", "code": "A02.1"},
    {"id": "d3", "phrase": "Amoebic dysentery", "code": "A06.0"},
]


@pytest.fixture(scope="session")
def client(gguf: Path) -> LlamaCppClient:
    return LlamaCppClient(gguf, n_threads=1, n_ctx=1024)


@pytest.fixture()
def cache_dir(tmp_path: Path) -> Path:
    return use_disk_cache(tmp_path / "dspy-cache")


def lm_for(client: LlamaCppClient, budget: Budget | None = None, max_tokens: int = 8) -> CompletionLM:
    return CompletionLM(client, model_id="llama.cpp:test-gemma3-270m", max_tokens=max_tokens, budget=budget)


# --------------------------------------------------------------------------------------- format


def test_signature_renders_as_the_settings_prompt_spec() -> None:
    signature = make_signature(ICD)
    assert signature.__doc__.strip() == ICD.instruction
    assert list(signature.input_fields) == ["context", "phrase"]
    assert CompletionAdapter("context").prompt_spec(signature) == PromptSpec.from_settings(ICD)


def test_adapter_formats_exactly_the_shared_prompt_as_one_message() -> None:
    signature = make_signature(ICD).with_instructions("Answer with the code only.")
    adapter = CompletionAdapter("context")
    question = {"context": CANDIDATES, "phrase": "typhoid pneumonia"}
    messages = adapter.format(signature, [DEMO, dspy.Example(**DEMO, augmented=True)], question)
    assert len(messages) == 1 and messages[0]["role"] == "user"
    assert messages[0]["content"] == render_prompt(
        PromptSpec.from_settings(ICD), question, [DEMO, DEMO], instruction="Answer with the code only."
    )
    assert messages[0]["content"].endswith("Phrase: typhoid pneumonia\nCode:")


def test_parse_reads_the_answer_and_never_raises() -> None:
    signature = make_signature(ICD)
    adapter = CompletionAdapter("context")
    assert adapter.parse(signature, " A01.02\n") == {"code": "A01.02"}
    assert adapter.parse(signature, "") == {"code": None}
    assert adapter.parse(signature, "\n---\nPhrase: more") == {"code": None}
    assert adapter.parse(signature, None) == {"code": None}


# ------------------------------------------------------------------------------- real model calls


def test_predict_round_trip_through_dspy_sends_the_shared_prompt(client: LlamaCppClient, cache_dir: Path) -> None:
    lm = lm_for(client)
    predict = dspy.Predict(make_signature(ICD))
    predict.demos = [dspy.Example(**DEMO)]
    with program_context(lm, ICD):
        prediction = predict(context=CANDIDATES, phrase="Typhoid pneumonia")
    sent = lm.history[-1]["prompt"]
    assert sent == render_prompt(
        PromptSpec.from_settings(ICD), {"context": CANDIDATES, "phrase": "Typhoid pneumonia"}, [DEMO]
    )
    completion = client.complete(sent, max_tokens=8, stop=["\n"])
    assert prediction.code == parse_completion(PromptSpec.from_settings(ICD), completion.text)["code"]
    assert lm.usage.calls == 1 and lm.usage.prompt_tokens > 50 and lm.usage.completion_tokens >= 1


def test_rerun_with_same_inputs_makes_no_lm_call(client: LlamaCppClient, cache_dir: Path) -> None:
    phrases = ["Typhoid pneumonia", "Salmonella sepsis", "Amoebic dysentery"]
    program = SpecialistProgram(NO_RETRIEVAL)
    first = lm_for(client)
    with program_context(first, NO_RETRIEVAL):
        answers = [program(phrase=p).code for p in [*phrases, phrases[0]]]
    assert (first.usage.calls, first.usage.cache_hits) == (3, 1)

    dspy.cache.reset_memory_cache()  # what a new process sees: the disk cache only
    again = lm_for(client)
    with program_context(again, NO_RETRIEVAL):
        assert [program(phrase=p).code for p in phrases] == answers[:3]
    assert (again.usage.calls, again.usage.cache_hits, again.usage.tokens) == (0, 3, 0)
    # A cached answer still reports what it cost the model the first time, so latency gates judge the model.
    first_three = first.usage.lm_seconds
    assert again.usage.lm_seconds == 0 and again.usage.replayed_seconds == pytest.approx(first_three, rel=1e-6)
    assert again.usage.replayed_seconds > 0


def test_a_cached_evaluation_reports_the_models_latency(client: LlamaCppClient, cache_dir: Path) -> None:
    from cadre.prompts.optimize import evaluate_program

    evaluation = EvaluationSettings(suite="evals/suites/icd10-coder", answer_metrics=["exact_match"])
    program = SpecialistProgram(NO_RETRIEVAL)
    cold = evaluate_program(program, NO_RETRIEVAL, evaluation, lm_for(client), DEV, "cold")
    dspy.cache.reset_memory_cache()
    warm = evaluate_program(program, NO_RETRIEVAL, evaluation, lm_for(client), DEV, "warm")
    assert warm.usage.calls == 0 and warm.usage.cache_hits == len(DEV)
    cold_p50, warm_p50 = cold.result.scores["latency_p50_ms"], warm.result.scores["latency_p50_ms"]
    assert warm_p50 == pytest.approx(cold_p50, rel=0.5) and warm_p50 > 5  # not the microseconds of a cache read


def test_budget_stops_before_the_call_that_would_exceed_it(client: LlamaCppClient, cache_dir: Path) -> None:
    lm = lm_for(client, Budget(max_lm_calls=2).start())
    program = SpecialistProgram(NO_RETRIEVAL)
    devset = [dspy.Example(phrase=case["phrase"], code=case["code"]).with_inputs("phrase") for case in DEV]
    with program_context(lm, NO_RETRIEVAL), pytest.raises(BudgetExhausted, match="2 of 2 calls"):
        # DSPy's evaluator catches Exception per example; the budget stop must pass through it.
        dspy.Evaluate(
            devset=devset, metric=lambda example, prediction, trace=None: 0.0, num_threads=1, display_progress=False
        )(program)
    assert lm.usage.calls == 2
    assert not issubclass(BudgetExhausted, Exception)

    out_of_time = lm_for(client, Budget(max_wall_seconds=0).start())
    with program_context(out_of_time, NO_RETRIEVAL), pytest.raises(BudgetExhausted, match="wall-time"):
        program(phrase="Typhoid meningitis")
    assert out_of_time.usage.calls == 0


def test_unreachable_endpoint_stops_the_run(cache_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket closes
    lm = CompletionLM(
        EndpointClient(f"http://127.0.0.1:{port}/v1", "gemma3-270m", retries=0, timeout_s=2),
        model_id="endpoint:none",
        max_tokens=4,
    )
    with program_context(lm, NO_RETRIEVAL), pytest.raises(LMUnreachable, match="failed after 1 attempts"):
        SpecialistProgram(NO_RETRIEVAL)(phrase="Typhoid meningitis")


# ------------------------------------------------------------------------------------ save / load


def test_program_saves_as_json_and_loads_back(tmp_path: Path) -> None:
    program = SpecialistProgram(NO_RETRIEVAL)
    program.answer.signature = program.answer.signature.with_instructions("Answer with the ICD-10-CM code only.")
    program.answer.demos = [dspy.Example(phrase="typhoid endocarditis", code="A01.02", augmented=True)]
    path = tmp_path / "program.json"
    fingerprint = save_program(program, path)
    state = json.loads(path.read_text())  # JSON, not a pickle
    assert state["answer"]["demos"][0]["code"] == "A01.02"
    loaded = load_program(path, NO_RETRIEVAL)
    assert loaded.answer.signature.instructions == "Answer with the ICD-10-CM code only."
    assert loaded.answer.demos[0]["phrase"] == "typhoid endocarditis"
    assert program_fingerprint(path) == fingerprint
    assert save_program(loaded, tmp_path / "again.json") == fingerprint


# ---------------------------------------------------------------------------------------- compile


def test_compile_stops_at_the_budget_and_a_rerun_makes_no_lm_call(
    client: LlamaCppClient, cache_dir: Path, tmp_path: Path
) -> None:
    settings = NO_RETRIEVAL.model_copy(
        update={
            "optimizer": NO_RETRIEVAL.optimizer.model_copy(
                update={
                    "kind": "bootstrap_random_search",
                    "max_bootstrapped_demos": 1,
                    "max_labeled_demos": 1,
                    "num_candidate_programs": 2,
                }
            )
        }
    )
    evaluation = EvaluationSettings(suite="evals/suites/icd10-coder", answer_metrics=["exact_match"])

    first = compile_program(settings, evaluation, None, lm_for(client, Budget(max_lm_calls=8)), TRAIN, DEV)
    assert first.stopped_by_budget and "8 of 8" in first.stop_reason
    assert first.usage.requests == 8 and 0 < first.usage.calls <= 8
    assert first.candidates, "the un-optimized program was scored on dev before the budget ran out"
    assert first.dev_score is not None
    path = tmp_path / "first.json"
    save_program(first.program, path)

    dspy.cache.reset_memory_cache()
    second = compile_program(settings, evaluation, None, lm_for(client, Budget(max_lm_calls=8)), TRAIN, DEV)
    assert (second.usage.calls, second.usage.cache_hits) == (0, 8)
    assert save_program(second.program, tmp_path / "second.json") == program_fingerprint(path)


def test_optimizer_learns_only_from_train_cases_their_passages_can_answer() -> None:
    """A labeled demo whose answer is not among its candidates teaches a small model to invent codes."""
    from cadre.prompts.program import Passage

    shelf = {
        "Typhoid meningitis": ["A01.01", "A01.02"],
        "Paratyphoid fever A": ["A01.4", "A01.2"],
        "Salmonella enteritis": ["A02.0"],
    }

    def retrieve(query: str, k: int) -> list[Passage]:
        return [Passage(code, f"title of {code}") for code in shelf.get(query, [])][:k]

    cases = [{**case, "relevant_ids": [case["code"]]} for case in TRAIN[2:5]] + [
        {"id": "t9", "phrase": "Typhoid meningitis", "code": "A01.01"}
    ]
    kept, left_out = grounded_train_examples(cases, ICD, retrieve)
    assert [example.id for example in kept] == ["t3", "t5", "t9"] and left_out == 1  # t4's code A01.1 was not retrieved
    assert kept[0].context == ["A01.01 — title of A01.01", "A01.02 — title of A01.02"]
    assert grounded_train_examples(cases, NO_RETRIEVAL, None)[1] == 0
    nothing_found, _ = grounded_train_examples(cases[1:2], ICD, retrieve)
    assert [example.id for example in nothing_found] == ["t4"]  # none grounded: all kept rather than none


def test_plans_read_the_optimizer_settings_and_the_smoke_budget() -> None:
    specialist = load_config(ROOT / "pipelines.yaml").specialist("icd10-coder")
    optimizer, smoke = specialist.program.optimizer, specialist.smoke
    full = plan_optimization(specialist, "full")
    assert (full.train_cases, full.dev_cases, full.test_cases) == (
        optimizer.train_cases,
        optimizer.dev_cases,
        specialist.evaluation.max_cases,
    )
    assert (full.max_lm_calls, full.max_wall_seconds) == (optimizer.max_lm_calls, optimizer.max_wall_seconds)
    quick = plan_optimization(specialist, "smoke")
    assert (quick.test_cases, quick.max_lm_calls, quick.max_wall_seconds) == (
        smoke.max_eval_cases,
        smoke.max_lm_calls,
        smoke.max_wall_seconds,
    )
    assert quick.train_cases <= 16 and quick.dev_cases <= 12
    # The full run chooses among the declared depths; a smoke run chooses the answer mode at the serving depth only.
    assert full.choice_depths is None and quick.choice_depths == [specialist.program.retrieve_k]
    assert quick.budget().max_lm_calls == smoke.max_lm_calls and quick.budget().started_at is None
    with pytest.raises(ValueError, match="unknown budget"):
        plan_optimization(specialist, "huge")


def test_the_refresh_reads_a_retrieving_champions_prompt_without_an_index(tmp_path: Path) -> None:
    """The refresh renders its training prompts with the champion's instruction and demos; reading them needs no index."""
    from cadre.runtime.serving_prompt import read_serving_prompt

    program = SpecialistProgram(ICD, lambda query, k: [])
    program.answer.demos = [dspy.Example(**DEMO)]
    program.answer.signature = program.answer.signature.with_instructions("Pick the code of the phrase.")
    save_program(program, tmp_path / "program.json")
    prompt = read_serving_prompt(ICD, tmp_path / "program.json")
    assert prompt.instruction == "Pick the code of the phrase."
    assert [demo["code"] for demo in prompt.demos] == ["A01.02"]
    declared = read_serving_prompt(ICD, None)
    assert declared.instruction == ICD.instruction and declared.demos == ()
