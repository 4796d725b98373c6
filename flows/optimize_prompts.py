"""The `optimize-prompts` flow: compile a specialist's DSPy program, gate it against the champion, promote.

Weekly, and after every promoted re-index (the re-index flow queues it). Run it by hand with
`cadre run optimize -s icd10-coder --budget smoke`.

Steps: log the resolved config → load the train/dev/test cases → find the champion program (and the
champion adapter the program runs on) → check the LM → compile the declared program within the
budget (train for compiling, dev for selecting) → score the champion (or, before the first
promotion, the declared program) and the candidate on the same test cases → gate → log program,
score tables, costs and gate report → register the instruction (prompt registry) and the program
(model registry) → promote only if the gate passed → close the run. An unreachable LM fails the run
after retries, with nothing promoted.
"""

from __future__ import annotations

from prefect import flow

from cadre.config import load_config
from cadre.platform.env import apply_env
from cadre.prompts.optimize import plan_optimization
from cadre.prompts.program import IndexTarget, lm_target
from tasks.prompts import (
    ProgramRuntime,
    RegistryTarget,
    cases_fingerprint,
    check_lm,
    compile_candidate,
    decide_program_gate,
    evaluate_on_test,
    fetch_champion_adapter,
    fetch_champion_program,
    load_optimization_cases,
    log_optimization,
    mark_champion_unchanged,
    promote_program,
    register_instruction_prompt,
    register_program,
    score_table_markdown,
    work_dir,
)
from tasks.tracking import close_tracking_run, open_tracking_run


@flow(name="optimize-prompts", log_prints=True)
def optimize_prompts(specialist: str, config_path: str, budget: str = "full") -> dict:
    """Compile, evaluate, gate, register and (if the gate passes) promote the specialist's program."""
    config = load_config(config_path)
    apply_env(config)
    settings = config.specialist(specialist)
    plan = plan_optimization(settings, budget)
    handle = open_tracking_run(config, specialist, "optimize", budget)
    try:
        scratch = work_dir(config.state_dir, handle.run_id)
        cases = load_optimization_cases(
            str(config.resolve(settings.evaluation.suite)), plan, settings.program.field_names
        )
        registry = RegistryTarget(config.project.mlflow.uri, config.project.name, specialist)
        champion = fetch_champion_program(registry, scratch)
        adapter_gguf, adapter_version = fetch_champion_adapter(registry, scratch)
        target = lm_target(config, adapter_gguf, adapter_version)
        index = IndexTarget.from_config(config, specialist) if settings.program.retrieve_k else None
        runtime = ProgramRuntime(target, index, str(config.state_dir / "cache" / "dspy"))
        check_lm(target)
        candidate = compile_candidate(
            settings.program, settings.evaluation, runtime, cases["train"], cases["dev"], plan, scratch
        )
        scores = evaluate_on_test(settings.program, settings.evaluation, runtime, cases["test"], champion, candidate)
        decision = decide_program_gate(settings.gates.program, scores, settings.evaluation)
        log_optimization(handle, plan, target, cases_fingerprint(cases), candidate, scores, decision)
        print(score_table_markdown(scores, candidate))
        print(decision.summary)
        if champion is not None and champion.fingerprint == candidate.fingerprint:
            outcome = {
                "event": "unchanged",
                "version": champion.version,
                "champion": champion.version,
                "promoted": False,
            }
            mark_champion_unchanged(handle, registry, champion, decision)
            print(f"the compiled program is identical to champion v{champion.version}: nothing to register")
        else:
            prompt_uri = register_instruction_prompt(handle, registry, candidate.instruction)
            lineage = {
                "config_sha256": config.sha256,
                "data_fingerprint": cases_fingerprint(cases),
                "base_model": settings.base_model,
                "program_sha256": candidate.fingerprint,
                "lm": target.identity,
                "index_version": index.version if index else "-",
                "parent_versions": f"program:{champion.version if champion else '-'},adapter:{adapter_version or '-'}",
            }
            version = register_program(handle, registry, candidate, lineage, score_table_markdown(scores, candidate))
            outcome = promote_program(handle, registry, version, decision, scores, champion, prompt_uri)
            print(f"program v{version}: {outcome['event']}; champion is v{outcome['champion']}")
    except BaseException:
        close_tracking_run(handle, "FAILED")
        raise
    close_tracking_run(handle)
    return {
        "mlflow_run_id": handle.run_id,
        "gate_passed": decision.passed,
        **outcome,
        "candidate": scores.candidate.scores,
        "baseline": scores.baseline.scores,
        "compile_lm_calls": candidate.summary.get("compile_lm_calls"),
        "test_lm_calls": {name: cost.get("lm_calls") for name, cost in scores.costs.items()},
    }
