"""Prefect flows: thin and linear, one per schedule. Each takes (specialist, config_path, budget).

`FLOWS` maps a flow kind (the keys of a specialist's `schedules`, plus `check`) to the flow's
module path; `cadre deploy` turns each into one deployment per specialist.
"""

FLOWS: dict[str, str] = {
    "check": "flows.check.check_stack",
}
"""Flow kind → `module.function` of the Prefect flow. Kinds not listed here are not deployed yet."""
