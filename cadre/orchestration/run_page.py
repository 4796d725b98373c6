"""What a flow run's page in the Prefect UI shows: its summary artifact and a final state that says the verdict.

A gated flow (re-index, optimize, refresh, learn from feedback) ends in a Completed state named for what its gates
decided (`Promoted`, `Refused`, `Unchanged`, `Passed`), with the verdict line as the state's message, so the Prefect
runs list tells a refused run from a promoted one without opening it. The summary artifact (verdict, links to the
MLflow run and the registry version, the run's note) is created in the flow run's own context, so the flow run's
Artifacts tab lists it. Both read the MLflow run's tags (`cadre.registry.runs.verdict_word`).
"""

from __future__ import annotations

import re
from typing import Any

from cadre.registry.runs import RunHandle, run_summary_markdown, run_verdict, verdict_word

SUMMARY_KEY = "cadre-summary"


def publish_summary(handle: RunHandle) -> None:
    """Attach the run's summary to the current Prefect flow run (call it from the flow, not from a task)."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        run_summary_markdown(handle.tracking_uri, handle.run_id),
        key=SUMMARY_KEY,
        description="What this run decided, with links to its MLflow run and registry version",
    )


def verdict_state(tags: dict[str, str], result: Any):
    """A Completed state named for the verdict in `tags`, carrying `result`; plain Completed for an ungated run."""
    from prefect.states import Completed

    word = verdict_word(tags)
    if not word:
        return Completed(data=result)
    line = re.sub(r"\[/?[a-z ]+\]", "", run_verdict(tags))
    version = tags.get("cadre.candidate_version", "")
    if version:
        name, _, number = version.rpartition("/")
        line = f"{name} v{number}: {line}"
    return Completed(data=result, name=word.capitalize(), message=line[:500])


def finished_state(handle: RunHandle, result: Any):
    """What a gated flow returns: its result inside a state named for its verdict (see `verdict_state`).

    Calling the flow as a function still returns `result`. If MLflow cannot be read, the state is plain Completed.
    """
    from mlflow import MlflowClient

    try:
        tags = MlflowClient(handle.tracking_uri).get_run(handle.run_id).data.tags
    except Exception:  # the verdict is decoration; the run's result must not be lost to it
        tags = {}
    return verdict_state(tags, result)
