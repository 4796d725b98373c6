"""The retriever refresh's training data and plan: pairs from train cases, hard negatives mined from the index's
hits, the smoke budget's caps, and `cadre validate` refusing an embedder stage with nothing to train on."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from cadre.config import load_config
from cadre.config.checks import check_config
from cadre.knowledge.index.manifest import IndexKey, IndexLayout, Manifest
from cadre.tuning.embedder import build_pairs, pair_columns, pairs_fingerprint, plan_embedder, usable_cases

ROOT = Path(__file__).resolve().parents[2]

TEXTS = {"A01": "Typhoid fever\nA01: typhoid", "A02": "Salmonella\nA02: salmonella", "B01": "Varicella\nB01: pox"}


def test_a_pair_is_the_query_the_relevant_text_and_the_best_wrong_hits() -> None:
    cases = [
        {"id": "c1", "phrase": "typhoid", "relevant_ids": ["A01"]},
        {"id": "c2", "phrase": "chickenpox", "relevant_ids": ["B01"]},
    ]
    hits = [
        [("A01", TEXTS["A01"]), ("A02", TEXTS["A02"]), ("B01", TEXTS["B01"])],  # the relevant hit is skipped
        [("B01", TEXTS["B01"]), ("B01", TEXTS["B01"]), ("A01", TEXTS["A01"])],  # so are repeats of it
    ]
    pairs = build_pairs(cases, ["phrase"], TEXTS, hits, hard_negatives=1)
    assert [(p.case_id, p.query, p.positive, p.negatives) for p in pairs] == [
        ("c1", "typhoid", TEXTS["A01"], (TEXTS["A02"],)),
        ("c2", "chickenpox", TEXTS["B01"], (TEXTS["A01"],)),
    ]
    columns = pair_columns(pairs)
    assert list(columns) == ["anchor", "positive", "negative_1"]
    assert columns["negative_1"] == [TEXTS["A02"], TEXTS["A01"]]


def test_missing_negatives_are_filled_with_other_documents_and_never_the_relevant_one() -> None:
    cases = [{"id": "c1", "phrase": "typhoid", "relevant_ids": ["A01"]}]
    pairs = build_pairs(cases, ["phrase"], TEXTS, [[("A01", TEXTS["A01"])]], hard_negatives=2, seed=3)
    assert len(pairs[0].negatives) == 2
    assert set(pairs[0].negatives) == {TEXTS["A02"], TEXTS["B01"]}
    assert build_pairs(cases, ["phrase"], TEXTS, None, hard_negatives=0)[0].negatives == ()


def test_cases_the_index_cannot_answer_are_left_out_and_the_cap_holds() -> None:
    cases = usable_cases(
        [
            {"id": "a", "phrase": "typhoid", "relevant_ids": ["A01"]},
            {"id": "b", "phrase": "", "relevant_ids": ["A02"]},  # no query
            {"id": "c", "phrase": "something", "relevant_ids": []},  # nothing to retrieve
            {"id": "d", "phrase": "unknown", "relevant_ids": ["Z99"]},  # not in the index
            {"id": "e", "phrase": "salmonella", "relevant_ids": ["A02"]},
            {"id": "f", "phrase": "pox", "relevant_ids": ["B01"]},
        ],
        ["phrase"],
    )
    assert [case["id"] for case in cases] == ["a", "d", "e", "f"]
    pairs = build_pairs(cases, ["phrase"], TEXTS, None, hard_negatives=0, max_pairs=2)
    assert [p.case_id for p in pairs] == ["a", "e"]
    again = build_pairs(cases, ["phrase"], TEXTS, None, hard_negatives=0, max_pairs=2)
    assert pairs_fingerprint(pairs) == pairs_fingerprint(again)
    assert pairs_fingerprint(pairs) != pairs_fingerprint(pairs[:1])


def test_the_smoke_plan_caps_steps_pairs_documents_and_cases() -> None:
    settings = load_config(ROOT / "pipelines.yaml").specialist("icd10-coder")
    smoke = plan_embedder(settings, "smoke")
    assert smoke.max_steps == settings.smoke.max_train_steps
    assert smoke.max_train_pairs == settings.smoke.max_train_steps * settings.embedder.batch_size
    assert (smoke.max_documents, smoke.eval_cases) == (settings.smoke.max_documents, settings.smoke.max_eval_cases)
    full = plan_embedder(settings, "full")
    assert (full.max_steps, full.max_documents) == (settings.embedder.max_steps, settings.index.max_documents)
    with pytest.raises(ValueError, match="unknown budget"):
        plan_embedder(settings, "huge")


def test_a_manifest_records_its_embedder_and_old_manifests_still_read(tmp_path: Path) -> None:
    key = IndexKey("packaged:all-minilm-l6-v2", "abc", 384, 128, 16)
    layout = IndexLayout(tmp_path, "coder")
    manifest = Manifest("coder", "v1", None, key, {"d": ("h", ["c"])}, "t0", embedder={"model": "m", "path": "/m"})
    layout.write_manifest(manifest)
    layout.record_embedder_version("v1", "3")
    assert layout.read_manifest("v1").embedder == {"model": "m", "path": "/m", "registry_version": "3"}
    old = manifest.to_json()
    del old["embedder"]
    (layout.manifest_path("v2")).write_text(json.dumps(old | {"version": "v2"}))
    assert layout.read_manifest("v2").embedder == {}
    assert layout.read_manifest("v2").index_key.digest == key.digest, "the key of existing indexes is unchanged"


def _project_with(tmp_path: Path, train_rows: list[dict], embedder_block: str) -> Path:
    suite = tmp_path / "suite"
    suite.mkdir()
    for split in ("train", "dev", "test"):
        rows = train_rows if split == "train" else [{"id": "x", "phrase": "p", "code": "C1", "relevant_ids": ["C1"]}]
        (suite / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "C1.txt").write_text("condition one")
    path = tmp_path / "pipelines.yaml"
    path.write_text(
        textwrap.dedent("""\
        version: 1
        project: {name: checks}
        specialists:
          - name: coder
            description: test
            sources: [{kind: files, name: docs, path: docs}]
            program:
              instruction: Code it.
              inputs: [{name: phrase}]
              outputs: [{name: code}]
            evaluation: {suite: suite, retrieval_metrics: [recall@5]}
        """)
        + textwrap.indent(textwrap.dedent(embedder_block), "    ")
    )
    return path


def test_validate_refuses_an_embedder_stage_whose_train_split_has_no_pairs(tmp_path: Path) -> None:
    rows = [{"id": "t1", "phrase": "condition one", "code": "C1"}]  # no relevant_ids
    path = _project_with(tmp_path, rows, "schedules: {embedder: {cron: '0 2 15 * *'}}\n")
    findings = [f for f in check_config(load_config(path)) if "embedder" in f.field]
    assert len(findings) == 1 and findings[0].severity == "error"
    rendered = findings[0].render()
    assert rendered.startswith(f"{path}:12:17: specialists.coder.schedules.embedder: "), rendered  # the key's line
    assert "schedules.embedder" in rendered and "relevant_ids" in rendered

    block = tmp_path / "block"
    block.mkdir()
    path = _project_with(block, rows, "embedder: {max_steps: 5}\n")
    assert [f.field for f in check_config(load_config(path)) if "embedder" in f.field] == ["specialists.coder.embedder"]


def test_validate_accepts_an_embedder_stage_with_pairs_and_ignores_a_specialist_without_one(tmp_path: Path) -> None:
    rows = [{"id": "t1", "phrase": "condition one", "code": "C1", "relevant_ids": ["C1"]}]
    path = _project_with(tmp_path, rows, "schedules: {embedder: {cron: '0 2 15 * *'}}\n")
    assert not [f for f in check_config(load_config(path)) if "embedder" in f.field]
    other = tmp_path / "other"
    other.mkdir()
    path = _project_with(other, [{"id": "t1", "phrase": "p", "code": "C1"}], "")
    assert not [f for f in check_config(load_config(path)) if "embedder" in f.field]
    shutil.rmtree(other)


def test_a_version_is_searched_with_the_model_it_records_or_refused_when_that_model_changed(tmp_path: Path) -> None:
    from cadre.config.project import EmbeddingSettings, ThreadSettings
    from cadre.knowledge.embedding import Embedder, model_fingerprint

    packaged = Embedder.load(EmbeddingSettings(), ThreadSettings())
    assert packaged.with_model(packaged.model_ref, packaged.fingerprint) is packaged
    copy = tmp_path / "tuned"
    copy.mkdir()
    for path in packaged.model_dir.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(packaged.model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix in (".json", ".txt"):
                shutil.copyfile(path, target)
            else:
                target.symlink_to(path)
    (copy / "cadre_embedder.json").write_text('{"steps": 1}')
    recorded = model_fingerprint(copy)
    tuned = packaged.with_model(str(copy), recorded)
    assert (tuned.model_dir, tuned.fingerprint, tuned.batch_size) == (copy, recorded, packaged.batch_size)
    (copy / "cadre_embedder.json").write_text('{"steps": 2}')  # another training in the same folder
    with pytest.raises(ValueError, match="queries would not match its vectors"):
        packaged.with_model(str(copy), recorded)
    with pytest.raises(ValueError, match="which is not here"):
        packaged.with_model(str(tmp_path / "gone"), recorded)


def test_a_dataset_fingerprint_reads_its_disassembly_and_writes_none_into_a_prefect_run_log() -> None:
    """dill reads `dis` output by swapping sys.stdout; Prefect's log_prints patch would send it to the run log."""
    import builtins
    import contextlib
    import io

    import dill.detect
    from prefect.logging.loggers import patch_print

    from cadre.platform.env import unlogged_prints

    def uses_a_global() -> str:
        return json.dumps({})

    real = builtins.print
    with patch_print():
        with unlogged_prints():
            assert builtins.print is real
            shown = io.StringIO()
            with contextlib.redirect_stdout(shown):
                assert "json" in dill.detect.globalvars(uses_a_global)  # read from the captured disassembly
            assert shown.getvalue() == ""  # nothing leaked to the (run-log) stdout
        assert builtins.print is not real  # Prefect's patch is back for the flow's own prints


def test_a_case_that_is_itself_a_document_never_gets_it_as_a_negative() -> None:
    """The pronouncer's train words are documents (`evaluation.train_cases_in_corpus`): the word's own entry is the
    best hit of its query, yet it is neither relevant (its family is) nor wrong: it must not be taught as a negative."""
    cases = [{"id": "A02", "phrase": "salmonella", "relevant_ids": ["A01"]}]
    hits = [[("A02", TEXTS["A02"]), ("A01", TEXTS["A01"]), ("B01", TEXTS["B01"])]]
    assert build_pairs(cases, ["phrase"], TEXTS, hits, hard_negatives=1)[0].negatives == (TEXTS["B01"],)
