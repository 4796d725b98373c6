"""Tasks of the prompt-optimization flow: one unit of work each, given only the config slice it needs.

Reading and writing MLflow (champion lookup, logging, the prompt registry) and probing the LM
are I/O and retried; compiling and evaluating are long, deterministic and cached, and are not.
Tasks that take DSPy programs or evaluation results skip Prefect's input hashing (`NO_CACHE`). The gate,
registration and promotion are the one promotion path every flow ends with (`tasks.promotion`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cadre.evaluation.comparison import TestScores
from cadre.evaluation.report import program_score_table
from cadre.evaluation.results import EvaluationResult, load_cases
from cadre.prompts.candidate import (
    PROGRAM_ARTIFACT,
    PROGRAM_FILE,
    CompiledCandidate,
    ProgramRuntime,
    save_candidate,
)
from cadre.prompts.optimize import (
    EvaluationRun,
    OptimizationPlan,
    choose_on_dev,
    compile_program,
    evaluate_program,
    evaluate_retrieval_only,
)
from cadre.prompts.program import (
    Budget,
    CompletionLM,
    LMTarget,
    LMUnreachable,
    SpecialistProgram,
    build_client,
    load_program,
    open_retriever,
    program_fingerprint,
    use_disk_cache,
)
from cadre.registry.champions import ChampionProgram, RegistryTarget
from cadre.registry.runs import RunHandle
from cadre.runtime.lm import LMUnavailable
from cadre.runtime.retrieval import leave_out_own

if TYPE_CHECKING:
    from cadre.config import EvaluationSettings, ProgramSettings

# ------------------------------------------------------------------------------------------- data


@task(name="load-cases")
def load_optimization_cases(
    suite_dir: str, plan: OptimizationPlan, fields: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """The train, dev and test cases the plan allows (the first N valid ones of each split, in file order);
    a case without one of the program's `fields` is skipped and counted."""
    limits = plan.case_limits()
    cases = {split: load_cases(suite_dir, split, limits[split], required=fields) for split in ("train", "dev", "test")}
    for split, found in cases.items():
        if not found:
            raise ValueError(f"{suite_dir}: the {split} split holds no usable case")
    return cases


def cases_fingerprint(cases: dict[str, list[dict[str, Any]]]) -> str:
    """sha256 of the cases a run used (ids and contents, per split)."""
    return hashlib.sha256(json.dumps(cases, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------- registry


@task(name="fetch-champion-program", retries=3, retry_delay_seconds=[2, 5, 10])
def fetch_champion_program(registry: RegistryTarget, dest: str) -> ChampionProgram | None:
    """Download the champion program's JSON, or None when no program has been promoted yet."""
    from mlflow import MlflowClient

    from cadre.registry.versions import get_champion

    client = MlflowClient(registry.tracking_uri)
    version = get_champion(client, registry.project, registry.specialist, "program")
    if version is None:
        return None
    artifact = version.tags.get("cadre.artifact_path", PROGRAM_ARTIFACT)
    folder = Path(dest) / f"champion-v{version.version}"
    folder.mkdir(parents=True, exist_ok=True)
    local = Path(client.download_artifacts(version.run_id, f"{artifact}/{PROGRAM_FILE}", str(folder)))
    return ChampionProgram(version.version, str(local), program_fingerprint(local), version.run_id)


@task(name="fetch-champion-adapter", retries=3, retry_delay_seconds=[2, 5, 10])
def fetch_champion_adapter(registry: RegistryTarget, dest: str) -> tuple[str | None, str | None]:
    """The champion LoRA adapter in GGUF form (path, version), or (None, None) without one.

    The refresh flow registers adapters; llama.cpp can apply one only in GGUF form, so a champion
    whose artifacts hold no `.gguf` file is reported and the base model is used.
    """
    from mlflow import MlflowClient

    from cadre.registry.versions import get_champion

    client = MlflowClient(registry.tracking_uri)
    version = get_champion(client, registry.project, registry.specialist, "adapter")
    if version is None:
        return None, None
    artifact = version.tags.get("cadre.artifact_path", "adapter")
    folder = Path(dest) / f"adapter-v{version.version}"
    local = Path(client.download_artifacts(version.run_id, artifact, str(folder)))
    found = sorted(local.rglob("*.gguf")) if local.is_dir() else ([local] if local.suffix == ".gguf" else [])
    if not found:
        print(f"champion adapter v{version.version} has no GGUF file; the program runs on the base model")
        return None, None
    return str(found[0]), version.version


# ---------------------------------------------------------------------------------------------- LM


@task(name="check-lm", retries=2, retry_delay_seconds=[2, 5])
def check_lm(target: LMTarget) -> float:
    """Fail the run before any work when the LM endpoint is down (returns the probe's milliseconds).

    The probe lists the endpoint's models (`GET /models`) rather than generating, so a run whose
    every completion comes from the cache makes no LM call at all. An in-process model needs no probe.
    """
    if target.kind != "endpoint":
        return 0.0
    import os
    import time

    import httpx

    headers = (
        {"Authorization": f"Bearer {os.environ[target.api_key_env]}"}
        if target.api_key_env and target.api_key_env in os.environ
        else {}
    )
    started = time.perf_counter()
    try:
        response = httpx.get(f"{(target.base_url or '').rstrip('/')}/models", headers=headers, timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise LMUnavailable(
            f"the LM at {target.describe()} is unreachable; nothing was compiled or promoted: {error}"
            f"{_local_server_hint(target)}"
        ) from error
    return (time.perf_counter() - started) * 1000.0


def _local_server_hint(target: LMTarget) -> str:
    """Where to look when the local llama.cpp server `cadre up` started stops answering (it may have died)."""
    if target.kind != "endpoint" or target.local_gguf is None:
        return ""
    return (
        ". It is the local LM server `cadre up` starts: `cadre status` shows whether it still runs, its log "
        "(logs/lm.log under the project's state_dir) why it stopped, and `cadre up` starts it again"
    )


def _lm(target: LMTarget, max_tokens: int, temperature: float, budget: Budget | None = None) -> CompletionLM:
    return CompletionLM(
        build_client(target), model_id=target.identity, max_tokens=max_tokens, temperature=temperature, budget=budget
    )


# ----------------------------------------------------------------------------------------- compile


@task(name="compile-program", cache_policy=NO_CACHE)
def compile_candidate(
    program_settings: ProgramSettings,
    evaluation: EvaluationSettings,
    runtime: ProgramRuntime,
    train: list[dict[str, Any]],
    dev: list[dict[str, Any]],
    plan: OptimizationPlan,
    out_dir: str,
) -> CompiledCandidate:
    """Compile the declared program within the plan's budget, choose its answer mode and retrieval depth on the
    dev split (`optimizer.answer_modes` × `optimizer.retrieve_k`), save it as JSON and readable Markdown."""
    use_disk_cache(runtime.cache_dir)
    retriever = open_retriever(runtime.index) if runtime.index is not None and program_settings.retrieve_k else None
    if retriever is not None and evaluation.train_cases_in_corpus:  # a train case's demo never shows its own answer
        retriever = leave_out_own(retriever, train, [item.name for item in program_settings.inputs])
    lm = _lm(runtime.lm, program_settings.max_tokens, program_settings.temperature, plan.budget())
    reflection = _reflection_lm(program_settings.optimizer.reflection_lm)
    try:
        result = compile_program(
            program_settings,
            evaluation,
            retriever,
            lm,
            train,
            dev,
            reflection_lm=reflection,
            log_dir=str(Path(out_dir) / "optimizer-logs"),
        )
        # Its own wall-time allowance, as long as the compile's: a stopped choice keeps the best try so far.
        choosing = _lm(
            runtime.lm,
            program_settings.max_tokens,
            program_settings.temperature,
            Budget(max_wall_seconds=plan.max_wall_seconds),
        )
        choices = choose_on_dev(result.program, program_settings, evaluation, choosing, dev, plan.choice_depths)
    except LMUnreachable as error:
        raise LMUnavailable(
            f"the LM at {runtime.lm.describe()} became unreachable while compiling; nothing was promoted: {error}"
            f"{_local_server_hint(runtime.lm)}"
        ) from None
    return save_candidate(result, program_settings, out_dir, choices, choosing.usage)


def _reflection_lm(model: str | None) -> Any:
    if not model:
        return None
    import dspy

    # A LiteLLM model string from pipelines.yaml. Against llama.cpp use `hosted_vllm/…`: it sends
    # max_tokens, which llama.cpp honours; `openai/…` sends max_completion_tokens, which it ignores.
    return dspy.LM(model, max_tokens=1024, temperature=1.0, cache=True)


# ---------------------------------------------------------------------------------------- evaluate


@task(name="evaluate-on-test", cache_policy=NO_CACHE)
def evaluate_on_test(
    program_settings: ProgramSettings,
    evaluation: EvaluationSettings,
    runtime: ProgramRuntime,
    test: list[dict[str, Any]],
    champion: ChampionProgram | None,
    candidate: CompiledCandidate,
) -> TestScores:
    """Score the champion (or the un-optimized program) and the candidate on the same test cases.

    The retriever's top-1 document is scored too, as the reference an LM must beat (the `beat_baseline:
    retrieval` gate rule), and, when a champion is the baseline, the declared program, so the table shows every
    system on the same cases. A candidate identical to the champion is scored once.
    """
    use_disk_cache(runtime.cache_dir)
    retriever = open_retriever(runtime.index) if runtime.index is not None and program_settings.retrieve_k else None
    lm = _lm(runtime.lm, program_settings.max_tokens, program_settings.temperature)
    baseline_program = (
        load_program(champion.path, program_settings, retriever)
        if champion
        else SpecialistProgram(program_settings, retriever)
    )
    baseline_name = f"champion-v{champion.version}" if champion else "unoptimized"
    try:
        baseline = evaluate_program(baseline_program, program_settings, evaluation, lm, test, baseline_name)
        if champion is not None and champion.fingerprint == candidate.fingerprint:
            scored = EvaluationRun(_renamed(baseline.result, "candidate"), baseline.usage, baseline.wall_seconds)
        else:
            scored = evaluate_program(
                load_program(candidate.path, program_settings, retriever),
                program_settings,
                evaluation,
                lm,
                test,
                "candidate",
            )
        declared = (
            evaluate_program(
                SpecialistProgram(program_settings, retriever), program_settings, evaluation, lm, test, "declared"
            )
            if champion is not None
            else None
        )
    except LMUnreachable as error:
        raise LMUnavailable(
            f"the LM at {runtime.lm.describe()} became unreachable while evaluating; nothing was promoted: {error}"
            f"{_local_server_hint(runtime.lm)}"
        ) from None
    reference = (
        evaluate_retrieval_only(retriever, program_settings, evaluation, test) if retriever is not None else None
    )
    configured = (
        retrieval_before_embedder_refresh(runtime, program_settings, evaluation, test)
        if retriever is not None
        else None
    )
    costs = {
        name: {**run.usage.to_metrics(), "wall_seconds": round(run.wall_seconds, 3)}
        for name, run in (
            ("baseline", baseline),
            ("candidate", scored),
            ("retrieval_only", reference),
            ("retrieval_configured", configured),
            ("declared", declared),
        )
        if run is not None
    }
    return TestScores(
        baseline.result,
        scored.result,
        reference.result if reference else None,
        champion is not None,
        costs,
        declared.result if declared else None,
        candidate.summary.get("answer_mode", program_settings.answer.mode),
        answers_are_ids=evaluation.retrieval_answer == "id",
        retrieval_configured=configured.result if configured else None,
    )


def retrieval_before_embedder_refresh(
    runtime: ProgramRuntime, program_settings: ProgramSettings, evaluation: EvaluationSettings, test: list[dict]
) -> EvaluationRun | None:
    """Retrieval alone as it was before the embedder refresh: the first hit of the newest index version the
    configured model (`project.embedding.model`) embedded, fused hybrid search, on the same cases; None while the
    live version is the configured model's own (the retrieval-only row is that) or none of its versions is kept."""
    from dataclasses import replace

    from cadre.knowledge.reindex import configured_embedder_version

    index = runtime.index
    version = configured_embedder_version(Path(index.state_dir), index.specialist, index.embedding.model)
    if version is None:
        return None
    before = open_retriever(replace(index, version=version, search_mode="hybrid"))
    run = evaluate_retrieval_only(before, program_settings, evaluation, test, name=f"retrieval-top1-{version}")
    get_run_logger().info(
        "retrieval only with the configured embedder (%s, index %s, hybrid): %s",
        index.embedding.model,
        version,
        ", ".join(f"{k} {v:.3f}" for k, v in run.result.scores.items()),
    )
    return run


def _renamed(result: EvaluationResult, name: str) -> EvaluationResult:
    from dataclasses import replace

    return replace(result, name=name)


# ----------------------------------------------------------------------------------------- logging


@task(name="log-optimization", retries=3, retry_delay_seconds=[2, 5, 10], cache_policy=NO_CACHE)
def log_optimization(
    handle: RunHandle,
    plan: OptimizationPlan,
    target: LMTarget,
    data_fingerprint: str,
    candidate: CompiledCandidate,
    scores: TestScores,
) -> None:
    """Log the program, the score tables and the costs to the flow's MLflow run (the gate report and the run's
    note come with the decision, from `tasks.promotion.promote_through_gates`)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(handle.tracking_uri)
    client.log_artifacts(handle.run_id, str(Path(candidate.path).parent), PROGRAM_ARTIFACT)
    import mlflow

    mlflow.set_tracking_uri(handle.tracking_uri)
    mlflow.log_table(scores.candidate.columns(), "evaluation/candidate_test.json", run_id=handle.run_id)
    mlflow.log_table(scores.baseline.columns(), "evaluation/baseline_test.json", run_id=handle.run_id)
    if candidate.candidates:
        mlflow.log_table(
            {key: [row[key] for row in candidate.candidates] for key in candidate.candidates[0]},
            "evaluation/dev_candidates.json",
            run_id=handle.run_id,
        )
    results = {
        "candidate": scores.candidate,
        "baseline": scores.baseline,
        "retrieval_only": scores.retrieval_only,
        "retrieval_configured": scores.retrieval_configured,
        "declared": scores.declared,
    }
    client.log_dict(
        handle.run_id,
        {name: r.to_dict() for name, r in results.items() if r is not None},
        "evaluation/test_results.json",
    )
    client.log_text(handle.run_id, program_score_table(scores, candidate.summary), "evaluation/summary.md")

    stamp = _now_ms()
    metrics = {
        **{f"candidate_{k}": v for k, v in scores.candidate.mlflow_metrics().items()},
        **{f"baseline_{k}": v for k, v in scores.baseline.mlflow_metrics().items()},
        **(
            {f"retrieval_only_{k}": v for k, v in scores.retrieval_only.mlflow_metrics().items()}
            if scores.retrieval_only
            else {}
        ),
        **({f"declared_{k}": v for k, v in scores.declared.mlflow_metrics().items()} if scores.declared else {}),
        **(
            {f"retrieval_configured_{k}": v for k, v in scores.retrieval_configured.mlflow_metrics().items()}
            if scores.retrieval_configured
            else {}
        ),
        **{f"test_{name}_{key}": value for name, cost in scores.costs.items() for key, value in cost.items()},
        **{
            k: float(v)
            for k, v in candidate.summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
        },
        "compile_stopped_by_budget": float(bool(candidate.summary.get("stopped_by_budget"))),
    }
    batch = [Metric(key, float(value), stamp, 0) for key, value in metrics.items()]
    for start in range(0, len(batch), 500):
        client.log_batch(handle.run_id, metrics=batch[start : start + 500])
    params = {
        "optimize.budget": plan.budget_name,
        "optimize.train_cases": str(plan.train_cases),
        "optimize.dev_cases": str(plan.dev_cases),
        "optimize.test_cases": str(len(scores.candidate.examples)),
        "optimize.max_lm_calls": str(plan.max_lm_calls),
        "optimize.max_wall_seconds": str(plan.max_wall_seconds),
        "optimize.lm": target.describe()[:250],
        "optimize.data_fingerprint": data_fingerprint,
        "optimize.program_sha256": candidate.fingerprint,
        "optimize.answer_mode": str(candidate.summary.get("answer_mode", "free")),
        "optimize.retrieve_k": str(candidate.summary.get("chosen_retrieve_k", "")),
        "optimize.retrieval_weight": str(candidate.summary.get("retrieval_weight") or 0),
    }
    client.log_batch(handle.run_id, params=[Param(k, v) for k, v in params.items()])


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------- prompt registry


@task(name="register-instruction-prompt", retries=3, retry_delay_seconds=[2, 5, 10], cache_policy=NO_CACHE)
def register_instruction_prompt(handle: RunHandle, registry: RegistryTarget, instruction: str) -> str:
    """Register the candidate's instruction in MLflow's prompt registry (a new version only when it changed).

    Returns:
        The prompt URI (`prompts:/<name>/<version>`), also linked to the run.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(handle.tracking_uri)
    name = prompt_name(registry)
    try:
        latest = client.search_prompt_versions(name, max_results=1)  # newest first
        current = latest[0] if latest else None
    except MlflowException:  # no such prompt yet
        current = None
    if current is None or current.template != instruction:
        current = client.register_prompt(
            name,
            instruction,
            commit_message=f"optimize-prompts run {handle.run_id}",
            tags={"cadre.specialist": registry.specialist, "cadre.run_id": handle.run_id},
        )
    client.link_prompt_version_to_run(handle.run_id, current)
    client.set_tag(handle.run_id, "cadre.prompt_uri", current.uri)
    return current.uri


def prompt_name(registry: RegistryTarget) -> str:
    """The specialist's instruction in the prompt registry: `{project}.{specialist}.instruction`."""
    return f"{registry.project}.{registry.specialist}.instruction"


@task(name="point-prompt-champion", retries=3, retry_delay_seconds=[2, 5, 10])
def point_prompt_champion(registry: RegistryTarget, prompt_uri: str) -> None:
    """After its program is promoted, point the prompt registry's `champion` alias at its instruction."""
    from mlflow import MlflowClient

    _, _, prompt_version = prompt_uri.rpartition("/")
    MlflowClient(registry.tracking_uri).set_prompt_alias(prompt_name(registry), "champion", int(prompt_version))


def work_dir(state_dir: Path, run_id: str) -> str:
    """Scratch folder of one run (program files before they are logged, downloads)."""
    folder = Path(state_dir) / "work" / "optimize" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)
