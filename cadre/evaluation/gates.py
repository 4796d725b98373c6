"""Promotion gates: apply a specialist's gate rules to an evaluated candidate and explain the verdict.

    decision = decide("program", config.gates.program, candidate_result, champion_result)
    if decision.passed: ...promote...
    client.update_model_version(name, version, description=decision.to_markdown())

Rules come from pipelines.yaml (`cadre.config.evaluation.GateRule`):

- ``at_least`` / ``at_most``: the candidate's aggregate against an absolute threshold.
- ``beat_champion_by``: the candidate's *gain* over the champion (candidate − champion for
  quality metrics, champion − candidate for latency/cost-like metrics) on the cases both were
  evaluated on must be at least the threshold; with ``significant`` the lower bound of the paired
  bootstrap interval of the gain must exceed it.
- ``beat_baseline``: the same as ``beat_champion_by`` (threshold ``margin``), against a reference system
  scored on the same cases instead of the champion: ``retrieval``, the first retrieved document's id as the
  answer. It is never skipped: a baseline that was not scored fails the rule.
- ``max_slice_drop``: no slice (of at least ``min_slice_cases`` shared cases) may be worse than
  the champion by more than the threshold; with ``significant`` a slice fails only when its drop is
  also real: the paired bootstrap interval of the drop, at a level corrected for the number of
  slices judged (Bonferroni), lies above zero.

With no champion (the first version) champion-relative rules are *skipped*, not failed, and the
absolute rules decide. A kind with no rules passes, and the decision says nothing was checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from cadre.config.evaluation import GateRule
from cadre.evaluation.results import (
    Comparison,
    EvaluationResult,
    compare,
    higher_is_better,
    paired_bootstrap_intervals,
    restrict,
)

CHAMPION_RELATIVE = ("beat_champion_by", "max_slice_drop")
MIN_SLICE_CASES = 10
# Scores are means of floats: treat a difference this small as equality, not as a miss.
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class RuleOutcome:
    """What one rule found.

    Attributes:
        rule_text: The rule as a reviewer reads it (`GateRule.describe`).
        kind: ``at_least``, ``at_most``, ``beat_champion_by``, ``max_slice_drop`` or ``beat_baseline``.
        metric: The metric the rule reads.
        threshold: The rule's number.
        passed: Whether it passed; None when skipped.
        skipped: True when the rule could not apply (no champion, or the champion lacks the metric).
        candidate: Candidate's value (for max_slice_drop: in the worst slice).
        champion: Champion's value on the same cases, if compared.
        delta: candidate − champion, if compared.
        interval: For champion-relative rules the bootstrap interval of `delta`; for absolute
            rules the interval of the candidate's value.
        detail: One sentence with the numbers behind the verdict.
    """

    rule_text: str
    kind: str
    metric: str
    threshold: float
    passed: bool | None
    skipped: bool
    candidate: float | None
    champion: float | None
    delta: float | None
    interval: tuple[float, float] | None
    detail: str


@dataclass(frozen=True)
class SliceRow:
    """One slice of one metric in the report (champion and delta are None without a champion)."""

    slice: str
    metric: str
    cases: int
    candidate: float
    champion: float | None
    delta: float | None


@dataclass(frozen=True)
class GateDecision:
    """The verdict on a candidate for one artifact kind, with every rule's numbers.

    Attributes:
        kind: ``index``, ``program``, ``adapter`` or ``feedback``.
        passed: True when no rule failed.
        outcomes: One outcome per rule, in the configured order.
        decided_at: When (UTC, ISO 8601).
        summary: The one-line verdict.
        candidate_name: Name of the evaluated candidate.
        champion_name: Name of the champion it was compared with, if any.
        confidence: Confidence level of the intervals.
        samples: Bootstrap resamples behind the intervals.
        shared_cases: Cases evaluated for both candidate and champion (None without a champion).
        slices: Per-slice numbers of the metrics the rules read, for the report.
        metrics: The candidate's aggregate scores (every metric it was evaluated on); the
            registry records them with the promotion event.
    """

    kind: str
    passed: bool
    outcomes: list[RuleOutcome]
    decided_at: str
    summary: str
    candidate_name: str = ""
    champion_name: str | None = None
    confidence: float = 0.95
    samples: int = 1000
    shared_cases: int | None = None
    slices: list[SliceRow] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (e.g. logged as the run's ``gate.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateDecision:
        """Rebuild a decision written by `to_dict`."""
        outcomes = [
            RuleOutcome(**{**o, "interval": tuple(o["interval"]) if o["interval"] is not None else None})
            for o in data["outcomes"]
        ]
        return cls(
            **{key: value for key, value in data.items() if key not in ("outcomes", "slices")},
            outcomes=outcomes,
            slices=[SliceRow(**row) for row in data.get("slices", [])],
        )

    def to_markdown(self) -> str:
        """The report a reviewer reads in the MLflow model-version description."""
        return _render_markdown(self)


# --- deciding ------------------------------------------------------------------------------------


def _outcome(rule: GateRule, **found: Any) -> RuleOutcome:
    base = {"candidate": None, "champion": None, "delta": None, "interval": None, "passed": None, "skipped": False}
    return RuleOutcome(
        rule_text=rule.describe(), kind=rule.kind, metric=rule.metric, threshold=rule.threshold, **(base | found)
    )


def _check_absolute(rule: GateRule, candidate: EvaluationResult) -> RuleOutcome:
    value = candidate.scores[rule.metric]
    passed = value >= rule.threshold - _TOLERANCE if rule.kind == "at_least" else value <= rule.threshold + _TOLERANCE
    sign = "≥" if rule.kind == "at_least" else "≤"
    verdict = sign if passed else ("<" if rule.kind == "at_least" else ">")
    detail = f"{rule.metric} = {_number(value)} {verdict} {_number(rule.threshold)} (required {sign} {_number(rule.threshold)})"
    return _outcome(rule, passed=passed, candidate=value, interval=candidate.intervals.get(rule.metric), detail=detail)


def _check_baseline(
    rule: GateRule,
    candidate: EvaluationResult,
    baselines: Mapping[str, EvaluationResult],
    confidence: float,
    samples: int,
    seed: int,
) -> RuleOutcome:
    """The candidate against a reference system (`rule.beat_baseline`) on the cases both were scored on."""
    baseline = baselines.get(rule.beat_baseline or "")
    if baseline is None:
        return _outcome(rule, passed=False, detail=f"the {rule.beat_baseline} baseline was not scored on these cases")
    scope = {"only_slice": rule.slice, "exclude_slice": rule.exclude_slice}
    if rule.slice is not None or rule.exclude_slice is not None:
        candidate, baseline = restrict(candidate, **scope), restrict(baseline, **scope)
        if candidate is None or baseline is None:
            return _outcome(rule, passed=False, detail="the candidate or the baseline has no case in that scope")
    if rule.metric not in candidate.scores or rule.metric not in baseline.scores:
        return _outcome(rule, passed=False, detail=f"the candidate or the baseline was not evaluated on {rule.metric}")
    comparison = compare(candidate, baseline, [rule.metric], confidence=confidence, samples=samples, seed=seed)
    outcome = _check_beat(rule, comparison, confidence)
    return replace(outcome, detail=f"vs {baseline.name}: {outcome.detail}")


def _check_beat(rule: GateRule, comparison: Comparison, confidence: float) -> RuleOutcome:
    versus = comparison.metrics[rule.metric]
    low, high = versus.gain_interval
    if rule.significant:
        passed = low > rule.threshold
        detail = f"gain {_signed(versus.gain)}, {confidence:.0%} CI of the gain [{_signed(low)}, {_signed(high)}]: lower bound {'>' if passed else '≤'} {_number(rule.threshold)}"
    else:
        passed = versus.gain >= rule.threshold - _TOLERANCE
        detail = f"gain {_signed(versus.gain)} {'≥' if passed else '<'} {_number(rule.threshold)} ({confidence:.0%} CI [{_signed(low)}, {_signed(high)}])"
    if not versus.higher_is_better:
        detail += "; lower is better, so gain = champion − candidate"
    detail += _pairing(versus.cases)
    return _outcome(
        rule,
        passed=passed,
        candidate=versus.candidate,
        champion=versus.champion,
        delta=versus.delta,
        interval=versus.interval,
        detail=detail,
    )


def _pairing(shared: int) -> str:
    return f"; paired on {shared} shared cases" if shared else "; no shared cases, compared unpaired"


def _check_slices(
    rule: GateRule,
    comparison: Comparison,
    min_slice_cases: int,
    candidate: EvaluationResult | None = None,
    champion: EvaluationResult | None = None,
    confidence: float = 0.95,
    samples: int = 1000,
    seed: int = 0,
) -> RuleOutcome:
    slices = [row for row in comparison.slices if row.metric == rule.metric]
    judged = [row for row in slices if row.cases >= min_slice_cases]
    too_small = len(slices) - len(judged)
    note = f"; {too_small} slice(s) under {min_slice_cases} cases not judged" if too_small else ""
    if not judged:
        return _outcome(
            rule, passed=True, detail=f"no slice has {min_slice_cases} or more shared cases, nothing to judge{note}"
        )
    worst = max(judged, key=lambda row: row.drop)
    if rule.significant and comparison.shared_cases and candidate is not None and champion is not None:
        return _check_slices_significant(rule, judged, worst, note, candidate, champion, confidence, samples, seed)
    passed = worst.drop <= rule.threshold + _TOLERANCE
    detail = (
        f"worst slice {worst.slice} ({worst.cases} cases): {_number(worst.champion)} → {_number(worst.candidate)}, "
        f"drop {_number(max(worst.drop, 0.0))} {'≤' if passed else '>'} {_number(rule.threshold)} across {len(judged)} slice(s){note}"
    )
    if rule.significant:
        detail += "; compared unpaired, so judged on the drop alone"
    return _outcome(
        rule, passed=passed, candidate=worst.candidate, champion=worst.champion, delta=worst.delta, detail=detail
    )


def _check_slices_significant(
    rule: GateRule,
    judged: list[Any],
    worst: Any,
    note: str,
    candidate: EvaluationResult,
    champion: EvaluationResult,
    confidence: float,
    samples: int,
    seed: int,
) -> RuleOutcome:
    """A slice fails only if it drops more than the threshold *and* its paired interval of the drop lies above zero.

    The interval's level is Bonferroni-corrected for the number of slices judged: with 15 slices of
    ~20 cases, two programs of equal quality that disagree on one case in eight would otherwise show
    some slice "dropping" by more than 0.15 about half the time.
    """
    level = 1.0 - (1.0 - confidence) / len(judged)
    over = [row for row in judged if row.drop > rule.threshold + _TOLERANCE]
    drops = {
        row.slice: _slice_drop_interval(rule.metric, row.slice, candidate, champion, level, samples, seed)
        for row in over
    }
    real = [row for row in over if drops[row.slice][0] > _TOLERANCE]
    shown = max(real, key=lambda row: row.drop) if real else (max(over, key=lambda row: row.drop) if over else worst)
    head = (
        f"worst slice {shown.slice} ({shown.cases} cases): {_number(shown.champion)} → {_number(shown.candidate)}, "
        f"drop {_number(max(shown.drop, 0.0))}"
    )
    interval = None
    if not over:
        detail = f"{head} ≤ {_number(rule.threshold)} across {len(judged)} slice(s){note}"
    else:
        low, high = drops[shown.slice]
        interval = (-high, -low) if higher_is_better(rule.metric) else (low, high)  # of delta = candidate − champion
        verdict = "a real drop" if real else "not a significant drop"
        detail = (
            f"{head} > {_number(rule.threshold)}, {verdict}: {level:.1%} CI of the drop [{_signed(low)}, {_signed(high)}] "
            f"(paired; level corrected for {len(judged)} slices); {len(over)} slice(s) over the threshold, "
            f"{len(real)} significantly{note}"
        )
    return _outcome(
        rule,
        passed=not real,
        candidate=shown.candidate,
        champion=shown.champion,
        delta=shown.delta,
        interval=interval,
        detail=detail,
    )


def _slice_drop_interval(
    metric: str,
    name: str,
    candidate: EvaluationResult,
    champion: EvaluationResult,
    level: float,
    samples: int,
    seed: int,
) -> tuple[float, float]:
    """Paired bootstrap interval of how much worse the candidate is on one slice (positive = worse)."""
    theirs = champion.values(metric)
    members = [e.case_id for e in candidate.examples if e.slice == name and e.case_id in theirs]
    mine = candidate.values(metric)
    low, high = paired_bootstrap_intervals(
        {metric: ([mine[c] for c in members], [theirs[c] for c in members])},
        confidence=level,
        samples=samples,
        seed=seed,
    )[metric]
    return (-high, -low) if higher_is_better(metric) else (low, high)


def _check(
    rule: GateRule,
    candidate: EvaluationResult,
    champion: EvaluationResult | None,
    comparison: Comparison | None,
    confidence: float,
    min_slice_cases: int,
    samples: int = 1000,
    seed: int = 0,
) -> RuleOutcome:
    if rule.metric not in candidate.scores:
        return _outcome(rule, passed=False, detail=f"the candidate was not evaluated on {rule.metric}")
    if rule.kind not in CHAMPION_RELATIVE:
        return _check_absolute(rule, candidate)
    if champion is None or comparison is None:
        return _outcome(rule, skipped=True, detail="skipped: no champion to compare with yet")
    if rule.metric not in comparison.metrics:
        return _outcome(rule, skipped=True, detail=f"skipped: the champion has no {rule.metric} score")
    if rule.kind == "beat_champion_by":
        return _check_beat(rule, comparison, confidence)
    return _check_slices(rule, comparison, min_slice_cases, candidate, champion, confidence, samples, seed)


def _comparison(
    rules: Sequence[GateRule],
    candidate: EvaluationResult,
    champion: EvaluationResult | None,
    confidence: float,
    samples: int,
    seed: int,
) -> Comparison | None:
    relative = [r.metric for r in rules if r.kind in CHAMPION_RELATIVE and r.metric in candidate.scores]
    comparable = [m for m in dict.fromkeys(relative) if champion is not None and m in champion.scores]
    return (
        compare(candidate, champion, comparable, confidence=confidence, samples=samples, seed=seed)
        if champion is not None
        else None
    )


def _check_scoped(
    rule: GateRule,
    candidate: EvaluationResult,
    champion: EvaluationResult | None,
    confidence: float,
    samples: int,
    seed: int,
    min_slice_cases: int,
) -> RuleOutcome:
    """A rule judged on one slice, or on every case but one slice (both results restricted the same way)."""
    scope = {"only_slice": rule.slice, "exclude_slice": rule.exclude_slice}
    scoped_candidate = restrict(candidate, **scope)
    if scoped_candidate is None:
        return _outcome(rule, passed=False, detail="the candidate has no case in that scope")
    scoped_champion = restrict(champion, **scope) if champion is not None else None
    comparison = _comparison([rule], scoped_candidate, scoped_champion, confidence, samples, seed)
    return _check(rule, scoped_candidate, scoped_champion, comparison, confidence, min_slice_cases, samples, seed)


def _summary(kind: str, outcomes: Sequence[RuleOutcome], champion: EvaluationResult | None) -> str:
    if not outcomes:
        return f"PASSED: no {kind} gate rules are configured, so nothing was checked."
    failed = [o for o in outcomes if o.passed is False]
    skipped = [o for o in outcomes if o.skipped]
    checked = len(outcomes) - len(skipped)
    reason = "no champion yet" if champion is None else "champion lacks the metric"
    skipped_text = f"; {len(skipped)} skipped ({reason})" if skipped else ""
    if failed:
        names = "; ".join(o.rule_text for o in failed)
        return f"FAILED: {len(failed)} of {checked} checked rule(s) failed ({names}){skipped_text}."
    if checked == 0:
        return f"PASSED: every rule was skipped ({reason}); nothing was checked."
    return f"PASSED: {checked} of {checked} checked rule(s) passed{skipped_text}."


def decide(
    kind: str,
    rules: Iterable[GateRule],
    candidate: EvaluationResult,
    champion: EvaluationResult | None,
    *,
    confidence: float = 0.95,
    samples: int = 1000,
    seed: int = 0,
    min_slice_cases: int = MIN_SLICE_CASES,
    baselines: Mapping[str, EvaluationResult] | None = None,
) -> GateDecision:
    """Apply every rule of one artifact kind to a candidate; it passes when no rule fails.

    Args:
        kind: The artifact kind (``index``, ``program``, ``adapter``, ``feedback``), for the report.
        rules: The kind's rules from pipelines.yaml.
        candidate: The candidate's evaluation.
        champion: The champion's evaluation on the same suite, or None when there is no champion.
        confidence: Confidence level of the paired bootstrap intervals.
        samples: Bootstrap resamples.
        seed: Seed of the resampling (same inputs and seed, same decision).
        min_slice_cases: Slices with fewer shared cases are reported but not judged by
            ``max_slice_drop`` (a 3-case slice moves by a third on one answer).
        baselines: Reference systems scored on the same cases, by the name ``beat_baseline`` rules give
            (``retrieval``); a rule whose baseline is missing fails.

    Returns:
        The decision, with one outcome per rule.
    """
    rules = list(rules)
    comparison = _comparison(rules, candidate, champion, confidence, samples, seed)
    outcomes = []
    for rule in rules:
        if rule.kind == "beat_baseline":
            outcomes.append(_check_baseline(rule, candidate, baselines or {}, confidence, samples, seed))
        elif rule.slice is None and rule.exclude_slice is None:
            outcomes.append(_check(rule, candidate, champion, comparison, confidence, min_slice_cases, samples, seed))
        else:
            outcomes.append(_check_scoped(rule, candidate, champion, confidence, samples, seed, min_slice_cases))
    return GateDecision(
        kind=kind,
        passed=all(o.passed is not False for o in outcomes),
        outcomes=outcomes,
        decided_at=datetime.now(UTC).isoformat(timespec="seconds"),
        summary=_summary(kind, outcomes, champion),
        candidate_name=candidate.name,
        champion_name=champion.name if champion is not None else None,
        confidence=confidence,
        samples=samples,
        shared_cases=comparison.shared_cases if comparison is not None else None,
        slices=_slice_rows(rules, candidate, comparison),
        metrics=dict(candidate.scores),
    )


def _slice_rows(
    rules: Sequence[GateRule], candidate: EvaluationResult, comparison: Comparison | None
) -> list[SliceRow]:
    """Per-slice numbers of the slice rules' metrics, or else of the quality metrics the rules read."""
    slice_metrics = [r.metric for r in rules if r.kind == "max_slice_drop"]
    quality = [r.metric for r in rules if higher_is_better(r.metric)]
    metrics = [m for m in dict.fromkeys(slice_metrics or quality) if m in candidate.scores]
    if comparison is not None:
        return [
            SliceRow(row.slice, row.metric, row.cases, row.candidate, row.champion, row.delta)
            for row in comparison.slices
            if row.metric in metrics
        ]
    return [
        SliceRow(name, metric, part.cases, part.scores[metric], None, None)
        for metric in metrics
        for name, part in candidate.slices.items()
    ]


# --- the report ----------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if 0 < abs(value) < 0.001:
        return f"{value:.2e}"
    return f"{value:.3f}"


def _signed(value: float) -> str:
    text = _number(abs(value))
    return f"−{text}" if value < 0 else f"+{text}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _result(outcome: RuleOutcome) -> str:
    if outcome.skipped:
        return "⏭️ skipped"
    return "✅ pass" if outcome.passed else "❌ fail"


def _rule_row(outcome: RuleOutcome) -> str:
    candidate, delta = _number(outcome.candidate), "—"
    if outcome.interval is not None and outcome.delta is None:
        candidate += f" [{_number(outcome.interval[0])}, {_number(outcome.interval[1])}]"
    if outcome.delta is not None:
        delta = _signed(outcome.delta)
        if outcome.interval is not None:
            delta += f" [{_signed(outcome.interval[0])}, {_signed(outcome.interval[1])}]"
    cells = [outcome.rule_text, candidate, _number(outcome.champion), delta, _result(outcome)]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _render_markdown(decision: GateDecision) -> str:
    verdict = "✅ PASSED" if decision.passed else "❌ FAILED"
    versus = f"champion **{decision.champion_name}**" if decision.champion_name else "no champion yet"
    shared = f" · {decision.shared_cases} shared cases" if decision.shared_cases is not None else ""
    lines = [
        f"## Gate `{decision.kind}`: {verdict}",
        "",
        f"**Verdict:** {decision.summary}",
        "",
        (
            f"Candidate **{decision.candidate_name}** vs {versus}{shared} · {decision.confidence:.0%} bootstrap intervals "
            f"({decision.samples:,} resamples, paired for Δ) in brackets · decided {decision.decided_at}"
        ),
        "",
    ]
    if decision.outcomes:
        lines += ["| rule | candidate | champion or baseline | Δ (CI) | result |", "| --- | --- | --- | --- | --- |"]
        lines += [_rule_row(o) for o in decision.outcomes]
        lines += ["", *(f"- **{_cell(o.rule_text)}**: {o.detail}" for o in decision.outcomes)]
    else:
        lines.append("_No rules are configured for this kind; the candidate passes without a check._")
    if decision.slices:
        lines += [
            "",
            "### Per slice",
            "",
            "| slice | metric | cases | candidate | champion | Δ |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in decision.slices:
            delta = _signed(row.delta) if row.delta is not None else "—"
            cells = [row.slice, row.metric, str(row.cases), _number(row.candidate), _number(row.champion), delta]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
