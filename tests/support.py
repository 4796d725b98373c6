"""Helpers the test tiers share (importable as `support`: pytest puts `tests/` on sys.path for its conftest)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path


def project_name(prefix: str, tmp_path: Path) -> str:
    """A project name of its own for a test's folder: MLflow experiments and registered models are named after it,
    so tests sharing one MLflow server never read each other's versions."""
    return f"{prefix}-{tmp_path.name[-6:].lower().replace('_', '-').strip('-') or 'x'}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SUITE_SPLITS = ("train", "dev", "test")


def suite_folder(name: str):
    """`evals/suites/NAME` of this checkout."""
    return Path(__file__).resolve().parents[1] / "evals" / "suites" / name


def committed_suite(name: str) -> dict[str, list[dict]]:
    """The cases of a shipped suite (`evals/suites/NAME`), per split; fails if a committed line is malformed."""
    from cadre.evaluation.results import read_split

    folder = suite_folder(name)
    loaded = {split: read_split(folder, split) for split in SUITE_SPLITS}
    assert all(not read.skipped for read in loaded.values()), f"the committed {name} suite has malformed lines"
    return {split: read.cases for split, read in loaded.items()}


def committed_manifest(name: str) -> dict:
    """A shipped suite's manifest, checked against its files: each split's sha256 and line count."""
    import hashlib
    import json

    folder = suite_folder(name)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    for split in SUITE_SPLITS:
        payload = (folder / f"{split}.jsonl").read_bytes()
        assert hashlib.sha256(payload).hexdigest() == manifest["sha256"][f"{split}.jsonl"]
        assert payload.count(b"\n") == manifest["counts"][split]
    return manifest


def assert_rebuilt_identically(name: str, built) -> None:
    """Every file of a fresh build (in folder `built`) equals the committed suite's, byte for byte."""
    folder = suite_folder(name)
    for file in ("train.jsonl", "dev.jsonl", "test.jsonl", "manifest.json"):
        assert (built / file).read_bytes() == (folder / file).read_bytes(), f"{file} differs from a fresh build"


ICD_INSTRUCTION = "Given a clinical phrase and candidate ICD-10-CM codes, answer with the single billable code."
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "",
    "OMP_NUM_THREADS": "1",
}
"""A process environment in which nothing on the network can be reached (every proxy points at a closed port)."""


def icd_program(retrieve_k: int):
    """The ICD coder's program as the edge tests declare it: a phrase in, a code out, `retrieve_k` passages."""
    from cadre.config import ProgramSettings

    return ProgramSettings(
        instruction=ICD_INSTRUCTION,
        inputs=[{"name": "phrase", "description": "a diagnosis as a clinician writes it"}],
        outputs=[{"name": "code", "description": "one ICD-10-CM code, e.g. A01.02"}],
        retrieve_k=retrieve_k,
        max_tokens=12,
    )


def icd_index(root, specialist: str, documents: int = 20) -> str:
    """An index version of the first `documents` billable ICD-10-CM codes in `root / "state"` (packaged MiniLM,
    LanceDB); returns its name."""
    from cadre.config.knowledge import ChunkingSettings, PythonSource
    from cadre.config.project import EmbeddingSettings, ThreadSettings
    from cadre.knowledge.embedding import Embedder
    from cadre.knowledge.reindex import plan_and_apply

    source = PythonSource(
        kind="python", name="icd10cm", entrypoint="cadre.demo.icd10:load_documents", options={"billable_only": True}
    )
    built = plan_and_apply(
        specialist,
        [source],
        ChunkingSettings(max_tokens=128, overlap_tokens=16),
        root=root,
        state_dir=root / "state",
        embedder=Embedder.load(EmbeddingSettings(batch_size=32), ThreadSettings(embedding=1)),
        max_documents=documents,
    )
    assert built.created_version and built.documents_total == documents
    return built.version


# -- a small project on the real local stack (`cadre up`), shared by the stack tiers -------------------------------

CADRE = [sys.executable, "-m", "cadre.cli"]


def write_sums_suite(folder: Path) -> None:
    """Sums to answer: enough for an optimize and a smoke refresh to run for real, small enough to be quick."""
    folder.mkdir(parents=True, exist_ok=True)
    sums = [(a, b) for a in range(2, 9) for b in range(1, 7)]
    for split, members in (("train", sums[:30]), ("dev", sums[30:36]), ("test", sums[36:42])):
        lines = [json.dumps({"question": f"What is {a} plus {b}?", "answer": str(a + b)}) for a, b in members]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def write_stack_project(
    root: Path,
    ports: dict[str, int],
    specialists: list[str],
    *,
    mlflow_workers: int = 1,
    heartbeat_timeout_s: int = 300,
) -> Path:
    """`root/pipelines.yaml`: project `stacktest` on the given ports, one sums specialist per name. With a
    `database` port, MLflow and Prefect keep their records in a PostgreSQL that `cadre up` starts on it."""
    write_sums_suite(root / "evals" / "suite")
    team = "".join(
        textwrap.dedent(
            f"""\
              - name: {name}
                description: test specialist {name}
                program:
                  instruction: Answer.
                  inputs: [{{name: question}}]
                  outputs: [{{name: answer}}]
                  retrieve_k: 0
                evaluation: {{suite: evals/suite}}
                smoke: {{max_eval_cases: 4, max_train_steps: 60, max_lm_calls: 12, max_wall_seconds: 240}}
            """
        )
        for name in specialists
    )
    database = f"  database: {{backend: postgres, port: {ports['database']}}}\n" if "database" in ports else ""
    text = (
        textwrap.dedent(
            f"""\
            version: 1
            project:
              name: stacktest
              state_dir: state
              mlflow: {{port: {ports["mlflow"]}, workers: {mlflow_workers}}}
              prefect:
                port: {ports["prefect"]}
                work_pool: stacktest-pool
                max_concurrent_runs: 3
                heartbeat_timeout_s: {heartbeat_timeout_s}
              lm: {{port: {ports["lm"]}}}
            """
        )
        + database
        + "specialists:\n"
        + team
    )
    path = root / "pipelines.yaml"
    path.write_text(text)
    return path


def run_cadre(*args: str, config: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`cadre ARGS -c CONFIG` in a child process, without this shell's Prefect/MLflow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    return subprocess.run(
        [*CADRE, *args, "-c", str(config)] if args[0] not in ("validate",) else [*CADRE, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=config.parent,
        env=env,
    )


def processes_under(folder: Path) -> list[str]:
    """`pid: command line` of each live process whose command line names `folder`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if str(folder) in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (from /proc), children last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().split(")")[-1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(children.get(current, []))
    return found
