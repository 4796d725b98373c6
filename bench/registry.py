"""Benchmark: resolve and load the champion specialist from the MLflow registry, against a bare download.

Printed side by side, in one run:

1. cold: a fresh process with an empty model cache resolves `models:/<project>.<specialist>@champion` and
   loads it with `mlflow.pyfunc.load_model` (downloads the composite and its parts, the index table included,
   opens the index, loads the base model) and answers one case;
2. warm: the same in another fresh process, with the parts already in the cache (`CADRE_MODEL_CACHE`);
3. bare: `mlflow.artifacts.download_artifacts` of the same files (the composite's folder and each part's), in a
   fresh process, nothing else;

and the ratios cold / bare and warm / bare. Then:

4. a 1 % change (half edited, a quarter deleted, a quarter added; `bench/reindex.py`'s change set) re-indexed and
   registered: what the new index version stores in MLflow (its table as a difference from the registered
   versions, `cadre.registry.models.upload_table`) and how long that takes, against a bare `log_artifacts` of its
   whole table; and both index versions loaded cold in fresh processes (the changed one fetches the files it refers
   to).

The specialist is set up first, on the MLflow server given (default: the demo stack's, `cadre up`), under its own
project name (`bench-registry`, so the demo's models are untouched): an index of `--documents` ICD-10-CM codes
built in a temporary state dir, registered as a model with its table and made champion, and the specialist
registered as one model (declared program, base model).

Run from the repository root, with the stack up:

    OMP_NUM_THREADS=1 .venv/bin/python bench/registry.py                  # 2000 documents
    OMP_NUM_THREADS=1 .venv/bin/python bench/registry.py --documents 200  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = "bench-registry"
SPECIALIST = "coder"
CASE = {"phrase": "Typhoid fever with heart involvement"}


def register_index(client, config, run_id: str, index_version: str):
    """Register the index version as a model (its table logged under the run's `index/`), as the index flow does."""
    from cadre.registry.models import model_spec
    from cadre.registry.versions import register_candidate

    return register_candidate(
        client,
        project=PROJECT,
        specialist=SPECIALIST,
        kind="index",
        run_id=run_id,
        artifact_path="index",
        lineage={"index_version": index_version},
        actor="bench",
        model=model_spec(config, SPECIALIST, "index", index_version=index_version),
    )


def set_up(root: Path, tracking_uri: str, documents: int) -> str:
    """Build, register and promote the index and the specialist; returns the composite's URI."""
    from mlflow import MlflowClient

    from cadre.config import load_config
    from cadre.knowledge.reindex import promote_version, reindex_specialist
    from cadre.registry.models import register_specialist, specialist_model_name
    from cadre.registry.versions import promote

    demo = load_config(REPO / "pipelines.yaml")
    state = root / "state"
    state.mkdir()
    (state / "models").symlink_to(demo.state_dir.resolve() / "models", target_is_directory=True)
    suite = root / "suite"
    suite.mkdir()
    (suite / "test.jsonl").write_text(json.dumps({**CASE, "code": "A01.02"}) + "\n")
    (root / "pipelines.yaml").write_text(
        textwrap.dedent(f"""\
        version: 1
        project:
          name: {PROJECT}
          state_dir: state
          mlflow: {{tracking_uri: "{tracking_uri}"}}
          threads: {{torch: 1, embedding: 1}}
        specialists:
          - name: {SPECIALIST}
            description: Medical coding, a clinical phrase to its billable ICD-10-CM code.
            sources:
              - kind: python
                name: icd10cm
                entrypoint: bench.reindex:icd10_documents
                options: {{change: 0.0, limit: {documents}, priority_ids: ["A01.02"]}}
            program:
              instruction: Given a clinical phrase and candidate ICD-10-CM codes with their descriptions, answer with the single billable code that classifies the phrase.
              inputs: [{{name: phrase}}]
              outputs: [{{name: code}}]
              retrieve_k: 3
              max_tokens: 8
            evaluation: {{suite: suite, answer_metrics: [exact_match], retrieval_metrics: ["recall@3"]}}
            smoke: {{max_documents: {2 * documents}, max_wall_seconds: 7200}}
        """)
    )
    config = load_config(root / "pipelines.yaml")
    built = reindex_specialist(config, SPECIALIST, budget="smoke", show_progress=False)
    promote_version(config.state_dir, SPECIALIST, built.version)  # the change of section 4 is built from it
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(PROJECT) or client.get_experiment(client.create_experiment(PROJECT))
    run_id = client.create_run(experiment.experiment_id, run_name="bench registry").info.run_id
    version = register_index(client, config, run_id, built.version)
    promote(
        client,
        project=PROJECT,
        specialist=SPECIALIST,
        kind="index",
        version=version.version,
        actor="bench",
        force=True,
        reason="bench/registry.py",
    )
    register_specialist(config, SPECIALIST, run_id, actor="bench", reason="bench/registry.py")
    client.set_terminated(run_id)
    return f"models:/{specialist_model_name(PROJECT, SPECIALIST)}@champion"


LOAD = """
import json, sys, time
started = time.perf_counter()
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
loaded = time.perf_counter()
answer = model.predict([json.loads(sys.argv[2])]).to_dict(orient="records")[0]
print("RESULT " + json.dumps({"load_s": loaded - started, "answer_s": time.perf_counter() - loaded, "answer": answer}))
"""

BARE = """
import json, sys, tempfile, time
started = time.perf_counter()
import mlflow
from mlflow import MlflowClient
client = MlflowClient()
name, alias = sys.argv[1].removeprefix("models:/").split("@")
composite = client.get_model_version_by_alias(name, alias)
uris = [f"models:/{name}/{composite.version}"] + [v for k, v in composite.tags.items() if k.startswith("cadre.part.") and v]
with tempfile.TemporaryDirectory() as folder:
    for number, uri in enumerate(uris):
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=f"{folder}/{number}")
    print("RESULT " + json.dumps({"load_s": time.perf_counter() - started, "parts": uris}))
"""


def stored_bytes(client, run_id: str, folder: str) -> int:
    """Bytes a run stores under `folder`."""
    return sum(
        stored_bytes(client, run_id, item.path) if item.is_dir else (item.file_size or 0)
        for item in client.list_artifacts(run_id, folder)
    )


def registered_change(root: Path, tracking_uri: str) -> dict:
    """Section 4: 1 % of the documents change; the new version registered, against a bare upload of its table."""
    from mlflow import MlflowClient

    from cadre.config import load_config
    from cadre.knowledge.reindex import reindex_specialist
    from cadre.registry.versions import registered_model_name

    path = root / "pipelines.yaml"
    path.write_text(path.read_text().replace("change: 0.0,", "change: 0.01,"))
    config = load_config(path)
    started = time.perf_counter()
    built = reindex_specialist(config, SPECIALIST, budget="smoke", show_progress=False)
    reindex_s = time.perf_counter() - started
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(PROJECT)
    run_id = client.create_run(experiment.experiment_id, run_name="bench registry: 1 % change").info.run_id
    started = time.perf_counter()
    version = register_index(client, config, run_id, built.version)
    ours_s = time.perf_counter() - started
    table = config.state_dir / "index" / SPECIALIST / "lancedb" / f"{built.version}.lance"
    started = time.perf_counter()
    client.log_artifacts(run_id, str(table), "bare-table")
    bare_s = time.perf_counter() - started
    client.set_terminated(run_id)
    inside = f"index/state/index/{SPECIALIST}"
    name = registered_model_name(PROJECT, SPECIALIST, "index")
    return {
        "documents_changed": built.documents_added + built.documents_updated + built.documents_deleted,
        "chunks_embedded": built.chunks_embedded,
        "reindex_s": reindex_s,
        "ours_s": ours_s,
        "bare_s": bare_s,
        "ours_bytes": stored_bytes(client, run_id, "index"),
        "ours_table_bytes": stored_bytes(client, run_id, f"{inside}/lancedb"),
        "ours_manifest_bytes": stored_bytes(client, run_id, f"{inside}/manifests"),
        "bare_bytes": stored_bytes(client, run_id, "bare-table"),
        "table_bytes": sum(p.stat().st_size for p in table.rglob("*") if p.is_file()),
        "changed_uri": f"models:/{name}/{version.version}",
        "first_uri": f"models:/{name}@champion",
    }


def measure(script: str, uri: str, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", script, uri, json.dumps(CASE)], capture_output=True, text=True, env=env, timeout=900
    )
    if done.returncode != 0:
        raise SystemExit(f"measurement failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default="http://127.0.0.1:5000", help="MLflow server (default: cadre up's)")
    parser.add_argument("--documents", type=int, default=2000, help="ICD-10-CM codes in the index")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))  # the sources' entrypoint, bench.reindex:icd10_documents

    with tempfile.TemporaryDirectory(prefix="cadre-bench-registry-") as folder:
        root = Path(folder)
        started = time.perf_counter()
        uri = set_up(root, args.tracking_uri, args.documents)
        print(f"set up {uri} ({args.documents} documents) in {time.perf_counter() - started:.1f} s")
        env = {**os.environ, "MLFLOW_TRACKING_URI": args.tracking_uri, "CADRE_MODEL_CACHE": str(root / "cache")}
        cold = measure(LOAD, uri, env)
        warm = measure(LOAD, uri, env)
        bare = measure(BARE, uri, env)
        size = sum(p.stat().st_size for p in (root / "cache").rglob("*") if p.is_file())
        change = registered_change(root, args.tracking_uri)
        loads = {
            label: measure(LOAD, change[key], {**env, "CADRE_MODEL_CACHE": str(root / f"cache-{key}")})
            for label, key in (("first version (stored whole)", "first_uri"), ("changed (a difference)", "changed_uri"))
        }
    print(f"parts: {', '.join(bare['parts'])}; {size / 1e6:.1f} MB of parts in the cache")
    print(f"{'':28}{'seconds':>10}{'/ bare':>10}")
    for label, found in (("cold: resolve + load", cold), ("warm: resolve + load", warm), ("bare download", bare)):
        print(f"{label:28}{found['load_s']:>10.2f}{found['load_s'] / bare['load_s']:>10.2f}")
    print(f"first answer after load: cold {cold['answer_s']:.2f} s, warm {warm['answer_s']:.2f} s: {warm['answer']}")
    mb = 1e6
    print(
        f"\n1 % change: {change['documents_changed']} documents changed, {change['chunks_embedded']} chunks embedded "
        f"in {change['reindex_s']:.1f} s; the new version's table is {change['table_bytes'] / mb:.2f} MB"
    )
    print(f"{'registering it':52}{'seconds':>10}{'MB stored':>12}{'/ bare':>10}")
    for label, seconds, stored in (
        ("ours: the index model (table as a difference)", change["ours_s"], change["ours_bytes"]),
        ("  of which its table files", None, change["ours_table_bytes"]),
        ("  of which its manifest (whole)", None, change["ours_manifest_bytes"]),
        ("bare: log_artifacts of the whole table", change["bare_s"], change["bare_bytes"]),
    ):
        when = f"{seconds:>10.2f}" if seconds is not None else f"{'':>10}"
        print(f"{label:52}{when}{stored / mb:>12.2f}{stored / change['bare_bytes']:>10.3f}")
    print(f"{'loading the index model cold (fresh process)':52}{'seconds':>10}")
    for label, found in loads.items():
        print(f"{label:52}{found['load_s']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
