"""The refresh tunes its own fine-tuning: an Optuna search over `tuning` settings, resumable and pruned.

    result = run_search(search, tuning, trials=6, steps=300, storage=path, study=name,
                        train=..., score=..., on_trial=..., say=print)
    result.tuning, result.max_steps   # the best trial's settings: train the candidate with these
    result.table()                    # every trial, the declared settings first, best marked

How it works:

- **The declared settings are trial 0**, so "best vs default" is always measured on the same dev cases.
- **Each trial** fine-tunes with one draw of `search.space` (TPE sampler, seeded by `tuning.seed` and the trials
  already run) through the caller's `train`, which reports its training loss as it goes; then the caller's `score`
  evaluates the adapter on the dev split as the specialist serves it (the refresh's task: its best answer mode
  where the refresh re-chooses one). The objective is that dev score.
- **Pruning:** a trial whose running training loss is worse than the median of the earlier trials at the same step
  stops there (Optuna's `MedianPruner`, after 2 trials and the first fifth of the steps). Nothing evaluates the
  model while it trains (the 4-bit trap, see `cadre.tuning.finetune`), so the training loss is the signal.
- **Resumable:** the study lives in SQLite under the state dir, named by the data, the declared settings and the
  space. A rerun after a crash keeps every finished trial, runs the one that was cut off again (its training
  resumes from its last checkpoint, since the work folder is keyed by its settings) and then the rest.
- **Budget:** `trials` in all (finished ones count), no new trial after `search.max_wall_seconds`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cadre.config.tuning import SearchRange, SearchSettings, TuningSettings

if TYPE_CHECKING:
    import optuna

    from cadre.tuning.finetune import TrainingResult

COMPLETE, PRUNED, FAILED = "complete", "pruned", "failed"

Report = Callable[[int, float], None]
"""Called by training with (step, training loss); raises `TrialPruned` when the trial should stop."""


class TrialPruned(Exception):
    """Raised inside training when the trial's loss trails the earlier trials'."""


@dataclass
class TrialOutcome:
    """One trial: the settings it tried and what came of them."""

    number: int
    params: dict[str, Any]
    state: str
    dev_score: float | None = None
    steps: int | None = None
    seconds: float = 0.0
    note: str = ""

    @property
    def declared(self) -> bool:
        return self.number == 0


@dataclass
class SearchResult:
    """The search's verdict: the best trial's settings, and every trial beside it."""

    tuning: TuningSettings
    max_steps: int | None
    best: TrialOutcome
    trials: list[TrialOutcome]
    metric: str
    study: str
    resumed_trials: int = 0
    seconds: float = 0.0
    stopped_by_wall: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def declared(self) -> TrialOutcome | None:
        return next((t for t in self.trials if t.declared), None)

    def table(self) -> str:
        """Every trial as a markdown table, the declared settings first and the best marked."""
        names = sorted({name for trial in self.trials for name in trial.params})
        head = f"| trial | {' | '.join(names)} | steps | state | dev {self.metric} | s |"
        rows = [head, "|" + "---|" * (len(names) + 5)]
        for trial in sorted(self.trials, key=lambda t: t.number):
            label = (
                f"{trial.number}{' (declared)' if trial.declared else ''}{' **best**' if trial is self.best else ''}"
            )
            values = " | ".join(_show(trial.params.get(name)) for name in names)
            score = f"{trial.dev_score:.3f}" if trial.dev_score is not None else "—"
            rows.append(
                f"| {label} | {values} | {trial.steps or '—'} | {trial.state} | {score} | {trial.seconds:.0f} |"
            )
        return "\n".join(rows)

    def summary(self) -> str:
        """One line: trials run, pruned, failed, and best vs declared on dev."""
        declared = self.declared
        versus = (
            f" vs declared {declared.dev_score:.3f}" if declared is not None and declared.dev_score is not None else ""
        )
        resumed = f", {self.resumed_trials} from an earlier run of this study" if self.resumed_trials else ""
        wall = ", stopped by its wall-time budget" if self.stopped_by_wall else ""
        return (
            f"hyperparameter search: {len(self.trials)} trials ({self.counts.get(COMPLETE, 0)} complete, "
            f"{self.counts.get(PRUNED, 0)} pruned, {self.counts.get(FAILED, 0)} failed{resumed}{wall}) in "
            f"{self.seconds:.0f} s; best trial {self.best.number} dev {self.metric} {self.best.dev_score:.3f}{versus}"
            f"; {_describe(self.best.params)}"
        )


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "—" if value is None else str(value)


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{name}={_show(value)}" for name, value in sorted(params.items()))


def declared_params(search: SearchSettings, tuning: TuningSettings) -> dict[str, Any]:
    """The declared value of each searched setting (trial 0)."""
    return {name: getattr(tuning, name) for name in search.space}


def with_params(tuning: TuningSettings, params: dict[str, Any]) -> TuningSettings:
    """`tuning` with the trial's settings, validated again; the result has no search of its own."""
    return TuningSettings.model_validate({**tuning.model_dump(mode="json"), **params, "search": None})


def study_name(
    specialist: str, data_fingerprint: str, tuning: TuningSettings, base_model: str, steps: int | None
) -> str:
    """Name of the study of this data, these declared settings and this space: a rerun finds its own study."""
    identity = json.dumps(
        [tuning.model_dump(mode="json"), base_model, steps, data_fingerprint], sort_keys=True, default=str
    )
    return f"{specialist}-{data_fingerprint[:12]}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def _suggest(trial: optuna.Trial, name: str, values: list[Any] | SearchRange) -> Any:
    if isinstance(values, SearchRange):
        if name in ("rank", "alpha", "max_steps", "batch_size"):
            return trial.suggest_int(name, int(values.low), int(values.high), log=values.log)
        return trial.suggest_float(name, values.low, values.high, log=values.log)
    return trial.suggest_categorical(name, values)


def open_study(storage: Path, name: str, seed: int, prune: bool) -> optuna.Study:
    """The study `name` in the SQLite file `storage`, created or loaded.

    Its TPE sampler is seeded by `seed` plus the trials the study already holds: a sampler's generator starts
    again in each process, so a resumed study seeded by `seed` alone would draw the first run's settings again
    (a killed 4-trial search re-ran trial 1's settings as its last trial). Reruns stay reproducible.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage.parent.mkdir(parents=True, exist_ok=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if prune else optuna.pruners.NopPruner()
    study = optuna.create_study(
        study_name=name, storage=f"sqlite:///{storage}", direction="maximize", pruner=pruner, load_if_exists=True
    )
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.get_trials(deepcopy=False)))
    return study


def _requeue_interrupted(study: optuna.Study) -> int:
    """Trials cut off by a killed or interrupted process: queue their settings again. Returns how many.

    A kill leaves the trial RUNNING (it is marked failed here); Ctrl-C leaves it FAIL without the note a trial's own
    error writes. Either is queued once (a queued copy names its original in `requeued_from`).
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    queued = {t.user_attrs.get("requeued_from") for t in trials}
    cut_off = [
        t
        for t in trials
        if t.number not in queued
        and (t.state == TrialState.RUNNING or (t.state == TrialState.FAIL and "note" not in t.user_attrs))
    ]
    for trial in cut_off:
        if trial.state == TrialState.RUNNING:
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # noqa: SLF001 - no public way
        study.enqueue_trial(
            trial.params, user_attrs={"requeued_from": trial.user_attrs.get("requeued_from", trial.number)}
        )
    return len(cut_off)


def _outcome(trial: optuna.trial.FrozenTrial) -> TrialOutcome:
    from optuna.trial import TrialState

    state = {TrialState.COMPLETE: COMPLETE, TrialState.PRUNED: PRUNED}.get(trial.state, FAILED)
    return TrialOutcome(
        number=trial.user_attrs.get("requeued_from", trial.number),
        params=dict(trial.params),
        state=state,
        dev_score=trial.value if state == COMPLETE else None,
        steps=trial.user_attrs.get("steps"),
        seconds=float(trial.user_attrs.get("seconds", 0.0)),
        note=trial.user_attrs.get("note", ""),
    )


def run_search(
    search: SearchSettings,
    tuning: TuningSettings,
    *,
    trials: int,
    steps: int | None,
    storage: Path,
    study: str,
    metric: str,
    train: Callable[[TuningSettings, int | None, Report, int], TrainingResult],
    score: Callable[[TrainingResult, TuningSettings, int], float],
    on_trial: Callable[[TrialOutcome], None] | None = None,
    say: Callable[[str], None] = print,
    steps_cap: int | None = None,
) -> SearchResult:
    """Search `search.space` for the settings whose adapter scores best on dev; see the module docstring.

    Args:
        search: the declared search.
        tuning: the declared settings (trial 0, and every setting the space leaves alone).
        trials: how many trials in all (finished trials of an interrupted run count).
        steps: the declared optimizer steps (a searched `max_steps` replaces it).
        storage: the study's SQLite file.
        study: the study's name (`study_name`).
        metric: the name of the dev score, for reports.
        train: trains one trial's adapter with (settings, steps, report, trial number); `report(step, loss)` may
            raise `TrialPruned`.
        score: the dev score of a trained adapter (settings and trial number given for naming).
        on_trial: told of every trial as it ends (e.g. to log it as a nested MLflow run).
        say: progress lines.
        steps_cap: most steps per trial (the smoke budget's).

    Raises:
        RuntimeError: no trial completed.
    """
    import optuna
    from optuna.trial import TrialState

    started = time.monotonic()
    handle = open_study(storage, study, tuning.seed, search.prune)
    requeued = _requeue_interrupted(handle)
    if not handle.get_trials(deepcopy=False):
        handle.enqueue_trial(declared_params(search, tuning))
    finished = [t for t in handle.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    resumed = len(finished)
    if resumed or requeued:
        say(f"search: resuming study {study}: {resumed} trial(s) finished, {requeued} interrupted and queued again")
    left = max(0, trials - resumed)

    def objective(trial: optuna.Trial) -> float:
        params = {name: _suggest(trial, name, values) for name, values in search.space.items()}
        settings = with_params(tuning, params)
        trial_steps = params.get("max_steps", steps)
        if steps_cap is not None and trial_steps is not None:
            trial_steps = min(int(trial_steps), steps_cap)
        trial.set_user_attr("steps", trial_steps)
        number = trial.user_attrs.get("requeued_from", trial.number)
        say(f"search: trial {number} of {trials}: {_describe(params)}, {trial_steps} steps")
        begun = time.monotonic()
        smoothed: list[float] = []

        def report(step: int, loss: float) -> None:
            if not math.isfinite(loss):
                raise TrialPruned(f"training loss is {loss} at step {step}")
            smoothed.append(loss)
            trial.report(sum(smoothed[-5:]) / len(smoothed[-5:]), step)
            if trial.should_prune():
                raise TrialPruned(f"training loss {smoothed[-1]:.4f} at step {step} trails the earlier trials' median")

        outcome = TrialOutcome(number, params, FAILED, steps=trial_steps)
        try:
            result = train(settings, trial_steps, report, number)
            value = float(score(result, settings, number))
            outcome.state, outcome.dev_score = COMPLETE, value
            return value
        except TrialPruned as pruned:
            outcome.state, outcome.note = PRUNED, str(pruned)
            trial.set_user_attr("note", str(pruned))
            say(f"search: trial {number} pruned: {pruned}")
            raise optuna.TrialPruned(str(pruned)) from None
        except Exception as error:  # noqa: BLE001 - one bad draw (say, a diverging rate) must not end the search
            outcome.note = f"{type(error).__name__}: {error}"
            trial.set_user_attr("note", outcome.note[:500])
            say(f"search: trial {number} failed: {outcome.note}")
            raise
        finally:
            outcome.seconds = time.monotonic() - begun
            trial.set_user_attr("seconds", outcome.seconds)
            if outcome.state == COMPLETE:
                say(f"search: trial {number} dev {metric} {outcome.dev_score:.3f} in {outcome.seconds:.0f} s")
            if on_trial is not None:
                on_trial(outcome)

    wall = search.max_wall_seconds
    if left:
        handle.optimize(objective, n_trials=left, timeout=wall, catch=(Exception,), gc_after_trial=True)
    outcomes = [_outcome(t) for t in handle.get_trials(deepcopy=False) if t.state != TrialState.RUNNING]
    # A trial that was cut off and queued again appears twice; its later attempt is the one that counts.
    by_number: dict[int, TrialOutcome] = {}
    for outcome in outcomes:
        if outcome.number not in by_number or by_number[outcome.number].state == FAILED:
            by_number[outcome.number] = outcome
    kept = list(by_number.values())
    complete = [t for t in kept if t.state == COMPLETE and t.dev_score is not None]
    if not complete:
        notes = "; ".join(f"trial {t.number}: {t.state} {t.note}" for t in kept)
        raise RuntimeError(f"hyperparameter search: no trial completed ({notes or 'none ran'})")
    # Ties go to the declared settings, then to the earlier trial.
    best = max(complete, key=lambda t: (t.dev_score, t.declared, -t.number))
    counts = {state: sum(1 for t in kept if t.state == state) for state in (COMPLETE, PRUNED, FAILED)}
    best_steps = best.steps if best.steps is not None else steps
    return SearchResult(
        tuning=with_params(tuning, best.params),
        max_steps=best_steps,
        best=best,
        trials=kept,
        metric=metric,
        study=study,
        resumed_trials=resumed,
        seconds=time.monotonic() - started,
        stopped_by_wall=bool(wall) and len(kept) < trials and time.monotonic() - started >= wall,
        counts=counts,
    )
