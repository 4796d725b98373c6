"""Compile a specialist's DSPy program within a budget, and evaluate programs on a suite split.

The prompt flow (`flows/optimize_prompts.py`) calls these functions; they know nothing of Prefect.

- `plan_optimization(specialist, budget)`: how many train/dev/test cases and which caps (`full`
  reads the optimizer settings, `smoke` the specialist's `SmokeBudget`).
- `compile_program(...)`: runs the configured optimizer — MIPROv2 (`auto` light/medium/heavy), GEPA
  (reflection LM configurable, default the program's own LM) or BootstrapFewShotWithRandomSearch — on
  the train split (its grounded cases: those with a relevant document among their retrieved passages),
  selecting on the dev split; the test split is never shown to it. The LM's `Budget`
  stops the run at `max_lm_calls` / `max_wall_seconds` by raising `BudgetExhausted`; this loop catches
  it and returns the best program the optimizer had evaluated on the dev split so far (a DSPy callback
  watches every dev evaluation; GEPA reports its own through a GEPA callback).
- `evaluate_program(...)` / `evaluate_retrieval_only(...)`: score a program, or the retriever's top-1
  document, on the same cases through `cadre.evaluation.results`, with LM calls, tokens and cost per case.

The optimizer's metric is the specialist's first answer metric (`cadre.evaluation.metrics`), e.g. exact match.

Example (what the flow does, without Prefect)::

    plan = plan_optimization(settings, "smoke")
    lm = CompletionLM(build_client(target), model_id=target.identity, max_tokens=..., budget=plan.budget())
    result = compile_program(settings.program, settings.evaluation, retriever, lm, train, dev)
    result.program.save("program.json")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dspy
from dspy.utils.callback import BaseCallback

from cadre.config.budget import SMOKE_DEV_CASES, SMOKE_TRAIN_CASES, RunBudget, parse_budget
from cadre.evaluation import metrics as metric_functions
from cadre.evaluation.comparison import outside_candidates
from cadre.evaluation.results import EvaluationResult, Prediction, evaluate_cases
from cadre.prompts.program import (
    Budget,
    BudgetExhausted,
    CompletionLM,
    LMUsage,
    Retriever,
    SharedRetriever,
    SpecialistProgram,
    program_context,
)
from cadre.runtime.retrieval import PassageFormat, retrieval_query

if TYPE_CHECKING:
    from cadre.config import EvaluationSettings, ProgramSettings, Specialist

log = logging.getLogger(__name__)

PROPOSER_MAX_TOKENS = 128
"""Tokens per instruction proposal (MIPROv2's prompt model, GEPA's reflection) on the program's own LM."""

SPLITS = ("train", "dev", "test")


# ------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class OptimizationPlan:
    """What one optimization may use.

    Attributes:
        budget_name: the run's budget.
        train_cases: train-split cases shown to the optimizer.
        dev_cases: dev-split cases it selects on.
        test_cases: test-split cases the gate compares champion and candidate on.
        max_lm_calls: hard cap on real LM calls while compiling.
        max_wall_seconds: hard cap on compile wall time.
        choice_depths: the retrieval depths the answer-mode choice tries on dev (None: `optimizer.retrieve_k`).
    """

    budget_name: RunBudget
    train_cases: int
    dev_cases: int
    test_cases: int | None
    max_lm_calls: int
    max_wall_seconds: float
    choice_depths: list[int] | None = None

    def budget(self) -> Budget:
        """A fresh, unstarted `Budget` with this plan's caps."""
        return Budget(max_lm_calls=self.max_lm_calls, max_wall_seconds=self.max_wall_seconds)

    def case_limits(self) -> dict[str, int | None]:
        return {"train": self.train_cases, "dev": self.dev_cases, "test": self.test_cases}


def plan_optimization(specialist: Specialist, budget: RunBudget) -> OptimizationPlan:
    """The plan of one run: `full` from `program.optimizer` and `evaluation.max_cases`; `smoke` from `smoke`.

    A smoke run also shrinks the train/dev splits (to at most 16 and 8 cases), so that the smoke
    LM-call cap still lets the optimizer compare a few candidates, and chooses the answer mode at the serving
    depth only (as the refresh's choice does): on 8 dev cases a deeper prompt's score is noise, and its tries
    made the demo's longest chain a minute longer.

    Args:
        specialist: the `Specialist` settings.
        budget: `full` or `smoke`.

    Raises:
        ValueError: an unknown budget.
    """
    optimizer = specialist.program.optimizer
    if parse_budget(budget) == "full":
        return OptimizationPlan(
            "full",
            optimizer.train_cases,
            optimizer.dev_cases,
            specialist.evaluation.max_cases,
            optimizer.max_lm_calls,
            float(optimizer.max_wall_seconds),
        )
    smoke = specialist.smoke
    return OptimizationPlan(
        "smoke",
        min(optimizer.train_cases, SMOKE_TRAIN_CASES),
        min(optimizer.dev_cases, SMOKE_DEV_CASES),
        smoke.max_eval_cases,
        min(optimizer.max_lm_calls, smoke.max_lm_calls),
        float(min(optimizer.max_wall_seconds, smoke.max_wall_seconds)),
        choice_depths=[specialist.program.retrieve_k],
    )


# ----------------------------------------------------------------------------------------- metric


def answer_metric(program: ProgramSettings, evaluation: EvaluationSettings) -> tuple[str, Callable[..., float]]:
    """The optimizer's metric: the specialist's first answer metric on the first output field.

    Returns:
        (metric name, `metric(example, prediction, trace=None, pred_name=None, pred_trace=None) -> float`).
    """
    name = evaluation.answer_metrics[0]
    output = program.outputs[0].name

    def metric(
        example: Any, prediction: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
    ) -> float:
        return metric_functions.compute(name, [prediction.get(output)], [example.get(output)])[0]

    metric.__name__ = name
    return name, metric


def feedback_metric(program: ProgramSettings, evaluation: EvaluationSettings) -> Callable[..., dspy.Prediction]:
    """GEPA's metric: the same score, with a sentence of feedback its reflection LM can learn from."""
    name, score_of = answer_metric(program, evaluation)
    output = program.outputs[0].name

    def metric(
        example: Any, prediction: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
    ) -> dspy.Prediction:
        score = score_of(example, prediction)
        expected, got = example.get(output), prediction.get(output)
        if score >= 1.0:
            feedback = f"Correct: {output} {got!r}."
        elif not got:
            feedback = f"No {output} could be read from the answer; expected {expected!r} alone on the first line."
        else:
            feedback = f"Wrong: answered {got!r}, expected {expected!r} ({name} {score:.2f})."
        return dspy.Prediction(score=score, feedback=feedback)

    return metric


# --------------------------------------------------------------------------------------- examples


def to_examples(
    cases: Sequence[dict[str, Any]], program: ProgramSettings, retriever: Retriever | None = None
) -> list[dspy.Example]:
    """Suite cases as DSPy examples whose inputs are the program's input fields.

    With a retriever, each example also carries the retrieved passages in the context field, so a
    labeled demo (taken as it is from the train split) shows the model the same candidates a
    bootstrapped demo would.
    """
    return [example for example, _ in _examples_with_passages(cases, program, retriever)]


def _examples_with_passages(
    cases: Sequence[dict[str, Any]], program: ProgramSettings, retriever: Retriever | None
) -> list[tuple[dspy.Example, list[str] | None]]:
    names = [item.name for item in program.inputs]
    form = PassageFormat.from_settings(program)
    examples = []
    for case in cases:
        values, ids = dict(case), None
        if retriever is not None and program.retrieve_k:
            passages = retriever(retrieval_query(case, names), program.retrieve_k)
            values[program.context_field] = [p.render(form) for p in passages]
            ids = [p.id for p in passages]
        examples.append((dspy.Example(**values).with_inputs(*names), ids))
    return examples


def grounded_train_examples(
    cases: Sequence[dict[str, Any]], program: ProgramSettings, retriever: Retriever | None
) -> tuple[list[dspy.Example], int]:
    """The train examples an optimizer may learn from, and how many were left out as ungrounded.

    A case whose relevant documents are not among the passages retrieved for it cannot be answered
    from them. As a labeled demo it would show the model an answer the context does not support,
    which teaches a small model to invent answers; for bootstrapping it only costs LM calls that
    cannot succeed. Such cases are left out when the program retrieves and the case names its
    `relevant_ids`. If no case is grounded, all are kept (and a warning logged).
    """
    pairs = _examples_with_passages(cases, program, retriever)
    kept = [
        example
        for example, ids in pairs
        if ids is None or not example.get("relevant_ids") or set(map(str, example.get("relevant_ids"))) & set(ids)
    ]
    if not kept and pairs:
        log.warning(
            "none of the %d train cases has a relevant document among its %d retrieved passages; "
            "the optimizer learns from all of them",
            len(pairs),
            program.retrieve_k,
        )
        return [example for example, _ in pairs], 0
    return kept, len(pairs) - len(kept)


# ---------------------------------------------------------------------------------- best so far


@dataclass
class CandidateScore:
    """One candidate program the optimizer evaluated on the dev split."""

    index: int
    score: float
    cases: int
    instruction: str
    demos: int


class DevEvaluationTracker(BaseCallback):
    """Remembers every program DSPy's `Evaluate` scores, so a stopped optimizer still has a best program.

    Only evaluations on the most cases count as candidates (MIPROv2 also scores minibatches).
    """

    def __init__(self) -> None:
        super().__init__()
        self._started: dict[str, tuple[Any, int]] = {}
        self.evaluated: list[tuple[CandidateScore, dspy.Module]] = []

    def on_evaluate_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        devset = inputs.get("devset") or instance.devset
        self._started[call_id] = (inputs.get("program"), len(devset or ()))

    def on_evaluate_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        program, cases = self._started.pop(call_id, (None, 0))
        if program is None or outputs is None or exception is not None:
            return
        self.record(program, float(outputs.score), cases)

    def record(self, program: dspy.Module, score: float, cases: int) -> None:
        predictor = next(iter(program.named_predictors()))[1]
        candidate = CandidateScore(
            len(self.evaluated), score, cases, predictor.signature.instructions, len(predictor.demos)
        )
        self.evaluated.append((candidate, program.deepcopy()))

    def best(self) -> tuple[CandidateScore, dspy.Module] | None:
        """The first of the highest-scoring candidates among those evaluated on the most cases."""
        if not self.evaluated:
            return None
        most = max(candidate.cases for candidate, _ in self.evaluated)
        full = [entry for entry in self.evaluated if entry[0].cases == most]
        return max(full, key=lambda entry: (entry[0].score, -entry[0].index))

    @property
    def candidates(self) -> list[CandidateScore]:
        return [candidate for candidate, _ in self.evaluated]


# ------------------------------------------------------------------------------------------ compile


@dataclass
class CompileResult:
    """A compiled program and what compiling it cost.

    Attributes:
        program: the candidate program (a clean `SpecialistProgram`: instruction and demos only).
        optimizer: which optimizer ran.
        stopped_by_budget: the budget ran out; `program` is the best one evaluated before that.
        stop_reason: the budget message, when stopped.
        metric: the optimizer's metric.
        dev_score: the candidate's score on the dev split (0–100 as DSPy reports it), if it was scored there.
        candidates: every candidate scored on the dev split.
        usage: the LM usage of the compile (real calls, cache hits, tokens, cost).
        wall_seconds: compile wall time.
        train_examples: train cases the optimizer learned from.
        train_ungrounded: train cases left out: none of their relevant documents was retrieved.
        reflection_lm_calls: calls made to an external reflection/prompt LM (not capped by the budget).
    """

    program: SpecialistProgram
    optimizer: str
    stopped_by_budget: bool
    stop_reason: str | None
    metric: str
    dev_score: float | None
    candidates: list[CandidateScore]
    usage: LMUsage
    wall_seconds: float
    train_examples: int = 0
    train_ungrounded: int = 0
    reflection_lm_calls: int = 0

    def summary(self) -> dict[str, Any]:
        """Flat figures for logging: `optimizer`, `metric`, `stopped_by_budget`, `stop_reason`, `compile_*` numbers."""
        return {
            "optimizer": self.optimizer,
            "metric": self.metric,
            "stopped_by_budget": self.stopped_by_budget,
            "stop_reason": self.stop_reason,
            "compile_dev_score": self.dev_score,
            "compile_candidates": len(self.candidates),
            "compile_wall_seconds": round(self.wall_seconds, 3),
            "compile_reflection_lm_calls": self.reflection_lm_calls,
            "compile_train_examples": self.train_examples,
            "compile_train_ungrounded": self.train_ungrounded,
            **self.usage.to_metrics("compile_"),
        }


def compile_program(
    program_settings: ProgramSettings,
    evaluation: EvaluationSettings,
    retriever: Retriever | None,
    lm: CompletionLM,
    trainset: Sequence[dict[str, Any]],
    devset: Sequence[dict[str, Any]],
    *,
    reflection_lm: dspy.BaseLM | None = None,
    log_dir: str | None = None,
) -> CompileResult:
    """Compile the program declared by `program_settings` with its configured optimizer, within `lm.budget`.

    Compilation always starts from the declared (un-optimized) program, so that the same config and
    data give the same candidate — and, through the cache, the same LM calls (none on a re-run).

    Args:
        program_settings: the specialist's `ProgramSettings` (optimizer settings included).
        evaluation: its `EvaluationSettings` (the metric is the first answer metric).
        retriever: the champion index's search (None when the program does not retrieve).
        lm: the program's LM; its `budget` (started here) caps the compile.
        trainset: train-split cases (already limited by the plan).
        devset: dev-split cases (already limited by the plan).
        reflection_lm: GEPA's reflection LM / MIPROv2's prompt model; default the program's LM
            with `PROPOSER_MAX_TOKENS`.
        log_dir: where MIPROv2/GEPA may keep their logs.

    Returns:
        The candidate and its costs. A stopped run returns the best program scored so far (the
        un-optimized one if none was scored).
    """
    optimizer = program_settings.optimizer
    retriever = (
        SharedRetriever(retriever)
        if retriever is not None and not isinstance(retriever, SharedRetriever)
        else retriever
    )
    metric_name, metric = answer_metric(program_settings, evaluation)
    student = SpecialistProgram(program_settings, retriever)
    train, ungrounded = grounded_train_examples(trainset, program_settings, retriever)
    dev = to_examples(devset, program_settings, retriever)
    budget = lm.budget or Budget()
    lm.budget = budget.start()
    before = lm.usage.snapshot()
    proposer = reflection_lm or _proposer_lm(lm)
    tracker = DevEvaluationTracker()
    started = time.monotonic()
    stop_reason: str | None = None
    compiled: dspy.Module | None = None
    with program_context(lm, program_settings), dspy.context(callbacks=[*dspy.settings.callbacks, tracker]):
        try:
            run = _OptimizerRun(program_settings, evaluation, lm, budget, tracker, log_dir)
            compiled = _run_optimizer(run, student, train, dev, metric, proposer)
        except BudgetExhausted as stop:
            stop_reason = str(stop)
            log.warning("optimization stopped: %s; keeping the best program scored on the dev split so far", stop)
    best = tracker.best()
    if compiled is None:
        compiled = best[1] if best is not None else student
    candidate = _clean_copy(compiled, program_settings, retriever)
    dev_score = _score_of(compiled, tracker)
    return CompileResult(
        program=candidate,
        optimizer=optimizer.kind,
        stopped_by_budget=stop_reason is not None,
        stop_reason=stop_reason,
        metric=metric_name,
        dev_score=dev_score,
        candidates=tracker.candidates,
        usage=lm.usage.since(before),
        wall_seconds=time.monotonic() - started,
        train_examples=len(train),
        train_ungrounded=ungrounded,
        reflection_lm_calls=len(getattr(reflection_lm, "history", []))
        if reflection_lm is not None and not isinstance(reflection_lm, CompletionLM)
        else 0,
    )


def _proposer_lm(lm: CompletionLM) -> CompletionLM:
    """The program's LM, sharing its budget, counters and cache, with room for an instruction."""
    return CompletionLM(
        lm.client,
        model_id=lm.model_id,
        max_tokens=PROPOSER_MAX_TOKENS,
        temperature=lm.kwargs.get("temperature") or 0.0,
        budget=lm.budget,
        usage=lm.usage,
        usd_per_1k_tokens=lm.usd_per_1k_tokens,
        cache=lm.cache,
    )


@dataclass(frozen=True)
class _OptimizerRun:
    """What every optimizer of one compile shares: the settings, the LM and its started budget, the dev tracker."""

    program_settings: ProgramSettings
    evaluation: EvaluationSettings
    lm: CompletionLM
    budget: Budget
    tracker: DevEvaluationTracker
    log_dir: str | None


def _run_optimizer(
    run: _OptimizerRun,
    student: SpecialistProgram,
    train: list[dspy.Example],
    dev: list[dspy.Example],
    metric: Callable[..., float],
    proposer: dspy.BaseLM,
) -> dspy.Module:
    optimizer, lm, log_dir = run.program_settings.optimizer, run.lm, run.log_dir
    kind = optimizer.kind
    if kind == "none":
        dspy.Evaluate(devset=dev, metric=metric, num_threads=1, display_progress=False)(student)
        return student
    if kind == "bootstrap_random_search":
        search = dspy.BootstrapFewShotWithRandomSearch(
            metric=metric,
            max_bootstrapped_demos=optimizer.max_bootstrapped_demos,
            max_labeled_demos=optimizer.max_labeled_demos,
            num_candidate_programs=optimizer.num_candidate_programs,
            num_threads=1,
        )
        return search.compile(student, trainset=train, valset=dev)
    if kind == "mipro":
        mipro = dspy.MIPROv2(
            metric=metric,
            prompt_model=proposer,
            task_model=lm,
            auto=optimizer.auto,
            max_bootstrapped_demos=optimizer.max_bootstrapped_demos,
            max_labeled_demos=optimizer.max_labeled_demos,
            num_threads=1,
            verbose=False,
            track_stats=False,
            log_dir=log_dir,
            seed=9,
        )
        # A base model cannot summarise a dataset or a program's source usefully, and those prompts
        # outgrow its context window; the proposer still sees the demos and a tip.
        return mipro.compile(
            student,
            trainset=train,
            valset=dev,
            minibatch_size=min(35, len(dev)),
            program_aware_proposer=False,
            data_aware_proposer=False,
        )
    if kind == "gepa":
        return _run_gepa(run, student, train, dev, proposer)
    raise ValueError(f"unknown optimizer kind {kind!r}")


def _run_gepa(
    run: _OptimizerRun,
    student: SpecialistProgram,
    train: list[dspy.Example],
    dev: list[dspy.Example],
    reflection_lm: dspy.BaseLM,
) -> dspy.Module:
    from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS

    optimizer, budget, lm, log_dir, tracker = (
        run.program_settings.optimizer,
        run.budget,
        run.lm,
        run.log_dir,
        run.tracker,
    )
    metric = feedback_metric(run.program_settings, run.evaluation)
    minibatch = 3
    planned = dspy.GEPA(metric=metric, auto=optimizer.auto, reflection_lm=reflection_lm).auto_budget(
        num_preds=len(student.predictors()), num_candidates=AUTO_RUN_SETTINGS[optimizer.auto]["n"], valset_size=len(dev)
    )
    max_metric_calls = min(planned, budget.max_lm_calls) if budget.max_lm_calls else planned
    # Stop before an iteration could cross the cap (two minibatches, a reflection, a full dev pass),
    # so GEPA ends on its own terms and returns its best candidate.
    margin = 2 * minibatch + 1 + len(dev)

    def out_of_budget(_state: Any) -> bool:
        calls_left = (budget.max_lm_calls - lm.usage.requests) if budget.max_lm_calls else None
        time_left = (budget.max_wall_seconds - budget.elapsed_s) if budget.max_wall_seconds else None
        return (calls_left is not None and calls_left < margin) or (time_left is not None and time_left <= 0)

    gepa = dspy.GEPA(
        metric=metric,
        max_metric_calls=max_metric_calls,
        reflection_lm=reflection_lm,
        reflection_minibatch_size=minibatch,
        num_threads=1,
        track_stats=False,
        log_dir=log_dir,
        seed=0,
        use_merge=False,
        gepa_kwargs={"stop_callbacks": [out_of_budget], "callbacks": [_GepaValsetTracker(student, tracker)]},
    )
    return gepa.compile(student, trainset=train, valset=dev)


class _GepaValsetTracker:
    """GEPA callback: records each candidate GEPA scores on the whole dev split into the shared tracker."""

    def __init__(self, student: SpecialistProgram, tracker: DevEvaluationTracker):
        self.student = student
        self.tracker = tracker

    def on_valset_evaluated(self, event: dict[str, Any]) -> None:
        if event["num_examples_evaluated"] < event["total_valset_size"]:
            return
        program = self.student.deepcopy()
        for name, predictor in program.named_predictors():
            if name in event["candidate"]:
                predictor.signature = predictor.signature.with_instructions(event["candidate"][name])
        # GEPA reports a mean in [0, 1]; DSPy's Evaluate reports percentages.
        self.tracker.record(program, 100.0 * float(event["average_score"]), event["num_examples_evaluated"])


def _clean_copy(
    compiled: dspy.Module, program_settings: ProgramSettings, retriever: Retriever | None
) -> SpecialistProgram:
    """A fresh program holding only the compiled predictors' state (optimizers hang candidate lists on theirs)."""
    clean = SpecialistProgram(program_settings, retriever)
    compiled_predictors = dict(compiled.named_predictors())
    for name, predictor in clean.named_predictors():
        predictor.load_state(compiled_predictors[name].dump_state())
    return clean


def _score_of(program: dspy.Module, tracker: DevEvaluationTracker) -> float | None:
    state = _predictor_states(program)
    for candidate, seen in reversed(tracker.evaluated):
        if _predictor_states(seen) == state:
            return candidate.score
    return None


def _predictor_states(program: dspy.Module) -> list[Any]:
    return [
        (name, predictor.signature.instructions, [dict(d) for d in predictor.demos])
        for name, predictor in program.named_predictors()
        if not name.startswith("candidate_programs")
    ]


# ------------------------------------------------------------------------------- chosen on dev


@dataclass(frozen=True)
class AnswerChoice:
    """One answer mode, retrieval depth and (with `score`) weight of the retriever's ranking, scored on dev."""

    answer_mode: str
    retrieve_k: int
    score: float
    interval: tuple[float, float] | None
    cases: int
    outside_candidates: float
    retrieval_weight: float = 0.0

    @property
    def label(self) -> str:
        """`score (retrieval weight 1) k=5`: how reports name the try."""
        weight = f" (retrieval weight {self.retrieval_weight:g})" if self.answer_mode == "score" else ""
        return f"{self.answer_mode}{weight} k={self.retrieve_k}"

    @property
    def key(self) -> str:
        """`score_w1_k5`: the try as part of a metric name."""
        weight = f"_w{self.retrieval_weight:g}" if self.answer_mode == "score" else ""
        return f"{self.answer_mode}{weight}_k{self.retrieve_k}"


def choose_on_dev(
    program: SpecialistProgram,
    program_settings: ProgramSettings,
    evaluation: EvaluationSettings,
    lm: CompletionLM,
    devset: Sequence[dict[str, Any]],
    depths: list[int] | None = None,
) -> list[AnswerChoice]:
    """Score the compiled program on the dev split with each declared answer mode and retrieval depth
    (`optimizer.answer_modes` × `optimizer.retrieve_k`, or × `depths`, and `optimizer.retrieval_weights` with mode
    `score`), leave it answering with the best, and return every try.

    The best has the highest first answer metric; ties go to the earlier try (the declared order: list the cheaper
    modes, depths and smaller weights first). With no list declared the program keeps its declared choices and
    nothing is scored. The LM scores each case's candidates once (`CompletionLM` caches them); every weight after the
    first re-ranks those scores without an LM call. When `lm.budget` runs out, the best of the tries completed so
    far is kept (the declared choices if none was).
    """
    declared = program_settings.answer
    plan = program_settings.decoding_plan(depths)
    if len(plan) <= 1:
        program.choose(*plan[0])
        return []
    metric = evaluation.answer_metrics[0]
    tried: list[AnswerChoice] = []
    if lm.budget is not None:
        lm.budget.start()
    for mode, depth, weight in plan:
        program.choose(mode, depth, weight)
        name = f"dev-{mode}-k{depth}" + (f"-w{weight:g}" if mode == "score" else "")
        try:
            run = evaluate_program(program, program_settings, evaluation, lm, devset, name)
        except BudgetExhausted as stop:
            log.warning("choosing the answer mode stopped after %d of %d tries: %s", len(tried), len(plan), stop)
            break
        tried.append(
            AnswerChoice(
                mode,
                depth,
                run.result.scores.get(metric, 0.0),
                run.result.intervals.get(metric),
                run.result.cases,
                outside_candidates(run.result),
                weight,
            )
        )
    if not tried:
        program.choose(declared.mode, program_settings.retrieve_k, declared.retrieval_weight)
        return []
    best = max(range(len(tried)), key=lambda i: (tried[i].score, -i))
    program.choose(tried[best].answer_mode, tried[best].retrieve_k, tried[best].retrieval_weight)
    return tried


# --------------------------------------------------------------------------------------- evaluate


@dataclass
class EvaluationRun:
    """An evaluation and what it cost."""

    result: EvaluationResult
    usage: LMUsage
    wall_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def program_metrics(program_settings: ProgramSettings, evaluation: EvaluationSettings) -> list[str]:
    """The metrics a program is scored on: its answer metrics, plus retrieval metrics when it retrieves."""
    return [*evaluation.answer_metrics, *(evaluation.retrieval_metrics if program_settings.retrieve_k else [])]


def program_scoring(program_settings: ProgramSettings, evaluation: EvaluationSettings) -> dict[str, Any]:
    """How a program's predictions are scored, as `evaluate_cases` / `score_predictions` keywords: its metrics, the
    case fields holding the answer and the relevant ids, and the bootstrap."""
    return {
        "metrics": program_metrics(program_settings, evaluation),
        "output_field": program_settings.outputs[0].name,
        "retrieval_field": "relevant_ids" if program_settings.retrieve_k else None,
        "confidence": evaluation.confidence,
        "bootstrap_samples": evaluation.bootstrap_samples,
    }


def program_predictor(
    program: SpecialistProgram, program_settings: ProgramSettings, lm: CompletionLM
) -> Callable[[dict[str, Any]], Prediction]:
    """One program call per case, as a `Prediction` with the LM calls, tokens and cost that case used (call it inside
    `program_context(lm, program_settings)`)."""
    output = program_settings.outputs[0].name
    inputs = [item.name for item in program_settings.inputs]

    def predict(case: dict[str, Any]) -> Prediction:
        before = lm.usage.snapshot()
        answer = program(**{field_name: case.get(field_name) for field_name in inputs})
        used = lm.usage.since(before)
        return Prediction(
            output=answer.get(output),
            retrieved_ids=answer.get("retrieved_ids") if program_settings.retrieve_k else None,
            lm_calls=used.calls,
            tokens=used.tokens,
            cost_usd=used.cost_usd,
            replayed_ms=used.replayed_seconds * 1000.0,
        )

    return predict


def evaluate_program(
    program: SpecialistProgram,
    program_settings: ProgramSettings,
    evaluation: EvaluationSettings,
    lm: CompletionLM,
    cases: Sequence[dict[str, Any]],
    name: str,
) -> EvaluationRun:
    """Score a program on suite cases (one program call per case) with `cadre.evaluation.results`.

    Each case's `Prediction` carries the LM calls, tokens and cost it used; an `LMUnreachable`
    stops the evaluation (a dead endpoint is not a wrong answer), any other error scores the case 0.
    """
    started, before = time.monotonic(), lm.usage.snapshot()
    with program_context(lm, program_settings):
        predict = program_predictor(program, program_settings, lm)
        result = evaluate_cases(list(cases), predict, name=name, **program_scoring(program_settings, evaluation))
    return EvaluationRun(result, lm.usage.since(before), time.monotonic() - started)


def evaluate_retrieval_only(
    retriever: Retriever,
    program_settings: ProgramSettings,
    evaluation: EvaluationSettings,
    cases: Sequence[dict[str, Any]],
    name: str = "retrieval-top1",
) -> EvaluationRun:
    """The reference without an LM: answer with the top retrieved document's id, or its title when
    `evaluation.retrieval_answer` says so (a solved example's answer)."""
    output = program_settings.outputs[0].name
    inputs = [item.name for item in program_settings.inputs]
    k = max(program_settings.retrieve_k, 1)

    def predict(case: dict[str, Any]) -> Prediction:
        passages = retriever(retrieval_query(case, inputs), k)
        first = getattr(passages[0], evaluation.retrieval_answer) if passages else None
        return Prediction(output=first, retrieved_ids=[p.id for p in passages])

    started = time.monotonic()
    result = evaluate_cases(
        list(cases),
        predict,
        program_metrics(program_settings, evaluation),
        name=name,
        output_field=output,
        retrieval_field="relevant_ids",
        confidence=evaluation.confidence,
        bootstrap_samples=evaluation.bootstrap_samples,
    )
    return EvaluationRun(result, LMUsage(), time.monotonic() - started)


__all__ = [
    "AnswerChoice",
    "CandidateScore",
    "CompileResult",
    "DevEvaluationTracker",
    "EvaluationRun",
    "OptimizationPlan",
    "answer_metric",
    "choose_on_dev",
    "compile_program",
    "evaluate_program",
    "evaluate_retrieval_only",
    "feedback_metric",
    "grounded_train_examples",
    "outside_candidates",
    "plan_optimization",
    "program_metrics",
    "program_predictor",
    "program_scoring",
    "to_examples",
]
