"""The smoke budget's wall-time cap holds for every stage, and a capped run keeps what it has and says so.

- plans: `smoke.max_wall_seconds` reaches the re-index, refresh and feedback plans under `smoke`, none under `full`;
- refresh: fine-tuning stops at the first step past the cap, checkpoints there, saves that step's adapter as a
  capped (not finished) one, and the next run resumes from that step to the end;
- feedback: DPO stops at the first step past the cap and hands over that step's adapter;
- re-index: the build stops reading documents, its version stays an unfinished build that cannot be made live,
  and the next run resumes it into a complete version holding every document.

Training runs a tiny random 2-layer Gemma 3 (the fixtures of test_finetune.py); the re-index the real MiniLM
embedder and LanceDB on six JSONL documents. A cap of 0 s stops each at its first step or document, so the
tests do not depend on the machine's speed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import test_finetune as tiny

from cadre.config import load_config
from cadre.config.budget import plan_reindex
from cadre.config.knowledge import ChunkingSettings, DatasetSource
from cadre.config.project import EmbeddingSettings, IndexBackendSettings, ThreadSettings
from cadre.config.tuning import FeedbackSettings
from cadre.feedback.store import PreferencePair
from cadre.knowledge.embedding import Embedder
from cadre.knowledge.index import IndexLayout, open_backend
from cadre.knowledge.reindex import IndexSearcher, live_version, plan_and_apply, promote_version
from cadre.tuning.dpo import plan_feedback, train_dpo
from cadre.tuning.finetune import CAPPED_DIR, FINAL_DIR, last_complete_checkpoint, plan_refresh

ROOT = Path(__file__).resolve().parents[2]

tiny_model = tiny.tiny_model
data = tiny.data


def test_smoke_plans_carry_the_wall_cap_and_full_plans_none() -> None:
    specialist = load_config(ROOT / "pipelines.yaml").specialist("icd10-coder")
    cap = float(specialist.smoke.max_wall_seconds)
    for plan in (plan_reindex, plan_refresh, plan_feedback):
        assert plan(specialist, "smoke").max_wall_seconds == cap, plan.__name__
        assert plan(specialist, "full").max_wall_seconds is None, plan.__name__


def test_fine_tuning_stops_at_the_wall_cap_keeps_that_step_and_the_next_run_resumes(tiny_model, data, tmp_path):
    settings = tiny.tuning(max_steps=4, checkpoint_every=100)
    said: list[str] = []
    capped = tiny.train(data, tiny_model, tmp_path / "run", settings, say=said.append, max_wall_seconds=0.0)

    assert capped.wall_capped and capped.global_step == 1 and capped.max_steps == 4
    assert capped.adapter_dir == tmp_path / "run" / CAPPED_DIR
    assert (capped.adapter_dir / "adapter_model.safetensors").exists() and math.isfinite(capped.heldout_loss)
    assert not (tmp_path / "run" / FINAL_DIR).exists(), "a capped adapter must not pass for the finished one"
    assert last_complete_checkpoint(tmp_path / "run").name == "checkpoint-1"
    assert any("wall-time cap (0 s) after step 1 of 4" in line for line in said), said

    finished = tiny.train(data, tiny_model, tmp_path / "run", settings)
    assert not finished.wall_capped and not finished.reused
    assert finished.resumed_from_step == 1 and finished.global_step == 4
    assert finished.adapter_dir == tmp_path / "run" / FINAL_DIR
    assert not (tmp_path / "run" / CAPPED_DIR).exists() and not list((tmp_path / "run").glob("checkpoint-*"))


def test_fine_tuning_under_a_cap_it_does_not_reach_is_not_capped(tiny_model, data, tmp_path):
    result = tiny.train(data, tiny_model, tmp_path / "run", tiny.tuning(max_steps=2), max_wall_seconds=3600.0)
    assert not result.wall_capped and result.global_step == 2 and result.adapter_dir.name == FINAL_DIR


def test_dpo_stops_at_the_wall_cap_with_the_adapter_of_that_step(tiny_model, tmp_path):
    pairs = [
        PreferencePair(f"Phrase: {row['phrase']}\nCode:", f" {row['code']}", " R99.9", f"r{n}")
        for n, row in enumerate(tiny.ROWS[:8])
    ]
    result = train_dpo(
        pairs,
        FeedbackSettings(),
        tiny.tuning(),
        base_model_dir=tiny_model,
        champion_adapter_dir=None,
        work_dir=tmp_path / "dpo",
        max_steps=5,
        threads=1,
        max_wall_seconds=0.0,
    )
    assert result.wall_capped and result.steps == 1 and result.max_steps == 5
    assert (result.adapter_dir / "adapter_model.safetensors").exists()


# --- re-index ------------------------------------------------------------------------------------

DOCUMENTS = {
    "os.path.split": "Split a pathname into a pair (head, tail) where tail is the last component.",
    "os.path.join": "Join one or more path components intelligently.",
    "json.dumps": "Serialize an object to a JSON formatted string.",
    "json.loads": "Deserialize a string containing a JSON document to a Python object.",
    "shutil.copy": "Copy the file src to the file or directory dst.",
    "time.sleep": "Delay execution for a given number of seconds.",
}
SOURCE = DatasetSource(kind="dataset", name="help", path="data/help.jsonl")
CHUNKING = ChunkingSettings(max_tokens=48, overlap_tokens=8)


def _reindex(project: Path, embedder: Embedder, **options):
    return plan_and_apply(
        "pyhelp",
        [SOURCE],
        CHUNKING,
        root=project,
        state_dir=project / "state",
        embedder=embedder,
        write_batch_size=2,
        **options,
    )


def test_a_wall_capped_reindex_never_goes_live_and_the_next_run_resumes_it(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "help.jsonl").write_text(
        "".join(json.dumps({"id": key, "text": text}) + "\n" for key, text in DOCUMENTS.items())
    )
    embedder = Embedder.load(EmbeddingSettings(batch_size=8), ThreadSettings(embedding=1))

    capped = _reindex(tmp_path, embedder, max_wall_seconds=0.0)
    assert capped.wall_capped and not capped.created_version and capped.manifest_path is None
    assert capped.documents_total == 1 and capped.chunks_embedded >= 1
    assert "wall-time cap (0 s) after 1 document(s)" in capped.wall_cap_note
    assert f"version {capped.version} stays an unfinished build" in capped.wall_cap_note
    with pytest.raises(ValueError, match="not complete"):
        promote_version(tmp_path / "state", "pyhelp", capped.version)
    assert live_version(tmp_path / "state", "pyhelp") is None
    assert [marker.version for marker in IndexLayout(tmp_path / "state", "pyhelp").builds()] == [capped.version]

    done = _reindex(tmp_path, embedder)
    assert done.resumed and done.created_version and not done.wall_capped and done.version == capped.version
    assert done.documents_total == len(DOCUMENTS)
    assert done.chunks_embedded == done.chunks_total - capped.chunks_embedded  # nothing embedded twice
    promote_version(tmp_path / "state", "pyhelp", done.version)
    searcher = IndexSearcher("pyhelp", tmp_path / "state", _backend(tmp_path, embedder), embedder)
    assert searcher.search("split a path into head and tail", k=1)[0].record_id == "os.path.split"


def _backend(project: Path, embedder: Embedder):
    return open_backend(IndexBackendSettings(), project / "state", "pyhelp", dimension=embedder.dimension)
