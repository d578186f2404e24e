"""What the proxy remembers about its secondaries, across their outages and its own restarts.

Why: (1) the kubelet's PLEG relists every second and treats a sandbox missing from the list as a dead pod
(it then kills it and runs a new sandbox).  While a secondary is down or restarting its VMs keep running,
so the proxy answers lists with that secondary's **last-known** sandboxes and containers (its last
successful unfiltered list, stored here and on disk) instead of leaving them out.  (2) Secondary ids are
shown as 64-hex strings (sha256 of ``<runtime>/<backend id>``), like containerd's, so the proxy cannot route
by looking at an id: the **id index** maps each shown id to its runtime and backend id.  It is kept in
``ids.json`` under the state dir and rebuilt from the secondaries' lists (every unfiltered list refreshes it).

Files (directory mode 0700, files 0600, written atomically): ``ids.json`` and
``last-<runtime>-<Method>.pb`` (a serialized CRI list response in the backend's raw ids).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from virtlet import errors
from virtlet.cri.gen import api_pb2 as api
from virtlet.proxy.naming import external_id

log = logging.getLogger("virtlet.proxy")

ID_FILE = "ids.json"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
SANDBOX, CONTAINER = "sandbox", "container"
LIST_KINDS = {"ListPodSandbox": (SANDBOX, api.ListPodSandboxResponse),
              "ListContainers": (CONTAINER, api.ListContainersResponse)}


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp makes it 0600
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class ProxyState:
    """The id index and the last-known lists; ``state_dir`` None keeps everything in memory only."""

    def __init__(self, state_dir: Path | None) -> None:
        self.dir = state_dir
        self._lock = threading.Lock()
        self._ids: dict[str, tuple[str, str, str]] = {}  # shown id -> (runtime, kind, backend id)
        self._lists: dict[tuple[str, str], bytes] = {}  # (runtime, method) -> serialized raw response
        self._synced: set[tuple[str, str]] = set()  # (runtime, kind) listed in full since start
        self._write_failed = False
        self.index_loaded = False  # ids.json was read at start: only a lost index needs rebuilding on a miss
        if state_dir is not None:
            try:
                state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(state_dir, 0o700)
            except OSError as exc:
                raise errors.FailedPrecondition(
                    f"state_dir: cannot use {state_dir}: {exc.strerror}; give the proxy a writable "
                    "directory (--state-dir)") from exc
            self._load()

    def _store(self, name: str, data: bytes) -> None:
        """Write a state file; a failure (disk full, read-only) is logged once and the proxy goes on from
        memory: losing the file only costs a rebuild after a restart, failing CRI calls would cost pods."""
        if self.dir is None:
            return
        try:
            _write(self.dir / name, data)
            if self._write_failed:
                self._write_failed = False
                log.info("state dir %s is writable again", self.dir)
        except OSError as exc:
            if not self._write_failed:
                self._write_failed = True
                log.warning("cannot write %s in state dir %s: %s (kept in memory)", name, self.dir, exc)

    def _load(self) -> None:
        assert self.dir is not None
        path = self.dir / ID_FILE
        try:
            data = json.loads(path.read_text())
            for shown, (runtime, kind, raw) in data["ids"].items():
                if HEX64.match(shown) and external_id(runtime, raw) == shown:
                    self._ids[shown] = (runtime, kind, raw)
            self.index_loaded = True
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("id index %s is unreadable (%s); it is rebuilt from the backends' lists", path, exc)
        for f in self.dir.glob("last-*.pb"):
            runtime, _, method = f.name.removeprefix("last-").removesuffix(".pb").rpartition("-")
            if method not in LIST_KINDS:
                continue
            try:
                data = f.read_bytes()
                LIST_KINDS[method][1]().ParseFromString(data)  # a torn or foreign file is not served
            except (OSError, DecodeError) as exc:
                log.warning("last-known list %s is unreadable (%s); ignored", f, exc)
                continue
            self._lists[(runtime, method)] = data

    def _save_ids(self) -> None:
        if self.dir is not None:
            ids = {k: list(v) for k, v in sorted(self._ids.items())}
            self._store(ID_FILE, json.dumps({"version": 1, "ids": ids}).encode())

    # -- id index --------------------------------------------------------------------------------------------

    def record(self, runtime: str, kind: str, raw: str) -> str:
        """The id shown for ``raw`` of ``runtime`` (remembered in the index)."""
        shown = external_id(runtime, raw)
        if shown != raw:
            with self._lock:
                if shown not in self._ids:
                    self._ids[shown] = (runtime, kind, raw)
                    self._save_ids()
        return shown

    def resolve(self, shown: str) -> tuple[str, str] | None:
        """``(runtime, backend id)`` of a shown secondary id, or None."""
        hit = self._ids.get(shown)
        return (hit[0], hit[2]) if hit else None

    def synced(self, runtime: str) -> bool:
        return (runtime, SANDBOX) in self._synced and (runtime, CONTAINER) in self._synced

    def replace(self, runtime: str, kind: str, raws: list[str]) -> None:
        """A full list of ``kind`` from ``runtime``: index every id in it, forget the ones that are gone."""
        fresh = {external_id(runtime, r): (runtime, kind, r) for r in raws if r}
        with self._lock:
            self._synced.add((runtime, kind))
            stale = [k for k, v in self._ids.items() if v[0] == runtime and v[1] == kind and k not in fresh]
            new = [k for k in fresh if k not in self._ids]
            if not stale and not new:
                return
            for k in stale:
                del self._ids[k]
            self._ids.update(fresh)
            self._save_ids()

    # -- last-known lists ------------------------------------------------------------------------------------

    def remember_list(self, runtime: str, method: str, resp: Any) -> None:
        """An unfiltered list answered by ``runtime``: keep it (and index its ids)."""
        kind, _ = LIST_KINDS[method]
        items = resp.items if method == "ListPodSandbox" else resp.containers
        self.replace(runtime, kind, [i.id for i in items])
        data = resp.SerializeToString(deterministic=True)
        with self._lock:
            if self._lists.get((runtime, method)) == data:
                return
            self._lists[(runtime, method)] = data
            self._store(f"last-{runtime}-{method}.pb", data)

    def last_list(self, runtime: str, method: str, request: Any) -> Any | None:
        """The last-known answer of ``runtime`` to ``method``, narrowed by ``request.filter``; None if none."""
        data = self._lists.get((runtime, method))
        if data is None:
            return None
        _, cls = LIST_KINDS[method]
        resp: Any = cls()
        resp.ParseFromString(data)
        if not request.HasField("filter"):
            return resp
        f = request.filter
        items = resp.items if method == "ListPodSandbox" else resp.containers
        keep = [i for i in items if _matches(i, f)]
        del items[:]
        items.extend(keep)
        return resp


def _matches(item: Any, f: Any) -> bool:
    if f.id and item.id != f.id:
        return False
    if f.HasField("state") and item.state != f.state.state:
        return False
    if getattr(f, "pod_sandbox_id", "") and item.pod_sandbox_id != f.pod_sandbox_id:
        return False
    return all(item.labels.get(k) == v for k, v in f.label_selector.items())
