"""When each flow runs for a specialist: cron expressions with a timezone."""

from __future__ import annotations

import re
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from cadre.config.base import Strict

_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    (
        "month",
        1,
        12,
        {
            m: i
            for i, m in enumerate(
                ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1
            )
        },
    ),
    ("day of week", 0, 7, {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}),
)
_NICKNAMES = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_ATOM = re.compile(r"^(\*|[0-9a-z]+(-[0-9a-z]+)?)(/[0-9]+)?$")


def check_cron(expression: str) -> str:
    """Validate a 5-field cron expression (or @daily-style nickname); raise ValueError saying what is wrong."""
    text = expression.strip().lower()
    if text in _NICKNAMES:
        return expression
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(
            f"cron {expression!r} has {len(parts)} fields; expected 5 (minute hour day-of-month month day-of-week), "
            'e.g. "0 3 * * *" for daily at 03:00'
        )
    for part, (label, low, high, names) in zip(parts, _FIELDS, strict=True):
        for atom in part.split(","):
            if not _ATOM.match(atom):
                raise ValueError(f"cron {expression!r}: {label} field {part!r} is not valid")
            span, _, step = atom.partition("/")
            if step and int(step) == 0:
                raise ValueError(f"cron {expression!r}: {label} step must be at least 1")
            if span == "*":
                continue
            for value in span.split("-"):
                number = names.get(value, value)
                if not str(number).isdigit() or not low <= int(number) <= high:
                    raise ValueError(f"cron {expression!r}: {label} value {value!r} is outside {low}-{high}")
    if not _some_day_fits_every_month(parts[2]):
        _check_fires(expression)
    return expression


_CHECKED_YEARS = 5
"""A cron with no fire time within this many years never fires (29 February comes once in 4)."""


def _some_day_fits_every_month(day_of_month: str) -> bool:
    """Whether the day-of-month field allows a day every month has (1-28): then the schedule fires every month."""
    for atom in day_of_month.split(","):
        span = atom.partition("/")[0]
        if span == "*" or int(span.split("-")[0]) <= 28:
            return True
    return False


def _check_fires(expression: str) -> None:
    """Raise ValueError when the cron has no fire time within `_CHECKED_YEARS` years, as Prefect computes them.

    Only crons whose days of month are all 29-31 get here (a day some month lacks); Prefect's own cron parser
    (the one its scheduler uses) decides, so it is imported only for them.
    """
    from datetime import UTC, datetime

    from prefect._vendor.croniter import croniter
    from prefect._vendor.croniter.croniter import CroniterBadDateError

    try:
        croniter(expression, datetime.now(UTC), day_or=True, max_years_between_matches=_CHECKED_YEARS).get_next(
            datetime
        )
    except CroniterBadDateError:
        raise ValueError(
            f"cron {expression!r} never fires: no date in the next {_CHECKED_YEARS} years has its day of the month in "
            "its months (like 31 February), so Prefect's scheduler would never start the flow"
        ) from None


class Schedule(Strict):
    """One recurring schedule."""

    cron: str = Field(description='Cron expression, e.g. "0 3 * * *" (daily 03:00) or "@weekly".')
    timezone: str = Field("UTC", description="IANA timezone the cron is read in, e.g. Europe/Berlin.")
    active: bool = Field(
        True,
        description="Whether a new deployment starts with this schedule active. Redeploying keeps whatever a user set in the Prefect UI.",
    )

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        return check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder of zones, such as "Europe"
            raise ValueError(f"unknown timezone {value!r}; use an IANA name such as UTC or Europe/Berlin") from None
        return value


class Schedules(Strict):
    """The recurring flows of a specialist; set one to null to leave it unscheduled."""

    reindex: Schedule | None = Field(
        default_factory=lambda: Schedule(cron="0 3 * * *"), description="RAG re-index (default daily 03:00)."
    )
    embedder: Schedule | None = Field(
        None,
        description=(
            "Retriever refresh: fine-tune the embedding model and re-embed the corpus (default: unscheduled; "
            'e.g. "0 2 15 * *", the 15th of each month). Declaring it needs train cases with relevant_ids.'
        ),
    )
    optimize: Schedule | None = Field(
        default_factory=lambda: Schedule(cron="0 4 * * 1"), description="Prompt optimization (default Mondays 04:00)."
    )
    refresh: Schedule | None = Field(
        default_factory=lambda: Schedule(cron="0 1 1 * *"),
        description="Adapter refresh (default the 1st of each month, 01:00).",
    )
    feedback: Schedule | None = Field(
        default_factory=lambda: Schedule(cron="0 5 * * 0"),
        description="Learning from feedback (default Sundays 05:00).",
    )
