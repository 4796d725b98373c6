"""A promoted index starts the specialist's prompt optimization, through Prefect's own machinery.

The flow that made a new index version live emits `cadre.index.promoted` for the specialist; the specialist's
optimize deployment has a trigger on that event (`cadre.orchestration.automations`, set up by `cadre deploy`), so
Prefect's automations service queues the optimize, and the Prefect UI shows the event, the automation and the run it
created. The flow then waits a little for that run to exist, so a `cadre run optimize` right after it follows the
queued run instead of starting a second one.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from prefect import get_run_logger, task

from cadre.config import CadreConfig
from cadre.config.budget import RunBudget
from cadre.orchestration.automations import emit_index_promoted
from cadre.stages import STAGE_BY_NAME

QUEUED_WITHIN_S = 30.0
"""How long the emitting flow waits for the automation's optimize run to appear."""


@task(name="announce-promoted-index", retries=2, retry_delay_seconds=5)
def announce_index_promoted(
    config: CadreConfig, specialist: str, version: str, budget: RunBudget, reason: str
) -> str | None:
    """Emit `cadre.index.promoted` and return the id of the optimize run Prefect queued for it (None if none in
    `QUEUED_WITHIN_S`: the deployment or its trigger is missing, run `cadre deploy`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterExpectedStartTime,
    )
    from prefect.exceptions import ObjectNotFound

    logger = get_run_logger()
    name = f"{STAGE_BY_NAME['optimize'].flow}/{specialist}"
    emitted = datetime.now(UTC) - timedelta(seconds=1)
    emit_index_promoted(config, specialist, version, budget, reason)
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            logger.warning("deployment %s does not exist (run `cadre deploy`); no optimize follows", name)
            return None
        deadline = time.monotonic() + QUEUED_WITHIN_S
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
                    expected_start_time=FlowRunFilterExpectedStartTime(after_=emitted),
                )
            )
            queued = [run for run in runs if run.created_by is not None and run.created >= emitted]
            if queued:
                logger.info("%s queued %s (%s)", queued[0].created_by.display_value, queued[0].name, reason)
                return str(queued[0].id)
            time.sleep(1)
    logger.warning(
        "no optimize run appeared within %.0f s of the event; is the deployment's trigger there?", QUEUED_WITHIN_S
    )
    return None
