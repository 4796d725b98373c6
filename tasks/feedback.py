"""Tasks of the learn-from-feedback flow: one unit of work each, given only the config slice it needs.

Order in the flow: read the corrections from the feedback store → render them as preference pairs and
`feedback`-slice cases → DPO on the champion adapter → export (PEFT + GGUF) and log → evaluate candidate
and champion on the test split plus the feedback slice; the flow then ends in the one promotion path
(`tasks.promotion`): gate (`feedback` rules), register, promote.
Reading the store and writing MLflow are I/O and retried; training and evaluating are not. Tasks that
take large objects skip Prefect's input hashing (`NO_CACHE`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from cadre.config.budget import WALL_CAP_TAG
from cadre.feedback.store import (
    Correction,
    PreferencePair,
    corrections,
    feedback_cases,
    open_store,
    preference_pairs,
)
from cadre.jsonl import write_jsonl
from cadre.prompts.program import open_retriever
from cadre.registry.champions import ServingSetup
from cadre.registry.runs import RunHandle, log_dataset
from cadre.runtime.base_model import BaseModelFiles
from cadre.runtime.retrieval import context_retriever
from cadre.runtime.serving_prompt import read_serving_prompt
from cadre.stages import stage
from cadre.tuning.adapter_export import ExportedAdapter, export_adapter
from cadre.tuning.dpo import DPOResult, train_dpo
from cadre.tuning.finetune import wall_cap_message

ADAPTER_ARTIFACT = stage("feedback").artifact_path
"""Artifact folder of a run that holds the adapter (what the registry version points at)."""

if TYPE_CHECKING:
    from cadre.config import FeedbackSettings, TuningSettings


@dataclass(frozen=True)
class CollectedCorrections:
    """The usable corrections of a specialist and what was left out."""

    corrections: list[Correction]
    counts: dict[str, int]


@task(name="collect-corrections", retries=3, retry_delay_seconds=[2, 5, 10], cache_policy=NO_CACHE)
def collect_corrections(
    handle: RunHandle, store_url: str, specialist: str, output_names: list[str]
) -> CollectedCorrections:
    """Every usable correction of the specialist in the feedback store (latest per distinct input), counted and logged."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    read = open_store(store_url).read_feedback(specialist)
    found, counts = corrections(read.records, output_names)
    counts["corrections"] = len(found)
    counts["unusable_rows"] = len(read.skipped)  # rows that break the store's rules; each is logged with why
    stamp = int(time.time() * 1000)
    MlflowClient(handle.tracking_uri).log_batch(
        handle.run_id, metrics=[Metric(f"feedback_{k}", float(v), stamp, 0) for k, v in counts.items()]
    )
    print(
        f"feedback store: {counts['records']} feedback record(s) for {specialist}, {len(found)} usable correction(s) "
        f"({counts['without_correction']} ratings without a correction, {counts['same_as_answer']} equal to the answer, "
        f"{counts['superseded']} superseded by a later correction of the same input)"
        + (f"; {len(read.skipped)} unusable row(s) skipped" if read.skipped else "")
    )
    return CollectedCorrections(found, counts)


@task(name="record-not-enough-corrections", retries=3, retry_delay_seconds=[2, 5, 10])
def record_not_enough(handle: RunHandle, found: int, needed: int) -> str:
    """Say and record that there were too few corrections to learn from; nothing is trained or promoted."""
    from mlflow import MlflowClient

    message = f"not enough corrections ({found} < {needed}); nothing was trained or promoted"
    client = MlflowClient(handle.tracking_uri)
    client.set_tag(handle.run_id, "cadre.outcome", "not_enough_corrections")
    client.set_tag(handle.run_id, "mlflow.note.content", message)
    print(message)
    return message


@dataclass(frozen=True)
class FeedbackData:
    """The preference pairs and the feedback-slice cases of one run, with a fingerprint over both."""

    pairs: list[PreferencePair]
    cases: list[dict[str, Any]]
    fingerprint: str


@task(name="build-preference-pairs", cache_policy=NO_CACHE)
def build_feedback_data(
    handle: RunHandle,
    collected: CollectedCorrections,
    setup: ServingSetup,
    out_dir: str,
) -> FeedbackData:
    """Render the corrections as the serving program prompts them (champion instruction and demos, live retrieval),
    and as evaluation cases of the `feedback` slice; log both as artifacts."""
    from mlflow import MlflowClient

    program_settings, champion_program = setup.program_settings, setup.program
    prompt = read_serving_prompt(program_settings, setup.program_path)
    retrieve = None
    if prompt.spec.context_field:
        names = [item.name for item in program_settings.inputs]
        retrieve = context_retriever(open_retriever(setup.index), names, prompt.retrieve_k, prompt.passage_format)

    outputs = [item.name for item in program_settings.outputs]
    pairs = preference_pairs(
        collected.corrections, prompt.spec, retrieve=retrieve, demos=prompt.demos, instruction=prompt.instruction
    )
    cases = feedback_cases(collected.corrections, outputs)
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(f"{pair.prompt}\x00{pair.chosen}\x00{pair.rejected}\x01".encode())
    folder = Path(out_dir) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    # Atomic, and every row checked before a byte is written (cadre.jsonl): an artifact is whole or absent.
    write_jsonl(folder / "preference_pairs.jsonl", (asdict(pair) for pair in pairs))
    write_jsonl(folder / "feedback_cases.jsonl", cases)
    client = MlflowClient(handle.tracking_uri)
    client.log_artifacts(handle.run_id, str(folder), "data")
    client.set_tag(handle.run_id, "cadre.data_fingerprint", digest.hexdigest())
    log_dataset(handle, "preference_pairs", "training", digest.hexdigest(), str(folder / "preference_pairs.jsonl"))
    print(
        f"{len(pairs)} preference pair(s) rendered with the {'champion' if champion_program else 'declared'} program; "
        f"{len(cases)} case(s) in the feedback slice"
    )
    return FeedbackData(pairs, cases, digest.hexdigest())


# log_prints off: while trl prepares the dataset, datasets' function fingerprinting prints bytecode listings, which
# would flood the run's log; this task reports through the run logger instead.
@task(name="train-dpo", cache_policy=NO_CACHE, log_prints=False)
def train_dpo_candidate(
    handle: RunHandle,
    data: FeedbackData,
    feedback: FeedbackSettings,
    tuning: TuningSettings,
    setup: ServingSetup,
    out_dir: str,
    max_steps: int,
    threads: int,
    max_wall_seconds: float | None = None,
) -> DPOResult:
    """DPO on the champion adapter (its PEFT files sit beside its GGUF), or on a fresh LoRA without one; step metrics to MLflow.

    Under a wall-time cap (the smoke budget) DPO stops at the first step past it, that step's adapter is the
    candidate, and the run's `WALL_CAP_TAG` says so."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from prefect.logging import get_run_logger

    say = get_run_logger().info
    client = MlflowClient(handle.tracking_uri)
    champion_dir = None
    if setup.adapter_gguf is not None:
        folder = Path(setup.adapter_gguf).parent
        if (folder / "adapter_model.safetensors").exists() and (folder / "adapter_config.json").exists():
            champion_dir = folder
        else:
            say(
                f"the champion adapter in {folder} has no PEFT files to continue from; DPO starts a fresh LoRA on the base model"
            )

    def sink(metrics: dict[str, float], step: int) -> None:
        say(
            f"DPO step {step}/{max_steps}: loss {metrics.get('loss', float('nan')):.4f}, "
            f"reward accuracy {metrics.get('rewards/accuracies', float('nan')):.2f}, margin {metrics.get('rewards/margins', float('nan')):.2f}"
        )
        stamp = int(time.time() * 1000)
        try:
            client.log_batch(
                handle.run_id, metrics=[Metric(f"dpo/{key}", value, stamp, step) for key, value in metrics.items()]
            )
        except Exception as error:  # noqa: BLE001 - a lost metric point must not lose the training
            say(f"warning: could not log DPO step {step}: {error}")

    say(
        f"DPO ({'on the champion adapter' if champion_dir else 'fresh LoRA on the base model'}) for {max_steps} steps on "
        f"{len(data.pairs)} pair(s), beta {feedback.beta}, learning rate {feedback.learning_rate:g}"
    )
    result = train_dpo(
        data.pairs,
        feedback,
        tuning,
        base_model_dir=Path(setup.base.hf_dir),
        champion_adapter_dir=champion_dir,
        work_dir=Path(out_dir) / "dpo",
        max_steps=max_steps,
        threads=threads,
        sink=sink,
        max_wall_seconds=max_wall_seconds,
    )
    stamp = int(time.time() * 1000)
    summary = {
        "dpo_steps": result.steps,
        "dpo_pairs": result.pairs,
        "dpo_dropped_too_long": result.dropped_too_long,
        "dpo_train_seconds": result.train_seconds,
        "dpo_seconds_per_step": result.seconds_per_step,
        "dpo_peak_rss_mb": result.peak_rss_mb,
    }
    if result.final_reward_accuracy is not None:
        summary["dpo_final_reward_accuracy"] = result.final_reward_accuracy
    client.log_batch(
        handle.run_id,
        metrics=[Metric(k, float(v), stamp, 0) for k, v in summary.items()],
        params=[
            Param("dpo.started_from", result.started_from),
            Param("dpo.loss", "+".join(result.loss_types)),
            Param("dpo.device", result.device),
            Param("dpo.precision", result.precision),
            Param("dpo.max_steps", str(max_steps)),
            Param("dpo.max_wall_seconds", str(max_wall_seconds)),
        ],
    )
    if result.wall_capped:
        message = wall_cap_message("DPO", result.steps, max_steps, max_wall_seconds, "")
        client.set_tag(handle.run_id, WALL_CAP_TAG, message)
        say(message)
    if result.device == "cpu" and tuning.method == "qlora":
        say(
            "note: DPO trains plain LoRA on the fp32 base (its reference forwards on a 4-bit base would lose gradients)"
        )
    say(
        f"DPO done: {result.steps} steps in {result.train_seconds:.0f} s ({result.seconds_per_step:.1f} s/step), "
        f"final loss {result.loss_curve[-1]['loss'] if result.loss_curve else float('nan'):.4f}, "
        f"reward accuracy {result.final_reward_accuracy}"
    )
    return result


@task(name="export-dpo-adapter", cache_policy=NO_CACHE)
def export_dpo_candidate(
    handle: RunHandle, result: DPOResult, data: FeedbackData, base: BaseModelFiles, state_dir: str, out_dir: str
) -> ExportedAdapter:
    """Export the candidate (PEFT + llama.cpp GGUF) with how it was made, and log it as the run's `adapter` artifact."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    exported = export_adapter(result.adapter_dir, Path(base.hf_dir), Path(out_dir) / ADAPTER_ARTIFACT, Path(state_dir))
    (exported.folder / "training_config.json").write_text(
        json.dumps(
            {
                "method": "dpo",
                "started_from": result.started_from,
                "loss_types": list(result.loss_types),
                "steps": result.steps,
                "pairs": result.pairs,
                "data_fingerprint": data.fingerprint,
                "base_model": base.identity,
            },
            indent=2,
        )
    )
    (exported.folder / "training_result.json").write_text(json.dumps(result.to_dict(), indent=2))
    client = MlflowClient(handle.tracking_uri)
    client.log_artifacts(handle.run_id, str(exported.folder), ADAPTER_ARTIFACT)
    stamp = int(time.time() * 1000)
    client.log_batch(
        handle.run_id,
        metrics=[
            Metric("gguf_conversion_seconds", exported.conversion_seconds, stamp, 0),
            Metric("adapter_gguf_mb", exported.gguf.stat().st_size / 1e6, stamp, 0),
        ],
    )
    return exported


def feedback_run_dir(state_dir: Path, run_id: str) -> str:
    """Scratch folder of one learn-from-feedback run (downloads, pairs, trainer output, the exported adapter)."""
    folder = Path(state_dir) / "work" / "feedback" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)
