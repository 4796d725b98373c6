"""Evaluation runner: run a specialist over a suite split and return typed, comparable results.

    cases = load_cases("evals/suites/icd10-coder", "test", limit=300)
    result = evaluate_cases(cases, predict, ["exact_match", "icd_hierarchy"], name="program-v3", output_field="code")
    versus = compare(result, champion_result)

`evaluate_cases` calls ``predict(case) -> Prediction`` once per case, times it, and keeps going
when a case raises (the case scores 0 and keeps its error text). Scores come from
`cadre.evaluation.metrics`; the result carries per-example scores, means, per-slice means, seeded
bootstrap confidence intervals and the runtime metrics the gates read (``latency_p50_ms``,
``latency_p95_ms``, ``lm_calls``, ``tokens_per_case``, ``cost_usd`` — the last three are means
per case). `compare` pairs two results on their shared case ids. Results round-trip through
JSON (`EvaluationResult.to_dict` / `from_dict`), and `EvaluationResult.rows` gives one row per
example for ``mlflow.log_table``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cadre.config.evaluation import RUNTIME_METRICS
from cadre.evaluation import metrics as metric_functions
from cadre.jsonl import read_json_lines

log = logging.getLogger(__name__)

UNSLICED = "(no slice)"
# Runtime metric -> (per-example field, percentile; None means the mean).
_RUNTIME_SOURCES: dict[str, tuple[str, float | None]] = {
    "latency_p50_ms": ("latency_ms", 50.0),
    "latency_p95_ms": ("latency_ms", 95.0),
    "lm_calls": ("lm_calls", None),
    "tokens_per_case": ("tokens", None),
    "cost_usd": ("cost_usd", None),
}
# Resampled values held in memory at once by the bootstrap (rows x cases).
_BOOTSTRAP_CHUNK_VALUES = 4_000_000


# --- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedLine:
    """A line of a split file that is not a usable case; `str()` gives `FILE:LINE: reason`."""

    line: int
    reason: str
    file: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" if self.file else f"line {self.line}: {self.reason}"


@dataclass(frozen=True)
class CaseSplit:
    """The valid cases of one split file and the lines that were skipped."""

    path: Path
    cases: list[dict[str, Any]]
    skipped: list[SkippedLine]


def case_id(case: dict[str, Any]) -> str | None:
    """A case's id: its `id` field (a string, or an integer as text), else a hash of its content.

    Returns None when `id` is present but empty or of another type.
    """
    value = case.get("id")
    if value is None:
        canonical = json.dumps(case, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return "h" + hashlib.sha256(canonical.encode()).hexdigest()[:16]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def _problem(case: Any, seen: set[str], required: Sequence[str] = ()) -> str | None:
    if not isinstance(case, dict):
        return f"expected a JSON object, got {type(case).__name__}"
    missing = [name for name in required if case.get(name) in (None, "")]
    if missing:
        return f"missing {', '.join(repr(name) for name in missing)} (the program's inputs and outputs need a value)"
    identity = case_id(case)
    if identity is None:
        return "field 'id' must be a non-empty string or an integer (or be left out: the case's content hash is used)"
    case["id"] = identity
    if identity in seen:
        return f"duplicate id {identity!r}"
    if "slice" in case and not isinstance(case["slice"], str):
        return "field 'slice' must be a string"
    relevant = case.get("relevant_ids", [])
    if not isinstance(relevant, list) or not all(isinstance(item, str) for item in relevant):
        return "field 'relevant_ids' must be a list of strings"
    return None


def read_split(suite_dir: str | Path, split: str, limit: int | None = None, required: Sequence[str] = ()) -> CaseSplit:
    """Read ``<suite_dir>/<split>.jsonl``, keeping valid cases and recording every skipped line.

    A case is a JSON object with a unique ``id`` (a string or an integer; left out, a hash of the
    case's content stands in); ``slice`` (string) and ``relevant_ids`` (list of strings) are checked
    when present. Blank lines are ignored. The file is read as bytes, line by line
    (`cadre.jsonl.read_json_lines`): a line that is not UTF-8, not JSON, not an object, holds text
    that is not text (a lone surrogate escape) or is longer than `MAX_LINE_BYTES` is skipped, like
    a case that fails the checks; the good lines load.

    Args:
        suite_dir: Folder of the suite.
        split: ``train``, ``dev`` or ``test`` (any file stem works).
        limit: Keep at most this many valid cases (the first ones in file order).
        required: Fields every case must give a value (the program's inputs and outputs); a case
            without one is skipped and counted like a malformed line.

    Returns:
        The cases and the skipped lines (file, 1-based line number and reason).

    Raises:
        FileNotFoundError: If the split file does not exist.
    """
    path = Path(suite_dir) / f"{split}.jsonl"
    cases: list[dict[str, Any]] = []
    skipped: list[SkippedLine] = []
    seen: set[str] = set()
    for line in read_json_lines(path):
        if limit is not None and len(cases) >= limit:
            break
        problem = line.problem or _problem(line.value, seen, required)
        if problem:
            skipped.append(SkippedLine(line.line, problem, str(path)))
            continue
        seen.add(line.value["id"])
        cases.append(line.value)
    return CaseSplit(path, cases, skipped)


_SHOWN_SKIPS = 20
"""Skipped lines named one by one in the warning; the rest are counted."""


def load_cases(
    suite_dir: str | Path, split: str, limit: int | None = None, required: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The valid cases of a split; malformed lines are skipped and logged in a warning, each as `FILE:LINE: reason`.

    Use `read_split` to get the skipped lines themselves.

    Args:
        suite_dir: Folder of the suite.
        split: ``train``, ``dev`` or ``test``.
        limit: Keep at most this many valid cases.
        required: Fields every case must give a value (see `read_split`).

    Returns:
        The cases, in file order.
    """
    read = read_split(suite_dir, split, limit, required)
    if read.skipped:
        shown = "\n".join(f"  {skip}" for skip in read.skipped[:_SHOWN_SKIPS])
        more = len(read.skipped) - _SHOWN_SKIPS
        log.warning(
            "%s: skipped %d malformed line(s), loaded %d case(s):\n%s%s",
            read.path,
            len(read.skipped),
            len(read.cases),
            shown,
            f"\n  … and {more} more" if more > 0 else "",
        )
    return read.cases


# --- predictions and results ---------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """What a specialist returned for one case, and what it cost.

    Attributes:
        output: The answer (compared with the case's output field); None when there is none.
        retrieved_ids: Ranked ids of the retrieved documents, best first; None when not retrieving.
        lm_calls: Language-model calls made for this case.
        tokens: Tokens used (prompt + completion).
        cost_usd: Cost of this case in US dollars.
        error: Why the case failed, if it did; a failed case scores 0.
        latency_ms: Wall time of the call; `evaluate_cases` measures it, `score_predictions`
            takes it as given (0 when unknown).
        replayed_ms: Time the answers served from a cache took when first computed; `evaluate_cases`
            adds it to the measured latency, so a cached re-run reports the model's latency.
    """

    output: str | None = None
    retrieved_ids: list[str] | None = None
    lm_calls: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    latency_ms: float | None = None
    replayed_ms: float = 0.0


@dataclass(frozen=True)
class ExampleResult:
    """One scored case."""

    case_id: str
    slice: str
    scores: dict[str, float]
    reference: Any
    output: str | None
    retrieved_ids: list[str] | None
    latency_ms: float
    lm_calls: int
    tokens: int
    cost_usd: float
    error: str | None

    def value(self, metric: str) -> float:
        """This example's value of `metric`: its score, or the runtime quantity the metric aggregates."""
        if metric in _RUNTIME_SOURCES:
            return float(getattr(self, _RUNTIME_SOURCES[metric][0]))
        return self.scores[metric]


@dataclass(frozen=True)
class SliceResult:
    """Aggregates over the cases of one slice."""

    cases: int
    scores: dict[str, float]


@dataclass(frozen=True)
class EvaluationResult:
    """Per-example scores and their aggregates for one evaluated candidate.

    Attributes:
        name: What was evaluated (e.g. a model version or program name).
        metrics: The quality metrics requested, in order (runtime metrics are always added).
        scores: Aggregate of every metric: means of quality metrics, plus the runtime metrics.
        intervals: Bootstrap confidence interval (low, high) of every aggregate.
        slices: Aggregates per slice (the cases' ``slice`` field).
        examples: One scored row per case.
        errors: Cases whose prediction failed.
        skipped_cases: Malformed suite lines left out before evaluating (as reported by the caller).
        confidence: Confidence level of the intervals.
        bootstrap_samples: Resamples behind the intervals.
        seed: Seed of the resampling.
        created_at: When the result was computed (UTC, ISO 8601).
    """

    name: str
    metrics: list[str]
    scores: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    slices: dict[str, SliceResult]
    examples: list[ExampleResult]
    errors: int
    skipped_cases: int = 0
    confidence: float = 0.95
    bootstrap_samples: int = 1000
    seed: int = 0
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def cases(self) -> int:
        """Number of evaluated cases."""
        return len(self.examples)

    def values(self, metric: str) -> dict[str, float]:
        """Per-example values of `metric`, by case id."""
        return {example.case_id: example.value(metric) for example in self.examples}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (every example included, so a stored result can still be paired)."""
        data = asdict(self)
        data["intervals"] = {metric: list(bounds) for metric, bounds in self.intervals.items()}
        data["cases"] = self.cases
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResult:
        """Rebuild a result written by `to_dict` (e.g. a champion's stored evaluation)."""
        return cls(
            name=data["name"],
            metrics=list(data["metrics"]),
            scores={metric: float(value) for metric, value in data["scores"].items()},
            intervals={metric: (float(low), float(high)) for metric, (low, high) in data["intervals"].items()},
            slices={name: SliceResult(int(s["cases"]), dict(s["scores"])) for name, s in data["slices"].items()},
            examples=[ExampleResult(**example) for example in data["examples"]],
            errors=int(data["errors"]),
            skipped_cases=int(data.get("skipped_cases", 0)),
            confidence=float(data["confidence"]),
            bootstrap_samples=int(data["bootstrap_samples"]),
            seed=int(data["seed"]),
            created_at=str(data["created_at"]),
        )

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per example (scalars only), e.g. for ``mlflow.log_table``."""
        return [
            {
                "case_id": example.case_id,
                "slice": example.slice,
                "reference": _cell(example.reference),
                "output": _cell(example.output),
                "retrieved_ids": _cell(example.retrieved_ids),
                **{metric: example.scores.get(metric, 0.0) for metric in self.metrics},
                "latency_ms": round(example.latency_ms, 3),
                "lm_calls": example.lm_calls,
                "tokens": example.tokens,
                "cost_usd": example.cost_usd,
                "error": example.error or "",
            }
            for example in self.examples
        ]

    def columns(self) -> dict[str, list[Any]]:
        """`rows` as columns: pass straight to ``mlflow.log_table(result.columns(), "eval.json")``."""
        rows = self.rows()
        return {key: [row[key] for row in rows] for key in (rows[0] if rows else {})}

    def mlflow_metrics(self, prefix: str = "") -> dict[str, float]:
        """Aggregates and interval bounds under names MLflow accepts (``recall@10`` → ``recall_at_10``)."""
        logged = {"cases": float(self.cases), "errors": float(self.errors)}
        for metric, value in self.scores.items():
            key = mlflow_metric_name(metric)
            low, high = self.intervals[metric]
            logged |= {key: value, f"{key}_ci_low": low, f"{key}_ci_high": high}
        return {f"{prefix}{key}": value for key, value in logged.items()}


def mlflow_metric_name(metric: str) -> str:
    """A metric name MLflow accepts: ``@`` (not allowed there) becomes ``_at_``."""
    return metric.replace("@", "_at_")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return " ".join(str(item) for item in value)
    return str(value)


# --- statistics ----------------------------------------------------------------------------------


def higher_is_better(metric: str) -> bool:
    """Quality metrics improve upwards; latency, LM calls, tokens and cost improve downwards."""
    return metric not in _RUNTIME_SOURCES


def aggregate(metric: str, values: np.ndarray) -> np.ndarray | float:
    """The statistic of `metric` over the last axis of `values`: a percentile for latencies, else the mean."""
    percentile = _RUNTIME_SOURCES.get(metric, ("", None))[1]
    if values.shape[-1] == 0:
        return 0.0
    return np.percentile(values, percentile, axis=-1) if percentile is not None else values.mean(axis=-1)


def _resampled(
    statistics: Mapping[str, Callable[[np.ndarray], Any]], cases: int, samples: int, seed: int
) -> dict[str, np.ndarray]:
    """Each statistic over the same `samples` bootstrap resamples of the case indices.

    The statistics share one set of resamples (cheaper, and the intervals of different metrics
    then describe the same resampled suites); rows are drawn in chunks to bound memory.
    """
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _BOOTSTRAP_CHUNK_VALUES // max(cases, 1))
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in statistics}
    for start in range(0, samples, rows_per_chunk):
        indices = rng.integers(0, cases, size=(min(rows_per_chunk, samples - start), cases))
        for name, statistic in statistics.items():
            chunks[name].append(np.asarray(statistic(indices)))
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def _bounds(statistics: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(statistics, [tail, 1.0 - tail])
    return float(low), float(high)


def _statistic(metric: str, values: np.ndarray) -> Callable[[np.ndarray], Any]:
    return lambda indices: aggregate(metric, values[indices])


def _paired_statistic(metric: str, first: np.ndarray, second: np.ndarray) -> Callable[[np.ndarray], Any]:
    return lambda indices: aggregate(metric, first[indices]) - aggregate(metric, second[indices])


def bootstrap_intervals(
    values: Mapping[str, Sequence[float]], *, confidence: float = 0.95, samples: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of several metrics over the same cases.

    Args:
        values: Per-case values by metric name (the name decides the statistic, see `aggregate`);
            every list has one value per case, in the same case order.
        confidence: Two-sided confidence level, e.g. 0.95.
        samples: Number of resamples (shared by all metrics).
        seed: Seed of the resampling (same seed, same intervals).

    Returns:
        (low, high) per metric; (0, 0) when there are no cases.
    """
    arrays = {metric: np.asarray(series, dtype=float) for metric, series in values.items()}
    cases = {array.size for array in arrays.values()}
    if len(cases) > 1:
        raise ValueError(f"metrics hold different numbers of cases: {sorted(cases)}")
    if not arrays or cases == {0}:
        return {metric: (0.0, 0.0) for metric in arrays}
    resampled = _resampled({m: _statistic(m, a) for m, a in arrays.items()}, cases.pop(), samples, seed)
    return {metric: _bounds(statistics, confidence) for metric, statistics in resampled.items()}


def paired_bootstrap_intervals(
    pairs: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    confidence: float = 0.95,
    samples: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Intervals of (candidate − champion) per metric, both resampled on the same case indices.

    Args:
        pairs: By metric, (candidate values, champion values), aligned case by case; every
            metric holds the same cases.
        confidence: Two-sided confidence level.
        samples: Number of resamples.
        seed: Seed of the resampling.

    Returns:
        (low, high) of the difference per metric; (0, 0) when there are no cases.
    """
    arrays = {m: (np.asarray(a, dtype=float), np.asarray(b, dtype=float)) for m, (a, b) in pairs.items()}
    for first, second in arrays.values():
        if first.shape != second.shape:
            raise ValueError(f"paired values differ in length: {first.size} and {second.size}")
    cases = {first.size for first, _ in arrays.values()}
    if len(cases) > 1:
        raise ValueError(f"metrics hold different numbers of cases: {sorted(cases)}")
    if not arrays or cases == {0}:
        return {metric: (0.0, 0.0) for metric in arrays}
    resampled = _resampled({m: _paired_statistic(m, a, b) for m, (a, b) in arrays.items()}, cases.pop(), samples, seed)
    return {metric: _bounds(statistics, confidence) for metric, statistics in resampled.items()}


def paired_bootstrap_interval(
    metric: str,
    candidate: Sequence[float],
    champion: Sequence[float],
    *,
    confidence: float = 0.95,
    samples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Interval of (candidate − champion) for one metric (see `paired_bootstrap_intervals`)."""
    return paired_bootstrap_intervals(
        {metric: (candidate, champion)}, confidence=confidence, samples=samples, seed=seed
    )[metric]


# --- scoring -------------------------------------------------------------------------------------


def _as_prediction(value: Prediction | str | None) -> Prediction:
    if isinstance(value, Prediction):
        return value
    if value is None or isinstance(value, str):
        return Prediction(output=value)
    return Prediction(error=f"predict returned {type(value).__name__}, expected Prediction")


def _check_metrics(metrics: Iterable[str], output_field: str | None, retrieval_field: str | None) -> list[str]:
    quality = [name for name in dict.fromkeys(metrics) if name not in _RUNTIME_SOURCES]
    for name in quality:
        if not metric_functions.is_known_metric(name):
            raise ValueError(f"unknown metric {name!r}")
        if metric_functions.is_retrieval_metric(name) and retrieval_field is None:
            raise ValueError(f"retrieval metric {name!r} needs retrieval_field (the case field of relevant ids)")
        if not metric_functions.is_retrieval_metric(name) and output_field is None:
            raise ValueError(f"answer metric {name!r} needs output_field (the case field of the reference answer)")
    return quality


def _score(
    name: str,
    cases: Sequence[Mapping[str, Any]],
    predictions: Sequence[Prediction],
    output_field: str | None,
    retrieval_field: str | None,
) -> list[float]:
    if metric_functions.is_retrieval_metric(name):
        scores = metric_functions.compute(
            name, [p.retrieved_ids for p in predictions], [c.get(retrieval_field) for c in cases]
        )
    else:
        scores = metric_functions.compute(name, [p.output for p in predictions], [c.get(output_field) for c in cases])
    return [0.0 if prediction.error else score for score, prediction in zip(scores, predictions)]


def _examples(
    cases: Sequence[Mapping[str, Any]],
    predictions: Sequence[Prediction],
    quality: list[str],
    output_field: str | None,
    retrieval_field: str | None,
) -> list[ExampleResult]:
    scores = {name: _score(name, cases, predictions, output_field, retrieval_field) for name in quality}
    return [
        ExampleResult(
            case_id=str(case.get("id", position)),
            slice=str(case.get("slice") or UNSLICED),
            scores={name: scores[name][position] for name in quality},
            reference=case.get(output_field) if output_field else case.get(retrieval_field),
            output=prediction.output,
            retrieved_ids=list(prediction.retrieved_ids) if prediction.retrieved_ids is not None else None,
            latency_ms=float(prediction.latency_ms or 0.0),
            lm_calls=int(prediction.lm_calls),
            tokens=int(prediction.tokens),
            cost_usd=float(prediction.cost_usd),
            error=prediction.error,
        )
        for position, (case, prediction) in enumerate(zip(cases, predictions))
    ]


def _aggregates(metric_names: Sequence[str], examples: Sequence[ExampleResult]) -> dict[str, float]:
    return {
        metric: float(aggregate(metric, np.array([e.value(metric) for e in examples], dtype=float)))
        for metric in metric_names
    }


def score_predictions(
    cases: Sequence[Mapping[str, Any]],
    outputs: Sequence[Prediction | str | None],
    metrics: Iterable[str],
    *,
    name: str,
    output_field: str | None,
    retrieval_field: str | None = None,
    confidence: float = 0.95,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    skipped_cases: int = 0,
) -> EvaluationResult:
    """Score predictions that already exist (one per case, same order).

    Args:
        cases: The suite cases (dicts with ``id``, optional ``slice`` and the reference fields).
        outputs: A `Prediction` per case, or just the answer string (None for no answer).
        metrics: Quality metric names (answer and/or retrieval); runtime metrics are always added.
        name: What was evaluated.
        output_field: Case field holding the reference answer (needed by answer metrics).
        retrieval_field: Case field holding the relevant ids (needed by retrieval metrics).
        confidence: Confidence level of the bootstrap intervals.
        bootstrap_samples: Resamples per interval.
        seed: Seed of the resampling.
        skipped_cases: Malformed suite lines left out before scoring, recorded in the result.

    Returns:
        The evaluation result.

    Raises:
        ValueError: For no cases, mismatched lengths, duplicate case ids, an unknown metric, or a
            metric without the field it needs.
    """
    quality = _check_metrics(metrics, output_field, retrieval_field)
    if not cases:
        raise ValueError("no cases to evaluate")
    if len(outputs) != len(cases):
        raise ValueError(f"{len(outputs)} predictions for {len(cases)} cases")
    predictions = [_as_prediction(output) for output in outputs]
    examples = _examples(cases, predictions, quality, output_field, retrieval_field)
    if len({example.case_id for example in examples}) != len(examples):
        raise ValueError("case ids are not unique; results could not be paired with a champion's")
    return _result_from_examples(
        name,
        quality,
        examples,
        skipped_cases=skipped_cases,
        confidence=confidence,
        bootstrap_samples=bootstrap_samples,
        seed=seed,
    )


def _result_from_examples(
    name: str,
    quality: list[str],
    examples: list[ExampleResult],
    *,
    skipped_cases: int,
    confidence: float,
    bootstrap_samples: int,
    seed: int,
) -> EvaluationResult:
    every_metric = [*quality, *RUNTIME_METRICS]
    per_case = {metric: [example.value(metric) for example in examples] for metric in every_metric}
    intervals = bootstrap_intervals(per_case, confidence=confidence, samples=bootstrap_samples, seed=seed)
    by_slice: dict[str, list[ExampleResult]] = {}
    for example in examples:
        by_slice.setdefault(example.slice, []).append(example)
    return EvaluationResult(
        name=name,
        metrics=quality,
        scores=_aggregates(every_metric, examples),
        intervals=intervals,
        slices={
            key: SliceResult(len(members), _aggregates(every_metric, members))
            for key, members in sorted(by_slice.items())
        },
        examples=examples,
        errors=sum(1 for example in examples if example.error),
        skipped_cases=skipped_cases,
        confidence=confidence,
        bootstrap_samples=bootstrap_samples,
        seed=seed,
    )


def restrict(
    result: EvaluationResult, *, only_slice: str | None = None, exclude_slice: str | None = None
) -> EvaluationResult | None:
    """The same evaluation over a subset of its cases: one slice, or every case but one slice.

    Aggregates, intervals and slices are recomputed from the kept examples; None when none is kept.
    """
    kept = [
        e
        for e in result.examples
        if (only_slice is None or e.slice == only_slice) and (exclude_slice is None or e.slice != exclude_slice)
    ]
    if not kept:
        return None
    scope = f"slice {only_slice}" if only_slice is not None else f"all but slice {exclude_slice}"
    return _result_from_examples(
        f"{result.name} ({scope})",
        list(result.metrics),
        kept,
        skipped_cases=0,
        confidence=result.confidence,
        bootstrap_samples=result.bootstrap_samples,
        seed=result.seed,
    )


def predict_case(predict: Callable[[dict[str, Any]], Prediction], case: dict[str, Any]) -> Prediction:
    """`predict(case)`, timed; an error it raises becomes the prediction's `error` (a wrong answer, not a failure)."""
    started = time.perf_counter()
    try:
        prediction = _as_prediction(predict(case))
    except Exception as error:  # noqa: BLE001 - one failing case is a wrong answer, not a failed evaluation
        prediction = Prediction(error=f"{type(error).__name__}: {error}")
    return replace(prediction, latency_ms=(time.perf_counter() - started) * 1000.0 + prediction.replayed_ms)


def evaluate_cases(
    cases: Sequence[dict[str, Any]],
    predict: Callable[[dict[str, Any]], Prediction],
    metrics: Iterable[str],
    *,
    name: str,
    output_field: str | None,
    retrieval_field: str | None = None,
    confidence: float = 0.95,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    skipped_cases: int = 0,
) -> EvaluationResult:
    """Run `predict` on every case, timing each call, and score the predictions.

    A case whose `predict` raises is kept: it scores 0 on every quality metric and its error
    text (``"ValueError: …"``) is stored on the example. The metrics are checked before any
    prediction runs, so a misconfigured evaluation fails fast.

    Args:
        cases: Suite cases, e.g. from `load_cases`.
        predict: Called once per case; returns a `Prediction` (a plain string is taken as the output).
        metrics: Quality metric names; runtime metrics are always added.
        name: What was evaluated.
        output_field: Case field holding the reference answer (e.g. ``"code"``).
        retrieval_field: Case field holding relevant ids (e.g. ``"relevant_ids"``).
        confidence: Confidence level of the bootstrap intervals.
        bootstrap_samples: Resamples per interval.
        seed: Seed of the resampling.
        skipped_cases: Malformed suite lines left out before evaluating, recorded in the result.

    Returns:
        The evaluation result.
    """
    metric_names = list(metrics)
    _check_metrics(metric_names, output_field, retrieval_field)
    predictions = [predict_case(predict, case) for case in cases]
    return score_predictions(
        cases, predictions, metric_names, name=name, output_field=output_field, retrieval_field=retrieval_field,
        confidence=confidence, bootstrap_samples=bootstrap_samples, seed=seed, skipped_cases=skipped_cases,
    )  # fmt: skip


# --- comparison ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricComparison:
    """Candidate against champion on one metric, over the cases both were evaluated on.

    Attributes:
        metric: The metric.
        candidate: Candidate's aggregate on the shared cases.
        champion: Champion's aggregate on the shared cases.
        delta: candidate − champion.
        interval: Bootstrap interval of `delta` (paired when cases are shared).
        higher_is_better: Direction of the metric.
        cases: Number of shared cases (0: compared unpaired on each side's own cases).
    """

    metric: str
    candidate: float
    champion: float
    delta: float
    interval: tuple[float, float]
    higher_is_better: bool
    cases: int

    @property
    def gain(self) -> float:
        """Improvement: `delta` for quality metrics, −`delta` for latency/cost-like metrics."""
        return self.delta if self.higher_is_better else -self.delta

    @property
    def gain_interval(self) -> tuple[float, float]:
        """Bootstrap interval of `gain`."""
        low, high = self.interval
        return (low, high) if self.higher_is_better else (-high, -low)


@dataclass(frozen=True)
class SliceComparison:
    """Candidate against champion on one metric within one slice (shared cases only)."""

    slice: str
    metric: str
    candidate: float
    champion: float
    delta: float
    higher_is_better: bool
    cases: int

    @property
    def drop(self) -> float:
        """How much worse the candidate is in this slice (negative when it is better)."""
        return -self.delta if self.higher_is_better else self.delta


@dataclass(frozen=True)
class Comparison:
    """Paired comparison of a candidate with the champion."""

    candidate_name: str
    champion_name: str
    shared_cases: int
    candidate_only: int
    champion_only: int
    metrics: dict[str, MetricComparison]
    slices: list[SliceComparison]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _compare_metrics(
    names: list[str],
    candidate: EvaluationResult,
    champion: EvaluationResult,
    shared: list[str],
    confidence: float,
    samples: int,
    seed: int,
) -> dict[str, MetricComparison]:
    if shared:
        pairs = {m: ([candidate.values(m)[c] for c in shared], [champion.values(m)[c] for c in shared]) for m in names}
        intervals = paired_bootstrap_intervals(pairs, confidence=confidence, samples=samples, seed=seed)
    else:
        pairs = {m: (list(candidate.values(m).values()), list(champion.values(m).values())) for m in names}
        intervals = _unpaired_intervals(pairs, confidence, samples, seed)
    comparisons = {}
    for metric, (first, second) in pairs.items():
        mine = float(aggregate(metric, np.asarray(first, dtype=float)))
        theirs = float(aggregate(metric, np.asarray(second, dtype=float)))
        comparisons[metric] = MetricComparison(
            metric, mine, theirs, mine - theirs, intervals[metric], higher_is_better(metric), len(shared)
        )
    return comparisons


def _unpaired_intervals(
    pairs: Mapping[str, tuple[list[float], list[float]]], confidence: float, samples: int, seed: int
) -> dict[str, tuple[float, float]]:
    """Intervals of the difference when no case is shared: each side resampled on its own cases."""
    mine = {m: np.asarray(a, dtype=float) for m, (a, _) in pairs.items()}
    theirs = {m: np.asarray(b, dtype=float) for m, (_, b) in pairs.items()}
    first = _resampled(
        {m: _statistic(m, values) for m, values in mine.items()}, len(next(iter(mine.values()))), samples, seed
    )
    second = _resampled(
        {m: _statistic(m, values) for m, values in theirs.items()}, len(next(iter(theirs.values()))), samples, seed + 1
    )
    return {m: _bounds(first[m] - second[m], confidence) for m in pairs}


def _compare_slices(
    metric: str, candidate: EvaluationResult, champion: EvaluationResult, shared: list[str]
) -> list[SliceComparison]:
    if not shared:
        return _compare_slice_aggregates(metric, candidate, champion)
    mine, theirs = candidate.values(metric), champion.values(metric)
    slice_of = {example.case_id: example.slice for example in candidate.examples}
    by_slice: dict[str, list[str]] = {}
    for case in shared:
        by_slice.setdefault(slice_of[case], []).append(case)
    comparisons = []
    for name, members in sorted(by_slice.items()):
        first = float(aggregate(metric, np.array([mine[case] for case in members], dtype=float)))
        second = float(aggregate(metric, np.array([theirs[case] for case in members], dtype=float)))
        comparisons.append(
            SliceComparison(name, metric, first, second, first - second, higher_is_better(metric), len(members))
        )
    return comparisons


def _compare_slice_aggregates(
    metric: str, candidate: EvaluationResult, champion: EvaluationResult
) -> list[SliceComparison]:
    """Unpaired fallback: each side's own slice aggregates, for slices both have."""
    comparisons = []
    for name in sorted(set(candidate.slices) & set(champion.slices)):
        mine, theirs = candidate.slices[name], champion.slices[name]
        first, second = mine.scores[metric], theirs.scores[metric]
        comparisons.append(
            SliceComparison(
                name, metric, first, second, first - second, higher_is_better(metric), min(mine.cases, theirs.cases)
            )
        )
    return comparisons


def compare(
    candidate: EvaluationResult,
    champion: EvaluationResult,
    metrics: Iterable[str] | None = None,
    *,
    confidence: float = 0.95,
    samples: int = 1000,
    seed: int = 0,
) -> Comparison:
    """Compare a candidate with the champion, case by case where they share case ids.

    Each metric's difference (candidate − champion) is computed on the shared cases, with a
    paired bootstrap interval (both resampled on the same cases, which cancels case difficulty);
    per-slice differences use the same shared cases. With no shared case the two are compared
    unpaired, each on its own cases (overall and per slice).

    Args:
        candidate: The new version's result.
        champion: The current champion's result.
        metrics: Metrics to compare; by default every metric both results hold.
        confidence: Confidence level of the intervals.
        samples: Bootstrap resamples.
        seed: Seed of the resampling.

    Returns:
        The comparison.

    Raises:
        ValueError: If a metric was not computed for both results.
    """
    names = list(metrics) if metrics is not None else [m for m in candidate.scores if m in champion.scores]
    missing = [m for m in names if m not in candidate.scores or m not in champion.scores]
    if missing:
        raise ValueError(
            f"cannot compare {', '.join(missing)}: not computed for both {candidate.name!r} and {champion.name!r}"
        )
    champion_ids = {example.case_id for example in champion.examples}
    shared = [example.case_id for example in candidate.examples if example.case_id in champion_ids]
    return Comparison(
        candidate_name=candidate.name,
        champion_name=champion.name,
        shared_cases=len(shared),
        candidate_only=candidate.cases - len(shared),
        champion_only=champion.cases - len(shared),
        metrics=_compare_metrics(names, candidate, champion, shared, confidence, samples, seed) if names else {},
        slices=[row for m in names for row in _compare_slices(m, candidate, champion, shared)],
    )
