"""The `refresh-adapter` flow: (Q)LoRA fine-tune a specialist on its data, evaluate, gate, register, promote.

Monthly. Run it by hand with `cadre run refresh -s icd10-coder --budget smoke`.

Steps: log the resolved config → prepare the base model (safetensors for training, GGUF for serving)
→ find the champion program and champion adapter → render the training data exactly as the serving
program prompts (retrieval included) and log its fingerprint → train with peft + trl, resuming from
the last checkpoint of the same data and config → export the adapter (PEFT + llama.cpp GGUF) and log
it with its configs and loss curve → run the specialist as it serves with the candidate adapter and
with the champion adapter (or the bare base model) on the same test cases → gate, register with
lineage, promote only if the gate passed → close the run.
"""

from __future__ import annotations

from prefect import flow

from cadre.config import load_config
from cadre.platform.env import apply_env
from cadre.prompts.program import IndexTarget
from cadre.registry.promotion import Candidate
from cadre.runtime.prompt import PromptSpec
from cadre.stages import stage
from cadre.tuning.finetune import plan_refresh
from tasks.promotion import promote_through_gates
from tasks.prompts import RegistryTarget, fetch_champion_adapter, fetch_champion_program
from tasks.refresh import (
    build_refresh_data,
    evaluate_adapters,
    export_candidate,
    load_test_cases,
    prepare_base_model,
    run_dir,
    score_table,
    train_candidate,
)
from tasks.tracking import tracked_run


@flow(name=stage("refresh").flow, log_prints=True)
def refresh_adapter(specialist: str, config_path: str, budget: str = "full") -> dict:
    """Fine-tune, evaluate, gate, register and (if the gate passes) promote the specialist's LoRA adapter."""
    config = load_config(config_path)
    apply_env(config)
    settings = config.specialist(specialist)
    plan = plan_refresh(settings, budget)
    with tracked_run(config, specialist, "refresh", budget) as handle:
        scratch = run_dir(config.state_dir, handle.run_id)
        suite = str(config.resolve(settings.evaluation.suite))
        registry = RegistryTarget(config.project.mlflow.uri, config.project.name, specialist)
        base = prepare_base_model(config, settings.base_model)
        index = IndexTarget.from_config(config, specialist) if settings.program.retrieve_k else None
        program = fetch_champion_program(registry, scratch)
        champion_gguf, champion_version = fetch_champion_adapter(registry, scratch)
        data = build_refresh_data(
            handle,
            settings.tuning,
            settings.program,
            suite,
            [str(config.resolve(f)) for f in settings.tuning.data],
            base,
            index,
            program,
            plan.max_examples,
            scratch,
        )
        trained = train_candidate(
            handle,
            data,
            settings.tuning,
            base,
            str(config.state_dir),
            specialist,
            plan.max_steps,
            config.project.threads.torch,
        )
        exported = export_candidate(
            handle,
            trained,
            data,
            settings.tuning,
            base,
            str(config.state_dir),
            scratch,
            settings.program.max_tokens,
            PromptSpec.from_settings(settings.program).stop,
            config.project.lm.n_threads,
        )
        cases = load_test_cases(suite, plan.eval_cases, settings.program.field_names)
        scores = evaluate_adapters(
            settings.program,
            settings.evaluation,
            index,
            str(config.state_dir / "cache" / "dspy"),
            cases,
            base,
            str(exported.gguf),
            champion_gguf,
            champion_version,
            program,
            config.project.lm.n_threads,
            config.project.lm.n_ctx,
        )
        lineage = {
            "base_model": base.identity,
            "data_fingerprint": data.fingerprint,
            "adapter_sha256": exported.weights_sha256,
            "training_config_sha256": trained.config_hash,
            "program_version": program.version if program else "declared",
            "index_version": index.version if index else "-",
            "parent_versions": f"adapter:{champion_version or '-'},program:{program.version if program else '-'}",
        }
        table = score_table(scores)
        outcome = promote_through_gates(
            config,
            specialist,
            handle,
            Candidate(
                "refresh",
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
    return {
        "mlflow_run_id": handle.run_id,
        "version": outcome.version,
        "promoted": outcome.promoted,
        "gate_passed": outcome.decision.passed,
        "summary": outcome.decision.summary,
        "steps": trained.global_step,
        "resumed_from_step": trained.resumed_from_step,
        "train_seconds": trained.train_seconds,
        "data_fingerprint": data.fingerprint,
        "candidate": scores.candidate.result.scores,
        "champion": scores.champion.result.scores,
        "champion_name": scores.champion.result.name,
    }
