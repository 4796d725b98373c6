"""Train on exactly what serves: every path renders the same case into the same bytes.

One case, one program (a champion JSON with an optimizer's instruction and two demos, or the declared
zero-shot program) and one search function go through the four places a prompt is made: the adapter
refresh's training data, the feedback flow's DPO pairs, the DSPy program that optimization and
evaluation run (on the real packaged model, llama.cpp in-process), and the server's request rendering.
If any of them built its query, its passages, its demos or its instruction differently, a specialist
would be trained or gated on prompts it is never served, and this test fails.
"""

from __future__ import annotations

from pathlib import Path

import dspy
import pytest

from cadre.config import ProgramSettings
from cadre.feedback.store import Correction, preference_pairs
from cadre.prompts.program import (
    CompletionLM,
    SpecialistProgram,
    load_program,
    program_context,
    save_program,
    use_disk_cache,
)
from cadre.runtime.lm import LlamaCppClient
from cadre.runtime.retrieval import Passage, PassageFormat, context_retriever, leave_out_own, retrieval_query
from cadre.runtime.serving_prompt import read_serving_prompt
from cadre.serving.team import RequestRenderer
from cadre.tuning.training_data import Record, build_training_data

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:Implementing custom LMs through BaseLM.forward:DeprecationWarning")

SETTINGS = ProgramSettings(
    instruction="Given a clinical phrase, its specialty and candidate ICD-10-CM codes, answer with the billable code.",
    inputs=[
        {"name": "phrase", "description": "a diagnosis as a clinician writes it"},
        {"name": "specialty", "description": "the clinic that wrote it"},
    ],
    outputs=[{"name": "code", "description": "one ICD-10-CM code"}],
    retrieve_k=3,
    max_tokens=8,
)
NAMES = ["phrase", "specialty"]
CASE = {"phrase": "typhoid endocarditis", "specialty": "cardiology"}
ANSWER = {"code": "A01.02"}
DEMOS = [
    {
        "context": ["A00.0 — Cholera due to Vibrio cholerae"],
        "phrase": "cholera",
        "specialty": "infectious",
        "code": "A00.0",
    },
    {"context": ["M10.9 — Gout, unspecified"], "phrase": "gout", "specialty": "rheumatology", "code": "M10.9"},
]


class Shelf:
    """An in-memory search: the passages depend on the exact query text, and every query is recorded."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    def __call__(self, query: str, k: int) -> list[Passage]:
        self.queries.append(query)
        return [
            Passage(f"A01.0{rank}", f"candidate {rank} for '{query}'", f"Typhoid fever, form {rank}. " * 6)
            for rank in range(1, k + 1)
        ]


@pytest.fixture(params=["champion", "declared"])
def program_json(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    """A champion's saved program (instruction and two demos changed by an optimizer), or None: the declared one."""
    if request.param == "declared":
        return None
    program = SpecialistProgram(SETTINGS, Shelf())
    program.answer.demos = [dspy.Example(**demo) for demo in DEMOS]
    program.answer.signature = program.answer.signature.with_instructions("Pick the code that fits the phrase.")
    path = tmp_path / "program.json"
    save_program(program, path)
    return path


def training_prompt(program_json: Path | None, search: Shelf, settings: ProgramSettings = SETTINGS) -> str:
    """The adapter refresh: `build_refresh_data` renders its examples so."""
    prompt = read_serving_prompt(settings, program_json)
    data = build_training_data(
        [Record("case.jsonl", 1, {**CASE, **ANSWER})],
        prompt.spec,
        count_tokens=lambda texts: [len(text.split()) for text in texts],
        max_length=4096,
        heldout_fraction=0.0,
        seed=0,
        retrieve=context_retriever(search, NAMES, prompt.retrieve_k, prompt.passage_format),
        demos=prompt.demos,
        instruction=prompt.instruction,
    )
    (example,) = data.train
    return example.prompt


def preference_prompt(program_json: Path | None, search: Shelf, settings: ProgramSettings = SETTINGS) -> str:
    """The feedback flow: `build_feedback_data` renders its DPO pairs so."""
    prompt = read_serving_prompt(settings, program_json)
    correction = Correction("r1", dict(CASE), {"code": "A01.0"}, dict(ANSWER), {"program": None})
    (pair,) = preference_pairs(
        [correction],
        prompt.spec,
        retrieve=context_retriever(search, NAMES, prompt.retrieve_k, prompt.passage_format),
        demos=prompt.demos,
        instruction=prompt.instruction,
    )
    return pair.prompt


def program_prompt(
    program_json: Path | None, search: Shelf, client: LlamaCppClient, settings: ProgramSettings = SETTINGS
) -> tuple[str, list[str]]:
    """Optimization and evaluation: the DSPy program's forward, sent through `CompletionAdapter.format` to the model."""
    program = load_program(program_json, settings, search) if program_json else SpecialistProgram(settings, search)
    lm = CompletionLM(client, model_id="llama.cpp:test-contract", max_tokens=settings.max_tokens)
    with program_context(lm, settings):
        prediction = program(**CASE)
    return lm.history[-1]["prompt"], prediction.retrieved_ids


def served_prompt(
    program_json: Path | None, search: Shelf, settings: ProgramSettings = SETTINGS
) -> tuple[str, list[str]]:
    """The server: `build_runtime` reads the champion and renders each request with a `RequestRenderer`."""
    prompt = read_serving_prompt(settings, program_json)
    rendered = RequestRenderer(prompt, NAMES, search, prompt.retrieve_k).render(CASE)
    return rendered.prompt, rendered.retrieved_ids


def test_every_path_renders_the_same_bytes(program_json: Path | None, gguf: Path, tmp_path: Path) -> None:
    use_disk_cache(tmp_path / "dspy-cache")
    search = Shelf()
    client = LlamaCppClient(gguf, n_threads=1, n_ctx=1024)

    trained = training_prompt(program_json, search)
    paired = preference_prompt(program_json, search)
    sent, sent_ids = program_prompt(program_json, search, client)
    served, served_ids = served_prompt(program_json, search)

    assert paired == trained
    assert sent == trained
    assert served == trained
    assert served_ids == sent_ids == ["A01.01", "A01.02", "A01.03"]
    assert search.queries == [retrieval_query(CASE, NAMES)] * 4 == ["typhoid endocarditis cardiology"] * 4

    # What the model reads: the serving instruction, the champion's demos, then the question and its passages.
    instruction = "Pick the code that fits the phrase." if program_json else SETTINGS.instruction
    assert trained.startswith(instruction + "\n\n---\n\n")
    assert trained.count("\n\n---\n\n") == (2 if program_json else 0) + 1
    assert trained.endswith(
        "Context:\n"
        "[1] A01.01 — candidate 1 for 'typhoid endocarditis cardiology'\n"
        "[2] A01.02 — candidate 2 for 'typhoid endocarditis cardiology'\n"
        "[3] A01.03 — candidate 3 for 'typhoid endocarditis cardiology'\n"
        "Phrase: typhoid endocarditis\nSpecialty: cardiology\nCode:"
    )


def test_the_query_is_the_set_inputs_in_the_programs_order() -> None:
    """An empty input adds nothing to the query (the re-index gate once searched `"gout "` where serving searched `"gout"`)."""
    assert retrieval_query({"specialty": "rheumatology", "phrase": "gout", "id": "c1"}, NAMES) == "gout rheumatology"
    assert retrieval_query({"phrase": "gout", "specialty": ""}, NAMES) == "gout"
    assert retrieval_query({"phrase": "gout", "specialty": None}, NAMES) == "gout"
    assert retrieval_query({"phrase": "gout"}, NAMES) == "gout"


WITH_TEXT = SETTINGS.model_copy(
    update={"passage": SETTINGS.passage.model_copy(update={"fields": ["id", "title", "text"], "max_text_words": 5})}
)


def test_passage_text_and_the_depth_chosen_on_dev_reach_every_path_alike(gguf: Path, tmp_path: Path) -> None:
    """A program that shows 5 words of each passage's text, whose saved JSON records a constrained answer from 2
    passages (what the prompt flow chose on dev): training, DPO pairs, the program and the server render it alike."""
    use_disk_cache(tmp_path / "dspy-cache")
    program = SpecialistProgram(WITH_TEXT, Shelf()).choose("constrained", 2)
    program_json = tmp_path / "program.json"
    save_program(program, program_json)
    search = Shelf()
    client = LlamaCppClient(gguf, n_threads=1, n_ctx=1024)

    trained = training_prompt(program_json, search, WITH_TEXT)
    paired = preference_prompt(program_json, search, WITH_TEXT)
    sent, sent_ids = program_prompt(program_json, search, client, WITH_TEXT)
    served, served_ids = served_prompt(program_json, search, WITH_TEXT)

    assert paired == trained == sent == served
    assert served_ids == sent_ids == ["A01.01", "A01.02"]
    assert trained.endswith(
        "Context:\n"
        "[1] A01.01 — candidate 1 for 'typhoid endocarditis cardiology': Typhoid fever, form 1. Typhoid …\n"
        "[2] A01.02 — candidate 2 for 'typhoid endocarditis cardiology': Typhoid fever, form 2. Typhoid …\n"
        "Phrase: typhoid endocarditis\nSpecialty: cardiology\nCode:"
    )
    assert read_serving_prompt(WITH_TEXT, program_json).answer_mode == "constrained"
    assert read_serving_prompt(WITH_TEXT, None).answer_mode == "free"  # the declared program answers as declared


def test_the_default_passage_keeps_todays_bytes() -> None:
    """`id — title` (or the id alone without a title): champions saved before passage settings existed render alike."""
    passage = Passage("A01.02", "Typhoid fever with heart involvement", "A01.02 Typhoid fever with heart involvement")
    assert passage.render() == "A01.02 — Typhoid fever with heart involvement"
    assert Passage("os.path", "").render() == "os.path"
    assert passage.render(PassageFormat(("id", "text"), 3)) == "A01.02 — A01.02 Typhoid fever …"
    assert passage.render(PassageFormat(("title",), 3)) == "Typhoid fever with heart involvement"


def test_a_train_case_in_the_corpus_never_retrieves_its_own_document() -> None:
    """`evaluation.train_cases_in_corpus`: a train word searches as a served word would, one deeper and without its
    own entry; every other query (dev, test, a request) searches unchanged."""
    words = {"knight": "N AY1 T", "knighthood": "N AY1 T HH UH2 D", "night": "N AY1 T", "knit": "N IH1 T"}

    def search(query: str, k: int) -> list[Passage]:
        ranked = sorted(words, key=lambda word: (word != query, not word.startswith(query[:4]), word))
        return [Passage(word, words[word]) for word in ranked][:k]

    leaving = leave_out_own(search, [{"id": "knight", "word": "knight"}, {"word": "knit"}], ["word"])
    assert [p.id for p in search("knight", 2)] == ["knight", "knighthood"]
    assert [p.id for p in leaving("knight", 2)] == ["knighthood", "knit"]
    assert [p.id for p in leaving("knit", 2)] == [p.id for p in search("knit", 2)]  # a case without an id
    assert [p.id for p in leaving("knightly", 3)] == [p.id for p in search("knightly", 3)]
