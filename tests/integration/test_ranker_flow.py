"""`search_mode: learned` through the re-index flow: the new version's ranker is fitted on the train split, written
beside its manifest, used by the retrieval gate and by every later search, carried by the registry and a bundle.

The corpus is built so that the fused ranking cannot know the answer and the titles can: each condition has four
codes ("type A", "type B", "unspecified" and "other"), and every case asks for a variant no title names, which the
classification puts under "other". Real MLflow, Prefect (test harness), MiniLM and LanceDB; no mocks.

Run: `python -m pytest -m integration tests/integration/test_ranker_flow.py` (about a minute).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import textwrap
from pathlib import Path

import pytest
from support import project_name

from cadre.config import load_config
from cadre.knowledge.index import IndexLayout
from cadre.knowledge.ranker import LearnedRanker
from cadre.knowledge.reindex import IndexSearcher, live_version

pytestmark = pytest.mark.integration
CONDITIONS = 60
KINDS = {
    "A": "type A {name}",
    "B": "type B {name}",
    "U": "{name}, unspecified",
    "O": "other specified forms of {name}, not elsewhere classified",
}
NAMES = [
    "gastritis", "bronchitis", "dermatitis", "arthritis", "nephritis", "hepatitis", "myositis", "neuritis",
    "otitis", "sinusitis", "keratitis", "cystitis", "colitis", "tendinitis", "pancreatitis", "vasculitis",
    "uveitis", "mastitis", "orchitis", "prostatitis",
]  # fmt: skip


def _name(number: int) -> str:
    return f"{NAMES[number % len(NAMES)]} of region {number}"


@pytest.fixture
def config_path(tmp_path: Path, mlflow_server: str) -> Path:
    (tmp_path / "data").mkdir()
    with sqlite3.connect(tmp_path / "data" / "kb.db") as connection:
        connection.execute("CREATE TABLE codes (code TEXT PRIMARY KEY, title TEXT, grp TEXT)")
        connection.executemany(
            "INSERT INTO codes VALUES (?, ?, ?)",
            [
                (f"C{n:03d}.{kind}", template.format(name=_name(n)), f"C{n:03d}")
                for n in range(CONDITIONS)
                for kind, template in KINDS.items()
            ],
        )
    suite = tmp_path / "suite"
    suite.mkdir()
    splits = {"train": range(0, 40), "dev": range(40, 50), "test": range(50, 60)}
    for split, numbers in splits.items():
        rows = [
            {
                "id": f"{split}-{n}-{v}",
                "phrase": f"{variant} {_name(n)}",
                "code": f"C{n:03d}.O",
                "relevant_ids": [f"C{n:03d}.O"],
            }
            for n in numbers
            for v, variant in enumerate(("chronic relapsing", "atypical granulomatous"))
        ]
        (suite / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = tmp_path / "pipelines.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        version: 1
        project:
          name: {project_name("ranker", tmp_path)}
          mlflow: {{tracking_uri: "{mlflow_server}"}}
        specialists:
          - name: coder
            description: test
            sources:
              - {{kind: sql, name: kb, url: "sqlite:///data/kb.db", query: "SELECT * FROM codes ORDER BY code",
                  id_column: code, title_column: title, text_columns: [title], metadata_columns: [grp]}}
            index: {{search_mode: learned, ranker: {{depth: 8, group_field: grp, title_words: 10}}}}
            program:
              instruction: Code it.
              inputs: [{{name: phrase}}]
              outputs: [{{name: code}}]
            evaluation: {{suite: suite, retrieval_metrics: [recall@1, recall@5]}}
        """)
    )
    return path


def test_a_reindex_fits_the_versions_ranker_and_every_search_of_it_ranks_with_it(
    config_path: Path, harness: None, clean_environment: None
) -> None:
    from flows.reindex import reindex

    result = reindex("coder", str(config_path), budget="full", trigger_optimize=False)

    assert result["promoted"] is True, result
    fitted = result["ranker"]
    assert fitted["fitted"] is True and fitted["usable"] == 80, fitted
    assert fitted["train_top1_learned"] > fitted["train_top1_fused"], fitted
    config = load_config(config_path)
    state = config.state_dir
    version = live_version(state, "coder")
    ranker = LearnedRanker.read(IndexLayout(state, "coder").ranker_path(version))
    assert set(ranker.vocabulary) <= set(KINDS["O"].replace(",", "").split())  # the answers' title words

    searcher = IndexSearcher.from_config(config, "coder")
    cases = [json.loads(line) for line in (config_path.parent / "suite" / "test.jsonl").read_text().splitlines()]

    def top1(mode: str) -> float:
        return sum(searcher.search(c["phrase"], k=3, mode=mode)[0].record_id == c["code"] for c in cases) / len(cases)

    learned, hybrid = top1("learned"), top1("hybrid")
    assert learned >= 0.9 and learned - hybrid >= 0.25, (learned, hybrid)
    assert searcher.search(cases[0]["phrase"], k=3)[0].record_id == cases[0]["code"]  # learned is the default here

    # A worker that shares only the registry installs the champion version with its ranker, and ranks alike.
    from cadre.registry.models import install_index_version
    from cadre.registry.promotion import champion_version

    worker_root = config_path.parent / "worker"
    shutil.copytree(config_path.parent, worker_root, ignore=shutil.ignore_patterns(".cadre", "worker"))
    worker = load_config(worker_root / "pipelines.yaml")
    registered = champion_version(config, "coder", "index")
    assert install_index_version(worker, "coder", registered, version, config.project.mlflow.uri)
    assert IndexLayout(worker.state_dir, "coder").ranker_path(version).is_file()
    there = IndexSearcher.from_config(worker, "coder")
    for case in cases:
        assert [hit.record_id for hit in there.search(case["phrase"], k=3, version=version)] == [
            hit.record_id for hit in searcher.search(case["phrase"], k=3)
        ]


def test_declaring_the_learned_ranking_on_an_unchanged_corpus_builds_a_gated_copy_with_its_ranker(
    config_path: Path, harness: None, clean_environment: None
) -> None:
    """A user turns `search_mode: learned` on for an index that exists: the next re-index must not answer
    "nothing changed". It builds a copy of the live version (nothing embedded), fits its ranker and gates it."""
    from flows.reindex import reindex

    declared = config_path.read_text()
    config_path.write_text(
        declared.replace(
            "{search_mode: learned, ranker: {depth: 8, group_field: grp, title_words: 10}}", "{search_mode: hybrid}"
        )
    )
    first = reindex("coder", str(config_path), budget="full", trigger_optimize=False)
    assert first["promoted"] is True and first["ranker"] is None, first
    assert reindex("coder", str(config_path), budget="full", trigger_optimize=False)["changed"] is False

    config_path.write_text(declared)
    switched = reindex("coder", str(config_path), budget="full", trigger_optimize=False)
    assert switched["changed"] is True and switched["promoted"] is True, switched
    assert switched["ranker"]["fitted"] is True, switched
    config = load_config(config_path)
    layout = IndexLayout(config.state_dir, "coder")
    manifest = layout.read_manifest(switched["version"])
    assert manifest.base_version == first["version"] and manifest.stats["chunks_embedded"] == 0
    assert manifest.ranking == config.specialist("coder").index.ranking.model_dump()
    assert live_version(config.state_dir, "coder") == switched["version"]

    again = reindex("coder", str(config_path), budget="full", trigger_optimize=False)
    assert again["changed"] is False, "the ranking the live version was built for is the declared one"
