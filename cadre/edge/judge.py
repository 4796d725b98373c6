"""A bundle judged like any candidate before it is published.

`judge_bundle` answers the first `edge.cases` test cases twice, on one thread each: with the champion as `cadre serve`
runs it (`build_runtime` from the registry's aliases) and with the bundle (`Bundle.open`). It scores both with the
specialist's first answer metric (bootstrap 95 % intervals, `evaluate_cases`) and checks the rules of
`specialists[].edge`: parity (identical answer, outputs and retrieved ids), the metric's drop, size, p95 latency.

`publish_bundle` exports into a candidate folder, judges it, and then either replaces the published bundle
(`<state_dir>/bundles/<specialist>/` or `--to`) or keeps the candidate beside it as `<name>.refused/`; the verdict
goes into the bundle's `bundle.json` (`judgement`) and, after a promotion, onto the specialist's model version.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadre.edge.bundle import MANIFEST_FILE

if TYPE_CHECKING:
    from cadre.config import CadreConfig
    from cadre.evaluation.results import EvaluationResult

REFUSED_SUFFIX = ".refused"


@dataclass
class BundleJudgement:
    """What the bundle answered beside the served champion, and whether its rules pass.

    Attributes:
        specialist: whose bundle.
        metric: the specialist's first answer metric, scored for both.
        served: the served champion's evaluation (`latency_p95_ms` among its scores).
        bundle: the bundle's evaluation on the same cases.
        identical: cases whose answer, outputs and retrieved ids are the same for both.
        size_mb: the bundle's files, in MB.
        failures: the rules that failed, as sentences (none: the bundle may be published).
        differences: the first cases that differ: inputs, served answer, bundle answer.
    """

    specialist: str
    metric: str
    served: EvaluationResult
    bundle: EvaluationResult
    identical: int
    size_mb: float
    failures: list[str] = field(default_factory=list)
    differences: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cases(self) -> int:
        return self.bundle.cases

    @property
    def parity(self) -> float:
        return self.identical / self.cases if self.cases else 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """What `bundle.json` records as `judgement`."""

        def scores(result: EvaluationResult) -> dict[str, Any]:
            low, high = result.intervals.get(self.metric, (0.0, 0.0))
            return {
                self.metric: result.scores[self.metric],
                f"{self.metric}_95ci": [low, high],
                "latency_p50_ms": result.scores["latency_p50_ms"],
                "latency_p95_ms": result.scores["latency_p95_ms"],
                "errors": result.errors,
            }

        return {
            "verdict": "published" if self.passed else "refused",
            "cases": self.cases,
            "identical": self.identical,
            "parity": self.parity,
            "metric": self.metric,
            "served": scores(self.served),
            "bundle": scores(self.bundle),
            "size_mb": self.size_mb,
            "failures": self.failures,
            "differences": self.differences,
        }

    def to_markdown(self) -> str:
        """The report a reviewer reads: verdict, the side-by-side table, failed rules, differing cases."""
        verdict = "PUBLISHED" if self.passed else "REFUSED"
        lines = [
            f"**Edge bundle of `{self.specialist}`: {verdict}.** {self.identical}/{self.cases} test cases answered "
            f"identically to the served champion; {self.size_mb:.0f} MB.",
            "",
            f"| | {self.metric} [95 %] | p50 ms | p95 ms | errors |",
            "|---|---|---|---|---|",
        ]
        for name, result in (("served champion (cadre serve)", self.served), ("bundle", self.bundle)):
            low, high = result.intervals.get(self.metric, (0.0, 0.0))
            lines.append(
                f"| {name} | {result.scores[self.metric]:.3f} [{low:.3f}, {high:.3f}] | "
                f"{result.scores['latency_p50_ms']:.0f} | {result.scores['latency_p95_ms']:.0f} | {result.errors} |"
            )
        if self.failures:
            lines += ["", "Failed rules:", *[f"- {failure}" for failure in self.failures]]
        if self.differences:
            lines += ["", "Cases answered differently (first ones):"]
            lines += [f"- {json.dumps(item, ensure_ascii=False)}" for item in self.differences]
        return "\n".join(lines) + "\n"


def judge_bundle(config: CadreConfig, specialist: str, folder: Path, *, cases: int | None = None) -> BundleJudgement:
    """Answer the test cases with the served champion and with the bundle in `folder`; check `edge`'s rules.

    Args:
        config: the validated pipelines file (its MLflow server names the champions).
        specialist: whose bundle.
        folder: the exported bundle.
        cases: how many test cases (default: `edge.cases`).
    """
    from cadre.edge.runner import Bundle
    from cadre.evaluation.results import Prediction, evaluate_cases, load_cases
    from cadre.runtime.base_model import base_gguf
    from cadre.serving.engine import LoraEngine
    from cadre.serving.team import RegistrySource, answer, build_runtime, current_versions

    settings = config.specialist(specialist)
    rules = settings.edge
    inputs = [item.name for item in settings.program.inputs]
    output = settings.program.outputs[0].name
    metric = (settings.evaluation.answer_metrics or ["exact_match"])[0]
    chosen = load_cases(config.resolve(settings.evaluation.suite), "test", limit=cases or rules.cases)
    if not chosen:
        raise ValueError(f"the test split of {specialist!r} has no valid case to judge the bundle on")
    queries = [{name: case.get(name) for name in inputs} for case in chosen]

    def evaluate(name: str, respond: Any, found: list[dict[str, Any]]) -> EvaluationResult:
        respond(queries[0])  # the first search loads the embedding model: not an answer's latency

        def predict(case: dict[str, Any]) -> Prediction:
            try:
                result = respond({key: case.get(key) for key in inputs})
            except Exception as error:  # scored 0 by evaluate_cases; kept here so the two sides stay paired
                found.append({"error": f"{type(error).__name__}: {error}"})
                raise
            found.append(result)
            return Prediction(output=result["outputs"].get(output), retrieved_ids=result["retrieved_ids"])

        return evaluate_cases(chosen, predict, [metric], name=name, output_field=output)

    source = RegistrySource(config.project.mlflow.uri, config.project.name, str(config.state_dir))
    versions = current_versions(source, specialist, bool(settings.program.retrieve_k))
    engine = LoraEngine(base_gguf(config, settings.base_model), contexts=1, n_threads=1, n_ctx=config.project.lm.n_ctx)
    served_answers: list[dict[str, Any]] = []
    try:
        runtime = build_runtime(config, specialist, versions, engine, source)
        try:
            served = evaluate("served champion", lambda q: answer(runtime, q), served_answers)
        finally:
            runtime.close()
    finally:
        engine.close()
    bundle_answers: list[dict[str, Any]] = []
    opened = Bundle.open(folder, n_threads=1)
    try:
        edge = evaluate("bundle", opened.answer, bundle_answers)
    finally:
        opened.close()

    manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
    size_mb = manifest["bytes"] / 1e6
    pairs = list(zip(queries, served_answers, bundle_answers, strict=True))
    identical = sum(a == b for _, a, b in pairs)
    differences = [{"inputs": q, "served": a, "bundle": b} for q, a, b in pairs if a != b][:5]
    judgement = BundleJudgement(specialist, metric, served, edge, identical, size_mb, differences=differences)
    if judgement.parity < rules.min_parity:
        judgement.failures.append(
            f"parity {identical}/{len(pairs)} = {judgement.parity:.3f} is below edge.min_parity {rules.min_parity}"
        )
    drop = served.scores[metric] - edge.scores[metric]
    if drop > rules.max_quality_drop:
        judgement.failures.append(
            f"{metric} {edge.scores[metric]:.3f} is {drop:.3f} below the served champion's "
            f"{served.scores[metric]:.3f} (edge.max_quality_drop {rules.max_quality_drop})"
        )
    if rules.max_size_mb is not None and size_mb > rules.max_size_mb:
        judgement.failures.append(f"{size_mb:.0f} MB is over edge.max_size_mb {rules.max_size_mb:g}")
    p95 = edge.scores["latency_p95_ms"]
    if rules.max_p95_ms is not None and p95 > rules.max_p95_ms:
        judgement.failures.append(f"p95 {p95:.0f} ms per answer is over edge.max_p95_ms {rules.max_p95_ms:g}")
    return judgement


@dataclass(frozen=True)
class Publication:
    """Where a judged bundle went.

    Attributes:
        folder: the published bundle, or the refused one (`<name>.refused/`).
        judgement: its judgement.
        published: True when it replaced the published bundle.
    """

    folder: Path
    judgement: BundleJudgement
    published: bool


def publish_bundle(config: CadreConfig, specialist: str, to: Path, *, cases: int | None = None) -> Publication:
    """Export the specialist's champions, judge the bundle, and publish it at `to` only if it passes.

    The candidate is written beside `to` first; a published bundle at `to` is replaced only by one that passed
    (renamed into place), so a refused or interrupted export never leaves `to` half-written or worse than before.

    Raises:
        cadre.edge.BundleError: the champions cannot be exported (see `export_bundle`, `champion_parts`).
    """
    from cadre.edge.bundle import check_bundle_target, export_bundle, replace_folder
    from cadre.edge.export import champion_parts

    to = Path(to)
    check_bundle_target(to)
    candidate = to.with_name(f"{to.name}.candidate-{os.getpid()}")
    shutil.rmtree(candidate, ignore_errors=True)
    export_bundle(champion_parts(config, specialist), candidate)
    try:
        judgement = judge_bundle(config, specialist, candidate, cases=cases)
    except BaseException:
        shutil.rmtree(candidate, ignore_errors=True)
        raise
    manifest_path = candidate / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["judgement"] = judgement.to_dict()
    manifest_path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    (candidate / "judgement.md").write_text(judgement.to_markdown(), encoding="utf-8")
    target = to if judgement.passed else to.with_name(to.name + REFUSED_SUFFIX)
    replace_folder(candidate, target)
    return Publication(target, judgement, judgement.passed)


EDGE_TAG = "cadre.edge"


def publish_after_promotion(config: CadreConfig, specialist: str, model: str, version: str, run_id: str) -> bool:
    """`publish_bundle` to `<state_dir>/bundles/<specialist>` after a promotion, reported on the specialist's version.

    The verdict goes to the version's tag `cadre.edge` (e.g. `published: 40/40 identical, 362 MB, p95 980 ms`), the
    report and `bundle.json` to its run under `edge/`. The promotion stands whatever happens here: a failure is
    printed and tagged, never raised.

    Args:
        config: the validated pipelines file.
        specialist: whose bundle.
        model: the specialist's registered model (`<project>.<specialist>`).
        version: its version that the promotion registered.
        run_id: the run that version's files were logged to (the flow's run).

    Returns:
        True when a bundle was published.
    """
    from mlflow import MlflowClient

    client = MlflowClient(config.project.mlflow.uri)
    target = config.state_dir / "bundles" / specialist
    print(f"edge export: bundling {model} v{version} and judging it beside the served champion …")
    try:
        publication = publish_bundle(config, specialist, target)
    except Exception as error:  # noqa: BLE001 - the promotion has happened; the export only reports
        message = f"export failed: {type(error).__name__}: {error}"
        print(f"edge export: {message}")
        client.set_model_version_tag(model, version, EDGE_TAG, message[:500])
        return False
    judgement = publication.judgement
    verdict = "published" if publication.published else "refused"
    tag = (
        f"{verdict}: {judgement.identical}/{judgement.cases} identical, {judgement.size_mb:.0f} MB, "
        f"p95 {judgement.bundle.scores['latency_p95_ms']:.0f} ms"
    )
    folder = f"edge/{specialist}-v{version}"
    client.log_text(run_id, judgement.to_markdown(), f"{folder}/judgement.md")
    client.log_dict(
        run_id, json.loads((publication.folder / MANIFEST_FILE).read_text("utf-8")), f"{folder}/bundle.json"
    )
    client.set_model_version_tag(model, version, EDGE_TAG, tag)
    print(f"edge export: {tag} → {publication.folder}")
    if judgement.failures:
        print("edge export: " + "; ".join(judgement.failures))
    return publication.published
