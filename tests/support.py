"""Helpers the test tiers share (importable as `support`: pytest puts `tests/` on sys.path for its conftest)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SUITE_SPLITS = ("train", "dev", "test")


def suite_folder(name: str):
    """`evals/suites/NAME` of this checkout."""
    from pathlib import Path

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
