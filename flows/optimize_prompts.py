"""The `optimize-prompts` flow: compile a specialist's DSPy program, gate it against the champion, promote.

Weekly, and after every promoted re-index (the re-index flow queues it). Run it by hand with
`cadre run optimize -s icd10-coder --budget smoke`.

Steps: log the resolved config → load the train/dev/test cases → find the champion program (and the
champion adapter the program runs on) → check the LM → compile the declared program within the
budget (train for compiling, dev for selecting; then the answer mode and retrieval depth on dev) → score
the champion (or, before the first promotion, the declared program), the candidate and retrieval alone (the
first hit's id, which a `beat_baseline: retrieval` gate rule judges against) on the same test cases → log program, score
tables and costs → register the instruction (prompt registry) → gate, register the program (model
registry), promote only if the gate passed (the one promotion path) → point the prompt's `champion`
alias at a promoted instruction → close the run. A compiled program identical to the champion is
judged but registers nothing. An unreachable LM fails the run after retries, with nothing promoted.
"""

from __future__ import annotations

from cadre.config import load_config
from cadre.config.budget import RunBudget
from cadre.evaluation.report import program_score_table
from cadre.orchestration.run_page import finished_state
from cadre.platform.env import apply_env
from cadre.prompts.candidate import ProgramRuntime
from cadre.prompts.optimize import plan_optimization
from cadre.prompts.program import IndexTarget, lm_target
from cadre.registry.champions import RegistryTarget
from cadre.registry.promotion import Candidate
from tasks.promotion import promote_through_gates
from tasks.prompts import (
    cases_fingerprint,
    check_lm,
    compile_candidate,
    evaluate_on_test,
    fetch_champion_adapter,
    fetch_champion_program,
    load_optimization_cases,
    log_optimization,
    point_prompt_champion,
    register_instruction_prompt,
    work_dir,
)
from tasks.reindex import sync_live_pointer
from tasks.tracking import log_case_splits, stage_flow, tracked_run


@stage_flow("optimize")
def optimize_prompts(specialist: str, config_path: str, budget: RunBudget = "full") -> dict:
    """Compile, evaluate, gate, register and (if the gate passes) promote the specialist's program."""
    config = load_config(config_path)
    apply_env(config)
    settings = config.specialist(specialist)
    plan = plan_optimization(settings, budget)
    with tracked_run(config, specialist, "optimize", budget) as handle:
        scratch = work_dir(config.state_dir, handle.run_id)
        cases = load_optimization_cases(
            str(config.resolve(settings.evaluation.suite)), plan, settings.program.field_names
        )
        log_case_splits(handle, str(config.resolve(settings.evaluation.suite)), cases)
        registry = RegistryTarget(config.project.mlflow.uri, config.project.name, specialist)
        champion = fetch_champion_program(registry, scratch)
        adapter_gguf, adapter_version = fetch_champion_adapter(registry, scratch)
        target = lm_target(config, adapter_gguf, adapter_version)
        if settings.program.retrieve_k:  # the registry's index champion, installed here if it was built elsewhere
            sync_live_pointer(config, specialist)
        index = IndexTarget.from_config(config, specialist) if settings.program.retrieve_k else None
        runtime = ProgramRuntime(target, index, str(config.state_dir / "cache" / "dspy"))
        check_lm(target)
        candidate = compile_candidate(
            settings.program, settings.evaluation, runtime, cases["train"], cases["dev"], plan, scratch
        )
        scores = evaluate_on_test(settings.program, settings.evaluation, runtime, cases["test"], champion, candidate)
        log_optimization(handle, plan, target, cases_fingerprint(cases), candidate, scores)
        table = program_score_table(scores, candidate.summary)
        print(table)
        same_as_champion = champion is not None and champion.fingerprint == candidate.fingerprint
        prompt_uri = None if same_as_champion else register_instruction_prompt(handle, registry, candidate.instruction)
        lineage = {
            "config_sha256": config.sha256,
            "data_fingerprint": cases_fingerprint(cases),
            "base_model": settings.base_model,
            "program_sha256": candidate.fingerprint,
            "lm": target.identity,
            "index_version": index.version if index else "-",
            "parent_versions": f"program:{champion.version if champion else '-'},adapter:{adapter_version or '-'}",
        }
        outcome = promote_through_gates(
            config,
            specialist,
            handle,
            Candidate(
                "optimize",
                scores.candidate,
                scores.baseline,  # the champion, or the declared program that serves without one
                champion.version if champion else None,
                lineage,
                identity="program_sha256",
                note=table,
                same_as_champion=same_as_champion,
                scores_logged=True,
                baselines=scores.baselines,
            ),
        )
        if outcome.promoted and prompt_uri:
            point_prompt_champion(registry, prompt_uri)
        print(outcome.summary())
    return finished_state(
        handle,
        {
            "mlflow_run_id": handle.run_id,
            **outcome.result_fields(),
            "candidate": scores.candidate.scores,
            "baseline": scores.baseline.scores,
            "compile_lm_calls": candidate.summary.get("compile_lm_calls"),
            "test_lm_calls": {name: cost.get("lm_calls") for name, cost in scores.costs.items()},
        },
    )
