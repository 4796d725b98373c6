"""The retriever refresh end to end on a tiny SQLite source: the flow fine-tunes MiniLM at smoke budget, re-embeds the
corpus into a new index version, promotes the embedder and that version through their gates, and from then on the
live version is searched with the fine-tuned model (a query embedded with the packaged model would rank differently),
serving included; the next daily re-index stays incremental with the champion embedder; a finished training is reused.

Real MLflow server, real Prefect (test harness), the real MiniLM model, LanceDB; no mocks.

Run: `python -m pytest -m integration tests/integration/test_embedder_flow.py` (about three minutes).
"""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from support import project_name

from cadre.config import load_config
from cadre.knowledge.embedding import Embedder
from cadre.knowledge.index.manifest import IndexLayout
from cadre.knowledge.reindex import IndexSearcher, live_version

pytestmark = pytest.mark.integration
CONDITIONS = [
    "fracture of the left femur",
    "fracture of the right wrist",
    "type 2 diabetes with kidney disease",
    "type 1 diabetes with ketoacidosis",
    "acute appendicitis with peritonitis",
    "chronic appendicitis",
    "bacterial pneumonia of the lower lobe",
    "viral pneumonia due to influenza",
    "migraine with aura",
    "tension headache",
    "iron deficiency anemia",
    "vitamin B12 deficiency anemia",
    "sprain of the left ankle",
    "sprain of the right knee",
    "otitis media of the right ear",
    "otitis externa of the left ear",
]
# Lay phrasings: the packaged model ranks some of them wrong, which is what fine-tuning is for.
PHRASES = [
    "broken thigh bone on the left",
    "broken right wrist",
    "sugar disease harming the kidneys",
    "juvenile diabetes with acid in the blood",
    "burst appendix with belly lining infection",
    "long-standing appendix inflammation",
    "lung infection by bacteria, lower part",
    "flu that went to the lungs",
    "headache with flashing lights before it",
    "band-like headache from stress",
    "low iron in the blood",
    "pernicious anemia",
    "twisted left ankle",
    "twisted right knee",
    "middle ear infection, right",
    "swimmer's ear on the left",
]


@pytest.fixture
def config_path(tmp_path: Path, mlflow_server: str) -> Path:
    (tmp_path / "data").mkdir()
    with sqlite3.connect(tmp_path / "data" / "kb.db") as connection:
        connection.execute("CREATE TABLE codes (code TEXT PRIMARY KEY, title TEXT, description TEXT)")
        connection.executemany(
            "INSERT INTO codes VALUES (?, ?, ?)",
            [(f"C{n:03d}", text, f"Code C{n:03d}: {text}.") for n, text in enumerate(CONDITIONS)],
        )
    suite = tmp_path / "suite"
    suite.mkdir()
    rows = [
        {"id": f"case-{n}", "phrase": phrase, "code": f"C{n:03d}", "relevant_ids": [f"C{n:03d}"]}
        for n, phrase in enumerate(PHRASES)
    ]
    for split in ("train", "dev", "test"):
        (suite / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = tmp_path / "pipelines.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        version: 1
        project:
          name: {project_name("embflow", tmp_path)}
          mlflow: {{tracking_uri: "{mlflow_server}"}}
          threads: {{torch: 1, embedding: 1}}
        specialists:
          - name: coder
            description: test
            sources:
              - {{kind: sql, name: kb, url: "sqlite:///data/kb.db", query: "SELECT * FROM codes ORDER BY code",
                  id_column: code, title_column: title, text_columns: [description]}}
            program:
              instruction: Code it.
              inputs: [{{name: phrase}}]
              outputs: [{{name: code}}]
            embedder: {{batch_size: 8, learning_rate: 1.0e-4, hard_negatives: 1, mine_depth: 5, warmup_ratio: 0.0}}
            evaluation: {{suite: suite, retrieval_metrics: [recall@1, recall@5, mrr]}}
            gates:
              embedder: [{{metric: recall@5, at_least: 0.0}}]
            schedules: {{embedder: {{cron: "0 2 15 * *"}}}}
            smoke: {{max_documents: 100, max_train_steps: 6, max_eval_cases: 16}}
        """)
    )
    return path


def test_a_promoted_embedder_reembeds_the_index_and_every_query_of_that_version_uses_it(
    config_path: Path, harness: None, clean_environment: None
) -> None:
    from flows.refresh_embedder import refresh_embedder
    from flows.reindex import reindex

    first = reindex("coder", str(config_path), budget="smoke", trigger_optimize=False)
    assert first["promoted"] is True, first
    state = config_path.parent / ".cadre"
    old_version = live_version(state, "coder")

    result = refresh_embedder("coder", str(config_path), budget="smoke", trigger_optimize=False)

    assert result["promoted"] is True and result["steps"] == 6 and result["train_pairs"] == len(PHRASES), result
    new_version = result["index_version"]
    assert new_version != old_version and live_version(state, "coder") == new_version, "the live pointer moved"
    config = load_config(config_path)
    client = MlflowClient(config.project.mlflow.uri)
    embedder_model = client.get_model_version_by_alias(f"{config.project.name}.coder.embedder", "champion")
    index_model = client.get_model_version_by_alias(f"{config.project.name}.coder.index", "champion")
    assert index_model.tags["cadre.lineage.index_version"] == new_version, "the index registry follows"
    assert index_model.tags["cadre.lineage.embedder_version"] == str(embedder_model.version)
    recorded = IndexLayout(state, "coder").read_manifest(new_version).embedder
    assert recorded["registry_version"] == str(embedder_model.version)
    assert recorded["path"] == embedder_model.tags["cadre.lineage.embedder_path"]
    inputs = client.get_run(embedder_model.run_id).inputs.dataset_inputs
    assert [d.dataset.name for d in inputs] == ["training_pairs"], "the run page lists what it trained on"
    artifacts = {item.path for item in client.list_artifacts(embedder_model.run_id, "embedder")}
    assert "embedder/model.safetensors" in artifacts and "embedder/cadre_embedder.json" in artifacts

    # Every query of the new version is embedded with the fine-tuned model, whatever project.embedding says.
    searcher = IndexSearcher.from_config(config, "coder")
    packaged = searcher.embedder
    tuned = searcher.embedder_for(new_version)
    assert tuned.model_dir == Path(recorded["path"]) and tuned.fingerprint != packaged.fingerprint
    assert searcher.embedder_for(old_version).fingerprint == packaged.fingerprint, "old versions keep their model"
    differs = 0
    handle = searcher.backend.open_version(new_version)
    for phrase in PHRASES:
        served = [hit.id for hit in searcher.search(phrase, k=5, mode="vector")]
        with_tuned = [hit.id for hit in handle.search(tuned.embed_query(phrase), phrase, 5, mode="vector")]
        with_packaged = [hit.id for hit in handle.search(packaged.embed_query(phrase), phrase, 5, mode="vector")]
        assert served == with_tuned
        differs += served != with_packaged
        assert not np.allclose(tuned.embed_query(phrase), packaged.embed_query(phrase))
    assert differs > 0, "a query embedded with the packaged model would rank the new version differently"

    # Serving opens the version's embedder too.
    from cadre.runtime.retrieval import IndexTarget, open_index_search

    search = open_index_search(IndexTarget.from_config(config, "coder"), new_version)
    assert [p.id for p in search(PHRASES[2], 3)] == list(
        dict.fromkeys(hit.record_id for hit in searcher.search(PHRASES[2], k=6, version=new_version))
    )[:3]

    # Retrieval before the refresh, the optimize flow's first baseline row: the version the packaged (configured)
    # model embedded, searched with that model and the fused hybrid ranking, on the same cases.
    from prefect.logging import disable_run_logger

    from cadre.evaluation.results import load_cases
    from cadre.knowledge.reindex import configured_embedder_version
    from cadre.prompts.candidate import ProgramRuntime
    from tasks.prompts import retrieval_before_embedder_refresh

    assert configured_embedder_version(state, "coder", config.project.embedding.model) == old_version
    settings = config.specialist("coder")
    cases = load_cases(config.resolve(settings.evaluation.suite), "test")
    runtime = ProgramRuntime(None, IndexTarget.from_config(config, "coder"), str(state / "cache" / "dspy"))
    with disable_run_logger():
        before = retrieval_before_embedder_refresh(runtime, settings.program, settings.evaluation, cases)
    assert before is not None and before.result.name == f"retrieval-top1-{old_version}"
    firsts = [example.retrieved_ids[0] for example in before.result.examples]
    assert firsts == [
        next(hit.record_id for hit in searcher.search(case["phrase"], k=10, version=old_version)) for case in cases
    ], "the first hits of the old version, embedded with the packaged model"

    # The daily re-index embeds with the champion embedder: nothing changed, so nothing is rebuilt.
    again = reindex("coder", str(config_path), budget="smoke", trigger_optimize=False)
    assert again == {"changed": False, "live": new_version}, again


def test_a_finished_training_is_reused_by_a_rerun(tmp_path: Path) -> None:
    from cadre.config.embedder import EmbedderSettings
    from cadre.tuning.embedder import EmbedderPlan, TrainingPair, train_embedder

    base = Embedder.load(load_config_defaults().embedding, load_config_defaults().threads)
    pairs = [TrainingPair(f"c{n}", phrase, f"{CONDITIONS[n]}\nCode {n}", ()) for n, phrase in enumerate(PHRASES[:8])]
    settings = EmbedderSettings(batch_size=4, max_steps=2, hard_negatives=0)
    plan = EmbedderPlan("smoke", 2, None, 8, None, None)
    first = train_embedder(pairs, base.model_dir, settings, plan, tmp_path, threads=1)
    again = train_embedder(pairs, base.model_dir, settings, plan, tmp_path, threads=1)
    assert (first.reused, again.reused) == (False, True)
    assert again.model_dir == first.model_dir and again.fingerprint == first.fingerprint
    other = train_embedder(pairs[:7], base.model_dir, settings, plan, tmp_path, threads=1)
    assert other.model_dir != first.model_dir, "other pairs are another training"


def load_config_defaults():
    from cadre.config.project import ProjectSettings

    return ProjectSettings(name="reuse")
