"""The score tables a reviewer reads in a run's note and the flow's log (Markdown), and the flow's score summary.

- `program_score_table`: the prompt flow's test-split comparison (retrieval only, declared program, champion,
  candidate with its answer mode) with intervals, invented answers, LM calls and time, and what compiling cost.
- `adapter_score_table`: champion adapter (or base model) and candidate adapter side by side.
- `slice_table` / `split_scores`: the learn-from-feedback flow's split of the same scores into the
  `feedback` slice and the rest of the test split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cadre.evaluation.comparison import AdapterScores, TestScores, outside_candidates
from cadre.feedback.store import FEEDBACK_SLICE


def program_score_table(scores: TestScores, compile_summary: Mapping[str, Any]) -> str:
    """The test-split comparison a reviewer reads first: every system on the same cases, with intervals, LM calls
    and time, then what compiling cost.

    Rows: retrieval only (the first hit's id), the declared program (when a champion is the baseline), the
    champion or declared program, the candidate with the answer mode and retrieval depth it answers with. Each
    score carries its bootstrap interval; `outside` is the share of answers that are not among the case's
    retrieved ids (an invented answer; 0 for a constrained or scored answer).

    Args:
        scores: the systems scored on the test split.
        compile_summary: `CompileResult.summary()` of the candidate (optimizer, LM calls, tokens, cost, time,
            and the `answer_mode` / `chosen_retrieve_k` chosen on dev).
    """
    mode = compile_summary.get("answer_mode", scores.answer_mode)
    depth = compile_summary.get("chosen_retrieve_k")
    answers = f"answers {mode}" + (f", {depth} passages" if depth else "")
    rows = [
        (
            "retrieval only (its top-1 document as the answer)",
            scores.retrieval_only,
            scores.costs.get("retrieval_only"),
        ),
        ("declared program", scores.declared, scores.costs.get("declared")),
        (
            scores.baseline.name + (" (champion)" if scores.baseline_is_champion else " (declared program)"),
            scores.baseline,
            scores.costs.get("baseline"),
        ),
        (f"candidate ({answers})", scores.candidate, scores.costs.get("candidate")),
    ]
    metrics = scores.candidate.metrics
    confidence = scores.candidate.confidence
    lines = [
        f"### Test split: {scores.candidate.cases} cases, {confidence:.0%} bootstrap intervals",
        "",
        "| system | " + " | ".join(metrics) + " | outside | LM calls | wall s |",
        "|---" * (len(metrics) + 4) + "|",
    ]
    for name, result, cost in rows:
        if result is None:
            continue
        values = " | ".join(_with_interval(result, m) for m in metrics)
        calls, seconds = int((cost or {}).get("lm_calls", 0)), (cost or {}).get("wall_seconds", 0.0)
        outside = f"{outside_candidates(result):.3f}" if any(e.retrieved_ids for e in result.examples) else "—"
        lines.append(f"| {name} | {values} | {outside} | {calls} | {seconds:.1f} |")
    summary = compile_summary
    lines += [
        "",
        f"Compile: {summary.get('optimizer')}, {int(summary.get('compile_lm_calls', 0))} LM calls "
        f"({int(summary.get('compile_lm_cache_hits', 0))} cache hits), {int(summary.get('compile_tokens', 0))} tokens, "
        f"${summary.get('compile_cost_usd', 0.0):.4f}, {summary.get('compile_wall_seconds', 0.0):.1f} s"
        + (f"; stopped by the budget: {summary.get('stop_reason')}" if summary.get("stopped_by_budget") else "")
        + ".",
    ]
    choices = summary.get("dev_choices") or []
    if choices:
        tried = ", ".join(
            f"{c['answer_mode']}@{c['retrieve_k']} {c['score']:.3f}" + (" (kept)" if _kept(c, mode, depth) else "")
            for c in choices
        )
        lines.append(f"Chosen on {choices[0]['cases']} dev cases (answer mode@passages, first answer metric): {tried}.")
    return "\n".join(lines)


def _kept(choice: Mapping[str, Any], mode: str, depth: Any) -> bool:
    return choice["answer_mode"] == mode and choice["retrieve_k"] == depth


def _with_interval(result: Any, metric: str) -> str:
    value = f"{result.scores.get(metric, 0.0):.3f}"
    interval = result.intervals.get(metric)
    return f"{value} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else value


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
