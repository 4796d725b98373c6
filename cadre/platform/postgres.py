"""PostgreSQL for the local MLflow and Prefect servers (`project.database.backend: postgres`).

With `project.database.url` set, the services use that server. Without it, `cadre up` starts a local one: the
data directory is `<state_dir>/postgres` (made by `initdb` on first start), the server listens on
`project.database.host:port` over TCP only (no Unix socket), and trusts local connections as user `cadre`, as a
development database does. PostgreSQL refuses to run as root; when Cadre runs as root the server runs as the
system user `postgres`, which must be able to reach the state directory.

Either way `cadre up` creates one database per service, `<project>_mlflow` and `<project>_prefect`, if missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cadre.config import CadreConfig

SUPERUSER = "cadre"  # the role initdb makes for a local server
SYSTEM_USER = "postgres"  # who runs the server when Cadre runs as root


class PostgresError(RuntimeError):
    """PostgreSQL cannot be prepared or reached; the message says why and what to do."""


def database_name(config: CadreConfig, service: str) -> str:
    """The database of one service (`mlflow`, `prefect`) on the project's server."""
    return f"{config.project.name.replace('-', '_')}_{service}"


def database_url(config: CadreConfig, service: str, driver: str) -> str:
    """SQLAlchemy URL of a service's database, e.g. `postgresql+psycopg2://cadre@127.0.0.1:5433/cadre_mlflow`."""
    parts = urlsplit(config.project.database.server)
    return urlunsplit((f"postgresql+{driver}", parts.netloc, f"/{database_name(config, service)}", "", ""))


def data_dir(config: CadreConfig) -> Path:
    return config.state_dir / "postgres"


def _find(name: str) -> str | None:
    """A PostgreSQL program (`postgres`, `initdb`): on PATH, or in Debian's `/usr/lib/postgresql/<major>/bin`."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(versions[-1]) if versions else None


def binary(name: str) -> str:
    """`_find(name)`, or an error saying how to install it."""
    found = _find(name)
    if found:
        return found
    raise PostgresError(
        f"PostgreSQL's `{name}` is not installed, so `cadre up` cannot start a local PostgreSQL "
        "(project.database.backend: postgres). Install it (Debian: `apt-get install postgresql`), or set "
        "project.database.url to an existing server, or use backend: sqlite."
    )


def _as_server_user() -> list[str]:
    """Prefix that runs a command as the PostgreSQL system user when we are root (postgres refuses root)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={SYSTEM_USER}", f"--regid={SYSTEM_USER}", "--init-groups", "--"]


def server_command(config: CadreConfig) -> list[str]:
    """The command that runs the local server in the foreground (`cadre up` starts it like any service)."""
    database = config.project.database
    return [
        *_as_server_user(),
        _find("postgres") or "postgres",  # `initialize`, run before every start, reports a missing install
        "-D",
        str(data_dir(config)),
        "-h",
        database.host,
        "-p",
        str(database.port),
        "-c",
        "unix_socket_directories=",  # TCP only: no socket file in a system folder, no path-length limit
        "-c",
        "max_connections=200",  # MLflow's and Prefect's pools, several workers each
    ]


def initialize(config: CadreConfig) -> bool:
    """Make the local data directory with `initdb` if it has none; return whether it did.

    Raises:
        PostgresError: PostgreSQL is not installed, initdb failed, or the server's system user cannot reach the
            state directory.
    """
    folder = data_dir(config)
    binary("postgres")  # installed, or a clear error before anything starts
    if (folder / "PG_VERSION").exists():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    prefix = _as_server_user()
    if prefix:
        shutil.chown(folder, SYSTEM_USER, SYSTEM_USER)
        reach = subprocess.run([*prefix, "test", "-w", str(folder)], check=False, capture_output=True)
        if reach.returncode != 0:
            raise PostgresError(
                f"PostgreSQL does not run as root, so it runs as user {SYSTEM_USER!r}, which cannot reach {folder} "
                "(a folder above it is closed to other users, e.g. mode 700). Run cadre as a normal user, make the "
                "folders above the state dir readable (chmod o+x), or set project.database.url to a server."
            )
    result = subprocess.run(
        [*prefix, binary("initdb"), "-D", str(folder), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-locale"],
        check=False,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise PostgresError(f"initdb failed for {folder}:\n{(result.stdout + result.stderr)[-2000:]}")
    return True


def _connect(url: str, database: str = "postgres", timeout_s: int = 2):
    import psycopg2

    parts = urlsplit(url)
    return psycopg2.connect(
        host=parts.hostname,
        port=parts.port or 5432,
        user=parts.username or SUPERUSER,
        password=parts.password,
        dbname=database,
        connect_timeout=timeout_s,
    )


def answers(config: CadreConfig) -> bool:
    """Whether the project's PostgreSQL accepts connections (it refuses them while it starts up)."""
    import psycopg2

    try:
        _connect(config.project.database.server).close()
    except psycopg2.Error:
        return False
    return True


def ensure_databases(config: CadreConfig) -> list[str]:
    """Create the services' databases that do not exist yet; return the names created.

    Raises:
        PostgresError: the server does not answer or refuses (the message names it and the key to fix).
    """
    import psycopg2
    import psycopg2.errors

    server = config.project.database.server
    try:
        connection = _connect(server, timeout_s=5)
    except psycopg2.Error as error:
        raise PostgresError(
            f"PostgreSQL at {urlsplit(server).hostname}:{urlsplit(server).port} does not answer: "
            f"{str(error).strip()}. Check project.database in {config.file.name}."
        ) from None
    created = []
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with connection.cursor() as cursor:
            for service in ("mlflow", "prefect"):
                name = database_name(config, service)
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    try:
                        cursor.execute(f'CREATE DATABASE "{name}"')
                    except psycopg2.errors.DuplicateDatabase:
                        continue  # another `cadre up` made it a moment ago
                    created.append(name)
    finally:
        connection.close()
    return created
