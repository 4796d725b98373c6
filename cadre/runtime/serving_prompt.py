"""The prompt a specialist serves: its program's instruction, demos and fields, read once from the program JSON.

The server, the adapter refresh (training data) and the feedback flow (DPO pairs) all read the champion
program with `read_serving_prompt` and render with `ServingPrompt.render`, the same `render_prompt` call the
DSPy program's `CompletionAdapter` makes, so every path puts the same bytes in front of the model.

Usage::

    prompt = read_serving_prompt(settings.program, champion_json)  # None: the declared, zero-shot program
    text = prompt.render({"context": [...], "phrase": "typhoid endocarditis"})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadre.runtime.prompt import FieldSpec, PromptSpec, render_prompt
from cadre.runtime.retrieval import ID_AND_TITLE, Passage, PassageFormat, candidate_answers

if TYPE_CHECKING:
    from cadre.config import ProgramSettings


@dataclass(frozen=True)
class ServingPrompt:
    """What a program renders before the question: its spec (instruction and fields) and its demos.

    Attributes:
        spec: the prompt spec of the program's predictor; its instruction is the program's (an optimizer's
            proposal for a compiled champion, the declared one otherwise).
        demos: complete examples shown before the question (empty for a zero-shot program).
        retrieve_k: passages per question (declared, or chosen on dev and recorded in the program's JSON).
        answer_mode: `free`, `constrained` or `score` (`cadre.runtime.lm.answer_from_candidates`), the same way.
        retrieval_weight: with `score`, how much the retriever's ranking counts beside the LM, the same way.
        passage_format: how each passage is rendered (the program's `passage` settings).
        choose_from: what a `constrained` or `score` answer chooses among: the passages' `id`s or `title`s (the
            program's `answer.choose_from`).
    """

    spec: PromptSpec
    demos: tuple[dict[str, Any], ...] = ()
    retrieve_k: int = 0
    answer_mode: str = "free"
    passage_format: PassageFormat = ID_AND_TITLE
    retrieval_weight: float = 0.0
    choose_from: str = "id"

    def candidates(self, passages: Sequence[Passage]) -> list[str]:
        """What the answer chooses among for these passages (empty for a free answer)."""
        return candidate_answers(passages, self.choose_from) if self.answer_mode != "free" else []

    @property
    def instruction(self) -> str:
        return self.spec.instruction

    def render(self, inputs: Mapping[str, Any]) -> str:
        """The prompt for one question (`inputs` holds the context field too when the program retrieves)."""
        return render_prompt(self.spec, inputs, self.demos, instruction=self.spec.instruction)

    def to_json(self) -> dict[str, Any]:
        """Everything `render` and the answer rule read, as plain JSON (what an edge bundle's `prompt.json` holds)."""
        return {
            "instruction": self.spec.instruction,
            "inputs": [{"name": f.name, "description": f.description} for f in self.spec.inputs],
            "outputs": [{"name": f.name, "description": f.description} for f in self.spec.outputs],
            "context_field": self.spec.context_field,
            "demos": [dict(demo) for demo in self.demos],
            "retrieve_k": self.retrieve_k,
            "answer_mode": self.answer_mode,
            "retrieval_weight": self.retrieval_weight,
            "choose_from": self.choose_from,
            "passage": {
                "fields": list(self.passage_format.fields),
                "max_text_words": self.passage_format.max_text_words,
            },
        }

    @classmethod
    def from_json(cls, content: Mapping[str, Any]) -> ServingPrompt:
        """The prompt `to_json` wrote; it renders the same bytes."""
        spec = PromptSpec(
            content["instruction"],
            tuple(FieldSpec(f["name"], f.get("description", "")) for f in content["inputs"]),
            tuple(FieldSpec(f["name"], f.get("description", "")) for f in content["outputs"]),
            content.get("context_field"),
        )
        passage = content.get("passage") or {}
        return cls(
            spec,
            tuple(dict(demo) for demo in content.get("demos", ())),
            int(content.get("retrieve_k", 0)),
            content.get("answer_mode", "free"),
            PassageFormat(
                tuple(passage.get("fields", ID_AND_TITLE.fields)),
                int(passage.get("max_text_words", ID_AND_TITLE.max_text_words)),
            ),
            float(content.get("retrieval_weight", 0.0)),
            str(content.get("choose_from", "id")),
        )


def read_serving_prompt(program_settings: ProgramSettings, program_path: str | Path | None) -> ServingPrompt:
    """The serving prompt of a saved program (a champion's `program.json`), or of the declared program.

    Only the program's state is read: a retrieving program's search is never run here.

    Args:
        program_settings: the specialist's `ProgramSettings` (the fields the JSON's state belongs to).
        program_path: the saved program; None for the declared (un-optimized, zero-shot) program.
    """
    from cadre.prompts.program import CompletionAdapter, SpecialistProgram, load_program

    def no_search(query: str, k: int) -> list[Any]:
        raise RuntimeError("reading a program's serving prompt never runs its retrieval")

    search = no_search if program_settings.retrieve_k else None
    program = (
        load_program(program_path, program_settings, search)
        if program_path is not None
        else SpecialistProgram(program_settings, search)
    )
    predictor = next(iter(program.named_predictors()))[1]
    adapter = CompletionAdapter(program_settings.context_field if program_settings.retrieve_k else None)
    return ServingPrompt(
        adapter.prompt_spec(predictor.signature),
        demo_dicts(predictor.demos),
        program.retrieve_k,
        program.answer_mode,
        program.passage_format,
        program.retrieval_weight,
        program.choose_from,
    )


def demo_dicts(demos: Sequence[Any]) -> tuple[dict[str, Any], ...]:
    """A predictor's demos as plain dicts (`dspy.Example`s without DSPy's internal keys, or the dicts a loaded JSON holds)."""
    return tuple(dict(demo.items()) if hasattr(demo, "items") else dict(demo) for demo in demos)
