"""The daily re-index flow: keep a specialist's knowledge current, incrementally, behind a retrieval gate.

Loads the sources, embeds only new or changed chunks into a new index version beside the live one
(a killed run resumes), evaluates retrieval on the new and the live version with the same cases,
and makes the new version live only if the index gates pass. A promoted re-index triggers the prompt
optimization flow, since the program's retrieved context changed.

Run: `cadre run reindex -s SPECIALIST [--budget smoke]` (or on its daily schedule).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from cadre.config import load_config
from cadre.platform.env import apply_env
from tasks.promotion import promote_through_gates
from tasks.reindex import (
    build_index_version,
    evaluate_retrieval,
    log_reindex_result,
    make_live,
    sync_live_pointer,
)
from tasks.tracking import close_tracking_run, open_tracking_run
from tasks.triggers import trigger_flow


@flow(name="reindex", log_prints=True)
def reindex(specialist: str, config_path: str, budget: str = "full", trigger_optimize: bool = True) -> dict:
    """Re-index one specialist; returns what changed and what the gate decided."""
    config = load_config(config_path)
    apply_env(config)
    logger = get_run_logger()
    settings = config.specialist(specialist)
    handle = open_tracking_run(config, specialist, "reindex", budget)
    live = sync_live_pointer(config, specialist)

    result = build_index_version(config, specialist, budget)
    log_reindex_result(handle, result)
    if not result.created_version:
        logger.info("no source changed since version %s: nothing embedded, nothing to promote", live)
        close_tracking_run(handle)
        return {"changed": False, "live": live}

    candidate = evaluate_retrieval(config, specialist, result.version, budget, "candidate")
    champion = evaluate_retrieval(
        config, specialist, live, budget, "champion", cases_of=result.version
    )  # the same cases
    outcome = promote_through_gates(
        config,
        specialist,
        "index",
        handle,
        candidate,
        champion,
        lineage={
            "corpus_fingerprint": result.corpus_fingerprint,
            "index_key": result.index_key,
            "parent_versions": live or "",
            "index_version": result.version,
        },
    )
    dropped = []
    if outcome.promoted:
        dropped = make_live(config, specialist, result.version, settings.index.retention)
    close_tracking_run(handle)
    print(outcome.summary() + (f"; pruned {len(dropped)} old version(s)" if dropped else ""))
    if outcome.promoted and trigger_optimize:
        trigger_flow(
            config, "optimize", specialist, budget, reason=f"index {result.version} promoted by {flow_run.get_name()}"
        )
    return {"changed": True, "version": result.version, "promoted": outcome.promoted, "gate": outcome.decision.summary}
