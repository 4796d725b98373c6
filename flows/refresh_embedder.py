"""The `refresh-embedder` flow: fine-tune a specialist's embedding model, re-embed its corpus, gate, promote.

Run: `cadre run embedder -s SPECIALIST [--budget smoke]` (or on its schedule, `schedules.embedder`).

Steps: log the resolved config → sync the live index with the registry → find the champion embedder (the model
of the live index) → build training pairs from the train split, hard negatives mined from the live index → fine-tune
with sentence-transformers (resuming a killed training, reusing a finished one) → re-embed the corpus with the
candidate through the re-index engine into a new version beside the live one → fit that version's learned ranking
(`search_mode: learned`) → evaluate retrieval on the test split,
candidate version against the live one, same cases → gate (`gates.embedder`), register, promote → on promotion the
re-embedded version passes the index gates, becomes the `index` champion and goes live (blue/green: the pointer
moves only now, to a complete version); a promoted embedder queues the prompt optimization, as a re-index does.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.runtime import flow_run

from cadre.config import load_config
from cadre.config.budget import ReindexPlan, RunBudget
from cadre.orchestration.run_page import finished_state
from cadre.platform.env import apply_env
from cadre.registry.promotion import Candidate
from cadre.tuning.embedder import plan_embedder
from tasks.embedder import (
    build_candidate_index,
    build_embedder_pairs,
    log_candidate_embedder,
    promote_reembedded_index,
    resolve_champion_embedder,
    train_candidate_embedder,
)
from tasks.promotion import find_champion_version, promote_through_gates
from tasks.reindex import evaluate_retrieval, fit_index_ranker, make_live, sync_live_pointer
from tasks.tracking import stage_flow, tracked_run
from tasks.triggers import announce_index_promoted


@stage_flow("embedder")
def refresh_embedder(
    specialist: str, config_path: str, budget: RunBudget = "full", trigger_optimize: bool = True
) -> dict:
    """Fine-tune, re-embed, evaluate, gate, register and (if the gates pass) promote the specialist's embedder."""
    config = load_config(config_path)
    apply_env(config)
    logger = get_run_logger()
    settings = config.specialist(specialist)
    plan = plan_embedder(settings, budget)
    with tracked_run(config, specialist, "embedder", budget) as handle:
        live = sync_live_pointer(config, specialist)
        if live is None:
            raise RuntimeError(
                f"{specialist} has no live index to mine negatives from and compare with; run reindex first"
            )
        champion_version = find_champion_version(config, specialist, "embedder")
        index_champion = find_champion_version(config, specialist, "reindex")
        base = resolve_champion_embedder(config, specialist)
        pairs = build_embedder_pairs(handle, config, specialist, plan, live)
        trained = train_candidate_embedder(handle, config, specialist, pairs, base, plan)
        built = build_candidate_index(config, specialist, trained, plan)
        log_candidate_embedder(handle, trained, built)
        cases = ReindexPlan(budget, plan.max_documents, plan.eval_cases)
        ranker = fit_index_ranker(config, specialist, built.version, cases, handle)
        candidate = evaluate_retrieval(config, specialist, built.version, cases, "candidate")
        champion = evaluate_retrieval(config, specialist, live, cases, "champion", cases_of=built.version)
        lineage = {
            "data_fingerprint": trained.data_fingerprint,
            "embedder_fingerprint": trained.fingerprint,
            "embedder_path": trained.model_dir,
            "training_config_sha256": trained.config_hash,
            "base_embedder": base.model_ref,
            "index_version": built.version or "",
            "corpus_fingerprint": built.corpus_fingerprint,
            "parent_versions": f"embedder:{champion_version or '-'},index:{live}",
        }
        outcome = promote_through_gates(
            config,
            specialist,
            handle,
            Candidate("embedder", candidate, champion, champion_version, lineage, identity="embedder_fingerprint"),
        )
        print(outcome.summary())
        live_now = live
        if outcome.promoted:
            index_outcome = promote_reembedded_index(
                config, specialist, handle, built, candidate, champion, index_champion, outcome.version, budget
            )
            print(index_outcome.summary())
            if index_outcome.promoted:
                make_live(config, specialist, built.version, settings.index.retention)
                live_now = built.version
            else:
                logger.warning(
                    "embedder v%s is champion but its index %s failed the index gates: the live index keeps %s",
                    outcome.version,
                    built.version,
                    live,
                )
    if live_now != live and trigger_optimize:
        announce_index_promoted(
            config,
            specialist,
            live_now,
            budget,
            reason=f"index {built.version} re-embedded by embedder v{outcome.version}, promoted by {flow_run.get_name()}",
        )
    return finished_state(
        handle,
        {
            "mlflow_run_id": handle.run_id,
            **outcome.result_fields(),
            "index_version": built.version,
            "live": live_now,
            "train_pairs": len(pairs),
            "steps": trained.steps,
            "train_seconds": trained.train_seconds,
            "reused_training": trained.reused,
            "reembed_seconds": built.durations_s.get("total", 0.0),
            "ranker": ranker,
            "candidate": candidate.scores if candidate else {},
            "champion": champion.scores if champion else {},
        },
    )
