"""The score tables a reviewer reads in a run's note and the flow's log (Markdown), and the flow's score summary.

- `program_score_table`: the prompt flow's test-split comparison (retrieval only, champion or declared
  program, candidate) with LM calls and time, and what compiling cost.
- `adapter_score_table`: champion adapter (or base model) and candidate adapter side by side.
- `slice_table` / `split_scores`: the learn-from-feedback flow's split of the same scores into the
  `feedback` slice and the rest of the test split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cadre.evaluation.comparison import AdapterScores, TestScores
from cadre.feedback.store import FEEDBACK_SLICE


def program_score_table(scores: TestScores, compile_summary: Mapping[str, Any]) -> str:
    """The test-split comparison a reviewer reads first: quality, LM calls and time per system, then compile cost.

    Args:
        scores: the systems scored on the test split.
        compile_summary: `CompileResult.summary()` of the candidate (optimizer, LM calls, tokens, cost, time).
    """
    rows = [
        (
            "retrieval only (its top-1 document as the answer)",
            scores.retrieval_only,
            scores.costs.get("retrieval_only"),
        ),
        (
            scores.baseline.name + (" (champion)" if scores.baseline_is_champion else " (declared program)"),
            scores.baseline,
            scores.costs.get("baseline"),
        ),
        ("candidate", scores.candidate, scores.costs.get("candidate")),
    ]
    metrics = scores.candidate.metrics
    lines = [
        f"### Test split: {scores.candidate.cases} cases",
        "",
        "| system | " + " | ".join(metrics) + " | LM calls | wall s |",
        "|---" * (len(metrics) + 3) + "|",
    ]
    for name, result, cost in rows:
        if result is None:
            continue
        values = " | ".join(f"{result.scores.get(m, 0.0):.3f}" for m in metrics)
        calls, seconds = int((cost or {}).get("lm_calls", 0)), (cost or {}).get("wall_seconds", 0.0)
        lines.append(f"| {name} | {values} | {calls} | {seconds:.1f} |")
    summary = compile_summary
    lines += [
        "",
        f"Compile: {summary.get('optimizer')}, {int(summary.get('compile_lm_calls', 0))} LM calls "
        f"({int(summary.get('compile_lm_cache_hits', 0))} cache hits), {int(summary.get('compile_tokens', 0))} tokens, "
        f"${summary.get('compile_cost_usd', 0.0):.4f}, {summary.get('compile_wall_seconds', 0.0):.1f} s"
        + (f"; stopped by the budget: {summary.get('stop_reason')}" if summary.get("stopped_by_budget") else "")
        + ".",
    ]
    return "\n".join(lines)


def adapter_score_table(scores: AdapterScores) -> str:
    """Champion (or base model) and candidate side by side, as a reviewer reads it in the run's note."""
    metrics = scores.candidate.result.metrics
    lines = [
        f"### Test split: {scores.candidate.result.cases} cases, same program and retrieval",
        "",
        "| system | " + " | ".join(metrics) + " | wall s |",
        "|---" * (len(metrics) + 2) + "|",
    ]
    for run in (scores.champion, scores.candidate):
        result = run.result
        lines.append(
            f"| {result.name} | "
            + " | ".join(f"{result.scores.get(m, 0.0):.3f}" for m in metrics)
            + f" | {run.wall_seconds:.0f} |"
        )
    return "\n".join(lines)


def slice_table(scores: AdapterScores) -> str:
    """Candidate and champion per slice group: the feedback slice against everything else (the regular suite)."""
    metrics = scores.candidate.result.metrics
    lines = ["| cases | system | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for label, in_feedback in (("feedback slice", True), ("test split", False)):
        for run in (scores.champion, scores.candidate):
            rows = [e for e in run.result.examples if (e.slice == FEEDBACK_SLICE) == in_feedback]
            if not rows:
                continue
            means = [sum(e.scores.get(m, 0.0) for e in rows) / len(rows) for m in metrics]
            lines.append(
                f"| {label} ({len(rows)}) | {run.result.name} | " + " | ".join(f"{v:.3f}" for v in means) + " |"
            )
    return "\n".join(lines)


def split_scores(scores: AdapterScores) -> dict[str, dict[str, float]]:
    """Metric means of candidate and champion on the feedback slice and on the rest, for the flow's result.

    Returns:
        `{"candidate_feedback": {metric: mean}, "candidate_test": …, "champion_feedback": …, "champion_test": …}`,
        a group left out when it has no case.
    """
    found: dict[str, dict[str, float]] = {}
    for name, run in (("candidate", scores.candidate), ("champion", scores.champion)):
        for label, in_feedback in (("feedback", True), ("test", False)):
            rows = [e for e in run.result.examples if (e.slice == FEEDBACK_SLICE) == in_feedback]
            for metric in run.result.metrics:
                if rows:
                    found.setdefault(f"{name}_{label}", {})[metric] = sum(
                        e.scores.get(metric, 0.0) for e in rows
                    ) / len(rows)
    return found
