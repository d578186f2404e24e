"""The state database's schema steps: each step runs in one transaction with the ``user_version`` it reaches
(``virtlet.state.store.StateStore`` applies them at open); never edit a released step, add one."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable

from virtlet.network.model import PodNetworkInfo

log = logging.getLogger("virtlet.state.store")

_V1_SCHEMA = """
    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, namespace TEXT NOT NULL, uid TEXT NOT NULL,
        attempt INTEGER NOT NULL, state TEXT NOT NULL, created_at INTEGER NOT NULL,
        runtime_handler TEXT NOT NULL, netns TEXT NOT NULL, labels TEXT NOT NULL, annotations TEXT NOT NULL,
        config BLOB NOT NULL, network TEXT NOT NULL DEFAULT '{}', network_torn_down INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE containers (
        id TEXT PRIMARY KEY, sandbox_id TEXT NOT NULL, name TEXT NOT NULL, attempt INTEGER NOT NULL,
        state TEXT NOT NULL, created_at INTEGER NOT NULL, started_at INTEGER NOT NULL DEFAULT 0,
        finished_at INTEGER NOT NULL DEFAULT 0, exit_code INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '', message TEXT NOT NULL DEFAULT '', image TEXT NOT NULL,
        image_ref TEXT NOT NULL, log_path TEXT NOT NULL, labels TEXT NOT NULL, annotations TEXT NOT NULL,
        config BLOB NOT NULL, extra TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX containers_by_sandbox ON containers (sandbox_id);
    """

# PodSandboxConfig field numbers (protos/runtime/v1/api.proto) of the two strings schema 2 moves out of the blob.
_POD_CONFIG_HOSTNAME = 2
_POD_CONFIG_LOG_DIRECTORY = 3


def _proto_strings(blob: bytes, wanted: set[int]) -> dict[int, str]:
    """The top-level length-delimited fields ``wanted`` of a serialized protobuf message (the last one wins, as
    protobuf merges).  Hand-written so the state layer stays free of generated CRI code; only the migration of
    schema 1 uses it.  Raises ``ValueError`` on a truncated or malformed message."""
    out: dict[int, str] = {}
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= len(blob) or shift > 63:
                raise ValueError("truncated varint")
            byte = blob[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(blob):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            varint()
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            size = varint()
            if pos + size > len(blob):
                raise ValueError("truncated field")
            if number in wanted:
                out[number] = blob[pos:pos + size].decode("utf-8", "replace")
            pos += size
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if pos > len(blob):
            raise ValueError("truncated field")
    return out


def _v2_sandbox_facts(db: sqlite3.Connection) -> None:
    """Schema 2: the sandbox record holds its facts typed.  ``hostname`` and ``log_directory`` move out of the
    stored PodSandboxConfig (the ``config`` blob, dropped), the network JSON loses its copies of the host name
    and the pod IPs.  The host name is what the running pods were given: the PodSandboxConfig's, else the one
    the network JSON held, else the pod name (as schema-1 virtletd resolved it)."""
    db.execute("ALTER TABLE sandboxes ADD COLUMN hostname TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE sandboxes ADD COLUMN log_directory TEXT NOT NULL DEFAULT ''")
    for row in db.execute("SELECT id, name, config, network FROM sandboxes").fetchall():
        try:
            strings = _proto_strings(bytes(row["config"]), {_POD_CONFIG_HOSTNAME, _POD_CONFIG_LOG_DIRECTORY})
        except ValueError as exc:
            log.warning("state migration: the stored pod config of sandbox %s is unreadable (%s); its log "
                        "directory is lost (container log paths are reported as given)", row["id"], exc)
            strings = {}
        network = "{}"
        old_hostname = ""
        try:
            raw = json.loads(row["network"] or "{}")
            if isinstance(raw, dict) and raw.get("nics") is not None:
                old_hostname = str(raw.get("hostname", "") or "")
                network = json.dumps(PodNetworkInfo.from_dict(raw).to_dict(), sort_keys=True)
        except (ValueError, KeyError, TypeError) as exc:
            # Decision: one bad row must not keep virtletd from starting (every other pod would be orphaned).
            # The teardown finds what was made without it (pid file, tap name prefix, CNI caches, the netns).
            log.warning("state migration: the stored network of sandbox %s is unreadable (%s); dropped, the "
                        "teardown finds what was made without it", row["id"], exc)
        hostname = strings.get(_POD_CONFIG_HOSTNAME) or old_hostname or row["name"]
        db.execute("UPDATE sandboxes SET hostname=?, log_directory=?, network=? WHERE id=?",
                   (hostname, strings.get(_POD_CONFIG_LOG_DIRECTORY, ""), network, row["id"]))
    db.execute("ALTER TABLE sandboxes DROP COLUMN config")


# Each step runs in one transaction with the ``user_version`` it reaches; never edit a released step, add one.
MIGRATIONS: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
    _V1_SCHEMA,  # 1: initial schema
    _v2_sandbox_facts,  # 2: hostname, log_directory, typed network; no PodSandboxConfig blob
)
