"""The learned ranking (`cadre.knowledge.ranker`): what it learns, how it is stored, when it refuses to fit."""

from __future__ import annotations

import json
import random

import pytest

from cadre.config.knowledge import RankerConfig
from cadre.knowledge.index.base import SearchHit
from cadre.knowledge.ranker import (
    LearnedRanker,
    NotEnoughRankerData,
    RankerSettings,
    Rankings,
    candidates,
    collect,
)

SETTINGS = RankerSettings.from_config(RankerConfig(depth=8, group_field="group", title_words=10), steps=300)


def _hit(record_id: str, title: str, score: float, chunk: int = 0) -> SearchHit:
    group = record_id.split(".")[0]
    return SearchHit(
        f"{record_id}#{chunk}", f"s:{record_id}", record_id, "s", chunk, title, "", score, {"group": group}
    )


def _query(rng: random.Random, number: int) -> tuple[str, list[str], Rankings]:
    """Eight documents of one group; the answer is the one titled "other ...", which the vector ranking puts
    anywhere in the first four, so the first hit is right about a quarter of the time."""
    ids = [f"G{number}.{i}" for i in range(8)]
    answer = rng.choice(ids)
    titles = {
        i: (f"other form of thing {number}" if i == answer else f"thing {number} kind {k}") for k, i in enumerate(ids)
    }
    others = [i for i in ids if i != answer]
    rng.shuffle(others)
    order = others[:3]
    order.insert(rng.randrange(4), answer)
    order += others[3:]
    vector = [_hit(i, titles[i], 0.9 - 0.01 * rank) for rank, i in enumerate(order)]
    keyword = [_hit(i, titles[i], 10.0 - rank) for rank, i in enumerate(reversed(order))]
    return f"a thing {number}", [answer], Rankings(vector, keyword)


def test_it_learns_what_the_fused_ranking_misses_and_ranks_alike_after_a_round_trip() -> None:
    rng = random.Random(0)
    train = [_query(rng, n) for n in range(200)]
    held_out = [_query(rng, n) for n in range(200, 300)]
    ranker = LearnedRanker.fit(collect(SETTINGS, train), SETTINGS)
    assert ranker.vocabulary[0] in {"other", "form", "of"}  # the answers' most frequent title words
    assert ranker.fitted_on["train_top1_learned"] > ranker.fitted_on["train_top1_fused"] + 0.5

    def top1(model: LearnedRanker) -> float:
        return (
            sum(model.rank(query, rankings)[0].record_id == relevant[0] for query, relevant, rankings in held_out) / 100
        )

    assert top1(ranker) == 1.0
    first_hit = sum(rankings.vector[0].record_id == relevant[0] for _, relevant, rankings in held_out) / 100
    assert first_hit < 0.5
    reread = LearnedRanker.from_json(json.loads(json.dumps(ranker.to_json())))
    for query, _, rankings in held_out[:20]:
        assert [hit.record_id for hit in reread.rank(query, rankings)] == [
            hit.record_id for hit in ranker.rank(query, rankings)
        ]


def test_candidates_are_documents_once_each_from_both_rankings() -> None:
    vector = [_hit("A.1", "a", 0.9, 0), _hit("A.1", "a", 0.8, 1), _hit("A.2", "b", 0.7)]
    keyword = [_hit("B.1", "c", 5.0), _hit("A.2", "b", 4.0)]
    pool = candidates(Rankings(vector, keyword), depth=2)
    assert [(hit.record_id, hit.chunk_index, hit.score) for hit in pool] == [
        ("A.1", 0, 0.9),
        ("A.2", 0, 0.7),  # the vector ranking's hit, with its cosine
        ("B.1", 0, 5.0),
    ]


def test_too_few_answerable_queries_fit_no_ranker() -> None:
    rng = random.Random(1)
    few = [_query(rng, n) for n in range(10)]
    unanswerable = [(query, ["nowhere"], rankings) for query, _, rankings in (_query(rng, n) for n in range(10, 40))]
    data = collect(SETTINGS, few + unanswerable)
    assert (data.queries, data.usable) == (40, 10)
    with pytest.raises(NotEnoughRankerData, match="10 of 40 train queries"):
        LearnedRanker.fit(data, SETTINGS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda payload: payload | {"format": 99}, "not a ranker file"),
        (lambda payload: payload | {"weights": payload["weights"][:-1]}, "do not match"),
        (lambda payload: {k: v for k, v in payload.items() if k != "mean"}, "unreadable ranker"),
    ],
)
def test_a_damaged_ranker_file_is_refused_by_name(change, message: str) -> None:
    rng = random.Random(2)
    payload = LearnedRanker.fit(collect(SETTINGS, [_query(rng, n) for n in range(40)]), SETTINGS).to_json()
    with pytest.raises(ValueError, match=message):
        LearnedRanker.from_json(change(payload), "rankers/v1.json")
