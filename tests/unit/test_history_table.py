"""`cadre history` prints a table that keeps who acted readable, piped into a log at 160 columns."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from cadre.config import load_config
from cadre.registry.versions import PromotionRecord
from cadre.registry.view import history_table

ROOT = Path(__file__).resolve().parents[2]


def _record(seq: int, actor: str) -> PromotionRecord:
    return PromotionRecord(
        event="refusal" if seq % 2 else "promotion",
        project="cadre-demo",
        specialist="icd10-coder",
        kind="program",
        model_name="cadre-demo.icd10-coder.program",
        version=str(seq),
        from_version="1",
        to_version="1" if seq % 2 else str(seq),
        at=datetime(2026, 11, 30, 6, seq, tzinfo=UTC),
        actor=actor,
        reason="the candidate's exact_match did not beat the champion's by 0.01 with its interval above it " * 2,
        gate="refused" if seq % 2 else "passed",
        metrics={"exact_match": 0.41, "token_f1": 0.52, "icd_hierarchy": 0.63, "latency_p95_ms": 1234.5},
        seq=seq,
    )


def test_the_by_column_is_printed_whole_at_160_columns() -> None:
    settings = load_config(ROOT / "pipelines.yaml").specialist("icd10-coder")
    actors = ["flow-run:optimize-prompts/icd10-coder (cheerful-otter)", "alice@build-machine-07"]
    table = history_table("History of icd10-coder", [_record(i, actors[i % 2]) for i in range(1, 5)], settings)
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(table)
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 160
    for actor in actors:
        assert actor in text, f"{actor!r} is cut or folded:\n{text}"
