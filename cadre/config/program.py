"""The specialist's DSPy program: signature, module kind, retrieval, and how it is optimized."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cadre.config.base import FieldError, Strict


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
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings, description="Optimizer settings.")

    @property
    def field_names(self) -> list[str]:
        """The signature's input and output field names: what every evaluation case must give."""
        return [field.name for field in (*self.inputs, *self.outputs)]

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
