"""The `refresh-adapter` flow: (Q)LoRA fine-tune a specialist on its data, evaluate, gate, register, promote.

Monthly. Run it by hand with `cadre run refresh -s icd10-coder --budget smoke`.

Steps: log the resolved config → prepare the base model (safetensors for training, GGUF for serving)
→ find the champion program and champion adapter → render the training data exactly as the serving
program prompts (retrieval included) and log its fingerprint → if `tuning.search` is declared, search the
fine-tuning settings (Optuna trials scored on dev as the specialist serves; `tasks.search`) → train with the
declared or best-found settings with peft + trl (the best trial's adapter is reused), resuming from
the last checkpoint of the same data and config → export the adapter (PEFT + llama.cpp GGUF) and log
it with its configs and loss curve → with `tuning.decoding_dev_cases`, re-choose on dev how the program answers
with the candidate (`tasks.refresh.choose_decoding`) → run the specialist as it serves with the candidate adapter
(answering as chosen) and with the champion adapter (or the bare base model) on the same test cases → gate,
register with lineage, promote only if the gate passed; a candidate promoted answering another way brings the
program answering that way with it, through the program gates (checked before the adapter is promoted) → close
the run.
"""

from __future__ import annotations

from cadre.config import load_config
from cadre.config.budget import RunBudget
from cadre.evaluation.comparison import AdapterScores
from cadre.evaluation.report import adapter_score_table
from cadre.evaluation.results import load_cases
from cadre.orchestration.run_page import finished_state
from cadre.platform.env import apply_env
from cadre.prompts.program import IndexTarget
from cadre.registry.champions import RegistryTarget, ServingSetup
from cadre.registry.promotion import Candidate, decide_gates
from cadre.tuning.finetune import plan_refresh
from tasks.promotion import promote_through_gates
from tasks.prompts import fetch_champion_adapter, fetch_champion_program
from tasks.refresh import (
    build_refresh_data,
    choose_decoding,
    evaluate_adapters,
    export_candidate,
    load_test_cases,
    prepare_base_model,
    promote_program_beside,
    reference_scores,
    run_dir,
    train_candidate,
)
from tasks.reindex import sync_live_pointer
from tasks.search import search_hyperparameters
from tasks.tracking import stage_flow, tracked_run


@stage_flow("refresh")
def refresh_adapter(specialist: str, config_path: str, budget: RunBudget = "full") -> dict:
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
        if settings.program.retrieve_k:  # the registry's index champion, installed here if it was built elsewhere
            sync_live_pointer(config, specialist)
        index = IndexTarget.from_config(config, specialist) if settings.program.retrieve_k else None
        program = fetch_champion_program(registry, scratch)
        champion_gguf, champion_version = fetch_champion_adapter(registry, scratch)
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
        data = build_refresh_data(
            handle,
            settings.tuning,
            setup,
            suite,
            [str(config.resolve(f)) for f in settings.tuning.data],
            plan.max_examples,
            scratch,
            settings.evaluation.train_cases_in_corpus,
        )
        searched = search_hyperparameters(
            handle,
            data,
            settings.tuning,
            setup,
            settings.evaluation,
            suite,
            plan,
            str(config.state_dir),
            specialist,
            scratch,
            config.project.threads.torch,
            config.project.engine,
        )
        # The best trial's settings, whose adapter the search already trained (the candidate's training reuses it).
        tuning, steps = (searched.tuning, searched.max_steps) if searched else (settings.tuning, plan.max_steps)
        trained = train_candidate(
            handle,
            data,
            tuning,
            base,
            str(config.state_dir),
            specialist,
            steps,
            config.project.threads.torch,
            plan.max_wall_seconds,
        )
        exported = export_candidate(
            handle, trained, data, tuning, setup, str(config.state_dir), scratch, config.project.lm.n_threads
        )
        cases = load_test_cases(suite, plan.eval_cases, settings.program.field_names)
        dspy_cache = str(config.state_dir / "cache" / "dspy")
        decoding = None
        if plan.decoding_dev_cases:  # an adapter may make another answer mode pay: choose it on dev
            dev = load_cases(suite, "dev", plan.decoding_dev_cases, required=settings.program.field_names)
            decoding = choose_decoding(
                setup,
                settings.evaluation,
                dspy_cache,
                dev,
                str(exported.gguf),
                scratch,
                config.project.engine,
            )
            print(decoding.summary())

        def judge(candidate_setup: ServingSetup | None) -> AdapterScores:
            return evaluate_adapters(
                setup,
                settings.evaluation,
                dspy_cache,
                cases,
                str(exported.gguf),
                config.project.engine,
                candidate_setup,
            )

        scores = judge(decoding.setup if decoding else None)
        references = {}
        if decoding and decoding.changed:  # the pair goes together: the program must pass its gates too
            references = reference_scores(decoding.setup, settings.evaluation, cases)
            check = decide_gates(settings, "program", scores.candidate.result, scores.champion.result, references)
            if not check.passed:
                decoding = decoding.kept(setup, f"the program answering {decoding.chosen.label} would be refused")
                print(f"{decoding.kept_because} ({check.summary}); the candidate is judged answering as it serves")
                scores = judge(None)
        lineage = {
            "base_model": base.identity,
            "data_fingerprint": data.fingerprint,
            "adapter_sha256": exported.weights_sha256,
            "training_config_sha256": trained.config_hash,
            "program_version": program.version if program else "declared",
            "index_version": index.version if index else "-",
            "parent_versions": f"adapter:{champion_version or '-'},program:{program.version if program else '-'}",
            **({"answer_mode": decoding.chosen.label} if decoding else {}),
        }
        table = adapter_score_table(scores)
        if decoding:
            table = f"{table}\n\n{decoding.summary()}"
        if searched:
            table = f"{table}\n\n{searched.summary()}"
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
        program_outcome = None
        if decoding and decoding.changed and outcome.promoted:  # the adapter serves best answering another way
            program_outcome = promote_program_beside(
                config, specialist, handle, decoding, scores, lineage, outcome.version, references
            )
            print(program_outcome.summary())
    return finished_state(
        handle,
        {
            "mlflow_run_id": handle.run_id,
            **outcome.result_fields(),
            "steps": trained.global_step,
            "resumed_from_step": trained.resumed_from_step,
            "wall_capped": trained.wall_capped,
            "train_seconds": trained.train_seconds,
            "data_fingerprint": data.fingerprint,
            "search": searched.summary() if searched else None,
            "candidate": scores.candidate.result.scores,
            "champion": scores.champion.result.scores,
            "champion_name": scores.champion.result.name,
            "answer_mode": decoding.chosen.label if decoding else None,
            "program": program_outcome.result_fields() if program_outcome else None,
        },
    )
