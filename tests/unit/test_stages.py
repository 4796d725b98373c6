"""The stage table is the one list of stages: every other list (schema keys, deployments, CLI choices, registry
kinds, the demo cycle, the flows' names) agrees with it because it is derived from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cadre.config import Gates, load_config
from cadre.config.schedules import Schedules
from cadre.stages import GATE_KINDS, REGISTRY_KINDS, SCHEDULED, STAGES, stage, stage_of_gate

ROOT = Path(__file__).resolve().parents[2]


def test_the_schema_keys_are_the_tables_kinds() -> None:
    """`schedules:` and `gates:` list their keys as fields (each with a description); they must be the table's."""
    assert tuple(Schedules.model_fields) == SCHEDULED
    assert tuple(Gates.model_fields) == GATE_KINDS


def test_derived_lists() -> None:
    assert SCHEDULED == ("reindex", "embedder", "optimize", "refresh", "feedback"), "the demo cycle: re-index first"
    assert GATE_KINDS == ("index", "embedder", "program", "adapter", "feedback")
    assert REGISTRY_KINDS == ("index", "embedder", "program", "adapter"), "a feedback adapter is an adapter version"
    assert stage_of_gate("feedback").registry_kind == "adapter"
    for kind in REGISTRY_KINDS:
        paths = {s.artifact_path for s in STAGES if s.registry_kind == kind}
        assert len(paths) == 1, f"every stage registering {kind} logs it under the same folder: {paths}"


def test_every_stage_names_its_flow_and_an_unknown_one_lists_them() -> None:
    for entry in STAGES:
        assert entry.flow_object().name == entry.flow, entry
    with pytest.raises(KeyError, match="the stages are: reindex, embedder, optimize, refresh, feedback, check"):
        stage("compile")


def test_deployments_cli_choices_and_status_tables_follow_the_table() -> None:
    from cadre.cli import build_parser
    from cadre.orchestration.deployments import desired_deployments
    from cadre.registry.view import WITHOUT_A_CHAMPION

    config = load_config(ROOT / "pipelines.yaml")
    specs = desired_deployments(config)
    assert len(specs) == len(config.specialists) * len(STAGES)
    coder = {spec.flow_kind: spec for spec in specs if spec.specialist == "icd10-coder"}
    assert list(coder) == [s.name for s in STAGES]
    assert coder["check"].cron is None and all(coder[name].cron for name in SCHEDULED)
    assert set(WITHOUT_A_CHAMPION) == set(REGISTRY_KINDS)

    parser = build_parser()
    assert parser.parse_args(["run", "feedback"]).flow == "feedback"
    assert parser.parse_args(["history", "icd10-coder", "adapter"]).kind == "adapter"
    for argv in (["run", "compile"], ["history", "icd10-coder", "feedback"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_a_stage_without_a_gate_promotes_nothing() -> None:
    from cadre.evaluation.results import score_predictions
    from cadre.registry.promotion import Candidate, gate_and_promote
    from cadre.registry.runs import RunHandle

    config = load_config(ROOT / "pipelines.yaml")
    scores = score_predictions([{"id": "1", "code": "A00"}], ["A00"], ["exact_match"], name="c", output_field="code")
    handle = RunHandle("run", "0", "http://127.0.0.1:9")  # nothing is written: the stage is refused first
    with pytest.raises(ValueError, match="the check stage makes no candidate to promote"):
        gate_and_promote(config, "icd10-coder", handle, Candidate("check", scores, None, None), actor="test")
