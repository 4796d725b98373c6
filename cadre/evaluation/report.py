"""The score tables a reviewer reads in a run's note and the flow's log (Markdown), and the flow's score summary.

- `program_score_table`: the prompt flow's test-split comparison (retrieval only, declared program, champion,
  candidate with its answer mode) with intervals, invented answers, LM calls and time, and what compiling cost.
- `adapter_score_table`: champion adapter (or base model) and candidate adapter side by side.
- `slice_table` / `split_scores`: the learn-from-feedback flow's split of the same scores into the
  `feedback` slice and the rest of the test split.
- `comparison_figure` / `log_comparison_figure`: candidate against champion per metric with bootstrap
  intervals, the figure every gated run logs beside its gate report.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cadre.evaluation.comparison import AdapterScores, TestScores, outside_candidates
from cadre.evaluation.results import EvaluationResult, compare
from cadre.feedback.store import FEEDBACK_SLICE


def program_score_table(scores: TestScores, compile_summary: Mapping[str, Any]) -> str:
    """The test-split comparison a reviewer reads first: every system on the same cases, with intervals, LM calls
    and time, then what compiling cost.

    Rows: retrieval only on the configured embedder's index version (where a refreshed embedder's is live: what
    the retriever refresh added), retrieval only (the first hit's id), the declared program (when a champion is
    the baseline), the champion or declared program, the candidate with the answer mode and retrieval depth it
    answers with. Each score carries its bootstrap interval; `outside` is the share of answers that are not among
    the case's retrieved ids (an invented answer; 0 for a constrained or scored answer; `—` where answers are not
    ids).

    Args:
        scores: the systems scored on the test split.
        compile_summary: `CompileResult.summary()` of the candidate (optimizer, LM calls, tokens, cost, time,
            and the `answer_mode` / `chosen_retrieve_k` chosen on dev).
    """
    mode = compile_summary.get("answer_mode", scores.answer_mode)
    depth = compile_summary.get("chosen_retrieve_k")
    weight = compile_summary.get("retrieval_weight") or 0.0
    answers = (
        f"answers {mode}"
        + (f" with the retriever's ranking weighted {weight:g}" if weight else "")
        + (f", {depth} passages" if depth else "")
    )
    before = scores.retrieval_configured
    rows = [
        (
            "retrieval only, the configured embedder, hybrid "
            f"(index {before.name.removeprefix('retrieval-top1-') if before else ''}, before the embedder refresh)",
            before,
            scores.costs.get("retrieval_configured"),
        ),
        (
            "retrieval only, the live index (its top-1 document as the answer)"
            if before
            else "retrieval only (its top-1 document as the answer)",
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
        judged = scores.answers_are_ids and any(e.retrieved_ids for e in result.examples)
        outside = f"{outside_candidates(result):.3f}" if judged else "—"
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
            f"{_try_name(c)} {c['score']:.3f}" + (" (kept)" if _kept(c, mode, depth, weight) else "") for c in choices
        )
        lines.append(
            f"Chosen on {choices[0]['cases']} dev cases (answer mode[/retrieval weight]@passages, first answer "
            f"metric): {tried}."
        )
    return "\n".join(lines)


def _try_name(choice: Mapping[str, Any]) -> str:
    weight = choice.get("retrieval_weight") or 0.0
    return (
        f"{choice['answer_mode']}"
        + (f"/{weight:g}" if choice["answer_mode"] == "score" else "")
        + f"@{choice['retrieve_k']}"
    )


def _kept(choice: Mapping[str, Any], mode: str, depth: Any, weight: float) -> bool:
    return (
        choice["answer_mode"] == mode
        and choice["retrieve_k"] == depth
        and (choice.get("retrieval_weight") or 0.0) == weight
    )


def _with_interval(result: Any, metric: str) -> str:
    value = f"{result.scores.get(metric, 0.0):.3f}"
    interval = result.intervals.get(metric)
    return f"{value} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else value


def adapter_score_table(scores: AdapterScores) -> str:
    """Champion (or base model) and candidate side by side, as a reviewer reads it in the run's note: each score
    with its bootstrap interval, then the candidate's paired difference on the same cases (both resampled on the
    same case indices)."""
    candidate, champion = scores.candidate.result, scores.champion.result
    metrics = candidate.metrics
    lines = [
        f"### Test split: {candidate.cases} cases, same program and retrieval, "
        f"{candidate.confidence:.0%} bootstrap intervals",
        "",
        "| system | " + " | ".join(metrics) + " | wall s |",
        "|---" * (len(metrics) + 2) + "|",
    ]
    for run in (scores.champion, scores.candidate):
        lines.append(
            f"| {run.result.name} | "
            + " | ".join(_with_interval(run.result, m) for m in metrics)
            + f" | {run.wall_seconds:.0f} |"
        )
    shared = [m for m in metrics if m in champion.scores]
    paired = compare(
        candidate, champion, shared, confidence=candidate.confidence, samples=candidate.bootstrap_samples
    ).metrics
    cells = [
        f"{paired[m].delta:+.3f} [{paired[m].interval[0]:+.3f}, {paired[m].interval[1]:+.3f}]" if m in paired else "—"
        for m in metrics
    ]
    lines.append(f"| Δ candidate − {champion.name} (paired) | " + " | ".join(cells) + " | |")
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


def comparison_figure(candidate: EvaluationResult, baseline: EvaluationResult | None, path: Path) -> Path:
    """Candidate against champion per quality metric, each with its bootstrap interval, as a PNG (`gate/comparison.png`).

    One panel per metric (they have different scales: recall in [0, 1], latency in ms), two bars each, with the
    intervals the gates read as error bars and the values printed on the bars.

    Args:
        candidate: the candidate's evaluation.
        baseline: what serves now (the champion, or what serves without one), on the same cases; None: the candidate
            alone is drawn.
        path: the PNG to write (its folder is created).

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in candidate.metrics if m in candidate.scores] or sorted(candidate.scores)[:4]
    systems = [(f"champion: {baseline.name}", baseline, "#8c8c8c")] if baseline is not None else []
    systems.append((f"candidate: {candidate.name}", candidate, "#1f77b4"))
    figure, axes = plt.subplots(1, len(metrics), figsize=(max(3.2 * len(metrics), 5), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        for position, (_, result, colour) in enumerate(systems):
            value = result.scores.get(metric, 0.0)
            low, high = result.intervals.get(metric, (value, value))
            error = [[max(value - low, 0.0)], [max(high - value, 0.0)]]
            axis.bar(position, value, color=colour, yerr=error, capsize=6, width=0.6)
            axis.annotate(f"{value:.3g}", (position, value), textcoords="offset points", xytext=(12, 2), fontsize=8)
        axis.set_xticks(range(len(systems)), [label.split(":")[0] for label, _, _ in systems])
        axis.set_title(metric, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    level = int(round(candidate.confidence * 100))
    figure.suptitle(
        f"{candidate.cases} cases; bars: {level} % bootstrap intervals ({candidate.bootstrap_samples} resamples)",
        fontsize=9,
    )
    figure.legend(
        handles=[plt.Rectangle((0, 0), 1, 1, color=colour) for _, _, colour in systems],
        labels=[label for label, _, _ in systems],
        loc="lower center",
        ncol=len(systems),
        fontsize=8,
        frameon=False,
    )
    figure.tight_layout(rect=(0, 0.08, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def log_comparison_figure(
    tracking_uri: str, run_id: str, candidate: EvaluationResult, baseline: EvaluationResult | None
) -> None:
    """Draw `comparison_figure` and log it to the run as `gate/comparison.png` (beside the gate report)."""
    import tempfile

    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as folder:
        png = comparison_figure(candidate, baseline, Path(folder) / "comparison.png")
        MlflowClient(tracking_uri).log_artifact(run_id, str(png), artifact_path="gate")
