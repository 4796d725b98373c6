"""Benchmark: throughput of Cadre's evaluation runner against bare `evaluate` metric calls.

Scores the same 1,000 predictions on the icd10-coder suite's answer metrics (from
pipelines.yaml) three ways and prints them side by side:

- ours: `cadre.evaluation.results.score_predictions` — per-example scores, means, per-slice means,
  runtime metrics and seeded bootstrap intervals (1,000 resamples) for every metric;
- ours, scores only: `cadre.evaluation.metrics.compute` per metric (no aggregation, no intervals);
- bare evaluate: ``evaluate.load(<local module path>).compute(...)`` per metric (means only;
  module loading is timed separately and not counted).

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/evaluate.py [--cases 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, this file's folder leads sys.path and this file would shadow the `evaluate` package.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

from cadre.platform.env import OFFLINE_ENV

os.environ.update(OFFLINE_ENV)  # before `evaluate` is imported: it reads the hub settings at import

from rich.console import Console
from rich.table import Table

from cadre.config import load_config
from cadre.evaluation import metrics
from cadre.evaluation.results import load_cases, score_predictions

ROOT = Path(__file__).resolve().parent.parent


def synthetic_outputs(cases: list[dict]) -> list[str | None]:
    """A deterministic mix of right, near, wrong and missing answers."""
    outputs: list[str | None] = []
    for position, case in enumerate(cases):
        code = case["code"]
        outputs.append(
            [code, code.replace(".", "").lower(), f"{code[:3]}.9", None, case["phrase"], "Z99.89"][position % 6]
        )
    return outputs


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = load_config(ROOT / "pipelines.yaml")
    coder = config.specialist("icd10-coder")
    answer_metrics = list(coder.evaluation.answer_metrics)
    output_field = coder.program.outputs[0].name
    cases = load_cases(config.resolve(coder.evaluation.suite), "train", limit=args.cases)
    outputs = synthetic_outputs(cases)
    references = [case[output_field] for case in cases]

    def ours() -> object:
        return score_predictions(
            cases, outputs, answer_metrics, name="bench", output_field=output_field, bootstrap_samples=1000
        )

    def scores_only() -> object:
        return {name: metrics.compute(name, outputs, references) for name in answer_metrics}

    import evaluate

    started = time.perf_counter()
    modules = {name: evaluate.load(str(metrics.evaluate_module_path(name))) for name in answer_metrics}
    load_seconds = time.perf_counter() - started

    def bare() -> dict[str, float]:
        return {
            name: module.compute(predictions=outputs, references=references)[name] for name, module in modules.items()
        }

    result = ours()
    bare_means = bare()
    for name in answer_metrics:
        assert abs(result.scores[name] - bare_means[name]) < 1e-12, f"{name}: runner and evaluate disagree"

    timings = {
        label: median_seconds(run, args.repeats)
        for label, run in (("ours", ours), ("scores", scores_only), ("bare", bare))
    }
    rate = {label: len(cases) / seconds for label, seconds in timings.items()}

    table = Table(
        title=f"Evaluation throughput: {len(cases)} cases, metrics {', '.join(answer_metrics)} (median of {args.repeats})"
    )
    table.add_column("path")
    table.add_column("what it returns")
    table.add_column("seconds", justify="right")
    table.add_column("cases/s", justify="right")
    table.add_column("ratio vs bare", justify="right")
    rows = [
        ("ours", "Cadre score_predictions", "per-example + means + slices + runtime + 95% CIs (1,000 resamples)"),
        ("scores", "Cadre metrics.compute", "per-example scores"),
        ("bare", "evaluate.load(path).compute", "means only"),
    ]
    for label, path, returns in rows:
        table.add_row(
            path, returns, f"{timings[label]:.3f}", f"{rate[label]:,.0f}", f"{rate[label] / rate['bare']:.2f}×"
        )
    console = Console()
    console.print(table)
    console.print(
        f"ours/bare throughput ratio: [bold]{rate['ours'] / rate['bare']:.2f}×[/bold]  ·  evaluate module loading (not counted): {load_seconds:.2f} s"
    )
    console.print("means agree: " + ", ".join(f"{name} {result.scores[name]:.4f}" for name in answer_metrics))


if __name__ == "__main__":
    main()
