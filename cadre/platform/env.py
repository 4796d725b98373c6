"""Environment every Cadre process runs with: offline, no telemetry, services found by URL.

`cadre_env(config)` is applied by the CLI before any flow runs and handed to the services `cadre up`
starts, so a scheduled run executed by the worker sees exactly what a run started by hand sees.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cadre.config import CadreConfig

OFFLINE_ENV = {
    # No hub, no telemetry, no price lists: these machines reach package registries only.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}


# Library warnings that only ever say "could not download X": on these offline machines they are
# noise in every run's log. bitsandbytes looks for a CPU kernel on the Hugging Face hub at import.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)
for _name in QUIET_LOGGERS:  # at import: the warning fires when the library is first imported
    logging.getLogger(_name).setLevel(logging.ERROR)


FLOW_HEARTBEAT_S = 30
"""Seconds between a flow run's heartbeats (Prefect's minimum); `cadre.orchestration.automations` crashes a run whose
heartbeat stops."""


def cadre_env(config: CadreConfig) -> dict[str, str]:
    """Variables that point every library at this project's services and state."""
    state = config.state_dir
    return {
        **OFFLINE_ENV,
        "CADRE_CONFIG": str(config.file),
        "MLFLOW_TRACKING_URI": config.project.mlflow.uri,
        # Runs and registered versions live on the same server: an MLFLOW_REGISTRY_URI left in the shell would
        # otherwise send every version to another server, whose registry knows none of this project's runs.
        "MLFLOW_REGISTRY_URI": config.project.mlflow.uri,
        "PREFECT_API_URL": config.project.prefect.api,
        # Every flow run sends heartbeats: a Prefect automation crashes the runs whose heartbeat stops
        # (cadre.orchestration.automations), whichever machine they ran on.
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(FLOW_HEARTBEAT_S),
        "PREFECT_HOME": str(state / "prefect"),
        "DSPY_CACHEDIR": str(state / "cache" / "dspy"),
        "HF_HOME": str(state / "cache" / "hf"),
        # Cadre's own log records (e.g. "skipped 2 malformed line(s)") reach the flow run's log in the Prefect UI.
        "PREFECT_LOGGING_EXTRA_LOGGERS": "cadre",
    }


def apply_env(config: CadreConfig) -> None:
    """Set `cadre_env(config)` in this process."""
    os.environ.update(cadre_env(config))


def ensure_state_dir(config: CadreConfig) -> Path:
    """Make the project's state directory (services' data, indexes, caches, logs) if it is missing, holding a
    `.gitignore` of `*`: it ignores itself wherever `project.state_dir` points, so none of it is committed."""
    state = config.state_dir
    state.mkdir(parents=True, exist_ok=True)
    ignore = state / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# written by Cadre: the state directory is local data, never committed\n*\n")
    return state


@contextmanager
def unlogged_prints() -> Iterator[None]:
    """Inside the block, `print` is Python's own again, not Prefect's print-to-run-log patch (`log_prints`).

    `datasets` fingerprints a function with dill, which reads its disassembly by swapping `sys.stdout` for a buffer;
    Prefect's patched `print` sends that disassembly to the run's log instead (pages of bytecode in the Prefect UI).
    """
    import builtins

    from prefect.logging import loggers

    patched = builtins.print
    builtins.print = loggers.print  # the builtin, as Prefect's module imported it
    try:
        yield
    finally:
        builtins.print = patched
