"""Retriever refresh settings: fine-tuning a specialist's embedding model on its train split (the `embedder` stage)."""

from __future__ import annotations

from pydantic import Field, model_validator

from cadre.config.base import FieldError, Strict


class EmbedderSettings(Strict):
    """Fine-tuning of the embedding model with sentence-transformers: each train case's retrieval query against its
    relevant document's indexed text, with in-batch negatives plus hard negatives mined from the live index
    (`MultipleNegativesRankingLoss`)."""

    max_steps: int | None = Field(
        None, gt=0, description="Optimizer steps (takes precedence over epochs; null: train for `epochs`)."
    )
    epochs: float | None = Field(1.0, gt=0, description="Passes over the training pairs, when max_steps is null.")
    batch_size: int = Field(
        32, ge=2, le=4096, description="Pairs per batch; every other pair's positive is an in-batch negative."
    )
    learning_rate: float = Field(2e-5, gt=0.0, lt=1.0, description="Peak learning rate (linear decay after warmup).")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    hard_negatives: int = Field(
        1,
        ge=0,
        le=16,
        description="Hard negatives per query: the live index's best hits that are not a relevant document (0: in-batch only).",
    )
    mine_depth: int = Field(
        10, gt=0, le=200, description="How many of the live index's best hits are searched for hard negatives."
    )
    max_train_pairs: int | None = Field(
        None, gt=0, description="Cap on training pairs (train cases with relevant ids; null: every one)."
    )
    checkpoint_every: int = Field(
        100, gt=0, description="Steps between checkpoints (a killed run resumes from the last one)."
    )
    seed: int = Field(0, description="Random seed (shuffling, initialisation of nothing else).")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> EmbedderSettings:
        if self.max_steps is None and self.epochs is None:
            raise FieldError(("max_steps",), "set max_steps or epochs")
        if self.hard_negatives >= self.mine_depth:
            raise FieldError(
                ("mine_depth",),
                f"mine_depth {self.mine_depth} must exceed hard_negatives {self.hard_negatives}: the relevant "
                "documents are among the hits searched",
            )
        return self
