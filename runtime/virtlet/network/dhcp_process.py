"""Starting, finding and stopping the per-pod DHCP server process.

The server runs in its own session, so a SIGKILL of virtletd leaves it serving; the next virtletd finds it
again through its pid file.  A pid only counts as our server when ``/proc/<pid>/cmdline`` names the server
module *and* this pod's config file, so a recycled pid is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from virtlet import errors, procs

MODULE = "virtlet.network.dhcp_server"


class DhcpProcess:
    """The DHCP server of one sandbox, whose files live in ``state_dir`` (config, pid file, log)."""

    _children: dict[str, subprocess.Popen[bytes]] = {}  # reaped by us while this virtletd lives

    def __init__(self, state_dir: Path, netns_path: str) -> None:
        self.state_dir = Path(state_dir)
        self.netns_path = netns_path
        self.config = self.state_dir / "dhcp.json"
        self.pid_file = self.state_dir / "dhcp.pid"
        self.log_file = self.state_dir / "dhcp.log"

    def pid(self) -> int | None:
        """The pid of our running server, or ``None``."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._is_ours(pid) else None

    def _is_ours(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return procs.running(pid) and MODULE.encode() in cmdline and str(self.config).encode() in cmdline

    def start(self, timeout: float = 20.0, *, wait: bool = True) -> int:
        """Start the server unless it runs; return its pid once it has its socket open.

        ``wait=False`` (RunPodSandbox) returns as soon as the process is spawned: the interpreter's start-up
        (about 0.1 s) then overlaps CreateContainer instead of adding to RunPodSandbox, and StartContainer calls
        ``start()`` again before QEMU starts (``PodNetwork.host_taps_for_start``), which waits for the server
        spawned here or starts a new one when it died: no guest ever boots without its DHCP server."""
        running = self.pid()
        if running is not None:
            return running
        proc = self._children.get(str(self.config))
        reused = proc is not None and proc.poll() is None
        if proc is None or not reused:
            proc = self._spawn()
        if not wait:
            return proc.pid
        deadline = time.monotonic() + timeout
        delay = 0.002  # the server needs ~0.1 s; polling starts fine-grained so its readiness is seen at once
        while time.monotonic() < deadline:
            if self.pid() == proc.pid:
                return proc.pid
            if proc.poll() is not None:
                if not reused:
                    break
                # the unwaited server died (killed just now: its SIGKILL may land after the check above): one new
                reused, proc = False, self._spawn()
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        self._kill(proc.pid)
        tail = self.log_file.read_text(errors="replace")[-800:] if self.log_file.exists() else ""
        raise errors.Internal(
            f"the DHCP server for {self.netns_path} did not start: {tail.strip() or 'no output'}")

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.pid_file.unlink(missing_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", MODULE, "--netns", self.netns_path, "--config", str(self.config),
                 "--pid-file", str(self.pid_file)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
        self._children[str(self.config)] = proc
        return proc

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server if it runs (idempotent) and remove its pid file.  A server this virtletd spawned
        without waiting (``start(wait=False)``) may not have written its pid file yet: it is stopped too."""
        with self.stopping(timeout):
            pass

    @contextlib.contextmanager
    def stopping(self, timeout: float = 10.0) -> Iterator[None]:
        """:meth:`stop` in two halves: SIGTERM when the block begins; its exit awaited (SIGKILL after
        ``timeout``) and the pid file removed when the block ends, so the interpreter's exit (about 40 ms)
        overlaps the caller's other work (a sandbox's CNI DEL)."""
        pid = self.pid()
        if pid is None:
            child = self._children.get(str(self.config))
            if child is not None and child.poll() is None:
                pid = child.pid
            elif self.config.exists():  # spawned by a virtletd killed before the server wrote its pid file
                pid = self._find_by_cmdline()
        pidfd = self._terminate(pid) if pid is not None else None
        try:
            yield
        finally:
            if pid is not None:
                self._await_exit(pid, pidfd, timeout)
            self._children.pop(str(self.config), None)
            self.pid_file.unlink(missing_ok=True)

    def _find_by_cmdline(self) -> int | None:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._is_ours(int(entry.name)):
                return int(entry.name)
        return None

    def _kill(self, pid: int, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit is awaited on a pidfd (seen at once, no polling
        interval: the server exits within milliseconds of SIGTERM)."""
        self._await_exit(pid, self._terminate(pid), timeout)

    @staticmethod
    def _terminate(pid: int) -> int | None:
        """SIGTERM through a pidfd, which is returned to await the exit on (``None``: the process is gone)."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            pass  # exited meanwhile: the pidfd is readable
        return pidfd

    def _await_exit(self, pid: int, pidfd: int | None, timeout: float) -> None:
        """Wait up to ``timeout`` for the exit, then SIGKILL and wait again; reap our child; close the pidfd."""
        child = self._children.pop(str(self.config), None)
        try:
            if pidfd is not None and not select.select([pidfd], [], [], timeout)[0]:
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                select.select([pidfd], [], [], timeout)
        finally:
            if pidfd is not None:
                os.close(pidfd)
            if child is not None and child.pid == pid:
                try:
                    child.wait(timeout)  # reap it (it has exited)
                except subprocess.TimeoutExpired:
                    pass
