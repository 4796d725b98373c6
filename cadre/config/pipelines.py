"""The root of `pipelines.yaml` and the validated configuration object handed to the rest of Cadre."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from cadre.config.base import FieldError, Strict
from cadre.config.project import ProjectSettings
from cadre.config.specialist import Specialist


class PipelinesFile(Strict):
    """`pipelines.yaml`: project settings, shared defaults, and the team of specialists."""

    version: Literal[1] = Field(1, description="Schema version of this file.")
    project: ProjectSettings = Field(default_factory=ProjectSettings, description="Settings shared by the whole team.")
    defaults: dict[str, Any] | None = Field(
        None,
        description="Settings every specialist inherits (any specialist key but `name`); a specialist overrides them key by key.",
    )
    specialists: list[Specialist] = Field(min_length=1, description="The team. Each entry is one specialist.")

    @model_validator(mode="after")
    def _unique_names(self) -> PipelinesFile:
        seen: set[str] = set()
        for position, specialist in enumerate(self.specialists):
            if specialist.name in seen:
                raise FieldError(
                    ("specialists", position, "name"), f"specialist name {specialist.name!r} is used twice"
                )
            seen.add(specialist.name)
        if self.project.index.backend != "lancedb":
            for position, specialist in enumerate(self.specialists):
                if specialist.index.search_mode == "learned":
                    raise FieldError(
                        ("specialists", position, "index", "search_mode"),
                        f"search_mode: learned needs project.index.backend: lancedb (it is "
                        f"{self.project.index.backend!r}, which fuses its rankings itself); use hybrid or vector",
                    )
        fallback = self.project.serving.route_fallback
        if fallback is not None and fallback not in seen:
            raise FieldError(
                ("project", "serving", "route_fallback"),
                f"route_fallback {fallback!r} is not a specialist; expected one of: {', '.join(sorted(seen))}",
            )
        return self


def merge_defaults(defaults: dict[str, Any], specialist: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge a specialist over the shared defaults: mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(defaults)
    for key, value in specialist.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_defaults(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass(frozen=True)
class CadreConfig:
    """A validated `pipelines.yaml`, with the file it came from.

    Attributes:
        file: the YAML file.
        pipelines: the validated content.
        sha256: hash of the file's bytes (logged as lineage with every run).
    """

    file: Path
    pipelines: PipelinesFile
    sha256: str

    @property
    def root(self) -> Path:
        return self.file.parent

    @property
    def project(self) -> ProjectSettings:
        return self.pipelines.project

    @property
    def specialists(self) -> list[Specialist]:
        return self.pipelines.specialists

    @property
    def state_dir(self) -> Path:
        return self.resolve(self.project.state_dir)

    def resolve(self, path: str | Path) -> Path:
        """A path from the YAML, made absolute against the project root."""
        return (self.root / path).resolve()

    def specialist(self, name: str) -> Specialist:
        for specialist in self.specialists:
            if specialist.name == name:
                return specialist
        known = ", ".join(s.name for s in self.specialists)
        raise KeyError(f"no specialist named {name!r} in {self.file}; known: {known}")
