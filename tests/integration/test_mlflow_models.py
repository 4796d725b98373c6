"""Registered versions are MLflow models: loaded with MLflow's own API, served by `mlflow models serve` and `cadre serve`.

Against a real MLflow server, one retrieving ICD-10 specialist: a smoke index (60 documents), a program with one
demo and two random LoRA adapters are registered through `register_candidate` with their model files, made
champions, and the specialist is registered as one model (`register_specialist`). Then:

* in a fresh process, `mlflow.pyfunc.load_model("models:/…@champion")` of each kind and of the specialist answers
  its input example, and the specialist answers the suite's cases;
* `cadre serve` started on *another* state dir (no index, no downloads: it shares only the MLflow server) serves
  the team with the same answers as the specialist model, and swaps the adapter when its alias moves;
* `mlflow models serve -m models:/<project>.<specialist>@champion --env-manager local` answers a request.

Run: `python -m pytest -m integration tests/integration/test_mlflow_models.py` (9–12 minutes measured on the shared, loaded
2-core machine).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "evals" / "suites" / "icd10-coder"
PROJECT = "modeltest"
CASES = 6
START_TIMEOUT_S = 240


def _pipelines(mlflow_uri: str, state: str, codes: list[str]) -> str:
    return textwrap.dedent(f"""\
        version: 1
        project:
          name: {PROJECT}
          state_dir: {state}
          mlflow: {{tracking_uri: "{mlflow_uri}"}}
          threads: {{torch: 1, embedding: 1}}
        specialists:
          - name: coder
            description: Medical coding, a clinical phrase to its billable ICD-10-CM code.
            sources:
              - kind: python
                name: icd10cm
                entrypoint: cadre.demo.icd10:load_documents
                options: {{billable_only: true, priority_ids: {json.dumps(codes)}}}
            program:
              instruction: Given a clinical phrase and candidate ICD-10-CM codes with their descriptions, answer with the single billable code that classifies the phrase.
              inputs: [{{name: phrase, description: a diagnosis as a clinician writes it}}]
              outputs: [{{name: code, description: one ICD-10-CM code}}]
              retrieve_k: 3
              max_tokens: 8
            evaluation: {{suite: suite, answer_metrics: [exact_match], retrieval_metrics: ["recall@3"]}}
            smoke: {{max_documents: 60}}
        """)


def _link_models(state: Path, prepared: Path) -> None:
    """The base model files (prepared once per machine), not any of the worker's index or registry files."""
    state.mkdir()
    (state / "models").symlink_to(prepared / "models", target_is_directory=True)
    (state / "vendor").mkdir()
    (state / "vendor" / "llama.cpp").symlink_to(prepared / "vendor" / "llama.cpp", target_is_directory=True)


@pytest.fixture(scope="module")
def prepared_models() -> Path:
    from cadre.config import load_config
    from cadre.runtime.base_model import ensure_gguf, ensure_hf_model
    from cadre.tuning.adapter_export import ConverterMissingError, find_converter

    config = load_config(REPO / "pipelines.yaml")
    ensure_gguf(config)
    ensure_hf_model(config)
    try:
        find_converter(config.state_dir)
    except ConverterMissingError as error:
        pytest.skip(f"llama.cpp's LoRA converter is not installed (setup.sh installs it): {error}")
    return config.state_dir


def _run(config, name: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(config.project.mlflow.uri)
    experiment = client.get_experiment_by_name(PROJECT) or client.get_experiment(client.create_experiment(PROJECT))
    return client.create_run(experiment.experiment_id, run_name=name).info.run_id


def _register(config, kind: str, folder: Path | None, lineage: dict[str, str], **spec) -> str:
    from mlflow import MlflowClient

    from cadre.registry.models import model_spec
    from cadre.registry.versions import register_candidate

    client = MlflowClient(config.project.mlflow.uri)
    run_id = _run(config, f"test {kind}")
    if folder is not None:
        client.log_artifacts(run_id, str(folder), kind)
    version = register_candidate(
        client,
        project=PROJECT,
        specialist="coder",
        kind=kind,
        run_id=run_id,
        artifact_path=kind,
        lineage=lineage,
        actor="test",
        model=model_spec(config, "coder", kind, **spec),
    )
    client.set_terminated(run_id)
    return str(version.version)


def _promote(config, kind: str, version: str) -> None:
    from mlflow import MlflowClient

    from cadre.registry.versions import promote

    promote(
        MlflowClient(config.project.mlflow.uri),
        project=PROJECT,
        specialist="coder",
        kind=kind,
        version=version,
        actor="test",
        force=True,
        reason="integration test",
    )


def _adapter_folder(config, seed: int) -> Path:
    from cadre.tuning.adapter_export import random_adapter

    hf = config.state_dir / "models" / "gemma3-270m" / "hf"
    return random_adapter(hf, config.state_dir / "work" / f"adapter-{seed}", config.state_dir, seed).folder


def _program_folder(config) -> Path:
    import dspy

    from cadre.prompts.program import SpecialistProgram, save_program

    program = SpecialistProgram(config.specialist("coder").program, retriever=lambda query, k: [])
    program.answer.demos = [
        dspy.Example(
            context=["A01.02 — Typhoid fever with heart involvement"], phrase="typhoid endocarditis", code="A01.02"
        )
    ]
    folder = config.state_dir / "work" / "program"
    save_program(program, folder / "program.json")
    return folder


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, mlflow_server: str, prepared_models: Path) -> dict:
    """The worker's project: every kind registered as a model and champion, and the specialist as one model."""
    from cadre.config import load_config
    from cadre.knowledge.reindex import reindex_specialist
    from cadre.registry.models import register_specialist

    root = tmp_path_factory.mktemp("models")
    suite = root / "suite"
    suite.mkdir()
    lines = (SUITE / "test.jsonl").read_text(encoding="utf-8").splitlines()[:CASES]
    for split in ("train", "dev", "test"):
        (suite / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    codes = sorted({json.loads(line)["code"] for line in lines})
    (root / "pipelines.yaml").write_text(_pipelines(mlflow_server, "state", codes))
    _link_models(root / "state", prepared_models)
    config = load_config(root / "pipelines.yaml")

    built = reindex_specialist(config, "coder", budget="smoke", show_progress=False)
    index = _register(config, "index", None, {"index_version": built.version}, index_version=built.version)
    _promote(config, "index", index)
    program = _register(config, "program", _program_folder(config), {"base_model": "gemma3-270m"})
    _promote(config, "program", program)
    adapters = [_register(config, "adapter", _adapter_folder(config, seed), {"seed": str(seed)}) for seed in (1, 2)]
    _promote(config, "adapter", adapters[0])
    specialist = register_specialist(config, "coder", _run(config, "test specialist"), actor="test", reason="test")
    assert specialist is not None
    return {
        "root": root,
        "config": config,
        "index_version": built.version,
        "versions": {"index": index, "program": program, "adapter": adapters[0]},
        "adapters": adapters,
        "specialist": str(specialist.version),
        "cases": [json.loads(line) for line in lines],
        "codes": codes,
    }


LOAD_SCRIPT = """
import json, sys
import mlflow

uris, cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
found = {}
for uri in uris:
    model = mlflow.pyfunc.load_model(uri)
    example = model.input_example
    frame = model.predict(example)
    found[uri] = {
        "inputs": model.metadata.get_input_schema().input_names(),
        "example": example if isinstance(example, dict) else example.to_dict(orient="records")[0],
        "answer": frame.to_dict(orient="records")[0],
    }
    if uri.endswith(".coder@champion"):
        found["cases"] = model.predict(cases).to_dict(orient="records")
print("RESULT " + json.dumps(found, default=list))
"""


@pytest.fixture(scope="module")
def loaded(registry: dict, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each kind and the specialist loaded in a fresh process, with nothing but the MLflow server's address."""
    uris = [f"models:/{PROJECT}.coder.{kind}@champion" for kind in ("index", "program", "adapter")]
    uris.append(f"models:/{PROJECT}.coder@champion")
    cases = [{"phrase": case["phrase"]} for case in registry["cases"]]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "CADRE_MODEL_CACHE": str(tmp_path_factory.mktemp("model-cache")),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, json.dumps(uris), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path_factory.mktemp("elsewhere"),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_each_kind_loads_in_a_fresh_process_and_answers_its_input_example(loaded: dict, registry: dict) -> None:
    for kind in ("index", "program", "adapter"):
        result = loaded[f"models:/{PROJECT}.coder.{kind}@champion"]
        assert result["inputs"] == ["phrase"], kind
        assert result["example"]["phrase"] == registry["cases"][0]["phrase"], kind
        assert len(result["answer"]["retrieved_ids"]) == 3, kind
        assert set(result["answer"]["retrieved_ids"]) <= set(_held_ids(registry)), kind
    index = loaded[f"models:/{PROJECT}.coder.index@champion"]["answer"]
    assert registry["cases"][0]["code"] in index["retrieved_ids"]
    for kind in ("program", "adapter"):
        assert loaded[f"models:/{PROJECT}.coder.{kind}@champion"]["answer"]["code"], kind
    composite = loaded[f"models:/{PROJECT}.coder@champion"]
    assert composite["answer"]["code"] and len(loaded["cases"]) == CASES


def _held_ids(registry: dict) -> list[str]:
    from cadre.knowledge.index import IndexLayout

    manifest = IndexLayout(registry["config"].state_dir, "coder").read_manifest(registry["index_version"])
    return [doc_id.split(":", 1)[1] for doc_id in manifest.documents]


def test_the_registry_page_of_each_version_reads_its_signature(registry: dict, mlflow_server: str) -> None:
    """The MLflow UI shows a version's schema from `GET /model-versions/get-artifact?path=MLmodel`, which the server
    resolves in its own process: a version whose source it cannot read there shows "Inputs (0)"."""
    for name, version in [
        *((f"{PROJECT}.coder.{kind}", number) for kind, number in registry["versions"].items()),
        (f"{PROJECT}.coder", registry["specialist"]),
    ]:
        response = httpx.get(
            f"{mlflow_server}/model-versions/get-artifact",
            params={"path": "MLmodel", "name": name, "version": version},
            timeout=30,
        )
        assert response.status_code == 200, (name, response.text[:500])
        assert "signature:" in response.text and '"name": "phrase"' in response.text, (name, response.text[:800])


def test_the_specialist_version_names_its_parts(registry: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(registry["config"].project.mlflow.uri)
    version = client.get_model_version_by_alias(f"{PROJECT}.coder", "champion")
    for kind, number in registry["versions"].items():
        assert version.tags[f"cadre.part.{kind}"] == f"models:/{PROJECT}.coder.{kind}/{number}"
    assert version.tags["cadre.registration"] == "complete"


def _start(command: list[str], cwd: Path, env: dict, log_path: Path, ready_url: str) -> subprocess.Popen:
    log = log_path.open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"{command[:4]} exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            _stop(process)
            pytest.fail(f"{command[:4]} not ready after {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def remote_server(registry: dict, mlflow_server: str, prepared_models: Path, tmp_path_factory) -> Iterator[dict]:
    """`cadre serve` on another machine's state dir: the same pipelines file, no index, nothing downloaded yet."""
    root = tmp_path_factory.mktemp("remote")
    shutil.copytree(registry["root"] / "suite", root / "suite")
    (root / "pipelines.yaml").write_text(_pipelines(mlflow_server, "remote-state", registry["codes"]))
    _link_models(root / "remote-state", prepared_models)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    command = [sys.executable, "-m", "cadre.cli", "serve", "-c", str(root / "pipelines.yaml"), "--port", str(port)]
    process = _start(
        command + ["--poll-interval", "2"], root, env, root / "serve.log", f"http://127.0.0.1:{port}/health"
    )
    try:
        yield {"url": f"http://127.0.0.1:{port}", "state": root / "remote-state", "log": root / "serve.log"}
    finally:
        _stop(process)


def _chat(url: str, content: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "coder", "messages": [{"role": "user", "content": content}]},
        timeout=120,
    )


def test_cadre_serve_elsewhere_serves_the_registry_with_the_answers_of_the_specialist_model(
    remote_server: dict, registry: dict, loaded: dict
) -> None:
    assert not (remote_server["state"] / "index").exists(), "the remote state dir must hold no index of its own"
    downloaded = remote_server["state"] / "serving" / "coder" / f"index-v{registry['versions']['index']}"
    assert (downloaded / "state" / "index" / "coder" / "lancedb" / f"{registry['index_version']}.lance").is_dir()
    same = 0
    for case, expected in zip(registry["cases"], loaded["cases"], strict=True):
        response = _chat(remote_server["url"], case["phrase"])
        assert response.status_code == 200, response.text
        body = response.json()["cadre"]
        assert body["versions"] == {
            "program": registry["versions"]["program"],
            "index": registry["index_version"],
            "adapter": registry["versions"]["adapter"],
        }
        assert body["retrieved_ids"] == expected["retrieved_ids"], case
        same += body["outputs"]["code"] == expected["code"]
    assert same == CASES


def test_cadre_serve_elsewhere_swaps_the_adapter_when_its_alias_moves(remote_server: dict, registry: dict) -> None:
    _promote(registry["config"], "adapter", registry["adapters"][1])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        response = _chat(remote_server["url"], registry["cases"][0]["phrase"])
        assert response.status_code == 200, response.text
        if response.headers["x-cadre-adapter-version"] == registry["adapters"][1]:
            return
        time.sleep(1)
    pytest.fail(f"the adapter was not swapped in:\n{remote_server['log'].read_text()[-3000:]}")


def test_mlflow_models_serve_answers_a_request(registry: dict, loaded: dict, mlflow_server: str, tmp_path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "CADRE_MODEL_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        # MLflow starts `uvicorn` by name: the one beside this interpreter, as in an activated virtualenv.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    uri = f"models:/{PROJECT}.coder@champion"
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    command = [mlflow_cli, "models", "serve", "-m", uri, "--env-manager", "local", "-p", str(port), "-w", "1"]
    process = _start(command, tmp_path, env, tmp_path / "models-serve.log", f"http://127.0.0.1:{port}/ping")
    try:
        case = registry["cases"][0]
        response = httpx.post(
            f"http://127.0.0.1:{port}/invocations",
            json={"dataframe_records": [{"phrase": case["phrase"]}]},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        prediction = response.json()["predictions"][0]
        assert prediction["code"] == loaded["cases"][0]["code"]
        assert prediction["retrieved_ids"] == loaded["cases"][0]["retrieved_ids"]
    finally:
        _stop(process)


def test_a_version_registered_by_the_previous_release_is_read(
    registry: dict, remote_server: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program version without `MLmodel` (as the previous release registered them) still serves and composes."""
    import mlflow
    from mlflow import MlflowClient

    from cadre.registry.models import register_specialist
    from cadre.registry.versions import register_candidate

    config = registry["config"]
    client = MlflowClient(config.project.mlflow.uri)
    run_id = _run(config, "previous release program")
    client.log_artifacts(run_id, str(_program_folder(config)), "program")
    old = register_candidate(
        client, project=PROJECT, specialist="coder", kind="program", run_id=run_id, artifact_path="program", lineage={}
    )
    assert not any(item.path.endswith("MLmodel") for item in client.list_artifacts(run_id, "program"))
    _promote(config, "program", str(old.version))
    composite = register_specialist(config, "coder", run_id, actor="test", reason="an old part")
    assert composite.tags["cadre.part.program"] == f"models:/{PROJECT}.coder.program/{old.version}"

    monkeypatch.setenv("CADRE_MODEL_CACHE", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(config.project.mlflow.uri)
    model = mlflow.pyfunc.load_model(f"models:/{PROJECT}.coder/{composite.version}")
    answer = model.predict([{"phrase": registry["cases"][0]["phrase"]}]).to_dict(orient="records")[0]
    assert len(answer["retrieved_ids"]) == 3

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        response = _chat(remote_server["url"], registry["cases"][0]["phrase"])
        if response.headers.get("x-cadre-program-version") == str(old.version):
            assert response.json()["cadre"]["outputs"]["code"] == answer["code"]
            return
        time.sleep(1)
    pytest.fail(f"the old program version was not served:\n{remote_server['log'].read_text()[-3000:]}")


def test_cadre_serve_elsewhere_downloads_and_swaps_in_an_index_version_when_its_alias_moves(
    registry: dict, remote_server: dict
) -> None:
    """The same table registered again is another index version: the server downloads it and swaps it in."""
    config = registry["config"]
    swaps = remote_server["log"].read_text().count("swapped in")
    again = _register(
        config, "index", None, {"index_version": registry["index_version"]}, index_version=registry["index_version"]
    )
    _promote(config, "index", again)
    deadline = time.monotonic() + 120
    while remote_server["log"].read_text().count("swapped in") == swaps:
        if time.monotonic() > deadline:
            pytest.fail(f"no swap after the index alias moved:\n{remote_server['log'].read_text()[-3000:]}")
        time.sleep(1)
    folder = remote_server["state"] / "serving" / "coder" / f"index-v{again}"
    assert (folder / "state" / "index" / "coder" / "lancedb" / f"{registry['index_version']}.lance").is_dir()
    response = _chat(remote_server["url"], registry["cases"][0]["phrase"])
    assert response.status_code == 200 and len(response.json()["cadre"]["retrieved_ids"]) == 3


def test_a_worker_that_shares_only_mlflow_installs_and_searches_the_index_champion(
    registry: dict, mlflow_server: str, prepared_models: Path, tmp_path: Path
) -> None:
    """The flows find the index through its `champion` alias: a worker on another state dir installs the version."""
    from cadre.config import load_config
    from cadre.knowledge.reindex import live_version
    from cadre.prompts.program import open_retriever
    from cadre.runtime.retrieval import IndexTarget
    from tasks.reindex import sync_live_pointer

    (tmp_path / "suite").mkdir()
    (tmp_path / "pipelines.yaml").write_text(_pipelines(mlflow_server, "worker-state", registry["codes"]))
    _link_models(tmp_path / "worker-state", prepared_models)
    worker = load_config(tmp_path / "pipelines.yaml")
    assert live_version(worker.state_dir, "coder") is None

    assert sync_live_pointer.fn(worker, "coder") == registry["index_version"]
    assert live_version(worker.state_dir, "coder") == registry["index_version"]
    assert not (worker.state_dir / "downloads" / "coder").exists() or not any(
        (worker.state_dir / "downloads" / "coder").iterdir()
    ), "the download is removed once the version is installed"
    built = IndexTarget.from_config(registry["config"], "coder", pin_live=False)
    here = open_retriever(dataclasses.replace(built, version=registry["index_version"]))  # where it was built
    there = open_retriever(IndexTarget.from_config(worker, "coder"))
    for case in registry["cases"]:
        assert [p.id for p in there(case["phrase"], 3)] == [p.id for p in here(case["phrase"], 3)]
    assert sync_live_pointer.fn(worker, "coder") == registry["index_version"]  # installed once; a re-run is a no-op


def test_an_index_embedded_by_a_fine_tuned_embedder_carries_it_to_a_worker_and_to_its_model(
    registry: dict, mlflow_server: str, prepared_models: Path, tmp_path: Path
) -> None:
    """The fine-tuned embedder's folder is on the builder's disk only: the index version carries it."""
    import mlflow

    from cadre.config import load_config
    from cadre.knowledge.embedding import Embedder, resolve_model_path
    from cadre.knowledge.reindex import reindex_specialist
    from cadre.prompts.program import open_retriever
    from cadre.registry.models import install_index_version
    from cadre.runtime.retrieval import IndexTarget

    builder_root = tmp_path / "builder"
    (builder_root / "suite").mkdir(parents=True)
    (builder_root / "pipelines.yaml").write_text(_pipelines(mlflow_server, "state", registry["codes"]))
    _link_models(builder_root / "state", prepared_models)
    builder = load_config(builder_root / "pipelines.yaml")
    # A "fine-tuned" embedder: the packaged model's files plus a note, so its fingerprint is not the packaged one.
    tuned = builder_root / "embedders" / "tuned"
    shutil.copytree(resolve_model_path(builder.project.embedding.model), tuned)
    (tuned / "cadre_note.txt").write_text("a fine-tuned embedder stand-in\n")
    embedder = Embedder.from_folder(tuned, batch_size=8, threads=1, registry_version="7")
    packaged = Embedder.load(builder.project.embedding, builder.project.threads, root=builder.root)
    assert embedder.fingerprint != packaged.fingerprint
    built = reindex_specialist(builder, "coder", budget="smoke", show_progress=False, embedder=embedder)
    version = _register(builder, "index", None, {"index_version": built.version}, index_version=built.version)
    here = open_retriever(
        dataclasses.replace(IndexTarget.from_config(builder, "coder", pin_live=False), version=built.version)
    )
    expected = {case["phrase"]: [p.id for p in here(case["phrase"], 3)] for case in registry["cases"]}
    shutil.move(tuned, builder_root / "embedders" / "gone")  # the builder machine is out of reach now

    (tmp_path / "worker" / "suite").mkdir(parents=True)
    (tmp_path / "worker" / "pipelines.yaml").write_text(_pipelines(mlflow_server, "state", registry["codes"]))
    _link_models(tmp_path / "worker" / "state", prepared_models)
    worker = load_config(tmp_path / "worker" / "pipelines.yaml")
    name = f"{PROJECT}.coder.index"
    assert install_index_version(worker, "coder", version, built.version, mlflow_server)
    assert (worker.state_dir / "index" / "coder" / "embedders" / embedder.fingerprint / "cadre_note.txt").is_file()
    there = open_retriever(
        dataclasses.replace(IndexTarget.from_config(worker, "coder", pin_live=False), version=built.version)
    )
    assert {phrase: [p.id for p in there(phrase, 3)] for phrase in expected} == expected

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    answers = model.predict([{"phrase": phrase} for phrase in expected]).to_dict(orient="records")
    assert [row["retrieved_ids"][:3] for row in answers] == [list(ids) for ids in expected.values()]


def _stored_bytes(client, run_id: str, folder: str) -> int:
    """Bytes of the files a run stores under `folder` (recursively)."""
    total = 0
    for item in client.list_artifacts(run_id, folder):
        total += _stored_bytes(client, run_id, item.path) if item.is_dir else (item.file_size or 0)
    return total


def test_an_index_version_after_a_small_change_stores_only_its_new_table_files(
    registry: dict, mlflow_server: str, prepared_models: Path, tmp_path: Path
) -> None:
    """A re-index that adds two documents registers a version that uploads its new fragment and manifests, not the
    table; `mlflow.pyfunc.load_model` and `download_version` fetch the rest from the run that stores it, and
    search it like the table it was built from. A file whose run is gone is named in the error."""
    import mlflow
    from mlflow import MlflowClient

    from cadre.config import load_config
    from cadre.knowledge.reindex import promote_version, reindex_specialist
    from cadre.prompts.program import open_retriever
    from cadre.registry.models import TABLE_FILES, ModelError, complete_table, download_version, model_settings
    from cadre.runtime.retrieval import IndexTarget

    root = tmp_path / "changing"
    (root / "suite").mkdir(parents=True)
    text = _pipelines(mlflow_server, "state", registry["codes"])
    (root / "pipelines.yaml").write_text(text)
    _link_models(root / "state", prepared_models)
    config = load_config(root / "pipelines.yaml")
    first = reindex_specialist(config, "coder", budget="smoke", show_progress=False)
    promote_version(config.state_dir, "coder", first.version)
    (root / "pipelines.yaml").write_text(text.replace("max_documents: 60", "max_documents: 62"))
    changed = load_config(root / "pipelines.yaml")
    second = reindex_specialist(changed, "coder", budget="smoke", show_progress=False)
    assert second.documents_total == first.documents_total + 2 and second.chunks_embedded <= 4

    client = MlflowClient(mlflow_server)
    name = f"{PROJECT}.coder.index"
    versions = [
        _register(changed, "index", None, {"index_version": built.version}, index_version=built.version)
        for built in (first, second)
    ]
    runs = [client.get_model_version(name, version).run_id for version in versions]
    table = f"index/state/index/coder/lancedb/{second.version}.lance"
    whole = _stored_bytes(client, runs[0], f"index/state/index/coder/lancedb/{first.version}.lance")
    stored = _stored_bytes(client, runs[1], table)
    local = sum(
        path.stat().st_size
        for path in (config.state_dir / "index/coder/lancedb").glob(f"{second.version}.lance/**/*")
        if path.is_file()
    )
    assert stored < whole / 3, f"the changed version stored {stored} bytes of its {local}-byte table (whole: {whole})"

    here = open_retriever(
        dataclasses.replace(IndexTarget.from_config(changed, "coder", pin_live=False), version=second.version)
    )
    expected = [[p.id for p in here(case["phrase"], 3)] for case in registry["cases"]]
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{versions[1]}")
    answers = model.predict([{"phrase": case["phrase"]} for case in registry["cases"]]).to_dict(orient="records")
    assert [row["retrieved_ids"][:3] for row in answers] == expected

    folder = download_version(name, versions[1], tmp_path / "download", mlflow_server)
    shipped = folder / "state/index/coder/lancedb" / f"{second.version}.lance"
    built_here = config.state_dir / "index/coder/lancedb" / f"{second.version}.lance"
    assert {p.relative_to(shipped): p.stat().st_size for p in shipped.rglob("*") if p.is_file()} == {
        p.relative_to(built_here): p.stat().st_size for p in built_here.rglob("*") if p.is_file()
    }

    settings = model_settings(folder)
    carried = {inside: where for inside, where in settings["index"][TABLE_FILES].items() if where["run_id"] == runs[0]}
    assert carried, "the changed version stores every file itself"
    inside = sorted(carried)[0]
    (shipped / inside).unlink()
    lost = {**settings["index"][TABLE_FILES], inside: {**carried[inside], "run_id": "0" * 32}}
    with pytest.raises(ModelError, match=rf"table file {inside} is stored with run 0{{32}}"):
        complete_table(folder, {**settings, "index": {**settings["index"], TABLE_FILES: lost}}, mlflow_server)

    # The first run deleted: a new registration stores those files again instead of referring to them.
    client.delete_run(runs[0])
    again = _register(changed, "index", None, {"index_version": second.version}, index_version=second.version)
    again_settings = model_settings(download_version(name, again, tmp_path / "again", mlflow_server))
    assert runs[0] not in {where["run_id"] for where in again_settings["index"][TABLE_FILES].values()}


def _edge_config(registry: dict, mlflow_server: str, prepared_models: Path, root: Path, edge: str):
    """The registry's project on another state dir, with `edge:` settings for the specialist."""
    from cadre.config import load_config

    (root / "suite").mkdir(parents=True)
    for split in ("train", "dev", "test"):
        shutil.copyfile(registry["root"] / "suite" / f"{split}.jsonl", root / "suite" / f"{split}.jsonl")
    text = _pipelines(mlflow_server, "state", registry["codes"])
    text = text.replace("    smoke: {max_documents: 60}\n", f"    smoke: {{max_documents: 60}}\n    edge: {edge}\n")
    (root / "pipelines.yaml").write_text(text)
    _link_models(root / "state", prepared_models)
    return load_config(root / "pipelines.yaml")


def test_a_bundle_is_published_only_when_it_passes_its_rules(
    registry: dict, mlflow_server: str, prepared_models: Path, tmp_path: Path
) -> None:
    """`publish_bundle` judges the bundle beside the served champion; a refused one never replaces the published one."""
    from cadre.edge.judge import publish_bundle

    config = _edge_config(registry, mlflow_server, prepared_models, tmp_path / "a", "{cases: 3}")
    target = tmp_path / "bundles" / "coder"
    published = publish_bundle(config, "coder", target)
    assert published.published and published.folder == target
    judgement = json.loads((target / "bundle.json").read_text())["judgement"]
    assert judgement["verdict"] == "published" and judgement["cases"] == 3
    assert judgement["identical"] == 3, judgement["differences"]
    assert (target / "judgement.md").read_text().startswith("**Edge bundle of `coder`: PUBLISHED.**")

    strict = _edge_config(registry, mlflow_server, prepared_models, tmp_path / "b", "{cases: 2, max_size_mb: 1}")
    refused = publish_bundle(strict, "coder", target)
    assert not refused.published and refused.folder == tmp_path / "bundles" / "coder.refused"
    assert any("edge.max_size_mb 1" in failure for failure in refused.judgement.failures)
    assert json.loads((target / "bundle.json").read_text())["judgement"] == judgement, "the published bundle stays"
    assert not list((tmp_path / "bundles").glob("coder.candidate-*")), "no candidate folder is left behind"


def test_a_promotion_exports_the_bundle_and_tags_the_specialist_version(
    registry: dict, mlflow_server: str, prepared_models: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from cadre.edge.judge import EDGE_TAG, publish_after_promotion

    config = _edge_config(registry, mlflow_server, prepared_models, tmp_path, "{export_on_promotion: true, cases: 2}")
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(f"{PROJECT}.coder", "champion")
    assert publish_after_promotion(config, "coder", version.name, version.version, version.run_id)
    tag = client.get_model_version(version.name, version.version).tags[EDGE_TAG]
    assert tag.startswith("published: 2/2 identical"), tag
    logged = {item.path for item in client.list_artifacts(version.run_id, f"edge/coder-v{version.version}")}
    assert logged == {f"edge/coder-v{version.version}/judgement.md", f"edge/coder-v{version.version}/bundle.json"}
    assert (config.state_dir / "bundles" / "coder" / "bundle.json").is_file()
