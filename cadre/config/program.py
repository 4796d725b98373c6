"""The specialist's DSPy program: signature, module kind, retrieval, and how it is optimized."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cadre.config.base import FieldError, Strict

AnswerMode = Literal["free", "constrained", "score"]
CANDIDATE_MODES = ("constrained", "score")
"""Answer modes whose answer is one of the retrieved documents' ids."""


class ProgramField(Strict):
    """One input or output field of the program's signature."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="Python identifier, e.g. `phrase`.")
    description: str = Field("", description="What the field holds; shown to the model as the field's description.")


class OptimizerSettings(Strict):
    """How the prompt flow compiles the program."""

    kind: Literal["mipro", "gepa", "bootstrap_random_search", "none"] = Field(
        "bootstrap_random_search",
        description="`mipro` (MIPROv2), `gepa` (reflective evolution), `bootstrap_random_search` (BootstrapFewShotWithRandomSearch) or `none`.",
    )
    auto: Literal["light", "medium", "heavy"] = Field("light", description="MIPROv2/GEPA search intensity.")
    max_bootstrapped_demos: int = Field(
        3, ge=0, le=16, description="Demos bootstrapped from the program's own successful traces."
    )
    max_labeled_demos: int = Field(3, ge=0, le=16, description="Demos taken straight from the train split.")
    num_candidate_programs: int = Field(6, ge=1, description="Candidates tried by random search.")
    max_lm_calls: int = Field(
        600, ge=1, description="Hard cap on LM calls per optimization; the run stops cleanly at the cap."
    )
    max_wall_seconds: int = Field(1800, ge=10, description="Hard cap on wall time per optimization.")
    reflection_lm: str | None = Field(
        None, description="LiteLLM model string of GEPA's reflection LM (defaults to the program's LM)."
    )
    train_cases: int = Field(64, ge=1, description="Train-split cases used for compiling.")
    dev_cases: int = Field(64, ge=1, description="Dev-split cases used to select a candidate.")
    answer_modes: list[AnswerMode] = Field(
        [],
        description=(
            "Answer modes the flow tries on the dev split after compiling (e.g. [free, constrained, score]); the best "
            "is kept in the saved program and served. Empty: keep `answer.mode`."
        ),
    )
    retrieve_k: list[int] = Field(
        [],
        description=(
            "Retrieval depths the flow tries on the dev split with each answer mode (e.g. [3, 5, 10]); the best is "
            "kept in the saved program and served. Empty: keep `retrieve_k`."
        ),
    )
    retrieval_weights: list[float] = Field(
        [],
        description=(
            "Weights of the retriever's ranking tried on the dev split with answer mode `score` (see "
            "`answer.retrieval_weight`; e.g. [0, 0.5, 1, 2, 100]); the best is kept in the saved program and served. "
            "The LM's log-likelihoods are computed once per case and reused for every weight. Empty: keep "
            "`answer.retrieval_weight`."
        ),
    )

    @field_validator("retrieve_k")
    @classmethod
    def _depths(cls, depths: list[int]) -> list[int]:
        if any(not 1 <= k <= 50 for k in depths):
            raise ValueError(f"every retrieve_k tried must be between 1 and 50, got {depths}")
        return list(dict.fromkeys(depths))

    @field_validator("retrieval_weights")
    @classmethod
    def _weights(cls, weights: list[float]) -> list[float]:
        if any(not 0 <= w <= 1000 for w in weights):
            raise ValueError(f"every retrieval weight tried must be between 0 and 1000, got {weights}")
        return list(dict.fromkeys(weights))


class PassageSettings(Strict):
    """How each retrieved passage is shown to the model (the same in training, evaluation and serving)."""

    fields: list[Literal["id", "title", "text"]] = Field(
        ["id", "title"],
        min_length=1,
        description=(
            "Parts of a passage rendered, in order: `id` (what the answer names), `title`, `text` (the start of the "
            "document's best chunk). Default `[id, title]` renders `A01.02 — Typhoid fever with heart involvement`."
        ),
    )
    max_text_words: int = Field(
        32, ge=1, le=512, description="Most words of the text rendered (whitespace-separated; the rest is cut with …)."
    )

    @field_validator("fields")
    @classmethod
    def _distinct(cls, fields: list[str]) -> list[str]:
        if len(set(fields)) != len(fields):
            raise ValueError(f"each passage field may be listed once, got {fields}")
        return fields


class AnswerSettings(Strict):
    """How the answer is decoded when the output is one of the retrieved documents' ids."""

    mode: AnswerMode = Field(
        "free",
        description=(
            "`free`: the model writes any answer. `constrained`: decoding is restricted (a llama.cpp grammar) to the "
            "retrieved passages' ids. `score`: the LM's log-likelihood of each candidate id as the answer ranks them "
            "and the best is answered (one forward pass per candidate token). Both non-free modes need retrieval and "
            "a single output field, and never answer an id outside the candidates."
        ),
    )
    choose_from: Literal["id", "title"] = Field(
        "id",
        description=(
            "What a `constrained` or `score` answer chooses among: the retrieved documents' `id`s (a code, a label), "
            "or their `title`s, where the documents are solved examples and a title is an answer (e.g. a known "
            "word's pronunciation). Match `evaluation.retrieval_answer`, so the baseline answers the same way."
        ),
    )
    retrieval_weight: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description=(
            "Mode `score` only: how much the retriever's ranking counts beside the LM. Each candidate's score is its "
            "log-likelihood minus `retrieval_weight × ln(1 + rank)` (rank 0 is the first hit), so 0 is the LM alone "
            "and a large weight (e.g. 100) answers the first hit unless the LM is nearly certain otherwise."
        ),
    )


class ProgramSettings(Strict):
    """The DSPy program the specialist runs at inference."""

    module: Literal["predict", "chain_of_thought"] = Field("predict", description="DSPy module kind.")
    instruction: str = Field(min_length=1, description="The signature's instruction (its docstring).")
    inputs: list[ProgramField] = Field(min_length=1, description="Input fields, in prompt order.")
    outputs: list[ProgramField] = Field(min_length=1, description="Output fields, in prompt order.")
    retrieve_k: int = Field(
        5, ge=0, le=50, description="Passages retrieved from the champion index per question (0 = no retrieval)."
    )
    context_field: str = Field(
        "context", pattern=r"^[a-z][a-z0-9_]*$", description="Input field that receives the retrieved passages."
    )
    max_tokens: int = Field(32, ge=1, le=4096, description="Most tokens generated per answer.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature.")
    passage: PassageSettings = Field(
        default_factory=PassageSettings, description="How each retrieved passage is rendered in the prompt."
    )
    answer: AnswerSettings = Field(
        default_factory=AnswerSettings, description="Free answers, or answers restricted to the retrieved ids."
    )
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings, description="Optimizer settings.")

    @property
    def field_names(self) -> list[str]:
        """The signature's input and output field names: what every evaluation case must give."""
        return [field.name for field in (*self.inputs, *self.outputs)]

    @property
    def declared_decoding(self) -> tuple[str, int, float]:
        """The declared (answer mode, retrieval depth, retrieval weight): how the un-optimized program answers."""
        weight = self.answer.retrieval_weight if self.answer.mode == "score" else 0.0
        return (self.answer.mode, self.retrieve_k, weight)

    def decoding_plan(self, depths: list[int] | None = None) -> list[tuple[str, int, float]]:
        """The (answer mode, retrieval depth, retrieval weight) tries a flow chooses among on dev, in the declared
        order: `optimizer.answer_modes` × `optimizer.retrieve_k` (or `depths`), with each of
        `optimizer.retrieval_weights` for `score`. An undeclared list is the declared program's one value."""
        optimizer = self.optimizer
        modes = optimizer.answer_modes or [self.answer.mode]
        depths = depths or optimizer.retrieve_k or [self.retrieve_k]
        weights = optimizer.retrieval_weights or [self.answer.retrieval_weight]
        return [
            (mode, depth, weight if mode == "score" else 0.0)
            for depth in depths
            for mode in modes
            for weight in (weights if mode == "score" else [0.0])
        ]

    @model_validator(mode="after")
    def _distinct_field_names(self) -> ProgramSettings:
        seen: set[str] = set()
        for group in ("inputs", "outputs"):
            for position, field in enumerate(getattr(self, group)):
                if field.name in seen or (self.retrieve_k and field.name == self.context_field):
                    raise FieldError(
                        (group, position, "name"), f"field name {field.name!r} is used twice in the signature"
                    )
                seen.add(field.name)
        return self

    @model_validator(mode="after")
    def _answers_from_candidates(self) -> ProgramSettings:
        """A constrained or scored answer is one retrieved document's id: it needs retrieval and one plain output."""
        tried = [("answer", "mode", self.answer.mode)] + [
            ("optimizer", "answer_modes", position, mode) for position, mode in enumerate(self.optimizer.answer_modes)
        ]
        for *loc, mode in tried:
            if mode not in CANDIDATE_MODES:
                continue
            if not self.retrieve_k:
                raise FieldError(
                    tuple(loc),
                    f"answer mode {mode!r} answers one of the retrieved documents' ids, but this program retrieves "
                    "nothing (retrieve_k: 0); set retrieve_k (e.g. 5) or use mode free",
                )
            if len(self.outputs) != 1:
                raise FieldError(
                    tuple(loc),
                    f"answer mode {mode!r} answers a single document id, but the program has {len(self.outputs)} "
                    "output fields; keep one output field or use mode free",
                )
            if self.module != "predict":
                raise FieldError(
                    tuple(loc),
                    f"answer mode {mode!r} decodes the answer alone, but module {self.module!r} writes its reasoning "
                    "first; use module predict or mode free",
                )
        chooses = self.answer.mode in CANDIDATE_MODES or any(m in CANDIDATE_MODES for m in self.optimizer.answer_modes)
        if self.answer.choose_from != "id" and not chooses:
            raise FieldError(
                ("answer", "choose_from"),
                f"choose_from: {self.answer.choose_from} sets what a constrained or scored answer chooses among, but "
                "this program only answers freely; set answer.mode: score (or add score to optimizer.answer_modes) or "
                "remove choose_from",
            )
        scored = self.answer.mode == "score" or "score" in self.optimizer.answer_modes
        if self.answer.retrieval_weight and self.answer.mode != "score":
            raise FieldError(
                ("answer", "retrieval_weight"),
                f"retrieval_weight weighs the retriever's ranking against the LM's scores, but answer mode is "
                f"{self.answer.mode!r}; set answer.mode: score or remove retrieval_weight",
            )
        if self.optimizer.retrieval_weights and not scored:
            raise FieldError(
                ("optimizer", "retrieval_weights"),
                "retrieval weights are tried with answer mode score, which this program never uses; add score to "
                "optimizer.answer_modes or remove the list",
            )
        if self.optimizer.retrieve_k and not self.retrieve_k:
            raise FieldError(
                ("optimizer", "retrieve_k"),
                "this program retrieves nothing (retrieve_k: 0), so no retrieval depth can be tried; remove the list",
            )
        return self
