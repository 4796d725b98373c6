"""Per-example metrics of answers and retrieval, in plain Python.

Every metric takes a batch of predictions and a batch of references and returns one float
per example, so an evaluation can aggregate, slice and bootstrap the scores however it needs.
Metrics never raise on odd input: a missing (``None``) or empty prediction scores 0.

Answer metrics (prediction: a string; reference: a string or a list of acceptable strings,
the best match counts):

- ``exact_match``: equal after normalising (strip, casefold, collapse whitespace); when the
  reference is an ICD-10 code the dot and surrounding punctuation are ignored too
  (``"a0102"`` matches ``"A01.02"``).
- ``token_f1``: SQuAD-style bag-of-tokens F1 (punctuation and English articles removed).
- ``rouge_l``: F-measure of the longest common token subsequence.
- ``icd_hierarchy``: credit for landing near the right ICD-10-CM code (see `icd_hierarchy`).

Retrieval metrics (prediction: ranked document ids; reference: the relevant ids), binary
relevance: ``recall@K``, ``hit@K``, ``mrr``, ``ndcg@K``.

`compute(name, predictions, references)` dispatches on the metric names the schema accepts
(`cadre.config.evaluation`). The same functions back the `evaluate` modules under
``evals/metrics/``; `load_evaluate_metric(name)` loads one of them by path.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from cadre.config.evaluation import ANSWER_METRICS

Reference = str | Sequence[str] | None

EVALUATE_MODULES = ("exact_match", "token_f1", "rouge_l", "icd_hierarchy", "retrieval")
EVALUATE_MODULES_DIR = Path(__file__).resolve().parents[2] / "evals" / "metrics"

# Partial credit of `icd_hierarchy`, by the deepest level the two codes share.
ICD_CREDIT = {"code": 1.0, "category": 0.5, "block": 0.25, "chapter": 0.1}

_RETRIEVAL_NAME = re.compile(r"^(recall|hit|ndcg)@([1-9]\d*)$")
_ICD_CODE = re.compile(r"^[A-Z][0-9][0-9A-Z](?:\.?[0-9A-Z]{1,4})?$")
_ARTICLES = {"a", "an", "the"}
_WORD = re.compile(r"\w+")
_EDGE_PUNCTUATION = string.punctuation + " \t\n\"'`«»“”‘’"


# --- normalisation -------------------------------------------------------------------------


def normalize_text(text: object) -> str:
    """Strip, casefold (Unicode-aware, NFKC) and collapse runs of whitespace; ``None`` gives ``""``."""
    if text is None:
        return ""
    return " ".join(unicodedata.normalize("NFKC", str(text)).casefold().split())


def normalize_code(text: object) -> str:
    """An ICD-10 code without its dot, upper case, with surrounding quotes/punctuation removed."""
    return normalize_text(text).strip(_EDGE_PUNCTUATION).replace(".", "").upper()


def looks_like_icd_code(text: object) -> bool:
    """Whether `text` has the shape of an ICD-10 code (``A01.02``, ``a0102``, ``S01.01XA``)."""
    return bool(_ICD_CODE.match(normalize_text(text).strip(_EDGE_PUNCTUATION).upper()))


def _references(reference: Reference) -> list[str]:
    if reference is None:
        return []
    if isinstance(reference, str):
        return [reference]
    return [str(r) for r in reference if r is not None]


def _best(prediction: object, reference: Reference, score: Callable[[str, str], float]) -> float:
    if prediction is None or not str(prediction).strip():
        return 0.0
    return max((score(str(prediction), ref) for ref in _references(reference)), default=0.0)


def _batch(predictions: Sequence[Any], references: Sequence[Any]) -> Iterable[tuple[Any, Any]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return zip(predictions, references)


# --- answer metrics ------------------------------------------------------------------------


def _exact(prediction: str, reference: str) -> float:
    if looks_like_icd_code(reference):
        return float(normalize_code(prediction) == normalize_code(reference))
    expected = normalize_text(reference)
    return float(bool(expected) and normalize_text(prediction) == expected)


def exact_match(predictions: Sequence[str | None], references: Sequence[Reference]) -> list[float]:
    """1.0 where the normalised prediction equals a normalised reference, else 0.0.

    Args:
        predictions: One answer per example (``None`` or empty scores 0).
        references: One reference per example: a string or a list of acceptable strings.

    Returns:
        One score per example.
    """
    return [_best(p, r, _exact) for p, r in _batch(predictions, references)]


def _squad_tokens(text: str) -> list[str]:
    lowered = unicodedata.normalize("NFKC", text).casefold()
    without_punctuation = "".join(ch for ch in lowered if not unicodedata.category(ch).startswith("P"))
    return [token for token in without_punctuation.split() if token not in _ARTICLES]


def _f1(prediction: str, reference: str) -> float:
    predicted, expected = _squad_tokens(prediction), _squad_tokens(reference)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: Sequence[str | None], references: Sequence[Reference]) -> list[float]:
    """SQuAD-style token F1: overlap of the bags of tokens after removing punctuation and articles.

    Unlike SQuAD, an empty prediction scores 0 even against an empty reference.

    Args:
        predictions: One answer per example.
        references: One reference (or list of acceptable references) per example.

    Returns:
        One score in [0, 1] per example.
    """
    return [_best(p, r, _f1) for p, r in _batch(predictions, references)]


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def _rouge_l(prediction: str, reference: str) -> float:
    predicted = _WORD.findall(unicodedata.normalize("NFKC", prediction).casefold())
    expected = _WORD.findall(unicodedata.normalize("NFKC", reference).casefold())
    common = _lcs_length(predicted, expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: Sequence[str | None], references: Sequence[Reference]) -> list[float]:
    """ROUGE-L F-measure: longest common subsequence of word tokens (casefolded, ``\\w+``).

    Args:
        predictions: One answer per example.
        references: One reference (or list of acceptable references) per example.

    Returns:
        One score in [0, 1] per example.
    """
    return [_best(p, r, _rouge_l) for p, r in _batch(predictions, references)]


@lru_cache(maxsize=65536)
def _icd_lineage(code: str) -> tuple[str, ...]:
    """(category, enclosing block(s), chapter) of a code, or () when its category is unknown."""
    import simple_icd_10_cm as icd  # parses the whole classification on import (~2 s): only when needed

    category = code[:3]
    if not icd.is_valid_item(category) or not icd.is_category(category):
        return ()
    return (category, *icd.get_ancestors(category))


def _hierarchy(prediction: str, reference: str) -> float:
    predicted, expected = normalize_code(prediction), normalize_code(reference)
    if not predicted or not expected:
        return 0.0
    if predicted == expected:
        return ICD_CREDIT["code"]
    predicted_lineage, expected_lineage = _icd_lineage(predicted), _icd_lineage(expected)
    if not predicted_lineage or not expected_lineage:
        return 0.0
    if predicted_lineage[0] == expected_lineage[0]:
        return ICD_CREDIT["category"]
    shared = set(predicted_lineage[1:-1]) & set(expected_lineage[1:-1])
    if shared:
        return ICD_CREDIT["block"]
    return ICD_CREDIT["chapter"] if predicted_lineage[-1] == expected_lineage[-1] else 0.0


def icd_hierarchy(predictions: Sequence[str | None], references: Sequence[Reference]) -> list[float]:
    """Credit for predicting an ICD-10-CM code close to the right one in the classification.

    Scheme (the deepest level the two codes share decides; see `ICD_CREDIT`):

    - 1.0: the same code (dot, case and surrounding punctuation ignored);
    - 0.5: a different code in the same 3-character category (``A01.03`` for ``A01.02``);
      the prediction need not be a real code, its first three characters must be a real category;
    - 0.25: a different category in the same block (``A02.0`` for ``A01.02``, both in A00-A09);
    - 0.1: only the chapter is shared (``B01.9`` for ``A01.02``, both in chapter 1, A00-B99);
    - 0.0: anything else, including answers that are not codes.

    Args:
        predictions: One predicted code per example.
        references: One reference code (or list of acceptable codes) per example.

    Returns:
        One score per example.
    """
    return [_best(p, r, _hierarchy) for p, r in _batch(predictions, references)]


# --- retrieval metrics ---------------------------------------------------------------------


def _ranked(ids: Sequence[str] | None) -> list[str]:
    """Ranked ids with repeats removed (a retriever returning one id twice earns nothing twice)."""
    seen: dict[str, None] = {}
    for doc_id in ids or ():
        if doc_id is not None:
            seen.setdefault(str(doc_id), None)
    return list(seen)


def _relevant(ids: Iterable[str] | None) -> set[str]:
    if ids is None:
        return set()
    if isinstance(ids, str):
        return {ids}
    return {str(doc_id) for doc_id in ids if doc_id is not None}


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


def recall_at_k(
    predictions: Sequence[Sequence[str] | None], references: Sequence[Iterable[str] | None], k: int
) -> list[float]:
    """Share of the relevant ids found among the first `k` retrieved (0 when nothing is relevant).

    Args:
        predictions: Ranked retrieved ids per example, best first.
        references: Relevant ids per example.
        k: Cut-off rank.

    Returns:
        One score in [0, 1] per example.
    """
    _check_k(k)
    scores = []
    for ranked, relevant in _batch(predictions, references):
        wanted = _relevant(relevant)
        scores.append(len(wanted & set(_ranked(ranked)[:k])) / len(wanted) if wanted else 0.0)
    return scores


def hit_at_k(
    predictions: Sequence[Sequence[str] | None], references: Sequence[Iterable[str] | None], k: int
) -> list[float]:
    """1.0 where any relevant id is among the first `k` retrieved, else 0.0.

    Args:
        predictions: Ranked retrieved ids per example, best first.
        references: Relevant ids per example.
        k: Cut-off rank.

    Returns:
        One score per example.
    """
    _check_k(k)
    return [
        float(bool(_relevant(relevant) & set(_ranked(ranked)[:k])))
        for ranked, relevant in _batch(predictions, references)
    ]


def mrr(predictions: Sequence[Sequence[str] | None], references: Sequence[Iterable[str] | None]) -> list[float]:
    """Reciprocal rank of the first relevant id in the whole retrieved list (0 when none is found).

    Args:
        predictions: Ranked retrieved ids per example, best first.
        references: Relevant ids per example.

    Returns:
        One score in [0, 1] per example.
    """
    scores = []
    for ranked, relevant in _batch(predictions, references):
        wanted = _relevant(relevant)
        rank = next((position for position, doc_id in enumerate(_ranked(ranked), start=1) if doc_id in wanted), None)
        scores.append(1.0 / rank if rank else 0.0)
    return scores


def ndcg_at_k(
    predictions: Sequence[Sequence[str] | None], references: Sequence[Iterable[str] | None], k: int
) -> list[float]:
    """Normalised discounted cumulative gain at `k` with binary relevance (gain 1 per relevant id).

    Args:
        predictions: Ranked retrieved ids per example, best first.
        references: Relevant ids per example.
        k: Cut-off rank.

    Returns:
        One score in [0, 1] per example (0 when nothing is relevant).
    """
    _check_k(k)
    scores = []
    for ranked, relevant in _batch(predictions, references):
        wanted = _relevant(relevant)
        if not wanted:
            scores.append(0.0)
            continue
        gain = sum(
            1.0 / math.log2(rank + 1) for rank, doc_id in enumerate(_ranked(ranked)[:k], start=1) if doc_id in wanted
        )
        ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(wanted), k) + 1))
        scores.append(gain / ideal)
    return scores


# --- dispatch ------------------------------------------------------------------------------

_ANSWER_FUNCTIONS: dict[str, Callable[[Sequence[Any], Sequence[Any]], list[float]]] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
    "icd_hierarchy": icd_hierarchy,
}
_AT_K_FUNCTIONS = {"recall": recall_at_k, "hit": hit_at_k, "ndcg": ndcg_at_k}


def is_retrieval_metric(name: str) -> bool:
    """Whether `name` is a retrieval metric (``recall@K``, ``hit@K``, ``ndcg@K``, ``mrr``)."""
    return name == "mrr" or bool(_RETRIEVAL_NAME.match(name))


def is_known_metric(name: str) -> bool:
    """Whether `compute` understands `name`."""
    return name in _ANSWER_FUNCTIONS or is_retrieval_metric(name)


def compute(name: str, predictions: Sequence[Any], references: Sequence[Any]) -> list[float]:
    """Per-example scores of the metric called `name` (as written in pipelines.yaml).

    Args:
        name: ``exact_match``, ``token_f1``, ``rouge_l``, ``icd_hierarchy``, ``mrr``,
            ``recall@K``, ``hit@K`` or ``ndcg@K``.
        predictions: Answers (answer metrics) or ranked id lists (retrieval metrics).
        references: Reference answers or relevant-id collections, one per prediction.

    Returns:
        One float per example.

    Raises:
        ValueError: For an unknown metric name or batches of different lengths.
    """
    if name in _ANSWER_FUNCTIONS:
        return _ANSWER_FUNCTIONS[name](predictions, references)
    if name == "mrr":
        return mrr(predictions, references)
    match = _RETRIEVAL_NAME.match(name)
    if match is None:
        raise ValueError(
            f"unknown metric {name!r}; expected one of {', '.join(ANSWER_METRICS)}, recall@K, hit@K, ndcg@K or mrr"
        )
    return _AT_K_FUNCTIONS[match.group(1)](predictions, references, int(match.group(2)))


def evaluate_module_path(name: str) -> Path:
    """Folder of the local `evaluate` module for `name` (``exact_match`` … ``retrieval``)."""
    if name not in EVALUATE_MODULES:
        raise ValueError(f"no local evaluate module {name!r}; expected one of {', '.join(EVALUATE_MODULES)}")
    return EVALUATE_MODULES_DIR / name


def load_evaluate_metric(name: str, **load_options: Any) -> Any:
    """Load a local `evaluate` metric module by path (hub loading fails offline).

    Args:
        name: One of `EVALUATE_MODULES`; retrieval metrics share the ``retrieval`` module
            (``compute(predictions=…, references=…, k=10)``).
        **load_options: Passed to `evaluate.load` (e.g. ``experiment_id``).

    Returns:
        The loaded `evaluate.EvaluationModule`.
    """
    import evaluate  # imported here: it pulls in datasets/pandas, which only this helper needs

    return evaluate.load(str(evaluate_module_path(name)), **load_options)
