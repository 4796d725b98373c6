"""Edge export: when a specialist's bundle is exported, and the rules a bundle must pass to be published."""

from __future__ import annotations

from pydantic import Field

from cadre.config.base import Strict


class EdgeSettings(Strict):
    """The offline bundle of a specialist (`cadre export`): judged beside the served champion before it is published.

    The bundle answers `cases` test cases beside the champion as `cadre serve` runs it (same cases, one thread
    each); it is published (replaces `<state_dir>/bundles/<specialist>/`) only when every rule below passes,
    otherwise it is kept beside it as `<specialist>.refused/` with its report.
    """

    export_on_promotion: bool = Field(
        False,
        description="Export and judge a bundle after every promotion that gives the specialist a new champion "
        "(the flow's last step; its verdict is tagged on the specialist's model version).",
    )
    cases: int = Field(40, gt=0, description="Test cases the bundle and the served champion both answer.")
    min_parity: float = Field(
        0.99, ge=0.0, le=1.0, description="Share of those cases the bundle must answer exactly as the champion does."
    )
    max_quality_drop: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="How far below the served champion the bundle's first answer metric may score.",
    )
    max_size_mb: float | None = Field(None, gt=0, description="Largest bundle, in MB (null: no limit).")
    max_p95_ms: float | None = Field(
        None, gt=0, description="Slowest p95 answer on one thread, in milliseconds (null: no limit)."
    )
