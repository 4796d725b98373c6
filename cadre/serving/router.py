"""Routing `model: auto` requests to the specialist whose description and examples are closest in meaning.

Every specialist is profiled by its `description` and `examples` from `pipelines.yaml`, embedded once
with the project's sentence-transformers model (the packaged MiniLM by default). A request is embedded
the same way; its score for a specialist is the highest cosine similarity to any of that specialist's
texts. Beside the team, the router keeps an *off-topic* profile: short descriptions of requests no
specialist is for (small talk, trivia, recipes, code help, …). The best specialist wins when

- its score reaches `threshold` (an absolute floor), and
- it beats the off-topic profile by at least `margin`.

Otherwise the request goes to `fallback` when one is named, or is refused with every candidate's score
(`NoRoute`), which the server answers with 422. The off-topic comparison is what lets a bare clinical
phrase ("Accretio cordis", similarity 0.12 to the coder's profile but 0.02 to small talk) reach the
coder while "tell me a joke" (0.15 to the coder, 0.6 off-topic) does not: on MiniLM, absolute
similarities of short in-domain phrases and of out-of-domain chatter overlap.

    router = Router.from_specialists(config.specialists, Embedder.load(...).embed)
    decision = router.route("code for acute appendicitis")   # decision.specialist == "icd10-coder"

The defaults were chosen on the dev split of the routing suite (`evals/suites/routing`: the shipped
team's three profiles in `team.yaml`, and off-topic requests, including ones for specialists the team
lacks, that must reach the fallback); evaluate with

    python -m cadre.serving.router evals/suites/routing        # threshold and margin chosen on dev, accuracy on test
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cadre.config import Specialist

Embed = Callable[[Sequence[str]], np.ndarray]
"""Texts → vectors, one row per text (`cadre.knowledge.embedding.Embedder.embed`); normalised here in any case."""

DEFAULT_THRESHOLD = 0.26
"""Absolute floor of a specialist's score; chosen with `DEFAULT_MARGIN` on the routing suite's dev split (`tune`)."""

DEFAULT_MARGIN = 0.04
"""How much the best specialist must beat the off-topic profile by; chosen on the routing suite's dev split."""

OFF_TOPIC_TEXTS = (
    "hello, how are you?",
    "tell me a joke",
    "write a poem or a short story",
    "what's the weather forecast",
    "a general knowledge trivia question",
    "translate this sentence into another language",
    "a cooking recipe",
    "plan a holiday trip",
    "help me write Python code",
    "recommend a book or a movie",
    "explain a science concept",
    "health and fitness advice",
)
"""Requests no specialist of a typical team is for; the profile a specialist must beat by `margin`."""

OFF_TOPIC = "(off-topic)"


@dataclass(frozen=True)
class RouterSettings:
    """How `auto` requests are routed.

    Attributes:
        threshold: lowest cosine similarity (between -1 and 1) the best specialist must reach.
        margin: how much the best specialist must beat the off-topic profile by (ignored without one).
        fallback: specialist that answers when nothing matches; None refuses such requests (422).
        off_topic: texts of the off-topic profile; empty turns the margin rule off.
    """

    threshold: float = DEFAULT_THRESHOLD
    margin: float = DEFAULT_MARGIN
    fallback: str | None = None
    off_topic: tuple[str, ...] = OFF_TOPIC_TEXTS


@dataclass(frozen=True)
class SpecialistProfile:
    """The texts a specialist is recognised by: its description, then its examples."""

    name: str
    texts: tuple[str, ...]

    @classmethod
    def of(cls, specialist: Specialist) -> SpecialistProfile:
        """From a `Specialist` of the config (or anything with `name`, `description`, `examples`)."""
        texts = tuple(t.strip() for t in [specialist.description, *specialist.examples] if t and t.strip())
        return cls(specialist.name, texts)


@dataclass(frozen=True)
class Scores:
    """One request's similarity to each specialist (best first) and to the off-topic profile (None without one)."""

    specialists: dict[str, float]
    off_topic: float | None

    @property
    def best(self) -> tuple[str, float]:
        return next(iter(self.specialists.items()))


@dataclass(frozen=True)
class RouteDecision:
    """Where a request goes and why.

    Attributes:
        specialist: the specialist that answers.
        score: the best specialist's similarity to the request.
        scores: every specialist's score, best first.
        off_topic: similarity to the off-topic profile (None without one).
        fallback: True when no specialist matched and the fallback answers.
        threshold: the threshold applied.
        margin: the margin applied.
    """

    specialist: str
    score: float
    scores: dict[str, float]
    off_topic: float | None
    fallback: bool
    threshold: float
    margin: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "specialist": self.specialist,
            "score": round(self.score, 4),
            "fallback": self.fallback,
            "threshold": self.threshold,
            "margin": self.margin,
            "off_topic": None if self.off_topic is None else round(self.off_topic, 4),
            "scores": {k: round(v, 4) for k, v in self.scores.items()},
        }


class NoRoute(LookupError):
    """No specialist matches the request well enough and there is no fallback."""

    def __init__(self, scores: Scores, threshold: float, margin: float):
        self.scores = scores.specialists
        self.off_topic = scores.off_topic
        self.threshold = threshold
        self.margin = margin
        listed = ", ".join(f"{name} {score:.2f}" for name, score in scores.specialists.items())
        rule = f"a score of at least {threshold:.2f}"
        if scores.off_topic is not None:
            rule += f" and {margin:.2f} above the off-topic score ({scores.off_topic:.2f})"
        super().__init__(
            f"no specialist matches this request: routing needs {rule}; scores: {listed}. "
            "Name a specialist as `model`, or configure a fallback"
        )


def _passes(scores: Scores, threshold: float, margin: float) -> bool:
    _, best = scores.best
    return best >= threshold and (scores.off_topic is None or best - scores.off_topic >= margin)


class Router:
    """Scores requests against specialist profiles (and the off-topic profile) by embedding similarity."""

    def __init__(
        self, profiles: Sequence[SpecialistProfile], embed: Embed, settings: RouterSettings = RouterSettings()
    ):
        """Embed every profile text once.

        Args:
            profiles: one per specialist (each with at least one text).
            embed: the embedding function.
            settings: threshold, margin, fallback and off-topic texts.

        Raises:
            ValueError: no profiles, a profile without texts, or a fallback that is not a profiled specialist.
        """
        if not profiles:
            raise ValueError("a router needs at least one specialist")
        for profile in profiles:
            if not profile.texts:
                raise ValueError(f"specialist {profile.name!r} has neither a description nor examples to route by")
        names = [p.name for p in profiles]
        if settings.fallback is not None and settings.fallback not in names:
            raise ValueError(f"fallback {settings.fallback!r} is not a specialist of the team ({', '.join(names)})")
        self.profiles = list(profiles)
        self.settings = settings
        self._embed = embed
        groups = [*profiles, *([SpecialistProfile(OFF_TOPIC, settings.off_topic)] if settings.off_topic else [])]
        self._vectors = _normalised(embed([text for group in groups for text in group.texts]))
        self._owner = np.array([position for position, group in enumerate(groups) for _ in group.texts])
        self._groups = len(groups)

    @classmethod
    def from_specialists(
        cls, specialists: Iterable[Any], embed: Embed, settings: RouterSettings = RouterSettings()
    ) -> Router:
        """A router over the specialists of a config (their `description` and `examples`)."""
        return cls([SpecialistProfile.of(s) for s in specialists], embed, settings)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.profiles]

    def scores(self, text: str) -> Scores:
        """The request's similarity to every specialist and to the off-topic profile."""
        return self.scores_many([text])[0]

    def scores_many(self, texts: Sequence[str]) -> list[Scores]:
        """`scores` for several requests, embedded in one batch."""
        similarity = _normalised(self._embed(list(texts))) @ self._vectors.T
        found = []
        for row in similarity:
            best = [float(row[self._owner == position].max()) for position in range(self._groups)]
            specialists = dict(sorted(zip(self.names, best[: len(self.profiles)]), key=lambda item: -item[1]))
            found.append(Scores(specialists, best[-1] if self.settings.off_topic else None))
        return found

    def decide(self, scores: Scores) -> RouteDecision:
        """The decision for computed scores.

        Raises:
            NoRoute: nothing matches and there is no fallback.
        """
        name, score = scores.best
        settings = self.settings
        common = {
            "score": score,
            "scores": scores.specialists,
            "off_topic": scores.off_topic,
            "threshold": settings.threshold,
            "margin": settings.margin,
        }
        if _passes(scores, settings.threshold, settings.margin):
            return RouteDecision(name, fallback=False, **common)
        if settings.fallback is not None:
            return RouteDecision(settings.fallback, fallback=True, **common)
        raise NoRoute(scores, settings.threshold, settings.margin)

    def route(self, text: str) -> RouteDecision:
        """Pick the specialist for a request (see `decide`)."""
        if not text.strip():
            raise NoRoute(
                Scores({name: 0.0 for name in self.names}, None), self.settings.threshold, self.settings.margin
            )
        return self.decide(self.scores(text))


def _normalised(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


# ---------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class RoutingCase:
    """A request and where it must go: a specialist's name, or None for "no specialist" (the fallback)."""

    id: str
    request: str
    expected: str | None
    kind: str = ""


@dataclass(frozen=True)
class RoutingReport:
    """How a router did on routing cases.

    Attributes:
        threshold: the threshold applied.
        margin: the margin applied.
        cases: cases evaluated.
        accuracy: share routed as expected (an out-of-domain case is right when nothing matched).
        in_domain_accuracy: accuracy on cases that expect a specialist.
        out_of_domain_accuracy: accuracy on cases that expect no specialist.
        confusion: expected → routed to → count (`(none)` for no specialist).
        mistakes: the cases routed wrongly, with their scores.
    """

    threshold: float
    margin: float
    cases: int
    accuracy: float
    in_domain_accuracy: float | None
    out_of_domain_accuracy: float | None
    confusion: dict[str, dict[str, int]]
    mistakes: list[dict[str, Any]] = field(default_factory=list)


NONE_LABEL = "(none)"


def load_routing_suite(suite_dir: str | Path) -> tuple[list[SpecialistProfile], dict[str, list[RoutingCase]]]:
    """The suite's team (`team.yaml`: specialists with description and examples) and its splits (`dev`, `test`)."""
    from ruamel.yaml import YAML

    folder = Path(suite_dir)
    team = YAML(typ="safe").load((folder / "team.yaml").read_text(encoding="utf-8"))
    profiles = [
        SpecialistProfile.of(_Spec(s["name"], s["description"], s.get("examples", []))) for s in team["specialists"]
    ]
    names = {p.name for p in profiles}
    splits: dict[str, list[RoutingCase]] = {}
    for split in ("dev", "test"):
        path = folder / f"{split}.jsonl"
        cases = []
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            raw = json.loads(line)
            expected = raw.get("expected")
            if expected is not None and expected not in names:
                raise ValueError(
                    f"{path}:{line_number}: expected {expected!r} is not in team.yaml ({', '.join(sorted(names))})"
                )
            cases.append(RoutingCase(str(raw["id"]), str(raw["request"]), expected, str(raw.get("kind", ""))))
        splits[split] = cases
    return profiles, splits


@dataclass(frozen=True)
class _Spec:
    name: str
    description: str
    examples: list[str]


def evaluate_routing(
    router: Router,
    cases: Sequence[RoutingCase],
    threshold: float | None = None,
    margin: float | None = None,
    scores: Sequence[Scores] | None = None,
) -> RoutingReport:
    """Route every case (without a fallback: "no specialist" is its own answer) and count how many land right.

    Args:
        router: the router (its profiles and embedding).
        cases: routing cases.
        threshold: threshold to apply (default: the router's).
        margin: margin to apply (default: the router's).
        scores: precomputed `router.scores_many` of the cases' requests (to try many settings cheaply).
    """
    threshold = router.settings.threshold if threshold is None else threshold
    margin = router.settings.margin if margin is None else margin
    scores = scores if scores is not None else router.scores_many([c.request for c in cases])
    confusion: dict[str, dict[str, int]] = {}
    mistakes = []
    right = {True: [0, 0], False: [0, 0]}  # in_domain -> [right, total]
    for case, case_scores in zip(cases, scores, strict=True):
        predicted = case_scores.best[0] if _passes(case_scores, threshold, margin) else None
        expected_label, predicted_label = case.expected or NONE_LABEL, predicted or NONE_LABEL
        confusion.setdefault(expected_label, {}).setdefault(predicted_label, 0)
        confusion[expected_label][predicted_label] += 1
        in_domain = case.expected is not None
        right[in_domain][1] += 1
        if predicted == case.expected:
            right[in_domain][0] += 1
        else:
            shown = {k: round(v, 3) for k, v in case_scores.specialists.items()}
            if case_scores.off_topic is not None:
                shown[OFF_TOPIC] = round(case_scores.off_topic, 3)
            mistakes.append(
                {
                    "id": case.id,
                    "request": case.request,
                    "expected": expected_label,
                    "predicted": predicted_label,
                    "scores": shown,
                }
            )
    total = len(cases)
    return RoutingReport(
        threshold=threshold,
        margin=margin,
        cases=total,
        accuracy=(right[True][0] + right[False][0]) / total if total else 0.0,
        in_domain_accuracy=right[True][0] / right[True][1] if right[True][1] else None,
        out_of_domain_accuracy=right[False][0] / right[False][1] if right[False][1] else None,
        confusion=confusion,
        mistakes=mistakes,
    )


def tune(router: Router, cases: Sequence[RoutingCase]) -> RoutingReport:
    """The threshold and margin with the best accuracy on `cases` (ties: the middle of the tied settings, in grid order).

    Only the threshold is searched when the router has no off-topic profile.
    """
    scores = router.scores_many([c.request for c in cases])
    thresholds = [round(float(x), 2) for x in np.arange(0.0, 0.61, 0.02)]
    margins = (
        [round(float(x), 2) for x in np.arange(-0.2, 0.31, 0.01)]
        if router.settings.off_topic
        else [router.settings.margin]
    )
    reports = [evaluate_routing(router, cases, t, m, scores) for m in margins for t in thresholds]
    best = max(r.accuracy for r in reports)
    winners = [r for r in reports if r.accuracy == best]
    return winners[len(winners) // 2]


def main(argv: list[str] | None = None) -> int:
    """`python -m cadre.serving.router SUITE_DIR`: choose threshold and margin on dev, report accuracy on test."""
    from rich.console import Console
    from rich.table import Table

    from cadre.config.project import EmbeddingSettings, ThreadSettings
    from cadre.knowledge.embedding import Embedder

    parser = argparse.ArgumentParser(prog="python -m cadre.serving.router", description=main.__doc__)
    parser.add_argument("suite", type=Path, help="routing suite folder (team.yaml, dev.jsonl, test.jsonl)")
    parser.add_argument(
        "--threshold", type=float, help="evaluate this threshold (with --margin) instead of tuning on dev"
    )
    parser.add_argument(
        "--margin", type=float, default=DEFAULT_MARGIN, help="margin over the off-topic profile (default: %(default)s)"
    )
    parser.add_argument(
        "--no-off-topic", action="store_true", help="route by the threshold alone (no off-topic profile)"
    )
    parser.add_argument("--threads", type=int, default=2, help="embedding threads (default: %(default)s)")
    args = parser.parse_args(argv)

    console = Console()
    profiles, splits = load_routing_suite(args.suite)
    embedder = Embedder.load(EmbeddingSettings(), ThreadSettings(embedding=args.threads))
    router = Router(profiles, embedder.embed, RouterSettings(off_topic=() if args.no_off_topic else OFF_TOPIC_TEXTS))
    if args.threshold is None:
        dev = tune(router, splits["dev"])
        threshold, margin = dev.threshold, dev.margin
        console.print(
            f"chosen on dev ({dev.cases} cases): threshold {threshold:.2f}, margin {margin:.2f} → dev accuracy {dev.accuracy:.3f}"
        )
    else:
        threshold, margin = args.threshold, args.margin
    test = evaluate_routing(router, splits["test"], threshold, margin)
    table = Table(
        title=f"routing suite, test split: {test.cases} cases (threshold {threshold:.2f}, margin {margin:.2f})"
    )
    for column in ("accuracy", "in-domain", "out-of-domain"):
        table.add_column(column, justify="right")
    table.add_row(f"{test.accuracy:.3f}", _fmt(test.in_domain_accuracy), _fmt(test.out_of_domain_accuracy))
    console.print(table)
    confusion = Table(title="confusion (rows: expected, columns: routed to)")
    labels = sorted({*test.confusion, *(p for row in test.confusion.values() for p in row)})
    confusion.add_column("expected")
    for label in labels:
        confusion.add_column(label, justify="right")
    for expected in labels:
        row = test.confusion.get(expected, {})
        confusion.add_row(expected, *[str(row.get(label, 0)) for label in labels])
    console.print(confusion)
    for mistake in test.mistakes:
        console.print(
            f"[yellow]✗[/yellow] {mistake['id']}: {mistake['request']!r} expected {mistake['expected']}, "
            f"routed to {mistake['predicted']} {mistake['scores']}"
        )
    return 0


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
