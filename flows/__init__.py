"""Prefect flows: thin and linear, one per schedule. Each takes (specialist, config_path, budget).

`FLOWS` maps a flow kind (the keys of a specialist's `schedules`, plus `check`) to the flow's
module path; `cadre deploy` turns each into one deployment per specialist.
"""

import importlib

FLOWS: dict[str, str] = {
    "check": "flows.check.check_stack",
    "reindex": "flows.reindex.reindex",
    "optimize": "flows.optimize_prompts.optimize_prompts",
    "refresh": "flows.refresh_adapter.refresh_adapter",
    "feedback": "flows.learn_from_feedback.learn_from_feedback",
}
"""Flow kind → `module.function` of the Prefect flow. Kinds not listed here are not deployed yet."""


def flow_object(kind: str):
    """The Prefect flow of a kind (imports its module)."""
    module, _, function = FLOWS[kind].rpartition(".")
    return getattr(importlib.import_module(module), function)


def flow_name(kind: str) -> str:
    """The Prefect flow name of a kind, as deployments are named `<flow name>/<specialist>`."""
    return flow_object(kind).name
