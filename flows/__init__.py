"""Prefect flows: thin and linear, one per stage of `cadre.stages.STAGES`. Each takes (specialist, config_path,
budget), opens its MLflow run with `tasks.tracking.tracked_run`, runs its steps and, if it makes a candidate, ends
in `tasks.promotion.promote_through_gates`. `cadre deploy` turns each stage into one deployment per specialist.
"""
