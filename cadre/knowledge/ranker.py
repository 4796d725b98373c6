"""The learned ranking of an index version: re-orders its vector and keyword (BM25) hits with weights fitted on the train split.

Hybrid search fuses the two rankings by reciprocal rank alone (`RRF_K`), which throws away how sure each one is:
a query whose best vector hit is far ahead of the second, or a code whose title holds every word of the query,
ranks the same as a near tie. The ranker scores each candidate document of a query (the union of the two rankings'
best `depth` documents) from features both rankings and the document's title carry:

- the vector ranking: cosine of the document's best chunk, its gap to the query's best cosine, its rank;
- the keyword ranking: BM25 score relative to the query's best, its rank; the fused RRF score;
- the title: share of the query's words it holds and of its words the query holds, the same minus the best of its
  group's candidates (a group: the documents sharing `group_field` in their metadata, e.g. an ICD-10 category), its
  length, and one indicator per word of the train answers' most frequent title words (`title_words`: "other",
  "unspecified", ... whatever the specialist's answers favour);
- the group's votes: shares of the ten best vector and keyword hits in the candidate's group.

Weights are fitted by a listwise softmax (the answer's probability among its query's candidates, L2-penalised,
full-batch Adam on standardised features) in numpy; the fitted ranker is a small JSON file beside the version's
manifest (`IndexLayout.ranker_path`), read by `IndexSearcher` for every search of that version, so evaluation,
training prompts, serving and an edge bundle rank alike. Fitting needs cases whose answer is among the candidates
(`RankerData.usable`); a version without a ranker is searched with the fused ranking.

Usage::

    data = collect(settings, [(case_query, relevant_ids, rankings), ...])
    ranker = LearnedRanker.fit(data, settings)
    ordered = ranker.rank(query, rankings)   # SearchHit list, one per document, best first
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cadre.knowledge.index.base import SearchHit

if TYPE_CHECKING:
    from cadre.config.knowledge import RankerConfig

FORMAT = 1
"""Version of the ranker's JSON file."""
RRF_K = 60
"""Reciprocal-rank constant of the fused score feature (the hybrid search's)."""
VOTE_DEPTH = 10
"""Hits of each ranking whose groups vote."""
QUERIES_PER_WORD = 20
"""Usable training queries per title-word indicator (`collect`)."""
CHUNKS_PER_DOCUMENT = 3
"""Chunks fetched per candidate document wanted (`RankerSettings.fetch_depth`)."""

_WORD = re.compile(r"\w+")


def words(text: str) -> set[str]:
    """Casefolded word set of a text (NFKC; punctuation and symbols split words)."""
    return set(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


@dataclass(frozen=True)
class Rankings:
    """A query's two rankings of one index version, best first: chunks by cosine (score: cosine similarity) and by
    BM25 (score: BM25). Either may be empty (a query with no word in the full-text index)."""

    vector: Sequence[SearchHit]
    keyword: Sequence[SearchHit]


@dataclass(frozen=True)
class RankerSettings:
    """What the features are, and how the fit runs: `index.ranker` of pipelines.yaml, whose `RankerConfig` holds
    the defaults (`from_config`), plus the fit's steps."""

    depth: int
    title_words: int
    l2: float
    group_field: str | None = None
    steps: int = 400

    @classmethod
    def from_config(cls, config: RankerConfig, **overrides: Any) -> RankerSettings:
        """The settings `pipelines.yaml` declares (`overrides`: e.g. fewer `steps` in a test)."""
        declared = {
            "depth": config.depth,
            "title_words": config.title_words,
            "l2": config.l2,
            "group_field": config.group_field,
        }
        return cls(**declared | overrides)

    @property
    def fetch_depth(self) -> int:
        """Chunks fetched from each ranking: `CHUNKS_PER_DOCUMENT` × depth, so that depth documents are there
        although a long document fills several of the best chunks."""
        return CHUNKS_PER_DOCUMENT * self.depth


def _best_per_document(hits: Sequence[SearchHit]) -> dict[str, tuple[int, SearchHit]]:
    """Each document's first (best) chunk and its rank among documents."""
    found: dict[str, tuple[int, SearchHit]] = {}
    for hit in hits:
        if hit.record_id not in found:
            found[hit.record_id] = (len(found), hit)
    return found


def candidates(rankings: Rankings, depth: int) -> list[SearchHit]:
    """The documents a query's ranker chooses among: the best `depth` of each ranking, vector's first, one hit each."""
    by_vector = _best_per_document(rankings.vector)
    by_keyword = _best_per_document(rankings.keyword)
    chosen: dict[str, SearchHit] = {}
    for ranked in (by_vector, by_keyword):
        for record_id, (rank, hit) in ranked.items():
            if rank < depth and record_id not in chosen:
                chosen[record_id] = by_vector[record_id][1] if record_id in by_vector else hit
    return list(chosen.values())


def _group(hit: SearchHit, field: str | None) -> str:
    if field is None:
        return hit.record_id
    value = hit.metadata.get(field)
    return str(value) if value is not None else hit.record_id


BASE_FEATURES = (
    "vector_cosine",
    "vector_gap",
    "vector_log_rank",
    "in_vector",
    "keyword_share",
    "keyword_log_rank",
    "in_keyword",
    "rrf",
    "query_words_in_title",
    "title_words_in_query",
    "title_match_vs_group_best",
    "title_match_vs_best",
    "group_votes_vector",
    "group_votes_keyword",
    "title_length",
)


def features(
    query: str, rankings: Rankings, pool: Sequence[SearchHit], settings: RankerSettings, vocabulary: Sequence[str]
) -> np.ndarray:
    """One row per candidate of `pool` (`candidates`): `BASE_FEATURES`, then one indicator per vocabulary word."""
    by_vector = _best_per_document(rankings.vector)
    by_keyword = _best_per_document(rankings.keyword)
    missing_rank = max(len(by_vector), len(by_keyword), settings.depth) + 1
    cosines = [hit.score for _, hit in by_vector.values()]
    best_cosine = max(cosines, default=0.0)
    floor_cosine = min(cosines, default=0.0)
    best_keyword = max((hit.score for _, hit in by_keyword.values()), default=0.0) or 1.0
    query_words = words(query)
    groups = [_group(hit, settings.group_field) for hit in pool]
    votes_vector = Counter(_group(hit, settings.group_field) for hit in list(rankings.vector)[:VOTE_DEPTH])
    votes_keyword = Counter(_group(hit, settings.group_field) for hit in list(rankings.keyword)[:VOTE_DEPTH])
    titles = [words(hit.title) for hit in pool]
    matches = [len(query_words & title) / max(1, len(query_words)) for title in titles]
    group_best: dict[str, float] = {}
    for group, match in zip(groups, matches):
        group_best[group] = max(group_best.get(group, 0.0), match)
    best_match = max(matches, default=0.0)
    rows = []
    for hit, group, title, match in zip(pool, groups, titles, matches):
        vector_rank, vector_hit = by_vector.get(hit.record_id, (missing_rank, None))
        keyword_rank, keyword_hit = by_keyword.get(hit.record_id, (missing_rank, None))
        cosine = vector_hit.score if vector_hit is not None else floor_cosine
        rows.append(
            [
                cosine,
                best_cosine - cosine,
                math.log1p(vector_rank),
                float(vector_hit is not None),
                (keyword_hit.score / best_keyword) if keyword_hit is not None else 0.0,
                math.log1p(keyword_rank),
                float(keyword_hit is not None),
                RRF_K * (1.0 / (RRF_K + vector_rank + 1) + 1.0 / (RRF_K + keyword_rank + 1)),
                match,
                len(query_words & title) / max(1, len(title)),
                match - group_best[group],
                match - best_match,
                votes_vector[group] / VOTE_DEPTH,
                votes_keyword[group] / VOTE_DEPTH,
                math.log1p(len(title)),
                *(float(word in title) for word in vocabulary),
            ]
        )
    return np.asarray(rows, dtype=np.float64).reshape(len(pool), len(BASE_FEATURES) + len(vocabulary))


@dataclass
class RankerData:
    """Training queries for a ranker: each query's candidate feature rows and which row is its answer.

    Attributes:
        groups: per usable query, its feature matrix (one row per candidate).
        answers: per usable query, the row of its (first found) relevant document.
        queries: queries offered.
        usable: queries whose answer is among their candidates (only these train).
        vocabulary: the title words the indicator features stand for.
    """

    groups: list[np.ndarray]
    answers: list[int]
    queries: int
    usable: int
    vocabulary: list[str]


def title_vocabulary(titles: Iterable[str], size: int) -> list[str]:
    """The `size` most frequent words of the train answers' titles (ties: alphabetical)."""
    counts = Counter(word for title in titles for word in words(title))
    return [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:size]]


def collect(settings: RankerSettings, examples: Iterable[tuple[str, Sequence[str], Rankings]]) -> RankerData:
    """Feature matrices of training queries: `(query, relevant record ids, rankings)` each.

    The title vocabulary shrinks with the data: at most one word per `QUERIES_PER_WORD` usable queries, so a small
    suite (a smoke index) is not fitted with more indicators than it can support."""
    pools = []
    for query, relevant, rankings in examples:
        pool = candidates(rankings, settings.depth)
        rows = [index for index, hit in enumerate(pool) if hit.record_id in relevant]
        pools.append((query, rankings, pool, rows))
    usable = [(query, rankings, pool, rows) for query, rankings, pool, rows in pools if rows and len(pool) >= 2]
    size = min(settings.title_words, len(usable) // QUERIES_PER_WORD)
    vocabulary = title_vocabulary((pool[rows[0]].title for _, _, pool, rows in usable), size)
    groups = [features(query, rankings, pool, settings, vocabulary) for query, rankings, pool, _ in usable]
    return RankerData(groups, [rows[0] for *_, rows in usable], len(pools), len(usable), vocabulary)


class NotEnoughRankerData(ValueError):
    """Too few training queries have their answer among their candidates to fit a ranker."""


MIN_QUERIES = 20
"""Usable queries below which no ranker is fitted (the version keeps the fused ranking)."""


@dataclass(frozen=True)
class LearnedRanker:
    """Fitted weights over standardised features, and what the features are.

    Attributes:
        settings: depth, group field, vocabulary size and the fit's penalty and steps.
        vocabulary: the title words of the indicator features.
        mean, scale: per-feature standardisation.
        weights: one per feature.
        fitted_on: queries offered / used, and the train-split top-1 of the fused and the learned ranking.
    """

    settings: RankerSettings
    vocabulary: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    fitted_on: Mapping[str, Any]

    @classmethod
    def fit(cls, data: RankerData, settings: RankerSettings) -> LearnedRanker:
        """Listwise softmax regression: maximise each query's answer probability among its candidates.

        Raises:
            NotEnoughRankerData: fewer than `MIN_QUERIES` usable queries.
        """
        if data.usable < MIN_QUERIES:
            raise NotEnoughRankerData(
                f"{data.usable} of {data.queries} train queries have their answer among their "
                f"{settings.depth}+{settings.depth} candidates; a ranker needs at least {MIN_QUERIES}"
            )
        stacked = np.vstack(data.groups)
        mean = stacked.mean(axis=0)
        scale = stacked.std(axis=0)
        scale[scale < 1e-9] = 1.0
        matrix = (stacked - mean) / scale
        sizes = np.array([len(group) for group in data.groups])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        answer_rows = starts + np.asarray(data.answers)
        weights = np.zeros(matrix.shape[1])
        first_moment = np.zeros_like(weights)
        second_moment = np.zeros_like(weights)
        rate, beta1, beta2 = 0.05, 0.9, 0.999
        for step in range(1, settings.steps + 1):
            scores = matrix @ weights
            scores -= np.repeat(np.maximum.reduceat(scores, starts), sizes)
            exp = np.exp(scores)
            probabilities = exp / np.repeat(np.add.reduceat(exp, starts), sizes)
            gradient = matrix.T @ probabilities - matrix[answer_rows].sum(axis=0)
            gradient = gradient / len(sizes) + settings.l2 * weights
            first_moment = beta1 * first_moment + (1 - beta1) * gradient
            second_moment = beta2 * second_moment + (1 - beta2) * gradient**2
            weights -= rate * (first_moment / (1 - beta1**step)) / (np.sqrt(second_moment / (1 - beta2**step)) + 1e-8)
        learned = matrix @ weights
        fused = stacked[:, BASE_FEATURES.index("rrf")]
        fitted_on = {
            "queries": data.queries,
            "usable": data.usable,
            "candidates_per_query": round(float(sizes.mean()), 2),
            "train_top1_fused": round(_top1(fused, starts, sizes, answer_rows) * data.usable / data.queries, 4),
            "train_top1_learned": round(_top1(learned, starts, sizes, answer_rows) * data.usable / data.queries, 4),
        }
        return cls(settings, tuple(data.vocabulary), mean, scale, weights, fitted_on)

    def scores(self, query: str, rankings: Rankings, pool: Sequence[SearchHit]) -> np.ndarray:
        """The learned score of each candidate of `pool`."""
        if not pool:
            return np.zeros(0)
        rows = features(query, rankings, pool, self.settings, self.vocabulary)
        return ((rows - self.mean) / self.scale) @ self.weights

    def rank(self, query: str, rankings: Rankings) -> list[SearchHit]:
        """The query's candidate documents (one hit each, its best chunk) by learned score, best first; ties keep
        the candidates' order (vector ranking first). Each hit's `score` is its learned score."""
        pool = candidates(rankings, self.settings.depth)
        scored = self.scores(query, rankings, pool)
        order = sorted(range(len(pool)), key=lambda index: (-scored[index], index))
        return [_with_score(pool[index], float(scored[index])) for index in order]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "settings": vars(self.settings),
            "features": [*BASE_FEATURES, *(f"title_has:{word}" for word in self.vocabulary)],
            "vocabulary": list(self.vocabulary),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "weights": self.weights.tolist(),
            "fitted_on": dict(self.fitted_on),
        }

    @classmethod
    def from_json(cls, payload: Mapping[str, Any], source: str = "ranker") -> LearnedRanker:
        """Raises ValueError naming `source` when the payload is not a ranker this version reads."""
        if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
            raise ValueError(f"{source}: not a ranker file of format {FORMAT}")
        try:
            settings = RankerSettings(**payload["settings"])
            vocabulary = tuple(payload["vocabulary"])
            arrays = [np.asarray(payload[key], dtype=np.float64) for key in ("mean", "scale", "weights")]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source}: unreadable ranker ({error})") from None
        width = len(BASE_FEATURES) + len(vocabulary)
        if any(array.shape != (width,) for array in arrays):
            raise ValueError(f"{source}: its weights do not match its {width} features")
        return cls(settings, vocabulary, *arrays, payload.get("fitted_on") or {})

    @classmethod
    def read(cls, path: Path) -> LearnedRanker:
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))


def _top1(scores: np.ndarray, starts: np.ndarray, sizes: np.ndarray, answers: np.ndarray) -> float:
    """Share of queries whose answer row has the highest score of its group (ties: the earlier row wins)."""
    hits = 0
    for start, size, answer in zip(starts, sizes, answers):
        hits += int(start + int(np.argmax(scores[start : start + size])) == answer)
    return hits / len(sizes)


def _with_score(hit: SearchHit, score: float) -> SearchHit:
    return replace(hit, score=score)
