"""Answers that cannot be invented, and never serving worse than the retriever (issue #13, items 2, 3, 5, 6).

- `cadre validate` refuses an answer restricted to the retrieved ids on a program that retrieves nothing or has
  two outputs, and a `beat_baseline: retrieval` rule it cannot judge, each with file, line and what would be right;
- on the real packaged model (llama.cpp in process), a prompt whose free answer is an invented code answers one of
  the candidates when constrained by the grammar or scored, and the same rule runs through the server's engine;
- the optimize flow's dev choice keeps the best answer mode and depth, records it in the program JSON, and every
  reader of the JSON answers with it;
- the `beat_baseline: retrieval` gate refuses a candidate that loses to the first hit's id, passes a tie, and
  fails when the baseline was never scored.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from cadre.cli import main
from cadre.config import ProgramSettings
from cadre.config.evaluation import GateRule
from cadre.evaluation.comparison import outside_candidates
from cadre.evaluation.gates import decide
from cadre.evaluation.results import Prediction, evaluate_cases
from cadre.prompts.optimize import choose_on_dev
from cadre.prompts.program import (
    CompletionLM,
    SpecialistProgram,
    load_program,
    program_context,
    save_program,
    use_disk_cache,
)
from cadre.runtime.lm import (
    LlamaCppClient,
    answer_from_candidates,
    candidate_grammar,
    forget_prompt,
    pick_scored,
    rank_penalties,
)
from cadre.runtime.retrieval import Passage
from cadre.runtime.serving_prompt import read_serving_prompt

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:Implementing custom LMs through BaseLM.forward:DeprecationWarning")

# ------------------------------------------------------------------------------------------ validate

VALID = textwrap.dedent(
    """\
    version: 1
    project:
      name: t
    specialists:
      - name: coder
        description: a test specialist
        sources:
          - kind: dataset
            name: kb
            path: data/kb.jsonl
        program:
          instruction: Answer with the code.
          inputs: [{name: question}]
          outputs: [{name: code}]
          retrieve_k: 5
          answer: {mode: constrained}
        evaluation:
          suite: evals/suite
        gates:
          program:
            - {metric: exact_match, beat_baseline: retrieval}
    """
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "kb.jsonl").write_text('{"id": "1", "text": "hello"}\n')
    (tmp_path / "evals" / "suite").mkdir(parents=True)
    return tmp_path


BAD = [
    (
        "constrained without retrieval",
        lambda t: t.replace("retrieve_k: 5", "retrieve_k: 0").replace(
            "        - {metric: exact_match, beat_baseline: retrieval}\n",
            "        - {metric: exact_match, at_least: 0.1}\n",
        ),
        "answer: {mode: constrained}",
        "specialists[coder].program.answer.mode",
        "retrieves nothing (retrieve_k: 0); set retrieve_k",
    ),
    (
        "constrained with two outputs",
        lambda t: t.replace("outputs: [{name: code}]", "outputs: [{name: code}, {name: why}]"),
        "answer: {mode: constrained}",
        "specialists[coder].program.answer.mode",
        "has 2 output fields; keep one output field",
    ),
    (
        "score tried on dev with chain of thought",
        lambda t: t.replace("      instruction:", "      module: chain_of_thought\n      instruction:").replace(
            "answer: {mode: constrained}", "optimizer: {answer_modes: [free, score]}"
        ),
        "answer_modes: [free, score]",
        "specialists[coder].program.optimizer.answer_modes[1]",
        "use module predict or mode free",
    ),
    (
        "a retrieval weight without scoring",
        lambda t: t.replace("answer: {mode: constrained}", "answer: {mode: constrained, retrieval_weight: 2}"),
        "answer: {mode: constrained, retrieval_weight: 2}",
        "specialists[coder].program.answer.retrieval_weight",
        "set answer.mode: score or remove retrieval_weight",
    ),
    (
        "retrieval weights tried without scoring",
        lambda t: t.replace(
            "answer: {mode: constrained}", "optimizer: {answer_modes: [free, constrained], retrieval_weights: [0, 1]}"
        ),
        "retrieval_weights: [0, 1]",
        "specialists[coder].program.optimizer.retrieval_weights",
        "add score to optimizer.answer_modes",
    ),
    (
        "choose among titles without a candidate answer",
        lambda t: t.replace("answer: {mode: constrained}", "answer: {mode: free, choose_from: title}"),
        "answer: {mode: free, choose_from: title}",
        "specialists[coder].program.answer.choose_from",
        "set answer.mode: score",
    ),
    (
        "choose among ids where a right answer is a title",
        lambda t: t.replace("      suite: evals/suite\n", "      suite: evals/suite\n      retrieval_answer: title\n"),
        "answer: {mode: constrained}",
        "specialists[coder].program.answer.choose_from",
        "set program.answer.choose_from: title",
    ),
    (
        "beat the retriever without retrieval",
        lambda t: t.replace("retrieve_k: 5", "retrieve_k: 0").replace("      answer: {mode: constrained}\n", ""),
        "beat_baseline: retrieval",
        "specialists[coder].gates.program[0].beat_baseline",
        "needs a program that retrieves",
    ),
    (
        "beat the retriever in the adapter gates",
        lambda t: t.replace("    gates:\n      program:\n", "    gates:\n      adapter:\n"),
        "beat_baseline: retrieval",
        "specialists[coder].gates.adapter[0].beat_baseline",
        "move this rule to gates.program",
    ),
]


def test_the_valid_file_validates(project: Path) -> None:
    path = project / "pipelines.yaml"
    path.write_text(VALID)
    main(["validate", str(path)])


@pytest.mark.parametrize(("name", "change", "needle", "field", "words"), BAD, ids=[b[0] for b in BAD])
def test_validate_names_the_line_of_an_answer_or_baseline_it_cannot_apply(
    project: Path, capsys, name, change, needle, field, words
) -> None:
    text = change(VALID)
    assert text != VALID
    path = project / "pipelines.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    line = next(number for number, row in enumerate(text.splitlines(), 1) if needle in row)
    rows = [row for row in err.splitlines() if row.startswith(f"{path}:{line}:")]
    assert any(f" {field}: " in row and words in row for row in rows), err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------ the model

PROMPT = (
    "Given a clinical phrase and candidate ICD-10-CM codes, answer with the code.\n\n---\n\n"
    "Candidates:\n[1] K35.20 — Acute appendicitis with generalized peritonitis\n"
    "[2] A01.02 — Typhoid fever with heart involvement\n"
    "Phrase: typhoid endocarditis\nCode:"
)


@pytest.fixture(scope="module")
def client(gguf: Path) -> LlamaCppClient:
    return LlamaCppClient(gguf, n_threads=1, n_ctx=1024)


def test_the_grammar_allows_exactly_the_candidates_and_escapes_them() -> None:
    assert candidate_grammar(["A01.02", "K35.20", "A01.02"]) == 'root ::= " " ("A01.02" | "K35.20")'
    assert candidate_grammar(['say "hi"\\']) == 'root ::= " " ("say \\"hi\\"\\\\")'


def test_a_free_answer_invents_a_code_a_constrained_or_scored_one_cannot(client: LlamaCppClient) -> None:
    free = client.complete(PROMPT, max_tokens=12, stop=["\n"]).text.strip()
    assert free not in ("K35.20", "A01.02")  # what the issue measured: the base model writes a code of its own

    candidates = ["K35.20", "A01.02"]
    constrained = answer_from_candidates(client, PROMPT, candidates, mode="constrained", max_tokens=12, stop=["\n"])
    scored = answer_from_candidates(client, PROMPT, candidates, mode="score", max_tokens=12, stop=["\n"])
    assert constrained.text.strip() in candidates  # greedy under the grammar: token by token, among the candidates
    scores = client.score(PROMPT, [" K35.20\n", " A01.02\n", " Z99.89\n"])
    assert scored.text == (" K35.20" if scores[0] > scores[1] else " A01.02")  # the likelier whole answer
    assert min(scores[:2]) > scores[2]  # a code nobody named is less likely than either candidate
    assert all(score < 0 for score in scores)
    nothing = answer_from_candidates(client, PROMPT, [], mode="constrained", max_tokens=12, stop=["\n"])
    assert nothing.text == ""  # no candidate: unanswered, not invented
    # A program's max_tokens shorter than an id never cuts the constrained answer inside it (an id's prefix is not
    # a candidate: the smoke optimizer once answered one with max_tokens 8 and 7-character codes).
    long_ids = ["S52.521A", "M80.08XA"]
    cut = answer_from_candidates(client, PROMPT, long_ids, mode="constrained", max_tokens=2, stop=["\n"])
    assert cut.text.strip() in long_ids, cut.text


def test_candidates_that_share_their_first_tokens_score_as_each_scored_alone(client: LlamaCppClient) -> None:
    """`score_continuations` computes a shared prefix's log-probabilities once: the scores must not change."""
    candidates = [" C31.1\n", " C31.9\n", " J33.8\n", " C31.3\n", " C31.1\n", " C3\n", " J33.8\n"]
    together = client.score(PROMPT, candidates)
    alone = [client.score(PROMPT, [candidate])[0] for candidate in candidates]
    assert together == alone  # identical floats: every token is evaluated on the same tokens before it
    assert together[0] == together[4] and together[2] == together[6] and len(set(together)) == 5


def test_scoring_gives_up_the_candidates_that_cannot_win_and_answers_as_full_scoring(
    client: LlamaCppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With each candidate's rank penalty, a candidate stops being scored once it cannot win: the same answer for
    every weight, the winner's score unchanged, fewer forward passes."""
    candidates = [" C31.1\n", " K35.20\n", " A01.02\n", " J33.8\n", " C31.9\n", " Z99.89\n"]
    llama, passes = client._llama, []
    real_eval = llama.eval
    monkeypatch.setattr(llama, "eval", lambda tokens: (passes.append(len(tokens)), real_eval(tokens))[1])

    full = client.score(PROMPT, candidates)
    full_passes = len(passes)
    for weight in (0.0, 1.0, 100.0):
        passes.clear()
        pruned = client.score(PROMPT, candidates, rank_penalties(len(candidates), weight))
        winner = pick_scored(full, weight)
        assert pick_scored(pruned, weight) == winner, f"weight {weight}: a different answer"
        assert pruned[winner] == full[winner]
        assert all(p == f or p == float("-inf") for p, f in zip(pruned, full))
        assert len(passes) <= full_passes
        if weight == 100.0:  # no other candidate can make up 100·ln 2 nats: only the first hit is scored
            assert full[0] > -100 * math.log(2)
            assert pruned[1:] == [float("-inf")] * (len(candidates) - 1)
            assert len(passes) < full_passes


def test_the_fixed_part_of_the_prompt_is_kept_and_the_scores_do_not_depend_on_it(
    client: LlamaCppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instruction (everything up to the last `---`) is evaluated once and kept for the next prompt that starts
    with it; a prompt's scores are the same whether it was kept, evaluated now, or evaluated after a completion."""
    other = PROMPT.replace("typhoid endocarditis", "appendicitis with peritonitis")
    candidates = [" K35.20\n", " A01.02\n"]
    llama, batches = client._llama, []
    real_eval = llama.eval
    monkeypatch.setattr(llama, "eval", lambda tokens: (batches.append(len(tokens)), real_eval(tokens))[1])

    forget_prompt(llama)
    fresh = client.score(PROMPT, candidates)
    fixed, total = batches[0], len(llama.tokenize(PROMPT.encode(), add_bos=True, special=False))
    assert 10 < fixed < total - 10 and batches[1] == total - fixed  # the instruction, then the question
    client.score(other, candidates)
    batches.clear()
    kept = client.score(PROMPT, candidates)
    assert batches[0] == total - fixed, "the instruction was evaluated again"
    assert kept == fresh  # identical floats
    client.complete(other, max_tokens=4, stop=["\n"])  # a completion empties the cache
    batches.clear()
    assert client.score(PROMPT, candidates) == fresh and batches[0] == fixed
    without = PROMPT.split("\n\n---\n\n")[1]  # no separator: one batch, nothing kept
    batches.clear()
    client.score(without, candidates)
    assert batches[0] == len(llama.tokenize(without.encode(), add_bos=True, special=False))


def test_the_server_engine_answers_by_the_same_rule(gguf: Path, client: LlamaCppClient) -> None:
    from cadre.serving.engine import LoraEngine

    engine = LoraEngine(gguf, n_ctx=1024)
    try:
        lease = engine.load_adapter(None)
        served = engine.client(lease)
        for mode in ("constrained", "score"):
            mine = answer_from_candidates(served, PROMPT, ["K35.20", "A01.02"], mode=mode, max_tokens=12, stop=["\n"])
            theirs = answer_from_candidates(client, PROMPT, ["K35.20", "A01.02"], mode=mode, max_tokens=12, stop=["\n"])
            assert mine.text == theirs.text and mine.text.strip() in ("K35.20", "A01.02")
        assert served.score(PROMPT, [" A01.02\n"]) == pytest.approx(client.score(PROMPT, [" A01.02\n"]), abs=1e-3)
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------ chosen on dev

SETTINGS = ProgramSettings(
    instruction="Given a clinical phrase and candidate ICD-10-CM codes, answer with the code.",
    inputs=[{"name": "phrase", "description": "a diagnosis"}],
    outputs=[{"name": "code", "description": "one ICD-10-CM code"}],
    retrieve_k=3,
    max_tokens=12,
    optimizer={"answer_modes": ["free", "constrained"], "retrieve_k": [1, 3]},
)
KNOWN = {
    "typhoid endocarditis": [("A01.02", "Typhoid fever with heart involvement"), ("K35.20", "Acute appendicitis")],
    "cholera due to vibrio cholerae": [("A00.0", "Cholera due to Vibrio cholerae 01"), ("A01.02", "Typhoid fever")],
    "gout of the knee": [("M10.9", "Gout, unspecified"), ("A00.0", "Cholera")],
}
DEV = [{"id": str(i), "phrase": phrase, "code": hits[0][0]} for i, (phrase, hits) in enumerate(KNOWN.items())]


def shelf(query: str, k: int) -> list[Passage]:
    return [Passage(code, title) for code, title in KNOWN[query]][:k]


@pytest.fixture
def evaluation(tmp_path: Path):
    """Exact match on dev cases, with DSPy's cache in this test's folder."""
    from cadre.config.evaluation import EvaluationSettings

    use_disk_cache(tmp_path / "dspy")
    (tmp_path / "suite").mkdir()
    return EvaluationSettings.model_validate(
        {"suite": "suite", "answer_metrics": ["exact_match"], "bootstrap_samples": 100}, context={"root": tmp_path}
    )


def test_the_dev_choice_is_kept_in_the_program_json_and_every_reader_answers_with_it(
    client: LlamaCppClient, evaluation, tmp_path: Path
) -> None:
    lm = CompletionLM(client, model_id="llama.cpp:test-answers", max_tokens=12)
    program = SpecialistProgram(SETTINGS, shelf)
    tried = choose_on_dev(program, SETTINGS, evaluation, lm, DEV)

    assert [(t.answer_mode, t.retrieve_k) for t in tried] == [
        ("free", 1),
        ("constrained", 1),
        ("free", 3),
        ("constrained", 3),
    ]
    constrained = [t for t in tried if t.answer_mode == "constrained"]
    assert all(t.outside_candidates == 0.0 for t in constrained)
    assert constrained[0].score == 1.0  # one candidate each, the right one: nothing else can be answered
    best = max(tried, key=lambda t: t.score)
    assert (program.answer_mode, program.retrieve_k) == ("constrained", 1) and best.score == 1.0

    path = tmp_path / "program.json"
    save_program(program, path)
    assert json.loads(path.read_text())["cadre"] == {"answer_mode": "constrained", "retrieve_k": 1}
    loaded = load_program(path, SETTINGS, shelf)
    assert (loaded.answer_mode, loaded.retrieve_k) == ("constrained", 1)
    served = read_serving_prompt(SETTINGS, path)
    assert (served.answer_mode, served.retrieve_k) == ("constrained", 1)

    declared = tmp_path / "declared.json"
    save_program(SpecialistProgram(SETTINGS, shelf), declared)
    assert "cadre" not in json.loads(declared.read_text())  # a program answering as declared keeps DSPy's bytes

    # A smoke run's choice (`OptimizationPlan.choice_depths`) tries the answer modes at the serving depth only.
    serving_depth = SpecialistProgram(SETTINGS, shelf)
    tried = choose_on_dev(serving_depth, SETTINGS, evaluation, lm, DEV, depths=[3])
    assert [(t.answer_mode, t.retrieve_k) for t in tried] == [("free", 3), ("constrained", 3)]
    assert serving_depth.retrieve_k == 3


def test_a_retrieval_weight_lets_the_lm_overrule_the_first_hit_only_when_it_is_confident() -> None:
    scores = [-4.0, -1.0, -3.9]  # log-likelihoods of three candidates, best-ranked first
    assert pick_scored(scores) == 1  # the LM alone
    assert pick_scored(scores, 1.0) == 1  # -1 - ln 2 = -1.69 still beats -4
    assert pick_scored(scores, 5.0) == 0  # -1 - 5 ln 2 = -4.47: the first hit
    assert pick_scored([-2.0, -2.0]) == 0  # a tie goes to the better-ranked candidate


WORDS = {  # solved examples: a known word is the id, how it is said the title
    "knighthood": [("knight", "N AY1 T"), ("hood", "HH UH1 D"), ("night", "N AY1 T")],
    "badges": [("badge", "B AE1 JH"), ("budget", "B AH1 JH AH0 T")],
}


def words(query: str, k: int) -> list[Passage]:
    return [Passage(word, phones) for word, phones in WORDS[query]][:k]


def test_a_program_choosing_among_titles_answers_a_title_on_every_path(client: LlamaCppClient, tmp_path: Path) -> None:
    """`answer.choose_from: title`: the program and the served runtime both choose among the passages' titles,
    never an id, by the same rule."""
    from cadre.serving.team import RequestRenderer

    settings = ProgramSettings(
        instruction="Given a word and known words with their pronunciations, write the word's ARPAbet phones.",
        inputs=[{"name": "word", "description": "an English word"}],
        outputs=[{"name": "phones", "description": "ARPAbet phones"}],
        retrieve_k=3,
        max_tokens=16,
        answer={"mode": "score", "choose_from": "title", "retrieval_weight": 1.0},
    )
    use_disk_cache(tmp_path / "dspy")
    lm = CompletionLM(client, model_id="llama.cpp:test-titles", max_tokens=16)
    program = SpecialistProgram(settings, words)
    served = read_serving_prompt(settings, None)
    assert served.choose_from == "title" and served.to_json()["choose_from"] == "title"
    for word, known in WORDS.items():
        with program_context(lm, settings):
            answer = program(word=word).phones
        rendered = RequestRenderer(served, ["word"], words, served.retrieve_k).render({"word": word})
        assert rendered.retrieved_ids == [w for w, _ in known]
        assert rendered.candidates == [phones for _, phones in known]
        expected = answer_from_candidates(
            client, rendered.prompt, rendered.candidates, mode="score", max_tokens=16, stop=["\n"], retrieval_weight=1.0
        )
        assert answer == expected.text.strip() and answer in dict(known).values()
    program_json = tmp_path / "program.json"
    save_program(program, program_json)
    assert read_serving_prompt(settings, program_json).choose_from == "title"


class CountingClient:
    """The real client, counting the score requests that reach the model."""

    def __init__(self, client: LlamaCppClient):
        self.client, self.scored = client, 0

    def complete(self, *args, **kwargs):
        return self.client.complete(*args, **kwargs)

    def score(self, prompt, continuations, penalties=None):
        self.scored += 1
        return self.client.score(prompt, continuations, penalties)


def test_retrieval_weights_are_tried_on_scores_computed_once_and_the_choice_is_served(
    client: LlamaCppClient, evaluation, tmp_path: Path
) -> None:
    settings = SETTINGS.model_copy(
        update={
            "optimizer": SETTINGS.optimizer.model_copy(
                update={"answer_modes": ["score"], "retrieve_k": [], "retrieval_weights": [0.0, 100.0]}
            ),
        }
    )
    counting = CountingClient(client)
    lm = CompletionLM(counting, model_id="llama.cpp:test-weights", max_tokens=12)
    program = SpecialistProgram(settings, shelf)
    tried = choose_on_dev(program, settings, evaluation, lm, DEV)

    assert [(t.answer_mode, t.retrieval_weight) for t in tried] == [("score", 0.0), ("score", 100.0)]
    assert counting.scored == len(DEV)  # the second weight re-ranked cached scores: no LM call
    assert tried[1].score == 1.0  # weight 100 answers the first hit, which is right in every case here
    assert tried[1].score >= tried[0].score and program.retrieval_weight in (0.0, 100.0)
    chosen = max(tried, key=lambda t: (t.score, -tried.index(t)))
    assert program.retrieval_weight == chosen.retrieval_weight

    program.choose("score", 3, 100.0)
    path = tmp_path / "program.json"
    save_program(program, path)
    assert json.loads(path.read_text())["cadre"] == {"answer_mode": "score", "retrieve_k": 3, "retrieval_weight": 100.0}
    assert load_program(path, settings, shelf).retrieval_weight == 100.0
    served = read_serving_prompt(settings, path)
    assert (served.answer_mode, served.retrieval_weight) == ("score", 100.0)


# ------------------------------------------------------------------------------------------ the gate

CASES = [{"id": str(i), "q": f"q{i}", "code": f"C{i}", "relevant_ids": [f"C{i}"]} for i in range(40)]


def scored(name: str, right: int, invent: bool = False):
    def predict(case):
        number = int(case["id"])
        answer = case["code"] if number < right else ("Z99.9" if invent else f"C{(number + 1) % 40}")
        return Prediction(output=answer, retrieved_ids=[case["code"], f"C{(number + 1) % 40}"])

    return evaluate_cases(CASES, predict, ["exact_match"], name=name, output_field="code", bootstrap_samples=200)


def test_the_retrieval_baseline_gate_refuses_a_program_that_loses_to_the_first_hit() -> None:
    rule = GateRule(metric="exact_match", beat_baseline="retrieval")
    retrieval = scored("retrieval-top1", 20)

    worse = decide("program", [rule], scored("candidate", 12, invent=True), None, baselines={"retrieval": retrieval})
    assert not worse.passed
    (outcome,) = worse.outcomes
    assert outcome.champion == pytest.approx(0.5) and outcome.candidate == pytest.approx(0.3)
    assert outcome.detail.startswith("vs retrieval-top1: gain −0.200 < 0")
    report = worse.to_markdown()
    assert "exact_match beats retrieval only by ≥ 0" in report and "❌ fail" in report

    tie = decide("program", [rule], scored("candidate", 20), None, baselines={"retrieval": retrieval})
    assert tie.passed

    significant = GateRule(metric="exact_match", beat_baseline="retrieval", significant=True)
    better = decide("program", [significant], scored("candidate", 36), None, baselines={"retrieval": retrieval})
    assert better.passed and better.outcomes[0].interval[0] > 0

    missing = decide("program", [rule], scored("candidate", 36), None)
    assert not missing.passed and "was not scored" in missing.outcomes[0].detail


def test_the_share_of_invented_answers_counts_answers_outside_the_retrieved_ids() -> None:
    assert outside_candidates(scored("free", 30, invent=True)) == pytest.approx(0.25)
    assert outside_candidates(scored("constrained", 30)) == 0.0
