"""One specialist of the team, composed from the per-concern settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator, model_validator

from cadre.config.base import FieldError, Strict
from cadre.config.edge import EdgeSettings
from cadre.config.embedder import EmbedderSettings
from cadre.config.evaluation import EvaluationSettings, Gates, check_baseline_rules, check_gate_metrics
from cadre.config.knowledge import ChunkingSettings, IndexSettings, Source
from cadre.config.program import CANDIDATE_MODES, ProgramSettings
from cadre.config.schedules import Schedules
from cadre.config.tuning import FeedbackSettings, TuningSettings

PACKAGED_BASE_MODELS = ("gemma3-270m",)


class SmokeBudget(Strict):
    """The reduced budget of `--budget smoke` (tests, the demo's first run)."""

    max_documents: int = Field(4000, gt=0, description="Documents indexed per source.")
    max_eval_cases: int = Field(40, gt=0, description="Test cases per evaluation.")
    max_train_steps: int = Field(30, gt=0, description="Fine-tuning steps.")
    max_lm_calls: int = Field(120, gt=0, description="LM calls per prompt optimization.")
    decoding_dev_cases: int = Field(
        0,
        ge=0,
        description=(
            "Dev cases a smoke refresh re-chooses its candidate's answer mode on (`tuning.decoding_dev_cases`, capped "
            "by it). 0: a smoke refresh judges its candidate as the program serves; a few training steps change too "
            "little for a choice on a dozen cases to mean anything, and the demo stays within its time."
        ),
    )
    max_wall_seconds: int = Field(
        300,
        gt=0,
        description="Wall seconds of a smoke run's main work (prompt compile, training loop, re-index build); past it the run stops, keeps what it has and says so.",
    )


class Specialist(Strict):
    """A specialist small language model: its knowledge, program, tuning, evaluation, gates and schedules."""

    name: str = Field(
        pattern=r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$", description="Slug: lowercase letters, digits and dashes."
    )
    description: str = Field(
        min_length=1, description="What the specialist is for; the router compares requests with it."
    )
    examples: list[str] = Field([], description="Typical requests, used by the router.")
    base_model: str = Field(
        "gemma3-270m",
        description="`gemma3-270m` (the packaged Gemma 3 270M GGUF, converted once) or a local folder with a causal LM.",
    )
    sources: list[Source] = Field([], description="Knowledge sources indexed for retrieval.")
    chunking: ChunkingSettings = Field(default_factory=ChunkingSettings, description="Chunking.")
    index: IndexSettings = Field(default_factory=IndexSettings, description="Index settings.")
    program: ProgramSettings = Field(description="The DSPy program.")
    tuning: TuningSettings = Field(default_factory=TuningSettings, description="Adapter refresh.")
    embedder: EmbedderSettings = Field(
        default_factory=EmbedderSettings, description="Retriever refresh: fine-tuning the embedding model."
    )
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings, description="Learning from corrections.")
    evaluation: EvaluationSettings = Field(description="Evaluation suite and metrics.")
    gates: Gates = Field(default_factory=Gates, description="Promotion gates per artifact kind.")
    schedules: Schedules = Field(default_factory=Schedules, description="Cron schedules of the four flows.")
    smoke: SmokeBudget = Field(default_factory=SmokeBudget, description="The `smoke` budget.")
    edge: EdgeSettings = Field(
        default_factory=EdgeSettings, description="The offline bundle: export after promotion and its publish rules."
    )

    @field_validator("base_model")
    @classmethod
    def _packaged_or_existing(cls, value: str, info: ValidationInfo) -> str:
        root = (info.context or {}).get("root")
        if value in PACKAGED_BASE_MODELS or root is None:
            return value
        if not (Path(root) / value).is_dir():
            raise ValueError(
                f"base_model {value!r} is neither a packaged model ({', '.join(PACKAGED_BASE_MODELS)}) nor an existing model folder"
            )
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Specialist:
        check_gate_metrics(self.gates, self.evaluation)
        check_baseline_rules(self.gates, bool(self.program.retrieve_k))
        names: set[str] = set()
        for position, source in enumerate(self.sources):
            if source.name in names:
                raise FieldError(("sources", position, "name"), f"source name {source.name!r} is used twice")
            names.add(source.name)
        if self.program.retrieve_k and not self.sources:
            raise FieldError(
                ("program", "retrieve_k"),
                "retrieve_k > 0 needs at least one source to retrieve from (or set retrieve_k: 0)",
            )
        program = self.program
        chooses = {program.answer.mode, *program.optimizer.answer_modes} & set(CANDIDATE_MODES)
        if chooses and program.answer.choose_from != self.evaluation.retrieval_answer:
            wanted = self.evaluation.retrieval_answer
            raise FieldError(
                ("program", "answer", "choose_from"),
                f"answer mode {sorted(chooses)[0]!r} answers one of the retrieved documents' "
                f"{program.answer.choose_from}s, but evaluation.retrieval_answer: {wanted} says a right answer is a "
                f"document's {wanted}, so no such answer could be right; set program.answer.choose_from: {wanted}, or "
                f"retrieval_answer: {program.answer.choose_from} if the cases' answers are document "
                f"{program.answer.choose_from}s",
            )
        if self.tuning.decoding_dev_cases and {
            program.declared_decoding,
            *program.decoding_plan([program.retrieve_k]),
        } == {program.declared_decoding}:
            raise FieldError(
                ("tuning", "decoding_dev_cases"),
                "the refresh re-chooses the answer mode among program.optimizer.answer_modes (and retrieval_weights), "
                "but this program declares no other: list them (e.g. answer_modes: [free, score]) or remove "
                "decoding_dev_cases",
            )
        return self
