"""Which index version is live, per specialist: one small JSON file under the state dir.

`<state_dir>/index/live.json`:

    {"format": 1,
     "specialists": {"icd10-coder": {"live": "v20250601-030000-ab12cd",
                                     "promoted_at": "2025-06-01T03:05:12+00:00",
                                     "history": [{"version": "...", "promoted_at": "..."}, ...]}}}

Every change is a read-modify-write under an exclusive `flock` (two flows promoting two specialists
at once do not lose each other's update) and lands through a temporary file renamed over the old one,
so a reader sees the old file or the new one, never a torn one. `history` lists earlier live versions,
newest first, so a rollback knows where to go.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LIVE_FILE = "live.json"
HISTORY_LENGTH = 20


def write_json_atomic(path: Path, content: Any) -> None:
    """Write JSON through a temporary file in the same folder, fsync it, rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(content, stream, ensure_ascii=False, separators=(",", ":"))
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_json(path: Path, default: Any = None) -> Any:
    """Content of a JSON file, or `default` when it does not exist."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default


@dataclass(frozen=True)
class Promotion:
    """A move of the live pointer.

    Attributes:
        specialist: Whose index.
        version: The version now live.
        previous: The version live before (None if none was).
        promoted_at: ISO timestamp (UTC).
    """

    specialist: str
    version: str
    previous: str | None
    promoted_at: str


class LivePointers:
    """The live-version pointers of every specialist of a project.

    Args:
        index_dir: `<state_dir>/index`.
    """

    def __init__(self, index_dir: Path):
        self.path = Path(index_dir) / LIVE_FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        return read_json(self.path, {"format": 1, "specialists": {}})

    def get(self, specialist: str) -> str | None:
        """The live version of a specialist, or None before its first promotion."""
        entry = self._read()["specialists"].get(specialist)
        return entry["live"] if entry else None

    def history(self, specialist: str) -> list[str]:
        """Earlier live versions of a specialist, newest first."""
        entry = self._read()["specialists"].get(specialist) or {}
        return [item["version"] for item in entry.get("history", [])]

    def set(self, specialist: str, version: str) -> Promotion:
        """Make `version` live for `specialist`; the version it replaces goes to the history."""
        with self._locked():
            content = self._read()
            entry = content["specialists"].get(specialist)
            now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            previous = entry["live"] if entry else None
            history = list(entry.get("history", [])) if entry else []
            if previous is not None and previous != version:
                history.insert(0, {"version": previous, "promoted_at": entry["promoted_at"]})
            content["specialists"][specialist] = {
                "live": version,
                "promoted_at": now,
                "history": history[:HISTORY_LENGTH],
            }
            write_json_atomic(self.path, content)
        return Promotion(specialist=specialist, version=version, previous=previous, promoted_at=now)
