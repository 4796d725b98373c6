"""Checks of a valid `pipelines.yaml` against what it points at: the mistakes that would otherwise fail at run time.

The schema (`cadre.config.loader`) proves the file is well formed; these checks read what it names:

- a `python` source's entrypoint imports and names a function (the module is imported; the function is not called);
- each specialist's suite folder holds `train.jsonl`, `dev.jsonl` and `test.jsonl`, and every line parses;
- every program input and output field appears in the suite's cases (a case without one is skipped at run time);
- a specialist that declares the `embedder` stage has train cases with `relevant_ids` (its fine-tuning pairs);
- the suite's `relevant_ids` are ids of documents the sources hold. Reading the sources is cheap for local
  `files` and `dataset` sources up to `CHEAP_SOURCE_BYTES`; `deep=True` (`cadre validate --deep`) reads every
  source, `python` and `sql` included.

Each finding names a file and a line: the pipelines file's key for what is declared, the suite file's line
for what a case holds. Errors would make a run fail or skip everything; warnings lose part of the data.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cadre.config.knowledge import DatasetSource, FilesSource, PythonSource
from cadre.config.loader import _locate, _parse_yaml, _plain
from cadre.config.pipelines import CadreConfig
from cadre.config.specialist import Specialist
from cadre.jsonl import read_json_lines

SPLITS = ("train", "dev", "test")
CHEAP_SOURCE_BYTES = 20_000_000
"""Local `files`/`dataset` sources up to this many bytes in all are read by the default checks."""

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem found in what the pipelines file points at."""

    file: Path
    line: int
    column: int
    field: str
    message: str
    severity: Severity = "error"

    def render(self) -> str:
        """`FILE:LINE:COL: field: [warning: ]message`, the form `cadre validate` prints the schema's problems in."""
        where = f"{self.field}: " if self.field else ""
        label = "warning: " if self.severity == "warning" else ""
        return f"{_shown(self.file)}:{self.line}:{self.column}: {where}{label}{self.message}"


def _shown(path: Path) -> str:
    """The path relative to the current folder when it lies below it, else as it is."""
    here = Path.cwd().resolve()
    try:
        return str(path.resolve().relative_to(here)) if here.parent != here else str(path)
    except ValueError:
        return str(path)


Locator = Callable[[tuple[str | int, ...]], tuple[int, int]]


def _locator(config: CadreConfig) -> Locator:
    """(line, column) of a key of the file, as the loader finds it (a key inherited from `defaults:` included)."""
    locations: dict[tuple[str | int, ...], tuple[int, int]] = {}
    _plain(_parse_yaml(config.file.read_text(encoding="utf-8")), (), locations)
    return lambda path: _locate(path, locations)


def check_config(config: CadreConfig, deep: bool = False) -> list[Finding]:
    """Every finding of every specialist, in file order of the pipelines file, then of the suite files.

    Args:
        config: a configuration `load_config` accepted.
        deep: also read `python` and `sql` sources and large local ones to check `relevant_ids`.
    """
    locate = _locator(config)
    findings: list[Finding] = []
    for position, specialist in enumerate(config.specialists):
        here = ("specialists", position)
        findings += _check_entrypoints(config, specialist, here, locate)
        findings += _check_suite(config, specialist, here, locate, deep)
        findings += _check_embedder_pairs(config, specialist, here, locate)
        findings += _check_ranker_cases(config, specialist, here, locate)
    return findings


def _finding(
    config: CadreConfig, locate: Locator, path: tuple, field: str, message: str, severity: Severity = "error"
) -> Finding:
    line, column = locate(path)
    return Finding(config.file, line, column, field, message, severity)


def _check_entrypoints(config: CadreConfig, specialist: Specialist, here: tuple, locate: Locator) -> list[Finding]:
    findings = []
    for index, source in enumerate(specialist.sources):
        if not isinstance(source, PythonSource):
            continue
        path = (*here, "sources", index, "entrypoint")
        field = f"specialists.{specialist.name}.sources.{source.name}.entrypoint"
        problem = entrypoint_problem(source.entrypoint, config.root)
        if problem:
            findings.append(_finding(config, locate, path, field, problem))
    return findings


def entrypoint_problem(entrypoint: str, root: Path) -> str | None:
    """Why `package.module:function` cannot be loaded from the project folder `root`, or None. Imports the module
    (its top-level code runs, as it would in the re-index) but does not call the function."""
    module_name, _, function_name = entrypoint.partition(":")
    if str(root) not in sys.path:
        sys.path.append(str(root))  # as the re-index does: user loaders live in the project folder
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any error of the user's module is the finding
        return f"cannot import {module_name!r}: {type(error).__name__}: {error}"
    if not callable(getattr(module, function_name, None)):
        return f"module {module_name!r} ({getattr(module, '__file__', '?')}) has no function {function_name!r}"
    return None


def _check_suite(
    config: CadreConfig, specialist: Specialist, here: tuple, locate: Locator, deep: bool
) -> list[Finding]:
    suite = config.resolve(specialist.evaluation.suite)
    suite_path = (*here, "evaluation", "suite")
    suite_field = f"specialists.{specialist.name}.evaluation.suite"
    findings: list[Finding] = []
    fields = [
        (group, index, f.name)
        for group in ("inputs", "outputs")
        for index, f in enumerate(getattr(specialist.program, group))
    ]
    seen = {name: 0 for _, _, name in fields}
    cases = 0
    keys: dict[str, None] = {}
    relevant: list[tuple[Path, int, str]] = []
    train_ids: list[str] = []
    for split in SPLITS:
        file = suite / f"{split}.jsonl"
        if not file.is_file():
            findings.append(
                _finding(
                    config,
                    locate,
                    suite_path,
                    suite_field,
                    f"{specialist.evaluation.suite}/{split}.jsonl does not exist",
                )
            )
            continue
        for line in read_json_lines(file):
            if line.problem:
                findings.append(Finding(file, line.line, 1, "", f"skipped at run time: {line.problem}", "warning"))
                continue
            cases += 1
            keys.update(dict.fromkeys(line.value))
            for name in seen:
                if line.value.get(name) not in (None, ""):
                    seen[name] += 1
            ids = line.value.get("relevant_ids")
            if isinstance(ids, list):
                relevant += [(file, line.line, str(item)) for item in ids]
            if split == "train" and line.value.get("id") is not None:
                train_ids.append(str(line.value["id"]))
    if cases:
        for group, index, name in fields:
            if seen[name] == 0:
                findings.append(
                    _finding(
                        config,
                        locate,
                        (*here, "program", group, index, "name"),
                        f"specialists.{specialist.name}.program.{group}",
                        f"no case of {specialist.evaluation.suite} has a field {name!r}, so every case would be "
                        f"skipped; the cases' fields are {', '.join(sorted(keys))}",
                    )
                )
            elif seen[name] < cases:
                findings.append(
                    _finding(
                        config,
                        locate,
                        (*here, "program", group, index, "name"),
                        f"specialists.{specialist.name}.program.{group}",
                        f"{cases - seen[name]} of {cases} cases of {specialist.evaluation.suite} have no value for "
                        f"{name!r}; they are skipped at run time",
                        "warning",
                    )
                )
    if relevant or train_ids:
        findings += _check_against_sources(config, specialist, here, locate, relevant, train_ids, deep)
    return findings


def _check_embedder_pairs(config: CadreConfig, specialist: Specialist, here: tuple, locate: Locator) -> list[Finding]:
    """A specialist that declares the `embedder` stage (its schedule or an `embedder:` block) needs train cases with
    relevant ids and a query: they are the fine-tuning pairs."""
    if specialist.schedules.embedder is not None:
        path, field = (*here, "schedules", "embedder"), f"specialists.{specialist.name}.schedules.embedder"
    elif "embedder" in specialist.model_fields_set:
        path, field = (*here, "embedder"), f"specialists.{specialist.name}.embedder"
    else:
        return []
    return _missing_train_relevance(
        config,
        specialist,
        locate,
        path,
        field,
        "the embedder stage fine-tunes",
        "Add relevant_ids (the ids of the documents each case should retrieve) to its cases, or remove the embedder "
        "schedule and settings",
    )


def _check_ranker_cases(config: CadreConfig, specialist: Specialist, here: tuple, locate: Locator) -> list[Finding]:
    """`search_mode: learned` fits each index version's ranker on train cases with relevant ids and a query."""
    if specialist.index.search_mode != "learned":
        return []
    return _missing_train_relevance(
        config,
        specialist,
        locate,
        (*here, "index", "search_mode"),
        f"specialists.{specialist.name}.index.search_mode",
        "search_mode: learned fits its ranker",
        "Add relevant_ids to its cases, or use search_mode: hybrid",
    )


def _missing_train_relevance(
    config: CadreConfig, specialist: Specialist, locate: Locator, path: tuple, field: str, needs: str, remedy: str
) -> list[Finding]:
    """A finding at `path` when the suite's train split has no case with relevant ids and a query (what `needs`
    learns from); none when it has one."""
    if _has_retrieval_train_case(config, specialist):
        return []
    inputs = ", ".join(f.name for f in specialist.program.inputs)
    return [
        _finding(
            config,
            locate,
            path,
            field,
            f"{needs} on train cases with relevant_ids and a value for {inputs}; "
            f"{specialist.evaluation.suite}/train.jsonl has none. {remedy}",
        )
    ]


def _has_retrieval_train_case(config: CadreConfig, specialist: Specialist) -> bool:
    """The suite's train split has a case with relevant ids and a query (True too when the split is missing: the
    suite check reports that)."""
    train = config.resolve(specialist.evaluation.suite) / "train.jsonl"
    if not train.is_file():
        return True
    inputs = [f.name for f in specialist.program.inputs]
    for line in read_json_lines(train):
        case = line.value if not line.problem else None
        if isinstance(case, dict) and case.get("relevant_ids") and any(case.get(name) for name in inputs):
            return True
    return False


def _check_against_sources(
    config: CadreConfig,
    specialist: Specialist,
    here: tuple,
    locate: Locator,
    relevant: list[tuple[Path, int, str]],
    train_ids: list[str],
    deep: bool,
) -> list[Finding]:
    """Read the sources' document ids (local small sources, or every source with `deep`): the suite's `relevant_ids`
    must be among them, and train cases that are documents need `evaluation.train_cases_in_corpus` (and only they)."""
    from cadre.knowledge.sources import SkipReport, SourceError, load_documents

    if not specialist.sources:
        return []
    if not deep and not _cheap(config, specialist):
        return []
    try:
        held = {
            document.record_id
            for document in load_documents(
                specialist.sources,
                root=config.root,
                max_document_bytes=specialist.chunking.max_document_bytes,
                skips=SkipReport(),
            )
        }
    except SourceError as error:
        return [_finding(config, locate, (*here, "sources"), f"specialists.{specialist.name}.sources", str(error))]
    findings = _check_train_cases_in_corpus(config, specialist, here, locate, train_ids, held)
    missing = [(file, line, item) for file, line, item in relevant if item not in held]
    if not missing:
        return findings
    file, line, item = missing[0]
    distinct = len({item for _, _, item in missing})
    return findings + [
        Finding(
            file,
            line,
            1,
            "relevant_ids",
            f"{item!r} is not the id of a document of {specialist.name}'s sources ({len(held)} documents); "
            f"{len(missing)} of {len(relevant)} relevant ids in the suite ({distinct} distinct) are not: "
            "retrieval is scored against documents the index cannot hold",
            "warning",
        )
    ]


def _check_train_cases_in_corpus(
    config: CadreConfig, specialist: Specialist, here: tuple, locate: Locator, train_ids: list[str], held: set[str]
) -> list[Finding]:
    """Most train case ids being document ids means each train case would retrieve its own answer (unlike any
    served request) unless `evaluation.train_cases_in_corpus` leaves it out; the flag with none does nothing."""
    inside = sum(1 for item in train_ids if item in held)
    flag = specialist.evaluation.train_cases_in_corpus
    field = f"specialists.{specialist.name}.evaluation.train_cases_in_corpus"
    if not flag and train_ids and inside * 2 >= len(train_ids):
        message = (
            f"{inside} of {len(train_ids)} train case ids of {specialist.evaluation.suite} are ids of documents of "
            f"{specialist.name}'s sources: each would retrieve its own answer in its training prompt, which no served "
            "request does. Set evaluation.train_cases_in_corpus: true (if they are the same items), or give the cases "
            "ids of their own"
        )
        return [_finding(config, locate, (*here, "evaluation", "suite"), field, message, "warning")]
    if flag and train_ids and not inside:
        message = (
            f"evaluation.train_cases_in_corpus is set, but none of the {len(train_ids)} train case ids of "
            f"{specialist.evaluation.suite} is the id of a document of {specialist.name}'s sources: it leaves nothing "
            "out (remove it, or give each train case the id of its document)"
        )
        return [_finding(config, locate, (*here, "evaluation", "train_cases_in_corpus"), field, message, "warning")]
    return []


def _cheap(config: CadreConfig, specialist: Specialist) -> bool:
    """Whether every source is local files or a dataset file, small enough to read while validating."""
    total = 0
    for source in specialist.sources:
        if not isinstance(source, FilesSource | DatasetSource):
            return False
        path = config.resolve(source.path)
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        total += sum(p.stat().st_size for p in files)
        if total > CHEAP_SOURCE_BYTES:
            return False
    return True
