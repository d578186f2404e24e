"""virtlet.procs against real processes: running, a zombie, gone, and a command name made to confuse a parser."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from virtlet import procs


def test_this_process_runs() -> None:
    assert procs.running(os.getpid())
    assert procs.stat_fields(os.getpid())[1] == str(os.getppid())  # field 4, the parent


def test_a_zombie_and_a_reaped_child_do_not_run() -> None:
    child = subprocess.Popen(["sleep", "60"])
    assert procs.running(child.pid)
    child.kill()
    for _ in range(200):  # dead but not reaped: a zombie
        if procs.stat_fields(child.pid)[0] == "Z":
            break
        time.sleep(0.01)
    assert not procs.running(child.pid)
    child.wait()
    assert not procs.running(child.pid)


def test_a_command_name_with_a_paren_and_spaces() -> None:
    code = "open('/proc/self/comm', 'w').write('x) R 1 2'); import sys; sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        for _ in range(200):
            with open(f"/proc/{child.pid}/comm") as f:
                if f.read().strip() == "x) R 1 2":
                    break
            time.sleep(0.01)
        fields = procs.stat_fields(child.pid)
        assert fields[0] in ("S", "R") and fields[1] == str(os.getpid())
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
