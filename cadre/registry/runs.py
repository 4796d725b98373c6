"""MLflow runs for Cadre's flows: one run per flow run, resolved config logged before any work.

Every flow opens its run with `open_run`, which records the validated specialist config, the
pipelines.yaml hash, the code version and the Prefect flow-run id (so `cadre run` and a reviewer can
go from a Prefect run to its MLflow run and back). Tasks log to the run by id through `MlflowClient`,
which is safe from any thread.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadre.config import CadreConfig
from cadre.config.budget import WALL_CAP_TAG

TAG_SPECIALIST = "cadre.specialist"
TAG_FLOW = "cadre.flow"
TAG_FLOW_RUN = "cadre.prefect_flow_run_id"
TAG_FLOW_RUN_URL = "cadre.prefect_flow_run_url"
TAG_BUDGET = "cadre.budget"
TAG_CONFIG_SHA = "cadre.pipelines_sha256"
TAG_CODE = "cadre.code_version"
TAG_VERDICT = "verdict"
"""What the run's gates decided, in one word (`promoted`, `refused`, `unchanged`, `passed`), or how it ended
(`failed`, `killed`): a column of MLflow's runs list, set when the run closes."""

GIT_COMMIT_TAG = "mlflow.source.git.commit"
"""MLflow's standard tag for the code a run ran (the run page links it)."""

EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"
"""MLflow 3's UI opens an experiment by this tag: Cadre's experiments are model development, shown as runs (without
it the UI may infer a GenAI experiment and open an empty traces view)."""

TRAINING_FLOWS = ("refresh", "feedback")
"""Flows that train weights: their runs record system metrics (CPU, memory, GPU) while they run."""


UI_VIEW = "?workflowType=machine_learning"
"""Appended to MLflow UI links: MLflow 3's UI shows an experiment as GenAI (traces, judges) or model training (runs,
models) by this query parameter or the reader's last choice, not by `mlflow.experimentKind`; Cadre's links open the
model-training view, where runs, their verdicts and datasets are listed."""


def ui_url(tracking_uri: str, path: str) -> str:
    """An MLflow UI page (`experiments/1/runs/abc`, `models/x/versions/3`) in the model-training view."""
    return f"{tracking_uri}/#/{path}{UI_VIEW}"


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
        return ui_url(self.tracking_uri, f"experiments/{self.experiment_id}/runs/{self.run_id}")


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
        experiment.experiment_id
        if experiment
        else client.create_experiment(name, tags={TAG_SPECIALIST: specialist, EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})
    )
    if experiment is not None and experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_DEVELOPMENT:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
    settings = config.specialist(specialist)
    code = code_version()
    tags = {
        TAG_SPECIALIST: specialist,
        TAG_FLOW: flow,
        TAG_BUDGET: budget,
        TAG_CONFIG_SHA: config.sha256,
        TAG_CODE: code,
        "mlflow.runName": f"{flow}-{budget}",
        "mlflow.source.type": "JOB",
        "mlflow.source.name": f"cadre flow {flow}",
    }
    if re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", code):
        tags[GIT_COMMIT_TAG] = code.removesuffix("+dirty")
    if flow_run_id:
        tags[TAG_FLOW_RUN] = flow_run_id
        tags[TAG_FLOW_RUN_URL] = f"{config.project.prefect.ui}/runs/flow-run/{flow_run_id}"
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
    """End the run; first put its verdict where MLflow's lists show it (the `verdict` tag and the run name)."""
    from mlflow import MlflowClient

    client = MlflowClient(handle.tracking_uri)
    with suppress(Exception):  # a verdict that cannot be written must not keep the run open
        tags = client.get_run(handle.run_id).data.tags
        word = verdict_word(tags, status)
        if word:
            client.set_tag(handle.run_id, TAG_VERDICT, word)
            name = tags.get("mlflow.runName", "")
            if name and not name.endswith(f": {word}"):
                client.set_tag(handle.run_id, "mlflow.runName", f"{name.split(': ')[0]}: {word}")
    client.set_terminated(handle.run_id, status=status)


def verdict_word(tags: dict[str, str], status: str = "FINISHED") -> str:
    """The run's verdict in one word, from the tags the flows set: `promoted`, `refused`, `unchanged` (nothing new
    to judge, or the candidate is the champion already), `passed` (the gate passed, the champion did not move),
    `failed` / `killed` (the run did not finish), or empty (the flow gates nothing, e.g. `check`)."""
    if status in ("FAILED", "KILLED"):
        return status.lower()
    if tags.get("cadre.outcome") in ("not_enough_corrections", "unchanged"):
        return "unchanged"
    gate, promoted = tags.get("cadre.gate"), tags.get("cadre.promoted")
    if gate is None and promoted is None:
        return ""
    if tags.get("cadre.already_champion") == "true":
        return "unchanged"
    if promoted == "true" or (promoted is None and gate == "passed"):
        return "promoted"
    return "passed" if gate == "passed" else "refused"


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
        f"- MLflow run: [{run_id[:12]}]({ui_url(tracking_uri, f'experiments/{run.info.experiment_id}/runs/{run_id}')})",
    ]
    if tags.get("cadre.candidate_version"):
        name, _, version = tags["cadre.candidate_version"].rpartition("/")
        lines.append(
            f"- registry: [{name} v{version}]({ui_url(tracking_uri, f'models/{name}/versions/{version}')}) "
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


# ------------------------------------------------------------------------------------------ inputs


def log_dataset(
    handle: RunHandle,
    name: str,
    context: str,
    digest: str,
    source: str | Sequence[str],
    rows: Sequence[dict[str, Any]] | None = None,
) -> None:
    """Record a data set the run used as an MLflow dataset input (the run page's Datasets section).

    Args:
        handle: the run.
        name: what the set is (`train`, `dev`, `test`, `corpus`, `training_data`, `preference_pairs`).
        context: MLflow's context tag: `training`, `validation`, `testing`, `corpus`.
        digest: Cadre's fingerprint of the set (sha256); its first 16 characters are the dataset's digest, the
            whole of it the input tag `cadre.fingerprint`.
        source: where it was read (a file, a folder, a database URL, or several).
        rows: the records themselves when they are small (a case split): logged with their schema and profile.
    """
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag

    dataset = _dataset(name, digest[:16], source, rows)
    tags = [InputTag("mlflow.data.context", context), InputTag("cadre.fingerprint", digest)]
    MlflowClient(handle.tracking_uri).log_inputs(
        handle.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)]
    )


def _dataset(name: str, digest: str, source: str | Sequence[str], rows: Sequence[dict[str, Any]] | None):
    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    places = [source] if isinstance(source, str) else list(source)
    if len(places) == 1 and Path(places[0]).exists():
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local file
            warnings.simplefilter("ignore")
            origin = resolve_dataset_source(str(Path(places[0]).resolve()))
    else:
        origin = CodeDatasetSource({"sources": json.dumps(places)[:4000]})
    if rows:
        import pandas

        table = pandas.DataFrame(
            [
                {k: v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v) for k, v in r.items()}
                for r in rows
            ]
        )
        return mlflow.data.from_pandas(table, source=origin, name=name, digest=digest)
    return MetaDataset(origin, name=name, digest=digest)


@contextmanager
def system_metrics(handle: RunHandle, flow: str, interval_s: float = 10.0) -> Iterator[None]:
    """Sample CPU, memory, disk and GPU use into the run's System metrics while a training flow runs
    (`TRAINING_FLOWS`; other flows get nothing). Needs psutil (a Cadre dependency); without it, a no-op."""
    if flow not in TRAINING_FLOWS:
        yield
        return
    monitor = None
    with suppress(Exception):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            handle.run_id, sampling_interval=interval_s, tracking_uri=handle.tracking_uri, resume_logging=True
        )
        monitor.start()
    try:
        yield
    finally:
        if monitor is not None:
            with suppress(Exception):
                monitor.finish()


DSPY_FLOWS = ("optimize",)
"""Flows whose DSPy calls MLflow traces (`mlflow.dspy.autolog`)."""


@contextmanager
def dspy_traces(handle: RunHandle, flow: str) -> Iterator[None]:
    """Trace the DSPy program's calls into the run while a DSPy flow runs (`DSPY_FLOWS`; others get nothing).

    `mlflow.dspy.autolog` records each program call outside compiling (the candidate and the champion answering the
    test cases) and each `dspy.Evaluate`, as traces of the run (its Traces tab). Compile-time calls are not traced:
    an optimizer makes hundreds; the compile's cost and chosen program are logged by the flow. The run is the
    thread's active run for the block; `close_run` records how the flow really ended afterwards.
    """
    if flow not in DSPY_FLOWS:
        yield
        return
    import mlflow

    active = False
    try:
        mlflow.set_tracking_uri(handle.tracking_uri)
        mlflow.set_experiment(experiment_id=handle.experiment_id)
        mlflow.dspy.autolog(
            log_traces=True,
            log_traces_from_compile=False,
            log_traces_from_eval=True,
            log_compiles=False,
            log_evals=False,
            silent=True,
        )
        mlflow.start_run(run_id=handle.run_id)
        active = True
    except Exception:  # tracing is an aid; a flow must not fail for it
        pass
    try:
        yield
    finally:
        with suppress(Exception):
            mlflow.dspy.autolog(disable=True)
            mlflow.flush_trace_async_logging()  # every trace is on the server before the run ends
        if active:
            with suppress(Exception):
                mlflow.end_run()  # marks it FINISHED; `close_run` then sets how the flow really ended
