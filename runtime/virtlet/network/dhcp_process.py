"""Starting, finding and stopping the per-pod DHCP server process.

The server runs in its own session, so a SIGKILL of virtletd leaves it serving; the next virtletd finds it
again through its pid file.  A pid only counts as our server when ``/proc/<pid>/cmdline`` names the server
module *and* this pod's config file, so a recycled pid is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from virtlet import errors

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
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z" and MODULE.encode() in cmdline and str(self.config).encode() in cmdline

    def start(self, timeout: float = 20.0) -> int:
        """Start the server unless it runs; return its pid once it has its socket open."""
        running = self.pid()
        if running is not None:
            return running
        self.pid_file.unlink(missing_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", MODULE, "--netns", self.netns_path, "--config", str(self.config),
                 "--pid-file", str(self.pid_file)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
        self._children[str(self.config)] = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid() == proc.pid:
                return proc.pid
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        self._kill(proc.pid)
        tail = self.log_file.read_text(errors="replace")[-800:] if self.log_file.exists() else ""
        raise errors.Internal(
            f"the DHCP server for {self.netns_path} did not start: {tail.strip() or 'no output'}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server if it runs (idempotent) and remove its pid file."""
        pid = self.pid()
        if pid is not None:
            self._kill(pid, timeout)
        self.pid_file.unlink(missing_ok=True)

    def _kill(self, pid: int, timeout: float = 10.0) -> None:
        child = self._children.pop(str(self.config), None)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if child is not None and child.pid == pid:
                    if child.poll() is not None:
                        return
                elif not self._alive(pid):
                    return
                time.sleep(0.05)
        if child is not None:
            child.poll()

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"
