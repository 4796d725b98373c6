"""The schema of `pipelines.yaml` (pydantic v2, split by concern) and its loader.

`load_config(path)` returns a validated `CadreConfig` or raises `ConfigError` listing every problem as
`FILE:LINE:COL: field.path: message`. Nothing here knows about Prefect or MLflow.
"""

from cadre.config.evaluation import EvaluationSettings, GateRule, Gates
from cadre.config.knowledge import ChunkingSettings, IndexSettings, Source
from cadre.config.loader import ConfigError, ConfigIssue, load_config
from cadre.config.pipelines import CadreConfig, PipelinesFile
from cadre.config.program import OptimizerSettings, ProgramSettings
from cadre.config.project import ProjectSettings
from cadre.config.schema_export import json_schema
from cadre.config.specialist import SmokeBudget, Specialist
from cadre.config.tuning import FeedbackSettings, TuningSettings

__all__ = [
    "CadreConfig",
    "ChunkingSettings",
    "ConfigError",
    "ConfigIssue",
    "EvaluationSettings",
    "FeedbackSettings",
    "GateRule",
    "Gates",
    "IndexSettings",
    "OptimizerSettings",
    "PipelinesFile",
    "ProgramSettings",
    "ProjectSettings",
    "SmokeBudget",
    "Source",
    "Specialist",
    "TuningSettings",
    "json_schema",
    "load_config",
]
