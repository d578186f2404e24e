"""``virtletctl console``: the VM's serial console in this terminal; Ctrl-] detaches (the VM keeps running)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO

from virtlet.stream.client import AttachClient

DETACH = b"\x1d"  # Ctrl-]


def run_console(url: str, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """Attach through ``url`` until Ctrl-] (0), the console ends (0) or fails (1)."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    client = AttachClient(url, stdin=True, tty=True)
    restore = _raw_mode(stdin)
    done = threading.Event()
    failed: list[str] = []

    def output() -> None:
        while not done.is_set():
            data = client.read(0.5)
            if data is None:
                continue
            if not data:
                status = client.status(2.0)
                if isinstance(status, dict) and status.get("status") == "Failure":
                    failed.append(str(status.get("message", "")))
                elif isinstance(status, str) and status:
                    failed.append(status)
                break
            stdout.write(data)
            stdout.flush()
        done.set()

    t = threading.Thread(target=output, daemon=True)
    t.start()
    if _has_fd(stdin) and os.isatty(stdin.fileno()):
        stdout.write(b"[virtletctl: attached; Ctrl-] detaches]\r\n")
        stdout.flush()
    try:
        fd = stdin.fileno() if _has_fd(stdin) else None
        while not done.is_set():
            data = os.read(fd, 1024) if fd is not None else stdin.read(1024)
            if not data:
                done.wait()  # stdin ended: keep showing output until the console ends
                break
            if DETACH in data:
                before = data.split(DETACH, 1)[0]
                if before:
                    client.write(before)
                break
            client.write(data)
    except (OSError, KeyboardInterrupt):
        pass
    finally:
        done.set()
        restore()
        client.close()
        t.join(3)
    if failed:
        print(f"\nvirtletctl: console: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def _has_fd(f: object) -> bool:
    try:
        f.fileno()  # type: ignore[attr-defined]
        return True
    except (AttributeError, OSError, ValueError):
        return False


def _raw_mode(stdin: BinaryIO) -> Callable[[], None]:
    """Put a terminal in raw mode; returns the function that restores it."""
    if not _has_fd(stdin) or not os.isatty(stdin.fileno()):
        return lambda: None
    import termios
    import tty

    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)

    def restore() -> None:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    return restore
