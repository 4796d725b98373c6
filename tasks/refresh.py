"""Tasks of the adapter-refresh flow: one unit of work each, given only the config slice it needs.

Order in the flow: prepare the base model → build the training data → train (resumable) → export the
adapter (PEFT + GGUF) and log it → evaluate candidate and champion as the specialist runs; the flow
then ends in the one promotion path (`tasks.promotion`): gate, register, promote. Writing to MLflow is
I/O and retried; training and evaluating are long and deterministic and are not (a retried training
resumes from its checkpoint anyway). Tasks that take large objects (training data, evaluation results)
skip Prefect's input hashing (`NO_CACHE`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cadre.config.budget import WALL_CAP_TAG
from cadre.config.program import CANDIDATE_MODES
from cadre.evaluation.comparison import AdapterScores
from cadre.evaluation.results import load_cases
from cadre.prompts.optimize import AnswerChoice
from cadre.prompts.program import SpecialistProgram, open_retriever
from cadre.prompts.served import ServedEvaluator, open_evaluator
from cadre.registry.champions import ChampionProgram, ServingSetup
from cadre.registry.runs import RunHandle, log_dataset
from cadre.runtime.base_model import BaseModelFiles, base_model_files
from cadre.runtime.prompt import PromptSpec
from cadre.runtime.retrieval import candidate_ids, context_retriever, leave_out_own
from cadre.runtime.serving_prompt import read_serving_prompt
from cadre.stages import stage
from cadre.tuning.adapter_export import (
    ExportedAdapter,
    export_adapter,
    verify_gguf_adapter,
)
from cadre.tuning.finetune import (
    TrainingResult,
    train_adapter,
    training_config_hash,
    wall_cap_message,
    work_dir,
)
from cadre.tuning.loss_curve import write_loss_curve
from cadre.tuning.training_data import (
    TrainingData,
    build_training_data,
    read_records,
    token_counter,
    training_sources,
)

if TYPE_CHECKING:
    from cadre.config import CadreConfig, EvaluationSettings, TuningSettings
    from cadre.config.project import EngineSettings
    from cadre.evaluation.results import EvaluationResult
    from cadre.registry.promotion import PromotionOutcome

ADAPTER_ARTIFACT = stage("refresh").artifact_path
"""Artifact folder of a run that holds the adapter (what the registry version points at)."""
GGUF_CHECK_PROMPTS = 4


# ---------------------------------------------------------------------------------------- model


@task(name="prepare-base-model")
def prepare_base_model(config: CadreConfig, base_model: str) -> BaseModelFiles:
    """The base model as safetensors and as GGUF, prepared once and cached under the state dir."""
    return base_model_files(config, base_model)


# ----------------------------------------------------------------------------------------- data


@task(name="build-training-data", cache_policy=NO_CACHE)
def build_refresh_data(
    handle: RunHandle,
    tuning: TuningSettings,
    setup: ServingSetup,
    suite_dir: str,
    data_files: list[str],
    max_examples: int | None,
    out_dir: str,
    train_cases_in_corpus: bool = False,
) -> TrainingData:
    """Render the specialist's training examples exactly as its program prompts, and log fingerprint and counts.

    The suite's train split (if `from_eval_train`) and the `tuning.data` files are read; the prompts
    carry the passages the program retrieves from the live index and the serving program's
    instruction and demos. With `train_cases_in_corpus` (`evaluation.train_cases_in_corpus`) a record never
    retrieves the document with its own id (`leave_out_own`), as a served request never finds itself.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from transformers import AutoTokenizer

    program_settings, base, champion_program = setup.program_settings, setup.base, setup.program
    if program_settings.module != "predict":
        raise ValueError(
            f"the adapter refresh trains `predict` programs; a {program_settings.module} program's prompts need reasoning "
            "traces the training data does not have (set program.module: predict or skip this flow)"
        )
    prompt = read_serving_prompt(program_settings, champion_program.path if champion_program else None)
    sources = training_sources(Path(suite_dir), [Path(f) for f in data_files], tuning.from_eval_train)
    records, skipped = read_records(sources)
    retrieve = answer_ids = None
    if prompt.spec.context_field:
        names = [item.name for item in program_settings.inputs]
        search = open_retriever(setup.index)  # searches each query once: both readers below share it
        if train_cases_in_corpus:
            search = leave_out_own(search, (record.values for record in records), names)
        retrieve = context_retriever(search, names, prompt.retrieve_k, prompt.passage_format)
        # Train on what serves: a program choosing among ids learns only from records whose id it could answer (any
        # other id would be an invented code). One choosing among titles (answers, e.g. a pronunciation) learns from
        # every record: the right answer is rarely a neighbour's, and learning to say it ranks the closest one first.
        if prompt.answer_mode in CANDIDATE_MODES and prompt.choose_from == "id":
            answer_ids = candidate_ids(search, names, prompt.retrieve_k)

    started = time.perf_counter()
    data = build_training_data(
        records,
        prompt.spec,
        count_tokens=token_counter(AutoTokenizer.from_pretrained(base.hf_dir)),
        max_length=tuning.max_length,
        heldout_fraction=tuning.heldout_fraction,
        seed=tuning.seed,
        retrieve=retrieve,
        demos=prompt.demos,
        instruction=prompt.instruction,
        max_examples=max_examples,
        skipped=skipped,
        answer_ids=answer_ids,
    )
    seconds = time.perf_counter() - started
    print(
        f"training data: {data.counts['train']} train / {data.counts['heldout']} held-out examples from {len(sources)} file(s) "
        f"({data.counts['invalid']} invalid, {data.counts['duplicates']} duplicates, "
        f"{data.counts['ungrounded']} whose answer is not among the candidates, {data.counts['too_long']} too long, "
        f"{data.counts['capped']} beyond the step budget) in {seconds:.0f} s; fingerprint {data.fingerprint[:16]}"
    )

    client = MlflowClient(handle.tracking_uri)
    stamp = int(time.time() * 1000)
    client.log_batch(
        handle.run_id,
        metrics=[Metric(f"data_{k}", float(v), stamp, 0) for k, v in data.counts.items()]
        + [Metric("data_seconds", seconds, stamp, 0)],
        params=[
            Param("data.fingerprint", data.fingerprint),
            Param("data.sources", json.dumps([str(s) for s in sources])[:500]),
            Param("data.prompt_program", f"champion v{champion_program.version}" if champion_program else "declared"),
        ],
    )
    client.set_tag(handle.run_id, "cadre.data_fingerprint", data.fingerprint)
    log_dataset(handle, "training_data", "training", data.fingerprint, [str(s) for s in sources])
    folder = Path(out_dir) / "data"
    data.write_jsonl(folder / "training_data.jsonl")
    (folder / "skipped.json").write_text(json.dumps([vars(s) for s in data.skipped[:1000]], indent=1))
    client.log_artifacts(handle.run_id, str(folder), "data")
    return data


# ------------------------------------------------------------------------------------- training


class MlflowSink:
    """Streams step metrics to the flow's run; a failed logging call is reported, never fatal to training."""

    def __init__(self, handle: RunHandle, say: Callable[[str], None]):
        from mlflow import MlflowClient

        self.client, self.run_id, self.say = MlflowClient(handle.tracking_uri), handle.run_id, say
        self.steps: set[int] = set()
        self.failures = 0

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        try:
            self.client.log_batch(
                self.run_id,
                metrics=[Metric(f"train/{key}", float(value), stamp, step) for key, value in metrics.items()],
            )
            if "loss" in metrics:
                self.steps.add(step)
        except Exception as error:  # noqa: BLE001 - losing a metric point must not lose an hour of training
            self.failures += 1
            if self.failures <= 3:
                self.say(f"warning: could not log step {step} to MLflow: {error}")

    def backfill(self, curve: list[dict[str, float]], stamp: int) -> list[Any]:
        """The `train/*` points of the curve's steps this sink did not log: steps trained by an earlier process
        (a reused or resumed adapter) or lost to a failed logging call."""
        from mlflow.entities import Metric

        return [
            Metric(f"train/{key}", float(value), stamp, int(row["step"]))
            for row in curve
            if int(row["step"]) not in self.steps
            for key, value in row.items()
            if key != "step"
        ]


@task(name="train-adapter", cache_policy=NO_CACHE, log_prints=False)
def train_candidate(
    handle: RunHandle,
    data: TrainingData,
    tuning: TuningSettings,
    base: BaseModelFiles,
    state_dir: str,
    specialist: str,
    max_steps: int | None,
    threads: int,
    max_wall_seconds: float | None = None,
) -> TrainingResult:
    """Fine-tune the candidate adapter, resuming from this data's and config's last checkpoint if one exists.

    Under a wall-time cap (the smoke budget) training stops at the first step past it; that step's adapter is
    the candidate, the run's `WALL_CAP_TAG` says so, and the next run resumes from that step.

    Step metrics stream to the run; steps trained by an earlier, interrupted run (before the
    checkpoint) are filled in afterwards from the trainer's history, so the run's curve is complete.
    Progress goes to the task's logger: `log_prints` is off here because `datasets` fingerprints its
    map functions with dill, which disassembles them to stdout, and those lines would flood the log.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from prefect import get_run_logger

    say = get_run_logger().info

    config_hash = training_config_hash(tuning, base.identity, max_steps)
    folder = work_dir(Path(state_dir), specialist, data.fingerprint, config_hash)
    say(
        f"training {tuning.method} (r={tuning.rank}, alpha={tuning.alpha}) on {base.name} for "
        f"{max_steps if max_steps is not None else f'{tuning.epochs} epochs of'} steps; checkpoints in {folder}"
    )
    sink = MlflowSink(handle, say)
    result = train_adapter(
        data,
        tuning,
        base_model_dir=Path(base.hf_dir),
        work_dir=folder,
        max_steps=max_steps,
        threads=threads,
        sink=sink,
        say=say,
        config_hash=config_hash,
        max_wall_seconds=max_wall_seconds,
    )

    client = MlflowClient(handle.tracking_uri)
    stamp = int(time.time() * 1000)
    backfill = sink.backfill(result.loss_curve, stamp)
    summary = {
        "train_mean_loss": result.train_loss,
        "heldout_loss": result.heldout_loss,
        "train_seconds": result.train_seconds,
        "train_seconds_per_step": result.seconds_per_step,
        "train_tokens_per_second": result.tokens_per_second,
        "train_global_step": result.global_step,
        "train_resumed_from_step": result.resumed_from_step,
        "train_peak_rss_mb": result.peak_rss_mb,
        "train_trainable_parameters": result.trainable_parameters,
    }
    metrics = backfill + [Metric(k, float(v), stamp, result.global_step) for k, v in summary.items() if v is not None]
    for start in range(0, len(metrics), 500):
        client.log_batch(handle.run_id, metrics=metrics[start : start + 500])
    params = {
        "train.method": result.method,
        "train.device": result.device,
        "train.precision": result.precision,
        "train.max_steps": str(result.max_steps),
        "train.config_hash": config_hash,
        "train.reused": str(result.reused).lower(),
        "train.base_model": base.identity,
        "train.max_wall_seconds": str(max_wall_seconds),
    }
    client.log_batch(handle.run_id, params=[Param(k, v) for k, v in params.items()])
    if result.wall_capped:
        message = wall_cap_message(
            "training",
            result.global_step,
            result.max_steps,
            max_wall_seconds,
            "; the next run with the same data and settings resumes there",
        )
        client.set_tag(handle.run_id, WALL_CAP_TAG, message)
    if result.method == "qlora" and result.device == "cpu":
        say("note: this was QLoRA on CPU — a 4-bit nf4 base through bitsandbytes' CPU backend, fp32 compute")
    where = (
        "reused"
        if result.reused
        else (f"resumed at step {result.resumed_from_step}" if result.resumed_from_step else "trained")
    )
    say(
        f"adapter {where}: {result.global_step} steps on {result.device}/{result.precision}, {result.train_seconds:.0f} s, "
        f"final loss {result.loss_curve[-1]['loss'] if result.loss_curve else float('nan'):.4f}, held-out loss {result.heldout_loss}"
    )
    return result


# --------------------------------------------------------------------------------------- export


@task(name="export-adapter", cache_policy=NO_CACHE)
def export_candidate(
    handle: RunHandle,
    result: TrainingResult,
    data: TrainingData,
    tuning: TuningSettings,
    setup: ServingSetup,
    state_dir: str,
    out_dir: str,
    threads: int,
) -> ExportedAdapter:
    """Write the adapter artifact (PEFT + GGUF + configs), check the GGUF answers like the PEFT adapter, log it.

    The artifact folder holds `adapter_model.safetensors`, `adapter_config.json`, `adapter.gguf`,
    `training_config.json` (what was trained, on what) and `training_result.json`; the loss curve
    goes to `training/` as a table, a CSV and a plot.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    base = setup.base
    exported = export_adapter(result.adapter_dir, Path(base.hf_dir), Path(out_dir) / ADAPTER_ARTIFACT, Path(state_dir))
    training_config = {
        "tuning": tuning.model_dump(mode="json"),
        "max_steps": result.max_steps,
        "base_model": base.identity,
        "data_fingerprint": data.fingerprint,
        "config_hash": result.config_hash,
        "method": result.method,
        "device": result.device,
        "precision": result.precision,
        "data_counts": data.counts,
    }
    (exported.folder / "training_config.json").write_text(json.dumps(training_config, indent=2))
    (exported.folder / "training_result.json").write_text(json.dumps(result.to_dict(), indent=2))

    prompts = [e.prompt for e in (data.heldout + data.train)[:GGUF_CHECK_PROMPTS]]
    check = verify_gguf_adapter(
        exported.folder,
        Path(base.hf_dir),
        exported.gguf,
        Path(base.gguf),
        prompts,
        max_tokens=setup.program_settings.max_tokens,
        stop=PromptSpec.from_settings(setup.program_settings).stop,
        threads=threads,
    )
    print(
        f"GGUF adapter vs PEFT adapter: {check.agreement:.0%} identical greedy answers on {check.prompts} prompts {check.pairs}"
    )
    if check.agreement < 0.5:
        print(
            "warning: the GGUF adapter answers differently from the PEFT adapter on most prompts; the gate will judge the GGUF one"
        )

    client = MlflowClient(handle.tracking_uri)
    client.log_artifacts(handle.run_id, str(exported.folder), ADAPTER_ARTIFACT)
    training = Path(out_dir) / "training"
    write_loss_curve(result.loss_curve, training, heldout_loss=result.heldout_loss)
    client.log_artifacts(handle.run_id, str(training), "training")
    stamp = int(time.time() * 1000)
    client.log_batch(
        handle.run_id,
        metrics=[
            Metric("gguf_peft_agreement", check.agreement, stamp, 0),
            Metric("gguf_conversion_seconds", exported.conversion_seconds, stamp, 0),
            Metric("adapter_gguf_mb", exported.gguf.stat().st_size / 1e6, stamp, 0),
        ],
    )
    return exported


# ----------------------------------------------------------------------------------- evaluation


@task(name="load-test-cases")
def load_test_cases(suite_dir: str, limit: int | None, fields: list[str]) -> list[dict[str, Any]]:
    """The test split's first `limit` valid cases (the same cases for candidate and champion); a case without one
    of the program's `fields` is skipped and counted."""
    cases = load_cases(suite_dir, "test", limit, required=fields)
    if not cases:
        raise ValueError(f"{suite_dir}: the test split holds no usable case")
    return cases


@task(name="evaluate-adapters", cache_policy=NO_CACHE)
def evaluate_adapters(
    setup: ServingSetup,
    evaluation: EvaluationSettings,
    cache_dir: str,
    cases: list[dict[str, Any]],
    candidate_gguf: str,
    engine: EngineSettings | None = None,
    candidate_setup: ServingSetup | None = None,
) -> AdapterScores:
    """Run the specialist as it serves — its program, retrieval from the live index, llama.cpp on the GGUF base —
    once with the candidate adapter and once with the champion adapter (or none), on the same cases.

    Both run on the same engine and base file, so the adapter is the only difference: in this process, or in shards
    on the Dask cluster of `project.engine` (`cadre.prompts.served`). With `candidate_setup` (the answer mode
    re-chosen for the candidate on dev, `choose_decoding`) the candidate answers that way; the champion always
    answers as it serves.
    """
    champion_name = f"adapter-v{setup.adapter_version}" if setup.adapter_gguf else "base-model"
    with open_evaluator(engine, cache_dir) as evaluator:
        champion = evaluator.evaluate(
            setup, evaluation, cases, setup.adapter_gguf, setup.adapter_version, champion_name
        )
        candidate = evaluator.evaluate(
            candidate_setup or setup, evaluation, cases, candidate_gguf, None, "candidate-adapter"
        )
    return AdapterScores(candidate=candidate, champion=champion, champion_is_adapter=setup.adapter_gguf is not None)


@dataclass(frozen=True)
class CandidateDecoding:
    """How the candidate adapter answers: as the serving program does, or as re-chosen for it on dev.

    Attributes:
        setup: the serving setup the candidate is judged with (the serving one, or its program answering as chosen).
        changed: the chosen answer differs from the serving program's; `folder` then holds that program.
        tried: every answer mode (and weight) scored on dev, the serving one first.
        folder: the program folder (`program.json`, `settings.json`, `program.md`) to register beside a promoted
            adapter; None when nothing changed.
        chosen_at: the position in `tried` of the try the candidate answers with (0: the serving one).
        kept_because: why the serving answer mode was kept although another scored better on dev.
    """

    setup: ServingSetup
    changed: bool
    tried: list[AnswerChoice]
    folder: str | None = None
    chosen_at: int = 0
    kept_because: str = ""

    def kept(self, serving: ServingSetup, because: str) -> CandidateDecoding:
        """The candidate answering as the program serves after all (the re-chosen program would be refused)."""
        return CandidateDecoding(serving, False, self.tried, kept_because=because)

    @property
    def chosen(self) -> AnswerChoice:
        """The try the candidate answers with."""
        return self.tried[self.chosen_at]

    def summary(self) -> str:
        """One line per try, for the run's note."""
        if not self.tried:
            return ""
        cases = self.tried[0].cases
        rows = "\n".join(
            f"| {choice.label}{' (serving)' if index == 0 else ''} | {choice.score:.3f} |"
            for index, choice in enumerate(self.tried)
        )
        verdict = (
            "re-chosen for the candidate"
            if self.changed
            else f"kept: {self.kept_because or 'the serving answer mode is best'}"
        )
        return f"Answer mode on {cases} dev cases with the candidate adapter ({verdict}):\n\n| answer | score |\n|---|---|\n{rows}"


@task(name="choose-decoding", cache_policy=NO_CACHE)
def choose_decoding(
    setup: ServingSetup,
    evaluation: EvaluationSettings,
    cache_dir: str,
    dev_cases: list[dict[str, Any]],
    candidate_gguf: str,
    out_dir: str,
    engine: EngineSettings | None = None,
    evaluator: ServedEvaluator | None = None,
) -> CandidateDecoding:
    """Choose on dev how the program answers with the candidate adapter (`tuning.decoding_dev_cases`).

    Each of `program.optimizer.answer_modes` (with each of `retrieval_weights` for `score`) is tried at the serving
    depth, the serving program's instruction and demos unchanged: the adapter was trained on exactly those prompts.
    The serving answer mode is tried first and kept on a tie. The candidate is then judged on test answering the
    chosen way, and the flow promotes the program answering that way beside the adapter. The search scores each
    trial's adapter this way too (`evaluator`: the one it holds open, else one on `engine` for this call).
    """
    from cadre.prompts.candidate import PROGRAM_ARTIFACT, PROGRAM_FILE, write_program_folder
    from cadre.prompts.program import load_program, save_program

    def never_searched(query: str, k: int) -> list[Any]:
        raise RuntimeError("choosing an answer mode saves programs; it never runs their retrieval here")

    settings = setup.program_settings
    search = never_searched if settings.retrieve_k else None
    serving = read_serving_prompt(settings, setup.program_path)
    here = (
        serving.answer_mode,
        serving.retrieve_k,
        serving.retrieval_weight if serving.answer_mode == "score" else 0.0,
    )
    plan = [here, *(item for item in settings.decoding_plan([serving.retrieve_k]) if item != here)]
    metric = evaluation.answer_metrics[0]
    tried: list[AnswerChoice] = []
    programs: list[SpecialistProgram] = []
    setups: list[ServingSetup] = []
    with nullcontext(evaluator) if evaluator else open_evaluator(engine, cache_dir) as evaluator:
        for mode, depth, weight in plan:
            program = (
                load_program(setup.program_path, settings, search)
                if setup.program_path
                else SpecialistProgram(settings, search)
            ).choose(mode, depth, weight)
            label = f"{mode}-k{depth}" + (f"-w{weight:g}" if mode == "score" else "")
            path = Path(out_dir) / "decodings" / label / PROGRAM_FILE
            fingerprint = save_program(program, path)
            version = setup.program.version if setup.program else "declared"
            chosen = dataclasses.replace(
                setup, program=ChampionProgram(f"{version}+{label}", str(path), fingerprint, None)
            )
            run = evaluator.evaluate(chosen, evaluation, dev_cases, candidate_gguf, None, f"dev-{label}")
            result = run.result
            tried.append(
                AnswerChoice(
                    mode, depth, result.scores.get(metric, 0.0), result.intervals.get(metric), result.cases, 0.0, weight
                )
            )
            programs.append(program)
            setups.append(chosen)
    best = max(range(len(tried)), key=lambda i: (tried[i].score, -i))
    if best == 0:
        return CandidateDecoding(setup, False, tried)
    folder = Path(out_dir) / PROGRAM_ARTIFACT
    title = f"Program of adapter refresh: answers {tried[best].label}, chosen on dev with the candidate adapter"
    write_program_folder(programs[best], settings, folder, title)
    return CandidateDecoding(setups[best], True, tried, str(folder), best)


def reference_scores(
    setup: ServingSetup, evaluation: EvaluationSettings, cases: list[dict[str, Any]]
) -> dict[str, EvaluationResult]:
    """The reference systems a program's `beat_baseline` rules name, on these cases: `retrieval` (the first
    retrieved document's id, or title) when the program retrieves."""
    from cadre.prompts.optimize import evaluate_retrieval_only

    if setup.index is None or not setup.program_settings.retrieve_k:
        return {}
    retriever = open_retriever(setup.index)
    return {"retrieval": evaluate_retrieval_only(retriever, setup.program_settings, evaluation, cases).result}


def promote_program_beside(
    config: CadreConfig,
    specialist: str,
    handle: RunHandle,
    decoding: CandidateDecoding,
    scores: AdapterScores,
    lineage: dict[str, str],
    adapter_version: str,
    baselines: dict[str, EvaluationResult],
) -> PromotionOutcome:
    """Promote the program answering as chosen for the adapter just promoted (`choose_decoding`), through the
    program gates: the pair (this program, the new adapter) against the pair that served, on the same test cases,
    and against `baselines` (`reference_scores`). The flow checked these gates before it promoted the adapter, so
    the pair goes together; the new adapter serves with the previous program only between the two promotions.
    """
    from mlflow import MlflowClient

    from cadre.prompts.candidate import PROGRAM_ARTIFACT
    from cadre.registry.promotion import Candidate
    from tasks.promotion import promote_through_gates

    setup = decoding.setup
    if decoding.folder is None or setup.program is None:
        raise ValueError("the answer mode was not re-chosen for the candidate: there is no program to promote")
    MlflowClient(handle.tracking_uri).log_artifacts(handle.run_id, decoding.folder, PROGRAM_ARTIFACT)
    champion = lineage.get("program_version")
    return promote_through_gates(
        config,
        specialist,
        handle,
        Candidate(
            "optimize",
            scores.candidate.result,
            scores.champion.result,
            None if champion in (None, "declared") else champion,
            {
                **{key: value for key, value in lineage.items() if key != "adapter_sha256"},
                "program_sha256": setup.program.fingerprint,
                "parent_versions": f"program:{champion or '-'},adapter:{adapter_version}",
            },
            identity="program_sha256",
            note=f"The program answering as chosen for adapter v{adapter_version}.\n\n{decoding.summary()}",
            scores_logged=True,
            baselines=baselines,
            on_run=False,
        ),
    )


def run_dir(state_dir: Path, run_id: str) -> str:
    """Scratch folder of one refresh run (exported adapter, data dump, downloads)."""
    folder = Path(state_dir) / "work" / "refresh" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)
