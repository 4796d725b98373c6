"""The `learn-from-feedback` flow: user corrections → preference pairs → DPO on the champion adapter → gate → promote.

Weekly. Run it by hand with `cadre run feedback -s icd10-coder --budget smoke`.

Steps: log the resolved config → read the specialist's corrections from the feedback store that
`cadre serve` fills → with fewer than `feedback.min_pairs`, record "not enough corrections (N < min)"
and stop, promoting nothing → render each correction as a preference pair in the serving prompt
format (chosen = the correction, rejected = what the model answered) and as a case of the `feedback`
slice → DPO with trl on the champion adapter (a fresh LoRA when there is none) → export the adapter to
GGUF and log it → run the specialist with the candidate and with the champion adapter (or the base
model) on the regular test cases plus the feedback slice → decide the `feedback` gates, register the
candidate as an `adapter` version with its lineage, promote only if they pass → close the run.
A running `cadre serve` picks the new champion up at its next poll.
"""

from __future__ import annotations

from cadre.config import load_config
from cadre.config.budget import RunBudget
from cadre.evaluation.report import adapter_score_table, slice_table, split_scores
from cadre.feedback.store import store_url_for
from cadre.orchestration.run_page import finished_state
from cadre.platform.env import apply_env
from cadre.prompts.program import IndexTarget
from cadre.registry.champions import RegistryTarget, ServingSetup
from cadre.registry.promotion import Candidate
from cadre.tuning.dpo import plan_feedback
from tasks.feedback import (
    build_feedback_data,
    collect_corrections,
    export_dpo_candidate,
    feedback_run_dir,
    record_not_enough,
    train_dpo_candidate,
)
from tasks.promotion import promote_through_gates
from tasks.prompts import fetch_champion_adapter, fetch_champion_program
from tasks.refresh import evaluate_adapters, load_test_cases, prepare_base_model
from tasks.reindex import sync_live_pointer
from tasks.tracking import stage_flow, tracked_run


@stage_flow("feedback")
def learn_from_feedback(specialist: str, config_path: str, budget: RunBudget = "full") -> dict:
    """Learn the specialist's user corrections with DPO; promote the adapter only if its gate passes."""
    config = load_config(config_path)
    apply_env(config)
    settings = config.specialist(specialist)
    plan = plan_feedback(settings, budget)
    with tracked_run(config, specialist, "feedback", budget) as handle:
        outputs = [item.name for item in settings.program.outputs]
        collected = collect_corrections(handle, store_url_for(config, specialist), specialist, outputs)
        if len(collected.corrections) < settings.feedback.min_pairs:
            message = record_not_enough(handle, len(collected.corrections), settings.feedback.min_pairs)
            return finished_state(
                handle,
                {
                    "mlflow_run_id": handle.run_id,
                    "promoted": False,
                    "corrections": len(collected.corrections),
                    "summary": message,
                },
            )
        scratch = feedback_run_dir(config.state_dir, handle.run_id)
        registry = RegistryTarget(config.project.mlflow.uri, config.project.name, specialist)
        program = fetch_champion_program(registry, scratch)
        champion_gguf, champion_version = fetch_champion_adapter(registry, scratch)
        if settings.program.retrieve_k:  # the registry's index champion, installed here if it was built elsewhere
            sync_live_pointer(config, specialist)
        index = IndexTarget.from_config(config, specialist) if settings.program.retrieve_k else None
        base = prepare_base_model(config, settings.base_model)
        setup = ServingSetup(
            settings.program,
            program,
            index,
            base,
            champion_gguf,
            champion_version,
            config.project.lm.n_threads,
            config.project.lm.n_ctx,
        )
        data = build_feedback_data(handle, collected, setup, scratch)
        trained = train_dpo_candidate(
            handle,
            data,
            settings.feedback,
            settings.tuning,
            setup,
            scratch,
            plan.max_steps,
            config.project.threads.torch,
            plan.max_wall_seconds,
        )
        exported = export_dpo_candidate(handle, trained, data, base, str(config.state_dir), scratch)
        cases = (
            load_test_cases(
                str(config.resolve(settings.evaluation.suite)), plan.eval_cases, settings.program.field_names
            )
            + data.cases
        )
        scores = evaluate_adapters(
            setup,
            settings.evaluation,
            str(config.state_dir / "cache" / "dspy"),
            cases,
            str(exported.gguf),
            config.project.engine,
        )
        lineage = {
            "base_model": base.identity,
            "data_fingerprint": data.fingerprint,
            "adapter_sha256": exported.weights_sha256,
            "method": "dpo",
            "program_version": program.version if program else "declared",
            "index_version": index.version if index else "-",
            "parent_versions": f"adapter:{champion_version or '-'},program:{program.version if program else '-'}",
        }
        table = adapter_score_table(scores) + "\n\n" + slice_table(scores)
        outcome = promote_through_gates(
            config,
            specialist,
            handle,
            Candidate(
                "feedback",
                scores.candidate.result,
                scores.champion.result,  # the champion adapter, or the bare base model without one
                champion_version,
                lineage,
                identity="adapter_sha256",
                note=table,
            ),
        )
        print(table)
        print(outcome.summary())
    return finished_state(
        handle,
        {
            "mlflow_run_id": handle.run_id,
            **outcome.result_fields(),
            "corrections": len(collected.corrections),
            "pairs": trained.pairs,
            "steps": trained.steps,
            "wall_capped": trained.wall_capped,
            "train_seconds": trained.train_seconds,
            "started_from": trained.started_from,
            "champion_name": scores.champion.result.name,
            "scores": split_scores(scores),
        },
    )
