"""`pipelines.yaml` validation: every bad file exits 2 naming the line and the field, and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cadre.cli import main
from cadre.config import ConfigError, load_config

VALID = textwrap.dedent(
    """\
    version: 1
    project:
      name: t
    defaults:
      tuning: {rank: 8, max_steps: 10}
    specialists:
      - name: coder
        description: a test specialist
        sources:
          - kind: dataset
            name: kb
            path: data/kb.jsonl
        program:
          instruction: Answer the question.
          inputs: [{name: question}]
          outputs: [{name: answer}]
        evaluation:
          suite: evals/suite
        gates:
          program:
            - {metric: exact_match, at_least: 0.1}
        schedules:
          reindex: {cron: "0 3 * * *", timezone: UTC}
    """
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "kb.jsonl").write_text('{"id": "1", "text": "hello"}\n')
    (tmp_path / "evals" / "suite").mkdir(parents=True)
    return tmp_path


def _write(project: Path, text: str) -> Path:
    path = project / "pipelines.yaml"
    path.write_text(text)
    return path


def _line_of(text: str, needle: str, occurrence: int = 1) -> int:
    hits = [number for number, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) >= occurrence, f"{needle!r} not in the test yaml"
    return hits[occurrence - 1]


def test_valid_file_loads(project: Path) -> None:
    config = load_config(_write(project, VALID))
    coder = config.specialist("coder")
    assert coder.tuning.rank == 8 and coder.tuning.max_steps == 10  # inherited from defaults
    assert coder.tuning.method == "qlora"  # schema default
    assert config.resolve(coder.evaluation.suite) == (project / "evals" / "suite").resolve()


def test_specialist_overrides_defaults_key_by_key(project: Path) -> None:
    text = VALID.replace("    gates:", "    tuning: {rank: 4}\n    gates:")
    coder = load_config(_write(project, text)).specialist("coder")
    assert coder.tuning.rank == 4 and coder.tuning.max_steps == 10


# (name, transformation of VALID, text on the offending line, occurrence, field path, words in the message)
BAD = [
    (
        "database url with a database name",
        lambda t: t.replace(
            "  name: t\n", "  name: t\n  database: {backend: postgres, url: 'postgresql://u@db:5432/x'}\n"
        ),
        "database:",
        1,
        "project.database.url",
        "without a database name (postgresql://u@db:5432)",
    ),
    (
        "database url that is not PostgreSQL",
        lambda t: t.replace("  name: t\n", "  name: t\n  database: {backend: postgres, url: 'mysql://u@db'}\n"),
        "database:",
        1,
        "project.database.url",
        "write postgresql://USER@HOST:PORT",
    ),
    (
        "engine address that is not a Dask scheduler",
        lambda t: t.replace("  name: t\n", "  name: t\n  engine: {backend: dask, address: 'http://sched:8787'}\n"),
        "engine:",
        1,
        "project.engine.address",
        "write tcp://HOST:PORT",
    ),
    (
        "engine address without backend dask",
        lambda t: t.replace("  name: t\n", "  name: t\n  engine: {address: 'tcp://sched:8786'}\n"),
        "engine:",
        1,
        "project.engine.address",
        "needs backend: dask",
    ),
    (
        "unknown engine backend",
        lambda t: t.replace("  name: t\n", "  name: t\n  engine: {backend: ray}\n"),
        "engine:",
        1,
        "project.engine.backend",
        "inline",
    ),
    (
        "several MLflow workers on SQLite",
        lambda t: t.replace("  name: t\n", "  name: t\n  mlflow: {workers: 4}\n"),
        "mlflow:",
        1,
        "project.mlflow.workers",
        "need project.database.backend: postgres",
    ),
    (
        "unknown top-level key",
        lambda t: t.replace("project:", "projetc:"),
        "projetc:",
        1,
        "projetc",
        "did you mean 'project'",
    ),
    (
        "typo'd specialist key",
        lambda t: t.replace("description:", "descripton:"),
        "descripton:",
        1,
        "specialists[coder].descripton",
        "did you mean 'description'",
    ),
    (
        "wrong type",
        lambda t: t.replace("{rank: 8, max_steps: 10}", "{rank: eight, max_steps: 10}"),
        "rank: eight",
        1,
        "specialists[coder].tuning.rank",
        'expected a positive integer, got "eight"',
    ),
    (
        "answer mode re-chosen by the refresh with nothing to choose among",
        lambda t: t.replace("{rank: 8, max_steps: 10}", "{rank: 8, max_steps: 10, decoding_dev_cases: 20}"),
        "decoding_dev_cases",
        1,
        "specialists[coder].tuning.decoding_dev_cases",
        "answer_modes: [free, score]",
    ),
    (
        "bad cron value",
        lambda t: t.replace('"0 3 * * *"', '"61 3 * * *"'),
        "61 3",
        1,
        "specialists[coder].schedules.reindex.cron",
        "minute value '61' is outside 0-59",
    ),
    (
        "cron that never fires",
        lambda t: t.replace('"0 3 * * *"', '"0 3 31 2 *"'),
        '"0 3 31 2 *"',
        1,
        "specialists[coder].schedules.reindex.cron",
        "never fires",
    ),
    (
        "cron with four fields",
        lambda t: t.replace('"0 3 * * *"', '"0 3 * *"'),
        '"0 3 * *"',
        1,
        "specialists[coder].schedules.reindex.cron",
        "expected 5",
    ),
    (
        "unknown timezone",
        lambda t: t.replace("timezone: UTC", "timezone: Mars/Olympus"),
        "Mars/Olympus",
        1,
        "specialists[coder].schedules.reindex.timezone",
        "unknown timezone",
    ),
    (
        "missing file",
        lambda t: t.replace("data/kb.jsonl", "data/nope.jsonl"),
        "data/nope.jsonl",
        1,
        "specialists[coder].sources[kb].path",
        "does not exist",
    ),
    (
        "path escaping the project",
        lambda t: t.replace("suite: evals/suite", "suite: ../../etc"),
        "../../etc",
        1,
        "specialists[coder].evaluation.suite",
        "leaves the project folder",
    ),
    (
        "duplicate specialist name",
        lambda t: t + "  " + t[t.index("- name: coder") :],
        "- name: coder",
        2,
        "specialists[coder].name",
        "used twice",
    ),
    (
        "unknown gate metric",
        lambda t: t.replace("{metric: exact_match, at_least: 0.1}", "{metric: bleu, at_least: 0.1}"),
        "metric: bleu",
        1,
        "specialists[coder].gates.program[0].metric",
        "not computed by the evaluation suite",
    ),
    (
        "gate metric the suite does not compute",
        lambda t: t.replace("metric: exact_match", "metric: rouge_l"),
        "metric: rouge_l",
        1,
        "specialists[coder].gates.program[0].metric",
        "add it to evaluation.answer_metrics",
    ),
    (
        "empty specialist list",
        lambda t: t[: t.index("specialists:")] + "specialists: []\n",
        "specialists: []",
        1,
        "specialists",
        "at least 1 item",
    ),
    (
        "missing required block",
        lambda t: t.replace("    evaluation:\n      suite: evals/suite\n", ""),
        "- name: coder",
        1,
        "specialists[coder].evaluation",
        "required field is missing",
    ),
    (
        "gate rule with two kinds",
        lambda t: t.replace("at_least: 0.1}", "at_least: 0.1, at_most: 0.9}"),
        "at_most: 0.9",
        1,
        "specialists[coder].gates.program[0]",
        "exactly one of",
    ),
    (
        "misspelled choice",
        lambda t: t.replace("{rank: 8,", "{method: qlorra, rank: 8,"),
        "qlorra",
        1,
        "specialists[coder].tuning.method",
        "did you mean 'qlora'",
    ),
    (
        "overlap not below chunk size",
        lambda t: t.replace("    gates:", "    chunking: {max_tokens: 32, overlap_tokens: 40}\n    gates:"),
        "overlap_tokens: 40",
        1,
        "specialists[coder].chunking.overlap_tokens",
        "must be smaller than max_tokens",
    ),
    (
        "negative learning rate",
        lambda t: t.replace("{rank: 8,", "{learning_rate: -0.1, rank: 8,"),
        "learning_rate: -0.1",
        1,
        "specialists[coder].tuning.learning_rate",
        "expected a number > 0",
    ),
    (
        "unknown source kind",
        lambda t: t.replace("kind: dataset", "kind: ftp"),
        "kind: ftp",
        1,
        "specialists[coder].sources[kb].kind",
        'unknown kind "ftp"',
    ),
    (
        "name not a slug",
        lambda t: t.replace("- name: coder", "- name: Coder_1"),
        "Coder_1",
        1,
        "specialists[Coder_1].name",
        "lowercase letters",
    ),
    (
        "duplicate yaml key",
        lambda t: t.replace("  name: t\n", "  name: t\n  name: u\n"),
        "name: u",
        1,
        "",
        "duplicate key",
    ),
    (
        "yaml syntax error: an unclosed bracket is reported where it opens, by name",
        lambda t: t.replace("inputs: [{name: question}]", "inputs: [{name: question}"),
        "inputs: [{name: question}",
        1,
        "",
        "YAML syntax error: the '[' opened here is never closed with ']'",
    ),
    (
        "typo inside defaults",
        lambda t: t.replace("{rank: 8, max_steps: 10}", "{rnak: 8, max_steps: 10}"),
        "rnak: 8",
        1,
        "specialists[coder].tuning.rnak",
        "did you mean 'rank'",
    ),
    (
        "two services on one port",
        lambda t: t.replace("  name: t\n", "  name: t\n  mlflow: {port: 4200}\n"),
        "port: 4200",
        1,
        "project.mlflow.port",
        "already used by prefect.port",
    ),
    (
        "serving on the LM's port",
        lambda t: t.replace("  name: t\n", "  name: t\n  serving: {port: 8088}\n"),
        "port: 8088",
        1,
        "project.serving.port",
        "already used by lm.port",
    ),
    (
        "route fallback that is no specialist",
        lambda t: t.replace("  name: t\n", "  name: t\n  serving: {route_fallback: codr}\n"),
        "route_fallback: codr",
        1,
        "project.serving.route_fallback",
        "expected one of: coder",
    ),
    (
        "weaviate without url",
        lambda t: t.replace("  name: t\n", "  name: t\n  index: {backend: weaviate}\n"),
        "backend: weaviate",
        1,
        "project.index.weaviate_url",
        "needs weaviate_url",
    ),
    (
        "bad python entrypoint",
        lambda t: t.replace(
            "kind: dataset\n        name: kb\n        path: data/kb.jsonl",
            "kind: python\n        name: kb\n        entrypoint: not a module",
        ),
        "entrypoint: not a module",
        1,
        "specialists[coder].sources[kb].entrypoint",
        "package.module:function",
    ),
    (
        "sql that writes",
        lambda t: t.replace(
            "kind: dataset\n        name: kb\n        path: data/kb.jsonl",
            "kind: sql\n        name: kb\n        url: sqlite:///kb.db\n        query: DELETE FROM docs",
        ),
        "DELETE FROM docs",
        1,
        "specialists[coder].sources[kb].query",
        "must be a SELECT",
    ),
    (
        "retrieval without sources",
        lambda t: t.replace("    sources:\n      - kind: dataset\n        name: kb\n        path: data/kb.jsonl\n", ""),
        "program:",
        1,
        "specialists[coder].program.retrieve_k",
        "needs at least one source",
    ),
    (
        "unknown retrieval metric",
        lambda t: t.replace(
            "      suite: evals/suite\n", "      suite: evals/suite\n      retrieval_metrics: [recall@]\n"
        ),
        "recall@]",
        1,
        "specialists[coder].evaluation.retrieval_metrics",
        "unknown retrieval metric",
    ),
    (
        "base model folder missing",
        lambda t: t.replace("    description: a test", "    base_model: models/none\n    description: a test"),
        "models/none",
        1,
        "specialists[coder].base_model",
        "neither a packaged model",
    ),
    (
        "unknown embedding runtime",
        lambda t: t.replace("  name: t\n", "  name: t\n  embedding: {runtime: onnx16}\n"),
        "runtime: onnx16",
        1,
        "project.embedding.runtime",
        "'onnx-int8'",
    ),
    (
        "empty search space",
        lambda t: t.replace("{rank: 8, max_steps: 10}", "{rank: 8, max_steps: 10, search: {trials: 4, space: {}}}"),
        "search:",
        1,
        "specialists[coder].tuning.search.space",
        "the search space is empty",
    ),
    (
        "inverted search range",
        lambda t: t.replace(
            "    program:\n      instruction",
            "    tuning:\n      search:\n        space:\n          learning_rate: {low: 1.0e-3, high: 1.0e-5}\n"
            "    program:\n      instruction",
        ),
        "learning_rate: {low",
        1,
        "specialists[coder].tuning.search.space.learning_rate.high",
        "must be more than low",
    ),
    (
        "declared setting outside the search space",
        lambda t: t.replace(
            "    program:\n      instruction",
            "    tuning:\n      search:\n        space:\n          rank: [4, 16]\n    program:\n      instruction",
        ),
        "rank: [4, 16]",
        1,
        "specialists[coder].tuning.search.space.rank",
        "the declared rank (8) is not in the choices [4, 16]",
    ),
    (
        "unknown searched setting",
        lambda t: t.replace(
            "    program:\n      instruction",
            "    tuning:\n      search:\n        space:\n          epochs: [1, 2]\n    program:\n      instruction",
        ),
        "epochs: [1, 2]",
        1,
        "",
        "learning_rate",
    ),
    (
        "unsupported version",
        lambda t: t.replace("version: 1", "version: 2"),
        "version: 2",
        1,
        "version",
        "expected one of 1",
    ),
]


@pytest.mark.parametrize(("name", "change", "needle", "occurrence", "field", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_exits_2_with_line_and_field(
    project: Path, capsys, name, change, needle, occurrence, field, words
) -> None:
    text = change(VALID)
    assert text != VALID, "the transformation must change the file"
    path = _write(project, text)
    before = sorted(p.relative_to(project) for p in project.rglob("*"))

    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(path)])

    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    line = _line_of(text, needle, occurrence)
    expected_prefix = f"{path}:{line}:"
    matching = [row for row in err.splitlines() if row.startswith(expected_prefix)]
    assert matching, f"no error on line {line}:\n{err}"
    assert any((f" {field}: " in row if field else True) and words in row for row in matching), err
    assert "Traceback" not in err
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before, "validation wrote files"


def test_all_errors_reported_at_once(project: Path) -> None:
    text = (
        VALID.replace("description:", "descripton:")
        .replace("{rank: 8,", "{rank: -1,")
        .replace("timezone: UTC", "timezone: Nowhere")
    )
    with pytest.raises(ConfigError) as error:
        load_config(_write(project, text))
    fields = {issue.field for issue in error.value.issues}
    assert {
        "specialists[coder].descripton",
        "specialists[coder].tuning.rank",
        "specialists[coder].schedules.reindex.timezone",
    } <= fields
    lines = [issue.line for issue in error.value.issues]
    assert lines == sorted(lines)


def test_missing_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", str(tmp_path / "absent.yaml")])
    assert exit_info.value.code == 2
    assert "file not found" in capsys.readouterr().err


def test_validate_command_as_a_user_runs_it(project: Path) -> None:
    path = _write(project, VALID.replace("description:", "descripton:"))
    result = subprocess.run(
        [sys.executable, "-m", "cadre.cli", "validate", str(path)],
        check=False,
        capture_output=True,
        text=True,
        cwd=project,
    )
    assert result.returncode == 2
    assert f"{path}:{_line_of(VALID, 'description:')}:" in result.stderr
    assert "Traceback" not in result.stderr


def _stopped_stack(project: Path) -> tuple[Path, dict[str, int]]:
    """A valid pipelines file whose MLflow and Prefect ports nothing listens on, and those ports."""
    from support import free_port

    ports = {"mlflow": free_port(), "prefect": free_port()}
    path = _write(
        project,
        VALID.replace(
            "  name: t\n",
            f"  name: t\n  mlflow: {{port: {ports['mlflow']}}}\n  prefect: {{port: {ports['prefect']}}}\n",
        ),
    )
    return path, ports


@pytest.mark.parametrize(
    ("command", "service"),
    [
        (["history", "coder"], "mlflow"),
        (["rollback", "coder", "program"], "mlflow"),
        (["run", "optimize", "-s", "coder"], "prefect"),
        (["deploy"], "prefect"),
        (["serve"], "mlflow"),
    ],
)
def test_commands_against_a_stopped_stack_say_so_at_once(project: Path, capsys, command, service) -> None:
    path, ports = _stopped_stack(project)
    started = time.monotonic()
    assert main([*command, "-c", str(path)]) == 1
    assert time.monotonic() - started < 15, "it waited out a client's retries"
    err = capsys.readouterr().err
    assert f"{service} is not answering at http://127.0.0.1:{ports[service]}" in err and "cadre up" in err
    assert "Traceback" not in err


def test_status_of_a_stopped_stack_exits_3_and_reports_it_as_json(project: Path, capsys) -> None:
    path, _ = _stopped_stack(project)
    assert main(["status", "-c", str(path)]) == 3
    assert "a service is down" in capsys.readouterr().err
    assert main(["status", "--json", "-c", str(path)]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["healthy"] is False and "champions" not in report
    assert {row["service"]: row["state"] for row in report["services"]}["mlflow"] == "down"


# Found by the fuzz tier (tests/fuzz/test_loaders_fuzz.py): each once escaped as a traceback, or as an error spread
# over two lines, instead of one `FILE:LINE:COL: ...` line per problem.
ONCE_CRASHED = [
    ("a NUL character", "version: 1\nproject:\n  name: t\x00\n", 3, "does not allow the character U+0000"),
    ("a merge key at the top", "<<: {project: 1}\nspecialists: []\n", 1, "project: expected a mapping"),
    (
        "a merge key beside keys of its own",
        "project: &p {name: x}\ndefaults:\n  tuning: {rank: 8}\n  <<: *p\nspecialists: []\n",
        2,
        "defaults cannot set `name`",
    ),
    ("a mapping merging itself", "project: {name: x}\nspecialists:\n  - &s {name: a, <<: *s}\n", 1, "cannot be read"),
    (
        "a timezone that names a folder of zones",
        VALID.replace("timezone: UTC", "timezone: Europe"),
        23,
        "unknown timezone",
    ),
    ("a line break inside a value", VALID.replace("suite: evals/suite", 'suite: "evals/su\\nite"'), 18, "su\\nite"),
]


@pytest.mark.parametrize(("name", "text", "line", "words"), ONCE_CRASHED, ids=[c[0] for c in ONCE_CRASHED])
def test_yaml_that_once_crashed_the_loader_is_one_line_per_problem(project: Path, name, text, line, words) -> None:
    path = _write(project, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    rendered = str(error.value).splitlines()
    assert all(row.startswith(f"{path}:") for row in rendered), rendered
    assert any(row.startswith(f"{path}:{line}:") and words in row for row in rendered), rendered


def test_service_urls_from_the_environment_override_the_file(project: Path, monkeypatch) -> None:
    """A worker container shares the laptop's pipelines.yaml but reaches the services by other names."""
    from cadre.platform.env import cadre_env
    from cadre.platform.stack import Stack

    path = _write(project, VALID.replace("  name: t\n", "  name: t\n  mlflow: {port: 5111}\n"))
    assert load_config(path).project.mlflow.uri == "http://127.0.0.1:5111"
    monkeypatch.setenv("CADRE_MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("CADRE_PREFECT_API_URL", "http://prefect:4200/api")
    monkeypatch.setenv("CADRE_LM_API_BASE", "")  # empty: not set
    config = load_config(path)
    assert (config.project.mlflow.uri, config.project.prefect.api) == ("http://mlflow:5000", "http://prefect:4200/api")
    assert config.project.lm.api_base is None and config.project.mlflow.port == 5111
    env = cadre_env(config)  # what the flows, the worker and the services are given
    assert (env["MLFLOW_TRACKING_URI"], env["PREFECT_API_URL"]) == ("http://mlflow:5000", "http://prefect:4200/api")
    assert env["MLFLOW_REGISTRY_URI"] == "http://mlflow:5000"  # a stray shell value never splits runs from versions
    assert {service.name for service in Stack(config).services()} == {"worker", "lm"}  # nothing external is started


def test_cpu_threads_from_the_environment_override_the_file(project: Path, monkeypatch) -> None:
    """`cadre demo` gives each flow run its share of the cores when the specialists' cycles run side by side."""
    from cadre.orchestration.demo import thread_shares

    path = _write(project, VALID.replace("  name: t\n", "  name: t\n  threads: {torch: 4, embedding: 3}\n"))
    from_file = load_config(path)
    assert (from_file.project.threads.torch, from_file.project.threads.embedding) == (4, 3)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    shares = thread_shares(from_file, 3)
    assert shares == {"CADRE_TORCH_THREADS": "1", "CADRE_EMBEDDING_THREADS": "1"}
    for name, value in shares.items():
        monkeypatch.setenv(name, value)
    config = load_config(path)
    assert (config.project.threads.torch, config.project.threads.embedding) == (1, 1)
    monkeypatch.setenv("CADRE_TORCH_THREADS", "many")
    with pytest.raises(ConfigError, match="threads.torch"):
        load_config(path)


def test_database_postgres_puts_mlflow_and_prefect_on_postgresql(project: Path) -> None:
    """`cadre up` starts PostgreSQL first and gives MLflow (with its workers) and Prefect a database each on it; with
    a server's url it starts none and uses that one."""
    from cadre.platform import postgres
    from cadre.platform.stack import Stack

    local = VALID.replace(
        "  name: t\n", "  name: t\n  database: {backend: postgres, port: 5544}\n  mlflow: {workers: 3}\n"
    )
    config = load_config(_write(project, local))
    services = Stack(config).services()
    assert [service.name for service in services][:2] == ["database", "mlflow"]
    assert services[0].port == 5544 and str(postgres.data_dir(config)) in services[0].command
    mlflow = services[1].command
    assert mlflow[mlflow.index("--backend-store-uri") + 1] == "postgresql+psycopg2://cadre@127.0.0.1:5544/t_mlflow"
    assert mlflow[mlflow.index("--workers") + 1] == "3"
    assert postgres.database_url(config, "prefect", "asyncpg") == "postgresql+asyncpg://cadre@127.0.0.1:5544/t_prefect"

    remote = VALID.replace(
        "  name: t\n", "  name: t\n  database: {backend: postgres, url: 'postgresql://ops:s3cret@db:5432'}\n"
    )
    config = load_config(_write(project, remote))
    assert "database" not in [service.name for service in Stack(config).services()]
    assert postgres.database_url(config, "mlflow", "psycopg2") == "postgresql+psycopg2://ops:s3cret@db:5432/t_mlflow"
    [row] = [row for row in Stack(config).status() if row["service"] == "database"]
    assert row["url"] == "postgresql://ops:***@db:5432" and row["state"] == "unreachable (external)"
