"""Shared building blocks of the `pipelines.yaml` schema: the strict base model and path types.

Paths in `pipelines.yaml` are written relative to the file's folder (the *project root*). They are
kept as written and resolved with `CadreConfig.resolve`; validation checks, when it knows the root
(validation context `{"root": Path}`), that they stay inside the project and, where the file must
already exist, that it does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo


class Strict(BaseModel):
    """Base of every schema model: unknown keys are errors, never silently dropped."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False, use_attribute_docstrings=False)


class FieldError(ValueError):
    """A cross-field error that belongs to a sub-field of the model that raised it.

    A `model_validator` raises it with the path below the model (`("tuning", "rank")`), so the error
    report points at the line of that sub-field instead of the whole block.
    """

    def __init__(self, loc: tuple[str | int, ...], message: str):
        super().__init__(message)
        self.loc = loc
        self.message = message


def _root(info: ValidationInfo) -> Path | None:
    context = info.context or {}
    root = context.get("root")
    return Path(root) if root is not None else None


def _inside_project(value: str, info: ValidationInfo) -> str:
    root = _root(info)
    if root is None:
        return value
    resolved = (root / value).resolve()
    try:
        resolved.relative_to(root.resolve())
    except ValueError:
        raise ValueError(f"path {value!r} leaves the project folder {root}; keep data inside the project") from None
    return value


def _exists(value: str, info: ValidationInfo) -> str:
    root = _root(info)
    if root is None:
        return value
    if not (root / value).exists():
        raise ValueError(f"path {value!r} does not exist (looked for {(root / value).resolve()})")
    return value


ProjectPath = Annotated[str, AfterValidator(_inside_project)]
"""A path relative to the project root that must stay inside it (it may not exist yet)."""

ExistingProjectPath = Annotated[str, AfterValidator(_inside_project), AfterValidator(_exists)]
"""A path relative to the project root that must stay inside it and exist now."""
