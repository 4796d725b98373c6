"""The router: scores by embedding similarity (the packaged MiniLM), threshold and fallback, accuracy on the routing suite."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cadre.serving.router import (
    DEFAULT_MARGIN,
    DEFAULT_THRESHOLD,
    OFF_TOPIC_TEXTS,
    NoRoute,
    Router,
    RouterSettings,
    SpecialistProfile,
    evaluate_routing,
    load_routing_suite,
    tune,
)

SUITE = Path(__file__).resolve().parents[2] / "evals" / "suites" / "routing"


@pytest.fixture(scope="module")
def embed():
    from cadre.config.project import EmbeddingSettings, ThreadSettings
    from cadre.knowledge.embedding import Embedder

    return Embedder.load(EmbeddingSettings(), ThreadSettings(embedding=1)).embed


@pytest.fixture(scope="module")
def suite():
    return load_routing_suite(SUITE)


def _team() -> list[SimpleNamespace]:
    return [
        SimpleNamespace(
            name="coder",
            description="Medical coding: maps a diagnosis to its ICD-10-CM code.",
            examples=["code for acute appendicitis"],
        ),
        SimpleNamespace(
            name="sql",
            description="Turns questions about the sales database into SQL queries.",
            examples=["top 10 customers by revenue"],
        ),
    ]


def test_scores_are_cosine_similarities_best_first(embed) -> None:
    router = Router.from_specialists(_team(), embed)
    scores = router.scores("ICD-10 code for community-acquired pneumonia")
    assert list(scores.specialists) == ["coder", "sql"]
    assert -1.0 <= scores.specialists["sql"] < scores.specialists["coder"] <= 1.0
    texts = ["Medical coding: maps a diagnosis to its ICD-10-CM code.", "code for acute appendicitis"]
    request = embed(["ICD-10 code for community-acquired pneumonia"])[0]
    expected = max(float(np.dot(request, vector)) for vector in embed(texts))
    assert scores.specialists["coder"] == pytest.approx(expected, abs=1e-5), (
        "a specialist's score is its best text's similarity"
    )
    off_topic = max(float(np.dot(request, vector)) for vector in embed(list(OFF_TOPIC_TEXTS)))
    assert scores.off_topic == pytest.approx(off_topic, abs=1e-5)
    assert Router.from_specialists(_team(), embed, RouterSettings(off_topic=())).scores("x").off_topic is None


def test_threshold_and_margin_decide_and_a_fallback_catches_what_nothing_matches(embed) -> None:
    router = Router.from_specialists(_team(), embed)
    decision = router.route("list the customers with the most orders")
    assert decision.specialist == "sql" and not decision.fallback
    assert decision.score >= DEFAULT_THRESHOLD and decision.score - decision.off_topic >= DEFAULT_MARGIN

    with pytest.raises(NoRoute) as refused:
        router.route("tell me a joke about penguins")
    assert set(refused.value.scores) == {"coder", "sql"} and refused.value.off_topic > max(
        refused.value.scores.values()
    )
    assert "off-topic" in str(refused.value)

    strict = Router.from_specialists(_team(), embed, RouterSettings(threshold=0.99, off_topic=()))
    with pytest.raises(NoRoute):
        strict.route("list the customers with the most orders")
    with_fallback = Router.from_specialists(_team(), embed, RouterSettings(fallback="coder"))
    caught = with_fallback.route("tell me a joke about penguins")
    assert caught.specialist == "coder" and caught.fallback
    with pytest.raises(NoRoute):
        router.route("   ")


def test_bad_router_settings_are_refused(embed) -> None:
    with pytest.raises(ValueError, match="fallback 'nobody'"):
        Router.from_specialists(_team(), embed, RouterSettings(fallback="nobody"))
    with pytest.raises(ValueError, match="neither a description nor examples"):
        Router([SpecialistProfile("empty", ())], embed)
    with pytest.raises(ValueError, match="at least one"):
        Router([], embed)


def test_routing_suite_is_well_formed(suite) -> None:
    profiles, splits = suite
    team = ["icd10-coder", "sense-tagger", "pronouncer"]
    assert [p.name for p in profiles] == team
    for split, cases in splits.items():
        assert len({c.id for c in cases}) == len(cases), f"{split}: ids are unique"
        assert any(c.expected is None for c in cases), f"{split}: has out-of-domain cases"
        assert {c.expected for c in cases} >= set(team)


def test_the_shipped_specialists_profiles_in_the_suite_are_the_ones_pipelines_yaml_serves(suite) -> None:
    from cadre.config import load_config

    profiles, _ = suite
    shipped = load_config(SUITE.parents[2] / "pipelines.yaml").specialists
    assert profiles == [SpecialistProfile.of(specialist) for specialist in shipped]


def test_defaults_are_the_ones_tuned_on_dev_and_test_accuracy_holds(embed, suite) -> None:
    profiles, splits = suite
    router = Router(profiles, embed)
    dev = tune(router, splits["dev"])
    assert (dev.threshold, dev.margin) == (pytest.approx(DEFAULT_THRESHOLD), pytest.approx(DEFAULT_MARGIN)), (
        "the defaults are what the dev split chooses; update them with the suite"
    )
    test = evaluate_routing(router, splits["test"])
    assert test.cases == len(splits["test"])
    # Measured with the shipped team of three (91 cases, 45 of them off-topic or for specialists the team lacks):
    # 0.791, in-domain 0.652, off-topic 0.933. Bare ICD phrases ("Accretio cordis") score below the threshold.
    assert test.accuracy >= 0.77, test.mistakes
    assert test.out_of_domain_accuracy >= 0.9
    assert sum(sum(row.values()) for row in test.confusion.values()) == test.cases
    # The off-topic profile earns its place: without it the threshold alone (tuned on dev too) is no more
    # accurate and lets more off-topic requests through (measured: 0.791 overall, off-topic 0.911 vs 0.933).
    without = Router(profiles, embed, RouterSettings(off_topic=()))
    alone = evaluate_routing(without, splits["test"], tune(without, splits["dev"]).threshold)
    assert alone.accuracy <= test.accuracy and alone.out_of_domain_accuracy < test.out_of_domain_accuracy
