"""The specialist prompt format: one completion-style text, shared by inference and fine-tuning.

The packaged Gemma 3 270M is a *base* model: chat templates and DSPy's ChatAdapter markers confuse it,
while a plain "Label: value" document that ends where the answer starts is something it continues
sensibly. The same functions render the prompt the DSPy program sends at inference (through
`cadre.prompts.program`'s adapter) and the training examples of the adapter refresh and DPO flows, so a
fine-tuned model is trained on exactly the text it is later prompted with.

Layout (demos, then the question, separated by `---`; the model completes the first output field):

    Given a clinical phrase and candidate ICD-10-CM codes … answer with the single billable code.

    ---

    Candidates:
    [1] A01.02 — Typhoid fever with heart involvement
    [2] …
    Phrase: typhoid endocarditis
    Code: A01.02

    ---

    Candidates:
    [1] …
    Phrase: acute appendicitis with generalized peritonitis
    Code:

The completion is ` K35.20` followed by a newline (single output field) — `STOP` cuts it there.
With several output fields the completion continues `\nLabel: value` and ends with a blank line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SEPARATOR = "\n\n---\n\n"


@dataclass(frozen=True)
class FieldSpec:
    """A named field of the program's signature."""

    name: str
    description: str = ""

    @property
    def label(self) -> str:
        return self.name.replace("_", " ").capitalize()


@dataclass(frozen=True)
class PromptSpec:
    """Everything the format needs to know about a program: its instruction and fields.

    Attributes:
        instruction: the task, first line(s) of every prompt.
        inputs: input fields in prompt order.
        outputs: output fields; the first is where the prompt ends.
        context_field: name of the input that carries retrieved passages (rendered first, numbered), or None.
    """

    instruction: str
    inputs: tuple[FieldSpec, ...]
    outputs: tuple[FieldSpec, ...]
    context_field: str | None = None

    @classmethod
    def from_settings(cls, program: Any) -> PromptSpec:
        """Build from a `ProgramSettings` (cadre.config) without importing the schema here."""
        context = program.context_field if program.retrieve_k else None
        inputs = tuple(FieldSpec(f.name, f.description) for f in program.inputs)
        if context:
            inputs = (FieldSpec(context, "retrieved passages"), *inputs)
        return cls(
            program.instruction.strip(),
            inputs,
            tuple(FieldSpec(f.name, f.description) for f in program.outputs),
            context,
        )

    @property
    def stop(self) -> list[str]:
        """Stop sequences that end a completion right after the answer."""
        return ["\n"] if len(self.outputs) == 1 else ["\n\n", "\n---"]


def _render_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "\n" + "\n".join(f"[{i}] {_one_line(v)}" for i, v in enumerate(value, 1)) if value else " (none)"
    return " " + _one_line(value)


def _one_line(value: Any) -> str:
    return " ".join(str(value).split())


def render_inputs(spec: PromptSpec, values: Mapping[str, Any]) -> str:
    """The input fields of one example, as `Label: value` lines (passages numbered on their own lines)."""
    return "\n".join(f"{f.label}:{_render_value(values.get(f.name))}" for f in spec.inputs)


def render_outputs(spec: PromptSpec, values: Mapping[str, Any]) -> str:
    """The output fields of one example (a complete demo's answer part)."""
    return "\n".join(f"{f.label}:{_render_value(values.get(f.name))}" for f in spec.outputs)


def render_prompt(
    spec: PromptSpec, inputs: Mapping[str, Any], demos: Sequence[Mapping[str, Any]] = (), instruction: str | None = None
) -> str:
    """The full prompt: instruction, demos, then the question ending at the first output label.

    Args:
        spec: the program's fields.
        inputs: values of the input fields for this question.
        demos: complete examples (inputs and outputs) shown before the question.
        instruction: overrides `spec.instruction` (an optimizer's proposal).
    """
    blocks = [(instruction or spec.instruction).strip()]
    for demo in demos:
        blocks.append(render_inputs(spec, demo) + "\n" + render_outputs(spec, demo))
    blocks.append(render_inputs(spec, inputs) + "\n" + spec.outputs[0].label + ":")
    return SEPARATOR.join(blocks)


def render_completion(spec: PromptSpec, outputs: Mapping[str, Any]) -> str:
    """The text a perfect model continues the prompt with (the fine-tuning target), stop sequence included."""
    first, *rest = spec.outputs
    text = _render_value(outputs.get(first.name))
    for f in rest:
        text += f"\n{f.label}:{_render_value(outputs.get(f.name))}"
    return text + ("\n" if len(spec.outputs) == 1 else "\n\n")


def parse_completion(spec: PromptSpec, completion: str) -> dict[str, str | None]:
    """Read the output fields back from a completion; a field the model did not produce is None.

    Never raises: an unparsable completion gives None values (scored as wrong, counted by the caller).
    """
    text = completion.split("\n---")[0]
    values: dict[str, str | None] = {f.name: None for f in spec.outputs}
    first, *rest = spec.outputs
    lines = text.split("\n")
    head = lines[0].strip()
    values[first.name] = head or None
    labels = {f.label.lower(): f.name for f in rest}
    for line in lines[1:]:
        label, sep, value = line.partition(":")
        name = labels.get(label.strip().lower())
        if sep and name and values[name] is None:
            values[name] = value.strip() or None
    return values
