"""The state machine of sandboxes and containers, and the SQLite database that holds it.

Every change is committed before the RPC that made it replies, so a restart (even after SIGKILL) finds what the
kubelet was told.  The database runs in WAL mode; the schema is versioned and migrated forward at open.

States:
- sandbox: ``CREATING`` (internal: record written, netns/network not finished) -> ``READY`` -> ``NOTREADY``.
  A ``CREATING`` record found at start-up belonged to a RunPodSandbox that never replied; it is rolled back.
- container: ``CREATED`` -> ``RUNNING`` -> ``EXITED`` (a new container may follow an exited one).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from virtlet import errors, preconditions
from virtlet.network.model import PodNetworkInfo
from virtlet.state.migrations import MIGRATIONS
from virtlet.state.states import (
    CONTAINER_CREATED,
    CONTAINER_EXITED,
    CONTAINER_RUNNING,
    CONTAINER_UNKNOWN,
    SANDBOX_CREATING,
    SANDBOX_NOTREADY,
    SANDBOX_READY,
)

__all__ = [  # the states are re-exported: the layers above name them as ``store.SANDBOX_READY``
    "CONTAINER_CREATED", "CONTAINER_EXITED", "CONTAINER_RUNNING", "CONTAINER_UNKNOWN", "SANDBOX_CREATING",
    "SANDBOX_NOTREADY", "SANDBOX_READY", "SCHEMA_VERSION", "ContainerRecord", "SandboxRecord", "StateStore", "now_ns"]

log = logging.getLogger(__name__)

_SANDBOX_TRANSITIONS = {
    SANDBOX_CREATING: {SANDBOX_READY, SANDBOX_NOTREADY},
    SANDBOX_READY: {SANDBOX_NOTREADY},
    SANDBOX_NOTREADY: {SANDBOX_NOTREADY},
}
_CONTAINER_TRANSITIONS = {
    CONTAINER_CREATED: {CONTAINER_RUNNING, CONTAINER_EXITED},
    CONTAINER_RUNNING: {CONTAINER_EXITED, CONTAINER_RUNNING},
    CONTAINER_EXITED: {CONTAINER_EXITED},
    CONTAINER_UNKNOWN: {CONTAINER_RUNNING, CONTAINER_EXITED},
}


def now_ns() -> int:
    return time.time_ns()


@dataclass(frozen=True)
class SandboxRecord:
    """One pod sandbox: typed facts only, no CRI message.  The CRI servicer converts the PodSandboxConfig once
    (``hostname`` is the kubelet's, or the pod name when it sent none; ``log_directory`` is where the kubelet
    wants the containers' CRI logs); ``network`` is what the pod network set-up found (``None`` until it ran,
    and for a virtletd without pod networking)."""

    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    state: str
    created_at: int
    runtime_handler: str
    netns: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    hostname: str = ""
    log_directory: str = ""
    network: PodNetworkInfo | None = None
    network_torn_down: bool = False


@dataclass(frozen=True)
class ContainerRecord:
    id: str
    sandbox_id: str
    name: str
    attempt: int
    state: str
    created_at: int
    image: str
    image_ref: str
    log_path: str
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    config: bytes = b""  # serialized ContainerConfig, opaque here
    extra: dict[str, Any] = field(default_factory=dict)  # runtime details: domain name, overlay, files


SCHEMA_VERSION = len(MIGRATIONS)

_JSON_COLUMNS = {"labels", "annotations", "extra"}


def _encode(name: str, value: Any) -> Any:
    if name == "network":
        return json.dumps(value.to_dict() if value is not None else {}, sort_keys=True)
    if name in _JSON_COLUMNS:
        return json.dumps(value, sort_keys=True)
    if isinstance(value, bool):
        return int(value)
    return value


def _decode_network(text: str) -> PodNetworkInfo | None:
    raw = json.loads(text)
    return PodNetworkInfo.from_dict(raw) if raw.get("nics") is not None else None


_Record = TypeVar("_Record", "SandboxRecord", "ContainerRecord")


def _decode_row(cls: type[_Record], row: sqlite3.Row) -> _Record:
    values: dict[str, Any] = {}
    for key in row.keys():
        value = row[key]
        if key == "network":
            value = _decode_network(value)
        elif key in _JSON_COLUMNS:
            value = json.loads(value)
        elif key == "network_torn_down":
            value = bool(value)
        elif key == "config":
            value = bytes(value)
        values[key] = value
    return cls(**values)


def _private_db_files(path: Path) -> None:
    """The database holds annotations and container env (secrets): 0600, made so before SQLite opens it (SQLite
    gives its -wal and -shm files the mode of the database file) and tightened when an older virtletd left it
    0644.  No umask change: ``os.open`` with 0600 can only come out tighter."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            os.chmod(p, 0o600)
        except FileNotFoundError:
            pass


_STATE_EVENTS = {CONTAINER_RUNNING: "STARTED", CONTAINER_EXITED: "STOPPED"}


class StateStore:
    """All reads and writes of virtletd state.  Thread-safe; each write is one committed transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._lock = threading.RLock()
        # called with (record, "CREATED" | "STARTED" | "STOPPED" | "DELETED") after each container state change
        # commits, under the store's lock (so in commit order): a listener must only enqueue, never block
        self.container_listeners: list[Callable[[ContainerRecord, str], None]] = []
        _private_db_files(path)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        # Reads go through a second connection: in WAL mode they see every committed write and never wait for a
        # writer's commit (an fsync, with synchronous=FULL), so status and list calls do not queue behind the
        # writes of pod starts running in parallel.
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._reader.row_factory = sqlite3.Row
        # whole-table lists, decoded, with the reader's PRAGMA data_version they were read at (see _read_all)
        self._lists: dict[str, tuple[int, list[Any]]] = {}

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._reader.close()
            self._db.close()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    def _read_all(self, cls: type[_Record], table: str) -> list[_Record]:
        """Every record of ``table``, oldest first.  The kubelet lists sandboxes and containers every second
        and most lists find nothing changed: the decoded list is kept and served again while SQLite's
        ``data_version`` (it changes with every commit by another connection: the writer's, or any other
        process's) stays the same.  The version is read before the rows, so a commit in between only makes the
        next call read again.  Records are frozen; each caller gets its own list."""
        with self._read_lock:
            version = int(self._reader.execute("PRAGMA data_version").fetchone()[0])
            kept = self._lists.get(table)
            if kept is None or kept[0] != version:
                rows = self._reader.execute(f"SELECT * FROM {table} ORDER BY created_at").fetchall()
                kept = (version, [_decode_row(cls, r) for r in rows])
                self._lists[table] = kept
            return list(kept[1])

    # -- schema ---------------------------------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        with self._lock:
            current = self.schema_version()
            if current > SCHEMA_VERSION:
                raise errors.FailedPrecondition(
                    f"state database {self.path} has schema version {current}, newer than this virtletd "
                    f"({SCHEMA_VERSION}); upgrade virtletd or move the state dir away")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                step = MIGRATIONS[version - 1]
                if current:
                    log.info("migrating state database %s from schema %d to %d", self.path, version - 1, version)
                with self._tx():
                    if callable(step):
                        step(self._db)
                    else:
                        for statement in step.split(";"):
                            if statement.strip():
                                self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {version}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    # -- sandboxes ------------------------------------------------------------------------------------
    def add_sandbox(self, rec: SandboxRecord) -> None:
        cols = [f for f in rec.__dataclass_fields__]
        with self._tx() as db:
            # As containerd: the name <name>_<namespace>_<uid>_<attempt> stays reserved from RunPodSandbox until
            # RemovePodSandbox (READY, NOTREADY and half-made CREATING alike), so a retried or repeated
            # RunPodSandbox never makes a second sandbox.  The kubelet uses a new attempt for a new sandbox.
            clash = db.execute(
                "SELECT id FROM sandboxes WHERE name=? AND namespace=? AND uid=? AND attempt=?",
                (rec.name, rec.namespace, rec.uid, rec.attempt)).fetchone()
            if clash:
                reserved = f"{rec.name}_{rec.namespace}_{rec.uid}_{rec.attempt}"
                raise errors.AlreadyExists(
                    f"failed to reserve sandbox name {reserved!r}: name {reserved!r} is reserved for "
                    f"{clash['id']!r} (pod sandbox metadata name, namespace, uid and attempt name a sandbox that "
                    "exists; remove it first or use a new attempt)")
            db.execute(
                f"INSERT INTO sandboxes ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [_encode(c, getattr(rec, c)) for c in cols])

    def get_sandbox(self, sandbox_id: str) -> SandboxRecord | None:
        rows = self._read("SELECT * FROM sandboxes WHERE id=?", (sandbox_id,))
        return _decode_row(SandboxRecord, rows[0]) if rows else None

    def require_sandbox(self, sandbox_id: str) -> SandboxRecord:
        rec = self.get_sandbox(sandbox_id)
        if rec is None or rec.state == SANDBOX_CREATING:
            raise errors.NotFound(f"pod sandbox {sandbox_id!r} not found")
        return rec

    def list_sandboxes(self) -> list[SandboxRecord]:
        return self._read_all(SandboxRecord, "sandboxes")

    def update_sandbox(self, sandbox_id: str, **changes: Any) -> SandboxRecord:
        with self._tx() as db:
            row = db.execute("SELECT * FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
            if row is None:
                raise errors.NotFound(f"pod sandbox {sandbox_id!r} not found")
            rec = _decode_row(SandboxRecord, row)
            if "state" in changes and changes["state"] != rec.state:
                allowed = _SANDBOX_TRANSITIONS.get(rec.state, set())
                if changes["state"] not in allowed:
                    raise errors.FailedPrecondition(
                        f"pod sandbox {sandbox_id}: cannot go from {rec.state} to {changes['state']}")
            new = replace(rec, **changes)
            sets = ", ".join(f"{k}=?" for k in changes)
            db.execute(f"UPDATE sandboxes SET {sets} WHERE id=?",
                       [*(_encode(k, getattr(new, k)) for k in changes), sandbox_id])
            return new

    def delete_sandbox(self, sandbox_id: str) -> None:
        with self._tx() as db:
            left = db.execute("SELECT COUNT(*) FROM containers WHERE sandbox_id=?", (sandbox_id,)).fetchone()[0]
            if left:
                raise errors.FailedPrecondition(
                    f"pod sandbox {sandbox_id} still has {left} container(s); remove them first")
            db.execute("DELETE FROM sandboxes WHERE id=?", (sandbox_id,))

    # -- containers -----------------------------------------------------------------------------------
    def _notify(self, rec: ContainerRecord, change: str) -> None:
        for listener in self.container_listeners:
            try:
                listener(rec, change)
            except Exception:  # an observer must not undo a committed change
                log.exception("container listener failed")

    def add_container(self, rec: ContainerRecord) -> None:
        with self._lock:
            self._add_container(rec)
            self._notify(rec, "CREATED")

    def _add_container(self, rec: ContainerRecord) -> None:
        cols = [f for f in rec.__dataclass_fields__]
        with self._tx() as db:
            sandbox = db.execute("SELECT state FROM sandboxes WHERE id=?", (rec.sandbox_id,)).fetchone()
            if sandbox is None or sandbox["state"] == SANDBOX_CREATING:
                raise errors.NotFound(f"pod sandbox {rec.sandbox_id!r} not found")
            preconditions.sandbox_ready("CreateContainer", rec.sandbox_id, sandbox["state"])
            live = db.execute(
                "SELECT id, name FROM containers WHERE sandbox_id=? AND state IN (?, ?)",
                (rec.sandbox_id, CONTAINER_CREATED, CONTAINER_RUNNING)).fetchone()
            if live:
                raise errors.FailedPrecondition(
                    f"a VM pod runs exactly one container: sandbox {rec.sandbox_id} already has live container "
                    f"{live['name']!r} ({live['id']}); stop and remove it first")
            db.execute(
                f"INSERT INTO containers ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [_encode(c, getattr(rec, c)) for c in cols])

    def get_container(self, container_id: str) -> ContainerRecord | None:
        rows = self._read("SELECT * FROM containers WHERE id=?", (container_id,))
        return _decode_row(ContainerRecord, rows[0]) if rows else None

    def require_container(self, container_id: str) -> ContainerRecord:
        rec = self.get_container(container_id)
        if rec is None:
            raise errors.NotFound(f"container {container_id!r} not found")
        return rec

    def list_containers(self, sandbox_id: str | None = None) -> list[ContainerRecord]:
        if sandbox_id is None:
            return self._read_all(ContainerRecord, "containers")
        rows = self._read("SELECT * FROM containers WHERE sandbox_id=? ORDER BY created_at", (sandbox_id,))
        return [_decode_row(ContainerRecord, r) for r in rows]

    def update_container(self, container_id: str, **changes: Any) -> ContainerRecord:
        with self._lock:
            old, new = self._update_container(container_id, **changes)
            if new.state != old.state and new.state in _STATE_EVENTS:
                self._notify(new, _STATE_EVENTS[new.state])
            return new

    def _update_container(self, container_id: str, **changes: Any) -> tuple[ContainerRecord, ContainerRecord]:
        with self._tx() as db:
            row = db.execute("SELECT * FROM containers WHERE id=?", (container_id,)).fetchone()
            if row is None:
                raise errors.NotFound(f"container {container_id!r} not found")
            rec = _decode_row(ContainerRecord, row)
            if "state" in changes and changes["state"] != rec.state:
                allowed = _CONTAINER_TRANSITIONS.get(rec.state, set())
                if changes["state"] not in allowed:
                    raise errors.FailedPrecondition(
                        f"container {container_id}: cannot go from {rec.state} to {changes['state']}")
            new = replace(rec, **changes)
            sets = ", ".join(f"{k}=?" for k in changes)
            db.execute(f"UPDATE containers SET {sets} WHERE id=?",
                       [*(_encode(k, getattr(new, k)) for k in changes), container_id])
            return rec, new

    def delete_container(self, container_id: str) -> None:
        with self._lock:
            rec = self.get_container(container_id)
            with self._tx() as db:
                db.execute("DELETE FROM containers WHERE id=?", (container_id,))
            if rec is not None:
                self._notify(rec, "DELETED")
