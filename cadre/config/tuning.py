"""Fine-tuning settings: the monthly (Q)LoRA refresh and DPO learning from user corrections."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from cadre.config.base import ExistingProjectPath, FieldError, Strict

AUTO_MAX_LENGTH = 1024
"""The most tokens per example `tuning.max_length: auto` allows."""


def length_limit(max_length: int | str) -> int:
    """The token limit a `tuning.max_length` setting filters by: its number, or `AUTO_MAX_LENGTH` for `auto`."""
    return AUTO_MAX_LENGTH if max_length == "auto" else int(max_length)


class TuningSettings(Strict):
    """Supervised (Q)LoRA fine-tuning of the base model with peft + trl."""

    method: Literal["qlora", "lora"] = Field(
        "qlora", description="`qlora`: 4-bit nf4 base with double quantization; `lora`: full-precision base."
    )
    rank: int = Field(8, gt=0, le=512, description="LoRA rank r.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (scaling = alpha / rank).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Modules that get adapters.")
    learning_rate: float = Field(2e-4, gt=0.0, lt=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    max_steps: int | None = Field(300, gt=0, description="Optimizer steps (takes precedence over epochs).")
    epochs: float | None = Field(None, gt=0, description="Epochs, when max_steps is null.")
    batch_size: int = Field(4, gt=0, description="Per-device batch size.")
    gradient_accumulation: int = Field(1, gt=0, description="Gradient accumulation steps.")
    max_length: Annotated[int, Field(ge=16, le=32768)] | Literal["auto"] = Field(
        "auto",
        description=(
            "Most tokens per training example (prompt + answer); longer ones are dropped, never cut. `auto`: the longest example, "
            f"up to {AUTO_MAX_LENGTH} tokens (a served program's demos and passages make prompts long; `auto` follows them)."
        ),
    )
    checkpoint_every: int = Field(
        25, gt=0, description="Steps between checkpoints (a killed run resumes from the last one)."
    )
    heldout_fraction: float = Field(
        0.05, ge=0.0, lt=0.5, description="Share of training examples held out for eval loss."
    )
    data: list[ExistingProjectPath] = Field(
        [], description="Extra training files (JSONL/Parquet with the program's field names)."
    )
    from_eval_train: bool = Field(True, description="Also train on the evaluation suite's train split.")
    seed: int = Field(0, description="Random seed.")
    search: SearchSettings | None = Field(
        None,
        description="Optional Optuna search over these settings before the candidate is trained (see `SearchSettings`).",
    )
    decoding_dev_cases: int | None = Field(
        None,
        gt=0,
        description=(
            "Re-choose how the program answers for the candidate adapter on this many dev cases (the smoke budget: "
            "at most `smoke.decoding_dev_cases`, by default none): each of `program.optimizer.answer_modes` (and `retrieval_weights` with "
            "`score`) at the serving depth. An adapter can make another answer mode pay (the pronouncer's writes "
            "phones the base model cannot); the candidate is then judged answering that way, and if it is promoted "
            "the serving program is promoted with that answer mode beside it. Null: the candidate answers as the "
            "serving program does."
        ),
    )

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TuningSettings:
        if self.max_steps is None and self.epochs is None:
            raise FieldError(("max_steps",), "set max_steps or epochs")
        return self

    @model_validator(mode="after")
    def _declared_inside_search(self) -> TuningSettings:
        """The declared settings are the search's first trial, so each must lie in its part of the space."""
        for name, values in (self.search.space if self.search else {}).items():
            declared = getattr(self, name)
            if isinstance(values, SearchRange):
                inside = declared is not None and values.low <= declared <= values.high
                where = f"the range [{values.low:g}, {values.high:g}]"
            else:
                inside = declared in values
                where = f"the choices {values}"
            if not inside:
                raise FieldError(
                    ("search", "space", name),
                    f"the declared {name} ({declared}) is not in {where}: the declared settings are the search's "
                    f"first trial; widen the space or change tuning.{name}",
                )
        return self


SEARCHABLE = ("learning_rate", "rank", "alpha", "dropout", "max_steps", "batch_size", "warmup_ratio", "lr_scheduler")
"""The `tuning` settings a hyperparameter search may vary (`tuning.search.space`)."""

_INTEGER_SETTINGS = ("rank", "alpha", "max_steps", "batch_size")


class SearchRange(Strict):
    """A numeric range a setting is drawn from."""

    low: float = Field(description="Smallest value.")
    high: float = Field(description="Largest value (more than `low`).")
    log: bool = Field(False, description="Draw on a log scale (learning rates); needs `low` > 0.")


class SearchSettings(Strict):
    """A budgeted Optuna search over the refresh's own hyperparameters, before the candidate is trained.

    Each trial fine-tunes with one draw of `space` on the same training data, is pruned early when its training
    loss trails the earlier trials', and otherwise is scored on `dev_cases` dev cases exactly as the specialist
    serves. The declared settings are always the first trial, so the best trial is compared with them. The study is
    stored under the state dir and resumes after a crash; the best trial's adapter then goes through the adapter
    gates like any candidate.
    """

    trials: int = Field(6, ge=1, le=200, description="Trials of a `full` refresh, the declared settings included.")
    smoke_trials: int = Field(
        0, ge=0, le=20, description="Trials of a `smoke` refresh (0: no search; steps are capped to the smoke budget)."
    )
    max_wall_seconds: float | None = Field(
        None, gt=0, description="No trial starts after this many seconds of searching (the running one finishes)."
    )
    dev_cases: int = Field(50, ge=1, description="Dev cases each trial is scored on (the first N valid ones).")
    prune: bool = Field(
        True, description="Stop a trial early when its training loss trails the median of earlier trials."
    )
    space: dict[Literal[SEARCHABLE], list[Any] | SearchRange] = Field(  # type: ignore[valid-type]
        description=(
            "Settings to vary: a list of choices (`rank: [4, 8, 16]`) or a range (`learning_rate: {low: 5.0e-5, "
            f"high: 5.0e-4, log: true}}`). Any of: {', '.join(SEARCHABLE)}."
        ),
    )

    @model_validator(mode="after")
    def _possible(self) -> SearchSettings:
        if not self.space:
            raise FieldError(("space",), f"the search space is empty; vary at least one of {', '.join(SEARCHABLE)}")
        for name, values in self.space.items():
            if isinstance(values, SearchRange):
                if name == "lr_scheduler":
                    raise FieldError(("space", name), "lr_scheduler is a choice: give a list such as [cosine, linear]")
                if values.low >= values.high:
                    raise FieldError(
                        ("space", name, "high"),
                        f"range of {name} is empty or inverted: high ({values.high}) must be more than low ({values.low})",
                    )
                if values.log and values.low <= 0:
                    raise FieldError(("space", name, "low"), f"a log range needs low > 0, got {values.low}")
                if name in _INTEGER_SETTINGS and not (values.low.is_integer() and values.high.is_integer()):
                    raise FieldError(("space", name), f"{name} is a whole number: low and high must be whole numbers")
                edges = [values.low, values.high]
            else:
                if not values:
                    raise FieldError(("space", name), f"no choices for {name}; give at least one value")
                edges = values
            for value in edges:
                try:
                    TuningSettings.model_validate(
                        {name: int(value) if name in _INTEGER_SETTINGS and float(value).is_integer() else value}
                    )
                except (ValidationError, TypeError, ValueError) as error:
                    reason = error.errors()[0]["msg"] if isinstance(error, ValidationError) else str(error)
                    raise FieldError(("space", name), f"{value!r} is not a valid {name}: {reason}") from None
        return self

    def trial_count(self, budget: str) -> int:
        """Trials of a run under `budget` (0: no search)."""
        return self.smoke_trials if budget == "smoke" else self.trials


class FeedbackSettings(Strict):
    """Turning user corrections into preference pairs and a DPO update of the champion adapter."""

    min_pairs: int = Field(8, gt=0, description="Corrections needed before a DPO run is attempted.")
    beta: float = Field(0.1, gt=0.0, description="DPO beta.")
    learning_rate: float = Field(5e-5, gt=0.0, lt=1.0, description="DPO learning rate.")
    max_steps: int = Field(40, gt=0, description="DPO optimizer steps.")
    store_url: str | None = Field(
        None, description="SQLAlchemy URL of the feedback store (default: SQLite under the state dir)."
    )
