"""Fine-tuning settings: the monthly (Q)LoRA refresh and DPO learning from user corrections."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

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

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TuningSettings:
        if self.max_steps is None and self.epochs is None:
            raise FieldError(("max_steps",), "set max_steps or epochs")
        return self


class FeedbackSettings(Strict):
    """Turning user corrections into preference pairs and a DPO update of the champion adapter."""

    min_pairs: int = Field(8, gt=0, description="Corrections needed before a DPO run is attempted.")
    beta: float = Field(0.1, gt=0.0, description="DPO beta.")
    learning_rate: float = Field(5e-5, gt=0.0, lt=1.0, description="DPO learning rate.")
    max_steps: int = Field(40, gt=0, description="DPO optimizer steps.")
    store_url: str | None = Field(
        None, description="SQLAlchemy URL of the feedback store (default: SQLite under the state dir)."
    )
