"""The refresh's hyperparameter search as a task: trials as nested MLflow runs, scored on dev as the specialist serves.

Where the refresh re-chooses the answer mode for its adapter (`tuning.decoding_dev_cases`), a trial answers the dev
cases each way `choose_decoding` tries and scores its best: a program that answers with the retriever's first hit
scores every adapter alike, and the search would have nothing to choose by.

`search_hyperparameters` runs `cadre.tuning.search.run_search` with the refresh's own pieces: each trial trains
through `train_adapter` (checkpointed in the work folder of its settings, so the best trial's adapter is reused by
the candidate's training and a killed trial resumes), its adapter is exported to GGUF and run on the dev split
by `cadre.prompts.served` (in shards on `project.engine` when that is a Dask cluster). Each trial is a child run of
the refresh's MLflow run (params, its training loss by step, its dev scores, `cadre.trial_state`); the parent gets
the trial table and the summary figures.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cadre.evaluation.results import load_cases, mlflow_metric_name
from cadre.prompts.program import use_disk_cache
from cadre.tuning.finetune import RefreshPlan, train_adapter, training_config_hash, work_dir
from cadre.tuning.search import COMPLETE, FAILED, PRUNED, SearchResult, TrialOutcome, run_search, study_name

if TYPE_CHECKING:
    from cadre.config import EvaluationSettings, TuningSettings
    from cadre.config.project import EngineSettings
    from cadre.registry.champions import ServingSetup
    from cadre.registry.runs import RunHandle
    from cadre.tuning.finetune import TrainingResult
    from cadre.tuning.search import Report
    from cadre.tuning.training_data import TrainingData

TRIAL_STATE_TAG = "cadre.trial_state"
_RUN_STATUS = {COMPLETE: "FINISHED", PRUNED: "KILLED"}


def study_file(state_dir: Path, specialist: str) -> Path:
    """The SQLite file of a specialist's search studies."""
    return Path(state_dir) / "search" / specialist / "studies.db"


@task(name="search-hyperparameters", cache_policy=NO_CACHE, log_prints=False)
def search_hyperparameters(
    handle: RunHandle,
    data: TrainingData,
    tuning: TuningSettings,
    setup: ServingSetup,
    evaluation: EvaluationSettings,
    suite_dir: str,
    plan: RefreshPlan,
    state_dir: str,
    specialist: str,
    scratch: str,
    threads: int,
    engine: EngineSettings | None = None,
) -> SearchResult | None:
    """Search `tuning.search.space` for the settings whose adapter does best on dev; None when no search runs."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from prefect import get_run_logger

    from cadre.prompts.served import open_evaluator
    from cadre.registry.runs import RunHandle
    from cadre.tuning.adapter_export import export_adapter
    from tasks.refresh import MlflowSink, choose_decoding

    say = get_run_logger().info
    search = tuning.search
    trials = search.trial_count(plan.budget) if search else 0
    if search is None or trials == 0:
        if search is not None:
            say(f"search: none under the {plan.budget} budget (tuning.search.smoke_trials is 0)")
        return None
    metric = evaluation.answer_metrics[0]
    # An adapter can make another answer mode pay (a program answering with the retriever's first hit scores every
    # adapter alike): where the refresh re-chooses it, a trial's score is its best answer mode's.
    rechosen = bool(plan.decoding_dev_cases)
    dev_limit = (
        search.dev_cases if plan.budget == "full" else min(search.dev_cases, plan.eval_cases or search.dev_cases)
    )
    dev = load_cases(suite_dir, "dev", dev_limit, required=setup.program_settings.field_names)
    if not dev:
        raise ValueError(f"{suite_dir}: the dev split holds no usable case to score search trials on")
    cache_dir = str(Path(state_dir) / "cache" / "dspy")
    use_disk_cache(cache_dir)
    base = setup.base
    client = MlflowClient(handle.tracking_uri)
    children: dict[int, str] = {}

    def child(number: int, params: dict[str, Any]) -> str:
        if number not in children:
            run = client.create_run(
                handle.experiment_id,
                run_name=f"trial {number}",
                tags={"mlflow.parentRunId": handle.run_id, "cadre.trial": str(number), TRIAL_STATE_TAG: "running"},
            )
            children[number] = run.info.run_id
            client.log_batch(children[number], params=[Param(k, str(v)) for k, v in params.items()])
        return children[number]

    def train(settings: TuningSettings, steps: int | None, report: Report, number: int) -> TrainingResult:
        run_id = child(number, {name: getattr(settings, name) for name in search.space})
        config_hash = training_config_hash(settings, base.identity, steps)
        logger = MlflowSink(RunHandle(run_id, handle.experiment_id, handle.tracking_uri), say)

        def sink(metrics: dict[str, float], step: int) -> None:
            logger(metrics, step)
            if "loss" in metrics:
                report(step, metrics["loss"])

        result = train_adapter(
            data,
            settings,
            base_model_dir=Path(base.hf_dir),
            work_dir=work_dir(Path(state_dir), specialist, data.fingerprint, config_hash),
            max_steps=steps,
            threads=threads,
            sink=sink,
            say=say,
            progress_bar=False,
            config_hash=config_hash,
            max_wall_seconds=plan.max_wall_seconds,
        )
        # A reused adapter (or one resumed from a checkpoint) trained its first steps in an earlier process: the
        # trial's run still shows its whole loss curve.
        backfill = logger.backfill(result.loss_curve, int(time.time() * 1000))
        try:
            for start in range(0, len(backfill), 500):
                client.log_batch(run_id, metrics=backfill[start : start + 500])
        except Exception as error:  # noqa: BLE001 - the curve is in the adapter's folder; only its copy is lost
            say(f"warning: could not log trial {number}'s earlier loss curve to MLflow: {error}")
        return result

    def score(result: TrainingResult, settings: TuningSettings, number: int) -> float:
        folder = Path(scratch) / "search" / f"trial-{number}"
        exported = export_adapter(result.adapter_dir, Path(base.hf_dir), folder, Path(state_dir))
        if rechosen:  # the refresh re-chooses the answer mode for its adapter: each trial answers its best way
            decoding = choose_decoding(
                setup, evaluation, cache_dir, dev, str(exported.gguf), str(folder), evaluator=evaluator
            )
            best = decoding.chosen
            tried = ", ".join(f"{t.label} {t.score:.3f}" for t in decoding.tried)
            say(f"search: trial {number} answers best {best.label} on {len(dev)} dev cases ({tried})")
            tries = {f"dev_{t.key}_{mlflow_metric_name(metric)}": t.score for t in decoding.tried}
            client.set_tag(children[number], "cadre.trial_answer", best.label)
            figures = {f"dev_{mlflow_metric_name(metric)}": best.score, **tries}
        else:
            scored = evaluator.evaluate(setup, evaluation, dev, str(exported.gguf), None, f"trial-{number}")
            figures = {f"dev_{mlflow_metric_name(k)}": v for k, v in scored.result.scores.items()}
        stamp = int(time.time() * 1000)
        try:
            client.log_batch(
                children[number],
                metrics=[
                    Metric(k, float(v), stamp, 0) for k, v in {**figures, "train_seconds": result.train_seconds}.items()
                ],
            )
        except Exception as error:  # noqa: BLE001 - the score is in the study; only its copy in MLflow is lost
            say(f"warning: could not log trial {number}'s dev scores to MLflow: {error}")
        return figures[f"dev_{mlflow_metric_name(metric)}"]

    def ended(outcome: TrialOutcome) -> None:
        run_id = child(outcome.number, outcome.params)
        client.set_tag(run_id, TRIAL_STATE_TAG, outcome.state)
        if outcome.note:
            client.set_tag(run_id, "cadre.trial_note", outcome.note[:5000])
        client.set_terminated(run_id, _RUN_STATUS.get(outcome.state, "FAILED"))

    name = study_name(specialist, data.fingerprint, tuning, base.identity, plan.max_steps)
    with open_evaluator(engine, cache_dir) as evaluator:  # every trial's dev cases, on the engine
        result = run_search(
            search,
            tuning,
            trials=trials,
            steps=plan.max_steps,
            storage=study_file(Path(state_dir), specialist),
            study=name,
            metric=metric,
            train=train,
            score=score,
            on_trial=ended,
            say=say,
            steps_cap=plan.max_steps if plan.budget == "smoke" else None,
        )
    stamp = int(time.time() * 1000)
    declared = result.declared
    figures = {
        "search_trials": len(result.trials),
        "search_complete": result.counts.get(COMPLETE, 0),
        "search_pruned": result.counts.get(PRUNED, 0),
        "search_failed": result.counts.get(FAILED, 0),
        "search_seconds": result.seconds,
        f"search_best_dev_{mlflow_metric_name(metric)}": result.best.dev_score,
    }
    if declared is not None and declared.dev_score is not None:
        figures[f"search_declared_dev_{mlflow_metric_name(metric)}"] = declared.dev_score
    client.log_batch(
        handle.run_id,
        metrics=[Metric(k, float(v), stamp, 0) for k, v in figures.items() if v is not None],
        params=[Param("search.study", name), Param("search.best_trial", str(result.best.number))]
        + [Param(f"search.best.{k}", str(v)) for k, v in result.best.params.items()],
    )
    client.log_text(handle.run_id, f"{result.summary()}\n\n{result.table()}\n", "search/trials.md")
    say(result.summary())
    say("\n" + result.table())
    return result
