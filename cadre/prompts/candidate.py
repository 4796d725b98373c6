"""A compiled program as the prompt flow handles it: where it runs, what compiling produced, and its files.

`save_candidate` writes the program the optimizer returned into the run's artifact folder
(`program/program.json`, the settings it was compiled from, and a readable `program.md`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadre.prompts.program import render_program_markdown, save_program
from cadre.stages import stage

if TYPE_CHECKING:
    from cadre.config import ProgramSettings
    from cadre.prompts.optimize import AnswerChoice, CompileResult
    from cadre.prompts.program import LMTarget, LMUsage
    from cadre.runtime.retrieval import IndexTarget

PROGRAM_ARTIFACT = stage("optimize").artifact_path
"""Artifact folder of a run that holds the program (what the registry version points at)."""
PROGRAM_FILE = "program.json"


@dataclass(frozen=True)
class ProgramRuntime:
    """What running a program needs: its LM, its index and the DSPy cache."""

    lm: LMTarget
    index: IndexTarget | None
    cache_dir: str


@dataclass(frozen=True)
class CompiledCandidate:
    """The compiled program on disk and what compiling it took."""

    path: str
    markdown_path: str
    fingerprint: str
    instruction: str
    summary: dict[str, Any]
    candidates: list[dict[str, Any]]


def write_program_folder(program: Any, program_settings: ProgramSettings, folder: Path, title: str) -> str:
    """Write what a registered program version holds into `folder`: `program.json` (the program's state and
    choices), `settings.json` (the declared settings it belongs to) and a readable `program.md` under `title`.
    Returns the program's fingerprint."""
    fingerprint = save_program(program, folder / PROGRAM_FILE)
    (folder / "settings.json").write_text(
        json.dumps(program_settings.model_dump(mode="json"), indent=2), encoding="utf-8"
    )
    (folder / "program.md").write_text(render_program_markdown(program, program_settings, title), encoding="utf-8")
    return fingerprint


def save_candidate(
    result: CompileResult,
    program_settings: ProgramSettings,
    out_dir: str,
    choices: list[AnswerChoice] | None = None,
    choice_usage: LMUsage | None = None,
) -> CompiledCandidate:
    """Write the compiled program, its settings and its Markdown under `out_dir/program/`.

    Args:
        result: what compiling produced (its program answers with the mode and depth chosen on dev).
        program_settings: the declared program.
        out_dir: the run's scratch folder.
        choices: the answer modes and depths scored on the dev split (`choose_on_dev`), for the summary.
        choice_usage: what scoring them on dev cost.
    """
    stopped = (
        f" — stopped by the budget ({result.stop_reason}); best program scored so far"
        if result.stopped_by_budget
        else ""
    )
    folder = Path(out_dir) / PROGRAM_ARTIFACT
    fingerprint = write_program_folder(
        result.program, program_settings, folder, f"Candidate program ({result.optimizer}){stopped}"
    )
    path, markdown = folder / PROGRAM_FILE, folder / "program.md"
    candidates = [
        {
            "candidate": c.index,
            "dev_score": c.score,
            "dev_cases": c.cases,
            "demos": c.demos,
            "instruction": c.instruction,
        }
        for c in result.candidates
    ]
    instruction = next(iter(result.program.named_predictors()))[1].signature.instructions
    summary = {
        **result.summary(),
        "answer_mode": result.program.answer_mode,
        "chosen_retrieve_k": result.program.retrieve_k,
        "retrieval_weight": result.program.retrieval_weight,
        "dev_choices": [asdict(choice) for choice in choices or []],
        **(choice_usage.to_metrics("choice_") if choice_usage is not None else {}),
    }
    return CompiledCandidate(str(path), str(markdown), fingerprint, instruction, summary, candidates)
