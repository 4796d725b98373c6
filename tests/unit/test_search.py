"""The refresh's hyperparameter search loop: real Optuna studies in SQLite, with training and scoring given as
functions of the settings (the refresh flow's integration test runs the real training and serving).

Checked: the declared settings are trial 0 and win ties; a trial whose loss trails the others is pruned; a failed
trial does not end the search; a study killed mid-trial resumes, runs the cut-off trial again and converges on
the trial count; the best trial's settings come back validated.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cadre.config.tuning import SearchSettings, TuningSettings
from cadre.tuning.search import COMPLETE, FAILED, PRUNED, run_search, study_name


def _tuning(space: dict, **search) -> TuningSettings:
    return TuningSettings.model_validate(
        {"rank": 8, "learning_rate": 2e-4, "max_steps": 10, "search": {"space": space, **search}}
    )


def _search(tuning: TuningSettings, tmp_path: Path, train, score, trials: int = 4, **kwargs):
    return run_search(
        tuning.search,
        tuning,
        trials=trials,
        steps=tuning.max_steps,
        storage=tmp_path / "studies.db",
        study=study_name("coder", "f" * 64, tuning, "base", tuning.max_steps),
        metric="exact_match",
        train=train,
        score=score,
        say=lambda line: None,
        **kwargs,
    )


def _train_losses(loss_of):
    """A training stand-in that reports `loss_of(settings)` at each of its steps, like the trainer's sink does."""

    def train(settings, steps, report, number):
        for step in range(1, steps + 1):
            report(step, loss_of(settings))
        return settings

    return train


def test_the_declared_settings_are_trial_0_and_the_best_trial_wins(tmp_path: Path) -> None:
    tuning = _tuning({"rank": [4, 8, 16], "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}})
    seen = []

    def score(settings, _, number):
        seen.append((number, settings.rank, settings.learning_rate))
        return settings.rank / 16  # rank 16 is best

    result = _search(tuning, tmp_path, _train_losses(lambda s: 1.0), score, trials=6, **{})
    assert seen[0] == (0, 8, 2e-4), "trial 0 must be the declared settings"
    assert len(result.trials) == 6 and result.counts[COMPLETE] == 6
    assert result.declared is not None and result.declared.dev_score == 0.5
    if any(rank == 16 for _, rank, _ in seen):
        assert result.tuning.rank == 16 and result.best.dev_score == 1.0
    assert result.tuning.search is None  # the candidate trains with plain settings
    assert "(declared)" in result.table() and "**best**" in result.table()
    assert "vs declared 0.500" in result.summary()


def test_ties_go_to_the_declared_settings(tmp_path: Path) -> None:
    tuning = _tuning({"rank": [4, 8, 16]})
    result = _search(tuning, tmp_path, _train_losses(lambda s: 1.0), lambda s, r, n: 0.25, trials=3)
    assert result.best.number == 0 and result.tuning.rank == 8


def test_a_trial_whose_loss_trails_the_others_is_pruned(tmp_path: Path) -> None:
    tuning = _tuning({"learning_rate": {"low": 1e-5, "high": 1e-2, "log": True}})
    # Loss grows with the learning rate: trials above the median rate trail the median loss and stop early.
    result = _search(tuning, tmp_path, _train_losses(lambda s: s.learning_rate * 1000), lambda s, r, n: 0.5, trials=8)
    assert result.counts[PRUNED] >= 1, result.table()
    pruned = [t for t in result.trials if t.state == PRUNED]
    assert all("trails the earlier trials' median" in t.note for t in pruned)
    assert result.best.state == COMPLETE


def test_a_failed_trial_does_not_end_the_search(tmp_path: Path) -> None:
    tuning = _tuning({"rank": [4, 8, 16]})

    def train(settings, steps, report, number):
        if number == 1:
            raise RuntimeError("out of memory")
        return settings

    result = _search(tuning, tmp_path, train, lambda s, r, n: 0.1 * n, trials=3)
    assert [t.state for t in sorted(result.trials, key=lambda t: t.number)] == [COMPLETE, FAILED, COMPLETE]
    assert "out of memory" in next(t.note for t in result.trials if t.state == FAILED)
    assert "1 failed" in result.summary()


def test_no_completed_trial_is_a_clear_error(tmp_path: Path) -> None:
    tuning = _tuning({"rank": [4, 8]})

    def train(settings, steps, report, number):
        raise ValueError("no data")

    with pytest.raises(RuntimeError, match="no trial completed.*no data"):
        _search(tuning, tmp_path, train, lambda s, r, n: 0.0, trials=2)


def test_a_killed_study_resumes_the_cut_off_trial_and_converges(tmp_path: Path) -> None:
    tuning = _tuning({"rank": [4, 8, 16], "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}})
    trained: list[tuple[int, int, float]] = []

    def killed_at_trial_2(settings, steps, report, number):
        trained.append((number, settings.rank, settings.learning_rate))
        if number == 2:
            raise KeyboardInterrupt  # the process is killed mid-trial: nothing records the trial's end
        return settings

    with pytest.raises(KeyboardInterrupt):
        _search(tuning, tmp_path, killed_at_trial_2, lambda s, r, n: s.rank / 16, trials=5)
    cut_off = trained[-1]

    again: list[tuple[int, int, float]] = []

    def train(settings, steps, report, number):
        again.append((number, settings.rank, settings.learning_rate))
        return settings

    result = _search(tuning, tmp_path, train, lambda s, r, n: s.rank / 16, trials=5)
    assert again[0] == cut_off, "the cut-off trial runs first, with its own settings"
    assert len(again) == 3, "trials 0 and 1 are kept; the cut-off one and the two left run"
    drawn_before = {(rank, rate) for number, rank, rate in trained if number != 0}
    assert not {(rank, rate) for _, rank, rate in again[1:]} & drawn_before, "new draws, not the first run's again"
    assert result.resumed_trials == 2
    numbers = [t.number for t in result.trials]
    assert len(set(numbers)) == 5 and {0, 1, cut_off[0]} <= set(numbers)
    assert all(t.state == COMPLETE for t in result.trials)

    # Once converged, a third run trains nothing.
    none: list[int] = []
    result = _search(tuning, tmp_path, lambda s, st, r, n: none.append(n), lambda s, r, n: s.rank / 16, trials=5)
    assert none == [] and len(result.trials) == 5


def test_the_search_caps_trial_steps_and_takes_a_searched_step_count(tmp_path: Path) -> None:
    tuning = _tuning({"max_steps": [10, 20, 40]})
    steps_seen = []

    def train(settings, steps, report, number):
        steps_seen.append(steps)
        return settings

    result = _search(tuning, tmp_path, train, lambda s, r, n: s.max_steps / 40, trials=4, steps_cap=5)
    assert set(steps_seen) == {5}, "under the smoke budget every trial is capped"
    assert result.max_steps == 5


def test_a_search_with_no_trials_under_smoke_is_declared_by_default() -> None:
    search = SearchSettings.model_validate({"space": {"rank": [4, 8]}})
    assert search.trial_count("smoke") == 0 and search.trial_count("full") == 6


KILLED_SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_search import _search, _tuning

def train(settings, steps, report, number):
    if number == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: the trial stays RUNNING in the study
    return settings

_search(_tuning({{"rank": [4, 8, 16]}}), Path({folder!r}), train, lambda s, r, n: s.rank / 16, trials=4)
"""


def test_a_study_whose_process_was_sigkilled_resumes(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    script = KILLED_SCRIPT.format(tests=str(Path(__file__).parent), folder=str(tmp_path))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    ran: list[int] = []

    def train(settings, steps, report, number):
        ran.append(number)
        return settings

    result = _search(_tuning({"rank": [4, 8, 16]}), tmp_path, train, lambda s, r, n: s.rank / 16, trials=4)
    assert ran[0] == 2 and len(ran) == 2, ran
    assert result.resumed_trials == 2 and len(result.trials) == 4
    assert all(t.state == COMPLETE for t in result.trials)
