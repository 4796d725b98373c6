"""Starting one flow from another (a promoted re-index starts the prompt optimization)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from cadre.config import CadreConfig
from cadre.config.budget import RunBudget
from cadre.stages import STAGE_BY_NAME


@task(name="trigger-follow-up-flow", retries=2, retry_delay_seconds=5)
def trigger_flow(config: CadreConfig, kind: str, specialist: str, budget: RunBudget, reason: str) -> str | None:
    """Queue `kind` for the specialist through its deployment (does not wait); returns the flow-run id."""
    logger = get_run_logger()
    if kind not in STAGE_BY_NAME:
        logger.info("%s flow not available; nothing triggered", kind)
        return None
    name = f"{STAGE_BY_NAME[kind].flow}/{specialist}"
    try:
        run = run_deployment(
            name, parameters={"budget": budget}, timeout=0, as_subflow=False, tags=["trigger:flow"], flow_run_name=None
        )
    except ObjectNotFound:
        logger.warning("deployment %s does not exist (run `cadre deploy`); nothing triggered", name)
        return None
    logger.info("queued %s (%s): %s", name, reason, run.id)
    return str(run.id)
