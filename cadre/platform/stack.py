"""The local stack: MLflow server, Prefect server, a Prefect worker and the llama.cpp LM server (and PostgreSQL
under MLflow and Prefect, with `project.database.backend: postgres`).

`cadre up` starts each service that `pipelines.yaml` does not point elsewhere, on 127.0.0.1, with
its state under the project's state dir, and waits until each answers its health check. It is
idempotent: a service already running (started by us and healthy) is left alone. `cadre down`
stops exactly the processes `up` recorded (pid files under `<state>/run`), by process group, after
`cadre.orchestration.deployments.end_flow_runs` has ended the flow runs the worker started (each runs in a
session of its own, so stopping the worker alone would leave them running).
How each service is started is spelled out in `infra/local/README.md`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cadre.config import CadreConfig
from cadre.platform import postgres
from cadre.platform.env import cadre_env


class StackError(RuntimeError):
    """A service could not be started or does not answer; the message says why and what to do."""


@dataclass(frozen=True)
class Service:
    """How one local service is started and checked."""

    name: str
    command: list[str]
    health_url: str | None
    ui_url: str | None
    port: int | None
    host: str
    timeout_s: float = 90.0
    probe: Callable[[], bool] | None = None  # health check of a service without an HTTP endpoint
    stop_signal: int | None = None  # sent to the leader alone (PostgreSQL: SIGINT, a fast shutdown); else SIGTERM to
    # the whole process group
    works: Callable[[], str | None] | None = None  # once healthy after a start: does its work; None, or what failed


def _bin(name: str) -> str:
    """An executable of this virtual environment (the stack runs with the interpreter that runs cadre)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def all_up(rows: list[dict]) -> bool:
    """Whether every service of `Stack.status()` is up (an external one included)."""
    return all(row["state"].startswith("up") for row in rows)


class Stack:
    """The services of one project, as declared by its `pipelines.yaml`."""

    def __init__(self, config: CadreConfig):
        self.config = config
        self.state = config.state_dir
        self.run_dir = self.state / "run"
        self.log_dir = self.state / "logs"

    def services(self) -> list[Service]:
        project = self.config.project
        services: list[Service] = []
        database = project.database
        if database.local:
            services.append(
                Service(
                    name="database",
                    command=postgres.server_command(self.config),
                    health_url=None,
                    ui_url=database.server,
                    port=database.port,
                    host=database.host,
                    probe=lambda: postgres.answers(self.config),
                    stop_signal=signal.SIGINT,
                )
            )
        if not project.mlflow.tracking_uri:
            m = project.mlflow
            mlflow_dir = self.state / "mlflow"
            backend = (
                postgres.database_url(self.config, "mlflow", "psycopg2")
                if database.backend == "postgres"
                else f"sqlite:///{mlflow_dir / 'mlflow.db'}"
            )
            services.append(
                Service(
                    name="mlflow",
                    command=[
                        _bin("mlflow"),
                        "server",
                        "--backend-store-uri",
                        backend,
                        "--artifacts-destination",
                        str(mlflow_dir / "artifacts"),
                        "--host",
                        m.host,
                        "--port",
                        str(m.port),
                        "--workers",
                        str(m.workers),
                    ],
                    health_url=f"{m.uri}/health",
                    ui_url=m.uri,
                    port=m.port,
                    host=m.host,
                )
            )
        if not project.prefect.api_url:
            p = project.prefect
            services.append(
                Service(
                    name="prefect",
                    command=[_bin("prefect"), "server", "start", "--host", p.host, "--port", str(p.port)],
                    health_url=f"{p.api}/health",
                    ui_url=p.ui,
                    port=p.port,
                    host=p.host,
                )
            )
        services.append(
            Service(
                name="worker",
                command=[
                    _bin("prefect"),
                    "worker",
                    "start",
                    "--pool",
                    project.prefect.work_pool,
                    "--type",
                    "process",
                    "--name",
                    worker_name(self.config),
                ],
                health_url=None,
                ui_url=f"{project.prefect.ui}/work-pools/work-pool/{project.prefect.work_pool}",
                port=None,
                host=project.prefect.host,
                # Up once Prefect lists it ONLINE in its pool: a run triggered right after `cadre up` finds it.
                probe=lambda: worker_online(project.prefect.api, project.prefect.work_pool, worker_name(self.config)),
            )
        )
        if not project.lm.api_base:
            from cadre.runtime.base_model import packaged_gguf_path

            lm = project.lm
            services.append(
                Service(
                    name="lm",
                    command=[
                        sys.executable,
                        "-m",
                        "llama_cpp.server",
                        "--model",
                        str(packaged_gguf_path(self.config)),
                        "--host",
                        lm.host,
                        "--port",
                        str(lm.port),
                        "--n_threads",
                        str(lm.n_threads),
                        "--n_ctx",
                        str(lm.n_ctx),
                        "--model_alias",
                        lm.model,
                    ],
                    health_url=f"{lm.base_url}/models",
                    ui_url=lm.base_url,
                    port=lm.port,
                    host=lm.host,
                    timeout_s=180,
                    works=lambda: _generates(lm.base_url, lm.model),
                )
            )
        return services

    # -- lifecycle ---------------------------------------------------------------------------

    def up(self, services: list[str] | None = None, console: Console | None = None) -> None:
        """Start the services (all, or those named) and wait until each is healthy."""
        console = console or Console(stderr=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        wanted = [s for s in self.services() if services is None or s.name in services]
        if any(s.name == "lm" for s in wanted):
            from cadre.runtime.base_model import ensure_gguf

            ensure_gguf(self.config, console=console)
        databases_ready = self.config.project.database.backend == "sqlite"
        for service in wanted:
            try:
                if service.name == "database" and postgres.initialize(self.config):
                    console.print(f"[green]✓[/green] database: new data directory {postgres.data_dir(self.config)}")
                elif service.name in ("mlflow", "prefect") and not databases_ready:
                    for name in postgres.ensure_databases(self.config):
                        console.print(f"[green]✓[/green] database: created {name}")
                    databases_ready = True
            except postgres.PostgresError as error:
                raise StackError(str(error)) from None
            if self._running(service):
                if self._healthy(service):
                    console.print(f"[green]✓[/green] {service.name} already running")
                    continue
                raise StackError(
                    f"{service.name} (pid {self._pid(service)}) is running but not healthy; "
                    f"see {self._log(service)} or run `cadre down` first"
                )
            self._check_port_free(service)
            self._start(service)
            with console.status(f"starting {service.name} …"):
                self._wait_healthy(service)
                self._check_works(service)
            console.print(f"[green]✓[/green] {service.name} up" + (f" at {service.ui_url}" if service.ui_url else ""))

    def down(self, console: Console | None = None) -> list[str]:
        """Stop every service `up` started (process group, TERM then KILL); return the names stopped."""
        console = console or Console(stderr=True)
        stopped = []
        for service in reversed(self.services()):
            pid = self._pid(service)
            if pid is None:
                continue
            if _alive(pid) and self._is_ours(service, pid):
                _terminate_group(pid, leader_signal=service.stop_signal)
                stopped.append(service.name)
                console.print(f"[yellow]■[/yellow] stopped {service.name} (pid {pid})")
            self._pidfile(service).unlink(missing_ok=True)
        if not stopped:
            console.print("nothing to stop")
        return stopped

    def worker_pid(self) -> int | None:
        """The pid of the Prefect worker `up` started, while it runs; None otherwise."""
        worker = next(service for service in self.services() if service.name == "worker")
        return self._pid(worker) if self._running(worker) else None

    def status(self) -> list[dict]:
        """One row per service: name, state (up / down / unhealthy / external), URL, pid."""
        rows = []
        for service in self.services():
            pid = self._pid(service)
            running = self._running(service)
            state = "down"
            if running:
                state = "up" if self._healthy(service) else "unhealthy"
            rows.append(
                {
                    "service": service.name,
                    "state": state,
                    "url": service.ui_url or "",
                    "pid": pid if running else None,
                    "log": str(self._log(service)),
                }
            )
        project = self.config.project
        for name, url, answers in (
            ("database", project.database.url, lambda: postgres.answers(self.config)),
            ("mlflow", project.mlflow.tracking_uri, lambda: _http_ok(f"{project.mlflow.uri}/health")),
            ("prefect", project.prefect.api_url, lambda: _http_ok(f"{project.prefect.api}/health")),
            ("lm", project.lm.api_base, lambda: _http_ok(f"{project.lm.base_url}/models")),
        ):
            if url:
                rows.append(
                    {
                        "service": name,
                        "state": "up (external)" if answers() else "unreachable (external)",
                        "url": _without_password(url),
                        "pid": None,
                        "log": "",
                    }
                )
        return rows

    def print_status(self, console: Console) -> bool:
        table = Table(title="Cadre services", title_justify="left")
        for column in ("service", "state", "url", "pid"):
            table.add_column(column)
        rows = self.status()
        for row in rows:
            colour = "green" if row["state"].startswith("up") else "red"
            table.add_row(row["service"], f"[{colour}]{row['state']}[/{colour}]", row["url"], str(row["pid"] or ""))
        console.print(table)
        return all_up(rows)

    # -- helpers -----------------------------------------------------------------------------

    def _pidfile(self, service: Service) -> Path:
        return self.run_dir / f"{service.name}.json"

    def _log(self, service: Service) -> Path:
        return self.log_dir / f"{service.name}.log"

    def _pid(self, service: Service) -> int | None:
        try:
            return int(json.loads(self._pidfile(service).read_text())["pid"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def _is_ours(self, service: Service, pid: int) -> bool:
        """Guard against a recycled pid: the process must still run the command we started."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        recorded = json.loads(self._pidfile(service).read_text()).get("command", [])
        return bool(recorded) and any(part.decode(errors="replace") == recorded[-1] for part in cmdline)

    def _running(self, service: Service) -> bool:
        pid = self._pid(service)
        return pid is not None and _alive(pid) and self._is_ours(service, pid)

    def _healthy(self, service: Service) -> bool:
        if service.probe is not None:
            return self._running(service) and service.probe()
        if service.health_url is None:
            return self._running(service)
        return _http_ok(service.health_url)

    def _check_port_free(self, service: Service) -> None:
        if service.port is None:
            return
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((service.host, service.port))
            except OSError:
                raise StackError(
                    f"port {service.port} on {service.host} is already in use by a program `cadre up` did not start, "
                    f"so {service.name} cannot start. Stop that program, or set project.{service.name}.port in "
                    f"{self.config.file.name} to a free port."
                ) from None

    def _start(self, service: Service) -> None:
        env = {**os.environ, **cadre_env(self.config)}
        if service.name == "prefect":
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = (
                postgres.database_url(self.config, "prefect", "asyncpg")
                if self.config.project.database.backend == "postgres"
                else f"sqlite+aiosqlite:///{self.state / 'prefect' / 'prefect.db'}"
            )
            env["PREFECT_UI_API_URL"] = self.config.project.prefect.api
        if service.name == "worker":
            env["PREFECT_WORKER_QUERY_SECONDS"] = "2"  # pick up a triggered run within ~2 s, not 10
        (self.state / "prefect").mkdir(parents=True, exist_ok=True)
        (self.state / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
        log = self._log(service).open("ab")
        process = subprocess.Popen(
            service.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.config.root,
            start_new_session=True,
        )
        self._pidfile(service).write_text(
            json.dumps({"pid": process.pid, "command": service.command, "started": time.time()})
        )

    def _check_works(self, service: Service) -> None:
        """A service that answers its health check can still fail at its work: a llama.cpp build whose kernels crash
        on this CPU serves `/models` and dies on its first generation. Checked once, right after a start."""
        if service.works is None:
            return
        failure = service.works()
        if failure is None:
            return
        pid = self._pid(service)
        time.sleep(0.5)
        state = "exited" if pid is None or not _alive(pid) else "is running"
        raise StackError(
            f"{service.name} answers its health check but failed its first piece of work ({failure}) and {state}; "
            f"last lines of {self._log(service)}:\n{_tail(self._log(service))}\n"
            + (
                "A llama.cpp build with AMX kernels crashes on recent Intel Xeon CPUs: ./setup.sh rebuilds "
                "llama-cpp-python without them."
                if service.name == "lm"
                else ""
            )
        )

    def _wait_healthy(self, service: Service) -> None:
        deadline = time.monotonic() + service.timeout_s
        pid = self._pid(service)
        while time.monotonic() < deadline:
            if pid is None or not _alive(pid):
                tail = _tail(self._log(service))
                raise StackError(f"{service.name} exited while starting; last lines of {self._log(service)}:\n{tail}")
            if self._healthy(service) and (
                service.health_url is not None or time.monotonic() > deadline - service.timeout_s + 3
            ):
                return
            time.sleep(0.5)
        raise StackError(
            f"{service.name} did not become healthy within {service.timeout_s:.0f} s; see {self._log(service)}"
        )


def worker_name(config: CadreConfig) -> str:
    """The name of the worker `cadre up` starts; Prefect labels each flow run it submits with it."""
    return f"cadre-{config.project.name}"


def require_services(config: CadreConfig, *names: str) -> None:
    """Check that the services a command needs answer (`mlflow`, `prefect`), in a couple of seconds.

    Without it a command against a stopped stack waits out its client's retries for minutes and ends in
    a traceback.

    Raises:
        StackError: one does not answer; the message names it, its URL and what to do.
    """
    project = config.project
    health = {
        "mlflow": (f"{project.mlflow.uri}/health", project.mlflow.tracking_uri),
        "prefect": (f"{project.prefect.api}/health", project.prefect.api_url),
    }
    for name in names:
        url, external = health[name]
        if not _http_ok(url):
            hint = (
                f"check project.{name} in {config.file.name}"
                if external
                else "start the local stack with `cadre up` (`cadre status` shows what is up)"
            )
            raise StackError(f"{name} is not answering at {url.rsplit('/health', 1)[0]}: {hint}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def child_pids(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().split(")")[-1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def stop_processes(pids: list[int], grace_s: float) -> dict[int, float | None]:
    """SIGTERM each process (with its process group when it leads one), wait up to `grace_s` for all of them to
    exit, SIGKILL what is left.

    Returns:
        For each pid, the seconds it took to exit after SIGTERM, or None when it had to be killed.
    """
    leaders = {pid for pid in pids if _leads_group(pid)}  # its group goes too: children it started

    def send(pid: int, signum: signal.Signals) -> None:
        try:
            os.killpg(pid, signum) if pid in leaders else os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def gone(pid: int) -> bool:
        return not (_group_alive(pid) if pid in leaders else _alive(pid))

    started = time.monotonic()
    for pid in pids:
        send(pid, signal.SIGTERM)
    ended: dict[int, float | None] = {}
    while len(ended) < len(pids) and time.monotonic() - started < grace_s:
        for pid in pids:
            if pid not in ended and gone(pid):
                ended[pid] = time.monotonic() - started
        time.sleep(0.2)
    for pid in pids:
        if pid not in ended:
            send(pid, signal.SIGKILL)
            ended[pid] = None
    return ended


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _terminate_group(pid: int, grace_s: float = 15.0, leader_signal: int | None = None) -> None:
    """Stop a process group: SIGTERM to all of it (or `leader_signal` to its leader alone, which stops the rest
    itself), SIGKILL to what is left after `grace_s`."""
    try:
        if leader_signal is None:
            os.killpg(pid, signal.SIGTERM)
        else:
            os.kill(pid, leader_signal)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.2)
    if _group_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().split(")")[-1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _post_json(url: str, body: dict, timeout: float):
    """POST `body` as JSON, return the decoded answer (raises URLError, OSError or ValueError)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _generates(base_url: str, model: str) -> str | None:
    """None when the OpenAI-compatible server at `base_url` writes one token, else what went wrong."""
    body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    try:
        _post_json(f"{base_url}/completions", body, timeout=60)["choices"][0]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as error:
        return f"a one-token completion: {type(error).__name__}: {error}"
    return None


def worker_online(api: str, pool: str, name: str) -> bool:
    """Whether Prefect lists the worker `name` ONLINE in work pool `pool` (it has sent a recent heartbeat)."""
    try:
        workers = _post_json(f"{api}/work_pools/{urllib.parse.quote(pool)}/workers/filter", {}, timeout=2)
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return any(worker.get("name") == name and worker.get("status") == "ONLINE" for worker in workers)


def _without_password(url: str) -> str:
    """A service URL fit to print: a password in it becomes `***`."""
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
