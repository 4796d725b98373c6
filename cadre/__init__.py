"""Cadre: keep a team of specialist small language models fresh, declaratively.

The core package: the `pipelines.yaml` schema, the CLI, the local stack, models, evaluation, gates and
the MLflow registry. Nothing in it imports Prefect; the flows live in `flows/`, the tasks in `tasks/`.
"""

__version__ = "0.1.0"
