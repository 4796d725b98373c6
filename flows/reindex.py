"""The daily re-index flow: keep a specialist's knowledge current, incrementally, behind a retrieval gate.

Loads the sources, embeds only new or changed chunks into a new index version beside the live one
(a killed run resumes), fits the version's learned ranking where `search_mode: learned`, evaluates retrieval on the new and the live version with the same cases,
and makes the new version live only if the index gates pass. A promoted re-index triggers the prompt
optimization flow, since the program's retrieved context changed.

Run: `cadre run reindex -s SPECIALIST [--budget smoke]` (or on its daily schedule).
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.runtime import flow_run

from cadre.config import load_config
from cadre.config.budget import RunBudget, plan_reindex
from cadre.orchestration.run_page import finished_state
from cadre.platform.env import apply_env
from cadre.registry.promotion import Candidate
from tasks.promotion import find_champion_version, promote_through_gates
from tasks.reindex import (
    build_index_version,
    evaluate_retrieval,
    fit_index_ranker,
    log_reindex_result,
    make_live,
    sync_live_pointer,
)
from tasks.tracking import stage_flow, tracked_run
from tasks.triggers import announce_index_promoted


@stage_flow("reindex")
def reindex(specialist: str, config_path: str, budget: RunBudget = "full", trigger_optimize: bool = True) -> dict:
    """Re-index one specialist; returns what changed and what the gate decided."""
    config = load_config(config_path)
    apply_env(config)
    logger = get_run_logger()
    settings = config.specialist(specialist)
    plan = plan_reindex(settings, budget)
    with tracked_run(config, specialist, "reindex", budget) as handle:
        live = sync_live_pointer(config, specialist)
        champion_version = find_champion_version(config, specialist, "reindex")
        result = build_index_version(config, specialist, plan)
        log_reindex_result(handle, result)
        if result.wall_capped:  # an unfinished build: never evaluated, never live; the next run resumes it
            logger.info(result.wall_cap_note)
            return {"changed": True, "version": result.version, "promoted": False, "wall_capped": True, "live": live}
        if not result.created_version:
            logger.info("no source changed since version %s: nothing embedded, nothing to promote", live)
            return finished_state(handle, {"changed": False, "live": live})

        ranker = fit_index_ranker(config, specialist, result.version, plan, handle)
        candidate = evaluate_retrieval(config, specialist, result.version, plan, "candidate")
        champion = evaluate_retrieval(config, specialist, live, plan, "champion", cases_of=result.version)
        lineage = {
            "corpus_fingerprint": result.corpus_fingerprint,
            "index_key": result.index_key,
            "parent_versions": live or "",
            "index_version": result.version,
        }
        outcome = promote_through_gates(
            config, specialist, handle, Candidate("reindex", candidate, champion, champion_version, lineage)
        )
        dropped = make_live(config, specialist, result.version, settings.index.retention) if outcome.promoted else []
    print(outcome.summary() + (f"; pruned {len(dropped)} old version(s)" if dropped else ""))
    if outcome.promoted and trigger_optimize:
        announce_index_promoted(
            config,
            specialist,
            result.version,
            budget,
            reason=f"index {result.version} promoted by {flow_run.get_name()}",
        )
    return finished_state(
        handle,
        {
            "changed": True,
            "version": result.version,
            "promoted": outcome.promoted,
            "gate": outcome.decision.summary,
            "ranker": ranker,
        },
    )
