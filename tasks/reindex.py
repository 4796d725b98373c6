"""Tasks of the re-index flow: build a new index version, evaluate retrieval, move the live pointer."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric
from prefect import get_run_logger, task

from cadre.config import CadreConfig
from cadre.config.budget import WALL_CAP_TAG, ReindexPlan
from cadre.evaluation.metrics import is_retrieval_metric
from cadre.evaluation.results import EvaluationResult, Prediction, evaluate_cases, load_cases
from cadre.knowledge.index.base import VersionNotFound
from cadre.knowledge.reindex import (
    IndexSearcher,
    ReindexResult,
    live_version,
    promote_version,
    prune_versions,
    reindex_specialist,
)
from cadre.registry.promotion import champion_version
from cadre.registry.runs import RunHandle, log_dataset
from cadre.runtime.retrieval import retrieval_query


@task(name="sync-live-index-with-registry", retries=2, retry_delay_seconds=5)
def sync_live_pointer(config: CadreConfig, specialist: str) -> str | None:
    """Make the registry's index champion (its `champion` alias) the version this state dir searches, and return it.

    The alias is the pointer; the local live file follows it. A champion built on another machine is installed
    here from its registered model first (`install_index_version`); this also repairs a run that died between
    moving the alias and the local pointer. Without a registered champion, the local live version stands.

    Raises:
        RuntimeError: the champion is neither here nor carried by its registered version.
    """
    from cadre.registry.models import install_index_version

    version = champion_version(config, specialist, "index")
    if version is None:
        return live_version(config.state_dir, specialist)
    tags = (
        MlflowClient(config.project.mlflow.uri)
        .get_model_version(f"{config.project.name}.{specialist}.index", version)
        .tags
    )
    name = tags.get("cadre.lineage.index_version")
    if not name:
        return live_version(config.state_dir, specialist)
    if not install_index_version(config, specialist, version, name, config.project.mlflow.uri):
        raise RuntimeError(
            f"the index champion of {specialist} ({config.project.name}.{specialist}.index v{version}, index {name}) "
            f"is not in {config.state_dir} and its registered version does not carry its table; re-index "
            f"(`cadre run reindex -s {specialist}`) to build and register one here"
        )
    if name != live_version(config.state_dir, specialist):
        promote_version(config.state_dir, specialist, name)
    return name


@task(name="build-index-version", retries=1, retry_delay_seconds=10)
def build_index_version(config: CadreConfig, specialist: str, plan: ReindexPlan) -> ReindexResult:
    """Load the sources, embed only what changed, write a new version beside the live one (resumes a killed run).

    Embeds with the champion embedder (`cadre.tuning.embedder.champion_embedder`): the model of the live version
    after a retriever refresh, so a daily re-index stays incremental and its queries match its vectors.
    """
    from cadre.tuning.embedder import champion_embedder

    embedder = champion_embedder(config, specialist)
    return reindex_specialist(config, specialist, budget=plan.budget, show_progress=True, embedder=embedder)


@task(name="log-reindex-result", retries=3, retry_delay_seconds=2)
def log_reindex_result(handle: RunHandle, result: ReindexResult) -> None:
    """Counts, durations and throughput as metrics; the skip report and manifest as artifacts."""
    client = MlflowClient(handle.tracking_uri)
    client.log_batch(handle.run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in result.metrics().items()])
    client.set_tag(handle.run_id, "cadre.corpus_fingerprint", result.corpus_fingerprint)
    log_dataset(
        handle,
        "corpus",
        "corpus",
        result.corpus_fingerprint,
        f"{result.specialist}: {result.documents_total} documents",
    )
    client.set_tag(handle.run_id, "cadre.index_version", result.version or "")
    if result.wall_capped:
        client.set_tag(handle.run_id, "cadre.outcome", "wall_capped")
        client.set_tag(handle.run_id, WALL_CAP_TAG, result.wall_cap_note)
    elif not result.created_version:
        client.set_tag(handle.run_id, "cadre.outcome", "unchanged")
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "reindex_report.json"
        report.write_text(json.dumps(result.as_dict(), indent=2, default=str))
        client.log_artifact(handle.run_id, str(report), artifact_path="index")
        if result.manifest_path:
            client.log_artifact(handle.run_id, result.manifest_path, artifact_path="index")


@task(name="fit-index-ranker")
def fit_index_ranker(
    config: CadreConfig, specialist: str, version: str | None, plan: ReindexPlan, handle: RunHandle | None = None
) -> dict[str, Any] | None:
    """Fit the learned ranking of a new index version (`search_mode: learned`) on the train split and write it beside
    the version's manifest, so every later search of the version ranks with it; None when the mode is another or no
    version was built.

    The train cases are searched in `version` exactly as serving searches (their retrieval query); cases whose answer
    is not among their candidates are left out. With too few usable cases (a smoke index holds few train answers)
    no ranker is written and the version is searched with the fused (hybrid) ranking: the log and the run say so.
    """
    from cadre.config.budget import parse_budget
    from cadre.knowledge.index.live import write_json_atomic
    from cadre.knowledge.ranker import LearnedRanker, NotEnoughRankerData, RankerSettings, collect

    settings = config.specialist(specialist)
    ranking = settings.index.ranking
    if ranking is None or version is None:
        return None
    logger = get_run_logger()
    started = time.perf_counter()
    searcher = IndexSearcher.from_config(config, specialist)
    ranker_settings = RankerSettings.from_config(ranking)
    limit = SMOKE_RANKER_CASES if parse_budget(plan.budget) == "smoke" else ranking.max_cases
    input_names = [f.name for f in settings.program.inputs]
    held = _held_record_ids(searcher, version)  # under a document cap, only cases it can answer teach it
    train = [
        case
        for case in load_cases(config.resolve(settings.evaluation.suite), "train")
        if case.get("relevant_ids")
        and retrieval_query(case, input_names).strip()
        and (held is None or set(case["relevant_ids"]) & held)
    ][:limit]
    queries = [retrieval_query(case, input_names) for case in train]
    rankings = searcher.rankings_many(queries, ranker_settings.fetch_depth, version=version) if queries else []
    data = collect(
        ranker_settings, [(q, case["relevant_ids"], r) for q, case, r in zip(queries, train, rankings, strict=True)]
    )
    try:
        ranker = LearnedRanker.fit(data, ranker_settings)
    except NotEnoughRankerData as error:
        logger.warning("index %s of %s keeps the fused ranking: %s", version, specialist, error)
        return {"fitted": False, "why": str(error), "queries": data.queries, "usable": data.usable}
    path = searcher.layout.ranker_path(version)
    write_json_atomic(path, ranker.to_json())
    seconds = round(time.perf_counter() - started, 1)
    fitted = {"fitted": True, **ranker.fitted_on, "fit_seconds": seconds}
    logger.info(
        "index %s of %s: learned ranking fitted on %d of %d train cases in %.1f s (train top-1: fused %.3f, learned %.3f)",
        version,
        specialist,
        data.usable,
        data.queries,
        seconds,
        ranker.fitted_on["train_top1_fused"],
        ranker.fitted_on["train_top1_learned"],
    )
    if handle is not None:
        client = MlflowClient(handle.tracking_uri)
        numbers = {key: float(value) for key, value in fitted.items() if isinstance(value, (int, float))}
        client.log_batch(handle.run_id, metrics=[Metric(f"ranker_{k}", v, 0, 0) for k, v in numbers.items()])
        client.log_artifact(handle.run_id, str(path), artifact_path="index")
    return fitted


SMOKE_RANKER_CASES = 200
"""Train cases a smoke run fits its ranker on."""


@task(name="evaluate-retrieval")
def evaluate_retrieval(
    config: CadreConfig,
    specialist: str,
    version: str | None,
    plan: ReindexPlan,
    label: str,
    cases_of: str | None = None,
) -> EvaluationResult | None:
    """Retrieval metrics of one index version on the specialist's test split (None when there is no such version).

    Under a document cap (smoke budget, `index.max_documents`), only cases whose relevant documents the
    candidate holds can be answered; the others are left out and counted, so the numbers measure ranking
    rather than the cap. `cases_of` names the version whose coverage picks the cases (default: `version`
    itself): the champion is evaluated on the candidate's cases, so both are judged on the same cases and
    a champion built under a cap scores what it really misses.
    """
    if version is None:
        return None
    settings = config.specialist(specialist)
    metrics = settings.evaluation.retrieval_metrics
    limit = plan.eval_cases
    searcher = IndexSearcher.from_config(config, specialist)
    k = max([int(m.split("@")[1]) for m in metrics if "@" in m] + [10])
    with_relevance = [c for c in load_cases(config.resolve(settings.evaluation.suite), "test") if c.get("relevant_ids")]
    coverage = cases_of or version
    held = _held_record_ids(searcher, coverage)
    answerable = [c for c in with_relevance if held is None or set(c["relevant_ids"]) & held]
    cases = answerable[:limit] if limit else answerable
    if len(answerable) < len(with_relevance):
        get_run_logger().info(
            "%s %s: evaluating the %d of %d test cases whose relevant documents version %s holds (document cap)",
            label,
            version,
            len(answerable),
            len(with_relevance),
            coverage,
        )

    input_names = [f.name for f in settings.program.inputs]

    def predict(case: dict[str, Any]) -> Prediction:
        # The query the program sends when it serves this case, so the gate measures what serving retrieves.
        hits = searcher.search(retrieval_query(case, input_names), k=k, version=version)
        ranked = list(dict.fromkeys(hit.record_id for hit in hits))
        return Prediction(output=ranked[0] if ranked else None, retrieved_ids=ranked)

    return evaluate_cases(
        cases,
        predict,
        [m for m in metrics if is_retrieval_metric(m)],
        name=f"{label} {version}",
        output_field=None,
        retrieval_field="relevant_ids",
        confidence=settings.evaluation.confidence,
        bootstrap_samples=settings.evaluation.bootstrap_samples,
    )


def _held_record_ids(searcher: IndexSearcher, version: str) -> set[str] | None:
    try:
        states = searcher.backend.open_version(version).chunk_states()
    except (VersionNotFound, AttributeError):
        return None
    return {state.doc_id.split(":", 1)[1] for state in states}


@task(name="make-index-live", retries=2, retry_delay_seconds=2)
def make_live(config: CadreConfig, specialist: str, version: str, retention: int) -> list[str]:
    """Point serving at the promoted version, then prune old versions; returns the versions dropped."""
    from cadre.knowledge.index import open_backend

    promote_version(config.state_dir, specialist, version)
    backend = open_backend(config.project.index, config.state_dir, specialist)
    return prune_versions(
        config.state_dir, specialist, retention, backend=backend, configured_model=config.project.embedding.model
    ).dropped
