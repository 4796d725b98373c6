"""MLflow runs for Cadre's flows: one run per flow run, resolved config logged before any work.

Every flow opens its run with `open_run`, which records the validated specialist config, the
pipelines.yaml hash, the code version and the Prefect flow-run id (so `cadre run` and a reviewer can
go from a Prefect run to its MLflow run and back). Tasks log to the run by id through `MlflowClient`,
which is safe from any thread.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadre.config import CadreConfig
from cadre.config.budget import WALL_CAP_TAG

TAG_SPECIALIST = "cadre.specialist"
TAG_FLOW = "cadre.flow"
TAG_FLOW_RUN = "cadre.prefect_flow_run_id"
TAG_BUDGET = "cadre.budget"
TAG_CONFIG_SHA = "cadre.pipelines_sha256"
TAG_CODE = "cadre.code_version"


def experiment_name(config: CadreConfig, specialist: str) -> str:
    return f"{config.project.name}/{specialist}"


def code_version() -> str:
    """The git commit of the checkout Cadre runs from (`+dirty` if tracked files changed), else its package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        # --no-optional-locks: reading the status must never write the index of a shared checkout.
        status = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{sha}+dirty" if status else sha
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"cadre=={version('cadre')}"
        except PackageNotFoundError:
            return "unknown"


@dataclass(frozen=True)
class RunHandle:
    """Identifies the MLflow run of one flow run."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    @property
    def url(self) -> str:
        return f"{self.tracking_uri}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def open_run(config: CadreConfig, specialist: str, flow: str, budget: str, flow_run_id: str | None) -> RunHandle:
    """Create the MLflow run of a flow run and log the resolved config first.

    Args:
        config: the validated pipelines file.
        specialist: the specialist the flow works for.
        flow: flow kind (reindex, optimize, refresh, feedback, check).
        budget: `smoke` or `full`.
        flow_run_id: the Prefect flow-run id, recorded as a tag.
    """
    from mlflow import MlflowClient

    client = MlflowClient(config.project.mlflow.uri)
    name = experiment_name(config, specialist)
    experiment = client.get_experiment_by_name(name)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(name, tags={TAG_SPECIALIST: specialist})
    )
    settings = config.specialist(specialist)
    tags = {
        TAG_SPECIALIST: specialist,
        TAG_FLOW: flow,
        TAG_BUDGET: budget,
        TAG_CONFIG_SHA: config.sha256,
        TAG_CODE: code_version(),
        "mlflow.runName": f"{flow}-{budget}",
    }
    if flow_run_id:
        tags[TAG_FLOW_RUN] = flow_run_id
        tags["cadre.prefect_flow_run_url"] = f"{config.project.prefect.ui}/runs/flow-run/{flow_run_id}"
    run = client.create_run(experiment_id, tags=tags)
    run_id = run.info.run_id
    resolved = {"project": config.project.model_dump(mode="json"), "specialist": settings.model_dump(mode="json")}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "resolved_config.json"
        path.write_text(json.dumps(resolved, indent=2))
        client.log_artifact(run_id, str(path), artifact_path="config")
    from mlflow.entities import Param

    params = [Param(key, value) for key, value in flatten(settings.model_dump(mode="json")).items()]
    for start in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=params[start : start + 100])
    return RunHandle(run_id=run_id, experiment_id=experiment_id, tracking_uri=config.project.mlflow.uri)


def close_run(handle: RunHandle, status: str = "FINISHED") -> None:
    from mlflow import MlflowClient

    MlflowClient(handle.tracking_uri).set_terminated(handle.run_id, status=status)


def find_run(tracking_uri: str, flow_run_id: str):
    """The MLflow run a Prefect flow run logged to, or None."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(experiments, filter_string=f"tags.`{TAG_FLOW_RUN}` = '{flow_run_id}'", max_results=1)
    return runs[0] if runs else None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested settings into `a.b.c` → short string params (lists and long texts are summarised)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            text = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
            out[name] = text if len(text) <= 250 else text[:247] + "..."
    return out


def run_verdict(tags: dict[str, str]) -> str:
    """One line on what the run's gate decided, from the tags the flows set."""
    if tags.get("cadre.outcome") == "not_enough_corrections":
        return "nothing to learn: not enough corrections yet"
    if tags.get("cadre.outcome") == "unchanged":
        return "no source changed: nothing embedded, no candidate, the champion index stays"
    gate, promoted = tags.get("cadre.gate"), tags.get("cadre.promoted")
    if gate is None and promoted is None:
        return ""
    if tags.get("cadre.already_champion") == "true":
        if tags.get("cadre.gate") == "refused":  # the champion itself, judged on today's cases, fails an absolute rule
            return "[yellow]the candidate is the champion itself; it stays, though its gates no longer pass (see the run's note)[/yellow]"
        version = tags.get("cadre.candidate_version", "").rpartition("/")[2]
        return f"[green]gate passed: the candidate is the champion already{f' (v{version})' if version else ''}; nothing moved[/green]"
    if promoted == "true" or (promoted is None and gate == "passed"):
        return "[green]gate passed: the candidate is the new champion[/green]"
    if gate == "passed":
        return "gate passed; the champion did not move (see the run's note)"
    return "[yellow]gate refused: the champion is unchanged (the run's note and the version's description say why)[/yellow]"


def run_summary_markdown(tracking_uri: str, run_id: str) -> str:
    """What a finished flow run did, as Markdown for its page in the Prefect UI: the verdict, links to its MLflow
    run and to the registry version it judged, and the run's note (score tables and gate report)."""
    import re

    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri).get_run(run_id)
    tags = run.data.tags
    verdict = re.sub(r"\[/?[a-z ]+\]", "", run_verdict(tags)) or f"run {run.info.status.lower()}"
    lines = [
        f"### {tags.get('cadre.flow', 'flow')} · {tags.get('cadre.specialist', '')}: {verdict}",
        "",
        f"- MLflow run: [{run_id[:12]}]({tracking_uri}/#/experiments/{run.info.experiment_id}/runs/{run_id})",
    ]
    if tags.get("cadre.candidate_version"):
        name, _, version = tags["cadre.candidate_version"].rpartition("/")
        lines.append(
            f"- registry: [{name} v{version}]({tracking_uri}/#/models/{name}/versions/{version}) "
            "(its description is the gate report)"
        )
    if tags.get(WALL_CAP_TAG):
        lines.append(f"- budget: {tags[WALL_CAP_TAG]}")
    if tags.get("mlflow.note.content"):
        lines += ["", tags["mlflow.note.content"]]
    return "\n".join(lines)


SKIP_METRICS = {
    "data_invalid": "invalid training records",
    "data_too_long": "training examples over max_length",
    "feedback_incomplete": "incomplete feedback records",
}
"""Counters of input a flow skipped, besides the `skipped_<reason>` counts of the re-index."""


def skipped_summary(metrics: dict[str, float]) -> str:
    """One line on the bad input a run skipped and counted (empty when it skipped nothing)."""
    parts = [
        f"{reason.replace('_', ' ')} {value:.0f}"
        for name, value in sorted(metrics.items())
        if value > 0 and (reason := name.removeprefix("skipped_")) != name
    ]
    parts += [f"{label} {metrics[name]:.0f}" for name, label in SKIP_METRICS.items() if metrics.get(name, 0) > 0]
    return f"bad input skipped and counted: {', '.join(parts)} (examples in the run's report)" if parts else ""
