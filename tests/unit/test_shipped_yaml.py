"""Every YAML file the project ships is checked: pipelines files against the schema, the rest must parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from cadre.config import json_schema, load_config

ROOT = Path(__file__).resolve().parents[2]
SKIP = {".venv", ".git", ".cadre", "node_modules", "build", "dist"}


def _shipped_yaml() -> list[Path]:
    files = [p for p in ROOT.rglob("*") if p.suffix in (".yaml", ".yml") and not SKIP & set(p.relative_to(ROOT).parts)]
    return sorted(files)


def test_the_walk_finds_the_shipped_files() -> None:
    found = {p.relative_to(ROOT).as_posix() for p in _shipped_yaml()}
    assert "pipelines.yaml" in found


@pytest.mark.parametrize("path", _shipped_yaml(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shipped_yaml_is_valid(path: Path) -> None:
    if path.name.startswith("pipelines") or "pipelines" in path.parts or path.parent.name == "examples":
        config = load_config(path)
        assert config.specialists
    else:
        documents = [d for d in YAML(typ="safe").load_all(path.read_text()) if d is not None]
        assert documents, f"{path} is empty"
        assert all(isinstance(d, dict) for d in documents), f"{path} holds a document that is not a mapping"


def test_committed_json_schema_is_current() -> None:
    committed = json.loads((ROOT / "pipelines.schema.json").read_text())
    assert committed == json_schema(), "pipelines.schema.json is stale: run `cadre schema`"
