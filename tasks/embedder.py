"""Tasks of the retriever refresh: training pairs with mined hard negatives, fine-tuning, the re-embedded index
version, and the index promotion that follows a promoted embedder. The logic is `cadre.tuning.embedder`."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cadre.config import CadreConfig
from cadre.config.budget import RunBudget
from cadre.evaluation.results import EvaluationResult, load_cases
from cadre.knowledge.embedding import Embedder
from cadre.knowledge.index.manifest import IndexLayout
from cadre.knowledge.reindex import IndexSearcher, ReindexResult, reindex_specialist
from cadre.registry.promotion import Candidate, PromotionOutcome
from cadre.registry.runs import RunHandle, log_dataset
from cadre.tuning.embedder import (
    EmbedderPlan,
    NoTrainPairs,
    TrainedEmbedder,
    TrainingPair,
    build_pairs,
    champion_embedder,
    hit_text,
    indexed_texts,
    pairs_fingerprint,
    train_embedder,
    usable_cases,
)


@task(name="resolve-champion-embedder", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def resolve_champion_embedder(config: CadreConfig, specialist: str) -> Embedder:
    """The registry's `embedder` champion (downloaded once), else `project.embedding`."""
    return champion_embedder(config, specialist)


@task(name="build-embedder-pairs", cache_policy=NO_CACHE)
def build_embedder_pairs(
    handle: RunHandle, config: CadreConfig, specialist: str, plan: EmbedderPlan, live: str
) -> list[TrainingPair]:
    """Train cases → (query, relevant document's indexed text, hard negatives mined from the live index version).

    Raises:
        NoTrainPairs: the train split has no case with relevant ids that the index holds.
    """
    logger = get_run_logger()
    settings = config.specialist(specialist)
    embedder_settings = settings.embedder
    input_names = [field.name for field in settings.program.inputs]
    cases = usable_cases(load_cases(config.resolve(settings.evaluation.suite), "train"), input_names)
    if plan.max_train_pairs is not None:
        cases = cases[: plan.max_train_pairs]
    started = time.perf_counter()
    searcher = IndexSearcher.from_config(config, specialist)
    embedder = searcher.embedder_for(live)
    wanted = {str(item) for case in cases for item in case["relevant_ids"]}
    texts = indexed_texts(config, specialist, wanted, embedder, plan.max_documents)
    hits = None
    if embedder_settings.hard_negatives:
        queries = [" ".join(str(case[name]) for name in input_names if case.get(name)) for case in cases]
        found = searcher.search_many(queries, embedder_settings.mine_depth, version=live)
        hits = [[(hit.record_id, hit_text(hit)) for hit in ranked] for ranked in found]
    pairs = build_pairs(
        cases,
        input_names,
        texts,
        hits,
        hard_negatives=embedder_settings.hard_negatives,
        max_pairs=plan.max_train_pairs,
        seed=embedder_settings.seed,
    )
    if not pairs:
        raise NoTrainPairs(
            f"{specialist}: none of the {len(cases)} train cases with relevant ids names a document the index holds; "
            "nothing to fine-tune the embedder on"
        )
    seconds = time.perf_counter() - started
    fingerprint = pairs_fingerprint(pairs)
    logger.info(
        "%d training pairs from %d train cases (%d hard negatives each, mined from index %s) in %.0f s; fingerprint %s",
        len(pairs),
        len(cases),
        embedder_settings.hard_negatives,
        live,
        seconds,
        fingerprint[:16],
    )
    client = MlflowClient(handle.tracking_uri)
    client.log_batch(
        handle.run_id,
        metrics=[Metric("train_pairs", len(pairs), 0, 0), Metric("seconds_mine", seconds, 0, 0)],
        params=[Param("data.fingerprint", fingerprint), Param("data.mined_from_index", live)],
    )
    client.set_tag(handle.run_id, "cadre.data_fingerprint", fingerprint)
    suite = config.resolve(settings.evaluation.suite)
    log_dataset(
        handle,
        "training_pairs",
        "training",
        fingerprint,
        [str(suite / "train.jsonl"), f"index {live}"],
    )
    return pairs


@task(name="train-embedder", cache_policy=NO_CACHE)
def train_candidate_embedder(
    handle: RunHandle,
    config: CadreConfig,
    specialist: str,
    pairs: list[TrainingPair],
    base: Embedder,
    plan: EmbedderPlan,
) -> TrainedEmbedder:
    """Fine-tune the champion embedder on the pairs (resumes a killed training, reuses a finished one)."""
    logger = get_run_logger()
    client = MlflowClient(handle.tracking_uri)
    started = time.perf_counter()

    def progress(metrics: dict[str, float], step: int, total: int) -> None:
        elapsed = time.perf_counter() - started
        left = elapsed / step * (total - step) if step else 0.0
        logger.info("embedder step %d/%d loss %.4f, about %.0f s left", step, total, metrics.get("loss", 0.0), left)
        now = int(time.time() * 1000)
        client.log_batch(
            handle.run_id,
            metrics=[Metric(f"train/{k}", v, now, step) for k, v in metrics.items()]
            + [Metric("train/estimated_seconds_left", left, now, step)],
        )

    trained = train_embedder(
        pairs,
        base.model_dir,
        config.specialist(specialist).embedder,
        plan,
        config.state_dir / "embedders" / specialist,
        threads=config.project.threads.torch,
        on_log=progress,
    )
    client.log_batch(
        handle.run_id,
        metrics=[
            Metric("train_steps", trained.steps, 0, 0),
            Metric("train_seconds", trained.train_seconds, 0, 0),
            Metric("train_resumed_from_step", trained.resumed_from_step, 0, 0),
        ],
        params=[Param("embedder.base", base.model_ref), Param("embedder.config_hash", trained.config_hash[:16])],
    )
    verb = (
        "reused"
        if trained.reused
        else f"resumed at step {trained.resumed_from_step}"
        if trained.resumed_from_step
        else "trained"
    )
    logger.info(
        "embedder %s: %d steps in %.0f s, model %s", verb, trained.steps, trained.train_seconds, trained.model_dir
    )
    return trained


@task(name="build-re-embedded-index", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def build_candidate_index(
    config: CadreConfig, specialist: str, trained: TrainedEmbedder, plan: EmbedderPlan
) -> ReindexResult:
    """Re-embed the corpus with the candidate through the re-index engine: a new version beside the live one, built
    from empty (another model), resumable, never live until promoted."""
    embedding = config.project
    candidate = Embedder.from_folder(
        Path(trained.model_dir),
        batch_size=embedding.embedding.batch_size,
        threads=embedding.threads.embedding,
        runtime=embedding.embedding.runtime,
    )
    budget = plan.budget
    return reindex_specialist(config, specialist, budget=budget, show_progress=True, embedder=candidate)


@task(name="log-candidate-embedder", retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE)
def log_candidate_embedder(handle: RunHandle, trained: TrainedEmbedder, built: ReindexResult) -> None:
    """The model folder under `embedder/`, the re-embedded version's manifest under `index/`, the re-embed's figures."""
    client = MlflowClient(handle.tracking_uri)
    client.log_artifacts(handle.run_id, trained.model_dir, artifact_path="embedder")
    if built.manifest_path:
        client.log_artifact(handle.run_id, built.manifest_path, artifact_path="index")
    client.log_batch(
        handle.run_id,
        metrics=[Metric(f"reembed_{k}", float(v), 0, 0) for k, v in built.metrics().items()],
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "losses.json"
        path.write_text(json.dumps(trained.losses))
        client.log_artifact(handle.run_id, str(path), artifact_path="training")
    client.set_tag(handle.run_id, "cadre.index_version", built.version or "")


@task(name="promote-re-embedded-index", cache_policy=NO_CACHE)
def promote_reembedded_index(
    config: CadreConfig,
    specialist: str,
    parent: RunHandle,
    built: ReindexResult,
    candidate: EvaluationResult,
    champion: EvaluationResult | None,
    index_champion: str | None,
    embedder_version: str,
    budget: RunBudget,
) -> PromotionOutcome:
    """The promoted embedder's index version goes through the index gates too, in a child run of its own, so the
    registry's `index` champion is the live version (the re-index flow repairs the live pointer from it)."""
    from cadre.registry.promotion import gate_and_promote
    from cadre.registry.runs import TAG_FLOW_RUN_URL, close_run, open_run
    from tasks.promotion import flow_actor

    IndexLayout(config.state_dir, specialist).record_embedder_version(built.version, embedder_version)
    # Not tagged with the flow run's id: that tag finds *the* MLflow run of a flow run (`find_run`), the parent.
    # The child links to the same Prefect page, and MLflow shows it under its parent.
    child = open_run(config, specialist, "reindex", budget, flow_run_id=None)
    client = MlflowClient(child.tracking_uri)
    client.set_tag(child.run_id, "mlflow.parentRunId", parent.run_id)
    flow_run_url = client.get_run(parent.run_id).data.tags.get(TAG_FLOW_RUN_URL)
    if flow_run_url:
        client.set_tag(child.run_id, TAG_FLOW_RUN_URL, flow_run_url)
    client.set_tag(child.run_id, "mlflow.runName", f"reindex-by-embedder-v{embedder_version}")
    client.log_artifact(child.run_id, built.manifest_path, artifact_path="index")
    lineage = {
        "corpus_fingerprint": built.corpus_fingerprint,
        "index_key": built.index_key,
        "index_version": built.version,
        "embedder_version": embedder_version,
        "parent_versions": built.base_version or "",
    }
    try:
        outcome = gate_and_promote(
            config,
            specialist,
            child,
            Candidate("reindex", candidate, champion, index_champion, lineage),
            flow_actor(f"refresh-embedder:{parent.run_id}"),
        )
    except BaseException:
        close_run(child, "FAILED")
        raise
    close_run(child, "FINISHED")
    return outcome
