"""The MLflow model registry as Cadre's source of truth: candidates, gated promotion, history, rollback.

Every artifact a flow produces (a vector-index manifest, a compiled DSPy program, a LoRA adapter) is
registered as a version of one registered model per specialist and kind, named
`{project}.{specialist}.{kind}` (MLflow forbids only `/` and `:` in model names). Two aliases carry
the state a user cares about: `challenger` is the latest complete candidate, `champion` is what
serves. A version only becomes champion through `decide_and_promote` (its gate passed), `promote`
(a human; `force` needs a reason) or `rollback`, and each of those, refusals included, leaves:

* the gate report on the version: Markdown in its description (readable in the MLflow UI), the
  JSON `gate_report.json` as an artifact of the run that made it, and the tag `cadre.gate`;
* one run in the experiment `{project}/{specialist}/history` per event (who, what, when, metrics,
  from-version, to-version, reason), because MLflow keeps no history of alias moves. Runs are
  append-only, survive server restarts with the backend store, and read as a table in the MLflow UI
  or through any MLflow client (`history()` reads them back).

Order of operations (crash safety). A version is *complete* once it is READY and tagged
`cadre.registration=complete`; that tag is written last in `register_candidate`, and no alias is
ever moved onto an incomplete version. A promotion writes the report, then a history run in state
RUNNING, then moves the alias (a single atomic registry call), then finishes the run. A crash at any
point leaves every alias on a complete version; the next locked operation settles a RUNNING run by
looking at where the alias actually is, and re-running the same call converges (registration reuses
the version of the same run and artifact path; a decision already in effect is not recorded twice).
`on_step` lets a test inject a failure at each named step (`STEP_*`) without touching MLflow.

Serialization. Promotions of one registered model run under a lease held *in MLflow*: the lease is
the tag `cadre.lease` on the registered model itself, taken by writing it and reading it back after a
settle delay (Fischer's protocol, see `_Lease`: MLflow has no compare-and-set) and released by
deleting the tag, so no lock model ever shows in the Models tab (older releases created one named
`{name}.lock`; an expired one left behind is deleted). Unlike a file lock under the state dir, it serializes workers on different machines
(Prefect workers in a Kubernetes pool, a reviewer's laptop running `cadre promote`) as long as they
share the MLflow server. A holder that dies leaves the lease behind until it expires (`LEASE_TTL_S`);
waiters then break it. Expiry assumes roughly synchronized clocks between machines.

No Prefect here: flows call these functions, and so does the CLI.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunStatus, ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from cadre.registry.lineage import lineage_markdown
from cadre.registry.models import ModelSpec
from cadre.registry.runs import code_version
from cadre.stages import REGISTRY_KINDS

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"

EVENT_PROMOTION = "promotion"
EVENT_REFUSAL = "refusal"
EVENT_ROLLBACK = "rollback"
EVENT_RETIREMENT = "retirement"

RETIRABLE_KINDS = ("program", "adapter")
"""Kinds that can be served without a champion: the declared program, the base model. An index cannot."""

# Named points where `on_step` is called, in the order they happen.
STEP_VERSION_CREATED = "version_created"  # register_candidate: version exists, not yet complete
STEP_REPORT_ATTACHED = "report_attached"  # decide_and_promote: gate report written, nothing decided
STEP_BEFORE_ALIAS_MOVE = "before_alias_move"  # the event is recorded as pending; champion untouched
STEP_ALIAS_MOVED = "alias_moved"  # champion moved; the history run is not yet finished

LINEAGE_KEYS = (
    "config_sha256",
    "code_version",
    "data_fingerprint",
    "corpus_fingerprint",
    "base_model",
    "parent_versions",
    "run_id",
)
"""Lineage recorded on every version (as tags `cadre.lineage.<key>`); `run_id` and `code_version` are filled in when absent."""

LEASE_TTL_S = 600.0
LOCK_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 300.0
DESCRIPTION_LIMIT = 5000  # model_versions.description is VARCHAR(5000); Postgres enforces it
REASON_LIMIT = 2000  # run tag values are silently truncated at 8000 characters

_TAG = "cadre."
_REGISTRATION = "cadre.registration"
_GATE = "cadre.gate"
_SAFE_METRIC = re.compile(r"[^\w.\- /]")
_LINEAGE_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")


class _Unchecked:
    """Type of `UNCHECKED`."""

    def __repr__(self) -> str:
        return "UNCHECKED"


UNCHECKED = _Unchecked()
"""Default of `decide_and_promote(expected_champion=...)`: do not compare with the champion."""

StepHook = Callable[[str], None]
"""Called with a `STEP_*` name at each step of a registry operation; raise from it to inject a failure."""


@runtime_checkable
class GateDecision(Protocol):
    """What the registry needs of a gate decision (`cadre.evaluation.gates.GateDecision` has this shape).

    If the object also has `metrics: Mapping[str, float]` (the candidate's scores), those are
    recorded with the event unless `decide_and_promote(metrics=...)` is given.
    """

    @property
    def kind(self) -> str: ...

    @property
    def passed(self) -> bool: ...

    def to_markdown(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class RegistryError(RuntimeError):
    """A registry operation was refused or could not be carried out; the message says why."""


class IncompleteVersionError(RegistryError):
    """The version is not READY or its registration did not finish; no alias may point at it."""


class PromotionRefusedError(RegistryError):
    """A manual promotion of a version whose gate did not pass, without `force` and a reason."""


class NotRetirableError(RegistryError):
    """The artifact kind cannot be left without a champion (an index: nothing could be searched)."""


class NothingToRollBackError(RegistryError):
    """History holds no earlier champion to restore."""


class StaleDecisionError(RegistryError):
    """The champion changed since the candidate was evaluated against it; evaluate again."""


class LockTimeoutError(RegistryError):
    """Another promotion of the same registered model held the lease for too long."""


@dataclass(frozen=True)
class PromotionRecord:
    """One event in a registered model's history: a promotion, a refusal, a rollback or a retirement.

    Attributes:
        event: `promotion`, `refusal`, `rollback` or `retirement` (the champion removed; to_version None).
        project: project name.
        specialist: specialist name.
        kind: artifact kind (`index`, `program`, `adapter`).
        model_name: the registered model.
        version: the version the event is about (the candidate, or the rollback target).
        from_version: champion before the event (None when there was none).
        to_version: champion after the event (equals from_version for a refusal).
        at: when the event took effect (UTC).
        actor: who or what caused it (user, flow run).
        reason: why, in words (required for a forced promotion).
        gate: the version's recorded gate verdict, `passed` or `refused` (None if never evaluated).
        forced: a manual promotion that overrode a failed or missing gate.
        metrics: the version's evaluation scores.
        seq: position in this registered model's history (1, 2, ...).
        candidate_run_id: the MLflow run that produced the version.
        history_run_id: the run in the history experiment that records this event.
        outcome: `applied`; `pending` or `aborted` only when asked for with `include_unapplied`.
    """

    event: str
    project: str
    specialist: str
    kind: str
    model_name: str
    version: str
    from_version: str | None
    to_version: str | None
    at: datetime
    actor: str
    reason: str | None = None
    gate: str | None = None
    forced: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    seq: int = 0
    candidate_run_id: str | None = None
    history_run_id: str | None = None
    outcome: str = "applied"

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able data (`at` in ISO 8601)."""
        data = asdict(self)
        data["at"] = self.at.isoformat()
        return data


@dataclass(frozen=True)
class ChampionInfo:
    """The version serving for one artifact kind, as `cadre status` shows it.

    Attributes:
        kind: artifact kind.
        model_name: the registered model.
        version: the champion version.
        promoted_at: when it became champion (None if the alias was moved outside Cadre).
        promoted_by: who made it champion.
        metrics: its evaluation scores.
        run_id: the MLflow run that produced it.
        gate: its recorded gate verdict.
    """

    kind: str
    model_name: str
    version: str
    promoted_at: datetime | None
    promoted_by: str | None
    metrics: dict[str, float]
    run_id: str | None
    gate: str | None


# ----------------------------------------------------------------------------------------- names


def registered_model_name(project: str, specialist: str, kind: str) -> str:
    """The registered model holding a specialist's versions of one artifact kind.

    Args:
        project: project name (`project.name` in pipelines.yaml).
        specialist: specialist name.
        kind: one of `cadre.stages.REGISTRY_KINDS`.

    Returns:
        `{project}.{specialist}.{kind}`, e.g. `cadre-demo.icd10-coder.adapter`.

    Raises:
        ValueError: for an unknown kind, or a name MLflow would refuse (`/` or `:`).
    """
    if kind not in REGISTRY_KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; expected one of {', '.join(REGISTRY_KINDS)}")
    for label, value in (("project", project), ("specialist", specialist)):
        if not value or "/" in value or ":" in value or "." in value:
            raise ValueError(f"{label} name {value!r} cannot be part of a registered model name (no '/', ':' or '.')")
    return f"{project}.{specialist}.{kind}"


def history_experiment_name(project: str, specialist: str) -> str:
    """The MLflow experiment whose runs record a specialist's promotions, refusals and rollbacks.

    It sits beside the flows' experiment `{project}/{specialist}` (see `cadre.registry.runs`).
    """
    return f"{project}/{specialist}/history"


def lock_model_name(model_name: str) -> str:
    """The registered model a previous release held as the promotion lease (`{name}.lock`).

    Cadre no longer creates it (the lease is a tag on the model itself); one left behind by a crash of an older
    release is deleted by the next promotion once it has expired, so the Models tab shows only real models.
    """
    return f"{model_name}.lock"


def default_actor() -> str:
    """`user@host`: who is acting when no flow run names itself."""
    import getpass

    try:
        user = os.getlogin()
    except OSError:
        try:
            user = getpass.getuser()  # the environment's name, else the account of the process (no terminal needed)
        except (KeyError, OSError):
            user = "unknown"
    return f"{user}@{socket.gethostname()}"


# ------------------------------------------------------------------------------------ the lease


@contextmanager
def model_lock(
    client: MlflowClient,
    model_name: str,
    *,
    holder: str,
    operation: str,
    timeout_s: float = LOCK_TIMEOUT_S,
    ttl_s: float | None = None,
) -> Iterator[_Lease]:
    """Hold the promotion lease of one registered model, across processes and machines.

    Args:
        client: MLflow client of the registry.
        model_name: the registered model whose aliases are about to change.
        holder: who holds it (shown in the lease tag while held).
        operation: what the holder does (shown in the lease tag).
        timeout_s: how long to wait for another holder before giving up.
        ttl_s: after this long an unreleased lease counts as abandoned and may be broken
            (default `LEASE_TTL_S`, read at call time).

    Yields:
        The lease; `check()` verifies it is still held just before a write that must be exclusive.

    Raises:
        LockTimeoutError: the lease stayed taken for `timeout_s`.
    """
    lease = _Lease(client, model_name, holder, operation, LEASE_TTL_S if ttl_s is None else ttl_s)
    lease.acquire(timeout_s)
    try:
        yield lease
    except BaseException:
        # Keep the caller's error: a lease we fail to release here expires by itself.
        with suppress(Exception):
            lease.release()
        raise
    lease.release()


LEASE_TAG = "cadre.lease"
"""The registered-model tag that holds the promotion lease while a promotion runs (JSON: token, holder, until)."""

LEASE_SETTLE_S = 0.5
"""How long a taker waits after writing the lease before reading it back (Fischer's mutual exclusion): longer than
any taker takes from seeing the lease free to its write landing. A taker slower than that does not take it."""


class _Lease:
    """A lease on a registered model, held as the tag `LEASE_TAG` on the model itself.

    MLflow has no compare-and-set, so taking it is Fischer's protocol: read the tag; if it is absent or expired,
    write our token, wait `LEASE_SETTLE_S`, read it back; we hold it only if our token is still there. Any taker
    that saw the lease free writes within that wait, so the last writer wins and the others see it. A taker whose
    own read-to-write took longer than the wait backs off (its write may have landed after a winner's read-back;
    that winner's `check()` then refuses to write, so no two holders ever both write). A model that does not
    exist yet has nothing to serialize: the lease is vacuous, and `check()` refuses any write.
    """

    def __init__(self, client: MlflowClient, name: str, holder: str, operation: str, ttl_s: float):
        self.client, self.name, self.holder, self.operation, self.ttl_s = client, name, holder, operation, ttl_s
        self.token = uuid.uuid4().hex
        self.absent = False

    def acquire(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            started = time.monotonic()
            try:
                current = self._read()
            except _ModelMissing:
                self.absent = True
                return
            if current is None or _float(current.get("expires_at")) < time.time():
                expires = time.time() + self.ttl_s
                mine = {"token": self.token, "holder": self.holder, "operation": self.operation}
                wrote = self._write(json.dumps({**mine, "expires_at": f"{expires:.3f}"}))
                quick = wrote and time.monotonic() - started < LEASE_SETTLE_S
                if wrote:
                    time.sleep(LEASE_SETTLE_S)
                current = self._read()
                if current is not None and current.get("token") == self.token:
                    if quick:
                        self._remove_legacy_lock()
                        return
                    self._delete_if_mine()
                    current = None
            if time.monotonic() > deadline:
                who = f"{current.get('holder')} ({current.get('operation')})" if current else "another process"
                raise LockTimeoutError(
                    f"{self.name}: promotion lease held by {who} for more than {timeout_s:.0f} s; "
                    f"if that holder died, the lease expires by itself within {self.ttl_s:.0f} s"
                )
            # Jitter keeps waiters on different machines from retrying in lockstep.
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)

    def check(self) -> None:
        """Raise if the lease was broken (it expired while we held it): the caller must not write."""
        if self.absent:
            raise RegistryError(f"{self.name} is not a registered model; nothing was changed")
        try:
            current = self._read()
        except _ModelMissing:
            current = None
        if current is None or current.get("token") != self.token:
            raise RegistryError(
                f"{self.name}: the promotion lease expired and was taken over; nothing was changed, run again"
            )

    def release(self) -> None:
        if not self.absent:
            with suppress(_ModelMissing):
                self._delete_if_mine()

    def _read(self) -> dict[str, str] | None:
        """The lease tag's fields, None when no lease is held; raises `_ModelMissing` for a model not registered."""
        try:
            tags = self.client.get_registered_model(self.name).tags
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise _ModelMissing(self.name) from None
            raise
        try:
            found = json.loads(tags.get(LEASE_TAG) or "null")
        except ValueError:
            return {"token": "", "holder": "unreadable lease tag", "operation": "", "expires_at": "0"}
        return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else None

    def _write(self, lease: str) -> bool:
        """Write our lease; False when a concurrent writer's insert won (the registry refuses the second insert of
        one tag key with a unique-key conflict: that writer takes the lease, we wait)."""
        try:
            self.client.set_registered_model_tag(self.name, LEASE_TAG, lease)
            return True
        except MlflowException:
            current = self._read()
            if current is None:  # the winner's insert may not be visible for a moment
                time.sleep(0.2)
                current = self._read()
            if current is None or current.get("token") == self.token:
                raise  # not a race with another writer
            return False

    def _delete_if_mine(self) -> None:
        # Re-read right before deleting so a lease taken over by someone else in between is kept.
        current = self._read()
        if current is not None and current.get("token") == self.token:
            with suppress(MlflowException):
                self.client.delete_registered_model_tag(self.name, LEASE_TAG)

    def _remove_legacy_lock(self) -> None:
        """Delete the `{name}.lock` registered model an older release left behind when it crashed, once expired."""
        legacy = lock_model_name(self.name)
        with suppress(MlflowException):
            tags = self.client.get_registered_model(legacy).tags
            if tags.get("cadre.lock") == "true" and _float(tags.get("cadre.lock.expires_at")) < time.time():
                self.client.delete_registered_model(legacy)


class _ModelMissing(Exception):
    """The registered model a lease is about does not exist."""


# ---------------------------------------------------------------------------------- registration


def register_candidate(
    client: MlflowClient,
    *,
    project: str,
    specialist: str,
    kind: str,
    run_id: str,
    artifact_path: str,
    lineage: Mapping[str, str],
    description: str | None = None,
    actor: str | None = None,
    on_step: StepHook | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    model: ModelSpec | None = None,
) -> ModelVersion:
    """Register a run's artifact as a candidate version and point `challenger` at it.

    The version is created with its lineage tags, awaited until READY, then marked complete; only
    then does `challenger` move. Running it again for the same run and artifact path completes and
    returns the version made before instead of creating another.

    Args:
        client: MLflow client of the tracking server / registry.
        project: project name.
        specialist: specialist name.
        kind: `index`, `program` or `adapter`.
        run_id: the run that logged the artifact.
        artifact_path: the artifact's path inside the run (a file or folder).
        lineage: `LINEAGE_KEYS` and any other provenance (keys: letters, digits, `_.-`), stored as
            tags `cadre.lineage.<key>`; `run_id` and `code_version` are added when missing.
        description: what this candidate is, shown on the version (the gate report is added later).
        actor: who registers it (shown on the promotion lease while held).
        on_step: failure-injection hook (see `STEP_*`).
        ready_timeout_s: how long to wait for the registry to finish creating the version.
        model: what makes the folder an MLflow model (`cadre.registry.models.model_spec`): its `MLmodel`,
            settings and uploads (an index's table) are logged into the folder before the version is created, so
            the version is a loadable model from its first moment. None registers the folder as it is.

    Returns:
        The complete version, with `challenger` pointing at it.

    Raises:
        IncompleteVersionError: the registry failed to create the version or did not finish in time.
    """
    name = registered_model_name(project, specialist, kind)
    artifact_path = artifact_path.strip("/")
    tags = {f"{_TAG}lineage.{key}": str(value) for key, value in _lineage(lineage, run_id).items()}
    tags |= {
        "cadre.project": project,
        "cadre.specialist": specialist,
        "cadre.kind": kind,
        "cadre.artifact_path": artifact_path,
        "cadre.candidate_description": description or "",
    }
    ensure_registered_model(client, name, project, specialist, kind)
    if model is not None and _existing_version(client, name, run_id, artifact_path) is None:
        from cadre.registry.models import log_model_files

        # Outside the lease: an index's table may take a while to upload, and logging again is harmless.
        log_model_files(client, run_id, artifact_path, model)
    with model_lock(client, name, holder=actor or default_actor(), operation=f"register run {run_id}") as lease:
        version = _existing_version(client, name, run_id, artifact_path)
        if version is None:
            version = new_model_version(
                client,
                name,
                run_id,
                artifact_path,
                description=description,
                tags={**tags, _REGISTRATION: "pending"},
                await_creation_for=0,
            )
        _step(on_step, STEP_VERSION_CREATED)
        version = _await_ready(client, name, version.version, ready_timeout_s)
        for key, value in tags.items():
            if version.tags.get(key) != value:
                client.set_model_version_tag(name, version.version, key, value)
        # Written last: from here on the version may carry an alias.
        client.set_model_version_tag(name, version.version, _REGISTRATION, "complete")
        lease.check()
        _move_alias(client, name, CHALLENGER, version.version)
    return client.get_model_version(name, version.version)


def new_model_version(client: MlflowClient, name: str, run_id: str, artifact_path: str, **fields: Any) -> ModelVersion:
    """Create a version of `name` from the folder `artifact_path` of run `run_id` (`fields` go to MLflow as is).

    Its source is the run's artifact folder itself (`mlflow-artifacts:/…/artifacts/<path>`), not
    `runs:/<run>/<path>`: the MLflow server reads a version's `MLmodel` for the registry page (its signature) by
    resolving the source inside its own process, whose tracking URI is the database, so a `runs:/` source over
    proxied artifacts fails there and the page shows no schema. The version links to its run through `run_id`.

    Raises:
        MlflowException: the registry does not know the run: the client's registry and tracking servers differ
            (an `MLFLOW_REGISTRY_URI` pointing elsewhere); the message names both.
    """
    artifact_path = artifact_path.strip("/")
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    try:
        return client.create_model_version(name, source, run_id=run_id, **fields)
    except MlflowException as error:
        if error.error_code != "INVALID_PARAMETER_VALUE" or "model version source" not in str(error):
            raise
        raise MlflowException(
            f"the model registry at {client._registry_uri} refused version {source} of {name}: it does not hold run "
            f"{run_id}, which the tracking server {client.tracking_uri} logged. Runs and registered versions must "
            "live on one MLflow server (unset MLFLOW_REGISTRY_URI, or set it to the tracking URI). "
            f"MLflow said: {error.message}",
            error_code=INVALID_PARAMETER_VALUE,
        ) from error


def _lineage(lineage: Mapping[str, str], run_id: str) -> dict[str, str]:
    for key in lineage:
        if not _LINEAGE_KEY.match(key):
            raise ValueError(f"lineage key {key!r} may only contain letters, digits, '_', '.' and '-'")
    merged = {"run_id": run_id, **{k: str(v) for k, v in lineage.items()}}
    merged.setdefault("code_version", code_version())
    return merged


def ensure_registered_model(
    client: MlflowClient, name: str, project: str, specialist: str, kind: str, description: str | None = None
) -> None:
    """Create the registered model `name` with Cadre's tags unless it exists (a concurrent creation is fine).

    `description` defaults to the one of a part (program, adapter, index, embedder) of a specialist.
    """
    try:
        client.get_registered_model(name)
        return
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(
            name,
            tags={"cadre.project": project, "cadre.specialist": specialist, "cadre.kind": kind},
            description=description
            or (
                f"{kind} of the Cadre specialist `{specialist}` (project `{project}`). "
                f"Alias `{CHAMPION}` serves; `{CHALLENGER}` is the latest complete candidate. "
                f"Each version's description holds its gate report; every promotion, refusal and rollback "
                f"is a run in the experiment `{history_experiment_name(project, specialist)}`."
            ),
        )
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile
            raise


def find_identical(
    client: MlflowClient, *, project: str, specialist: str, kind: str, lineage_key: str, value: str
) -> ModelVersion | None:
    """The oldest complete version whose lineage `lineage_key` (a fingerprint of the artifact) is `value`.

    A flow re-run on unchanged inputs makes the same artifact; it is judged again as that version rather
    than registered a second time.
    """
    name = registered_model_name(project, specialist, kind)
    try:
        found = client.search_model_versions(f"name = '{name}' and tag.`{_TAG}lineage.{lineage_key}` = '{value}'")
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    found = [v for v in found if _is_complete(v)]
    return min(found, key=lambda v: int(v.version)) if found else None


def _existing_version(client: MlflowClient, name: str, run_id: str, artifact_path: str) -> ModelVersion | None:
    found = [
        v
        for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if v.tags.get("cadre.artifact_path") == artifact_path and v.status != "FAILED_REGISTRATION"
    ]
    return min(found, key=lambda v: int(v.version)) if found else None


def _await_ready(client: MlflowClient, name: str, version: str, timeout_s: float) -> ModelVersion:
    deadline = time.monotonic() + timeout_s
    while True:
        current = client.get_model_version(name, version)
        if current.status == "READY":
            return current
        if current.status == "FAILED_REGISTRATION":
            raise IncompleteVersionError(f"{name} v{version}: registration failed: {current.status_message}")
        if time.monotonic() > deadline:
            raise IncompleteVersionError(f"{name} v{version}: still {current.status} after {timeout_s:.0f} s")
        time.sleep(0.5)


def _is_complete(version: ModelVersion) -> bool:
    return version.status == "READY" and version.tags.get(_REGISTRATION) == "complete"


def _move_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    """The only place Cadre moves an alias: re-checks that the target is complete, then one atomic call."""
    target = client.get_model_version(name, version)
    if not _is_complete(target):
        raise IncompleteVersionError(
            f"{name} v{version} is {target.status} with registration {target.tags.get(_REGISTRATION, 'untagged')!r}; "
            f"refusing to point {alias!r} at it (register it again to complete it)"
        )
    client.set_registered_model_alias(name, alias, version)


# ------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True)
class _Target:
    """The registered model an operation works on."""

    project: str
    specialist: str
    kind: str

    @property
    def name(self) -> str:
        return registered_model_name(self.project, self.specialist, self.kind)


def decide_and_promote(
    client: MlflowClient,
    *,
    project: str,
    specialist: str,
    kind: str,
    version: str | int,
    decision: GateDecision,
    actor: str,
    reason: str | None = None,
    metrics: Mapping[str, float] | None = None,
    expected_champion: str | int | None | _Unchecked = UNCHECKED,
    on_step: StepHook | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> PromotionRecord:
    """Attach a gate decision to a candidate and promote it to `champion` if the gate passed.

    Writes the report first (Markdown description, `gate_report.json` on the version's run, tags
    `cadre.gate` and `cadre.evaluation.metrics`), records the event, and moves `champion` last. A refused
    candidate leaves `champion` where it was. Calling it again with the same outcome does not record
    the event twice.

    Args:
        client: MLflow client.
        project: project name.
        specialist: specialist name.
        kind: artifact kind.
        version: the candidate version (must be complete).
        decision: the gate's decision.
        actor: who decides (a flow run, a user).
        reason: free text recorded with the event.
        metrics: the candidate's scores; default `decision.metrics` if it has them.
        expected_champion: the champion version the candidate was evaluated against (None: there was
            none); if the champion has changed since, nothing is written. Omit to skip the check.
        on_step: failure-injection hook (see `STEP_*`).
        lock_timeout_s: how long to wait for a concurrent promotion of the same model.

    Returns:
        The recorded promotion or refusal.

    Raises:
        IncompleteVersionError: the version is not complete.
        StaleDecisionError: `expected_champion` no longer matches.
        LockTimeoutError: a concurrent promotion held the lease too long.
    """
    target, version = _Target(project, specialist, kind), str(version)
    scores = _scores(metrics) if metrics is not None else _decision_metrics(decision)
    verdict = "passed" if decision.passed else "refused"
    with model_lock(
        client, target.name, holder=actor, operation=f"decide v{version}", timeout_s=lock_timeout_s
    ) as lease:
        candidate = _complete_version(client, target.name, version)
        events = _settle_pending(client, target)
        champion = _champion_version(client, target.name)
        if expected_champion is not UNCHECKED and champion != (
            None if expected_champion is None else str(expected_champion)
        ):
            raise StaleDecisionError(
                f"{target.name}: v{version} was evaluated against champion v{expected_champion}, "
                f"but the champion is now {_v(champion)}; evaluate it again"
            )
        _attach_report(client, target, candidate, decision, verdict, scores, actor)
        _step(on_step, STEP_REPORT_ATTACHED)
        latest = _latest_about(events, version)
        if (
            latest is not None
            and latest.gate == verdict
            and (
                (latest.event == EVENT_REFUSAL and not decision.passed)
                or (latest.event != EVENT_REFUSAL and champion == version)
            )
        ):
            return latest  # a re-run of a decision already in effect
        # A passing version that is champion already (promoted by hand before its gate ran) gets its
        # verdict recorded without an alias move; a refusal never moves the champion, even its own.
        event, to_version = (EVENT_PROMOTION, version) if decision.passed else (EVENT_REFUSAL, champion)
        return _record_and_apply(
            client,
            target,
            lease,
            events,
            on_step,
            event=event,
            version=version,
            from_version=champion,
            to_version=to_version,
            actor=actor,
            reason=reason,
            gate=verdict,
            forced=False,
            metrics=scores,
            candidate_run_id=candidate.run_id,
        )


def promote(
    client: MlflowClient,
    *,
    project: str,
    specialist: str,
    kind: str,
    version: str | int,
    actor: str,
    force: bool = False,
    reason: str | None = None,
    on_step: StepHook | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> PromotionRecord:
    """Make a version champion by hand.

    Args:
        client: MLflow client.
        project: project name.
        specialist: specialist name.
        kind: artifact kind.
        version: the version to promote (must be complete).
        actor: who promotes it.
        force: promote even though its recorded gate did not pass (or never ran); needs `reason`.
        reason: why; recorded with the event (required with `force`).
        on_step: failure-injection hook (see `STEP_*`).
        lock_timeout_s: how long to wait for a concurrent promotion of the same model.

    Returns:
        The recorded promotion.

    Raises:
        PromotionRefusedError: the gate did not pass and `force` (with a reason) was not given.
        RegistryError: the version is already champion, or is incomplete.
    """
    target, version = _Target(project, specialist, kind), str(version)
    if force and not (reason and reason.strip()):
        raise PromotionRefusedError("a forced promotion needs a reason (it is recorded in the history)")
    with model_lock(
        client, target.name, holder=actor, operation=f"promote v{version}", timeout_s=lock_timeout_s
    ) as lease:
        candidate = _complete_version(client, target.name, version)
        events = _settle_pending(client, target)
        champion = _champion_version(client, target.name)
        if champion == version:
            raise RegistryError(f"{target.name} v{version} is already the champion")
        gate = candidate.tags.get(_GATE)
        if gate != "passed" and not force:
            verdict = "was refused by its gate" if gate == "refused" else "has no recorded gate decision"
            raise PromotionRefusedError(
                f"{target.name} v{version} {verdict}; promote it with --force and a reason to override"
            )
        forced = gate != "passed"
        if forced:
            client.set_model_version_tag(
                target.name, version, "cadre.forced_promotion", f"{actor}: {reason}"[:REASON_LIMIT]
            )
        return _record_and_apply(
            client,
            target,
            lease,
            events,
            on_step,
            event=EVENT_PROMOTION,
            version=version,
            from_version=champion,
            to_version=version,
            actor=actor,
            reason=reason,
            gate=gate,
            forced=forced,
            metrics=_version_metrics(candidate),
            candidate_run_id=candidate.run_id,
        )


def rollback(
    client: MlflowClient,
    project: str,
    specialist: str,
    kind: str,
    actor: str,
    reason: str | None = None,
    *,
    on_step: StepHook | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> PromotionRecord:
    """Restore the champion that preceded the current one, in one alias move, and record it.

    History is read as a stack of champions: a promotion pushes, a rollback pops, so rolling back
    twice walks two steps back. If `champion` was moved outside Cadre, the last champion Cadre
    recorded is restored.

    Args:
        client: MLflow client.
        project: project name.
        specialist: specialist name.
        kind: artifact kind.
        actor: who rolls back.
        reason: why; recorded with the event.
        on_step: failure-injection hook (see `STEP_*`).
        lock_timeout_s: how long to wait for a concurrent promotion of the same model.

    Returns:
        The recorded rollback.

    Raises:
        NothingToRollBackError: there is no champion, or no earlier one in the history.
    """
    target = _Target(project, specialist, kind)
    with model_lock(client, target.name, holder=actor, operation="rollback", timeout_s=lock_timeout_s) as lease:
        events = _settle_pending(client, target)
        champion = _champion_version(client, target.name)
        if champion is None:
            raise NothingToRollBackError(f"{target.name} has no champion; there is nothing to roll back")
        stack = _champion_stack(events)
        if stack and stack[-1] == champion:
            stack = stack[:-1]
        if not stack:
            hint = (
                f"; to stop serving it (the {_WITHOUT_CHAMPION[kind]} serves again) run `cadre retire {specialist} {kind}`"
                if kind in RETIRABLE_KINDS
                else ""
            )
            raise NothingToRollBackError(
                f"{target.name}: v{champion} is the first champion in the history; there is no earlier one to restore{hint}"
            )
        restored = _complete_version(client, target.name, stack[-1])
        return _record_and_apply(
            client,
            target,
            lease,
            events,
            on_step,
            event=EVENT_ROLLBACK,
            version=restored.version,
            from_version=champion,
            to_version=restored.version,
            actor=actor,
            reason=reason,
            gate=restored.tags.get(_GATE),
            forced=False,
            metrics=_version_metrics(restored),
            candidate_run_id=restored.run_id,
        )


_WITHOUT_CHAMPION = {"program": "declared (un-optimized) program", "adapter": "base model without an adapter"}


def retire(
    client: MlflowClient,
    project: str,
    specialist: str,
    kind: str,
    actor: str,
    reason: str | None = None,
    *,
    on_step: StepHook | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> PromotionRecord:
    """Stop serving the champion of a program or adapter: remove the `champion` alias, and record it.

    What serves afterwards is what served before the first promotion: the declared program from
    `pipelines.yaml`, or the base model without an adapter. This is the way back from a *first*
    champion, which `rollback` cannot undo (there is no earlier one). The version itself stays in the
    registry with its gate report; `cadre promote` can reinstate it.

    Args:
        client: MLflow client.
        project: project name.
        specialist: specialist name.
        kind: `program` or `adapter`.
        actor: who retires it.
        reason: why; recorded with the event.
        on_step: failure-injection hook (see `STEP_*`).
        lock_timeout_s: how long to wait for a concurrent promotion of the same model.

    Raises:
        NotRetirableError: `kind` is `index` (serving and programs need a live index).
        NothingToRollBackError: there is no champion to retire.
    """
    if kind not in RETIRABLE_KINDS:
        raise NotRetirableError(
            f"an {kind} champion cannot be retired: programs and serving search it. Roll back to an earlier "
            f"version (`cadre rollback {specialist} {kind}`) or re-index (`cadre run reindex --specialist {specialist}`)"
        )
    target = _Target(project, specialist, kind)
    with model_lock(client, target.name, holder=actor, operation="retire", timeout_s=lock_timeout_s) as lease:
        events = _settle_pending(client, target)
        champion = _champion_version(client, target.name)
        if champion is None:
            raise NothingToRollBackError(f"{target.name} has no champion; the {_WITHOUT_CHAMPION[kind]} already serves")
        retired = client.get_model_version(target.name, champion)
        return _record_and_apply(
            client,
            target,
            lease,
            events,
            on_step,
            event=EVENT_RETIREMENT,
            version=champion,
            from_version=champion,
            to_version=None,
            actor=actor,
            reason=reason,
            gate=retired.tags.get(_GATE),
            forced=False,
            metrics=_version_metrics(retired),
            candidate_run_id=retired.run_id,
        )


def _complete_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        found = client.get_model_version(name, version)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"{name} has no version {version}") from None
        raise
    if not _is_complete(found):
        raise IncompleteVersionError(
            f"{name} v{version} is not completely registered ({found.status}, "
            f"registration {found.tags.get(_REGISTRATION, 'untagged')!r}); register it again first"
        )
    return found


def _attach_report(
    client: MlflowClient,
    target: _Target,
    version: ModelVersion,
    decision: GateDecision,
    verdict: str,
    scores: dict[str, float],
    actor: str,
) -> None:
    """Put the gate report where a reviewer finds it; the verdict tag goes last so it implies a report.

    The description is the gate report, the candidate's own note (its score tables) and its lineage with links;
    the JSON report and `lineage.md` go to the version's run under `gate/<kind>-v<N>/`. Tags stay few: the
    verdict, where the report is, and the scores (`cadre.metrics`, read back by `cadre status`).
    """
    folder = f"gate/{target.kind}-v{version.version}"
    report_path = f"{folder}/gate_report.json"
    lineage = lineage_markdown(version.tags, target.project, target.specialist)
    if version.run_id:
        client.log_dict(version.run_id, decision.to_dict(), report_path)
        if lineage:
            client.log_text(version.run_id, lineage + "\n", f"{folder}/lineage.md")
    decided_at = _iso(_now())
    run = f"[`{version.run_id[:12]}`](#/runs/{version.run_id})" if version.run_id else "—"
    header = (
        f"**Cadre gate report** for `{target.name}` v{version.version}: **{verdict.upper()}**, recorded "
        f"{decided_at} by {actor}. JSON: artifact `{report_path}` of run {run}.\n\n"
    )
    candidate = _candidate_note(version)
    # Lineage before the candidate's tables, so a long note is what the length limit cuts.
    sections = [header + decision.to_markdown().strip(), lineage, f"### Candidate\n\n{candidate}" if candidate else ""]
    text = "\n\n".join(section for section in sections if section)
    if len(text) > DESCRIPTION_LIMIT:
        text = text[: DESCRIPTION_LIMIT - len(_TRUNCATED)] + _TRUNCATED
    client.update_model_version(target.name, version.version, description=text)
    for key, value in {
        "cadre.gate.report": report_path,
        "cadre.metrics": json.dumps(scores, sort_keys=True),
    }.items():
        client.set_model_version_tag(target.name, version.version, key, value)
    # The candidate's note now lives in the description; a whole Markdown table is no tag.
    if "cadre.candidate_description" in version.tags:
        with suppress(MlflowException):
            client.delete_model_version_tag(target.name, version.version, "cadre.candidate_description")
    client.set_model_version_tag(target.name, version.version, _GATE, verdict)


def _candidate_note(version: ModelVersion) -> str:
    """The candidate's note: its tag until the first report, then the `### Candidate` section of the description."""
    if version.tags.get("cadre.candidate_description"):
        return version.tags["cadre.candidate_description"]
    description = version.description or ""
    if not description.startswith("**Cadre gate report**"):
        return description.strip()
    _, found, rest = description.partition("\n\n### Candidate\n\n")
    return rest.removesuffix(_TRUNCATED).strip() if found else ""


_TRUNCATED = "\n\n… (truncated; the full report is in gate_report.json)"


def read_gate_report(client: MlflowClient, model_name: str, version: str | int) -> dict[str, Any]:
    """Download and parse the `gate_report.json` recorded for a version.

    Raises:
        RegistryError: the version has no recorded gate report.
    """
    found = client.get_model_version(model_name, str(version))
    path = found.tags.get("cadre.gate.report")
    if not path or not found.run_id:
        raise RegistryError(f"{model_name} v{version} has no gate report")
    with tempfile.TemporaryDirectory() as folder:
        local = client.download_artifacts(found.run_id, path, folder)
        return json.loads(Path(local).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------- history


def _record_and_apply(
    client: MlflowClient,
    target: _Target,
    lease: _Lease,
    events: list[PromotionRecord],
    on_step: StepHook | None,
    *,
    event: str,
    version: str,
    from_version: str | None,
    to_version: str | None,
    actor: str,
    reason: str | None,
    gate: str | None,
    forced: bool,
    metrics: dict[str, float],
    candidate_run_id: str | None,
) -> PromotionRecord:
    """Record the event as pending, move `champion` (if it changes), then mark the event applied."""
    last_at = max((e.at for e in events), default=None)
    at = _now()
    if last_at is not None and at <= last_at:  # keep one model's history in order even across skewed clocks
        at = last_at + timedelta(microseconds=1)
    record = PromotionRecord(
        event=event,
        project=target.project,
        specialist=target.specialist,
        kind=target.kind,
        model_name=target.name,
        version=version,
        from_version=from_version,
        to_version=to_version,
        at=at,
        actor=actor,
        reason=(reason or None) and reason[:REASON_LIMIT],
        gate=gate,
        forced=forced,
        metrics=metrics,
        seq=max((e.seq for e in events), default=0) + 1,
        candidate_run_id=candidate_run_id,
    )
    run = _start_history_run(client, record)
    record = replace(record, history_run_id=run.info.run_id)
    try:
        _step(on_step, STEP_BEFORE_ALIAS_MOVE)
        if to_version is not None and to_version != from_version:
            lease.check()
            _move_alias(client, target.name, CHAMPION, to_version)
            client.set_registered_model_tag(target.name, "cadre.champion.previous", from_version or "")
        elif event == EVENT_RETIREMENT:
            lease.check()
            client.delete_registered_model_alias(target.name, CHAMPION)
            client.set_registered_model_tag(target.name, "cadre.champion.previous", from_version or "")
        _step(on_step, STEP_ALIAS_MOVED)
    except BaseException:
        # Settle by looking at the registry, not at where we stopped: the alias may have moved. If
        # the registry is unreachable now, the event stays pending and the next operation settles it.
        with suppress(Exception):
            _settle(client, record, _champion_version(client, target.name))
        raise
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    return record


def _start_history_run(client: MlflowClient, record: PromotionRecord) -> Run:
    experiment_id = _history_experiment(client, record.project, record.specialist)
    arrow = f"{_v(record.from_version)} → {_v(record.to_version)}"
    title = f"{record.event} {record.kind} v{record.version}" + ("" if record.event == EVENT_REFUSAL else f" ({arrow})")
    note = (
        f"**{record.event}** of `{record.model_name}` v{record.version} by {record.actor} at {_iso(record.at)}.\n\n"
        f"Champion: {arrow}. Gate: {record.gate or 'none'}{' (forced)' if record.forced else ''}.\n\n"
        f"Reason: {record.reason or '—'}\n\nMetrics: "
        + (", ".join(f"{k} = {v:g}" for k, v in record.metrics.items()) or "—")
    )
    tags = {
        "cadre.event": record.event,
        "cadre.project": record.project,
        "cadre.specialist": record.specialist,
        "cadre.kind": record.kind,
        "cadre.model": record.model_name,
        "cadre.version": record.version,
        "cadre.from_version": record.from_version or "",
        "cadre.to_version": record.to_version or "",
        "cadre.at": _iso(record.at),
        "cadre.actor": record.actor,
        "cadre.reason": record.reason or "",
        "cadre.gate": record.gate or "",
        "cadre.forced": str(record.forced).lower(),
        "cadre.seq": str(record.seq),
        "cadre.metrics": json.dumps(record.metrics, sort_keys=True),
        "cadre.candidate_run_id": record.candidate_run_id or "",
        "mlflow.user": record.actor,
        "mlflow.note.content": note,
    }
    run = client.create_run(experiment_id, start_time=int(record.at.timestamp() * 1000), tags=tags, run_name=title)
    if record.metrics:
        # Metric names like recall@10 are not valid MLflow keys; the exact names live in the cadre.evaluation.metrics tag.
        stamp = int(record.at.timestamp() * 1000)
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(_SAFE_METRIC.sub("_at_", k), float(v), stamp, 0) for k, v in record.metrics.items()],
        )
    return run


def _history_experiment(client: MlflowClient, project: str, specialist: str, create: bool = True) -> str | None:
    name = history_experiment_name(project, specialist)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    if not create:
        return None
    try:
        return client.create_experiment(
            name,
            tags={
                "cadre.project": project,
                "cadre.specialist": specialist,
                "cadre.history": "true",
                "mlflow.experimentKind": "custom_model_development",  # MLflow's UI opens it on its runs
                "mlflow.note.content": f"Promotion history of the Cadre specialist `{specialist}`: "
                "one run per promotion, refusal and rollback.",
            },
        )
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _history_runs(client: MlflowClient, project: str, specialist: str, model_name: str | None) -> list[Run]:
    experiment_id = _history_experiment(client, project, specialist, create=False)
    if experiment_id is None:
        return []
    query = f"tags.`cadre.model` = '{model_name}'" if model_name else ""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=query, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        runs.extend(run for run in page if "cadre.event" in run.data.tags)  # ignore runs someone else logged there
        token = page.token
        if not token:
            return runs


def _record_from_run(run: Run, outcome: str) -> PromotionRecord:
    tags = run.data.tags
    return PromotionRecord(
        event=tags["cadre.event"],
        project=tags["cadre.project"],
        specialist=tags["cadre.specialist"],
        kind=tags["cadre.kind"],
        model_name=tags["cadre.model"],
        version=tags["cadre.version"],
        from_version=tags.get("cadre.from_version") or None,
        to_version=tags.get("cadre.to_version") or None,
        at=datetime.fromisoformat(tags["cadre.at"]),
        actor=tags.get("cadre.actor", ""),
        reason=tags.get("cadre.reason") or None,
        gate=tags.get("cadre.gate") or None,
        forced=tags.get("cadre.forced") == "true",
        metrics={k: float(v) for k, v in json.loads(tags.get("cadre.metrics") or "{}").items()},
        seq=int(tags.get("cadre.seq", "0")),
        candidate_run_id=tags.get("cadre.candidate_run_id") or None,
        history_run_id=run.info.run_id,
        outcome=outcome,
    )


def _outcome(run: Run) -> str:
    status = run.info.status
    if status == "FINISHED":
        return "applied"
    return "pending" if status == "RUNNING" else "aborted"


def _settle(client: MlflowClient, record: PromotionRecord, champion: str | None) -> PromotionRecord:
    """Close a pending event by what the registry shows: applied if the champion is where it meant to put it."""
    applied = record.event == EVENT_REFUSAL or champion == record.to_version
    if record.history_run_id:
        status = RunStatus.FINISHED if applied else RunStatus.FAILED
        if not applied:
            client.set_tag(record.history_run_id, "cadre.outcome", "aborted: the champion alias was never moved")
        client.set_terminated(record.history_run_id, RunStatus.to_string(status))
    return replace(record, outcome="applied" if applied else "aborted")


def _settle_pending(client: MlflowClient, target: _Target) -> list[PromotionRecord]:
    """Every event of the model, with events left pending by a crash settled (call under the lease)."""
    records = [
        _record_from_run(run, _outcome(run))
        for run in _history_runs(client, target.project, target.specialist, target.name)
    ]
    pending = [r for r in records if r.outcome == "pending"]
    if pending:
        champion = _champion_version(client, target.name)
        settled = {r.history_run_id: _settle(client, r, champion) for r in pending}
        records = [settled.get(r.history_run_id, r) for r in records]
    return sorted(records, key=lambda r: (r.seq, r.at))


def _effective(records: list[PromotionRecord], champions: dict[str, str | None]) -> list[PromotionRecord]:
    """Without writing: a pending event counts as applied if it is its model's latest and the alias shows it."""
    latest: dict[str, int] = {}
    for r in records:
        latest[r.model_name] = max(latest.get(r.model_name, 0), r.seq)
    result = []
    for r in records:
        if (
            r.outcome == "pending"
            and r.seq == latest[r.model_name]
            and (r.event == EVENT_REFUSAL or champions.get(r.model_name) == r.to_version)
        ):
            r = replace(r, outcome="applied")
        result.append(r)
    return result


def history(
    client: MlflowClient, project: str, specialist: str, kind: str | None = None, *, include_unapplied: bool = False
) -> list[PromotionRecord]:
    """Every promotion, refusal and rollback of a specialist (or of one artifact kind), oldest first.

    Args:
        client: MLflow client.
        project: project name.
        specialist: specialist name.
        kind: only this artifact kind (default: all).
        include_unapplied: also list attempts that crashed before taking effect (`outcome` says so).

    Returns:
        The records sorted by time.
    """
    name = registered_model_name(project, specialist, kind) if kind else None
    records = [_record_from_run(run, _outcome(run)) for run in _history_runs(client, project, specialist, name)]
    if any(r.outcome == "pending" for r in records):
        models = {r.model_name for r in records if r.outcome == "pending"}
        records = _effective(records, {m: _champion_version(client, m) for m in models})
    if not include_unapplied:
        records = [r for r in records if r.outcome == "applied"]
    return sorted(records, key=lambda r: (r.at, r.seq))


def _latest_about(events: list[PromotionRecord], version: str) -> PromotionRecord | None:
    applied = [e for e in events if e.outcome == "applied"]
    if not applied or applied[-1].version != version:
        return None
    return applied[-1]


def _champion_stack(events: list[PromotionRecord]) -> list[str]:
    """The champions in the order they were installed, with rolled-back ones removed."""
    stack: list[str] = []
    for e in events:
        if e.outcome == "applied" and e.event == EVENT_RETIREMENT:
            stack = []
            continue
        if e.outcome != "applied" or e.to_version is None:
            continue
        if e.event == EVENT_PROMOTION:
            if not stack or stack[-1] != e.to_version:
                stack.append(e.to_version)
        elif e.event == EVENT_ROLLBACK:
            if e.to_version in stack:
                del stack[len(stack) - stack[::-1].index(e.to_version) :]
            else:
                stack = [e.to_version]
    return stack


# -------------------------------------------------------------------------------------- champions


def get_champion(client: MlflowClient, project: str, specialist: str, kind: str) -> ModelVersion | None:
    """The version `champion` points at, or None (no registered model yet, or no champion)."""
    name = registered_model_name(project, specialist, kind)
    version = _champion_version(client, name)
    return client.get_model_version(name, version) if version else None


def champions(
    client: MlflowClient, project: str, specialist: str, events: list[PromotionRecord] | None = None
) -> dict[str, ChampionInfo]:
    """The champion of each artifact kind that has one, for `cadre status`.

    Args:
        client: MLflow client.
        project: project name.
        specialist: specialist name.
        events: the specialist's `history`, when the caller has read it already (read here otherwise).

    Returns:
        `{kind: ChampionInfo}`; kinds without a champion are absent.
    """
    result: dict[str, ChampionInfo] = {}
    for kind in REGISTRY_KINDS:
        version = get_champion(client, project, specialist, kind)
        if version is None:
            continue
        if events is None:
            events = history(client, project, specialist)
        made = [e for e in events if e.kind == kind and e.to_version == version.version and e.event != EVENT_REFUSAL]
        result[kind] = ChampionInfo(
            kind=kind,
            model_name=version.name,
            version=version.version,
            promoted_at=made[-1].at if made else None,
            promoted_by=made[-1].actor if made else None,
            metrics=_version_metrics(version),
            run_id=version.run_id,
            gate=version.tags.get(_GATE),
        )
    return result


def _champion_version(client: MlflowClient, name: str) -> str | None:
    try:
        return client.get_registered_model(name).aliases.get(CHAMPION)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


# ---------------------------------------------------------------------------------------- helpers


def _version_metrics(version: ModelVersion) -> dict[str, float]:
    return _scores(json.loads(version.tags.get("cadre.metrics") or "{}"))


def _decision_metrics(decision: GateDecision) -> dict[str, float]:
    """The candidate's scores as the decision reports them: `decision.metrics`, else its rule outcomes.

    `cadre.evaluation.gates.GateDecision` lists one outcome per rule with the candidate's aggregate for
    absolute and beat-champion rules; a slice rule's number is its worst slice, so it is left out.
    """
    found = _scores(getattr(decision, "metrics", None))
    if found:
        return found
    for outcome in decision.to_dict().get("outcomes") or []:
        if isinstance(outcome, Mapping) and outcome.get("kind") != "max_slice_drop" and outcome.get("metric"):
            found.update({str(outcome["metric"]): value for value in _scores({"v": outcome.get("candidate")}).values()})
    return found


def _scores(metrics: Any) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        return {}
    return {str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _step(hook: StepHook | None, step: str) -> None:
    if hook is not None:
        hook(step)


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"


def _float(text: str | None) -> float:
    try:
        return float(text or "0")
    except ValueError:
        return 0.0
