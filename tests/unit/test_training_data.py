"""Training data of the adapter refresh: rendered exactly like the program's prompts, deduplicated,
length-filtered by tokens, split with a stable held-out share, and fingerprinted."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cadre.runtime.prompt import FieldSpec, PromptSpec, render_completion, render_prompt
from cadre.tuning.training_data import (
    Record,
    build_training_data,
    examples_needed,
    read_first,
    read_records,
    token_counter,
    training_sources,
)

SPEC = PromptSpec("Answer with the ICD-10-CM code.", (FieldSpec("phrase"),), (FieldSpec("code"),))
WITH_CONTEXT = PromptSpec(
    "Answer with the code.", (FieldSpec("context"), FieldSpec("phrase")), (FieldSpec("code"),), "context"
)


def words(texts):
    return [len(text.split()) for text in texts]


def records(rows):
    return [Record("mem", number, row) for number, row in enumerate(rows, start=1)]


def build(rows, spec=SPEC, **options):
    settings = {"count_tokens": words, "max_length": 64, "heldout_fraction": 0.0, "seed": 0} | options
    return build_training_data(records(rows), spec, **settings)


def test_examples_are_the_programs_prompt_and_completion() -> None:
    data = build([{"phrase": "typhoid endocarditis", "code": "A01.02", "slice": "A00-B99"}])
    (example,) = data.train
    assert example.prompt == render_prompt(SPEC, {"phrase": "typhoid endocarditis"})
    assert example.completion == render_completion(SPEC, {"code": "A01.02"}) == " A01.02\n"
    assert example.prompt.endswith("Phrase: typhoid endocarditis\nCode:")


def test_retrieved_context_is_rendered_as_the_program_sees_it() -> None:
    asked = []

    def retrieve(inputs):
        asked.append(inputs["phrase"])
        return [f"A01.0{i} — candidate {i}" for i in range(1, 3)]

    data = build([{"phrase": "typhoid endocarditis", "code": "A01.02"}], spec=WITH_CONTEXT, retrieve=retrieve)
    assert asked == ["typhoid endocarditis"]
    assert (
        "Context:\n[1] A01.01 — candidate 1\n[2] A01.02 — candidate 2\nPhrase: typhoid endocarditis\nCode:"
        in data.train[0].prompt
    )
    demo = {"context": ["B00.0 — herpes"], "phrase": "eczema herpeticum", "code": "B00.0"}
    shown = build(
        [{"phrase": "typhoid endocarditis", "code": "A01.02"}],
        spec=WITH_CONTEXT,
        retrieve=retrieve,
        demos=[demo],
        instruction="Pick the code.",
    )
    assert shown.train[0].prompt == render_prompt(
        WITH_CONTEXT,
        {"context": retrieve({"phrase": "x"}), "phrase": "typhoid endocarditis"},
        [demo],
        instruction="Pick the code.",
    )
    with pytest.raises(ValueError, match="retriever"):
        build([{"phrase": "x", "code": "y"}], spec=WITH_CONTEXT)


def test_a_program_answering_from_its_candidates_trains_only_on_answers_among_them() -> None:
    shelf = {f"phrase {i}": [f"C{i}", f"D{i}"] for i in range(10)}
    rows = [{"phrase": f"phrase {i}", "code": f"C{i}" if i % 2 else f"X{i}"} for i in range(10)]  # odd: grounded

    def retrieve(inputs):
        return [f"{code} — a title" for code in shelf[inputs["phrase"]]]

    def answer_ids(inputs):
        return shelf[inputs["phrase"]]

    data = build(rows, spec=WITH_CONTEXT, retrieve=retrieve, answer_ids=answer_ids)
    assert data.counts["ungrounded"] == 5 and data.counts["train"] == 5
    assert all(e.completion.strip() in e.prompt for e in data.train)  # every answer is one of its candidates

    capped = build(rows, spec=WITH_CONTEXT, retrieve=retrieve, answer_ids=answer_ids, max_examples=2)
    assert capped.counts["train"] == 2  # twice the cap is retrieved, so the cap is met in grounded examples
    assert capped.counts["ungrounded"] + capped.counts["capped"] + 2 == 10

    with pytest.raises(ValueError, match="not among the retrieved candidates"):
        build([rows[0]], spec=WITH_CONTEXT, retrieve=retrieve, answer_ids=answer_ids)


def test_bad_records_are_skipped_and_counted_by_reason() -> None:
    data = build(
        [
            {"phrase": "ok one", "code": "A00.0"},
            {"phrase": "", "code": "A00.1"},
            {"code": "A00.2"},
            {"phrase": "no code"},
            {"phrase": ["a list"], "code": "A00.3"},
            {"phrase": "ok two", "code": "A00.4"},
        ]
    )
    assert data.counts["invalid"] == 4
    assert data.counts["train"] == 2
    assert min(s.reason for s in data.skipped).startswith("missing or empty input field 'phrase'")
    assert {s.line for s in data.skipped} == {2, 3, 4, 5}


def test_duplicates_are_dropped_and_counted() -> None:
    data = build([{"phrase": "asthma", "code": "J45.909"}] * 3 + [{"phrase": "asthma", "code": "J45.20"}])
    assert data.counts["duplicates"] == 2
    assert sorted(e.completion for e in data.train) == [" J45.20\n", " J45.909\n"]


def test_examples_longer_than_max_length_tokens_are_dropped_not_truncated() -> None:
    long_phrase = " ".join(["word"] * 40)
    data = build([{"phrase": "short", "code": "A00.0"}, {"phrase": long_phrase, "code": "A00.1"}], max_length=30)
    assert data.counts["too_long"] == 1
    assert [e.completion for e in data.train] == [" A00.0\n"]
    with pytest.raises(ValueError, match="no training examples left"):
        build([{"phrase": long_phrase, "code": "A00.1"}], max_length=30)


def test_auto_max_length_follows_the_longest_example_up_to_the_ceiling() -> None:
    """A served program's demos make every prompt long; `auto` trains on them instead of dropping them all."""
    from cadre.config.tuning import AUTO_MAX_LENGTH

    medium, huge = " ".join(["word"] * 300), " ".join(["word"] * (AUTO_MAX_LENGTH + 10))
    rows = [
        {"phrase": "short", "code": "A00.0"},
        {"phrase": medium, "code": "A00.1"},
        {"phrase": huge, "code": "A00.2"},
    ]
    data = build(rows, max_length="auto")
    assert sorted(e.completion for e in data.train) == [" A00.0\n", " A00.1\n"] and data.counts["too_long"] == 1
    assert data.max_length == max(words([e.prompt + e.completion for e in data.train])) > 300
    assert build(rows[:1], max_length=64).max_length == 64


def test_heldout_split_is_stable_and_near_the_fraction() -> None:
    rows = [{"phrase": f"phrase {i}", "code": f"A{i:03d}"} for i in range(400)]
    data = build(rows, heldout_fraction=0.1)
    assert 25 <= data.counts["heldout"] <= 55
    assert data.counts["train"] + data.counts["heldout"] == 400
    assert not {e.digest for e in data.train} & {e.digest for e in data.heldout}
    # More data later: every example keeps its side of the split.
    grown = build(rows + [{"phrase": f"new {i}", "code": f"B{i:03d}"} for i in range(100)], heldout_fraction=0.1)
    assert {e.digest for e in data.heldout} <= {e.digest for e in grown.heldout}


def test_fingerprint_ignores_record_order_and_tracks_content() -> None:
    rows = [{"phrase": f"phrase {i}", "code": f"A{i:03d}"} for i in range(20)]
    first = build(rows, heldout_fraction=0.2)
    reordered = build(list(reversed(rows)), heldout_fraction=0.2)
    assert first.fingerprint == reordered.fingerprint
    assert [e.prompt for e in first.train] == [e.prompt for e in reordered.train]
    changed = build(rows[:-1] + [{"phrase": "phrase 19", "code": "Z999"}], heldout_fraction=0.2)
    assert changed.fingerprint != first.fingerprint
    assert len(first.fingerprint) == 64


def test_cap_renders_only_what_the_budget_can_consume_and_is_stable() -> None:
    rows = [{"phrase": f"phrase {i}", "code": f"A{i:03d}"} for i in range(100)]
    retrieved = []

    def retrieve(inputs):
        retrieved.append(inputs)
        return ["X — x"]

    capped = build(rows, spec=WITH_CONTEXT, retrieve=retrieve, max_examples=10)
    assert capped.counts["capped"] == 90 and capped.counts["train"] == 10
    assert len(retrieved) == 10  # nothing beyond the cap is retrieved
    again = build(list(reversed(rows)), spec=WITH_CONTEXT, retrieve=retrieve, max_examples=10)
    assert again.fingerprint == capped.fingerprint
    # `read_first` names the cases the cap reads, so a capped smoke index can hold their documents first.
    assert [row["phrase"] for row in read_first(rows, ["phrase"], ["code"], 0, 10)] == [
        r["phrase"] for r in retrieved[:10]
    ]
    assert examples_needed(300, 4, 1, 0.05) >= 300 * 4 / 0.95
    assert examples_needed(None, 4, 1, 0.05) is None


def test_reads_jsonl_and_parquet_and_skips_broken_lines(tmp_path) -> None:
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text(
        '{"phrase": "a", "code": "A00.0"}\nnot json\n\n[1, 2]\n{"phrase": "b", "code": "A00.1"}\n', encoding="utf-8"
    )
    parquet = tmp_path / "extra.parquet"
    pq.write_table(pa.table({"phrase": ["c", "d"], "code": ["A00.2", "A00.3"]}), parquet)
    found, skipped = read_records([jsonl, parquet])
    assert [r.values["phrase"] for r in found] == ["a", "b", "c", "d"]
    assert [(s.line, s.reason.split(":")[0]) for s in skipped] == [
        (2, "invalid JSON"),
        (4, "expected a JSON object, got list"),
    ]
    data = build_training_data(
        found, SPEC, count_tokens=words, max_length=64, heldout_fraction=0.0, seed=0, skipped=skipped
    )
    assert data.counts["records"] == 6 and data.counts["invalid"] == 2 and data.counts["train"] == 4
    (tmp_path / "data.csv").write_text("phrase,code\n")
    with pytest.raises(ValueError, match="JSONL"):
        read_records([tmp_path / "data.csv"])


def test_only_the_suites_train_split_is_read(tmp_path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    assert training_sources(suite, [], from_eval_train=True) == [suite / "train.jsonl"]
    assert training_sources(suite, [tmp_path / "x.jsonl"], from_eval_train=False) == [tmp_path / "x.jsonl"]
    with pytest.raises(ValueError, match="evaluation split"):
        training_sources(suite, [suite / "test.jsonl"], from_eval_train=True)


def test_token_counter_counts_like_the_trainer(tmp_path) -> None:
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        ["Phrase : asthma Code : J45"], trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    count = token_counter(fast)
    assert count(["Phrase : asthma"]) == [len(fast("Phrase : asthma")["input_ids"]) + 1]


def test_training_data_writes_inspectable_jsonl(tmp_path) -> None:
    data = build([{"phrase": f"p{i}", "code": f"C{i}"} for i in range(30)], heldout_fraction=0.2)
    lines = [json.loads(line) for line in data.write_jsonl(tmp_path / "data.jsonl").read_text().splitlines()]
    assert {line["split"] for line in lines} == {"train", "heldout"}
    assert len(lines) == data.counts["train"] + data.counts["heldout"]
