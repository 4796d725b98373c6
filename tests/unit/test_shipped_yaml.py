"""Every YAML file the project ships is checked: pipelines files against the schema, the rest must parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from cadre.config import json_schema, load_config
from cadre.serving.router import load_routing_suite

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
        return
    documents = [d for d in YAML(typ="safe").load_all(path.read_text()) if d is not None]
    assert documents, f"{path} is empty"
    assert all(isinstance(d, dict) for d in documents), f"{path} holds a document that is not a mapping"
    if path.name == "team.yaml":  # a routing suite's team: loaded as `cadre.serving.router` loads it, with its cases
        profiles, splits = load_routing_suite(path.parent)
        assert len(profiles) >= 2 and all(p.texts for p in profiles) and splits["test"]
    elif path.name in ("docker-compose.yml", "compose.yaml"):  # every service runs something; references resolve
        [compose] = documents
        services, volumes = compose["services"], set(compose.get("volumes") or {})
        for name, service in services.items():
            assert "image" in service or "build" in service, f"{path}: service {name} has neither image nor build"
            assert set(service.get("depends_on") or {}) <= set(services), (
                f"{path}: {name} depends on an undefined service"
            )
            named = {
                v.split(":")[0]
                for v in service.get("volumes", [])
                if isinstance(v, str) and not v.startswith((".", "/", "~"))
            }
            assert named <= volumes, f"{path}: {name} mounts undeclared volumes {named - volumes}"
    elif "k8s" in path.parts:  # Kubernetes manifests: every object says what it is and is named
        for document in documents:
            assert {"apiVersion", "kind", "metadata"} <= set(document), (
                f"{path}: {document.get('kind')} lacks apiVersion/kind/metadata"
            )
            assert document["metadata"].get("name"), f"{path}: a {document['kind']} without a name"
    else:
        pytest.fail(f"{path}: a shipped YAML file nothing here knows how to check; add its check to this test")


def test_committed_json_schema_is_current() -> None:
    committed = json.loads((ROOT / "pipelines.schema.json").read_text())
    assert committed == json_schema(), "pipelines.schema.json is stale: run `cadre schema`"


def test_the_readmes_new_specialist_validates_and_inherits_the_defaults(tmp_path: Path) -> None:
    """The snippet under "Adding a specialist" in README.md, added to the shipped file, is a valid specialist."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Adding a specialist", 1)[1].split("\n## ", 1)[0]
    snippet = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    entry = YAML(typ="safe").load(snippet)[0]
    document = YAML(typ="safe").load((ROOT / "pipelines.yaml").read_text())
    document["specialists"].append(entry)
    for source in entry.get("sources", []):
        (tmp_path / source["path"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / source["path"]).write_text('{"id": "1", "text": "a clause"}\n')
    for suite in (specialist["evaluation"]["suite"] for specialist in document["specialists"]):  # the new one too
        (tmp_path / suite).mkdir(parents=True, exist_ok=True)
        for split in ("train", "dev", "test"):
            source = ROOT / suite / f"{split}.jsonl"
            (tmp_path / suite / f"{split}.jsonl").write_text(source.read_text() if source.exists() else "")
    path = tmp_path / "pipelines.yaml"
    with path.open("w") as handle:
        YAML().dump(document, handle)
    config = load_config(path)
    added = config.specialist(entry["name"])
    assert added.tuning.method == config.specialist("icd10-coder").tuning.method
    assert added.schedules.reindex is not None and added.gates.program
